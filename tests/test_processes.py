"""chunkd as real processes: kill -9 mid-chunk, two processes on one folder, SIGTERM."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp

from conftest import MEDIA, chunks_of, session_body, sha256

CHUNK = 64 * 1024


def media_data(extra: int) -> bytes:
    """A real WAV followed by ``extra`` random bytes (libmagic reads the start)."""
    return (MEDIA / "speech.wav").read_bytes() + random.Random(extra).randbytes(extra)


async def create(http: aiohttp.ClientSession, url: str, data: bytes, chunk: int = CHUNK) -> str:
    async with http.post(f"{url}/upload/chunked/session",
                         json=session_body("rec.wav", len(data), chunk)) as resp:
        assert resp.status == 201, await resp.text()
        return (await resp.json())["session_id"]


async def send(http: aiohttp.ClientSession, url: str, sid: str, index: int, body: bytes) -> dict:
    async with http.post(f"{url}/upload/chunked/{sid}/chunk", params={"index": str(index)},
                         data=body, headers={"Content-Type": "application/octet-stream"}) as resp:
        assert resp.status == 200, await resp.text()
        return await resp.json()


async def status(http: aiohttp.ClientSession, url: str, sid: str) -> dict:
    async with http.get(f"{url}/upload/chunked/{sid}/status") as resp:
        assert resp.status == 200, await resp.text()
        return await resp.json()


async def status_after_restart(server_factory, sid: str) -> dict:
    """Start a new chunkd on the same folder and ask it for the session's status."""
    srv = server_factory()
    async with aiohttp.ClientSession() as http:
        return await status(http, srv.url, sid)


async def start_partial_chunk(url: str, sid: str, index: int, body: bytes, sent: int):
    """Open a raw connection, send headers for the whole chunk and only ``sent`` bytes of it."""
    u = urlsplit(url)
    reader, writer = await asyncio.open_connection(u.hostname, u.port)
    writer.write(
        f"POST /upload/chunked/{sid}/chunk?index={index} HTTP/1.1\r\nHost: {u.netloc}\r\n"
        f"Content-Type: application/octet-stream\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        + body[:sent]
    )
    await writer.drain()
    return reader, writer


async def test_kill9_mid_chunk_then_resume(server_factory, tmp_path: Path):
    data = media_data(20 * CHUNK)
    parts = chunks_of(data, CHUNK)
    srv = server_factory()
    async with aiohttp.ClientSession() as http:
        sid = await create(http, srv.url, data)
        for i in (0, 1, 2):
            await send(http, srv.url, sid, i, parts[i])
        _, writer = await start_partial_chunk(srv.url, sid, 3, parts[3], CHUNK // 2)
        await asyncio.sleep(0.5)  # the server has the first half of chunk 3 on disk by now
        srv.kill9()
        writer.close()

        srv2 = server_factory()  # same data dir, new process
        doc = await status(http, srv2.url, sid)
        assert doc["received_chunks"] == 3
        assert 3 in doc["missing_chunks"]
        for i in doc["missing_chunks"]:
            await send(http, srv2.url, sid, i, parts[i])
        async with http.post(f"{srv2.url}/upload/chunked/{sid}/finalize") as resp:
            assert resp.status == 200, await resp.text()
            location = srv2.data_dir / (await resp.json())["location"]
    assert sha256(location.read_bytes()) == sha256(data)


async def test_two_processes_share_one_folder(server_factory, tmp_path: Path):
    data = media_data(40 * CHUNK)
    parts = chunks_of(data, CHUNK)
    a, b = server_factory(), server_factory()
    async with aiohttp.ClientSession() as http:
        sid = await create(http, a.url, data)
        order = list(range(len(parts)))
        random.Random(1).shuffle(order)
        sem = asyncio.Semaphore(6)

        async def one(i: int) -> None:
            async with sem:
                await send(http, (a.url, b.url)[i % 2], sid, i, parts[i])

        await asyncio.gather(*(one(i) for i in order))
        for url in (a.url, b.url):
            doc = await status(http, url, sid)
            assert doc["received_chunks"] == len(parts)
            assert doc["missing_chunks"] == []

        async def fin(url: str) -> dict:
            async with http.post(f"{url}/upload/chunked/{sid}/finalize") as resp:
                assert resp.status == 200, await resp.text()
                return await resp.json()

        replies = await asyncio.gather(*(fin(u) for u in (a.url, b.url, a.url, b.url)))
    assert len({r["task_id"] for r in replies}) == 1
    completed = list((tmp_path / "data" / "completed").iterdir())
    assert [p.name for p in completed] == [replies[0]["task_id"]]
    assert sha256((completed[0] / "upload.wav").read_bytes()) == sha256(data)


async def test_sigterm_lets_an_inflight_chunk_finish(server_factory):
    data = media_data(4 * CHUNK)
    parts = chunks_of(data, CHUNK)
    srv = server_factory("--shutdown-timeout", "20")
    async with aiohttp.ClientSession() as http:
        sid = await create(http, srv.url, data)
    reader, writer = await start_partial_chunk(srv.url, sid, 1, parts[1], CHUNK // 2)
    await asyncio.sleep(0.3)
    assert srv.proc is not None
    srv.proc.send_signal(15)
    await asyncio.sleep(0.3)
    writer.write(parts[1][CHUNK // 2 :])
    await writer.drain()
    reply = await asyncio.wait_for(reader.read(4096), 10)
    writer.close()
    assert b" 200 " in reply.split(b"\r\n")[0]
    assert b'"received_chunks":1' in reply
    out, _ = srv.proc.communicate(timeout=20)
    assert srv.proc.returncode == 0, out
    doc = await status_after_restart(server_factory, sid)
    assert doc["received_chunks"] == 1
    assert 1 not in doc["missing_chunks"]


async def test_sigterm_discards_a_chunk_that_never_finishes(server_factory):
    data = media_data(4 * CHUNK)
    parts = chunks_of(data, CHUNK)
    srv = server_factory("--shutdown-timeout", "1")
    async with aiohttp.ClientSession() as http:
        sid = await create(http, srv.url, data)
        await send(http, srv.url, sid, 0, parts[0])
    _, writer = await start_partial_chunk(srv.url, sid, 2, parts[2], CHUNK // 2)
    await asyncio.sleep(0.3)
    assert srv.proc is not None
    srv.proc.send_signal(15)
    out, _ = srv.proc.communicate(timeout=20)  # exits after the 1 s grace, chunk 2 unfinished
    writer.close()
    assert srv.proc.returncode == 0, out
    doc = await status_after_restart(server_factory, sid)
    assert doc["received_chunks"] == 1
    assert 2 in doc["missing_chunks"]
