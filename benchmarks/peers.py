#!/usr/bin/env python3
"""chunkd vs the servers a user would pick instead: tuspyserver (FastAPI, uvicorn) and @tus/server.

Run from the repository root with the project's venv (the peers install themselves on first use
into benchmarks/.peers/, never into chunkd's environment):

    .venv/bin/python benchmarks/peers.py [--runs 3] [--size-mib 2048] [--json out.json]

Servers, each its own process on 127.0.0.1 and a free port, with a fresh data dir on the same disk:

* chunkd's chunked API: chunkd --durable off (like the peers, which never fsync) and chunkd
  --durable on (its default), sent by chunkd's own client,
* chunkd's tus 1.0.0 path (``chunkd serve --tus-path /files/``), --durable off and on, sent by the
  very same tus client code as the two peers (``chunkd.client.tus.TusClient``, which ``chunkd
  bench --protocol tus`` uses too: the same bytes, PATCH size and concurrency), so chunkd ÷ peer
  is also measured on one protocol,
* tuspyserver (``create_tus_router`` mounted in a FastAPI app, one uvicorn process with uvloop and
  httptools, as ``uvicorn[standard]`` installs them),
* @tus/server + @tus/file-store on Node.js.

Loads, the same bytes for every server (chunkd's ``GeneratedSource`` behind a real WAV header, so
chunkd's libmagic check accepts the finished file), 50 MiB chunks / PATCHes; every tus upload
sends the same ``Upload-Metadata`` (``filename`` bench.wav, ``filetype`` audio/wav, a fresh
``taskId`` UUID, as the WhisperX fork's frontend does):

* ``1x``: one upload of ``--size-mib`` (2 GiB), chunks one after the other. tus is sequential
  within an upload (each PATCH carries the ``Upload-Offset`` the last one ended at); chunkd is
  measured the same way, and once more with its client's default of 4 chunks in flight.
* ``4x``: four uploads of a quarter of that in parallel, each sequential.

Measured: throughput (all bytes / first creation POST to last chunk acknowledged; for tus that
includes the HEAD each upload sends after its last PATCH), the latency of every chunk request
(PATCH / chunk POST; p50 and p95), the server's peak RSS (VmHWM of the server process and its
children, read before it is stopped; a fresh process per measurement), the server's CPU time
over the upload (also per GiB), and "finalize": for the chunked API the ``POST .../finalize``
round trip (size check, libmagic, hand-off); tus has no finalize, so for every tus server
(chunkd's included) it is how much longer the last PATCH of an upload took than its bytes take at
the average speed of the upload's other PATCHes (the work done inside the last PATCH:
tuspyserver runs its completion hook, a no-op here, after rewriting its .info file; @tus/server
emits its finish event and runs ``onUploadFinish``, none here; neither moves, copies nor checks
the file; chunkd starts its completion and answers without waiting for it). For chunkd's tus
path also "hand-off": from the last PATCH's answer until the finished file is in
``completed/<taskId>/`` (libmagic, the hand-off by rename), polled every 2 ms; the file's size and
sampled bytes are then checked against the source. Every measurement is repeated ``--runs``
times, interleaved (one full round per run), and reported as the median.

A raw-write baseline (the same bytes written with plain Python in 256 KiB writes, no sync) runs in
the same rounds, for chunkd / raw.

Bounded: a timeout on every request and subprocess, servers stopped by PID (SIGTERM, then SIGKILL)
in ``finally`` blocks, each data dir removed after its measurement, only 127.0.0.1 used.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import core  # noqa: E402  (benchmarks/core.py: helpers shared with the core benchmark)
from chunkd.bench import process_tree, tree_cpu  # noqa: E402
from chunkd.client import ChunkdClient, GeneratedSource, TusClient  # noqa: E402
from core import (  # noqa: E402
    AUDIO_HEAD,
    REPO,
    GiB,
    MiB,
    Results,
    human,
    mb_per_s,
    read_proc_status,
    say,
)

PEERS = HERE / ".peers"
PY_VENV = PEERS / "py"
PY_BIN = PY_VENV / "bin" / "python"
NODE_DIR = PEERS / "node"
SRC = HERE / "peer_servers"
INSTALL_TIMEOUT = 900.0          #: seconds, each pip / npm install
REQUEST_TIMEOUT = 300.0          #: seconds, every HTTP request of the benchmark
HANDOFF_TIMEOUT = 60.0           #: seconds, from the last PATCH until chunkd's tus hand-off is done
HANDOFF_POLL = 0.002             #: seconds between two looks for the handed-off file
TUS_PATH = "/files/"             #: chunkd's tus base path here (its default; the peers' too)

SERVERS = {
    "chunkd-off": "chunkd --durable off",
    "chunkd-on": "chunkd --durable on",
    "chunkd-tus-off": "chunkd tus --durable off",
    "chunkd-tus-on": "chunkd tus --durable on",
    "tuspyserver": "tuspyserver (uvicorn)",
    "tus-node": "@tus/server (Node)",
}
PEER_KINDS = ("tuspyserver", "tus-node")
CHUNKED_KINDS = ("chunkd-off", "chunkd-on")       #: chunkd's chunked API, its own client
CHUNKD_TUS_KINDS = ("chunkd-tus-off", "chunkd-tus-on")  #: chunkd's tus path, ``TusClient``
#: chunkd's tus row for each chunked row (the same --durable)
TUS_OF = dict(zip(CHUNKED_KINDS, CHUNKD_TUS_KINDS, strict=True))


# -- installing the peers (idempotent) ------------------------------------------------------------


def _digest(*paths: Path) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(p.read_bytes())
    return h.hexdigest()


def _run(cmd: list[str], cwd: Path | None = None) -> None:
    say("  $ " + " ".join(shlex.quote(c) for c in cmd))
    proc = subprocess.run(cmd, cwd=cwd, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=INSTALL_TIMEOUT)
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}\n"
                         f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")


def ensure_py_venv() -> Path:
    """benchmarks/.peers/py with tuspyserver, uvicorn, fastapi and matplotlib; returns its python."""
    stamp = PY_VENV / ".installed"
    want = _digest(SRC / "requirements.txt")
    if PY_BIN.exists() and stamp.exists() and stamp.read_text() == want:
        return PY_BIN
    say("installing the Python peer into benchmarks/.peers/py (once) ...")
    base = shutil.which("python3") or sys.executable
    if not PY_BIN.exists():
        _run([base, "-m", "venv", str(PY_VENV)])
    _run([str(PY_BIN), "-m", "pip", "install", "--quiet", "--upgrade", "pip"])
    _run([str(PY_BIN), "-m", "pip", "install", "--quiet", "-r", str(SRC / "requirements.txt")])
    stamp.write_text(want)
    return PY_BIN


def ensure_node() -> Path:
    """benchmarks/.peers/node with @tus/server and @tus/file-store; returns server.mjs there."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        raise SystemExit("node and npm are needed for the @tus/server peer")
    NODE_DIR.mkdir(parents=True, exist_ok=True)
    stamp = NODE_DIR / ".installed"
    want = _digest(SRC / "package.json")
    if not (stamp.exists() and stamp.read_text() == want
            and (NODE_DIR / "node_modules" / "@tus" / "server").is_dir()):
        say("installing the Node.js peer into benchmarks/.peers/node (once) ...")
        shutil.copyfile(SRC / "package.json", NODE_DIR / "package.json")
        _run(["npm", "install", "--no-audit", "--no-fund", "--loglevel=error"], cwd=NODE_DIR)
        stamp.write_text(want)
    # ESM resolves "@tus/server" next to the importing file, so the server lives beside node_modules.
    shutil.copyfile(SRC / "server.mjs", NODE_DIR / "server.mjs")
    return NODE_DIR / "server.mjs"


