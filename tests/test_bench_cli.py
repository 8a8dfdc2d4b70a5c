"""`chunkd bench --protocol tus` and the server's CPU seconds, against real chunkd servers."""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import orjson
from aiohttp import web

from chunkd.bench import process_tree, run_bench, table, tree_cpu, wav_header
from chunkd.client import GeneratedSource
from tcp_proxy import TcpProxy

MiB = 1024 * 1024


def bench(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "chunkd", "bench", *args],
                          capture_output=True, text=True, timeout=timeout)


def entries(folder: Path) -> list[Path]:
    """What a folder of the data dir holds (its hidden temp names aside)."""
    return [p for p in folder.iterdir() if not p.name.startswith(".")] if folder.is_dir() else []


async def source_sha256(size: int, seed: int) -> str:
    """The bytes ``chunkd bench`` sends for its upload number ``seed``."""
    h = hashlib.sha256()
    async for piece in GeneratedSource(size, header=wav_header(size), seed=seed).pieces(0, size):
        h.update(piece)
    return h.hexdigest()


async def test_bench_tus_against_chunkds_tus_path(server_factory):
    srv = server_factory("--durable", "off")
    out = await asyncio.to_thread(
        bench, "--protocol", "tus", "--url", f"{srv.url}/files/", "--sessions", "3",
        "--size", "8MiB", "--chunk-size", "1MiB", "--duration", "60s", "--json")
    assert out.returncode == 0, out.stderr
    doc = orjson.loads(out.stdout)
    assert doc["protocol"] == "tus" and doc["parallel"] == 1
    assert doc["completed_sessions"] == 3 and not doc["stopped_by_duration"]
    assert doc["bytes_sent"] == 3 * 8 * MiB and doc["chunks"] == 3 * 8  # one PATCH per MiB
    assert doc["chunk_latency_ms"]["p50"] > 0 and doc["errors_by_status"] == {}
    # found by itself (the URL is local), with its CPU during the load
    assert doc["server_pid"] == srv.proc.pid and doc["server_peak_rss_mib"] > 10
    assert doc["server_cpu_s"] > 0
    assert abs(doc["server_cpu_s_per_gib"] - doc["server_cpu_s"] / (24 / 1024)) < 0.01
    # chunkd hands a whole tus upload off by itself (the WhisperX fork's taskId is its task id):
    # the bench's DELETE of a handed-off upload is refused, so the three are kept, bytes intact
    assert doc["left_on_server"] == 3
    for _ in range(100):  # the hand-off runs after the last PATCH's answer
        files = list((srv.data_dir / "completed").glob("*/upload.wav"))
        if len(files) == 3:
            break
        await asyncio.sleep(0.05)
    want = {await source_sha256(8 * MiB, i) for i in range(3)}
    assert {hashlib.sha256(f.read_bytes()).hexdigest() for f in files} == want


async def test_bench_tus_deletes_the_uploads_it_leaves_unfinished(server_factory):
    srv = server_factory("--durable", "off")
    # ~2 MB/s per connection: --duration stops every upload half-way, a few PATCHes in
    proxy = await TcpProxy(int(srv.url.rsplit(":", 1)[1]), rate=2e6).start()
    try:
        out = await asyncio.to_thread(
            bench, "--protocol", "tus", "--url", f"http://127.0.0.1:{proxy.port}/files/",
            "--sessions", "3", "--size", "64MiB", "--chunk-size", "1MiB", "--duration", "2s",
            "--server-pid", str(srv.proc.pid), "--json")
    finally:
        await proxy.close()
    assert out.returncode == 1, out.stderr  # not every upload completed
    doc = orjson.loads(out.stdout)
    assert doc["stopped_by_duration"] and doc["completed_sessions"] == 0
    assert 0 < doc["bytes_sent"] < 3 * 64 * MiB and doc["chunks"] > 0
    assert doc["left_on_server"] == 0 and doc["server_pid"] == srv.proc.pid
    assert entries(srv.data_dir / "sessions") == []  # each was DELETEd (tus termination)
    assert entries(srv.data_dir / "completed") == []


