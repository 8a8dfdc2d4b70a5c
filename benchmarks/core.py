#!/usr/bin/env python3
"""chunkd core benchmark: raw disk writes vs chunkd uploads, finalize latency, server memory.

Run from the repository root with the project's venv:

    .venv/bin/python benchmarks/core.py [--runs 3] [--size-gib 2] [--json out.json]

What it measures, every measurement repeated ``--runs`` times (interleaved, one full round per
run) and reported as the median. All bytes are the same everywhere: chunkd's ``GeneratedSource``
(a real WAV header, then one random 1 MiB block repeated), materialized once for the raw writes.

1. Raw write baseline: the same bytes written with plain Python to a file on the same disk as
   chunkd's data dirs, in 256 KiB writes: no sync / one fsync at the end (issue 13's baseline);
   and in 50 MiB writes with an fdatasync after every 50 MiB. Two extra rows replay chunkd's own syscall pattern in one thread (posix_fallocate,
   then 512 KiB pwrites, with and without an fdatasync per 50 MiB) to separate "Python + disk"
   from "HTTP + event loop + threads".
2. chunkd: one 2 GiB upload over loopback in 50 MiB chunks, 1 and 4 chunks in flight, --durable
   on and off, sent the way a real client sends it: ``chunkd.client.ChunkdClient`` streaming the
   ``GeneratedSource`` in 1 MiB pieces, no checksums (as peers.py does). Timed from the session
   POST to the last chunk's 200. Each configuration gets its own server process and data dir.
   The same client against a bare aiohttp handler that drops the bytes gives HTTP's ceiling here.
   The limit row: the same client, the same four configurations, against
   ``benchmarks/limit_receiver.py`` (a thread per connection, ``recv_into`` a 1 MiB buffer,
   ``pwrite`` at the chunk's offset, ``fdatasync`` per chunk when durable; written for the
   benchmark, not used by chunkd), its data dir in the same scratch folder (the same disk).
   chunkd ÷ limit receiver is reported per configuration (the issue's target: ≥ 0.9 x). Server
   CPU (user + system of the server process, all its threads, from ``/proc/<pid>/stat``; the
   client, this script, excluded) over the same span, also per GiB uploaded, for chunkd, the
   sink and the limit receiver, and chunkd's per GiB ÷ the sink's (target: ≤ 2 x).
3. Finalize latency (the POST .../finalize round trip) for 100 MiB, 1 GiB and 4 GiB sessions
   (uploaded with --durable on, the default, 4 in flight), next to the seed's design on the same
   bytes: the session's 50 MiB chunk files are written (untimed, no fsync, like its save_chunk),
   ``sync`` settles them, then its ``assemble_chunks`` is timed: ``shutil.copyfileobj`` of every
   chunk file into one file, fsync of that file, removal of the chunk folder.
4. Server memory: VmHWM (peak RSS) after 16 parallel chunks of 95 MiB, plus VmRSS sampled every
   50 ms while they stream; the same with 16 parallel chunks of 8 MiB; and the idle RSS.
5. Many sessions: ``chunkd bench`` itself, in its own process (``--sessions 200 --parallel 4
   --size 4MiB --chunk-size 1MiB --json --server-pid PID``), against a fresh --durable on server
   whose per-client limits are raised so that one address can stand for 200 clients
   (MANY_SERVER_FLAGS): 800 chunk requests at once. Recorded: completed sessions, requests
   answered with an error status (retried ones included; the 503s also on their own), chunk
   latency p50 / p95 / p99, throughput, the server's VmHWM and CPU s/GiB, as the bench reports
   them. ``--only many`` runs just this.

With ``--auth``, every chunkd row of 2. is measured a second time, right after its auth-off run
in the same round, against a server with auth on: ``--jwt-secret-file`` with a fresh random
secret in the scratch folder, and a JWT (HS256, ``sub`` + ``exp``) minted here with PyJWT and
sent as ``Authorization: Bearer`` on every request. The report then adds those rows and the
ratio auth on ÷ auth off (of the medians, and per round); without ``--auth`` nothing changes.

Everything is bounded: fixed counts, a timeout on every request, servers stopped by PID
(SIGTERM, then SIGKILL) in ``finally`` blocks, and every data dir removed after its
measurement. Only 127.0.0.1 is used. The script changes nothing outside its scratch folder.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import secrets
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import jwt

from chunkd.client import ChunkdClient, GeneratedSource

REPO = Path(__file__).resolve().parent.parent
AUDIO_HEAD = REPO / "tests" / "media" / "speech.wav"

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

CHUNK = 50 * MiB                 #: chunk size for the throughput uploads and the raw writes
CHUNKD_WRITE_BUFFER = 512 * KiB  #: chunkd.store.fs.ranges.WRITE_BUFFER (replayed, not imported)
REQUEST_TIMEOUT = 120.0          #: seconds, every HTTP request
SERVER_START_TIMEOUT = 30.0
SERVER_STOP_TIMEOUT = 15.0
RSS_SAMPLE_INTERVAL = 0.05
RSS_PARALLEL = 16
#: The many-sessions load (5.): ``chunkd bench`` with this many sessions of MANY_SIZE each, in
#: MANY_CHUNK chunks, MANY_PARALLEL in flight per session: 800 chunk requests at once.
MANY_SESSIONS = 200
MANY_PARALLEL = 4
MANY_SIZE = 4 * MiB
MANY_CHUNK = 1 * MiB
MANY_DURATION = 300.0            #: seconds, the bench's --duration (it stops itself after it)
#: The many-sessions server's limits, the per-client ones raised so that this one client address
#: can stand for 200 clients: one client may hold all 64 chunk bodies the server reads at once
#: (chunkd's defaults: 16 per client, 64 in all; the 64 stays: it bounds the server's memory), no
#: cap on connections per address (default 128) and room for 800 of them (default 1024), no
#: request rate limit (default 100/s, burst 1000) and 200 open sessions for one subject
#: (default 32). Beyond these a request still gets 503 ``server_busy`` (or 429).
MANY_SERVER_FLAGS = (
    "--max-chunks-per-client", "64",
    "--max-concurrent-chunks", "64",
    "--max-connections-per-address", "0",
    "--max-connections", "2048",
    "--rate-limit", "0",
    "--max-sessions-per-subject", str(MANY_SESSIONS),
)
CLK_TCK = os.sysconf("SC_CLK_TCK")
JWT_SUBJECT = "chunkd-bench"     #: the ``sub`` of the token the auth-on rows send
JWT_LIFETIME = 6 * 3600          #: seconds; longer than any measurement
#: The environment's credential sources are not handed to the servers: auth is exactly as asked.
AUTH_ENV = ("CHUNKD_JWT_SECRET", "CHUNKD_JWT_SECRET_FILE", "CHUNKD_JWT_AUDIENCE",
            "CHUNKD_API_KEYS_FILE")

# aiohttp warns about sending large in-memory bodies; that is exactly what we mean to do.
warnings.filterwarnings("ignore", category=ResourceWarning)


# -- helpers ---------------------------------------------------------------------------------------


def mb_per_s(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e6


def human(n: int) -> str:
    if n % GiB == 0:
        return f"{n // GiB} GiB"
    if n % MiB == 0:
        return f"{n // MiB} MiB"
    if n % KiB == 0:
        return f"{n // KiB} KiB"
    return f"{n} B"


def read_proc_status(pid: int) -> dict[str, int]:
    """VmRSS / VmHWM of ``pid`` in bytes (empty when the process is gone)."""
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    key, value = line.split(":", 1)
                    out[key] = int(value.split()[0]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return out


def read_proc_stat(pid: int) -> tuple[float, float, int]:
    """(user CPU s, system CPU s, minor page faults) of ``pid`` so far, all threads."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return float("nan"), float("nan"), 0
    # fields[0] is field 3 (state): minflt is field 10, utime 14, stime 15.
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK, int(fields[7])


