"""Limits added for the open internet: one client's share of the body slots, the minimum body
rate, the request rate per subject (not only per address), and the chunk bookkeeping that the
smallest chunk and the chunk count bound."""

from __future__ import annotations

import asyncio
import time

from chunkd.app import make_app
from chunkd.config import Config, ConfigError, load_config
from conftest import MEDIA, ChunkdTestServer, chunks_of, create_session, session_body, status_line
from test_auth import SECRET, token

WAV = (MEDIA / "speech.wav").read_bytes()
CHUNK = 16 * 1024
PROXY = ("127.0.0.0/8",)  # the test client is a trusted proxy: X-Forwarded-For names the client


async def make_client(aiohttp_client, tmp_path, **cfg):
    config = Config(min_chunk_size=1024, data_dir=tmp_path / "data", chunk_size=CHUNK,
                    sweep_interval=3600, **cfg)
    return await aiohttp_client(ChunkdTestServer(make_app(config)))


async def partial(client, sid: str, index: int, body: bytes, sent: int, address: str):
    """A chunk request from ``address`` whose body stops after ``sent`` bytes."""
    reader, writer = await asyncio.open_connection(client.host, client.port)
    writer.write(
        f"POST /upload/chunked/{sid}/chunk?index={index} HTTP/1.1\r\nHost: x\r\n"
        f"X-Forwarded-For: {address}\r\nContent-Type: application/octet-stream\r\n"
        f"Content-Length: {len(body)}\r\n\r\n".encode() + body[:sent])
    await writer.drain()
    return reader, writer


async def trickle(reader, writer, body: bytes, sent: int, within: float) -> tuple[bytes, float]:
    """Send the rest of ``body`` 10 bytes every 0.2 s (never silent for the idle deadline, far
    below any rate) until the server answers: its status line and the seconds it took."""
    started = time.monotonic()
    answer = b""
    while time.monotonic() - started < within and sent < len(body):
        await asyncio.sleep(0.2)
        writer.write(body[sent:sent + 10])
        sent += 10
        try:
            await writer.drain()
            answer = await asyncio.wait_for(reader.readline(), 0.01)
        except TimeoutError:
            continue
        except OSError:
            break
        if answer:
            break
    return answer, time.monotonic() - started


async def test_one_client_cannot_take_every_body_slot(aiohttp_client, tmp_path):
    client = await make_client(aiohttp_client, tmp_path, max_concurrent_chunks=4,
                               max_chunks_per_client=2, trusted_proxies=PROXY)
    parts = chunks_of(WAV, CHUNK)
    sid = (await create_session(client, "a.wav", WAV, CHUNK))["session_id"]
    held = [await partial(client, sid, i, parts[i], 100, "198.51.100.1") for i in (0, 1)]
    await asyncio.sleep(0.2)
    third = await client.post(f"/upload/chunked/{sid}/chunk?index=2", data=parts[2],
                              headers={"X-Forwarded-For": "198.51.100.1",
                                       "Content-Type": "application/octet-stream"})
    assert third.status == 503
    assert (await third.json())["error"]["code"] == "server_busy"
    # another client still gets a slot: the server as a whole is not full
    other = await client.post(f"/upload/chunked/{sid}/chunk?index=2", data=parts[2],
                              headers={"X-Forwarded-For": "198.51.100.2",
                                       "Content-Type": "application/octet-stream"})
    assert other.status == 200, await other.text()
    # and the first client's slots come back when its bodies end
    reader, writer = held[0]
    writer.write(parts[0][100:])
    await writer.drain()
    assert b" 200 " in await status_line(reader)
    again = await client.post(f"/upload/chunked/{sid}/chunk?index=3", data=parts[3],
                              headers={"X-Forwarded-For": "198.51.100.1",
                                       "Content-Type": "application/octet-stream"})
    assert again.status == 200
    for _, w in held:
        w.close()


async def test_a_trickling_body_is_cut_off_and_not_counted(aiohttp_client, tmp_path):
    client = await make_client(aiohttp_client, tmp_path, body_timeout=0.6,
                               min_body_rate=64 * 1024)
    parts = chunks_of(WAV, CHUNK)
    sid = (await create_session(client, "a.wav", WAV, CHUNK))["session_id"]
    reader, writer = await partial(client, sid, 0, parts[0], 10, "x")
    answer, waited = await trickle(reader, writer, parts[0], 10, within=5)
    assert b" 408 " in answer, answer
    assert waited < 3
    head = b""
    while not head.endswith(b"\r\n\r\n"):
        head += await asyncio.wait_for(reader.readline(), 5)
    assert b"connection: close" in head.lower()  # the rest of the body is not waited for
    length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
    assert b'"body_too_slow"' in await asyncio.wait_for(reader.readexactly(length), 5)
    writer.close()
    status = await (await client.get(f"/upload/chunked/{sid}/status")).json()
    assert status["received_chunks"] == 0  # nothing of it was counted
    # a chunk at a normal pace is fine
    ok = await client.post(f"/upload/chunked/{sid}/chunk?index=0", data=parts[0],
                           headers={"Content-Type": "application/octet-stream"})
    assert ok.status == 200


async def test_the_request_rate_is_limited_per_subject_across_addresses(aiohttp_client, tmp_path):
    client = await make_client(aiohttp_client, tmp_path, rate_limit=0.5, rate_burst=3,
                               trusted_proxies=PROXY, jwt_secret=SECRET)
    missing = "/upload/chunked/00000000-0000-4000-8000-000000000000/status"
    ann = {"Authorization": f"Bearer {token('ann', aud=None)}"}
    statuses = [(await client.get(missing, headers={**ann, "X-Forwarded-For": f"203.0.113.{i}"}
                                  )).status for i in range(1, 6)]
    assert statuses[:3] == [404] * 3 and statuses[3:] == [429, 429]  # five addresses, one subject
    bob = {"Authorization": f"Bearer {token('bob', aud=None)}", "X-Forwarded-For": "203.0.113.50"}
    assert (await client.get(missing, headers=bob)).status == 404  # another subject is not


