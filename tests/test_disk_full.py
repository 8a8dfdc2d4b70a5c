"""A full disk never locks chunkd up: on a small loop-mounted ext4 data dir filled by someone
else, every answer is a clear JSON error (never a 500), status stays truthful, abort and the
sweeper still free space, no temp file is left, and once there is room again uploads work."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from chunkd.app import make_app
from chunkd.config import Config, KiB, MiB
from chunkd.core.sweeper import sweep
from chunkd.keys import STORE
from conftest import (
    MEDIA,
    ChunkdTestServer,
    chunks_of,
    create_session,
    put_chunk,
    session_body,
    upload_all,
)

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("mkfs.ext4") is None or shutil.which("mount") is None,
    reason="needs root, mkfs.ext4 and mount to make a small real file system")

CHUNK = 16 * KiB
DATA = (MEDIA / "speech.wav").read_bytes()


@contextlib.contextmanager
def small_ext4(tmp_path: Path, size_mib: int = 24, inodes: int | None = None) -> Iterator[Path]:
    image, mnt = tmp_path / "disk.img", tmp_path / "mnt"
    mnt.mkdir()
    with open(image, "wb") as f:
        f.truncate(size_mib * MiB)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-m", "0", *(["-N", str(inodes)] if inodes else []),
                    str(image)], check=True)
    subprocess.run(["mount", "-o", "loop", str(image), str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill(folder: Path, name: str) -> Path:
    """Someone else fills the disk to the last block: one big file, then tiny files (one
    block each) until none fits. Returns the folder holding them."""
    filler = folder / name
    filler.mkdir()
    with contextlib.suppress(OSError), open(filler / "big", "wb", buffering=0) as f:
        while True:
            f.write(b"\0" * MiB)
    for n in range(100_000):
        try:
            with open(filler / f"s{n}", "wb", buffering=0) as f:
                f.write(b"x")
                os.fsync(f.fileno())
        except OSError:
            break
    return filler


def temp_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.endswith(".tmp")]


async def test_a_full_disk_is_clear_errors_and_can_be_freed(aiohttp_client, tmp_path):
    with small_ext4(tmp_path) as mnt:
        config = Config(min_chunk_size=1024, data_dir=mnt / "data", chunk_size=CHUNK, min_free_space=1 * MiB,
                        sweep_interval=3600, session_ttl=3600)
        client = await aiohttp_client(ChunkdTestServer(make_app(config)))
        store = client.server.app[STORE]
        parts = chunks_of(DATA, CHUNK)
        half = (await create_session(client, "a.wav", DATA, CHUNK))["session_id"]
        for i in range(4):
            assert (await put_chunk(client, half, i, parts[i])).status == 200
        spare = (await create_session(client, "b.wav", DATA, CHUNK))["session_id"]
        filler = fill(mnt, "filler-1")

        resp = await client.post("/upload/chunked/session",
                                 json={"filename": "c.wav", "total_size": 1000,
                                       "chunk_size": 1024, "total_chunks": 1})
        assert resp.status == 507
        assert (await resp.json())["error"]["code"] == "insufficient_storage"
        health = await client.get("/healthz")
        assert health.status == 503 and (await health.json())["status"] == "data_dir_full"

        # The half-sent session: every chunk answer is a 200 or a clear 507, and /status tells
        # exactly what was counted.
        counted = set(range(4))
        for i in range(4, len(parts)):
            resp = await put_chunk(client, half, i, parts[i])
            assert resp.status in (200, 507), await resp.text()
            if resp.status == 200:
                counted.add(i)
        status = await (await client.get(f"/upload/chunked/{half}/status")).json()
        assert set(range(len(parts))) - set(status["missing_chunks"]) == counted

        resp = await client.post(f"/upload/chunked/{half}/finalize")
        assert resp.status in (200, 409, 507), await resp.text()  # never a 500

        # Abort needs no space, and frees some.
        assert os.statvfs(mnt).f_bavail == 0  # truly full
        free_before = shutil.disk_usage(mnt).free
        resp = await client.delete(f"/upload/chunked/{spare}/abort")
        assert resp.status == 200, await resp.text()
        assert shutil.disk_usage(mnt).free > free_before
        assert (await client.get(f"/upload/chunked/{spare}/status")).status == 410

        # The sweeper too: an expired session is removed on a full disk.
        filler_2 = fill(mnt, "filler-2")
        removed = await sweep(store, time.time() + 7200)
        assert half in removed or (await client.get(f"/upload/chunked/{half}/status")).status == 410
        assert temp_files(mnt / "data") == []

        # Room again: a normal upload is whole.
        shutil.rmtree(filler)
        shutil.rmtree(filler_2)
        assert (await client.get("/healthz")).status == 200
        sid = await upload_all(client, "d.wav", DATA, CHUNK)
        final = await (await client.post(f"/upload/chunked/{sid}/finalize")).json()
        stored = (config.data_dir / final["location"]).read_bytes()
        assert hashlib.sha256(stored).hexdigest() == hashlib.sha256(DATA).hexdigest()
        assert temp_files(mnt / "data") == []
        await client.close()


async def test_chunk_markers_cannot_exhaust_the_disks_inodes(aiohttp_client, tmp_path):
    """Finding 3: with 1 KiB chunks one session's markers used every inode of the volume and
    every other client's session creation failed. Now a marker's inode and block are counted
    when the session is created, and the smallest chunk is 1 MiB by default."""
    with small_ext4(tmp_path, size_mib=32, inodes=1024) as mnt:
        free_inodes = os.statvfs(mnt).f_favail
        assert free_inodes < 1100
        default = Config(data_dir=mnt / "d1", sweep_interval=3600, min_free_space=1 * MiB)
        client = await aiohttp_client(ChunkdTestServer(make_app(default)))
        small = await client.post("/upload/chunked/session",
                                  json=session_body("a.wav", 4 * MiB, KiB))
        assert small.status == 422  # 1 KiB chunks: refused by default

        # The old minimum (1 KiB) allowed again: the inodes are checked before anything is kept.
        old = Config(min_chunk_size=KiB, data_dir=mnt / "d2", chunk_size=KiB,
                     sweep_interval=3600, min_free_space=1 * MiB)
        client = await aiohttp_client(ChunkdTestServer(make_app(old)))
        greedy = await client.post("/upload/chunked/session",
                                   json=session_body("a.wav", 4 * MiB, KiB))
        assert greedy.status == 507, await greedy.text()
        assert (await greedy.json())["error"]["code"] == "insufficient_storage"
        # one that fits takes its inodes now (one empty file per marker), so a second one that
        # would need the same inodes is refused at once instead of failing the first one later
        data = (DATA * 4)[: 600 * KiB]  # 600 chunks of 1 KiB
        sid = (await create_session(client, "b.wav", data, KiB))["session_id"]
        second = await client.post("/upload/chunked/session",
                                   json=session_body("c.wav", len(data), KiB))
        assert second.status == 507, await second.text()
        for i, part in enumerate(chunks_of(data, KiB)):
            assert (await put_chunk(client, sid, i, part)).status == 200
        status = await (await client.get(f"/upload/chunked/{sid}/status")).json()
        assert status["received_chunks"] == status["total_chunks"] == len(chunks_of(data, KiB))
        other = await client.post("/upload/chunked/session",
                                  json=session_body("c.wav", 100 * KiB, 100 * KiB))
        assert other.status == 201


async def test_a_reserved_session_can_finish_on_a_full_disk(aiohttp_client, tmp_path):
    """Markers that hold a checksum need a block each: those blocks are reserved with the
    session, so on a disk someone else filled it still finishes (no 507, no temp file)."""
    with small_ext4(tmp_path) as mnt:
        config = Config(min_chunk_size=KiB, data_dir=mnt / "data", chunk_size=KiB,
                        min_free_space=1 * MiB, sweep_interval=3600)
        client = await aiohttp_client(ChunkdTestServer(make_app(config)))
        data = DATA[: 40 * KiB]
        parts = chunks_of(data, KiB)
        sid = (await create_session(client, "a.wav", data, KiB))["session_id"]
        filler = fill(mnt, "filler")
        assert os.statvfs(mnt).f_bavail == 0
        for i, part in enumerate(parts):
            resp = await put_chunk(client, sid, i, part,
                                   **{"X-Chunk-Checksum": "sha256=" + hashlib.sha256(part).hexdigest()})
            assert resp.status == 200, (i, await resp.text())
        assert temp_files(mnt / "data") == []
        status = await (await client.get(f"/upload/chunked/{sid}/status")).json()
        assert status["received_chunks"] == len(parts)
        shutil.rmtree(filler)
        done = await client.post(f"/upload/chunked/{sid}/finalize")
        assert done.status == 200, await done.text()
        location = mnt / "data" / (await done.json())["location"]
        assert hashlib.sha256(location.read_bytes()).hexdigest() == hashlib.sha256(data).hexdigest()