def read_proc_cpu(pid: int) -> float:
    user, system, _ = read_proc_stat(pid)
    return user + system


def machine_facts(scratch: Path) -> dict[str, str]:
    def run(*cmd: str) -> str:
        try:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return "?"

    mem_total = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_total = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    cpu = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    commit = run("git", "-C", str(REPO), "rev-parse", "--short", "HEAD")
    dirty = run("git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no")
    try:
        import uvloop
        uvloop_version = uvloop.__version__
    except ImportError:
        uvloop_version = "not installed"
    return {
        "nproc": run("nproc"),
        "cpu": cpu,
        "ram": mem_total,
        "data dir": str(scratch),
        "data dir fs (stat -f -c %T)": run("stat", "-f", "-c", "%T", str(scratch)),
        "data dir device": run("df", "--output=source", str(scratch)).splitlines()[-1],
        "kernel": platform.release(),
        "python": platform.python_version(),
        "aiohttp": aiohttp.__version__,
        "uvloop": uvloop_version,
        "chunkd commit": commit + (" (+ uncommitted changes)" if dirty else ""),
    }


# -- the test data ---------------------------------------------------------------------------------


def source(size: int, seed: int = 0) -> GeneratedSource:
    """The bytes every measurement sends or writes: a real WAV header (libmagic accepts it), then
    one random 1 MiB block repeated; the same generator peers.py hands to every server."""
    return GeneratedSource(size, name="bench.wav", header=AUDIO_HEAD.read_bytes(), seed=seed)


async def source_bytes(src: GeneratedSource, offset: int, length: int) -> bytes:
    return b"".join([p async for p in src.pieces(offset, length)])


async def make_data(nbytes: int) -> memoryview:
    """The first ``nbytes`` of :func:`source`, in memory, for the raw writes."""
    src = source(nbytes)
    buf = bytearray(nbytes)
    pos = 0
    async for p in src.pieces(0, nbytes):
        buf[pos : pos + len(p)] = p
        pos += len(p)
    return memoryview(buf)


# -- raw writes ------------------------------------------------------------------------------------


def _write_all(fd: int, view: memoryview, offset: int | None = None) -> None:
    while view:
        n = os.write(fd, view) if offset is None else os.pwrite(fd, view, offset)
        view = view[n:]
        if offset is not None:
            offset += n


def raw_write(path: Path, data: memoryview, size: int, mode: str) -> float:
    """Write ``size`` bytes of ``data`` to ``path``; return seconds (open to close)."""
    t0 = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        if mode.startswith("chunkd"):
            os.posix_fallocate(fd, 0, size)
            for off in range(0, size, CHUNK):
                end = min(off + CHUNK, size)
                for p in range(off, end, CHUNKD_WRITE_BUFFER):
                    _write_all(fd, data[p : min(p + CHUNKD_WRITE_BUFFER, end)], p)
                if mode == "chunkd_pattern_fdatasync":
                    os.fdatasync(fd)
        elif mode == "fdatasync_each":
            for off in range(0, size, CHUNK):
                _write_all(fd, data[off : min(off + CHUNK, size)])
                os.fdatasync(fd)
        else:  # issue 13's baseline: the same bytes in 256 KiB pieces (then one fsync)
            for off in range(0, size, RAW_PIECE):
                _write_all(fd, data[off : min(off + RAW_PIECE, size)])
            if mode == "fsync_end":
                os.fsync(fd)
    finally:
        os.close(fd)
    elapsed = time.perf_counter() - t0
    path.unlink()
    return elapsed


def prime(scratch: Path, data: memoryview, size: int) -> None:
    """Untimed write + unlink of ``size`` bytes right before a timed measurement.

    On this VM (Firecracker), page-cache pages that were freed a while ago are handed back to
    the host; the first write that needs them again runs at ~0.4-1.3 GB/s instead of ~5 GB/s.
    Priming before *every* measurement (raw and chunkd alike) puts all of them in the same,
    warm state, so the ratios compare software, not the VM's memory reclaim.
    """
    d = Path(tempfile.mkdtemp(prefix="prime-", dir=scratch))
    try:
        raw_write(d / "prime.bin", data, size, "write")
    finally:
        shutil.rmtree(d, ignore_errors=True)


#: The plain write's piece size (issue 13: "a plain write + fsync of the same bytes in 256 KiB
#: pieces").
RAW_PIECE = 256 * 1024

RAW_MODES = {
    "write": "raw write, 256 KiB writes, no sync",
    "fsync_end": "raw write, 256 KiB writes, one fsync at end",
    "fdatasync_each": "raw write, 50 MiB writes, fdatasync per 50 MiB",
    "chunkd_pattern": "chunkd pattern: fallocate + 512 KiB pwrites, no sync",
    "chunkd_pattern_fdatasync": "chunkd pattern: fallocate + 512 KiB pwrites, fdatasync per 50 MiB",
}


# -- a minimal aiohttp sink: the loopback + aiohttp ceiling, no disk ----------------------------

SINK_SOURCE = r"""
import sys, orjson, uvloop
from aiohttp import web
sessions = {}
async def create(request):
    doc = orjson.loads(await request.read())
    sid = "00000000-0000-4000-8000-%012d" % len(sessions)
    sessions[sid] = {"chunks": 0, "bytes": 0, "pieces": 0}
    return web.json_response({"session_id": sid, "chunk_size": doc["chunk_size"],
                              "total_chunks": doc["total_chunks"]}, status=201)
async def chunk(request):
    s = sessions[request.match_info["sid"]]
    async for data in request.content.iter_any():
        s["bytes"] += len(data); s["pieces"] += 1
    s["chunks"] += 1
    return web.json_response({"ok": True})
async def status(request):
    s = sessions[request.match_info["sid"]]
    return web.json_response({"received_chunks": s["chunks"], "received_bytes": s["bytes"],
                              "pieces": s["pieces"]})
async def abort(request):
    return web.json_response({"status": "aborted"})
async def main():
    app = web.Application()
    app.add_routes([web.post("/upload/chunked/session", create),
                    web.post("/upload/chunked/{sid}/chunk", chunk),
                    web.get("/upload/chunked/{sid}/status", status),
                    web.delete("/upload/chunked/{sid}/abort", abort)])
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    print(f"sink listening on http://127.0.0.1:{port}", flush=True)
    import asyncio, signal
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await runner.cleanup()
uvloop.run(main())
"""


# -- the server ------------------------------------------------------------------------------------

LIMIT_RECEIVER = Path(__file__).resolve().parent / "limit_receiver.py"


def mint_token(secret: str, subject: str = JWT_SUBJECT, lifetime: int = JWT_LIFETIME) -> str:
    """A JWT as the main app would mint it for chunkd: HS256 with ``sub`` and ``exp``."""
    now = int(time.time())
    return jwt.encode({"sub": subject, "iat": now, "exp": now + lifetime}, secret,
                      algorithm="HS256")


