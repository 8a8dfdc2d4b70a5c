"""The Python client, `chunkd upload` and `chunkd bench` against real chunkd servers."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import orjson
import pytest

from chunkd.client import ChunkdClient, ChunkdClientError, FileSource
from conftest import MEDIA, sha256
from tcp_proxy import TcpProxy


def media_file(tmp_path: Path, extra: int, name: str = "talk.wav") -> Path:
    path = tmp_path / name
    path.write_bytes((MEDIA / "speech.wav").read_bytes() + random.Random(extra).randbytes(extra))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def completed_file(data_dir: Path, task_id: str) -> Path:
    return next((data_dir / "completed" / task_id).glob("upload.*"))


async def test_parallel_upload_with_progress(server_factory, tmp_path):
    srv = server_factory()
    path = media_file(tmp_path, 3 * 1024 * 1024)
    seen = []
    async with ChunkdClient(srv.url, parallel=4, chunk_size=256 * 1024) as client:
        result = await client.upload(FileSource(path), language="en", on_progress=seen.append)
        final = await client.follow(result.task_id)
    assert result.task_id and final["stage"] == "complete"
    assert sha256(completed_file(srv.data_dir, result.task_id).read_bytes()) == sha256(
        path.read_bytes())
    done = [p.done_chunks for p in seen]
    assert done == sorted(done) and done[-1] == seen[-1].total_chunks == 13
    assert seen[-1].done_bytes == path.stat().st_size and seen[-1].speed > 0


async def test_resume_sends_only_missing_chunks(server_factory, tmp_path):
    srv = server_factory()
    path = media_file(tmp_path, 2 * 1024 * 1024)
    source = FileSource(path)
    async with ChunkdClient(srv.url, parallel=1, chunk_size=128 * 1024) as client:
        created = await client.create_session(source.name, source.size)
        sid = created["session_id"]
        for i in (0, 3, 5):
            await client.put_chunk(sid, i, source, i * 128 * 1024, 128 * 1024)
        result = await client.upload(source, session_id=sid)
    assert result.sent_bytes == source.size - 3 * 128 * 1024
    assert sha256(completed_file(srv.data_dir, result.task_id).read_bytes()) == sha256(
        path.read_bytes())


async def test_upload_survives_a_server_kill_and_restart(server_factory, tmp_path):
    port = free_port()
    srv = server_factory("--port", str(port))
    path = media_file(tmp_path, 12 * 1024 * 1024)
    killed = asyncio.Event()

    def on_progress(p) -> None:
        if p.done_chunks == 10 and not killed.is_set():
            srv.kill9()
            killed.set()

    async def restart() -> None:
        await killed.wait()
        await asyncio.sleep(0.5)
        await asyncio.to_thread(server_factory, "--port", str(port))

    async with ChunkdClient(srv.url, parallel=2, chunk_size=256 * 1024, backoff=0.3,
                            retries=10) as client:
        restarter = asyncio.create_task(restart())
        result = await client.upload(FileSource(path), on_progress=on_progress)
        await restarter
    assert killed.is_set() and result.retries > 0 and client.errors[0] > 0
    assert sha256(completed_file(srv.data_dir, result.task_id).read_bytes()) == sha256(
        path.read_bytes())


async def test_retries_through_a_connection_dropping_proxy(server_factory, tmp_path):
    srv = server_factory()
    proxy = await TcpProxy(int(srv.url.rsplit(":", 1)[1]), drop_every=3,
                           drop_after=100 * 1024).start()
    path = media_file(tmp_path, 4 * 1024 * 1024)
    try:
        # a fresh connection per request, so the proxy gets to drop some of them
        http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True))
        async with ChunkdClient(f"http://127.0.0.1:{proxy.port}", parallel=3,
                                chunk_size=512 * 1024, backoff=0.05, session=http) as client:
            result = await client.upload(FileSource(path))
        await http.close()
    finally:
        await proxy.close()
    assert proxy.dropped > 0 and result.retries > 0
    assert sha256(completed_file(srv.data_dir, result.task_id).read_bytes()) == sha256(
        path.read_bytes())


async def test_permanent_errors_fail_at_once(server_factory, tmp_path):
    srv = server_factory()
    disguised = tmp_path / "notes.mp3"
    disguised.write_bytes((MEDIA / "text-renamed.mp3").read_bytes())
    async with ChunkdClient(srv.url, chunk_size=1024, backoff=5) as client:
        t0 = time.monotonic()
        with pytest.raises(ChunkdClientError) as err:
            await client.upload(FileSource(disguised))
        assert err.value.status == 415 and "text/plain" in err.value.message
        assert client.errors[415] == 1  # not retried
        sid = (await client.create_session("a.wav", 4096, chunk_size=1024))["session_id"]
        await client.abort(sid)
        with pytest.raises(ChunkdClientError) as err:
            await client.upload(FileSource(media_file(tmp_path, 0)), session_id=sid)
        assert err.value.status == 410 and err.value.code == "session_aborted"
        assert time.monotonic() - t0 < 5  # no backoff was waited for


def run_upload(url: str, path: Path, cache: Path, *extra: str, timeout: float = 60,
               ) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "chunkd", "upload", str(path), "--url", url, "--quiet", *extra],
        capture_output=True, text=True, timeout=timeout,
        env={**os.environ, "XDG_CACHE_HOME": str(cache)},
    )


def default_sigint() -> None:
    """In a child: Ctrl-C as a terminal delivers it. A shell's background job (e.g. the suite run
    with ``&``) ignores SIGINT, and a child would inherit that."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


