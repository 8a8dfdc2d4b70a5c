"""Every endpoint's happy path, against a real server on 127.0.0.1 with real files and libmagic."""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import subprocess
from pathlib import Path

import orjson
import pytest

from conftest import MEDIA, chunks_of, create_session, put_chunk, session_body, sha256, upload_all

ACCEPTED = ["speech.wav", "speech.mp3", "speech-noid3.mp3", "speech.m4a", "speech.aac",
            "speech.ogg", "speech.flac", "speech.webm", "speech.mp4", "speech.mkv"]
REFUSED = {"text-renamed.mp3": "text/plain", "elf-renamed.wav": "application/x-executable",
           "archive-renamed.m4a": "application/zip", "not-audio.png": "image/png"}


async def test_create_session_reply(client, config):
    body = {"filename": "talk.mp3", "total_size": 10_000, "total_chunks": 3, "chunk_size": 4096,
            "language": "en", "model": "large-v3", "task_params": {"min_speakers": 2}}
    resp = await client.post("/upload/chunked/session", json=body)
    assert resp.status == 201
    doc = await resp.json()
    assert doc["chunk_size"] == 4096
    assert doc["total_chunks"] == 3
    assert doc["max_chunk_size"] == config.max_chunk_size
    assert doc["status"] == "uploading"
    assert doc["expires_at"].endswith("Z")


async def test_default_chunk_size_is_offered(client, config):
    resp = await client.post(
        "/upload/chunked/session",
        json={"filename": "a.wav", "total_size": 10 * 4096 + 1, "total_chunks": 11},
    )
    assert resp.status == 201
    assert (await resp.json())["chunk_size"] == config.chunk_size


@pytest.mark.parametrize("name", ACCEPTED)
async def test_real_media_goes_through(client, config, name):
    data = (MEDIA / name).read_bytes()
    sid = await upload_all(client, name, data, 4096)
    resp = await client.post(f"/upload/chunked/{sid}/finalize")
    assert resp.status == 200, await resp.text()
    doc = await resp.json()
    assert doc["status"] == "processing"
    task_dir = config.data_dir / "completed" / doc["task_id"]
    stored = next(p for p in task_dir.iterdir() if p.name.startswith("upload."))
    assert sha256(stored.read_bytes()) == sha256(data)
    record = orjson.loads((task_dir / "session.json").read_bytes())
    assert record["filename"] == name
    assert record["mime_type"].split("/")[0] in ("audio", "video")


@pytest.mark.parametrize("name", sorted(REFUSED))
async def test_disguised_files_are_refused_with_415(client, config, name):
    data = (MEDIA / name).read_bytes()
    upload_name = name.replace(".png", ".mp4")  # a PNG named as a video gets past the extension check
    sid = await upload_all(client, upload_name, data, 1024)
    resp = await client.post(f"/upload/chunked/{sid}/finalize")
    assert resp.status == 415
    err = (await resp.json())["error"]
    assert err["code"] == "unsupported_content"
    assert err["detected_type"].startswith(REFUSED[name])
    # The session is failed, its bytes removed, nothing handed off; asking again says the same.
    status = await (await client.get(f"/upload/chunked/{sid}/status")).json()
    assert status["status"] == "failed"
    assert status["error"]["code"] == "unsupported_content"
    assert not (config.data_dir / "sessions" / sid / "data").exists()
    assert list((config.data_dir / "completed").iterdir()) == []
    again = await client.post(f"/upload/chunked/{sid}/finalize")
    assert again.status == 415


async def test_status_tracks_received_and_missing(client):
    data = (MEDIA / "speech.ogg").read_bytes()  # 17674 bytes: 5 chunks of 4 KiB
    sid = (await create_session(client, "speech.ogg", data, 4096))["session_id"]
    parts = chunks_of(data, 4096)
    for i in (4, 1):
        resp = await put_chunk(client, sid, i, parts[i])
        assert resp.status == 200
    doc = await (await client.get(f"/upload/chunked/{sid}/status")).json()
    assert doc["status"] == "uploading"
    assert doc["received_chunks"] == 2
    assert doc["missing_chunks"] == [0, 2, 3]
    assert doc["received_bytes"] == 4096 + len(parts[4])
    assert doc["total_bytes"] == len(data)


async def test_resending_a_chunk_is_safe(client, config):
    data = (MEDIA / "speech.wav").read_bytes()
    sid = await upload_all(client, "speech.wav", data, 65536)
    resp = await put_chunk(client, sid, 1, data[65536:131072])
    doc = await resp.json()
    assert resp.status == 200
    assert doc["already_received"] is True
    assert doc["received_chunks"] == doc["total_chunks"] == 4
    final = await (await client.post(f"/upload/chunked/{sid}/finalize")).json()
    assert not Path(final["location"]).is_absolute()  # no server path in a reply
    path = config.data_dir / final["location"]
    assert sha256(path.read_bytes()) == sha256(data)