class Server:
    """One ``chunkd serve`` subprocess on 127.0.0.1:0 with its own fresh data dir; with
    ``auth``, also its own JWT secret file (auth on) and a token for it in ``token``."""

    def __init__(self, scratch: Path, *, durable: bool, sink: bool = False,
                 auth: bool = False) -> None:
        if auth and sink:
            raise ValueError("the sink has no auth")
        self.scratch = scratch
        self.durable = durable
        self.sink = sink
        self.data_dir = Path(tempfile.mkdtemp(prefix="data-", dir=scratch))
        self.log = scratch / f"{self.data_dir.name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""
        if auth:
            self.secret = secrets.token_urlsafe(48)  # 64 characters; chunkd wants >= 32 bytes
            self.secret_file = scratch / f"{self.data_dir.name}.jwt-secret"
            self.token = mint_token(self.secret)

    #: What the first line of the server's output names, and where its endpoint is below that.
    name = "chunkd"
    url_suffix = ""
    #: With auth on: the secret's file (passed as --jwt-secret-file) and a bearer token.
    secret: str | None = None
    secret_file: Path | None = None
    token: str | None = None

    @property
    def headers(self) -> dict[str, str]:
        """What a request to this server carries besides its own headers (the bearer token)."""
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def command(self) -> tuple[list[str], Path]:
        """The server's command line and working folder (peers.py overrides this)."""
        cmd = [sys.executable, "-c", SINK_SOURCE] if self.sink else [
            sys.executable, "-m", "chunkd", "serve",
            "--host", "127.0.0.1", "--port", "0",
            "--data-dir", str(self.data_dir),
            "--durable", "on" if self.durable else "off",
            "--shutdown-timeout", "5s",
        ]
        if self.secret_file is not None:
            cmd += ["--jwt-secret-file", str(self.secret_file)]
        return cmd, REPO

    def start(self) -> Server:
        cmd, cwd = self.command()
        if self.secret_file is not None and self.secret is not None:
            fd = os.open(self.secret_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(self.secret + "\n")
        env = {k: v for k, v in os.environ.items() if k not in AUTH_ENV}
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                cmd, cwd=cwd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,  # a Ctrl-C here reaches us, and we stop it by PID
                env=env,
            )
        deadline = time.monotonic() + SERVER_START_TIMEOUT
        while time.monotonic() < deadline:
            first = self.log.read_text(errors="replace").split("\n", 1)
            if len(first) == 2 and " listening on " in first[0]:
                self.url = first[0].rsplit(" ", 1)[1] + self.url_suffix
                if not self.url.startswith("http://127.0.0.1:"):
                    raise RuntimeError(f"server listens somewhere unexpected: {first[0]}")
                return self
            if self.proc.poll() is not None:
                break
            time.sleep(0.02)
        raise RuntimeError(f"{self.name} did not start:\n"
                           f"{self.log.read_text(errors='replace')[-2000:]}")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self) -> None:
        """SIGTERM by PID, SIGKILL if it lingers; then remove the data dir and the log."""
        try:
            if self.proc is not None and self.proc.poll() is None:
                os.kill(self.proc.pid, signal.SIGTERM)
                try:
                    self.proc.wait(SERVER_STOP_TIMEOUT)
                except subprocess.TimeoutExpired:
                    os.kill(self.proc.pid, signal.SIGKILL)
                    self.proc.wait(5)
        finally:
            shutil.rmtree(self.data_dir, ignore_errors=True)
            with contextlib.suppress(FileNotFoundError):
                self.log.unlink()
            if self.secret_file is not None:
                with contextlib.suppress(FileNotFoundError):
                    self.secret_file.unlink()

    def __enter__(self) -> Server:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()


class LimitServer(Server):
    """``benchmarks/limit_receiver.py`` on 127.0.0.1:0, its data dir like chunkd's (same disk)."""

    name = "limit receiver"

    def command(self) -> tuple[list[str], Path]:
        return [sys.executable, str(LIMIT_RECEIVER), "--data-dir", str(self.data_dir),
                "--durable", "on" if self.durable else "off"], REPO


# -- the client ------------------------------------------------------------------------------------


def client_session() -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0),
        timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT, sock_connect=30),
    )


async def expect(resp: aiohttp.ClientResponse, status: int) -> dict[str, Any]:
    body = await resp.read()
    if resp.status != status:
        raise RuntimeError(
            f"{resp.method} {resp.url.path} -> {resp.status} (wanted {status}): {body[:500]!r}"
        )
    return json.loads(body) if body else {}


def client_for(http: aiohttp.ClientSession, server: Server, *, chunk_size: int, parallel: int
               ) -> ChunkdClient:
    """chunkd's own client, as a user runs it: 1 MiB pieces streamed per chunk, ``parallel``
    chunks in flight; no checksums (GeneratedSource has none) and no retries (a retry would be
    an error here, not something to time)."""
    return ChunkdClient(server.url, parallel=parallel, chunk_size=chunk_size, retries=1,
                        checksum=False, timeout=REQUEST_TIMEOUT, session=http,
                        token=server.token)


@dataclass
class Upload:
    session_id: str
    seconds: float          # session POST .. last chunk acknowledged
    server_cpu: float       # server CPU seconds over the same span
    total_size: int
    status: dict[str, Any]
    client_cpu: float       # this process's CPU seconds over the same span
    server_sys: float       # the system (kernel) part of server_cpu
    server_minflt: int      # server minor page faults over the same span
    latencies: list[float] = field(default_factory=list)  # seconds per chunk request


async def upload(
    http: aiohttp.ClientSession, server: Server, *,
    total_size: int, chunk_size: int, parallel: int, seed: int = 0,
) -> Upload:
    """Create a session and send every chunk through ChunkdClient, ``parallel`` at a time;
    verify it is complete. Not finalized."""
    client = client_for(http, server, chunk_size=chunk_size, parallel=parallel)
    src = source(total_size, seed)
    u0, s0, f0 = read_proc_stat(server.pid)
    ccpu0 = time.process_time()
    t0 = time.perf_counter()
    res = await client.upload(src, finalize=False)
    elapsed = time.perf_counter() - t0
    u1, s1, f1 = read_proc_stat(server.pid)
    cpu = (u1 + s1) - (u0 + s0)
    ccpu = time.process_time() - ccpu0
    if res.retries:
        raise RuntimeError(f"upload needed {res.retries} retries")
    doc = await client.status(res.session_id)
    total_chunks = math.ceil(total_size / chunk_size)
    if doc["received_chunks"] != total_chunks or doc["received_bytes"] != total_size:
        raise RuntimeError(f"upload incomplete after all chunks were acknowledged: {doc}")
    return Upload(res.session_id, elapsed, cpu, total_size, doc, ccpu, s1 - s0, f1 - f0,
                  res.chunk_latencies)


async def abort(http: aiohttp.ClientSession, server: Server, sid: str) -> None:
    async with http.delete(f"{server.url}/upload/chunked/{sid}/abort",
                           headers=server.headers) as resp:
        await expect(resp, 200)


async def check_auth(http: aiohttp.ClientSession, server: Server) -> None:
    """The auth-on server really has auth on (401 without the token) and takes the token (a
    made-up session is then 404): the auth rows measure what they say."""
    url = f"{server.url}/upload/chunked/00000000-0000-4000-8000-000000000000/status"
    async with http.get(url) as resp:
        await resp.read()
        if resp.status != 401:
            raise RuntimeError(f"auth is not on: GET without a token -> {resp.status}")
    async with http.get(url, headers=server.headers) as resp:
        await resp.read()
        if resp.status != 404:
            raise RuntimeError(f"the minted token was not accepted: -> {resp.status}")