async def test_chunkd_upload_resumes_after_interrupt(server_factory, tmp_path):
    srv = server_factory()
    # a slow link (3 MB/s, ~5 s for the file) so the upload is surely interrupted half-way, even
    # on a loaded machine
    proxy = await TcpProxy(int(srv.url.rsplit(":", 1)[1]), rate=3e6).start()
    url = f"http://127.0.0.1:{proxy.port}"
    path = media_file(tmp_path, 16 * 1024 * 1024)
    cache = tmp_path / "cache"
    proc = subprocess.Popen(
        [sys.executable, "-m", "chunkd", "upload", str(path), "--url", url, "--quiet",
         "--chunk-size", "1MiB", "--parallel", "2"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "XDG_CACHE_HOME": str(cache)},
        preexec_fn=default_sigint,
    )
    try:
        state_file = cache / "chunkd" / "uploads.json"
        sid = None
        async with aiohttp.ClientSession() as http:
            for _ in range(300):
                await asyncio.sleep(0.05)
                if sid is None and state_file.exists():
                    sid = next(iter(orjson.loads(state_file.read_bytes()).values()))
                if sid is not None:
                    async with http.get(f"{srv.url}/upload/chunked/{sid}/status") as resp:
                        if (await resp.json())["received_chunks"] >= 4:
                            break
        proc.send_signal(signal.SIGINT)
        _, err = await asyncio.to_thread(proc.communicate, timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert "run the same command again to resume" in err and "Traceback" not in err
    second = await asyncio.to_thread(run_upload, url, path, cache)
    await proxy.close()
    assert second.returncode == 0, second.stderr
    assert "(resumed)" in second.stdout
    sent = int(second.stdout.split(": ")[1].split(" bytes")[0])
    assert 0 < sent < path.stat().st_size  # fewer bytes the second time
    task_id = second.stdout.strip().rsplit("task ", 1)[1]
    assert sha256(completed_file(srv.data_dir, task_id).read_bytes()) == sha256(path.read_bytes())
    assert orjson.loads(state_file.read_bytes()) == {}  # forgotten once done


async def test_chunkd_upload_wait_prints_the_result(server_factory, tmp_path):
    srv = server_factory()
    out = await asyncio.to_thread(run_upload, srv.url, MEDIA / "speech.ogg", tmp_path, "--wait")
    assert out.returncode == 0, out.stderr
    assert "saved to " in out.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (("/nonexistent/file.wav",), "cannot read"),
        ((str(MEDIA / "not-audio.png"),), "extension"),
        ((str(MEDIA / "speech.wav"), "--chunk-size", "lots"), "not a size"),
    ],
)
async def test_chunkd_upload_errors_are_one_line(server_factory, tmp_path, args, message):
    srv = server_factory()
    out = await asyncio.to_thread(run_upload, srv.url, Path(args[0]), tmp_path, *args[1:])
    assert out.returncode == 1
    assert message in out.stderr and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_chunkd_upload_with_no_server(tmp_path):
    out = run_upload(f"http://127.0.0.1:{free_port()}", MEDIA / "speech.wav", tmp_path)
    assert out.returncode == 1 and "cannot reach" in out.stderr
    assert "Traceback" not in out.stderr


