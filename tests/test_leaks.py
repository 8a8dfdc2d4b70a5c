"""What an attacker can learn or make the server log: no server paths, versions, free-space
figures or class names in answers; a bad request is one short log line."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil

import aiohttp
import orjson
import pytest

from chunkd.app import make_app
from chunkd.config import Config
from conftest import (
    MEDIA,
    ChunkdTestServer,
    chunks_of,
    create_session,
    put_chunk,
    raw_partial,
    session_body,
    status_line,
    upload_all,
)

SPEECH = (MEDIA / "speech.wav").read_bytes()
CHUNK = 16 * 1024


async def raw(client, request: bytes) -> tuple[bytes, bytes]:
    """Send raw bytes; the answer's head and its Content-Length body."""
    reader, writer = await asyncio.open_connection(client.host, client.port)
    writer.write(request)
    await writer.drain()
    head = (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10))[:-4]
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length:"))
    body = await asyncio.wait_for(reader.readexactly(length), 10)
    writer.close()
    return head, body


async def test_no_versions_in_the_server_header(client):
    resp = await client.get("/healthz")
    assert resp.headers["Server"] == "chunkd"
    head, _ = await raw(client, b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    assert b"Server: chunkd" in head and b"aiohttp" not in head and b"Python" not in head


async def test_an_unparseable_request_is_one_short_line_and_json(client, caplog):
    caplog.set_level(logging.DEBUG)
    line = b"GET /" + b"x" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n"
    head, body = await raw(client, line)
    assert head.split(b" ")[1].startswith(b"4")
    err = orjson.loads(body)["error"]
    assert err["code"] == "bad_request"
    assert "Error" not in err["message"] and "Exception" not in err["message"]  # no class names
    records = [r for r in caplog.records if "request" in r.getMessage()]
    assert records and all(r.exc_info is None for r in records)  # no traceback
    assert all(len(r.getMessage()) < 200 for r in records)  # the input is not echoed


async def test_an_undecodable_body_is_one_line_and_unknown_encodings_are_refused(client, caplog):
    caplog.set_level(logging.DEBUG)
    sid = (await create_session(client, "speech.wav", SPEECH, CHUNK))["session_id"]
    body = b"\x1f\x8b\x08\x00garbage" * 50
    with contextlib.suppress(aiohttp.ServerDisconnectedError):
        resp = await put_chunk(client, sid, 0, body, **{"Content-Encoding": "gzip"})
        assert resp.status == 400 and (await resp.json())["error"]["code"] == "invalid_body"
    await asyncio.sleep(0.3)  # aiohttp reads on after the answer, and fails again
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"
    # encodings nobody decodes would be stored as sent: refused before the body is read
    for encoding in ("x-unknown", "gzip, gzip", "br;q=1"):
        resp = await put_chunk(client, sid, 0, chunks_of(SPEECH, CHUNK)[0],
                               **{"Content-Encoding": encoding})
        assert resp.status == 415, encoding
        err = (await resp.json())["error"]
        assert err["code"] == "unsupported_encoding" and "gzip" in err["accepted"]
    status = await (await client.get(f"/upload/chunked/{sid}/status")).json()
    assert status["received_chunks"] == 0


async def test_a_bad_expect_header_is_a_json_417(client):
    sid = (await create_session(client, "speech.wav", SPEECH, CHUNK))["session_id"]
    head, body = await raw(client, (
        f"POST /upload/chunked/{sid}/chunk?index=0 HTTP/1.1\r\nHost: x\r\n"
        f"Content-Type: application/octet-stream\r\nContent-Length: {CHUNK}\r\n"
        "Expect: <script>alert(1)</script>\r\nConnection: close\r\n\r\n").encode())
    assert head.startswith(b"HTTP/1.1 417")
    assert b"application/json" in head and b"<script>" not in body
    assert orjson.loads(body)["error"]["code"] == "expectation_failed"


async def test_no_server_paths_in_replies_or_messages(client, config):
    sid = await upload_all(client, "speech.wav", SPEECH, CHUNK)
    ws = await client.ws_connect(f"/ws/tasks/{sid}")
    final = (await (await client.post(f"/upload/chunked/{sid}/finalize")).json())
    msgs = []
    async for msg in ws:
        msgs.append(orjson.loads(msg.data))
    status = await (await client.get(f"/upload/chunked/{sid}/status")).json()
    root = str(config.data_dir.resolve())
    for doc in (final, status, *msgs):
        assert root not in orjson.dumps(doc).decode(), doc
    assert final["location"] == f"completed/{final['task_id']}/upload.wav"
    assert msgs[-1]["location"] == final["location"]


async def test_a_507_does_not_tell_the_free_space(aiohttp_client, tmp_path):
    cfg = Config(min_chunk_size=1024, data_dir=tmp_path / "data", max_file_size=1 << 50, sweep_interval=3600)
    client = await aiohttp_client(ChunkdTestServer(make_app(cfg)))
    free = shutil.disk_usage(tmp_path).free
    resp = await client.post("/upload/chunked/session", json=session_body(
        "big.wav", free + (1 << 30), 95 * 1024 * 1024))
    if resp.status == 422:
        pytest.skip("this disk is too big to overflow within the most chunks per session")
    assert resp.status == 507
    text = await resp.text()
    assert "free" not in orjson.loads(text)["error"] and str(free) not in text


async def test_a_chunk_that_outlives_its_session_is_not_a_200(aiohttp_client, tmp_path):
    cfg = Config(min_chunk_size=1024, data_dir=tmp_path / "data", chunk_size=CHUNK, session_ttl=1.0,
                 sweep_interval=3600)
    client = await aiohttp_client(ChunkdTestServer(make_app(cfg)))
    sid = (await create_session(client, "speech.wav", SPEECH, CHUNK))["session_id"]
    part = chunks_of(SPEECH, CHUNK)[0]
    reader, writer = await raw_partial(client, sid, 0, part, CHUNK // 2)
    await asyncio.sleep(1.3)  # the session expires while the body is on its way
    writer.write(part[CHUNK // 2:])
    await writer.drain()
    assert b"410" in await status_line(reader)
    writer.close()
    resp = await client.get(f"/upload/chunked/{sid}/status")
    assert resp.status == 410
    assert (await put_chunk(client, sid, 1, part)).status == 410


async def test_a_failed_handoff_tells_no_server_paths(aiohttp_client, tmp_path):
    import sys

    script = tmp_path / "tools" / "transcribe.py"
    script.parent.mkdir()
    script.write_text("import sys\nprint('cannot open', sys.argv[1], file=sys.stderr)\n"
                      "sys.exit(3)\n")
    cfg = Config(min_chunk_size=1024, data_dir=tmp_path / "data", chunk_size=CHUNK,
                 sweep_interval=3600, handoff="command",
                 handoff_command=f"{sys.executable} {script}")
    client = await aiohttp_client(ChunkdTestServer(make_app(cfg)))
    sid = await upload_all(client, "speech.wav", SPEECH, CHUNK)
    assert (await client.post(f"/upload/chunked/{sid}/finalize")).status == 200
    for _ in range(100):
        status = await (await client.get(f"/upload/chunked/{sid}/status")).json()
        if status["status"] == "failed":
            break
        await asyncio.sleep(0.05)
    assert status["status"] == "failed", status
    text = orjson.dumps(status).decode()
    assert "cannot open" in status["task"]["error"]["technical_detail"]  # the detail is kept...
    assert str(tmp_path) not in text and sys.executable not in text  # ...without server paths