class RssSampler:
    """Samples VmRSS of a PID every 50 ms in a thread (the event loop may be busy sending)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            rss = read_proc_status(self.pid).get("VmRSS")
            if rss is not None:
                self.samples.append(rss)
            self._stop.wait(RSS_SAMPLE_INTERVAL)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


# -- measurements ----------------------------------------------------------------------------------


@dataclass
class Results:
    rows: dict[str, list[float]] = field(default_factory=dict)
    units: dict[str, str] = field(default_factory=dict)

    def add(self, key: str, value: float, unit: str) -> None:
        self.rows.setdefault(key, []).append(value)
        self.units[key] = unit

    def median(self, key: str) -> float:
        return statistics.median(self.rows[key])


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def measure_raw(res: Results, scratch: Path, data: memoryview, size: int) -> None:
    raw_dir = Path(tempfile.mkdtemp(prefix="raw-", dir=scratch))
    try:
        for mode, label in RAW_MODES.items():
            prime(scratch, data, size)
            seconds = raw_write(raw_dir / "raw.bin", data, size, mode)
            res.add(f"raw:{mode}", mb_per_s(size, seconds), "MB/s")
            say(f"  {label}: {seconds:.2f} s, {mb_per_s(size, seconds):.0f} MB/s")
    finally:
        shutil.rmtree(raw_dir, ignore_errors=True)


def record_upload(res: Results, key: str, up: Upload, extra: str = "") -> None:
    """One throughput row (chunkd, the sink or the limit receiver): MB/s, server CPU (also per
    GiB uploaded) and its kernel part, client CPU, minor faults, chunk p50."""
    res.add(key, mb_per_s(up.total_size, up.seconds), "MB/s")
    res.add(key + ":server_cpu", up.server_cpu, "CPU s")
    res.add(key + ":server_cpu_gib", up.server_cpu / (up.total_size / GiB), "CPU s")
    res.add(key + ":client_cpu", up.client_cpu, "CPU s")
    res.add(key + ":server_sys", up.server_sys, "CPU s")
    res.add(key + ":server_minflt", up.server_minflt, "faults")
    res.add(key + ":p50", statistics.median(up.latencies) * 1000, "ms")
    say(f"  {key}: {up.seconds:.2f} s, {mb_per_s(up.total_size, up.seconds):.0f} MB/s, "
        f"server CPU {up.server_cpu:.2f} s (sys {up.server_sys:.2f}, "
        f"{up.server_cpu / (up.total_size / GiB):.2f} s/GiB), {up.server_minflt} minor faults, "
        f"client CPU {up.client_cpu:.2f} s{extra}")


async def measure_sink(res: Results, scratch: Path, data: memoryview, size: int) -> None:
    """The same upload into a bare aiohttp handler that drops the bytes: HTTP's ceiling here."""
    for parallel in (1, 4):
        key = f"sink:parallel={parallel}"
        prime(scratch, data, size)
        with Server(scratch, durable=False, sink=True) as server:
            async with client_session() as http:
                up = await upload(http, server, total_size=size, chunk_size=CHUNK,
                                  parallel=parallel)
        res.add(key + ":read_size", size / up.status["pieces"] / KiB, "KiB")
        record_upload(res, key, up, f", avg iter_any piece "
                      f"{size / up.status['pieces'] / KiB:.0f} KiB")


def limit_key(durable: bool, parallel: int) -> str:
    return f"limit:durable={'on' if durable else 'off'}:parallel={parallel}"


async def measure_limit(res: Results, scratch: Path, data: memoryview, size: int) -> None:
    """The limit row: the same upload into ``limit_receiver.py`` (recv_into + pwrite, and
    fdatasync per chunk when durable), the same four configurations as chunkd's."""
    for durable in (True, False):
        for parallel in (1, 4):
            prime(scratch, data, size)
            with LimitServer(scratch, durable=durable) as server:
                async with client_session() as http:
                    up = await upload(http, server, total_size=size, chunk_size=CHUNK,
                                      parallel=parallel)
                    await abort(http, server, up.session_id)
            record_upload(res, limit_key(durable, parallel), up)


def chunkd_key(durable: bool, parallel: int, auth: bool = False) -> str:
    """The row of one chunkd throughput measurement; auth-on rows have their own prefix."""
    return (f"{'chunkd-jwt' if auth else 'chunkd'}:durable={'on' if durable else 'off'}:"
            f"parallel={parallel}")


AUTH_LABEL = "auth on (JWT)"


async def measure_chunkd(res: Results, scratch: Path, data: memoryview, size: int,
                         auth: bool = False) -> None:
    """The four chunkd rows; with ``auth`` each one again, right after, with auth on."""
    for durable in (True, False):
        for parallel in (1, 4):
            for with_auth in (False, True) if auth else (False,):
                await _measure_chunkd_one(res, scratch, data, size, durable, parallel, with_auth)


async def _measure_chunkd_one(res: Results, scratch: Path, data: memoryview, size: int,
                              durable: bool, parallel: int, auth: bool) -> None:
    key = chunkd_key(durable, parallel, auth)
    prime(scratch, data, size)
    with Server(scratch, durable=durable, auth=auth) as server:
        async with client_session() as http:
            if auth:
                await check_auth(http, server)
            up = await upload(http, server, total_size=size, chunk_size=CHUNK,
                              parallel=parallel)
            await abort(http, server, up.session_id)
    record_upload(res, key, up)
    if auth:  # the auth-off row of this round was measured just before
        off = res.rows[chunkd_key(durable, parallel)][-1]
        ratio = res.rows[key][-1] / off
        res.add(key + ":vs_off", ratio, "x")
        say(f"  {key}: auth on ÷ off this round {ratio:.3f} x")


def seed_assemble(session_dir: Path, total_chunks: int, output_path: Path) -> None:
    """The seed's ``FileService.assemble_chunks`` (see the issue's research notes), then the
    fsync that makes its result durable: what its finalize did before handing the file on."""
    with open(output_path, "wb") as output:
        for i in range(total_chunks):
            chunk_path = session_dir / f"chunk_{i:04d}"
            with open(chunk_path, "rb") as chunk:
                shutil.copyfileobj(chunk, output)
        output.flush()
        os.fsync(output.fileno())
    shutil.rmtree(session_dir)


async def measure_seed(res: Results, scratch: Path, total: int) -> None:
    """The seed's design on the same bytes: chunk files written (untimed, like its save_chunk:
    open, write, close, no fsync; ``sync`` then settles them, as a real upload would have had
    time to), then concatenation + fsync + removal of the chunk files, timed."""
    work = Path(tempfile.mkdtemp(prefix="seed-", dir=scratch))
    try:
        session_dir = work / "chunked" / "session"
        session_dir.mkdir(parents=True)
        src = source(total)
        total_chunks = math.ceil(total / CHUNK)
        for i in range(total_chunks):
            body = await source_bytes(src, i * CHUNK, min(CHUNK, total - i * CHUNK))
            with open(session_dir / f"chunk_{i:04d}", "wb") as f:
                f.write(body)
            del body
        os.sync()
        t0 = time.perf_counter()
        await asyncio.to_thread(seed_assemble, session_dir, total_chunks, work / "upload.wav")
        seconds = time.perf_counter() - t0
        if (work / "upload.wav").stat().st_size != total:
            raise RuntimeError("seed assembly produced the wrong size")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    res.add(f"seed-finalize:{human(total)}", seconds * 1000, "ms")
    say(f"  seed design (concatenate {total_chunks} chunk files + fsync) {human(total)}: "
        f"{seconds * 1000:.1f} ms")