def ensure_peers() -> None:
    ensure_py_venv()
    ensure_node()


def peer_versions() -> dict[str, str]:
    out: dict[str, str] = {}
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        pv = subprocess.run(
            [str(PY_BIN), "-c", "from importlib.metadata import version as v; print(' '.join("
             "f'{p}={v(p)}' for p in ('tuspyserver','fastapi','starlette','uvicorn','uvloop',"
             "'httptools')))"], capture_output=True, text=True, timeout=60).stdout.split()
        out.update(dict(x.split("=", 1) for x in pv))
    for pkg in ("server", "file-store"):
        with contextlib.suppress(OSError, ValueError):
            doc = json.loads((NODE_DIR / "node_modules" / "@tus" / pkg / "package.json").read_text())
            out[f"@tus/{pkg}"] = doc["version"]
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out["node"] = subprocess.run(["node", "--version"], capture_output=True, text=True,
                                     timeout=30).stdout.strip()
    return out


# -- peer server processes --------------------------------------------------------------------------


class PeerServer(core.Server):
    """A tus server subprocess on 127.0.0.1 and a free port, with its own fresh data dir."""

    url_suffix = "/files/"

    def __init__(self, kind: str, scratch: Path) -> None:
        self.kind = self.name = kind
        self.scratch = scratch
        self.data_dir = Path(tempfile.mkdtemp(prefix=f"{kind}-", dir=scratch))
        self.log = scratch / f"{self.data_dir.name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""

    def command(self) -> tuple[list[str], Path]:
        if self.kind == "tuspyserver":
            return [str(PY_BIN), str(SRC / "tus_py_app.py"), str(self.data_dir)], HERE
        if self.kind == "tus-node":
            return ["node", str(NODE_DIR / "server.mjs"), str(self.data_dir)], NODE_DIR
        raise ValueError(self.kind)


