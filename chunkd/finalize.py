"""Finalize: turn a complete session into exactly one task.

    check complete ──► claim the end (link, once) ──► size + libmagic ──► task runner (hand-off)
                             │ lost the race                 │ not audio/video
                             ▼                               ▼
                   wait for the winner's outcome      failed.json, bytes removed, 415

Nothing here copies the file: the checks read its first bytes and the hand-off renames it, so
finalize costs the same for 1 MiB and for 50 GiB. A claim whose owner died (no outcome after
:data:`~chunkd.store.filesystem.STALE_CLAIM_SECONDS`) is finished by the next finalize with the
same task id, and every step after the claim is idempotent for that reason.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

from chunkd.errors import ChunkdError, Conflict, Gone, InvalidField
from chunkd.handoff.base import FinishedUpload
from chunkd.store.base import SessionState, SessionStore
from chunkd.tasks import TaskRunner
from chunkd.validate import check_media

#: How long a finalize that lost the race waits for the winner's outcome before answering.
WAIT_FOR_WINNER_SECONDS = 10.0


async def finalize(store: SessionStore, runner: TaskRunner, session_id: str) -> dict[str, Any]:
    """Finalize the session; return its task record. Idempotent: same task every time."""
    state = await store.state(session_id)
    outcome = _outcome(state)
    if outcome is not None:
        return outcome
    if state.claim is None:
        if state.missing:
            raise Conflict(
                f"{len(state.missing)} of {state.meta.total_chunks} chunks are missing",
                code="chunks_missing", missing_chunks=state.missing,
            )
        claim = await store.claim_end(session_id, "finalize")
        if claim.kind == "expire":
            raise Gone("this upload session has expired", code="session_expired")
        if claim.kind != "finalize":
            raise Gone("this upload session was aborted", code="session_aborted")
        if claim.won:
            return await _run(store, runner, state, claim.task_id)
    # Someone else holds the claim: wait for their outcome, or take over if they died.
    deadline = time.monotonic() + WAIT_FOR_WINNER_SECONDS
    while True:
        state = await store.state(session_id)
        outcome = _outcome(state)
        if outcome is not None:
            return outcome
        assert state.claim is not None
        if store.stale(state.claim):
            return await _run(store, runner, state, state.claim.task_id)
        if time.monotonic() > deadline:
            return {"task_id": state.claim.task_id, "stage": "finalizing"}
        await asyncio.sleep(0.05)


def _outcome(state: SessionState) -> dict[str, Any] | None:
    """The finished task, or re-raise the recorded failure; ``None`` while undecided."""
    if state.failure is not None:
        raise ChunkdError.from_json(state.failure)
    return state.task


async def _run(
    store: SessionStore, runner: TaskRunner, state: SessionState, task_id: str | None
) -> dict[str, Any]:
    assert task_id is not None
    meta = state.meta
    path = store.data_path(meta.session_id)
    try:
        size = (await asyncio.to_thread(os.stat, path)).st_size
        if size != meta.total_size:
            raise InvalidField(
                f"the file has {size} bytes, the session declared {meta.total_size}",
                code="size_mismatch", expected_bytes=meta.total_size, actual_bytes=size,
            )
        mime = await check_media(path)
    except FileNotFoundError:
        # A hand-off that crashed after its rename: the file is already where it was going.
        mime = "unknown"
    except ChunkdError as exc:
        await store.record_failure(meta.session_id, {"status": exc.status, **exc.to_json()})
        raise
    return await runner.start(FinishedUpload(task_id, path, mime, meta))
