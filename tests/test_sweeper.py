"""The sweeper removes expired sessions and their bytes, never one being written or finalized."""

from __future__ import annotations

import asyncio
import os
import time

from chunkd.app import make_app
from chunkd.config import Config
from chunkd.core.sweeper import sweep
from chunkd.keys import STORE
from chunkd.model.session import EndKind
from conftest import (
    MEDIA,
    ChunkdTestServer,
    create_session,
    put_chunk,
    raw_partial,
    status_line,
    upload_all,
)


def age(path, seconds: float) -> None:
    t = time.time() - seconds
    os.utime(path, (t, t))


async def test_expired_session_is_swept_and_answers_410(aiohttp_client, tmp_path):
    config = Config(min_chunk_size=1024, data_dir=tmp_path / "data", chunk_size=4096, session_ttl=1, sweep_interval=0.2)
    client = await aiohttp_client(make_app(config))
    data = (MEDIA / "speech.ogg").read_bytes()
    sid = (await create_session(client, "speech.ogg", data, 4096))["session_id"]
    await put_chunk(client, sid, 0, data[:4096])
    session_dir = config.data_dir / "sessions" / sid
    age(session_dir / "data", 3600)  # nothing written for an hour
    for _ in range(50):
        await asyncio.sleep(0.1)
        if not session_dir.exists():
            break
    assert not session_dir.exists()
    resp = await client.get(f"/upload/chunked/{sid}/status")
    assert resp.status == 410
    assert (await resp.json())["error"]["code"] == "session_expired"
    resp = await put_chunk(client, sid, 1, data[4096:8192])
    assert resp.status == 410


async def test_sweep_spares_live_busy_and_finalizing_sessions(aiohttp_client, tmp_path):
    # the files are aged by an hour below: the idle expiry (tested in test_quotas) is kept out
    config = Config(min_chunk_size=1024, data_dir=tmp_path / "data", chunk_size=4096, session_ttl=1,
                    sweep_interval=3600, idle_session_ttl=86400)
    client = await aiohttp_client(make_app(config))
    store = client.server.app[STORE]
    data = (MEDIA / "speech.ogg").read_bytes()
    idle = (await create_session(client, "a.ogg", data, 4096))["session_id"]
    busy = (await create_session(client, "b.ogg", data, 4096))["session_id"]
    recent = (await create_session(client, "c.ogg", data, 4096))["session_id"]
    finalizing = await upload_all(client, "d.ogg", data, 4096)
    done = await upload_all(client, "e.ogg", data, 4096)
    task_id = (await (await client.post(f"/upload/chunked/{done}/finalize")).json())["task_id"]
    for sid in (idle, busy, finalizing):
        age(config.data_dir / "sessions" / sid / "data", 3600)
    assert (await store.claim_end(finalizing, EndKind.FINALIZE)).won
    reader, writer = await raw_partial(client, busy, 1, data[4096:8192], 1000)  # in flight
    await wait_writing(store, busy)
    await asyncio.sleep(1.1)  # every session so far has expired
    live = (await create_session(client, "f.ogg", data, 4096))["session_id"]
    age(config.data_dir / "sessions" / busy / "data", 3600)

    removed = await sweep(store, time.time())

    assert set(removed) == {idle, done}
    left = {p.name for p in (config.data_dir / "sessions").iterdir()}
    # busy: a chunk in flight in this process; recent: bytes written in the last minutes (maybe
    # by another process); finalizing: claimed, no outcome yet; live: not expired.
    assert left == {busy, recent, finalizing, live}
    # the finished file is not the sweeper's: it stays where the hand-off put it
    assert (config.data_dir / "completed" / task_id / "upload.ogg").exists()
    assert list((config.data_dir / "trash").iterdir()) == []
    writer.write(data[4096 + 1000 : 8192])
    # Spared while it was written, but it outlived its session: a clean 410, never a 200 for a
    # chunk the next status would call gone.
    assert b"410" in await status_line(reader)
    writer.close()


async def wait_writing(store, sid: str) -> None:
    for _ in range(250):  # scan, not state(): an expired session answers 410 to state()
        if any(st.meta.session_id == sid and st.writing for st in await store.scan()):
            return
        await asyncio.sleep(0.02)
    raise AssertionError("the chunk never started")


async def test_a_chunk_in_flight_is_never_swept(aiohttp_client, tmp_path):
    """Only the in-flight rule protects this session: no grace for recent writes."""
    config = Config(min_chunk_size=1024, data_dir=tmp_path / "data", chunk_size=4096, session_ttl=1, sweep_interval=3600)
    client = await aiohttp_client(ChunkdTestServer(make_app(config)))
    store = client.server.app[STORE]
    data = (MEDIA / "speech.ogg").read_bytes()
    busy = (await create_session(client, "b.ogg", data, 4096))["session_id"]
    idle = (await create_session(client, "a.ogg", data, 4096))["session_id"]
    reader, writer = await raw_partial(client, busy, 0, data[:4096], 1000)
    await wait_writing(store, busy)
    await asyncio.sleep(1.1)  # both expired; the chunk's body spans the expiry

    assert await sweep(store, time.time(), busy_grace=0) == [idle]

    writer.write(data[1000:4096])
    assert b"410" in await status_line(reader)  # it outlived the session: a clean 410
    writer.close()
    [state] = [st for st in await store.scan() if st.meta.session_id == busy]
    assert state.received == frozenset()  # never counted; the next sweep removes the session