async def test_checksum_is_checked(client):
    data = (MEDIA / "speech.mp3").read_bytes()
    sid = (await create_session(client, "speech.mp3", data, 8192))["session_id"]
    good = data[:8192]
    resp = await put_chunk(client, sid, 0, good, **{"X-Chunk-Checksum": "sha256=" + "0" * 64})
    assert resp.status == 400
    assert (await resp.json())["error"]["code"] == "checksum_mismatch"
    status = await (await client.get(f"/upload/chunked/{sid}/status")).json()
    assert 0 in status["missing_chunks"]
    resp = await put_chunk(client, sid, 0, good, **{"X-Chunk-Checksum": "sha256=" + sha256(good)})
    assert resp.status == 200
    assert (await resp.json())["received_chunks"] == 1


async def test_shuffled_parallel_upload_is_whole(client, config):
    """Chunks in random order, four in flight at once: the finished file is the source."""
    data = random.Random(7).randbytes(3_000_000) + (MEDIA / "speech.wav").read_bytes()
    data = (MEDIA / "speech.wav").read_bytes() + data  # libmagic looks at the start
    chunk = 64 * 1024
    sid = (await create_session(client, "big.wav", data, chunk))["session_id"]
    order = list(range(len(chunks_of(data, chunk))))
    random.Random(3).shuffle(order)
    parts = chunks_of(data, chunk)
    sem = asyncio.Semaphore(4)

    async def send(i: int) -> None:
        async with sem:
            resp = await put_chunk(client, sid, i, parts[i], **{"X-Chunk-Checksum": "sha256=" + sha256(parts[i])})
            assert resp.status == 200, await resp.text()

    await asyncio.gather(*(send(i) for i in order))
    resp = await client.post(f"/upload/chunked/{sid}/finalize")
    assert resp.status == 200
    path = config.data_dir / (await resp.json())["location"]
    assert sha256(path.read_bytes()) == sha256(data)


async def test_finalize_is_idempotent(client, config):
    data = (MEDIA / "speech.flac").read_bytes()
    sid = await upload_all(client, "speech.flac", data, 16384)
    replies = await asyncio.gather(*(client.post(f"/upload/chunked/{sid}/finalize") for _ in range(5)))
    docs = [await r.json() for r in replies]
    assert {r.status for r in replies} == {200}
    assert len({d["task_id"] for d in docs}) == 1
    assert len(list((config.data_dir / "completed").iterdir())) == 1


async def test_finalize_with_missing_chunks_is_409(client):
    data = (MEDIA / "speech.ogg").read_bytes()
    sid = (await create_session(client, "speech.ogg", data, 4096))["session_id"]
    await put_chunk(client, sid, 0, data[:4096])
    resp = await client.post(f"/upload/chunked/{sid}/finalize")
    assert resp.status == 409
    err = (await resp.json())["error"]
    assert err["code"] == "chunks_missing"
    assert err["missing_chunks"] == [1, 2, 3, 4]


async def test_abort_removes_bytes_and_later_calls_get_410(client, config):
    data = (MEDIA / "speech.ogg").read_bytes()
    sid = (await create_session(client, "speech.ogg", data, 4096))["session_id"]
    await put_chunk(client, sid, 0, data[:4096])
    resp = await client.delete(f"/upload/chunked/{sid}/abort")
    assert resp.status == 200
    assert await resp.json() == {"session_id": sid, "status": "aborted",
                                 "message": "Upload cancelled, chunks deleted"}
    assert not (config.data_dir / "sessions" / sid).exists()
    for resp in [
        await client.get(f"/upload/chunked/{sid}/status"),
        await put_chunk(client, sid, 1, data[4096:8192]),
        await client.post(f"/upload/chunked/{sid}/finalize"),
        await client.delete(f"/upload/chunked/{sid}/abort"),
    ]:
        assert resp.status == 410
        assert (await resp.json())["error"]["code"] == "session_aborted"


async def test_finalized_session_refuses_chunks_and_abort(client):
    data = (MEDIA / "speech.ogg").read_bytes()
    sid = await upload_all(client, "speech.ogg", data, 4096)
    task_id = (await (await client.post(f"/upload/chunked/{sid}/finalize")).json())["task_id"]
    resp = await put_chunk(client, sid, 0, data[:4096])
    assert resp.status == 409
    assert (await resp.json())["error"] == {
        "code": "session_finalized", "task_id": task_id,
        "message": "this upload session is already finalized; it takes no more changes"}
    resp = await client.delete(f"/upload/chunked/{sid}/abort")
    assert resp.status == 409
    # one code, one message, wherever it is raised
    assert (await resp.json())["error"]["message"] == "this upload session is already finalized; it takes no more changes"
    status = await (await client.get(f"/upload/chunked/{sid}/status")).json()
    assert status["status"] == "completed"
    assert status["task_id"] == task_id