class ChunkdTusServer(core.Server):
    """``chunkd serve`` as for the chunked rows, its tus endpoint at ``--tus-path /files/``
    (given explicitly, so a CHUNKD_TUS_PATH in the environment does not move it)."""

    name = "chunkd (tus)"
    url_suffix = TUS_PATH

    def command(self) -> tuple[list[str], Path]:
        cmd, cwd = super().command()
        return [*cmd, "--tus-path", TUS_PATH], cwd

    @property
    def completed_dir(self) -> Path:
        """Where the folder hand-off (chunkd's default) moves a finished upload."""
        return self.data_dir / "completed"


def make_server(kind: str, scratch: Path) -> Any:
    if kind in CHUNKED_KINDS:
        return core.Server(scratch, durable=kind == "chunkd-on")
    if kind in CHUNKD_TUS_KINDS:
        return ChunkdTusServer(scratch, durable=kind == "chunkd-tus-on")
    return PeerServer(kind, scratch)


def tree_hwm(root: int) -> int:
    """VmHWM of ``root`` and its descendants (uvicorn/node workers, if any), in bytes."""
    return sum(read_proc_status(p).get("VmHWM", 0) for p in process_tree(root))


def server_cpu(root: int) -> float:
    """CPU seconds of the server tree so far, as ``chunkd bench`` counts them (user + system,
    all threads, children included); NaN (shown as n/a) when the server is gone."""
    cpu = tree_cpu(root)
    return float("nan") if cpu is None else cpu


# -- the clients -----------------------------------------------------------------------------------


@dataclass
class OneUpload:
    size: int
    latencies: list[float]     # seconds per chunk request, in order
    finalize: float            # seconds (see the module docstring)
    seed: int = 0
    task_id: str = ""          # the ``taskId`` sent in the tus metadata
    handoff: asyncio.Task[tuple[float, Path]] | None = field(default=None, repr=False)


def source_for(size: int, seed: int) -> GeneratedSource:
    return GeneratedSource(size, name="bench.wav", header=AUDIO_HEAD.read_bytes(), seed=seed)


async def chunkd_upload(client: ChunkdClient, size: int, seed: int) -> tuple[OneUpload, str]:
    """Through chunkd's own client (no checksums: GeneratedSource has none); not finalized."""
    source = source_for(size, seed)
    res = await client.upload(source, finalize=False)
    if res.retries:
        raise RuntimeError(f"chunkd upload needed {res.retries} retries")
    return OneUpload(size, res.chunk_latencies, 0.0), res.session_id


