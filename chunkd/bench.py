"""``chunkd bench``: drive many concurrent uploads against an upload server and measure.

Two protocols: ``--protocol chunked`` (default), chunkd's chunked API, ``--parallel`` chunks in
flight per upload; ``--protocol tus``, tus 1.0 against any server's creation URL (chunkd's
``--tus-path``, tusd, tuspyserver, @tus/server, ...), each upload's PATCHes one after the other
as the protocol has them (:mod:`chunkd.client.tus`).

Data is generated (one random MiB repeated behind a WAV header), not read from disk, so the
client is not the bottleneck. Everything is bounded: ``--sessions`` uploads of ``--size`` each,
stopped after ``--duration`` seconds whatever happens. Afterwards what the bench created is
removed (chunked: aborted; tus: the termination ``DELETE``, where the server has it) unless
``--finalize``: chunked sessions are then finalized (the folder hand-off keeps them), finished tus
uploads kept. A server with auth on needs ``--token`` (or ``$CHUNKD_TOKEN``), sent as
``Authorization: Bearer`` with every request; a 401 or 403 stops the bench at once (and says so
in one line), and so does a ``--protocol tus`` URL that is no tus server.

For a server on this machine (its pid found from the URL's port, or ``--server-pid``) it reports
the peak RSS and the CPU seconds (user + system, all threads, and its child processes) that the
server spent during the load, also per GiB received.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import struct
import sys
import time
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import orjson
from tqdm import tqdm

from chunkd.client.core import ChunkdClient, ChunkdClientError, Progress
from chunkd.client.sources import GeneratedSource
from chunkd.client.tus import AUTH_STATUSES, NOT_TUS, TusClient
from chunkd.config import ConfigError, GiB, MiB, parse_duration, parse_size

PROTOCOLS = ("chunked", "tus")
#: seconds, each request of the load (a 95 MiB chunk over a slow link included)
REQUEST_TIMEOUT = 600.0
#: seconds, each abort / DELETE afterwards
CLEANUP_TIMEOUT = 10.0
CLK_TCK = os.sysconf("SC_CLK_TCK")


def wav_header(size: int) -> bytes:
    """A 16 kHz mono PCM WAV header for ``size`` bytes in all, so libmagic says audio/x-wav."""
    data = min(max(0, size - 44), 0xFFFFFFFF - 36)  # RIFF sizes are 32-bit; libmagic does not mind
    return (b"RIFF" + struct.pack("<I", 36 + data) + b"WAVEfmt "
            + struct.pack("<IHHIIHH", 16, 1, 1, 16000, 32000, 2, 16)
            + b"data" + struct.pack("<I", data))


class BenchRefused(Exception):
    """An answer no other upload can get past: the credentials (401) or access (403) refused,
    or (tus) the URL is not a tus server. No point going on."""

    def __init__(self, error: ChunkdClientError, left: int = 0) -> None:
        super().__init__(error.message)
        self.error = error
        self.left = left  #: uploads it created but could not remove (e.g. the token is refused)


def stops_the_bench(exc: ChunkdClientError) -> bool:
    """Wrong, missing or expired token, or not a tus server: every other upload gets it too."""
    return exc.status in AUTH_STATUSES or exc.code == NOT_TUS


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    values = sorted(values)
    k = (len(values) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def local_server_pid(url: str) -> int | None:
    """The pid listening on the URL's port, when the URL is on this machine (Linux /proc)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if host not in ("127.0.0.1", "localhost", "::1", socket.gethostname()):
        return None
    port = parts.port or (443 if parts.scheme == "https" else 80)
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f)
                for line in f:
                    cols = line.split()
                    if cols[3] == "0A" and int(cols[1].rsplit(":", 1)[1], 16) == port:
                        inodes.add(cols[9])
        except OSError:
            continue
    if not inodes:
        return None
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
                if link.startswith("socket:[") and link[8:-1] in inodes:
                    return int(pid)
        except OSError:
            continue
    return None


def process_tree(root: int) -> list[int]:
    """``root`` and every descendant still alive (workers, hand-off commands)."""
    children: dict[int, list[int]] = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def tree_cpu(root: int) -> float | None:
    """CPU seconds (user + system) of ``root`` and its descendants so far: each process's own,
    all its threads (``/proc/<pid>/stat`` sums them), plus those of its children that ended and
    were waited for (cutime, cstime), so a child's time is still counted once it is gone.
    None when ``root`` is gone."""
    total, seen = 0.0, False
    for pid in process_tree(root):
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # fields[0] is field 3 (state): utime is field 14, stime 15, cutime 16, cstime 17.
        total += sum(int(x) for x in fields[11:15]) / CLK_TCK
        seen = seen or pid == root
    return total if seen else None