async def test_small_chunks_are_refused_unless_the_file_is_small(aiohttp_client, tmp_path):
    config = Config(data_dir=tmp_path / "data", sweep_interval=3600)  # the default: 1 MiB
    client = await aiohttp_client(ChunkdTestServer(make_app(config)))
    small = await client.post("/upload/chunked/session",
                              json=session_body("a.wav", 20 * 1024 * 1024, 1024))
    assert small.status == 422
    err = (await small.json())["error"]
    assert err["field"] == "chunk_size" and err["min_chunk_size"] == 1024 * 1024
    # a file under the minimum goes as one chunk of its own size
    tiny = await client.post("/upload/chunked/session",
                             json=session_body("a.wav", len(WAV), len(WAV)))
    assert tiny.status == 201
    doc = await tiny.json()
    assert doc["min_chunk_size"] == 1024 * 1024 and doc["total_chunks"] == 1
    # and the chunk count is capped
    many = await client.post("/upload/chunked/session",
                             json=session_body("a.wav", 20_000 * 1024 * 1024, 1024 * 1024))
    assert many.status == 422
    assert (await many.json())["error"]["code"] == "too_many_chunks"


def test_chunk_size_settings_are_checked(tmp_path):
    import pytest

    with pytest.raises(ConfigError, match="min chunk size"):
        load_config({"min_chunk_size": "100", "data_dir": str(tmp_path)}, env={})
    with pytest.raises(ConfigError, match="chunk size"):
        load_config({"min_chunk_size": "8MiB", "chunk_size": "4MiB", "data_dir": str(tmp_path)},
                    env={})
    c = load_config({"min_chunk_size": "64KiB", "max_chunks_per_client": "3",
                     "min_body_rate": "1KiB", "max_connections": "100",
                     "data_dir": str(tmp_path)}, env={})
    assert (c.min_chunk_size, c.max_chunks_per_client, c.min_body_rate, c.max_connections) == (
        64 * 1024, 3, 1024, 100)


async def test_a_websocket_peer_that_never_reads_is_cut_off(aiohttp_client, tmp_path,
                                                            monkeypatch):
    import base64
    import os
    import socket

    import chunkd.api.ws

    monkeypatch.setattr(chunkd.api.ws, "SEND_TIMEOUT", 1.0)
    client = await make_client(aiohttp_client, tmp_path, heartbeat_interval=1.0)
    data = WAV[:1024] * 600  # 600 chunks of 1 KiB: one progress message each
    sid = (await create_session(client, "a.wav", data, 1024))["session_id"]
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)  # a peer that takes nothing
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(sock, (client.host, client.port))
    key = base64.b64encode(os.urandom(16)).decode()
    await loop.sock_sendall(sock, (
        f"GET /ws/tasks/{sid} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n").encode())
    reader = await client.ws_connect(f"/ws/tasks/{sid}")  # a peer that reads (and pongs)
    followed: list[dict] = []

    async def read() -> None:
        async for msg in reader:
            followed.append(msg.json())

    reading = asyncio.create_task(read())
    await asyncio.sleep(0.3)
    started = time.monotonic()
    for i, part in enumerate(chunks_of(data, 1024)):
        resp = await client.post(f"/upload/chunked/{sid}/chunk?index={i}", data=part,
                                 headers={"Content-Type": "application/octet-stream"})
        assert resp.status == 200  # a stuck WebSocket never holds up the uploads
    uploads = time.monotonic() - started
    await asyncio.sleep(2.5)  # past the send timeout
    # Now read: what was buffered comes out, then the end (reset or EOF), not an open socket.
    ended = False
    total = 0
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            got = await asyncio.wait_for(loop.sock_recv(sock, 65536), 1)
        except TimeoutError:
            break  # the socket is still open and silent: not cut off
        except ConnectionResetError:
            ended = True
            break
        if not got:
            ended = True
            break
        total += len(got)
    print(f"read {total} bytes after the uploads ({uploads:.1f} s)")
    sock.close()
    assert ended, "the server kept a WebSocket whose peer never read"
    assert uploads < 30
    # the reading peer is still followed, heartbeats and all
    assert not reader.closed and not reading.done()
    assert followed[0]["type"] == "upload_progress"
    assert any(m["type"] == "heartbeat" for m in followed)
    await reader.close()
    await reading


async def test_a_body_that_sends_fast_then_trickles_is_cut_off_too(aiohttp_client, tmp_path):
    """The rate is per window, not an average since the start: 15 KiB at once and then a few
    bytes every 0.2 s averages 4 KiB/s for almost 4 s, but each window is far too slow."""
    client = await make_client(aiohttp_client, tmp_path, body_timeout=0.6,
                               min_body_rate=4 * 1024)
    parts = chunks_of(WAV, CHUNK)
    sid = (await create_session(client, "a.wav", WAV, CHUNK))["session_id"]
    sent = 15 * 1024
    reader, writer = await partial(client, sid, 0, parts[0], sent, "x")
    answer, waited = await trickle(reader, writer, parts[0], sent, within=6)
    writer.close()
    assert b" 408 " in answer, answer
    assert waited < 2.5, waited  # an average since the start would have allowed ~3.75 s