async def test_healthz(client):
    resp = await client.get("/healthz")
    assert resp.status == 200
    assert (await resp.json())["status"] == "ok"


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("mount") is None,
                    reason="needs root to mount a read-only file system")
async def test_healthz_on_a_read_only_data_dir_is_503(aiohttp_client, tmp_path):
    """A load balancer must stop sending uploads to an instance whose disk went read-only."""
    from chunkd.app import make_app
    from chunkd.config import Config

    mnt = tmp_path / "ro"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], check=True)
    try:
        client = await aiohttp_client(make_app(Config(min_chunk_size=1024, data_dir=mnt / "data", min_free_space=0)))
        assert (await client.get("/healthz")).status == 200
        subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
        resp = await client.get("/healthz")
        assert resp.status == 503
        assert (await resp.json())["status"] == "data_dir_not_writable"
        await client.close()
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


async def test_cors_for_configured_origins(aiohttp_client, tmp_path):
    from chunkd.app import make_app
    from chunkd.config import Config

    config = Config(min_chunk_size=1024, data_dir=tmp_path / "d", cors_origins=frozenset({"http://localhost:5173"}))
    client = await aiohttp_client(make_app(config))
    pre = await client.options("/upload/chunked/session", headers={
        "Origin": "http://localhost:5173", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type"})
    assert pre.status == 204
    assert pre.headers["Access-Control-Allow-Origin"] == "http://localhost:5173"
    assert "X-Chunk-Checksum" in pre.headers["Access-Control-Allow-Headers"]
    assert "X-CSRF-Token" in pre.headers["Access-Control-Allow-Headers"]
    assert pre.headers["Access-Control-Allow-Credentials"] == "true"
    resp = await client.get("/healthz", headers={"Origin": "http://localhost:5173"})
    assert resp.headers["Access-Control-Allow-Origin"] == "http://localhost:5173"
    assert resp.headers["Access-Control-Allow-Credentials"] == "true"
    assert "Retry-After" in resp.headers["Access-Control-Expose-Headers"]  # named, not "*"
    other = await client.get("/healthz", headers={"Origin": "http://evil.example"})
    assert "Access-Control-Allow-Origin" not in other.headers
    denied = await client.options("/upload/chunked/session", headers={
        "Origin": "http://evil.example", "Access-Control-Request-Method": "POST"})
    assert denied.status == 403


async def test_any_origin_gets_no_credentials(aiohttp_client, tmp_path):
    from chunkd.app import make_app
    from chunkd.config import Config

    config = Config(min_chunk_size=1024, data_dir=tmp_path / "d", cors_origins=frozenset({"*"}))
    client = await aiohttp_client(make_app(config))
    resp = await client.get("/healthz", headers={"Origin": "http://anyone.example"})
    assert resp.headers["Access-Control-Allow-Origin"] == "http://anyone.example"
    assert "Access-Control-Allow-Credentials" not in resp.headers


async def test_session_limits_come_from_the_store(aiohttp_client, tmp_path):
    """A backend with other limits (S3 multipart: parts of 5 MiB or more, at most 10 000 of
    them) gets sessions that fit it, without any change to the HTTP layer."""
    from chunkd.app import make_app
    from chunkd.config import Config
    from chunkd.store import FileSystemStore, StoreLimits

    class TightStore(FileSystemStore):
        limits = StoreLimits(min_part_size=8192, max_part_size=16384, max_parts=3)

    config = Config(min_chunk_size=1024, data_dir=tmp_path / "data", chunk_size=8192)
    client = await aiohttp_client(make_app(config, TightStore(config.data_dir)))
    resp = await client.post("/upload/chunked/session",
                             json=session_body("a.wav", 20000, 4096))
    assert resp.status == 422
    assert (await resp.json())["error"]["min_chunk_size"] == 8192
    resp = await client.post("/upload/chunked/session",
                             json=session_body("a.wav", 20000, 32768))
    assert resp.status == 413
    assert (await resp.json())["error"]["max_chunk_size"] == 16384
    resp = await client.post("/upload/chunked/session",
                             json=session_body("a.wav", 40000, 8192))
    assert resp.status == 422 and (await resp.json())["error"]["code"] == "too_many_chunks"
    resp = await client.post("/upload/chunked/session",
                             json=session_body("a.wav", 20000, 8192))
    assert resp.status == 201 and (await resp.json())["max_chunk_size"] == 16384