async def not_tus_app(aiohttp_server):
    async def anything(request: web.Request) -> web.Response:
        return web.Response(text="<html>\n<h1>Welcome</h1>\n</html>\n", content_type="text/html")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", anything)
    return await aiohttp_server(app, host="127.0.0.1")


async def test_bench_tus_against_urls_that_are_no_tus_server(server_factory, aiohttp_server):
    srv = server_factory("--durable", "off")
    other = await not_tus_app(aiohttp_server)
    for url, hint in [(srv.url, True), (f"{srv.url}/upload/chunked/session", True),
                      (str(other.make_url("/files/")), False)]:
        out = await asyncio.to_thread(bench, "--protocol", "tus", "--url", url, "--sessions", "2",
                                      "--size", "2MiB", "--chunk-size", "1MiB")
        assert out.returncode == 1, (url, out.stdout, out.stderr)
        assert out.stderr.startswith(f"chunkd bench: error: {url} is not a tus 1.0 creation "
                                     "endpoint"), out.stderr
        assert len(out.stderr.strip().splitlines()) == 1 and "Traceback" not in out.stderr
        assert ("--tus-path" in out.stderr) is hint  # chunkd says Server: chunkd
        assert out.stdout == ""
    assert entries(srv.data_dir / "sessions") == []


def test_bench_refuses_a_bad_protocol_and_parallel_tus():
    out = bench("--protocol", "ftp", "--url", "http://127.0.0.1:9")
    assert out.returncode == 2 and "invalid choice: 'ftp'" in out.stderr
    out = bench("--protocol", "tus", "--parallel", "4", "--url", "http://127.0.0.1:9/files/")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and "--parallel" in out.stderr
    # --parallel 1 is what tus does anyway: accepted (and nothing listens on port 9)
    out = bench("--protocol", "tus", "--parallel", "1", "--url", "http://127.0.0.1:9/files/",
                "--sessions", "1", "--size", "1MiB", "--chunk-size", "1MiB", "--json")
    assert out.returncode == 1 and orjson.loads(out.stdout)["errors_by_status"] == {"0": 1}


async def test_server_cpu_is_n_a_when_the_server_is_not_local(server_factory):
    srv = server_factory("--durable", "off")
    doc = await run_bench(f"{srv.url}/files/", protocol="tus", sessions=1, parallel=1,
                          size=2 * MiB, chunk_size=MiB, duration=30, server_pid=None,
                          show_progress=False)
    assert doc["completed_sessions"] == 1 and doc["bytes_sent"] == 2 * MiB
    assert doc["server_cpu_s"] is None and doc["server_cpu_s_per_gib"] is None
    rows = dict(line.split("  ", 1) for line in table(doc).splitlines())
    assert rows["server CPU"].strip() == "n/a (server not local)"


def test_tree_cpu_counts_the_servers_children():
    # a parent that only sleeps, with a child that burns CPU
    parent = subprocess.Popen([sys.executable, "-c", (
        "import subprocess, sys, time\n"
        "subprocess.Popen([sys.executable, '-c', 'while True: pass'])\n"
        "time.sleep(60)\n")])
    try:
        for _ in range(100):
            tree = process_tree(parent.pid)
            if len(tree) == 2:
                break
            time.sleep(0.05)
        assert len(tree) == 2, tree
        before = tree_cpu(parent.pid)
        time.sleep(1.0)
        after = tree_cpu(parent.pid)
        assert before is not None and after is not None and after - before > 0.5
        with open(f"/proc/{parent.pid}/stat") as f:
            own = sum(int(x) for x in f.read().rsplit(")", 1)[1].split()[11:13])
        assert own / os.sysconf("SC_CLK_TCK") < 0.5  # the time was the child's
    finally:
        for pid in reversed(process_tree(parent.pid)):
            os.kill(pid, signal.SIGKILL)
        parent.wait(10)
    assert tree_cpu(parent.pid) is None  # gone: n/a, not 0