async def settle_disk() -> None:
    """The data dir's file system is mounted with `discard`: deleting the previous measurement's
    gigabytes queues TRIMs that slow the next journal commits (every fsync) for a few seconds.
    Let that pass before a measurement whose fsyncs are what it times."""
    await asyncio.to_thread(os.sync)
    await asyncio.sleep(3)


async def measure_finalize(res: Results, scratch: Path, sizes: list[int]) -> None:
    for total in sizes:
        await settle_disk()  # or finalize's fsyncs measure the previous measurement's TRIMs
        with Server(scratch, durable=True) as server:
            async with client_session() as http:
                up = await upload(http, server, total_size=total, chunk_size=CHUNK, parallel=4)
                # Same footing as the seed's timing below: the disk has settled (no writeback
                # of earlier measurements is still queued in front of finalize's few fsyncs).
                await asyncio.to_thread(os.sync)
                await asyncio.sleep(0.5)
                t0 = time.perf_counter()
                async with http.post(
                    f"{server.url}/upload/chunked/{up.session_id}/finalize",
                    headers=server.headers,
                ) as resp:
                    doc = await expect(resp, 200)
                seconds = time.perf_counter() - t0
                server_ms = [line for line in server.log.read_text(errors="replace").splitlines()
                             if "finalize " in line and " in " in line]
                if server_ms:
                    say(f"    server side: {server_ms[-1].rsplit(' in ', 1)[1]}")
                if doc.get("status") != "processing":
                    raise RuntimeError(f"unexpected finalize answer: {doc}")
        key = f"finalize:{human(total)}"
        res.add(key, seconds * 1000, "ms")
        res.add(f"upload-before-finalize:{human(total)}", mb_per_s(total, up.seconds), "MB/s")
        say(f"  finalize {human(total)}: {seconds * 1000:.1f} ms "
            f"(upload {mb_per_s(total, up.seconds):.0f} MB/s)")
        await measure_seed(res, scratch, total)


async def measure_rss(res: Results, scratch: Path, chunk_sizes: list[int]) -> None:
    for chunk_size in chunk_sizes:
        tag = human(chunk_size)
        with Server(scratch, durable=True) as server:
            await asyncio.sleep(0.5)  # let start-up settle before the idle reading
            idle = read_proc_status(server.pid)
            async with client_session() as http:
                with RssSampler(server.pid) as sampler:
                    up = await upload(http, server, total_size=RSS_PARALLEL * chunk_size,
                                      chunk_size=chunk_size, parallel=RSS_PARALLEL)
                after = read_proc_status(server.pid)
                await abort(http, server, up.session_id)
        res.add(f"rss:idle:{tag}-server", idle["VmRSS"] / MiB, "MiB")
        res.add(f"rss:hwm-before:{tag}", idle["VmHWM"] / MiB, "MiB")
        res.add(f"rss:hwm-after:{tag}", after["VmHWM"] / MiB, "MiB")
        res.add(f"rss:sampled-max:{tag}", max(sampler.samples) / MiB, "MiB")
        res.add(f"rss:after:{tag}", after["VmRSS"] / MiB, "MiB")
        res.add(f"rss:upload:{tag}", mb_per_s(up.total_size, up.seconds), "MB/s")
        say(f"  {RSS_PARALLEL} x {tag} in parallel: idle RSS {idle['VmRSS'] / MiB:.1f} MiB, "
            f"VmHWM {after['VmHWM'] / MiB:.1f} MiB, sampled max VmRSS "
            f"{max(sampler.samples) / MiB:.1f} MiB ({len(sampler.samples)} samples), "
            f"RSS after {after['VmRSS'] / MiB:.1f} MiB")


class ManyServer(Server):
    """``chunkd serve`` (--durable on) with MANY_SERVER_FLAGS: one address standing for 200."""

    name = "chunkd (many sessions)"

    def command(self) -> tuple[list[str], Path]:
        cmd, cwd = super().command()
        return [*cmd, *MANY_SERVER_FLAGS], cwd


def many_bench_args(url: str, pid: str) -> list[str]:
    """``chunkd bench``'s arguments for the load of 5., against ``url`` (server ``pid``)."""
    return ["--url", url, "--sessions", str(MANY_SESSIONS), "--parallel", str(MANY_PARALLEL),
            "--size", f"{MANY_SIZE // MiB}MiB", "--chunk-size", f"{MANY_CHUNK // MiB}MiB",
            "--duration", f"{MANY_DURATION:.0f}s", "--server-pid", pid, "--json"]


def add_counts(res: Results, prefix: str, counts: dict[str, int], unit: str,
               rounds: int) -> None:
    """One row per key of ``counts`` (``prefix`` + key), every row one value per round (this is
    round ``rounds + 1``): a key first seen now gets 0 for the earlier rounds, one seen before
    but not now gets 0 for this one."""
    seen = {k[len(prefix):] for k in res.rows if k.startswith(prefix)}
    for key in sorted(seen | set(counts)):
        if key not in seen:
            res.rows[prefix + key] = [0.0] * rounds
        res.add(prefix + key, counts.get(key, 0), unit)


def or_nan(value: float | None) -> float:
    """A server figure ``chunkd bench`` could not read (None) as NaN (n/a in the report)."""
    return math.nan if value is None else value


async def measure_many(res: Results, scratch: Path) -> None:
    """5.: MANY_SESSIONS concurrent sessions x MANY_PARALLEL chunks in flight each, sent by
    ``chunkd bench`` (its own process: the load is not on this script's loop) to a fresh
    --durable on server with MANY_SERVER_FLAGS; what ``chunkd bench --json`` reports."""
    await settle_disk()
    with ManyServer(scratch, durable=True) as server:
        cmd = [sys.executable, "-m", "chunkd", "bench", *many_bench_args(server.url,
                                                                          str(server.pid))]
        c0 = os.times()
        proc = await asyncio.to_thread(
            subprocess.run, cmd, cwd=REPO, stdin=subprocess.DEVNULL, capture_output=True,
            text=True, timeout=MANY_DURATION + 120)
        c1 = os.times()
        try:
            doc = json.loads(proc.stdout)
        except ValueError:
            raise RuntimeError(f"chunkd bench gave no JSON (exit {proc.returncode}):\n"
                               f"{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}") from None
    errors = {status: int(n) for status, n in doc["errors_by_status"].items()}
    lat = doc["chunk_latency_ms"]
    add_counts(res, "many:status=", errors, "requests", len(res.rows.get("many:completed", [])))
    res.add("many:completed", doc["completed_sessions"], "sessions")
    res.add("many:errors", sum(errors.values()), "requests")
    res.add("many:errors_503", errors.get("503", 0), "requests")
    for q in ("p50", "p95", "p99"):
        res.add(f"many:{q}", lat[q], "ms")
    res.add("many:mbps", doc["throughput_mb_s"], "MB/s")
    res.add("many:hwm", or_nan(doc["server_peak_rss_mib"]), "MiB")
    res.add("many:server_cpu_gib", or_nan(doc["server_cpu_s_per_gib"]), "CPU s")
    res.add("many:client_cpu", (c1.children_user + c1.children_system)
            - (c0.children_user + c0.children_system), "CPU s")
    failures = "; ".join(doc["failures"][:3])
    say(f"  {doc['sessions']} sessions x {human(MANY_SIZE)}, {human(MANY_CHUNK)} chunks, "
        f"{MANY_PARALLEL} in flight each: {doc['completed_sessions']}/{doc['sessions']} "
        f"completed{' (stopped by --duration)' if doc['stopped_by_duration'] else ''}, "
        f"{doc['throughput_mb_s']:.0f} MB/s, chunk p50 {lat['p50']:.1f} / p95 {lat['p95']:.1f} "
        f"/ p99 {lat['p99']:.1f} ms, errors {errors or 'none'}, server VmHWM "
        f"{doc['server_peak_rss_mib']} MiB, server CPU {doc['server_cpu_s_per_gib']} s/GiB"
        + (f"; failures: {failures}" if failures else ""))


