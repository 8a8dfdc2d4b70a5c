"""Hostile and unlucky timing: duplicate writers, slow bodies, conflicting resends."""

from __future__ import annotations

import asyncio

import aiohttp

import chunkd.store.fs.ranges as ranges
from chunkd.app import make_app
from chunkd.config import Config
from conftest import (
    MEDIA,
    ChunkdTestServer,
    chunks_of,
    create_session,
    put_chunk,
    raw_partial,
    sha256,
    status_line,
)

SPEECH = (MEDIA / "speech.wav").read_bytes()
CHUNK = 65536


async def test_a_late_duplicate_cannot_overwrite_a_finalized_file(client, config):
    parts = chunks_of(SPEECH, CHUNK)
    sid = (await create_session(client, "speech.wav", SPEECH, CHUNK))["session_id"]
    for i, part in enumerate(parts):
        assert (await put_chunk(client, sid, i, part)).status == 200
    junk = b"#!/bin/sh\necho pwned\n".ljust(CHUNK, b"#")
    reader, writer = await raw_partial(client, sid, 1, junk, CHUNK // 2)
    await asyncio.sleep(0.2)
    final = await (await client.post(f"/upload/chunked/{sid}/finalize")).json()
    writer.write(junk[CHUNK // 2 :])
    await writer.drain()
    assert b"200" in await status_line(reader)  # read and dropped: the chunk was counted
    writer.close()
    assert sha256((config.data_dir / final["location"]).read_bytes()) == sha256(SPEECH)


async def test_one_writer_per_chunk(client, monkeypatch):
    monkeypatch.setattr(ranges, "CHUNK_LOCK_WAIT_SECONDS", 0.3)
    parts = chunks_of(SPEECH, CHUNK)
    sid = (await create_session(client, "speech.wav", SPEECH, CHUNK))["session_id"]
    reader, writer = await raw_partial(client, sid, 0, parts[0], 1000)
    await asyncio.sleep(0.2)
    resp = await put_chunk(client, sid, 0, parts[0])
    assert resp.status == 409 and (await resp.json())["error"]["code"] == "chunk_busy"
    writer.write(parts[0][1000:])
    await writer.drain()
    assert b"200" in await status_line(reader)
    writer.close()
    resp = await put_chunk(client, sid, 0, parts[0])
    assert resp.status == 200 and (await resp.json())["already_received"] is True


async def test_resend_with_other_content_is_a_conflict(client):
    parts = chunks_of(SPEECH, CHUNK)
    sid = (await create_session(client, "speech.wav", SPEECH, CHUNK))["session_id"]
    assert (await put_chunk(client, sid, 0, parts[0],
                            **{"X-Chunk-Checksum": "sha256=" + sha256(parts[0])})).status == 200
    other = bytes(CHUNK)
    resp = await put_chunk(client, sid, 0, other, **{"X-Chunk-Checksum": "sha256=" + sha256(other)})
    assert resp.status == 409
    err = (await resp.json())["error"]
    assert err["code"] == "chunk_conflict" and err["stored_sha256"] == sha256(parts[0])


async def test_a_silent_body_is_cut_off(aiohttp_client, tmp_path):
    config = Config(min_chunk_size=1024, data_dir=tmp_path / "data", chunk_size=4096, body_timeout=0.5)
    client = await aiohttp_client(ChunkdTestServer(make_app(config)))
    parts = chunks_of(SPEECH, CHUNK)
    sid = (await create_session(client, "speech.wav", SPEECH, CHUNK))["session_id"]
    reader, writer = await raw_partial(client, sid, 2, parts[2], 100)
    line = await status_line(reader)
    assert b"408" in line
    body = await asyncio.wait_for(reader.readuntil(b"}}"), 5)
    assert b'"code":"body_timeout"' in body
    writer.close()
    status = await (await client.get(f"/upload/chunked/{sid}/status")).json()
    assert status["missing_chunks"] == [0, 1, 2, 3]
    assert client.server.app  # the server still serves
    assert (await put_chunk(client, sid, 2, parts[2])).status == 200


async def test_a_finalize_cut_by_a_crash_is_finished_by_the_runner(client, config, monkeypatch):
    import chunkd.core.finalize as fin
    from chunkd.core.recovery import recover_once
    from chunkd.keys import RUNNER, STORE
    from chunkd.model.session import EndKind

    monkeypatch.setattr(fin, "WAIT_FOR_WINNER_SECONDS", 0.2)
    store, runner = client.server.app[STORE], client.server.app[RUNNER]
    parts = chunks_of(SPEECH, CHUNK)
    sid = (await create_session(client, "speech.wav", SPEECH, CHUNK))["session_id"]
    for i, part in enumerate(parts):
        await put_chunk(client, sid, i, part)
    claim = await store.claim_end(sid, EndKind.FINALIZE)  # a process that claimed, then died
    resp = await client.post(f"/upload/chunked/{sid}/finalize")
    assert resp.status == 202
    doc = await resp.json()
    assert doc["status"] == "finalizing" and doc["task_id"] == claim.task_id
    monkeypatch.setattr(fin, "STALE_CLAIM_SECONDS", 0.0)
    await recover_once(store, runner)
    status = await (await client.get(f"/upload/chunked/{sid}/status")).json()
    assert status["status"] == "completed" and status["task_id"] == claim.task_id
    assert sha256((config.data_dir / status["task"]["location"]).read_bytes()) == sha256(SPEECH)


async def test_unreadable_bodies_and_nested_params_are_clear_errors(client):
    import gzip

    deep: dict = {}
    node = deep
    for _ in range(300):
        node["x"] = {}
        node = node["x"]
    body = {"filename": "a.wav", "total_size": 10, "total_chunks": 1, "task_params": deep}
    resp = await client.post("/upload/chunked/session", data=__import__("json").dumps(body),
                             headers={"Content-Type": "application/json"})
    assert resp.status == 422 and (await resp.json())["error"]["field"] == "task_params"
    sid = (await create_session(client, "speech.wav", SPEECH, CHUNK))["session_id"]
    try:
        resp = await client.post(f"/upload/chunked/{sid}/chunk", params={"index": "0"},
                                 data=b"not gzip at all" * 100,
                                 headers={"Content-Type": "application/octet-stream",
                                          "Content-Encoding": "gzip"})
        assert resp.status == 400
        assert (await resp.json())["error"]["code"] == "invalid_body"
    except aiohttp.ServerDisconnectedError:
        pass  # aiohttp may drop the connection once it cannot decode: never a 500 though
    status = await (await client.get(f"/upload/chunked/{sid}/status")).json()
    assert status["received_chunks"] == 0
    good = gzip.compress(chunks_of(SPEECH, CHUNK)[0])
    resp = await client.post(f"/upload/chunked/{sid}/chunk", params={"index": "0"}, data=good,
                             headers={"Content-Type": "application/octet-stream",
                                      "Content-Encoding": "gzip"})
    assert resp.status == 200  # a compressed body counts by its decoded length