async def wait_for_handoff(completed: Path, task_id: str, since: float) -> tuple[float, Path]:
    """Seconds from ``since`` until ``completed/<task_id>/upload.*`` exists (chunkd's folder
    hand-off renames the finished file there), and that file; bounded by HANDOFF_TIMEOUT."""
    folder = completed / task_id
    deadline = since + HANDOFF_TIMEOUT
    while True:
        with contextlib.suppress(OSError):  # the folder is made just before the file moves in
            for entry in os.scandir(folder):
                if entry.name.startswith("upload."):
                    return time.perf_counter() - since, Path(entry.path)
        if time.perf_counter() > deadline:
            seen = sorted(str(p.relative_to(completed)) for p in completed.rglob("*")) \
                if completed.is_dir() else "no completed/ folder"
            raise RuntimeError(f"chunkd tus: no hand-off of task {task_id} after "
                               f"{HANDOFF_TIMEOUT:.0f} s (completed/ holds: {seen})")
        await asyncio.sleep(HANDOFF_POLL)


async def tus_upload(http: aiohttp.ClientSession, url: str, size: int, chunk: int, seed: int,
                     completed: Path | None = None,
                     waits: list[asyncio.Task[tuple[float, Path]]] | None = None) -> OneUpload:
    """tus 1.0 through ``TusClient``: POST (creation) with Upload-Length, then PATCHes one after
    the other, then a HEAD; the same requests for every tus server (and ``chunkd bench``).

    With ``completed`` (chunkd's tus path), a task started right after the last PATCH's answer
    waits for the hand-off (``OneUpload.handoff``, also appended to ``waits``, so that the caller
    can cancel it if another upload fails)."""
    task_id = str(uuid.uuid4())
    handoff: asyncio.Task[tuple[float, Path]] | None = None

    def on_patch(offset: int, _seconds: float) -> None:
        nonlocal handoff
        if completed is not None and offset == size:
            handoff = asyncio.create_task(wait_for_handoff(completed, task_id,
                                                           time.perf_counter()))
            if waits is not None:
                waits.append(handoff)

    up = await TusClient(http, url, chunk_size=chunk).upload(
        source_for(size, seed), filetype="audio/wav", task_id=task_id, on_patch=on_patch)
    latencies, lengths = up.latencies, up.lengths
    # The last PATCH minus what its bytes would have taken at the other PATCHes' average speed.
    extra = (latencies[-1] - sum(latencies[:-1]) / sum(lengths[:-1]) * lengths[-1]
             if len(latencies) > 1 else float("nan"))
    return OneUpload(size, latencies, extra, seed, task_id, handoff)


SAMPLE = 64 * 1024  #: bytes compared at each of a few places of a handed-off file