def peak_rss_mib(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


async def run_bench(
    url: str,
    *,
    protocol: str = "chunked",
    sessions: int,
    parallel: int,
    size: int,
    chunk_size: int,
    duration: float,
    finalize: bool = False,
    server_pid: int | None = None,
    show_progress: bool = True,
    token: str | None = None,
) -> dict[str, Any]:
    """Run the load (tus: ``parallel`` is 1, its PATCHes are sequential); raises
    :class:`BenchRefused` (after removing what it created) on the first answer that
    :func:`stops_the_bench`."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, not {protocol!r}")
    if protocol == "tus":
        parallel = 1
    sources = [GeneratedSource(size, name=f"bench-{i}.wav", header=wav_header(size), seed=i)
               for i in range(sessions)]
    bar = tqdm(total=size * sessions, unit="B", unit_scale=True, unit_divisor=1024,
               desc="chunkd bench", disable=not show_progress, dynamic_ncols=True,
               file=sys.stderr)
    sent = [0] * sessions
    latencies: list[float] = []
    finalize_times: list[float] = []
    created: list[str] = []  # session ids / tus upload URLs, as soon as the server made them
    kept: set[str] = set()   # of those, what --finalize leaves on the server
    completed = 0
    failures: list[str] = []
    refused: list[ChunkdClientError] = []
    stop = asyncio.Event()  # set by the first answer every other upload would get too

    def progress(i: int, sent_bytes: int) -> None:
        bar.update(sent_bytes - sent[i])
        sent[i] = sent_bytes

    http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=aiohttp.
                                 ClientTimeout(total=REQUEST_TIMEOUT, sock_connect=30))
    if protocol == "tus":
        tus = TusClient(http, url, chunk_size=chunk_size, token=token)
        errors = tus.errors

        async def upload(i: int) -> None:
            def patched(offset: int, seconds: float) -> None:
                latencies.append(seconds)
                progress(i, offset)

            up = await tus.upload(sources[i], filetype="audio/wav", on_created=created.append,
                                  on_patch=patched)
            if finalize:
                kept.add(up.url)
    else:
        client = ChunkdClient(url, parallel=parallel, chunk_size=chunk_size, checksum=False,
                              retries=3, token=token, session=http)
        errors = client.errors

        async def upload(i: int) -> None:
            def on_progress(p: Progress) -> None:
                progress(i, p.sent_bytes)

            result = await client.upload(sources[i], finalize=False, on_progress=on_progress,
                                         on_session=created.append)
            latencies.extend(result.chunk_latencies)
            if finalize:
                t0 = time.monotonic()
                await client.finalize(result.session_id)
                finalize_times.append(time.monotonic() - t0)
                kept.add(result.session_id)

    async def one(i: int) -> None:
        nonlocal completed
        try:
            await upload(i)
            completed += 1
        except ChunkdClientError as exc:
            if stops_the_bench(exc):
                refused.append(exc)
                stop.set()
            failures.append(f"{exc.status} {exc.code}: {exc.message}")

    cpu0 = tree_cpu(server_pid) if server_pid else None
    start = time.monotonic()
    tasks = [asyncio.create_task(one(i)) for i in range(sessions)]
    # Until every upload is done, --duration is up, or the first refusal that stops the bench.
    watchers = [asyncio.create_task(asyncio.wait(tasks)), asyncio.create_task(stop.wait())]
    try:
        await asyncio.wait(watchers, timeout=duration, return_when=asyncio.FIRST_COMPLETED)
        pending = [t for t in tasks if not t.done()]
    finally:  # --duration, Ctrl-C, a refusal or an error: stop every upload, leave nothing behind
        for t in [*watchers, *tasks]:
            t.cancel()
        await asyncio.gather(*watchers, *tasks, return_exceptions=True)
        bar.close()
        elapsed = time.monotonic() - start
        cpu1 = tree_cpu(server_pid) if server_pid else None
        rss = peak_rss_mib(server_pid) if server_pid else None
        await http.close()
        left = await _remove_all(protocol, url, [x for x in created if x not in kept],
                                 token=token)
    if refused:
        raise BenchRefused(refused[0], left)
    total = sum(sent)
    cpu = cpu1 - cpu0 if cpu0 is not None and cpu1 is not None else None
    return {
        "url": url,
        "protocol": protocol,
        "sessions": sessions,
        "parallel": parallel,
        "size_bytes": size,
        "chunk_size_bytes": chunk_size,
        "completed_sessions": completed,
        "stopped_by_duration": bool(pending),
        "bytes_sent": total,
        "elapsed_s": round(elapsed, 3),
        "throughput_mb_s": round(total / elapsed / 1e6, 1) if elapsed else 0.0,
        "chunks": len(latencies),
        "chunk_latency_ms": {
            "p50": round(percentile(latencies, 0.5) * 1000, 1),
            "p95": round(percentile(latencies, 0.95) * 1000, 1),
            "p99": round(percentile(latencies, 0.99) * 1000, 1),
            "mean": round(statistics.fmean(latencies) * 1000, 1) if latencies else 0.0,
        },
        "finalize_ms_median": round(statistics.median(finalize_times) * 1000, 1)
        if finalize_times else None,
        "errors_by_status": {str(k): v for k, v in sorted(errors.items())},
        "failures": failures[:20],
        "left_on_server": len(kept) + left,
        "server_pid": server_pid,
        "server_peak_rss_mib": round(rss, 1) if rss is not None else None,
        "server_cpu_s": round(cpu, 3) if cpu is not None else None,
        "server_cpu_s_per_gib": round(cpu / (total / GiB), 3) if cpu is not None and total
        else None,
    }


async def _remove_all(protocol: str, url: str, ids: list[str], *, token: str | None = None
                      ) -> int:
    """Remove what the bench made, concurrently, each with a short timeout: abort chunked
    sessions (their reserved space is freed), DELETE tus uploads (termination). Return how
    many are still on the server: refused (a token refused, a finished upload the server handed
    off, as chunkd's tus path does, no termination extension) or not answered (the server's
    expiry will remove them)."""
    if not ids:
        return 0
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=aiohttp.
                                     ClientTimeout(total=CLEANUP_TIMEOUT)) as http:
        if protocol == "tus":
            tus = TusClient(http, url, chunk_size=1, token=token)

            async def remove(upload_url: str) -> bool:
                return await tus.delete(upload_url) == 204
        else:
            cleaner = ChunkdClient(url, token=token, session=http)

            async def remove(upload_url: str) -> bool:
                try:
                    await cleaner.abort(upload_url)
                except ChunkdClientError as exc:
                    return exc.status in (404, 410)  # gone already
                return True

        removed = await asyncio.gather(*(remove(x) for x in ids))
    return removed.count(False)


def table(r: dict[str, Any]) -> str:
    lat = r["chunk_latency_ms"]
    tus = r["protocol"] == "tus"
    size, chunk = r["size_bytes"] / MiB, r["chunk_size_bytes"] / MiB
    if tus:
        load = f"{r['sessions']} uploads x {size:g} MiB, {chunk:g} MiB PATCHes one after the other"
    else:
        load = (f"{r['sessions']} sessions x {size:g} MiB, {chunk:g} MiB chunks, "
                f"{r['parallel']} in flight each")
    pid, cpu, per_gib = r["server_pid"], r["server_cpu_s"], r["server_cpu_s_per_gib"]
    if cpu is not None:
        cpu_text = (f"{cpu:.2f} s" + (f", {per_gib:.2f} s per GiB received" if per_gib is not None
                                      else "") + " (user + system, with its children)")
    else:
        cpu_text = "n/a (server not local)" if pid is None else f"n/a (pid {pid} not readable)"
    left = r["left_on_server"]
    rows = [
        ("target", f"{r['url']} ({'tus 1.0' if tus else 'chunked API'})"),
        ("load", load),
        ("completed", f"{r['completed_sessions']}/{r['sessions']} "
                      + ("uploads" if tus else "sessions")
                      + (" (stopped by --duration)" if r["stopped_by_duration"] else "")),
        ("sent", f"{r['bytes_sent'] / MiB:.1f} MiB in {r['elapsed_s']:.2f} s"),
        ("throughput", f"{r['throughput_mb_s']} MB/s"),
        (f"{'PATCH' if tus else 'chunk'} latency",
         f"p50 {lat['p50']} ms, p95 {lat['p95']} ms, p99 {lat['p99']} ms "
         f"({r['chunks']} {'PATCHes' if tus else 'chunks'})"),
        ("finalize", f"{r['finalize_ms_median']} ms median" if r["finalize_ms_median"] else "-"),
        ("errors", ", ".join(f"{'no answer' if k == '0' else k}: {v}"
                             for k, v in r["errors_by_status"].items()) or "none"),
        ("left on server", f"{left} upload{'s' if left > 1 else ''}" if left else "none"),
        ("server peak RSS", f"{r['server_peak_rss_mib']} MiB (pid {pid})"
         if r["server_peak_rss_mib"] is not None else "n/a (server not local)"),
        ("server CPU", cpu_text),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def auth_message(exc: ChunkdClientError, url: str, have_token: bool) -> str:
    """One line for a 401/403: what the server said, and what to do about it."""
    said = f"{url} answered {exc.status} {exc.code}: {exc.message}"
    if exc.status == 403:
        return f"{said}; the token's subject may not do this"
    if not have_token:
        return f"{said}; the server has auth on: pass --token TOKEN or set CHUNKD_TOKEN"
    if exc.code == "token_expired":
        return said  # the server's message says what to do
    return f"{said}; check --token / CHUNKD_TOKEN"


def refusal_message(exc: ChunkdClientError, url: str, have_token: bool) -> str:
    """One line for what :func:`stops_the_bench`."""
    if exc.status in AUTH_STATUSES:
        return auth_message(exc, url, have_token)
    if exc.details.get("server", "").startswith("chunkd"):
        return f"{exc.message}; chunkd serves tus at its --tus-path (default /files/)"
    return exc.message


def add_parser(sub: Any) -> None:
    p = sub.add_parser("bench", help="load-test an upload server (chunkd's chunked API, or any "
                       "tus 1.0 server) with concurrent uploads",
                       description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--url", required=True, help="chunked: chunkd's base URL; tus: the creation "
                   "URL, e.g. http://127.0.0.1:8080/files/")
    p.add_argument("--protocol", choices=PROTOCOLS, default="chunked",
                   help="chunked: chunkd's chunked API (default); tus: tus 1.0, any server")
    p.add_argument("--sessions", type=int, default=4, help="concurrent uploads (default 4)")
    p.add_argument("--parallel", type=int, help="chunks in flight per upload (chunked: "
                   "default 4; tus: 1, its PATCHes are sequential)")
    p.add_argument("--size", default="256MiB", help="bytes per upload (default 256MiB)")
    p.add_argument("--chunk-size", default="50MiB", help="chunk / PATCH size (default 50MiB)")
    p.add_argument("--duration", default="300s", help="stop after this long (default 300s)")
    p.add_argument("--finalize", action="store_true",
                   help="chunked: finalize each upload (measures finalize; the server keeps the "
                   "files); tus: keep the finished uploads (not DELETEd)")
    p.add_argument("--server-pid", type=int,
                   help="pid for peak RSS and CPU seconds (found by itself if local)")
    p.add_argument("--token", default=os.environ.get("CHUNKD_TOKEN"),
                   help="bearer token, for a server with auth on (default: $CHUNKD_TOKEN)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def run(args: argparse.Namespace) -> int:
    try:
        size, chunk = parse_size(args.size), parse_size(args.chunk_size)
        duration = parse_duration(args.duration)
    except ConfigError as exc:
        print(f"chunkd bench: error: {exc}", file=sys.stderr)
        return 2
    tus = args.protocol == "tus"
    if tus and args.parallel not in (None, 1):
        print("chunkd bench: error: --parallel: the PATCHes of a tus upload go one after the "
              "other (each starts at the offset the last one ended at); use --sessions for "
              "concurrent uploads", file=sys.stderr)
        return 2
    parallel = 1 if tus else 4 if args.parallel is None else args.parallel
    if args.sessions < 1 or parallel < 1 or size < 1 or chunk < 1024 or duration <= 0:
        print("chunkd bench: error: sessions, parallel, size, chunk size (>=1KiB) and duration "
              "must be positive", file=sys.stderr)
        return 2
    if not args.url.startswith(("http://", "https://")):
        print("chunkd bench: error: --url must start with http:// or https://", file=sys.stderr)
        return 2
    pid = args.server_pid or local_server_pid(args.url)
    try:
        result = asyncio.run(run_bench(
            args.url, protocol=args.protocol, sessions=args.sessions, parallel=parallel,
            size=size, chunk_size=chunk, duration=duration, finalize=args.finalize,
            server_pid=pid, show_progress=not args.json and sys.stderr.isatty(),
            token=args.token or None,
        ))
    except KeyboardInterrupt:
        print("\nchunkd bench: interrupted; "
              + ("its uploads were deleted" if tus else "its sessions were aborted"),
              file=sys.stderr)
        return 130
    except BenchRefused as exc:
        left = (f" ({exc.left} upload{'s' if exc.left > 1 else ''} left on the server)"
                if exc.left else "")
        print(f"chunkd bench: error: {refusal_message(exc.error, args.url, bool(args.token))}"
              f"{left}", file=sys.stderr)
        return 1
    print(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode() if args.json else table(result))
    return 0 if result["completed_sessions"] == args.sessions else 1
