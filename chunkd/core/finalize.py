"""Finalize: turn a complete session into exactly one task.

    check complete ──► claim the end (once) ──► libmagic on the first MiB ──► task runner
                             │ lost the race                 │ not audio/video
                             ▼                               ▼
                   wait for the winner's outcome      failed.json, bytes removed, 415

Nothing here copies the file: the check reads its first bytes and the hand-off moves it, so
finalize costs the same for 1 MiB and for 50 GiB. A claim whose owner died (no outcome after
:data:`STALE_CLAIM_SECONDS`) is finished by the next finalize, or by recovery, with the same task
id; every step after the claim is idempotent for that reason.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from chunkd import errors as E
from chunkd.core.tasks import TaskRunner
from chunkd.errors import ChunkdError
from chunkd.handoff.base import Credential
from chunkd.model.session import Claim, EndKind, SessionState
from chunkd.model.task import Stage, Task
from chunkd.store.base import SessionStore
from chunkd.validate import MAGIC_BYTES_MAX, check_media

#: How long a finalize that lost the race waits for the winner's outcome before answering 202.
WAIT_FOR_WINNER_SECONDS = 10.0
#: A finalize claim with no outcome after this long is taken to be from a dead process.
STALE_CLAIM_SECONDS = 60.0


@dataclass(frozen=True)
class Finalized:
    """The session has its task (running, or already finished for an inline hand-off)."""

    task: Task


@dataclass(frozen=True)
class StillFinalizing:
    """Another request (or process) holds the claim and is still checking the file."""

    task_id: str


def claim_is_stale(claim: Claim, now: float) -> bool:
    return claim.kind is EndKind.FINALIZE and now - claim.claimed_at > STALE_CLAIM_SECONDS


def stuck(state: SessionState, now: float) -> bool:
    """A finalize claimed long ago with no task and no refusal: its process died mid-way."""
    return (state.claim is not None and claim_is_stale(state.claim, now)
            and state.task is None and state.failure is None)


async def finalize(store: SessionStore, runner: TaskRunner, session_id: str,
                   credential: Credential | None = None) -> Finalized | StillFinalizing:
    """Finalize the session. Idempotent: the same task every time, in any process.
    ``credential`` (the end user's, for a hand-off that acts as them) goes to the task; given on
    a session whose task failed, it sends the file again (same task, next attempt)."""
    deadline = time.monotonic() + WAIT_FOR_WINNER_SECONDS
    while True:
        state = await store.state(session_id)
        if state.failure is not None:
            raise ChunkdError.from_record(state.failure)
        if state.task is not None:
            if credential is not None and state.task.stage is Stage.FAILED:
                # The user's own retry: only they can send their file again (chunkd keeps no
                # credential, so `chunkd retry` cannot).
                return Finalized(await runner.send_again(session_id, credential))
            return Finalized(state.task)
        if state.claim is None:
            if state.missing:
                raise E.CHUNKS_MISSING(missing_count=len(state.missing),
                                       total_chunks=state.meta.total_chunks,
                                       missing_chunks=state.missing)
            claim = await store.claim_end(session_id, EndKind.FINALIZE)
            if claim.kind is EndKind.EXPIRE:
                raise E.SESSION_EXPIRED()
            if claim.kind is EndKind.ABORT:
                raise E.SESSION_ABORTED()
            if claim.won:
                return await _run(store, runner, state, claim, credential)
        elif claim_is_stale(state.claim, store.clock()):
            return await _run(store, runner, state, state.claim, credential)
        elif time.monotonic() > deadline:
            assert state.claim.task_id is not None
            return StillFinalizing(state.claim.task_id)
        await asyncio.sleep(0.05)


async def _run(store: SessionStore, runner: TaskRunner, state: SessionState, claim: Claim,
               credential: Credential | None) -> Finalized:
    assert claim.task_id is not None
    sid = state.meta.session_id
    blob = await store.blob(sid)
    try:
        head = await blob.read(0, MAGIC_BYTES_MAX) if blob is not None else None
    except FileNotFoundError:  # a tus final upload whose parts were being moved: see below
        head = None
    if head is None:
        mime = "unknown"  # a hand-off that crashed in or after its move: it goes on from there
    else:
        try:
            mime = await check_media(head)
        except ChunkdError as exc:
            await store.record_failure(sid, exc)
            raise
    return Finalized(await runner.start(sid, claim.task_id, mime, credential))