# -- report ----------------------------------------------------------------------------------------


def fmt(value: float, unit: str) -> str:
    if unit == "ms":
        return f"{value:.1f}"
    if unit == "KiB":
        return f"{value:.0f}"
    if unit in ("MiB", "CPU s"):
        return f"{value:.2f}" if unit == "CPU s" else f"{value:.1f}"
    if unit == "x":
        return f"{value:.3f}"
    return f"{value:.0f}"


def auth_rows(res: Results) -> list[tuple[str, str]]:
    """(auth-off key, auth-on key) of every chunkd row measured both ways, in table order."""
    return [(chunkd_key(d, p), chunkd_key(d, p, auth=True))
            for d in (True, False) for p in (1, 4) if chunkd_key(d, p, auth=True) in res.rows]


def auth_summary(res: Results) -> list[str]:
    """One line per row measured with auth on: auth on ÷ auth off, of the medians and per round
    (each auth-on run right after its auth-off run)."""
    out = []
    for off, on in auth_rows(res):
        _, durable, parallel = off.split(":")
        per_run = ", ".join(fmt(v, "x") for v in res.rows[on + ":vs_off"])
        out.append(f"{durable.replace('=', ' ')}, {parallel.split('=')[1]} in flight: "
                   f"{res.median(on) / res.median(off):.3f} x ({res.median(on):.0f} ÷ "
                   f"{res.median(off):.0f} MB/s; per round [{per_run}])")
    return out


def sink_cpu_gib(res: Results, parallel: int) -> float:
    """The bare sink's server CPU s/GiB at ``parallel`` in flight (NaN when not measured)."""
    key = f"sink:parallel={parallel}:server_cpu_gib"
    return res.median(key) if key in res.rows else math.nan


def limit_summary(res: Results) -> list[str]:
    """Per chunkd configuration: chunkd ÷ limit receiver (of the medians and per round: both
    measured in every round) and chunkd's server CPU s/GiB ÷ the sink's."""
    out = []
    for durable in (True, False):
        for parallel in (1, 4):
            c, lim = chunkd_key(durable, parallel), limit_key(durable, parallel)
            if c not in res.rows or lim not in res.rows:
                continue
            per_run = ", ".join(f"{a / b:.2f}" for a, b in zip(res.rows[c], res.rows[lim],
                                                                 strict=True))
            cpu, lim_cpu = res.median(c + ":server_cpu_gib"), res.median(lim + ":server_cpu_gib")
            out.append(f"--durable {'on' if durable else 'off'}, {parallel} in flight: chunkd ÷ "
                       f"limit receiver {res.median(c) / res.median(lim):.2f} x "
                       f"({res.median(c):.0f} ÷ {res.median(lim):.0f} MB/s; per round "
                       f"[{per_run}]); server CPU {cpu:.2f} s/GiB (limit receiver "
                       f"{lim_cpu:.2f}, sink {sink_cpu_gib(res, parallel):.2f}): chunkd ÷ sink "
                       f"{cpu / sink_cpu_gib(res, parallel):.2f} x")
    return out


MANY_TITLE = (f"many sessions: {MANY_SESSIONS} concurrent sessions x {MANY_PARALLEL} chunks in "
              f"flight each, {human(MANY_SIZE)} each in {human(MANY_CHUNK)} chunks")


def many_statuses(res: Results) -> str:
    """The error statuses of the many-sessions load, each with its count per round."""
    prefix = "many:status="
    return "; ".join(f"{'no answer' if k[len(prefix):] == '0' else k[len(prefix):]}: "
                     f"[{', '.join(f'{v:.0f}' for v in runs)}]"
                     for k, runs in res.rows.items() if k.startswith(prefix)) or "none"


def many_summary(res: Results) -> list[str]:
    """The many-sessions load in one line (for stderr; the report has a table)."""
    if "many:completed" not in res.rows:
        return []

    def per_run(key: str) -> str:
        return ", ".join(fmt(v, res.units[key]) for v in res.rows[key])

    return [f"completed {res.median('many:completed'):.0f}/{MANY_SESSIONS} "
            f"[{per_run('many:completed')}]; error statuses {many_statuses(res)} "
            f"(in all {res.median('many:errors'):.0f} [{per_run('many:errors')}], of them 503 "
            f"[{per_run('many:errors_503')}]); chunk p50 / p95 / p99 "
            f"{res.median('many:p50'):.1f} / {res.median('many:p95'):.1f} / "
            f"{res.median('many:p99'):.1f} ms [p99 {per_run('many:p99')}]; "
            f"{res.median('many:mbps'):.0f} MB/s; server VmHWM {res.median('many:hwm'):.1f} MiB, "
            f"CPU {res.median('many:server_cpu_gib'):.2f} s/GiB"]