async def check_handed_off(path: Path, size: int, seed: int) -> None:
    """The handed-off file has the upload's size and, at its start, end and a few places between
    (every PATCH boundary would be too many reads for 2 GiB), the source's bytes."""
    got = path.stat().st_size
    if got != size:
        raise RuntimeError(f"chunkd tus: handed-off {path.name} has {got} bytes, sent {size}")
    source = source_for(size, seed)
    places = sorted({0, max(0, size - SAMPLE), *(size * k // 5 for k in range(1, 5))})
    with open(path, "rb") as f:
        for at in places:
            n = min(SAMPLE, size - at)
            want = await core.source_bytes(source, at, n)
            f.seek(at)
            if f.read(n) != want:
                raise RuntimeError(f"chunkd tus: handed-off {path.name} differs from the source "
                                   f"in bytes {at}..{at + n}")


@dataclass
class Measurement:
    seconds: float
    total: int
    latencies: list[float]
    finalize: list[float]
    hwm: int
    server_cpu: float
    client_cpu: float
    handoff: list[float] = field(default_factory=list)  # chunkd tus: last PATCH .. file handed off


async def measure(kind: str, scratch: Path, sizes: list[int], chunk: int, in_flight: int
                  ) -> Measurement:
    """One fresh server; ``len(sizes)`` uploads in parallel; server stopped, data dir removed."""
    with make_server(kind, scratch) as server:
        cpu0, ccpu0 = server_cpu(server.pid), time.process_time()
        timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT, sock_connect=30)
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                         timeout=timeout) as http:
            finalize: list[float] = []
            handoff: list[float] = []
            if kind in CHUNKED_KINDS:
                client = ChunkdClient(server.url, parallel=in_flight, chunk_size=chunk,
                                      retries=1, timeout=REQUEST_TIMEOUT, session=http)
                t0 = time.perf_counter()
                done = await asyncio.gather(*(chunkd_upload(client, s, i)
                                              for i, s in enumerate(sizes)))
                seconds = time.perf_counter() - t0
                cpu1, ccpu1 = server_cpu(server.pid), time.process_time()
                ups = [u for u, _ in done]
                for _, sid in done:  # one after the other: the round trip alone
                    f0 = time.perf_counter()
                    doc = await client.finalize(sid)
                    finalize.append(time.perf_counter() - f0)
                    if doc.get("status") != "processing":
                        raise RuntimeError(f"unexpected finalize answer: {doc}")
            else:
                completed = server.completed_dir if kind in CHUNKD_TUS_KINDS else None
                waits: list[asyncio.Task[tuple[float, Path]]] = []
                t0 = time.perf_counter()
                try:
                    ups = await asyncio.gather(*(tus_upload(http, server.url, s, chunk, i,
                                                            completed, waits)
                                                 for i, s in enumerate(sizes)))
                except BaseException:
                    for t in waits:  # no hand-off is waited for once a measurement failed
                        t.cancel()
                    raise
                seconds = time.perf_counter() - t0
                cpu1, ccpu1 = server_cpu(server.pid), time.process_time()
                finalize = [u.finalize for u in ups]
                try:
                    for u in ups if completed is not None else []:
                        if u.handoff is None:
                            raise RuntimeError("chunkd tus: the last PATCH did not say complete")
                        took, path = await u.handoff
                        handoff.append(took)
                        await check_handed_off(path, u.size, u.seed)
                finally:
                    for t in waits:
                        t.cancel()  # a no-op for the ones already done
        hwm = tree_hwm(server.pid)
    return Measurement(seconds, sum(sizes), [x for u in ups for x in u.latencies], finalize, hwm,
                       cpu1 - cpu0, ccpu1 - ccpu0, handoff)


# -- the rounds ------------------------------------------------------------------------------------


@dataclass
class Scenario:
    key: str
    label: str
    sizes: list[int]
    in_flight: int            # chunks in flight per upload (tus: always 1)
    kinds: tuple[str, ...]


def scenarios(size: int) -> list[Scenario]:
    quarter = size // 4
    every = tuple(SERVERS)
    return [
        Scenario("1x", f"1 upload of {human(size)}, chunks sequential", [size], 1, every),
        Scenario("4x", f"4 uploads of {human(quarter)} in parallel, each sequential",
                 [quarter] * 4, 1, every),
        Scenario("1x-p4", f"1 upload of {human(size)}, 4 chunks in flight (chunkd's chunked "
                 "API only; a tus upload is sequential)", [size], 4, CHUNKED_KINDS),
    ]


def pct(values: list[float], q: float) -> float:
    """Nearest-rank percentile."""
    s = sorted(values)
    return s[max(0, min(len(s) - 1, int(round(q / 100 * len(s) + 0.5)) - 1))]


def record(res: Results, key: str, m: Measurement) -> None:
    res.add(f"{key}:mbps", mb_per_s(m.total, m.seconds), "MB/s")
    res.add(f"{key}:p50", pct(m.latencies, 50) * 1000, "ms")
    res.add(f"{key}:p95", pct(m.latencies, 95) * 1000, "ms")
    res.add(f"{key}:finalize", statistics.fmean(m.finalize) * 1000, "ms")
    res.add(f"{key}:hwm", m.hwm / MiB, "MiB")
    res.add(f"{key}:server_cpu", m.server_cpu, "CPU s")
    res.add(f"{key}:server_cpu_gib", m.server_cpu / (m.total / GiB), "CPU s")
    if m.handoff:
        res.add(f"{key}:handoff", statistics.fmean(m.handoff) * 1000, "ms")
    res.add(f"{key}:client_cpu", m.client_cpu, "CPU s")
    res.add(f"{key}:chunks", len(m.latencies), "n")


async def amain(args: argparse.Namespace, scratch: Path) -> Results:
    size = args.size_mib * MiB
    chunk = args.chunk_mib * MiB
    only = set(args.only.split(",")) if args.only else set(SERVERS)
    free = shutil.disk_usage(scratch).free
    if free < size + 2 * GiB:
        raise SystemExit(f"not enough free disk in {scratch}: {free / GiB:.1f} GiB free")
    say(f"generating {human(size)} of test data for the raw baseline and priming ...")
    data = await core.make_data(size)  # the same bytes the servers get
    res = Results()
    raw_dir = Path(tempfile.mkdtemp(prefix="raw-", dir=scratch))
    try:
        core.raw_write(raw_dir / "warm.bin", data, size, "write")  # untimed warm-up
        for run in range(1, args.runs + 1):
            say(f"peers run {run}/{args.runs}")
            core.prime(scratch, data, size)
            seconds = core.raw_write(raw_dir / "raw.bin", data, size, "write")
            res.add("raw:write", mb_per_s(size, seconds), "MB/s")
            say(f"  raw write {human(size)}, {human(core.RAW_PIECE)} writes, no sync: {mb_per_s(size, seconds):.0f} MB/s")
            for sc in scenarios(size):
                for kind in sc.kinds:
                    if kind not in only:
                        continue
                    core.prime(scratch, data, size)  # same page-cache state for every server
                    m = await measure(kind, scratch, sc.sizes, chunk, sc.in_flight)
                    record(res, f"{sc.key}:{kind}", m)
                    say(f"  {sc.key:5} {SERVERS[kind]:24} {mb_per_s(m.total, m.seconds):6.0f} MB/s"
                        f"  chunk p50 {pct(m.latencies, 50) * 1000:6.1f} ms"
                        f" p95 {pct(m.latencies, 95) * 1000:6.1f} ms"
                        f"  finalize {statistics.fmean(m.finalize) * 1000:6.1f} ms"
                        + (f" (hand-off {statistics.fmean(m.handoff) * 1000:.1f} ms)"
                           if m.handoff else "") +
                        f"  VmHWM {m.hwm / MiB:6.1f} MiB  server CPU {m.server_cpu:5.2f} s"
                        f"  client CPU {m.client_cpu:5.2f} s")
    finally:
        shutil.rmtree(raw_dir, ignore_errors=True)
    return res


# -- report ----------------------------------------------------------------------------------------


def _f(v: float, unit: str) -> str:
    if v != v:
        return "n/a"
    if unit in ("ms", "CPU s"):
        return f"{v:.2f}" if abs(v) < 10 else f"{v:.1f}" if abs(v) < 100 else f"{v:.0f}"
    if unit == "MiB":
        return f"{v:.1f}"
    return f"{v:.0f}"


def ratio_text(a: float, b: float) -> str:
    return "n/a" if a != a or b != b or b == 0 else f"{a / b:.2f} x"


def same_protocol(doc: dict[str, Any]) -> list[str]:
    """chunkd's tus path ÷ each peer, and chunkd's chunked API ÷ its tus path: one table of
    throughput ratios (of the medians, then per round: the rounds are interleaved)."""
    r = doc["results"]
    size = doc["size_bytes"]
    cols = [("1x", f"1 x {human(size)}"), ("4x", f"4 x {human(size // 4)} in parallel")]
    pairs = [(t, p) for t in CHUNKD_TUS_KINDS for p in PEER_KINDS]
    pairs += [(c, TUS_OF[c]) for c in CHUNKED_KINDS]

    def cell(sc: str, a: str, b: str) -> str:
        ka, kb = f"{sc}:{a}:mbps", f"{sc}:{b}:mbps"
        if ka not in r or kb not in r:
            return "n/a"
        ma, mb = r[ka]["median"], r[kb]["median"]
        text = f"**{ma / mb:.2f} x** ({ma:.0f} ÷ {mb:.0f} MB/s)"
        if len(r[ka]["runs"]) > 1 and len(r[ka]["runs"]) == len(r[kb]["runs"]):
            text += " [" + ", ".join(f"{x / y:.2f}" for x, y in zip(r[ka]["runs"], r[kb]["runs"],
                                                                      strict=True)) + "]"
        return text

    rows = [(a, b) for a, b in pairs if any(f"{sc}:{a}:mbps" in r and f"{sc}:{b}:mbps" in r
                                            for sc, _ in cols)]
    if not rows:
        return []
    out = ["| throughput ratio, same bytes, PATCH / chunk size and concurrency | "
           + " | ".join(label for _, label in cols) + " |",
           "|---|" + "---|" * len(cols)]
    for a, b in rows:
        out.append(f"| {SERVERS[a]} ÷ {SERVERS[b]} | "
                   + " | ".join(cell(sc, a, b) for sc, _ in cols) + " |")
    out.append("")
    out.append("The first four rows are one protocol: the same tus client code (a creation POST "
               "with `Upload-Length`, then the PATCHes one after the other, then a HEAD) sends "
               "the same bytes to chunkd's tus path and to each peer. The last two compare "
               "chunkd's two APIs on one server build and the same `--durable` (chunked: its own "
               "client, no checksums, one chunk in flight per upload, like tus)."
               + (" Per-round ratios in brackets." if doc["runs"] > 1 else "") + "\n")
    return out


def report(doc: dict[str, Any]) -> str:
    """Markdown tables from the JSON that ``main`` writes (also used by run.py)."""
    r = doc["results"]
    size = doc["size_bytes"]

    def med(key: str) -> float:
        return r[key]["median"] if key in r else float("nan")

    def runs(key: str) -> str:
        return ", ".join(_f(v, r[key]["unit"]) for v in r[key]["runs"]) if key in r else ""

    out = ["## chunkd vs tus servers\n"]
    out.append(f"Command: `{doc['command']}`  ")
    out.append(f"Runs: {doc['runs']} (medians; MB/s = 10^6 bytes/s), chunk size "
               f"{human(doc['chunk_bytes'])}. Raw baseline: {human(size)} written with plain Python "
               f"in {human(core.RAW_PIECE)} writes, no sync, same disk, same rounds: "
               f"**{med('raw:write'):.0f} MB/s** [{runs('raw:write')}].\n")
    out.append("| peer | versions |")
    out.append("|---|---|")
    v = doc.get("versions", {})
    out.append("| tuspyserver | " + ", ".join(f"{k} {v[k]}" for k in (
        "tuspyserver", "fastapi", "starlette", "uvicorn", "uvloop", "httptools") if k in v) +
        "; one uvicorn process |")
    out.append("| @tus/server | " + ", ".join(f"{k} {v[k]}" for k in (
        "@tus/server", "@tus/file-store", "node") if k in v) + "; one node process |")
    if any(f"{sc}:{kind}:mbps" in r for sc in ("1x", "4x") for kind in CHUNKD_TUS_KINDS):
        commit = doc.get("machine", {}).get("chunkd commit", "?")
        out.append(f"| chunkd (tus) | chunkd {commit}, `chunkd serve --tus-path {TUS_PATH}` "
                   "(the same server as the chunked rows), the folder hand-off; one process |")
    out.append("")
    sp = same_protocol(doc)
    if sp:
        out.append("### Same protocol: chunkd's tus path vs the peers\n")
        out.extend(sp)
    for sc in scenarios(size):
        out.append(f"### {sc.label}\n")
        out.append("| server | throughput | runs | chunkd off ÷ this | chunkd on ÷ this | "
                   "chunkd tus off ÷ this | chunkd tus on ÷ this | this ÷ raw | chunk p50 | "
                   "chunk p95 | finalize* | hand-off** | peak RSS (VmHWM) | server CPU s | "
                   "server CPU s/GiB | client CPU s |")
        out.append("|---|" + "---|" * 15)
        refs = [med(f"{sc.key}:{kind}:mbps") for kind in (*CHUNKED_KINDS, *CHUNKD_TUS_KINDS)]
        for kind in sc.kinds:
            k = f"{sc.key}:{kind}"
            if f"{k}:mbps" not in r:
                continue
            mbps = med(f"{k}:mbps")
            handoff = f"{_f(med(k + ':handoff'), 'ms')} ms" if f"{k}:handoff" in r else ""
            out.append(
                f"| {SERVERS[kind]} | {mbps:.0f} MB/s | [{runs(k + ':mbps')}] | "
                + "".join(f"{ratio_text(ref, mbps)} | " for ref in refs)
                + f"{mbps / med('raw:write'):.2f} x | "
                f"{_f(med(k + ':p50'), 'ms')} ms | {_f(med(k + ':p95'), 'ms')} ms | "
                f"{_f(med(k + ':finalize'), 'ms')} ms | {handoff} | {med(k + ':hwm'):.1f} MiB | "
                f"{med(k + ':server_cpu'):.2f} | {_f(med(k + ':server_cpu_gib'), 'CPU s')} | "
                f"{med(k + ':client_cpu'):.2f} |")
        out.append("")
    out.append("\\* finalize: chunkd's chunked API, the `POST /finalize` round trip (checks every "
               "chunk, the size and libmagic, hands the file off; per upload, one after the other "
               "once all uploads are done). tus has no finalize step: for every tus server, "
               "chunkd's tus path included, the figure is how much longer the last PATCH of an "
               "upload took than its bytes take at the average speed of the upload's other "
               "PATCHes (tuspyserver rewrites its .info JSON and calls its completion hook, a "
               "no-op here; @tus/server writes its .json config entry and emits its finish event; "
               "neither checks, moves or copies the file; chunkd starts its completion, libmagic "
               "and the hand-off, and answers the PATCH without waiting for it). Near zero or "
               "negative: nothing measurable happens inside the last PATCH.\n")
    out.append("\\*\\* hand-off (chunkd's tus path only): from the last PATCH's answer until "
               "the finished file is in `completed/<taskId>/` (the same libmagic check and "
               "hand-off by rename as `finalize`; the `taskId` is the one the upload's "
               "`Upload-Metadata` carries), polled every 2 ms while the upload's HEAD runs; "
               "afterwards the file's size and sampled bytes are checked against the source. "
               "The peers hand nothing off.\n")
    out.append("Peak RSS: VmHWM of the server process plus its children (none for any of them), "
               "a fresh process per measurement, read right before it is stopped. CPU: user + "
               "system seconds of the server tree / of the client (this script, same cores) "
               "over the upload (creation to the last chunk or PATCH and, for tus, its HEAD); "
               "s/GiB divides by the bytes uploaded.\n")
    return "\n".join(out)


# -- main ------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=3, help="rounds of every measurement (default 3)")
    p.add_argument("--size-mib", type=int, default=2048,
                   help="size of the single upload; the 4 parallel ones are a quarter each "
                        "(default 2048)")
    p.add_argument("--chunk-mib", type=int, default=50, help="chunk / PATCH size (default 50)")
    p.add_argument("--only", default="", help="comma-separated subset of " + ",".join(SERVERS))
    p.add_argument("--json", type=Path, help="also write the raw results here")
    p.add_argument("--scratch-parent", type=Path, default=None,
                   help="where the data dirs go (default: the system temp dir)")
    p.add_argument("--no-install", action="store_true",
                   help="do not install the peers (they must be in benchmarks/.peers already)")
    args = p.parse_args(argv)
    if not 1 <= args.runs <= 20:
        p.error("--runs must be between 1 and 20")
    if not 4 * args.chunk_mib <= args.size_mib <= 8192:
        p.error("--size-mib must be between 4 chunks and 8192")
    if not 1 <= args.chunk_mib <= 95:
        p.error("--chunk-mib must be between 1 and 95 (chunkd's largest chunk)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = " ".join(shlex.quote(a) for a in [
        os.path.relpath(sys.executable, REPO) if sys.executable.startswith(str(REPO)) else
        sys.executable, os.path.relpath(Path(__file__).resolve(), REPO),
        *(sys.argv[1:] if argv is None else argv)])
    if not args.no_install:
        ensure_peers()
    scratch = Path(tempfile.mkdtemp(prefix="chunkd-peers-", dir=args.scratch_parent))
    try:
        facts = core.machine_facts(scratch)
        try:
            import uvloop
            res = uvloop.run(amain(args, scratch))  # the same loop chunkd's client would use
        except ImportError:
            res = asyncio.run(amain(args, scratch))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    doc = {
        "command": command, "machine": facts, "runs": args.runs, "versions": peer_versions(),
        "size_bytes": args.size_mib * MiB, "chunk_bytes": args.chunk_mib * MiB,
        "results": {k: {"unit": res.units[k], "median": res.median(k), "runs": v}
                    for k, v in res.rows.items()},
    }
    if args.json:
        args.json.write_text(json.dumps(doc, indent=1))
    print(report(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
