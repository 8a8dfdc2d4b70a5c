"""The file-system store on its own: one-time claims across processes, and a model of its rules."""

from __future__ import annotations

import asyncio
import multiprocessing
import random
from pathlib import Path

import pytest

from chunkd.errors import BadRequest, ChecksumMismatch, Conflict, Gone, TooLarge
from chunkd.store import FileSystemStore
from conftest import sha256


def _claim_in_process(root: str, sid: str, kind: str, start, out) -> None:
    store = FileSystemStore(Path(root))
    start.wait()
    claim = store._claim_sync(sid, kind)
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


async def body(data: bytes, pieces: int = 3):
    step = max(1, len(data) // pieces)
    for i in range(0, len(data), step):
        yield data[i : i + step]


async def test_store_against_a_model(tmp_path):
    """Random puts (good, short, long, corrupt, repeated) and reopenings; the store agrees with a
    plain set of the chunks that should count."""
    rng = random.Random(11)
    chunk = 1024
    source = rng.randbytes(chunk * 12 + 100)
    store = FileSystemStore(tmp_path)
    meta = await store.create(filename="m.wav", extension="wav", total_size=len(source),
                              chunk_size=chunk, total_chunks=13, ttl=600, language=None,
                              model=None, task_params={})
    model: set[int] = set()
    for _ in range(120):
        i = rng.randrange(13)
        part = source[i * chunk : (i + 1) * chunk]
        action = rng.choice(["good", "good", "short", "long", "corrupt", "reopen"])
        if action == "reopen":
            store = FileSystemStore(tmp_path)  # a restart: nothing but the disk
            continue
        if action == "good":
            receipt = await store.put_chunk(meta, i, body(part), sha256=sha256(part))
            assert receipt.already_received == (i in model)
            model.add(i)
        elif i in model:
            continue  # a bad resend of a counted chunk is drained, not written: covered elsewhere
        elif action == "short":
            with pytest.raises(BadRequest):
                await store.put_chunk(meta, i, body(part[:-1]))
        elif action == "long":
            with pytest.raises(TooLarge):
                await store.put_chunk(meta, i, body(part + b"x"))
        else:
            bad = bytes([part[0] ^ 1]) + part[1:]
            with pytest.raises(ChecksumMismatch):
                await store.put_chunk(meta, i, body(bad), sha256=sha256(part))
        state = await store.state(meta.session_id)
        assert state.received == model
    for i in range(13):
        if i not in model:
            part = source[i * chunk : (i + 1) * chunk]
            await store.put_chunk(meta, i, body(part))
    assert store.data_path(meta.session_id).read_bytes() == source
    claim = await store.claim_end(meta.session_id, "finalize")
    assert claim.won
    with pytest.raises(Conflict):
        await store.put_chunk(meta, 0, body(source[:chunk]))
    assert (await store.claim_end(meta.session_id, "abort")).kind == "finalize"


async def test_removed_session_is_gone_for_every_call(tmp_path):
    store = FileSystemStore(tmp_path)
    meta = await store.create(filename="a.wav", extension="wav", total_size=10, chunk_size=10,
                              total_chunks=1, ttl=60, language=None, model=None, task_params={})
    await store.remove(meta.session_id, "abort")
    with pytest.raises(Gone):
        await store.get(meta.session_id)
    with pytest.raises(Gone):
        await FileSystemStore(tmp_path).state(meta.session_id)  # after a restart too