async def test_chunkd_bench_json(server_factory):
    srv = server_factory("--durable", "off")
    out = await asyncio.to_thread(subprocess.run, [
        sys.executable, "-m", "chunkd", "bench", "--url", srv.url, "--sessions", "2",
        "--parallel", "2", "--size", "4MiB", "--chunk-size", "1MiB", "--duration", "60s",
        "--finalize", "--json"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    doc = orjson.loads(out.stdout)
    assert doc["completed_sessions"] == 2 and doc["bytes_sent"] == 8 * 1024 * 1024
    assert doc["chunks"] == 8 and doc["throughput_mb_s"] > 0
    assert set(doc["chunk_latency_ms"]) == {"p50", "p95", "p99", "mean"}
    assert doc["finalize_ms_median"] > 0
    assert doc["errors_by_status"] == {}
    assert doc["server_pid"] == srv.proc.pid and doc["server_peak_rss_mib"] > 10
    assert doc["protocol"] == "chunked" and doc["server_cpu_s_per_gib"] > 0
    assert doc["left_on_server"] == 2  # finalized: the folder hand-off keeps them


async def test_a_changed_file_is_not_resumed_into_the_old_session(server_factory, tmp_path):
    srv = server_factory()
    path = media_file(tmp_path, 1024 * 1024)
    source = FileSource(path)
    async with ChunkdClient(srv.url, chunk_size=128 * 1024) as client:
        sid = (await client.create_session(source.name, source.size))["session_id"]
        await client.put_chunk(sid, 0, source, 0, 128 * 1024)
    cache = tmp_path / "cache"
    from chunkd.client.upload_command import ResumeState

    state = ResumeState(cache / "chunkd" / "uploads.json")
    state.put(state.key(srv.url, source), sid)
    # same path, size and mtime, other bytes: an in-place edit with the mtime put back
    st = path.stat()
    with open(path, "r+b") as f:
        f.seek(50_000)  # inside chunk 0, which the old session already has
        f.write(b"\xff" * 1000)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    out = await asyncio.to_thread(run_upload, srv.url, path, cache, "--chunk-size", "128KiB")
    assert out.returncode == 0, out.stderr
    assert "(resumed)" not in out.stdout
    task_id = out.stdout.strip().rsplit("task ", 1)[1]
    assert sha256(completed_file(srv.data_dir, task_id).read_bytes()) == sha256(path.read_bytes())


async def test_chunkd_bench_interrupted_leaves_no_session(server_factory):
    srv = server_factory("--durable", "off")
    proc = subprocess.Popen(
        [sys.executable, "-m", "chunkd", "bench", "--url", srv.url, "--sessions", "3",
         "--size", "2GiB", "--chunk-size", "8MiB", "--duration", "60s"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=default_sigint)
    sessions = srv.data_dir / "sessions"
    for _ in range(200):
        await asyncio.sleep(0.05)
        if len([p for p in sessions.iterdir() if not p.name.startswith(".")]) == 3:
            break
    await asyncio.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    _, err = await asyncio.to_thread(proc.communicate, timeout=60)
    assert proc.returncode == 130 and "Traceback" not in err, err
    assert [p for p in sessions.iterdir() if not p.name.startswith(".")] == []


def test_chunkd_upload_of_a_directory_is_one_line(tmp_path):
    folder = tmp_path / "folder.wav"
    folder.mkdir()
    out = run_upload("http://127.0.0.1:9", folder, tmp_path)
    assert out.returncode == 1 and "not a regular file" in out.stderr
    assert "Traceback" not in out.stderr
