"""Large bodies read straight from the socket (issue 13): the same answers as through aiohttp's
stream, the connection kept (keep-alive, pipelining) when the body was whole, closed when not,
and every guarantee of the body path kept: idle deadline, cut-off and half-closed bodies,
checksums on the bytes written, a tus PATCH's kept prefix and checkpoints, shutdown.

Each test runs with ``socket_body`` on (the default) and off, at sizes past
``socket_body.MIN_DIRECT_BYTES`` (the conftest lowers it for the rest of the suite; here it is
the production value).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import signal
import socket
import time
import urllib.request

import pytest

from chunkd.api import socket_body
from chunkd.app import make_app
from chunkd.config import Config, MiB
from chunkd.store.fs.ranges import range_locked
from conftest import MEDIA, ChunkdTestServer, create_session, sha256, status_line

BIG = 3 * MiB
_HEAD = (MEDIA / "speech.wav").read_bytes()
DATA = _HEAD + os.urandom(2 * BIG - len(_HEAD))  # a real recording's start: libmagic takes it
TAKEN: list[int] = []  # bodies taken off aiohttp (their bytes on the wire then)


@pytest.fixture(autouse=True)
def _production_threshold(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(socket_body, "MIN_DIRECT_BYTES", 1 * MiB)
    real = socket_body.take

    def take(request, content_length):
        taken = real(request, content_length)
        if taken is not None and taken.remaining:
            TAKEN.append(taken.remaining)
        return taken

    monkeypatch.setattr(socket_body, "take", take)
    TAKEN.clear()


async def start(aiohttp_client, tmp_path, socket_body: bool, body_timeout: float):
    config = Config(data_dir=tmp_path / "data", chunk_size=BIG, body_timeout=body_timeout,
                    min_body_rate=0, socket_body=socket_body)
    client = await aiohttp_client(ChunkdTestServer(make_app(config)))
    client.socket_body = socket_body
    client.config = config
    return client


@pytest.fixture(params=[True, False], ids=["socket", "stream"])
async def app_client(request, aiohttp_client, tmp_path):
    return await start(aiohttp_client, tmp_path, request.param, body_timeout=1.5)


@pytest.fixture(params=[True, False], ids=["socket", "stream"])
async def patient_client(request, aiohttp_client, tmp_path):
    """A long idle deadline: a body that stops only ends when something stops it."""
    return await start(aiohttp_client, tmp_path, request.param, body_timeout=30.0)


def chunk_request(sid: str, index: int, length: int, **headers: str) -> bytes:
    extra = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    return (f"POST /upload/chunked/{sid}/chunk?index={index} HTTP/1.1\r\nHost: x\r\n"
            f"Content-Type: application/octet-stream\r\nContent-Length: {length}\r\n"
            f"{extra}\r\n").encode()


async def read_response(reader) -> tuple[int, dict[str, str], bytes]:
    line = await status_line(reader)
    status = int(line.split()[1])
    headers = {}
    while (h := (await asyncio.wait_for(reader.readline(), 10)).strip()):
        k, v = h.decode().split(":", 1)
        headers[k.strip().lower()] = v.strip()
    body = await asyncio.wait_for(reader.readexactly(int(headers.get("content-length", 0))), 10)
    return status, headers, body


async def status_of(client, sid: str) -> dict:
    resp = await client.get(f"/upload/chunked/{sid}/status")
    return await resp.json()


async def test_pipelined_requests_behind_large_bodies_are_answered_on_one_connection(app_client):
    """Two whole chunk bodies and a status request in one write, then a fourth request: four
    answers in order on the same connection, and the stored bytes are the sent ones."""
    sid = (await create_session(app_client, "a.wav", DATA, BIG))["session_id"]
    reader, writer = await asyncio.open_connection(app_client.host, app_client.port)
    writer.write(chunk_request(sid, 0, BIG) + DATA[:BIG] + chunk_request(sid, 1, BIG)
                 + DATA[BIG:] + f"GET /upload/chunked/{sid}/status HTTP/1.1\r\nHost: x\r\n\r\n"
                 .encode())
    await writer.drain()
    answers = [await read_response(reader) for _ in range(3)]
    assert [a[0] for a in answers] == [200, 200, 200]
    assert b'"received_chunks":2' in answers[2][2]
    writer.write(f"GET /upload/chunked/{sid}/status HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    status, _, body = await read_response(reader)  # keep-alive: the connection still serves
    assert status == 200 and b'"received_chunks":2' in body
    writer.close()
    data = (app_client.config.data_dir / "sessions" / sid / "data").read_bytes()
    assert sha256(data) == sha256(DATA)
    # the bodies went the socket way (most of each body), or aiohttp's stream when it is off
    assert len(TAKEN) == (2 if app_client.socket_body else 0)
    assert all(n > BIG // 2 for n in TAKEN)


async def test_a_large_chunk_with_its_checksum_is_counted_and_a_wrong_one_is_not(app_client):
    sid = (await create_session(app_client, "a.wav", DATA, BIG))["session_id"]
    url = f"/upload/chunked/{sid}/chunk"
    headers = {"Content-Type": "application/octet-stream"}
    wrong = hashlib.sha256(b"other").hexdigest()
    resp = await app_client.post(url, params={"index": "0"}, data=DATA[:BIG],
                                 headers={**headers, "X-Chunk-Checksum": f"sha256={wrong}"})
    assert resp.status == 400 and (await resp.json())["error"]["code"] == "checksum_mismatch"
    assert (await status_of(app_client, sid))["received_chunks"] == 0
    resp = await app_client.post(url, params={"index": "0"}, data=DATA[:BIG], headers={
        **headers, "X-Chunk-Checksum": f"sha256={sha256(DATA[:BIG])}"})
    assert resp.status == 200, await resp.text()
    assert (await status_of(app_client, sid))["received_chunks"] == 1


def chunk_locked(client, sid: str, index: int) -> bool:
    """Does a request (in this process) still hold the chunk's lock?"""
    fd = os.open(client.config.data_dir / "sessions" / sid / "data", os.O_RDWR)
    try:
        return range_locked(fd, index * BIG, BIG)
    finally:
        os.close(fd)


