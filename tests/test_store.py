"""The file-system store on its own: one-time claims across real processes (the backend-neutral
contract, a model-based suite, is tests/test_store_contract.py)."""

from __future__ import annotations

import asyncio
import multiprocessing
from pathlib import Path

import pytest

from chunkd.errors import ChunkdError
from chunkd.model.session import EndKind
from chunkd.store import FileSystemStore


def _claim_in_process(root: str, sid: str, kind: str, start, out) -> None:
    store = FileSystemStore(Path(root))
    start.wait()
    claim = asyncio.run(store.claim_end(sid, EndKind(kind)))
    out.put((claim.won, claim.kind, claim.task_id))


def test_one_claim_wins_across_processes(tmp_path):
    store = FileSystemStore(tmp_path)
    meta = asyncio.run(store.create(filename="a.wav", extension="wav", total_size=10, chunk_size=10,
                                    total_chunks=1, ttl=60, language=None, model=None,
                                    task_params={}))
    ctx = multiprocessing.get_context("fork")
    start, out = ctx.Event(), ctx.Queue()
    kinds = ["finalize", "abort"] * 4
    procs = [ctx.Process(target=_claim_in_process, args=(str(tmp_path), meta.session_id, k, start, out))
             for k in kinds]
    for p in procs:
        p.start()
    start.set()
    results = [out.get(timeout=30) for _ in procs]
    for p in procs:
        p.join(30)
    winners = [r for r in results if r[0]]
    assert len(winners) == 1
    # every loser sees the winner's claim, with the same task id
    assert {(kind, task) for _, kind, task in results} == {winners[0][1:]}


async def test_removed_session_is_gone_for_every_call(tmp_path):
    store = FileSystemStore(tmp_path)
    meta = await store.create(filename="a.wav", extension="wav", total_size=10, chunk_size=10,
                              total_chunks=1, ttl=60, language=None, model=None, task_params={})
    await store.remove(meta.session_id, EndKind.ABORT)
    with pytest.raises(ChunkdError) as gone:
        await store.get(meta.session_id)
    assert (gone.value.status, gone.value.code) == (410, "session_aborted")
    with pytest.raises(ChunkdError) as gone:
        await FileSystemStore(tmp_path).state(meta.session_id)  # after a restart too
    assert gone.value.status == 410