def report(res: Results, facts: dict[str, str], command: str, size: int, runs: int) -> str:
    out: list[str] = []
    out.append("## chunkd core benchmark\n")
    out.append(f"Command: `{command}`  ")
    out.append(f"Runs: {runs} (table shows the median; individual runs in brackets)  ")
    out.append("MB/s = 10^6 bytes per second\n")
    out.append("| machine | |")
    out.append("|---|---|")
    for k, v in facts.items():
        out.append(f"| {k} | {v} |")
    out.append("")

    def row(label: str, key: str, extra: str = "") -> str:
        unit = res.units[key]
        runs_text = ", ".join(fmt(v, unit) for v in res.rows[key])
        return f"| {label} | {fmt(res.median(key), unit)} {unit} | [{runs_text}] | {extra} |"

    out.append(f"### 1. Raw write of {human(size)} (same disk as the data dirs)\n")
    out.append("| measurement | median | runs | |")
    out.append("|---|---|---|---|")
    for mode, label in RAW_MODES.items():
        out.append(row(label, f"raw:{mode}"))
    out.append("")

    out.append(f"### 2. chunkd: one {human(size)} upload over loopback, {human(CHUNK)} chunks\n")
    out.append("Sent by `chunkd.client.ChunkdClient` (1 MiB pieces streamed per chunk, no "
               "checksums) from this script, on the same cores as the server.\n")
    out.append("| durable | in flight | median | runs | vs raw baseline | chunkd ÷ limit receiver "
               "| chunk p50 | server CPU s (of it kernel) / client CPU s | server CPU s/GiB "
               "| CPU/GiB ÷ sink's | server minor faults |")
    out.append("|---|---|---|---|---|---|---|---|---|---|---|")

    def line(label: str, parallel: int, k: str, vs_text: str, limit: str = "") -> str:
        """One row of the table; the CPU cells from ``k``'s own CPU readings."""
        runs_text = ", ".join(fmt(v, "MB/s") for v in res.rows[k])
        p50 = f"{res.median(k + ':p50'):.0f} ms" if k + ":p50" in res.rows else ""
        gib = res.median(k + ":server_cpu_gib") if k + ":server_cpu_gib" in res.rows else math.nan
        return (f"| {label} | {parallel} | {res.median(k):.0f} MB/s | [{runs_text}] | {vs_text} | "
                f"{limit} | {p50} | {res.median(k + ':server_cpu'):.2f} "
                f"({res.median(k + ':server_sys'):.2f}) / {res.median(k + ':client_cpu'):.2f} | "
                f"{gib:.2f} | {gib / sink_cpu_gib(res, parallel):.2f} x | "
                f"{res.median(k + ':server_minflt'):.0f} |")

    def vs(k: str, bases: list[tuple[str, str]]) -> str:
        return "; ".join(f"{res.median(k) / res.median(b):.2f} x {b_label} "
                         f"({res.median(b):.0f} MB/s)" for b, b_label in bases)

    for durable in ("on", "off"):
        bases = ([("raw:fsync_end", "write+fsync"), ("raw:fdatasync_each", "write+fdatasync/50MiB")]
                 if durable == "on" else [("raw:write", "plain write")])
        for parallel in (1, 4):
            key = chunkd_key(durable == "on", parallel)
            jwt_key = chunkd_key(durable == "on", parallel, auth=True)
            lim = limit_key(durable == "on", parallel)
            # the auth-on row (only when measured) right below its auth-off row
            for k, label, extra in [(key, durable, [])] + (
                    [(jwt_key, f"{durable}, {AUTH_LABEL}", [(key, "auth off")])]
                    if jwt_key in res.rows else []):
                limit = (f"{res.median(k) / res.median(lim):.2f} x ({res.median(lim):.0f} MB/s)"
                         if lim in res.rows else "")
                out.append(line(label, parallel, k, vs(k, extra + bases), limit))
        for parallel in (1, 4):
            lim = limit_key(durable == "on", parallel)
            if lim in res.rows:
                out.append(line(f"(limit receiver) {durable}", parallel, lim, vs(lim, bases)))
    for parallel in (1, 4):
        key = f"sink:parallel={parallel}"
        out.append(line("(bare aiohttp sink, no disk)", parallel, key,
                        f"{res.median(key) / res.median('raw:write'):.2f} x plain write; avg "
                        f"iter_any piece {res.median(key + ':read_size'):.0f} KiB"))
    out.append("")
    if any(limit_key(d, p) in res.rows for d in (True, False) for p in (1, 4)):
        out.append("*Limit receiver*: `benchmarks/limit_receiver.py`, written for this benchmark "
                   "and not used by chunkd: a thread per connection on blocking sockets, each "
                   "chunk's body `recv_into` one reusable 1 MiB buffer and `pwrite` at "
                   "`index × chunk size` into one file per session (its data dir beside "
                   "chunkd's: the same disk), `fdatasync` per chunk when durable; no markers, "
                   "checks or folder fsyncs. Same client, same bytes, same rounds. "
                   "*Server CPU*: user + system seconds of the server process (all its threads, "
                   "`/proc/<pid>/stat`; the client excluded) from the session POST to the last "
                   "chunk's answer; per GiB uploaded, and ÷ the bare sink's at the same chunks "
                   "in flight. Against the issue's targets (chunkd ≥ 0.9 x the limit receiver; "
                   "server CPU per GiB ≤ 2 x the sink's):\n")
        out.extend(f"- {text}" for text in limit_summary(res))
        out.append("")
    if auth_rows(res):
        out.append(f"Rows marked *{AUTH_LABEL}*: the same upload, measured right after the "
                   "auth-off row in each round, against a server started with "
                   "`--jwt-secret-file` (a fresh random secret); every request carries "
                   "`Authorization: Bearer` with an HS256 JWT (`sub`, `exp`) minted by PyJWT, "
                   "checked by the server each time. Auth on ÷ auth off:\n")
        out.extend(f"- {line}" for line in auth_summary(res))
        out.append("")

    out.append("### 3. Finalize: chunkd vs the seed's design on the same bytes\n")
    out.append("chunkd: the `POST /finalize` round trip after an upload with --durable on (its "
               "default: the bytes are already on disk), 4 in flight. Seed: its "
               "`assemble_chunks` (`shutil.copyfileobj` of every 50 MiB chunk file into one "
               "file, then removing the chunk folder) plus an fsync of the result, timed on "
               "chunk files written beforehand and settled with `sync`.\n")
    out.append("| session | chunkd finalize | runs | seed: concatenate + fsync | runs | "
               "seed ÷ chunkd | |")
    out.append("|---|---|---|---|---|---|---|")
    tags = [k.split(":", 1)[1] for k in res.rows if k.startswith("finalize:")]
    for tag in tags:
        key, seed = f"finalize:{tag}", f"seed-finalize:{tag}"
        up = res.median(f"upload-before-finalize:{tag}")
        runs_c = ", ".join(fmt(v, "ms") for v in res.rows[key])
        if seed in res.rows:
            runs_s = ", ".join(fmt(v, "ms") for v in res.rows[seed])
            seed_text = (f"{fmt(res.median(seed), 'ms')} ms | [{runs_s}] | "
                         f"{res.median(seed) / res.median(key):.0f} x")
        else:
            seed_text = " | | "
        out.append(f"| {tag} | {fmt(res.median(key), 'ms')} ms | [{runs_c}] | {seed_text} | "
                   f"upload was {up:.0f} MB/s |")
    if len(tags) > 1:
        lo, hi = tags[0], tags[-1]
        seed_ratio = (f"; seed {res.median(f'seed-finalize:{hi}') / res.median(f'seed-finalize:{lo}'):.1f} x"
                      if f"seed-finalize:{hi}" in res.rows else "")
        out.append(f"\nRatio {hi} / {lo}: chunkd "
                   f"{res.median(f'finalize:{hi}') / res.median(f'finalize:{lo}'):.2f} x{seed_ratio}.")
    out.append("")

    out.append(f"### 4. Server memory, {RSS_PARALLEL} chunks in parallel (--durable on)\n")
    out.append("| measurement | median | runs | |")
    out.append("|---|---|---|---|")
    tags = [k.split(":", 2)[2] for k in res.rows if k.startswith("rss:hwm-after:")]
    for tag in tags:
        out.append(row(f"idle VmRSS (fresh server, before {tag} test)", f"rss:idle:{tag}-server"))
        out.append(row(f"VmHWM at idle (start-up peak), {tag} test", f"rss:hwm-before:{tag}"))
        out.append(row(f"VmHWM after {RSS_PARALLEL} x {tag}", f"rss:hwm-after:{tag}",
                       f"upload {res.median(f'rss:upload:{tag}'):.0f} MB/s"))
        out.append(row(f"max VmRSS sampled every 50 ms, {RSS_PARALLEL} x {tag}",
                       f"rss:sampled-max:{tag}"))
        out.append(row(f"VmRSS right after {RSS_PARALLEL} x {tag}", f"rss:after:{tag}"))
    out.append("")

    if "many:completed" in res.rows:
        out.append(f"### 5. {MANY_TITLE[0].upper()}{MANY_TITLE[1:]} (--durable on)\n")
        shown = shlex.join(["chunkd", "bench", *many_bench_args("URL", "PID")])
        out.append(f"Sent by `chunkd bench` in its own process: `{shown}`, "
                   f"{MANY_SESSIONS * MANY_PARALLEL} chunk requests at once from one address, "
                   f"against a fresh server started with `{' '.join(MANY_SERVER_FLAGS)}` (so "
                   f"that one address stands for {MANY_SESSIONS} clients; chunkd's defaults "
                   "answer 503 `server_busy` beyond 16 bodies per client and 128 connections "
                   "per address, and 429 beyond 100 requests/s and 32 open sessions per "
                   "client; the 64 bodies read at once in all are its default). Errors: every "
                   "request answered with a status that is not a success (0: no answer), "
                   "retried ones included (`chunkd bench` retries a 503 up to 2 times).\n")
        out.append("| measurement | median | runs | |")
        out.append("|---|---|---|---|")
        out.append(row("completed sessions", "many:completed", f"of {MANY_SESSIONS}"))
        out.append(row("requests answered with an error status", "many:errors",
                       many_statuses(res)))
        out.append(row("of them 503 `server_busy` (each retried up to 2 times)",
                       "many:errors_503"))
        for q in ("p50", "p95", "p99"):
            out.append(row(f"chunk latency {q}", f"many:{q}"))
        out.append(row("throughput", "many:mbps"))
        out.append(row("server peak RSS (VmHWM)", "many:hwm"))
        out.append(row("server CPU s/GiB", "many:server_cpu_gib"))
        out.append(row("client (`chunkd bench`) CPU s", "many:client_cpu"))
        out.append("")
    return "\n".join(out)