async def test_a_body_cut_off_mid_way_counts_nothing_and_the_chunk_can_be_sent_again(app_client):
    """The client goes away mid-body (several times: the handler's end races the connection's
    loss, which the test server answers by cancelling the handler): nothing is counted, the
    chunk's lock is let go at once, and the chunk can be sent again."""
    for _ in range(5):
        sid = (await create_session(app_client, "a.wav", DATA, BIG))["session_id"]
        _, writer = await asyncio.open_connection(app_client.host, app_client.port)
        writer.write(chunk_request(sid, 0, BIG) + DATA[: BIG // 2])
        await writer.drain()
        await asyncio.sleep(0.3)
        writer.transport.abort()  # the client is gone
        deadline = time.monotonic() + 3
        while chunk_locked(app_client, sid, 0):
            assert time.monotonic() < deadline, "the cut request kept the chunk's lock"
            await asyncio.sleep(0.05)
        assert (await status_of(app_client, sid))["received_chunks"] == 0
    resp = await app_client.post(f"/upload/chunked/{sid}/chunk", params={"index": "0"},
                                 data=DATA[:BIG],
                                 headers={"Content-Type": "application/octet-stream"})
    assert resp.status == 200, await resp.text()


async def test_a_half_closed_short_body_counts_nothing_and_the_connection_closes(app_client):
    """aiohttp treats a half-close as the client leaving; either way nothing is counted and
    the connection does not hang: it ends with no answer or a 400 ``invalid_body``."""
    sid = (await create_session(app_client, "a.wav", DATA, BIG))["session_id"]
    reader, writer = await asyncio.open_connection(app_client.host, app_client.port)
    writer.write(chunk_request(sid, 0, BIG) + DATA[: BIG // 2])
    await writer.drain()
    writer.write_eof()  # the client says it has sent everything
    rest = await asyncio.wait_for(reader.read(), 10)
    assert rest == b"" or (rest.startswith(b"HTTP/1.1 400") and b"invalid_body" in rest)
    assert (await status_of(app_client, sid))["received_chunks"] == 0


async def test_a_silent_body_is_408_after_the_idle_deadline_and_the_connection_closes(
        app_client):
    sid = (await create_session(app_client, "a.wav", DATA, BIG))["session_id"]
    reader, writer = await asyncio.open_connection(app_client.host, app_client.port)
    writer.write(chunk_request(sid, 0, BIG) + DATA[: BIG // 2])
    await writer.drain()
    started = time.monotonic()
    status, _, body = await read_response(reader)
    assert status == 408 and b"body_timeout" in body
    assert 1.0 < time.monotonic() - started < 5.0  # body_timeout is 1.5 s
    # closed then (through aiohttp's stream: after its lingering read, up to 10 s)
    assert await asyncio.wait_for(reader.read(), 15) == b""
    writer.close()
    assert (await status_of(app_client, sid))["received_chunks"] == 0


async def test_expect_100_continue_then_a_large_body(app_client):
    sid = (await create_session(app_client, "a.wav", DATA, BIG))["session_id"]
    reader, writer = await asyncio.open_connection(app_client.host, app_client.port)
    writer.write(chunk_request(sid, 0, BIG, Expect="100-continue"))
    await writer.drain()
    assert (await status_line(reader)).startswith(b"HTTP/1.1 100")
    assert (await reader.readline()).strip() == b""
    writer.write(DATA[:BIG])
    status, _, _ = await read_response(reader)
    assert status == 200
    writer.close()


# -- tus ---------------------------------------------------------------------------------------

TUS = {"Tus-Resumable": "1.0.0"}


def meta(**pairs: str) -> str:
    return ",".join(f"{k} {base64.b64encode(v.encode()).decode()}" for k, v in pairs.items())


async def tus_create(client, length: int) -> str:
    resp = await client.post("/files/", headers={**TUS, "Upload-Length": str(length),
                                                  "Upload-Metadata": meta(filename="a.wav")})
    assert resp.status == 201, await resp.text()
    return resp.headers["Location"]


def patch_request(location: str, offset: int, length: int) -> bytes:
    return (f"PATCH {location} HTTP/1.1\r\nHost: x\r\nTus-Resumable: 1.0.0\r\n"
            f"Content-Type: application/offset+octet-stream\r\nUpload-Offset: {offset}\r\n"
            f"Content-Length: {length}\r\n\r\n").encode()


def durable_offset(client, location: str) -> int:
    """The upload's offset as the store keeps it on disk (read without a HEAD, which would
    stop the PATCH)."""
    sid = location.rsplit("/", 1)[1]
    names = os.listdir(client.config.data_dir / "sessions" / sid / "offset")
    return int(names[0]) if names else 0


async def test_a_tus_patch_is_checkpointed_while_it_streams_and_a_cut_keeps_every_byte_sent(
        patient_client):
    location = await tus_create(patient_client, 2 * BIG)
    reader, writer = await asyncio.open_connection(patient_client.host, patient_client.port)
    writer.write(patch_request(location, 0, 2 * BIG) + DATA[:BIG])
    await writer.drain()
    await asyncio.sleep(1.2)
    writer.write(DATA[BIG : BIG + MiB])  # bytes after a second: a checkpoint is due
    await writer.drain()
    deadline = time.monotonic() + 5
    while durable_offset(patient_client, location) < BIG:  # counted while the body is open
        assert time.monotonic() < deadline, "no checkpoint while the body streamed"
        await asyncio.sleep(0.05)
    writer.transport.abort()
    deadline = time.monotonic() + 5
    while durable_offset(patient_client, location) != BIG + MiB and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    resp = await patient_client.head(location, headers=TUS)
    assert resp.headers["Upload-Offset"] == str(BIG + MiB)  # every byte that arrived is kept
    resp = await patient_client.patch(location, data=DATA[BIG + MiB : 2 * BIG], headers={
        **TUS, "Content-Type": "application/offset+octet-stream",
        "Upload-Offset": str(BIG + MiB)})
    assert resp.status == 204 and resp.headers["Upload-Offset"] == str(2 * BIG)
    deadline = time.monotonic() + 10
    while not (done := list((patient_client.config.data_dir / "completed").glob("*/upload.*"))):
        assert time.monotonic() < deadline, "not handed off"
        await asyncio.sleep(0.05)
    assert sha256(done[0].read_bytes()) == sha256(DATA[: 2 * BIG])
    assert len(TAKEN) == (2 if patient_client.socket_body else 0)


async def test_a_stalled_tus_patch_is_503_and_keeps_every_byte_that_came(app_client):
    """The idle deadline ends the PATCH while the worker holds a part-filled buffer: those
    bytes are written before the error, so the offset is all that arrived."""
    location = await tus_create(app_client, 2 * BIG)
    reader, writer = await asyncio.open_connection(app_client.host, app_client.port)
    sent = BIG + 123_457  # not a whole number of the worker's buffers
    writer.write(patch_request(location, 0, 2 * BIG) + DATA[:sent])
    await writer.drain()
    status, _, body = await read_response(reader)  # after body_timeout (1.5 s)
    assert status == 503 and b"body_stalled" in body
    writer.close()
    resp = await app_client.head(location, headers=TUS)
    assert resp.headers["Upload-Offset"] == str(sent)


def start_patch(srv, sent: int) -> tuple[str, socket.socket]:
    """On a real ``chunkd serve``: a tus upload of 2 x BIG and a PATCH of BIG bytes whose
    first ``sent`` bytes are sent (the socket stays open)."""
    host, port = srv.url.split("//")[1].rstrip("/").split(":")
    req = urllib.request.Request(srv.url.rstrip("/") + "/files/", method="POST", data=b"",
                                 headers={**TUS, "Upload-Length": str(2 * BIG),
                                          "Upload-Metadata": meta(filename="a.wav")})
    location = urllib.request.urlopen(req, timeout=10).headers["Location"]
    sock = socket.create_connection((host, int(port)))
    sock.sendall(patch_request(location, 0, BIG) + DATA[:sent])
    return location, sock


def head_offset(srv, location: str) -> int:
    head = urllib.request.Request(srv.url.rstrip("/") + location, method="HEAD", headers=TUS)
    return int(urllib.request.urlopen(head, timeout=10).headers["Upload-Offset"])


@pytest.mark.parametrize("mode", ["on", "off"])
def test_a_half_closed_tus_patch_is_no_success_but_keeps_its_bytes(server_factory, mode):
    """A body shorter than its Content-Length is never answered 204 (the client would take
    the PATCH as done); what came is kept (from the socket: every byte; through aiohttp: what
    it had handed on when the client left). A real ``chunkd serve``: the test server cancels
    a handler whose client leaves, which would hide a wrong answer."""
    srv = server_factory("--socket-body", mode)
    location, sock = start_patch(srv, 2 * MiB)
    sock.shutdown(socket.SHUT_WR)
    sock.settimeout(10)
    rest = b""
    while chunk := sock.recv(65536):
        rest += chunk
    sock.close()
    assert rest == b"" or (rest.startswith(b"HTTP/1.1 400") and b"invalid_body" in rest), rest
    offset = head_offset(srv, location)
    assert offset == 2 * MiB if mode == "on" else 0 <= offset <= 2 * MiB


async def test_a_newer_head_stops_a_stale_large_patch_at_once(patient_client):
    location = await tus_create(patient_client, 2 * BIG)
    _, writer = await asyncio.open_connection(patient_client.host, patient_client.port)
    writer.write(patch_request(location, 0, 2 * BIG) + DATA[: BIG // 2])
    await writer.drain()
    await asyncio.sleep(0.3)
    started = time.monotonic()
    resp = await patient_client.head(location, headers=TUS)
    assert resp.status == 200 and resp.headers["Upload-Offset"] == str(BIG // 2)
    assert time.monotonic() - started < 1.5
    writer.close()


def test_sigterm_during_a_large_body_exits_without_waiting_for_it(server_factory):
    """Graceful shutdown with a body half sent: the handler is cancelled after
    --shutdown-timeout; the worker thread reading its socket stops too (no hang)."""
    srv = server_factory("--shutdown-timeout", "1s", "--body-timeout", "60s")
    host, port = srv.url.split("//")[1].rstrip("/").split(":")
    req = urllib.request.Request(srv.url.rstrip("/") + "/upload/chunked/session", method="POST",
                                 data=json.dumps({"filename": "a.wav", "total_size": 2 * BIG,
                                                  "chunk_size": BIG, "total_chunks": 2}).encode(),
                                 headers={"Content-Type": "application/json"})
    sid = json.loads(urllib.request.urlopen(req, timeout=10).read())["session_id"]
    sock = socket.create_connection((host, int(port)))
    sock.sendall(chunk_request(sid, 0, BIG) + DATA[: BIG // 2])
    time.sleep(0.5)
    started = time.monotonic()
    assert srv.proc is not None
    os.kill(srv.proc.pid, signal.SIGTERM)
    out, _ = srv.proc.communicate(timeout=20)
    assert time.monotonic() - started < 8
    assert srv.proc.returncode == 0, out
    assert "Traceback" not in out
    sock.close()


@pytest.mark.parametrize("mode", ["on", "off"])
def test_sigterm_during_a_large_patch_keeps_every_byte_that_came(server_factory, tmp_path, mode):
    """Shutdown cancels a PATCH still streaming after --shutdown-timeout, once, and waits for
    it to clean up: what it had written is kept (counted on the way out), so after a restart
    HEAD offers all of it (aiohttp's own shutdown cancelled it again and did not wait)."""
    srv = server_factory("--shutdown-timeout", "1s", "--body-timeout", "60s", "--socket-body", mode)
    location, sock = start_patch(srv, 2 * MiB)
    time.sleep(0.3)  # less than a checkpoint's second
    srv.terminate(timeout=20)
    sock.close()
    again = server_factory(data_dir=tmp_path / "data")
    assert head_offset(again, location) == 2 * MiB
