"""tus 1.0.0 conformance, one row of the research checklist per test (status codes, headers,
409/412/415/423/460, defer-length, expiry, termination, concatenation), against a real chunkd
app on 127.0.0.1 and its real store. The real clients are in test_tus_clients.py and
test_tus_browser.py; the pitfalls each test covers are named in its docstring (research file
``tus-clients.md`` §2 rows)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import email.utils
import fcntl
import hashlib
import os
import re
import struct
import threading
import time
import uuid

import aiohttp
import pytest

from chunkd.app import make_app
from chunkd.config import Config, KiB, MiB
from chunkd.keys import DRAIN
from chunkd.store.fs.store import PartsBlob
from conftest import MEDIA, ChunkdTestServer, sha256

SPEECH = (MEDIA / "speech.wav").read_bytes()
TUS = {"Tus-Resumable": "1.0.0"}
STREAM = {"Content-Type": "application/offset+octet-stream"}
UUID_PATH = re.compile(r"/files/[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def md(**pairs: str) -> str:
    return ",".join(f"{k} {base64.b64encode(v.encode()).decode()}" for k, v in pairs.items())


async def collect(ws) -> list[dict]:
    return [msg.json() async for msg in ws]


def b64(digest: bytes) -> str:
    return base64.b64encode(digest).decode()


@pytest.fixture
def tus_config(tmp_path) -> Config:
    return Config(data_dir=tmp_path / "data", min_chunk_size=1024, chunk_size=4 * KiB,
                  max_chunk_size=256 * KiB, sweep_interval=3600, body_timeout=1.0,
                  min_body_rate=0)


@pytest.fixture
async def tus(aiohttp_client, tus_config):
    return await aiohttp_client(ChunkdTestServer(make_app(tus_config)))


async def create(tus, length: int | None = None, metadata: str | None = None, **headers: str
                 ) -> str:
    h = {**TUS, **headers}
    if length is not None:
        h["Upload-Length"] = str(length)
    if metadata is not None:
        h["Upload-Metadata"] = metadata
    resp = await tus.post("/files/", headers=h)
    assert resp.status == 201, await resp.text()
    return resp.headers["Location"]


async def patch(tus, url: str, offset: int, body: bytes, **headers: str):
    return await tus.patch(url, data=body,
                           headers={**TUS, **STREAM, "Upload-Offset": str(offset), **headers})


async def head(tus, url: str, **headers: str):
    return await tus.head(url, headers={**TUS, **headers})


async def handed_off(data_dir, task_id: str | None = None, timeout: float = 10.0) -> bytes:
    """The file the folder hand-off put into completed/ (the task's, or the only one)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        folders = sorted((data_dir / "completed").glob(task_id or "*"))
        files = [p for f in folders for p in f.glob("upload.*")]
        if files:
            return files[0].read_bytes()
        await asyncio.sleep(0.05)
    raise AssertionError("nothing was handed off")


# -- discovery and version --------------------------------------------------------------------

async def test_options_lists_version_extensions_max_size_and_checksums(tus, tus_config):
    resp = await tus.options("/files/")
    assert resp.status == 204
    assert resp.headers["Tus-Version"] == "1.0.0"
    assert set(resp.headers["Tus-Extension"].split(",")) >= {
        "creation", "creation-with-upload", "creation-defer-length", "termination",
        "expiration", "checksum", "concatenation"}
    assert resp.headers["Tus-Max-Size"] == str(tus_config.max_file_size)
    assert "sha1" in resp.headers["Tus-Checksum-Algorithm"].split(",")  # the spec's must


@pytest.mark.parametrize("method", ["POST", "HEAD", "PATCH", "DELETE"])
@pytest.mark.parametrize("version", [None, "0.2.2"])
async def test_a_request_without_tus_1_0_0_is_412_with_tus_version(tus, method, version):
    url = await create(tus, 10)
    headers = {"Upload-Length": "10", **STREAM, "Upload-Offset": "0"}
    if version:
        headers["Tus-Resumable"] = version
    resp = await tus.request(method, "/files/" if method == "POST" else url, headers=headers)
    assert resp.status == 412
    assert resp.headers["Tus-Version"] == "1.0.0"
    assert (await head(tus, url)).headers["Upload-Offset"] == "0"  # nothing happened


# -- creation -----------------------------------------------------------------------------------

async def test_creation_answers_201_a_path_absolute_location_without_extension_and_expiry(tus):
    """§2 row 1 (Location scheme behind proxies), row 3 (no media extension), row 8 (HTTP date)."""
    resp = await tus.post("/files/", headers={**TUS, "Upload-Length": "100",
                                               "Upload-Metadata": md(filename="talk.mp3")})
    assert resp.status == 201
    assert UUID_PATH.fullmatch(resp.headers["Location"])  # no scheme/host, no ".mp3"
    assert resp.headers["Tus-Resumable"] == "1.0.0"
    expires = email.utils.parsedate_to_datetime(resp.headers["Upload-Expires"])
    assert expires.timestamp() > time.time()


@pytest.mark.parametrize(("headers", "status", "code"), [
    ({}, 400, "invalid_length"),
    ({"Upload-Length": "10", "Upload-Defer-Length": "1"}, 400, "invalid_length"),
    ({"Upload-Length": "-1"}, 400, "invalid_length"),
    ({"Upload-Length": "ten"}, 400, "invalid_length"),
    ({"Upload-Defer-Length": "2"}, 400, "invalid_length"),
    ({"Upload-Length": str(60 * 1024**3)}, 413, "upload_too_large"),
    ({"Upload-Length": "10", "Upload-Metadata": "filename !!!"}, 400, "invalid_metadata"),
    ({"Upload-Length": "10", "Upload-Metadata": "a YQ==,a YQ=="}, 400, "invalid_metadata"),
    ({"Upload-Length": "10", "Upload-Metadata": md(filename="notes.txt")}, 422,
     "extension_not_allowed"),
    ({"Upload-Length": "10", "Upload-Metadata": md(taskId="not-a-uuid")}, 422,
     "invalid_task_id"),
    ({"Upload-Length": "10", "Upload-Concat": "sideways"}, 400, "invalid_concat"),
])
async def test_creation_refuses_bad_headers(tus, tus_config, headers, status, code):
    resp = await tus.post("/files/", headers={**TUS, **headers})
    assert resp.status == status
    assert (await resp.json())["error"]["code"] == code
    assert resp.headers["Tus-Resumable"] == "1.0.0"
    assert not list((tus_config.data_dir / "sessions").iterdir())  # nothing left behind


@pytest.mark.parametrize("metadata", ["", "flag", "filetype ", md(filename="a.wav") + ",empty"])
async def test_metadata_with_empty_values_or_none_is_accepted(tus, metadata):
    """§2 row 13: tuspy sends an empty header; an unknown filetype is an empty value."""
    url = await create(tus, 4, metadata)
    resp = await head(tus, url)
    assert resp.status == 200
    assert resp.headers.get("Upload-Metadata", "") == metadata.strip()  # HTTP trims values


async def test_a_task_id_in_use_is_refused(tus):
    task = str(uuid.uuid4())
    await create(tus, 10, md(taskId=task))
    resp = await tus.post("/files/", headers={**TUS, "Upload-Length": "10",
                                               "Upload-Metadata": md(taskId=task)})
    assert resp.status == 422 and (await resp.json())["error"]["code"] == "task_id_in_use"


async def test_creation_with_upload_keeps_the_first_bytes(tus):
    resp = await tus.post("/files/", data=SPEECH[:3000], headers={
        **TUS, **STREAM, "Upload-Length": str(len(SPEECH))})
    assert resp.status == 201 and resp.headers["Upload-Offset"] == "3000"
    assert (await head(tus, resp.headers["Location"])).headers["Upload-Offset"] == "3000"


async def test_an_empty_upload_is_whole_at_once(tus, tus_config):
    url = await create(tus, 0)
    resp = await head(tus, url)
    assert resp.headers["Upload-Offset"] == "0" and resp.headers["Upload-Length"] == "0"


# -- HEAD -----------------------------------------------------------------------------------------

async def test_head_gives_offset_length_metadata_and_no_store(tus):
    """§2 row 3: HEAD must not be cached (Cloudflare)."""
    meta = md(filename="a.wav", filetype="audio/wav")
    url = await create(tus, len(SPEECH), meta)
    assert (await patch(tus, url, 0, SPEECH[:1000])).status == 204
    resp = await head(tus, url)
    assert resp.status == 200
    assert resp.headers["Upload-Offset"] == "1000"
    assert resp.headers["Upload-Length"] == str(len(SPEECH))
    assert resp.headers["Upload-Metadata"] == meta
    assert resp.headers["Cache-Control"] == "no-store"
    assert email.utils.parsedate_to_datetime(resp.headers["Upload-Expires"])


async def test_head_of_an_unknown_upload_is_404_and_of_a_chunk_session_too(tus):
    assert (await head(tus, f"/files/{uuid.uuid4()}")).status == 404
    assert (await head(tus, "/files/not-an-id")).status == 404
    resp = await tus.post("/upload/chunked/session", json={
        "filename": "a.wav", "total_size": 10, "chunk_size": 10, "total_chunks": 1})
    sid = (await resp.json())["session_id"]
    assert (await head(tus, f"/files/{sid}")).status == 404  # not a tus upload


# -- PATCH ----------------------------------------------------------------------------------------

async def test_patch_appends_and_answers_the_new_offset(tus):
    url = await create(tus, len(SPEECH))
    resp = await patch(tus, url, 0, SPEECH[:5000])
    assert resp.status == 204 and resp.headers["Upload-Offset"] == "5000"
    assert email.utils.parsedate_to_datetime(resp.headers["Upload-Expires"])


@pytest.mark.parametrize(("offset", "body", "headers", "status", "code"), [
    ("100", b"x" * 10, {}, 409, "offset_mismatch"),      # §2 row 6: not where the upload is
    ("", b"x" * 10, {}, 400, "invalid_offset"),
    ("-5", b"x" * 10, {}, 400, "invalid_offset"),
    ("0", b"x" * 10, {"Content-Type": "application/octet-stream"}, 415,
     "unsupported_content_type"),
    ("0", b"x" * 2001, {}, 413, "size_exceeded"),        # past Upload-Length
    ("0", b"x" * 10, {"Upload-Checksum": "crc32 AAAA"}, 400, "invalid_upload_checksum"),
    ("0", b"x" * 10, {"Upload-Checksum": "sha1 %%%"}, 400, "invalid_upload_checksum"),
    ("0", b"x" * 10, {"Upload-Checksum": "sha1"}, 400, "invalid_upload_checksum"),
    ("0", b"x" * 10, {"Upload-Checksum": "md5 AAAA"}, 400, "invalid_upload_checksum"),
    ("0", b"x" * 10, {"Upload-Length": "2001"}, 400, "invalid_length"),  # not deferred
    ("0", b"x" * 10, {"Content-Encoding": "x-unknown"}, 415, "unsupported_encoding"),
])
async def test_patch_refusals_touch_nothing(tus, offset, body, headers, status, code):
    url = await create(tus, 2000)
    assert (await patch(tus, url, 0, b"y" * 50)).status == 204
    h = {**TUS, **STREAM, **headers}
    if offset:
        h["Upload-Offset"] = offset if offset != "0" else "50"
    resp = await tus.patch(url, data=body, headers=h)
    assert resp.status == status
    assert (await resp.json())["error"]["code"] == code
    assert (await head(tus, url)).headers["Upload-Offset"] == "50"


async def test_a_patch_over_the_max_chunk_size_is_413_naming_the_limit(tus, tus_config):
    url = await create(tus, 1024 * KiB)
    resp = await patch(tus, url, 0, b"x" * (tus_config.max_chunk_size + 1))
    assert resp.status == 413
    err = (await resp.json())["error"]
    assert err["code"] == "patch_too_large"
    assert err["max_patch_size"] == tus_config.max_chunk_size
    assert (await head(tus, url)).headers["Upload-Offset"] == "0"


async def test_a_chunked_patch_over_the_max_is_cut_at_the_limit(tus, tus_config):
    """Without Content-Length the limit is found while reading: the bytes up to it are kept."""
    url = await create(tus, 1024 * KiB)

    async def gen():
        for _ in range(5):
            yield b"z" * (64 * KiB)

    resp = await tus.patch(url, data=gen(), headers={**TUS, **STREAM, "Upload-Offset": "0"})
    assert resp.status == 413
    assert (await resp.json())["error"]["code"] == "patch_too_large"
    assert int((await head(tus, url)).headers["Upload-Offset"]) <= tus_config.max_chunk_size


# -- checksum ---------------------------------------------------------------------------------

@pytest.mark.parametrize("algorithm", ["sha1", "sha256", "md5"])
async def test_checksum_right_is_kept_and_wrong_is_460_with_nothing_kept(tus, algorithm):
    """§2 row 9: sha1 as the spec requires (tuspy sends only sha1), 460, the PATCH discarded."""
    url = await create(tus, 3000)
    body = SPEECH[:1000]
    good = b64(hashlib.new(algorithm, body).digest())
    bad = b64(hashlib.new(algorithm, b"other").digest())
    resp = await patch(tus, url, 0, body, **{"Upload-Checksum": f"{algorithm} {bad}"})
    assert resp.status == 460
    assert (await resp.json())["error"]["code"] == "upload_checksum_mismatch"
    assert (await head(tus, url)).headers["Upload-Offset"] == "0"
    resp = await patch(tus, url, 0, body, **{"Upload-Checksum": f"{algorithm} {good}"})
    assert resp.status == 204 and resp.headers["Upload-Offset"] == "1000"


# -- defer length ------------------------------------------------------------------------------

async def test_deferred_length_is_declared_once_by_a_patch(tus, tus_config):
    url = await create(tus, None, md(filename="a.wav"), **{"Upload-Defer-Length": "1"})
    resp = await head(tus, url)
    assert resp.headers["Upload-Defer-Length"] == "1" and "Upload-Length" not in resp.headers
    assert (await patch(tus, url, 0, SPEECH[:2000])).status == 204
    resp = await patch(tus, url, 2000, SPEECH[2000:], **{"Upload-Length": str(len(SPEECH))})
    assert resp.status == 204 and resp.headers["Upload-Offset"] == str(len(SPEECH))
    resp = await head(tus, url)
    assert resp.headers["Upload-Length"] == str(len(SPEECH))
    assert "Upload-Defer-Length" not in resp.headers
    assert sha256(await handed_off(tus_config.data_dir)) == sha256(SPEECH)


async def test_a_declared_length_cannot_change_or_undercut_the_offset(tus):
    url = await create(tus, None, **{"Upload-Defer-Length": "1"})
    assert (await patch(tus, url, 0, b"a" * 100)).status == 204
    resp = await patch(tus, url, 100, b"b", **{"Upload-Length": "50"})
    assert resp.status == 400 and (await resp.json())["error"]["code"] == "invalid_length"
    assert (await patch(tus, url, 100, b"b" * 10, **{"Upload-Length": "500"})).status == 204
    resp = await patch(tus, url, 110, b"c", **{"Upload-Length": "600"})
    assert resp.status == 400 and (await resp.json())["error"]["code"] == "invalid_length"


# -- completion ------------------------------------------------------------------------------

async def test_the_last_patch_hands_the_file_off_once_and_the_task_id_is_the_clients(
        tus, tus_config):
    task = str(uuid.uuid4())
    url = await create(tus, len(SPEECH), md(filename="talk.wav", taskId=task))
    async with tus.ws_connect(f"/ws/tasks/{task}") as ws:
        for offset in range(0, len(SPEECH), 100_000):
            resp = await patch(tus, url, offset, SPEECH[offset:offset + 100_000])
            assert resp.status == 204
        # at once, not when recovery would find it (30 s later)
        messages = await asyncio.wait_for(collect(ws), 10)
    assert messages[-1]["stage"] == "complete" and messages[-1]["task_id"] == task
    uploaded = [m["uploaded_bytes"] for m in messages if m["type"] == "upload_progress"]
    assert uploaded == sorted(uploaded) and uploaded[-1] == len(SPEECH)
    assert sha256(await handed_off(tus_config.data_dir, task)) == sha256(SPEECH)
    resp = await head(tus, url)  # the upload is whole: a resuming client is done
    assert resp.headers["Upload-Offset"] == resp.headers["Upload-Length"]
    assert len(list((tus_config.data_dir / "completed").iterdir())) == 1


async def test_a_refused_file_is_told_on_the_websocket_and_the_upload_then_answers_4xx(tus):
    """§2 row 12: the last PATCH cannot carry the refusal; the task and later requests do."""
    junk = (MEDIA / "not-audio.png").read_bytes()
    task = str(uuid.uuid4())
    url = await create(tus, len(junk), md(filename="a.wav", taskId=task))
    async with tus.ws_connect(f"/ws/tasks/{task}") as ws:
        assert (await patch(tus, url, 0, junk)).status == 204  # answered before the check
        messages = [msg.json() async for msg in ws]
    assert messages[-1]["type"] == "error"
    assert messages[-1]["error_code"] == "unsupported_content"
    assert (await head(tus, url)).status == 415
    assert (await patch(tus, url, len(junk), b"")).status == 415  # not 409, which is retried


async def test_upload_progress_shows_bytes_while_a_patch_streams(tus):
    """Progress as bytes arrive: a slow PATCH is counted every second, not only at its end."""
    url = await create(tus, len(SPEECH), md(filename="a.wav"))
    sid = url.rsplit("/", 1)[1]

    async def slow():
        for i in range(0, 60_000, 10_000):
            yield SPEECH[i:i + 10_000]
            await asyncio.sleep(0.4)

    async with tus.ws_connect(f"/ws/tasks/{sid}") as ws:
        sending = asyncio.create_task(patch(tus, url, 0, slow()))
        seen = []
        while not sending.done() or not seen:
            msg = await asyncio.wait_for(ws.receive_json(), 5)
            if msg["type"] == "upload_progress":
                seen.append(msg["uploaded_bytes"])
        assert (await sending).status == 204
    assert any(0 < n < 60_000 for n in seen)  # counted while the body was still coming


async def test_recovery_finalizes_a_whole_upload_a_crash_left_unfinalized(tus, tus_config,
                                                                          monkeypatch):
    """The process that got the last byte died before its finalize: recovery does it."""
    import chunkd.core.recovery as recovery
    from chunkd.keys import RUNNER, STORE

    url = await create(tus, len(SPEECH), md(filename="a.wav"))
    app = tus.server.app
    store = app[STORE]
    meta = await store.get(url.rsplit("/", 1)[1])
    async with store.open_append(meta) as slot:  # the bytes, but no finalize (the "crash")
        await slot.writer(len(SPEECH)).write(SPEECH)
        await slot.writer(0).commit()
        await slot.advance()
    await recovery.recover_once(store, app[RUNNER])
    assert not list((tus_config.data_dir / "completed").glob("*/upload.*"))  # within the grace
    monkeypatch.setattr(recovery, "TUS_FINALIZE_GRACE", 0.0)
    await recovery.recover_once(store, app[RUNNER])
    assert sha256(await handed_off(tus_config.data_dir)) == sha256(SPEECH)


# -- interrupted and stale PATCHes --------------------------------------------------------------

async def raw_patch(tus, url: str, offset: int, length: int, first: bytes):
    reader, writer = await asyncio.open_connection(tus.host, tus.port)
    writer.write((f"PATCH {url} HTTP/1.1\r\nHost: x\r\nTus-Resumable: 1.0.0\r\n"
                  f"Content-Type: application/offset+octet-stream\r\nUpload-Offset: {offset}\r\n"
                  f"Content-Length: {length}\r\n\r\n").encode() + first)
    await writer.drain()
    return reader, writer


async def test_a_stalled_body_is_503_not_408_and_its_prefix_is_kept(tus):
    """§2 row 7: tus clients do not retry a 408; a 5xx is retried and resumes from HEAD."""
    url = await create(tus, len(SPEECH))
    reader, writer = await raw_patch(tus, url, 0, 100_000, SPEECH[:30_000])
    status = await asyncio.wait_for(reader.readline(), 10)
    assert b" 503 " in status
    writer.close()
    assert (await head(tus, url)).headers["Upload-Offset"] == "30000"


async def test_a_dropped_patch_keeps_what_arrived(tus):
    url = await create(tus, len(SPEECH))
    _, writer = await raw_patch(tus, url, 0, 100_000, SPEECH[:40_000])
    await asyncio.sleep(0.3)
    writer.transport.abort()
    await asyncio.sleep(0.5)
    assert (await head(tus, url)).headers["Upload-Offset"] == "40000"
    assert (await patch(tus, url, 40_000, SPEECH[40_000:100_000])).status == 204


async def test_a_head_stops_a_stale_patch_and_the_client_resumes_at_once(aiohttp_client,
                                                                          tmp_path):
    """§2 row 5: the client's new HEAD meets the old PATCH's lock; it must not wait it out."""
    tus_config = Config(data_dir=tmp_path / "data", body_timeout=30.0)
    tus = await aiohttp_client(ChunkdTestServer(make_app(tus_config)))
    url = await create(tus, len(SPEECH), md(filename="a.wav"))
    _, writer = await raw_patch(tus, url, 0, 200_000, SPEECH[:50_000])
    await asyncio.sleep(0.3)
    started = time.monotonic()
    resp = await head(tus, url)
    assert resp.status == 200 and resp.headers["Upload-Offset"] == "50000"
    assert time.monotonic() - started < 1.5  # the old PATCH let go at once
    resp = await patch(tus, url, 50_000, SPEECH[50_000:])
    assert resp.status == 204
    writer.close()
    assert sha256(await handed_off(tus_config.data_dir)) == sha256(SPEECH)


async def test_an_upload_held_elsewhere_is_423_for_patch_and_head_still_answers(
        tus, tus_config):
    """One writer per upload across processes (an OFD lock, as another process would hold
    it): PATCH 423 after a short wait, HEAD 200 within its own short wait, never 5xx."""
    url = await create(tus, 1000)
    sid = url.rsplit("/", 1)[1]
    fd = os.open(tus_config.data_dir / "sessions" / sid / "data", os.O_WRONLY)
    try:
        fcntl.fcntl(fd, 37, struct.pack("hhqqi", fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0))
        resp = await patch(tus, url, 0, b"x" * 10)
        assert resp.status == 423 and (await resp.json())["error"]["code"] == "upload_locked"
        resp = await head(tus, url)
        assert resp.status == 200 and resp.headers["Upload-Offset"] == "0"
        assert (tus_config.data_dir / "sessions" / sid / "stop").exists()  # asked to let go
    finally:
        os.close(fd)
    assert (await patch(tus, url, 0, b"x" * 10)).status == 204


async def test_head_is_423_never_5xx_while_draining(tus):
    """§2 row 4: a 5xx HEAD makes tus-js-client start over from byte 0."""
    url = await create(tus, 100)
    tus.server.app[DRAIN].draining = True
    try:
        resp = await head(tus, url)
        assert resp.status == 423  # (a HEAD answer has no body to name the code)
        assert (await patch(tus, url, 0, b"x")).status == 503  # retried by clients
    finally:
        tus.server.app[DRAIN].draining = False


async def test_rate_limits_are_423_on_head_and_503_elsewhere(aiohttp_client, tmp_path):
    """429 is fatal for tus-js-client: a tus client is told to come back instead."""
    config = Config(data_dir=tmp_path / "data", rate_limit=0.01, rate_burst=2)
    tus = await aiohttp_client(ChunkdTestServer(make_app(config)))
    url = await create(tus, 100)
    await head(tus, url)
    resp = await head(tus, url)
    assert resp.status == 423
    resp = await patch(tus, url, 0, b"x")
    assert resp.status == 503 and "Retry-After" in resp.headers


# -- termination ---------------------------------------------------------------------------------

async def test_delete_is_exactly_204_and_the_upload_is_gone(tus, tus_config):
    """§2 row 11: tus-js-client requires 204."""
    url = await create(tus, 1000)
    assert (await patch(tus, url, 0, b"x" * 10)).status == 204
    resp = await tus.delete(url, headers=TUS)
    assert resp.status == 204 and await resp.read() == b""
    assert (await head(tus, url)).status == 410
    assert (await patch(tus, url, 10, b"x")).status == 410
    assert not list((tus_config.data_dir / "sessions").iterdir())


async def test_method_override_for_proxies_that_only_pass_post(tus):
    url = await create(tus, 100)
    resp = await tus.post(url, data=b"x" * 10, headers={
        **TUS, **STREAM, "Upload-Offset": "0", "X-HTTP-Method-Override": "PATCH"})
    assert resp.status == 204 and resp.headers["Upload-Offset"] == "10"
    resp = await tus.post(url, headers={**TUS, "X-HTTP-Method-Override": "DELETE"})
    assert resp.status == 204
    assert (await head(tus, url)).status == 410


# -- concatenation -------------------------------------------------------------------------------

async def partials(tus, parts: list[bytes], *, send: bool = True) -> list[str]:
    urls = [await create(tus, len(p), **{"Upload-Concat": "partial"}) for p in parts]
    if send:
        for url, part in zip(urls, parts, strict=True):
            assert (await patch(tus, url, 0, part)).status == 204
    return urls


async def test_concatenation_is_o1_idempotent_and_leaves_one_copy(tus, tus_config):
    """§2 row 10 (tus-js-client parallelUploads): partials without metadata, the final's
    metadata checked, the same final POST twice gives the same upload, no second copy."""
    third = len(SPEECH) // 3
    parts = [SPEECH[:third], SPEECH[third:2 * third], SPEECH[2 * third:]]
    urls = await partials(tus, parts)
    task = str(uuid.uuid4())
    absolute = [f"http://example.test{u}" for u in urls]  # as tus-js-client sends them
    headers = {**TUS, "Upload-Concat": "final;" + " ".join(absolute),
               "Upload-Metadata": md(filename="whole.wav", taskId=task)}
    first = await tus.post("/files/", headers=headers)
    assert first.status == 201
    again = await tus.post("/files/", headers=headers)  # a retried final POST
    assert again.status == 201 and again.headers["Location"] == first.headers["Location"]
    final = first.headers["Location"]
    resp = await head(tus, final)
    assert resp.headers["Upload-Offset"] == resp.headers["Upload-Length"] == str(len(SPEECH))
    assert resp.headers["Upload-Concat"] == "final;" + " ".join(urls)
    for url in urls:  # a client retrying the whole flow sees its partials whole
        part = await head(tus, url)
        assert part.headers["Upload-Offset"] == part.headers["Upload-Length"]
        assert part.headers["Upload-Concat"] == "partial"
    assert sha256(await handed_off(tus_config.data_dir, task)) == sha256(SPEECH)
    on_disk = sum(p.stat().st_size for p in (tus_config.data_dir / "sessions").rglob("*")
                  if p.is_file())
    assert on_disk < 64 * KiB  # the bytes are in completed/, once
    assert (await patch(tus, final, len(SPEECH), b"x")).status == 403


def test_a_final_uploads_file_appears_only_whole_where_it_is_handed_off(tmp_path):
    """The parts are joined under another name and renamed when whole: a consumer watching
    completed/ (or a test reading it) never sees the first part alone. Found by a flaky
    hand-off check: the file grew in place while the other parts were appended."""
    parts_dir, target = tmp_path / "parts", tmp_path / "completed" / "upload.wav"
    parts_dir.mkdir()
    target.parent.mkdir()
    sizes = (8 * MiB, 8 * MiB, 8 * MiB + 5)
    paths = []
    for k, size in enumerate(sizes):
        paths.append(parts_dir / str(k))
        paths[-1].write_bytes(bytes([k + 1]) * size)
    seen: set[int] = set()
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            with contextlib.suppress(FileNotFoundError):
                seen.add(target.stat().st_size)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        asyncio.run(PartsBlob(paths, sizes, durable=True).move_to(target))
    finally:
        done.set()
        watcher.join()
    assert seen <= {sum(sizes)}
    assert target.read_bytes() == b"".join(bytes([k + 1]) * n for k, n in enumerate(sizes))
    assert sorted(p.name for p in target.parent.iterdir()) == ["upload.wav"]
    assert not any(parts_dir.iterdir())
    asyncio.run(PartsBlob(paths, sizes, durable=True).move_to(target))  # a retry: nothing to do
    assert target.stat().st_size == sum(sizes)


@pytest.mark.parametrize(("case", "status", "code"), [
    ("incomplete", 400, "partial_incomplete"),
    ("unknown", 404, "session_not_found"),
    ("not partial", 400, "invalid_concat"),
    ("twice", 400, "invalid_concat"),
    ("foreign url", 400, "invalid_concat"),
    ("with length", 400, "invalid_length"),
    ("bad filename", 422, "extension_not_allowed"),
])
async def test_final_post_refusals(tus, case, status, code):
    urls = await partials(tus, [b"a" * 100, b"b" * 100])
    extra: dict[str, str] = {}
    if case == "incomplete":
        urls += await partials(tus, [b"c" * 100], send=False)
    elif case == "unknown":
        urls.append(f"/files/{uuid.uuid4()}")
    elif case == "not partial":
        urls.append(await create(tus, 0))
    elif case == "twice":
        urls.append(urls[0])
    elif case == "foreign url":
        urls.append("/elsewhere/" + str(uuid.uuid4()))
    elif case == "with length":
        extra["Upload-Length"] = "200"
    elif case == "bad filename":
        extra["Upload-Metadata"] = md(filename="x.exe")
    resp = await tus.post("/files/", headers={**TUS, "Upload-Concat": "final;" + " ".join(urls),
                                               **extra})
    assert resp.status == status
    assert (await resp.json())["error"]["code"] == code


async def test_a_partial_goes_into_one_final_only(tus):
    a, b, c = await partials(tus, [b"a" * 10, b"b" * 10, b"c" * 10])
    resp = await tus.post("/files/", headers={**TUS, "Upload-Concat": f"final;{a} {b}"})
    assert resp.status == 201
    resp = await tus.post("/files/", headers={**TUS, "Upload-Concat": f"final;{a} {c}"})
    assert resp.status == 409 and (await resp.json())["error"]["code"] == "partial_in_use"
    assert (await tus.delete(a, headers=TUS)).status == 204  # a taken partial: only its record


# -- browsers and auth ---------------------------------------------------------------------------

async def test_cors_allows_the_tus_requests_and_exposes_their_headers(aiohttp_client, tmp_path):
    """§2 row 2: exposed by name (credentials: * does not count)."""
    origin = "http://127.0.0.1:5173"
    config = Config(data_dir=tmp_path / "data", cors_origins=frozenset({origin}))
    tus = await aiohttp_client(ChunkdTestServer(make_app(config)))
    resp = await tus.options("/files/", headers={
        "Origin": origin, "Access-Control-Request-Method": "PATCH",
        "Access-Control-Request-Headers": "tus-resumable,upload-offset,x-csrf-token"})
    assert resp.status == 204
    methods = {m.strip() for m in resp.headers["Access-Control-Allow-Methods"].split(",")}
    assert {"HEAD", "PATCH", "DELETE", "POST"} <= methods
    allowed = {h.strip().lower() for h in resp.headers["Access-Control-Allow-Headers"].split(",")}
    assert {"tus-resumable", "upload-offset", "upload-length", "upload-metadata",
            "upload-concat", "upload-checksum", "x-csrf-token", "x-request-id",
            "x-http-method-override"} <= allowed
    assert resp.headers["Access-Control-Allow-Credentials"] == "true"
    resp = await tus.post("/files/", headers={**TUS, "Origin": origin, "Upload-Length": "5"})
    exposed = {h.strip() for h in resp.headers["Access-Control-Expose-Headers"].split(",")}
    assert {"Location", "Upload-Offset", "Upload-Length", "Upload-Expires", "Upload-Metadata",
            "Upload-Defer-Length", "Upload-Concat", "Tus-Resumable"} <= exposed
    assert "*" not in exposed


async def test_auth_and_ownership_as_for_the_chunk_api(aiohttp_client, tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("alice key-alice-0123456789abcdef\nbob key-bob-0123456789abcdef0\n")
    config = Config(data_dir=tmp_path / "data", api_keys_file=keys)
    tus = await aiohttp_client(ChunkdTestServer(make_app(config)))
    alice = {"Authorization": "Bearer key-alice-0123456789abcdef"}
    bob = {"Authorization": "Bearer key-bob-0123456789abcdef0"}
    assert (await tus.post("/files/", headers={**TUS, "Upload-Length": "5"})).status == 401
    url = await create(tus, 20, **alice)
    part = await create(tus, 1, **alice, **{"Upload-Concat": "partial"})
    assert (await patch(tus, part, 0, b"x", **alice)).status == 204
    assert (await head(tus, url, **bob)).status == 403
    assert (await patch(tus, url, 0, b"x", **bob)).status == 403
    assert (await tus.delete(url, headers={**TUS, **bob})).status == 403
    resp = await tus.post("/files/", headers={**TUS, **bob, "Upload-Concat": f"final;{part}"})
    assert resp.status == 403
    assert (await patch(tus, url, 0, b"x", **alice)).status == 204
    assert (await head(tus, url)).status == 401


# -- durability ---------------------------------------------------------------------------------

def test_the_offset_is_read_from_disk_after_kill_9_mid_patch(server_factory):
    """A PATCH cut by kill -9 keeps what was flushed (counted every second while it streams);
    the restarted server answers that offset, and the bytes before it are the client's."""
    server = server_factory()
    url = server.url.rstrip("/")
    data = SPEECH * 4

    async def run() -> str:
        async with aiohttp.ClientSession() as http:
            resp = await http.post(f"{url}/files/", headers={
                **TUS, "Upload-Length": str(len(data)), "Upload-Metadata": md(filename="a.wav")})
            location = resp.headers["Location"]

            async def slow():
                for i in range(0, len(data), 20_000):
                    yield data[i:i + 20_000]
                    await asyncio.sleep(0.1)

            task = asyncio.create_task(http.patch(f"{url}{location}", data=slow(), headers={
                **TUS, **STREAM, "Upload-Offset": "0", "Content-Length": str(len(data))}))
            await asyncio.sleep(2.6)
            server.kill9()
            with pytest.raises(aiohttp.ClientError):
                await task
            return location

    location = asyncio.run(run())
    server.start()

    async def check() -> int:
        async with aiohttp.ClientSession() as http:
            resp = await http.head(server.url.rstrip("/") + location, headers=TUS)
            return int(resp.headers["Upload-Offset"])

    offset = asyncio.run(check())
    assert 20_000 <= offset < len(data)
    stored = (server.data_dir / "sessions" / location.rsplit("/", 1)[1] / "data").read_bytes()
    assert stored[:offset] == data[:offset]


# -- a final upload through every hand-off ---------------------------------------------------

async def final_upload(tus, data: bytes, **metadata: str) -> str:
    third = len(data) // 3
    urls = await partials(tus, [data[:third], data[third:2 * third], data[2 * third:]])
    resp = await tus.post("/files/", headers={**TUS, "Upload-Concat": "final;" + " ".join(urls),
                                               "Upload-Metadata": md(**metadata)})
    assert resp.status == 201
    return resp.headers["Location"]


async def test_a_final_upload_streams_to_whisperx_with_its_metadata(aiohttp_client, double_url,
                                                                     tmp_path):
    from whisperx_double import WhisperXDouble

    double = WhisperXDouble()
    config = Config(data_dir=tmp_path / "data", handoff="whisperx",
                    whisperx_url=await double_url(double), whisperx_poll_interval=0.05)
    tus = await aiohttp_client(ChunkdTestServer(make_app(config)))
    task = str(uuid.uuid4())
    await final_upload(tus, SPEECH, filename="talk.wav", language="de", taskId=task)
    async with tus.ws_connect(f"/ws/tasks/{task}") as ws:
        messages = [msg.json() async for msg in ws]
    assert messages[-1]["stage"] == "complete", messages[-1]
    [sent] = double.submissions
    assert sent["sha256"] == sha256(SPEECH) and sent["filename"] == "talk.wav"
    assert sent["params"].get("language") == "de"


async def test_a_final_upload_is_one_file_for_the_command_hand_off(aiohttp_client, tmp_path):
    out = tmp_path / "digest"
    program = ("python3 -c \"import sys,hashlib;open(sys.argv[1],'w').write("
               "hashlib.sha256(open(sys.argv[2],'rb').read()).hexdigest())\" " + str(out))
    config = Config(data_dir=tmp_path / "data", handoff="command", handoff_command=program)
    tus = await aiohttp_client(ChunkdTestServer(make_app(config)))
    task = str(uuid.uuid4())
    await final_upload(tus, SPEECH, filename="talk.wav", taskId=task)
    async with tus.ws_connect(f"/ws/tasks/{task}") as ws:
        messages = [msg.json() async for msg in ws]
    assert messages[-1]["stage"] == "complete", messages[-1]
    assert out.read_text() == sha256(SPEECH)


def test_two_processes_one_upload_a_stale_patch_in_one_is_stopped_from_the_other(
        server_factory, tmp_path):
    """Two chunkd processes on one folder (behind one load balancer): the client's PATCH died
    unseen on process A; its retry reaches B, which asks A (a stop file A looks for every
    second) to keep what it has and let go, and goes on. HEAD on B sees A's bytes."""
    a = server_factory(data_dir=tmp_path / "data")
    b = server_factory(data_dir=tmp_path / "data")

    async def run() -> None:
        async with aiohttp.ClientSession() as http:
            resp = await http.post(a.url.rstrip("/") + "/files/", headers={
                **TUS, "Upload-Length": str(len(SPEECH)), "Upload-Metadata": md(filename="a.wav")})
            location = resp.headers["Location"]
            host, port = a.url.split("//")[1].rstrip("/").split(":")
            reader, writer = await asyncio.open_connection(host, int(port))
            writer.write((f"PATCH {location} HTTP/1.1\r\nHost: x\r\nTus-Resumable: 1.0.0\r\n"
                          f"Content-Type: application/offset+octet-stream\r\nUpload-Offset: 0\r\n"
                          f"Content-Length: {len(SPEECH)}\r\n\r\n").encode() + SPEECH[:70_000])
            await writer.drain()  # ... and the client's side of it is never heard of again
            await asyncio.sleep(1.5)  # A counts it (a checkpoint a second)
            on_b = b.url.rstrip("/") + location
            started = time.monotonic()
            resp = await http.head(on_b, headers=TUS)
            assert resp.status == 200
            offset = int(resp.headers["Upload-Offset"])
            assert offset == 70_000
            resp = await http.patch(on_b, data=SPEECH[offset:], headers={
                **TUS, **STREAM, "Upload-Offset": str(offset)})
            assert resp.status == 204, await resp.text()
            assert time.monotonic() - started < 10  # not A's 60 s body timeout
            assert resp.headers["Upload-Offset"] == str(len(SPEECH))
            writer.close()

    asyncio.run(run())
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        files = list((tmp_path / "data" / "completed").glob("*/upload.wav"))
        if files:
            assert sha256(files[0].read_bytes()) == sha256(SPEECH)
            return
        time.sleep(0.1)
    raise AssertionError("not handed off")


# -- found in review ----------------------------------------------------------------------------

async def test_a_creation_with_the_whole_file_is_handed_off_at_once(tus, tus_config):
    resp = await tus.post("/files/", data=SPEECH, headers={
        **TUS, **STREAM, "Upload-Length": str(len(SPEECH)),
        "Upload-Metadata": md(filename="a.wav")})
    assert resp.status == 201 and resp.headers["Upload-Offset"] == str(len(SPEECH))
    # not ~35 s later by recovery: at once
    assert sha256(await handed_off(tus_config.data_dir, timeout=5)) == sha256(SPEECH)


async def test_a_late_length_passes_the_quota(aiohttp_client, tmp_path):
    config = Config(data_dir=tmp_path / "data", max_reserved_bytes_per_subject=10_000)
    tus = await aiohttp_client(ChunkdTestServer(make_app(config)))
    url = await create(tus, None, **{"Upload-Defer-Length": "1"})
    resp = await patch(tus, url, 0, b"x" * 10, **{"Upload-Length": "50000"})
    assert resp.status == 429 and (await resp.json())["error"]["code"] == "storage_quota"
    assert (await head(tus, url)).headers["Upload-Defer-Length"] == "1"  # nothing declared
    assert (await patch(tus, url, 0, b"x" * 10, **{"Upload-Length": "5000"})).status == 204


async def test_identical_final_posts_at_once_make_one_upload(tus, tus_config):
    third = len(SPEECH) // 3
    urls = await partials(tus, [SPEECH[:third], SPEECH[third:2 * third], SPEECH[2 * third:]])
    headers = {**TUS, "Upload-Concat": "final;" + " ".join(urls),
               "Upload-Metadata": md(filename="a.wav", taskId=str(uuid.uuid4()))}
    first, second = await asyncio.gather(tus.post("/files/", headers=headers),
                                         tus.post("/files/", headers=headers))
    assert (first.status, second.status) == (201, 201), (await first.text(), await second.text())
    assert first.headers["Location"] == second.headers["Location"]
    assert sha256(await handed_off(tus_config.data_dir)) == sha256(SPEECH)


async def test_a_refused_final_post_takes_no_partial(tus):
    a, c = await partials(tus, [b"a" * 10, b"c" * 10])
    assert (await tus.post("/files/", headers={**TUS, "Upload-Concat": f"final;{a}"})).status \
        == 201
    resp = await tus.post("/files/", headers={**TUS, "Upload-Concat": f"final;{c} {a}"})
    assert resp.status == 409 and (await resp.json())["error"]["code"] == "partial_in_use"
    assert (await tus.post("/files/", headers={**TUS, "Upload-Concat": f"final;{c}"})).status \
        == 201  # c was not trapped by the refused POST


async def test_the_chunk_api_does_not_serve_a_tus_upload(tus):
    url = await create(tus, 100)
    sid = url.rsplit("/", 1)[1]
    resp = await tus.post(f"/upload/chunked/{sid}/chunk", params={"index": "0"}, data=b"x" * 100,
                          headers={"Content-Type": "application/octet-stream"})
    assert resp.status == 404
    assert (await tus.get(f"/upload/chunked/{sid}/status")).status == 404


async def test_a_crash_while_a_final_upload_moves_is_finished_from_where_it_was(
        tus, tus_config):
    """The folder hand-off had joined the first two parts (under the joining name) when the
    process died: the finalize done again (recovery's) goes on from there, and the file is
    whole, under its own name only."""
    from chunkd.core.finalize import finalize
    from chunkd.keys import RUNNER, STORE

    store, runner = tus.server.app[STORE], tus.server.app[RUNNER]
    third = len(SPEECH) // 3
    urls = await partials(tus, [SPEECH[:third], SPEECH[third:2 * third], SPEECH[2 * third:]])
    metas = [await store.get(u.rsplit("/", 1)[1]) for u in urls]
    task = str(uuid.uuid4())
    meta = await store.concatenate(
        metas, ttl=3600, session_id=str(uuid.uuid4()), protocol="tus", filename="a.wav",
        extension="wav", total_size=len(SPEECH), chunk_size=len(SPEECH), total_chunks=1,
        concat="final", task_id=task, language=None, model=None, task_params={})
    target = tus_config.data_dir / "completed" / task / "upload.wav"
    target.parent.mkdir(parents=True)
    parts = tus_config.data_dir / "sessions" / meta.session_id / "parts"
    joining = target.with_name(".upload.wav.joining")
    os.rename(parts / "0", joining)
    with open(joining, "ab") as out:
        out.write((parts / "1").read_bytes())
    os.unlink(parts / "1")  # ... and then the process died
    await finalize(store, runner, meta.session_id)
    assert sha256(target.read_bytes()) == sha256(SPEECH)
    assert not list(parts.iterdir())  # every part is in the file, none left twice
    assert [p.name for p in target.parent.iterdir() if p.name != "session.json"] == [
        "upload.wav"]


async def test_a_failed_write_is_never_counted(tus, tus_config, monkeypatch):
    """A batch that could not be written (the disk was full for a moment) makes the writer
    unusable: a later commit cannot count its bytes, so keeping a cut PATCH's prefix never
    moves the offset past bytes that are not on disk."""
    import errno

    import chunkd.store.fs.ranges as ranges
    from chunkd.store.fs.ranges import WRITE_BUFFER, FileRangeWriter

    real, calls = ranges._pwrite_async, []

    async def full_once(*args):
        calls.append(1)
        if len(calls) == 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return await real(*args)

    monkeypatch.setattr(ranges, "_pwrite_async", full_once)
    url = await create(tus, 4 * WRITE_BUFFER)
    sid = url.rsplit("/", 1)[1]
    fd = os.open(tus_config.data_dir / "sessions" / sid / "data", os.O_WRONLY)
    try:
        writer = FileRangeWriter(fd, 0, 4 * WRITE_BUFFER, hashed=False, durable=True)
        await writer.write(b"x" * WRITE_BUFFER)  # submitted: fails (disk full)
        with pytest.raises(Exception, match="disk"):
            await writer.write(b"y" * WRITE_BUFFER)  # waits for the first: its error
        with pytest.raises(Exception, match="disk"):
            await writer.commit()  # the space is back, but the first batch is not on disk
        assert writer.durable_bytes == 0
        await writer.close()
    finally:
        os.close(fd)
    assert (await head(tus, url)).headers["Upload-Offset"] == "0"


async def test_a_twin_final_post_that_lost_the_race_neither_fails_nor_unlinks_the_task_id(
        tus, tus_config, monkeypatch):
    """Found by the battery: identical final POSTs at once. One saw no final upload yet,
    another made it; the first then failed to rename its own copy into place (500) and its
    cleanup removed tasks/<taskId> (the fork's WebSocket closed with 4404)."""
    from chunkd import errors as E
    from chunkd.keys import STORE

    store = tus.server.app[STORE]
    urls = await partials(tus, [SPEECH[:5000], SPEECH[5000:]])
    task = str(uuid.uuid4())
    headers = {**TUS, "Upload-Concat": "final;" + " ".join(urls),
               "Upload-Metadata": md(filename="a.wav", taskId=task)}
    assert (await tus.post("/files/", headers=headers)).status == 201  # the twin that won
    from chunkd.core.tus import final_id

    fid = final_id(None, [u.rsplit("/", 1)[1] for u in urls])
    await handed_off(tus_config.data_dir, task)  # the twin's hand-off is over
    real, seen = store._meta, []

    def stale(sid):  # this request looked before the twin's final upload was in place
        if sid == fid and not seen:
            seen.append(sid)
            raise E.SESSION_NOT_FOUND()
        return real(sid)

    monkeypatch.setattr(store, "_meta", stale)
    resp = await tus.post("/files/", headers=headers)
    monkeypatch.setattr(store, "_meta", real)
    assert seen and resp.status == 201, await resp.text()
    assert resp.headers["Location"].endswith(fid)
    assert (tus_config.data_dir / "tasks" / task).exists()
    async with tus.ws_connect(f"/ws/tasks/{task}") as ws:
        messages = [msg.json() async for msg in ws]
    assert messages[-1]["stage"] == "complete"