# -- main ------------------------------------------------------------------------------------------


#: The measurements ``--only`` picks from, in the order of the report.
SECTIONS = ("raw", "chunkd", "finalize", "rss", "many")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=3, help="rounds of every measurement (default 3)")
    p.add_argument("--size-gib", type=float, default=2.0,
                   help="size of the raw write and of the chunkd upload (default 2)")
    p.add_argument("--finalize-mib", default="100,1024,4096",
                   help="session sizes for the finalize test, MiB, comma-separated")
    p.add_argument("--rss-chunk-mib", default="8,95",
                   help="chunk sizes for the memory test, MiB, comma-separated")
    p.add_argument("--rss-parallel", type=int, default=RSS_PARALLEL,
                   help=f"chunks in flight for the memory test (default {RSS_PARALLEL})")
    p.add_argument("--json", type=Path, help="also write the raw results here")
    p.add_argument("--scratch-parent", type=Path, default=None,
                   help="where to create the scratch folder (default: the system temp dir); "
                        "raw writes and data dirs both go there, so they share one disk")
    p.add_argument("--only", default=",".join(SECTIONS),
                   help=f"comma-separated subset of {','.join(SECTIONS)}")
    p.add_argument("--auth", action="store_true",
                   help="measure every chunkd throughput row a second time with auth on (a "
                        "temporary --jwt-secret-file, a JWT from PyJWT): adds those rows and "
                        "auth on ÷ off to the report")
    args = p.parse_args(argv)
    if not 1 <= args.runs <= 20:
        p.error("--runs must be between 1 and 20")
    if not set(args.only.split(",")) <= set(SECTIONS):
        p.error(f"--only takes a comma-separated subset of {','.join(SECTIONS)}")
    if not 0 < args.size_gib <= 8:
        p.error("--size-gib must be in (0, 8]")
    return args


async def amain(args: argparse.Namespace, scratch: Path) -> Results:
    global RSS_PARALLEL
    RSS_PARALLEL = args.rss_parallel  # read by measure_rss and the report
    size = int(args.size_gib * GiB)
    finalize_sizes = [int(x) * MiB for x in args.finalize_mib.split(",") if x.strip()]
    rss_chunks = [int(x) * MiB for x in args.rss_chunk_mib.split(",") if x.strip()]
    only = set(args.only.split(","))

    # the largest finalize: chunkd's session, then the seed's chunk files + its assembled copy
    need = max([2 * size, *(2 * f for f in finalize_sizes),
                *(RSS_PARALLEL * c for c in rss_chunks), MANY_SESSIONS * MANY_SIZE])
    free = shutil.disk_usage(scratch).free
    if free < need + 2 * GiB:
        raise SystemExit(f"not enough free disk in {scratch}: {free / GiB:.1f} GiB free, "
                         f"need {(need + 2 * GiB) / GiB:.1f} GiB")

    data = memoryview(b"")  # only the raw writes and the throughput rows (priming) use it
    if only & {"raw", "chunkd"}:
        say(f"generating {human(size)} of test data ...")
        data = await make_data(size)
        # Untimed warm-up: the first writes after start are slower (cold page cache / guest
        # memory).
        say("warm-up (untimed) ...")
        warm = Path(tempfile.mkdtemp(prefix="warm-", dir=scratch))
        try:
            for mode in RAW_MODES:
                raw_write(warm / "raw.bin", data, size, mode)
        finally:
            shutil.rmtree(warm, ignore_errors=True)
    res = Results()
    for run in range(1, args.runs + 1):
        say(f"run {run}/{args.runs}")
        if "raw" in only or "chunkd" in only:
            measure_raw(res, scratch, data, size)
        if "chunkd" in only:
            await measure_chunkd(res, scratch, data, size, auth=args.auth)
            await measure_sink(res, scratch, data, size)
            await measure_limit(res, scratch, data, size)
        if "finalize" in only:
            await measure_finalize(res, scratch, finalize_sizes)
        if "rss" in only:
            await measure_rss(res, scratch, rss_chunks)
        if "many" in only:
            await measure_many(res, scratch)
    return res


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = " ".join(shlex.quote(a) for a in [
        os.path.relpath(sys.executable, REPO) if sys.executable.startswith(str(REPO)) else
        sys.executable, *sys.argv])
    scratch = Path(tempfile.mkdtemp(prefix="chunkd-bench-", dir=args.scratch_parent))
    try:
        facts = machine_facts(scratch)
        try:
            import uvloop
            res = uvloop.run(amain(args, scratch))  # the client on the same loop as the server
        except ImportError:
            res = asyncio.run(amain(args, scratch))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    text = report(res, facts, command, int(args.size_gib * GiB), args.runs) \
        if set(args.only.split(",")) >= {"raw", "chunkd", "finalize", "rss"} else \
        json.dumps(res.rows, indent=1)  # the report's tables want those four
    print(text)
    if limit_summary(res):
        say("chunkd ÷ limit receiver, CPU ÷ sink:\n" + "\n".join(f"  {line}"
                                                              for line in limit_summary(res)))
    if auth_rows(res):
        say("auth on (JWT) ÷ auth off:\n" + "\n".join(f"  {line}" for line in auth_summary(res)))
    if many_summary(res):
        say(f"{MANY_TITLE}:\n" + "\n".join(f"  {line}" for line in many_summary(res)))
    if args.json:
        args.json.write_text(json.dumps(
            {"command": command, "machine": facts, "runs": args.runs,
             "size_bytes": int(args.size_gib * GiB),
             "results": {k: {"unit": res.units[k], "median": res.median(k), "runs": v}
                         for k, v in res.rows.items()}},
            indent=1,
        ))
    return 0


if __name__ == "__main__":
    sys.exit(main())
