"""``chunkd bench``: drive many concurrent chunked uploads against a chunkd URL and measure.

Data is generated (one random MiB repeated behind a WAV header), not read from disk, so the
client is not the bottleneck. Everything is bounded: ``--sessions`` uploads of ``--size`` each,
stopped after ``--duration`` seconds whatever happens. Sessions are aborted afterwards (their
bytes removed) unless ``--finalize`` asks to finalize them (the folder hand-off then keeps them).
A server with auth on needs ``--token`` (or ``$CHUNKD_TOKEN``), sent as ``Authorization: Bearer``
with every request; a 401 or 403 stops the bench at once (and says so in one line).
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

import orjson
from tqdm import tqdm

from chunkd.client.core import ChunkdClient, ChunkdClientError, Progress
from chunkd.client.sources import GeneratedSource
from chunkd.config import ConfigError, MiB, parse_duration, parse_size


def wav_header(size: int) -> bytes:
    """A 16 kHz mono PCM WAV header for ``size`` bytes in all, so libmagic says audio/x-wav."""
    data = min(max(0, size - 44), 0xFFFFFFFF - 36)  # RIFF sizes are 32-bit; libmagic does not mind
    return (b"RIFF" + struct.pack("<I", 36 + data) + b"WAVEfmt "
            + struct.pack("<IHHIIHH", 16, 1, 1, 16000, 32000, 2, 16)
            + b"data" + struct.pack("<I", data))


class BenchAuthError(Exception):
    """The server refused the bench's credentials (401) or access (403): no point going on."""

    def __init__(self, error: ChunkdClientError, left: int = 0) -> None:
        super().__init__(error.message)
        self.error = error
        self.left = left  #: sessions it created but could not abort (the token is refused)


#: Answers that cannot get better by trying more uploads: wrong, missing or expired token.
AUTH_STATUSES = (401, 403)


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
    """Run the load; raises :class:`BenchAuthError` (after aborting what it created) on the
    first 401/403."""
    client = ChunkdClient(url, parallel=parallel, chunk_size=chunk_size, checksum=False,
                          retries=3, token=token)
    sources = [GeneratedSource(size, name=f"bench-{i}.wav", header=wav_header(size), seed=i)
               for i in range(sessions)]
    bar = tqdm(total=size * sessions, unit="B", unit_scale=True, unit_divisor=1024,
               desc="chunkd bench", disable=not show_progress, dynamic_ncols=True,
               file=sys.stderr)
    sent = [0] * sessions
    latencies: list[float] = []
    finalize_times: list[float] = []
    session_ids: list[str] = []
    finalized: set[str] = set()
    completed = 0
    failures: list[str] = []
    refused: list[ChunkdClientError] = []
    stop = asyncio.Event()  # set on the first 401/403: every other upload would get it too

    async def one(i: int) -> None:
        nonlocal completed

        def progress(p: Progress) -> None:
            bar.update(p.sent_bytes - sent[i])
            sent[i] = p.sent_bytes

        try:
            result = await client.upload(sources[i], finalize=False, on_progress=progress,
                                         on_session=session_ids.append)
            latencies.extend(result.chunk_latencies)
            if finalize:
                t0 = time.monotonic()
                await client.finalize(result.session_id)
                finalize_times.append(time.monotonic() - t0)
                finalized.add(result.session_id)
            completed += 1
        except ChunkdClientError as exc:
            if exc.status in AUTH_STATUSES:
                refused.append(exc)
                stop.set()
            failures.append(f"{exc.status} {exc.code}: {exc.message}")

    start = time.monotonic()
    tasks = [asyncio.create_task(one(i)) for i in range(sessions)]
    # Until every upload is done, --duration is up, or the first 401/403.
    watchers = [asyncio.create_task(asyncio.wait(tasks)), asyncio.create_task(stop.wait())]
    try:
        await asyncio.wait(watchers, timeout=duration, return_when=asyncio.FIRST_COMPLETED)
        pending = [t for t in tasks if not t.done()]
    finally:  # --duration, Ctrl-C, a 401/403 or an error: stop every upload, leave nothing behind
        for t in [*watchers, *tasks]:
            t.cancel()
        await asyncio.gather(*watchers, *tasks, return_exceptions=True)
        bar.close()
        elapsed = time.monotonic() - start
        rss = peak_rss_mib(server_pid) if server_pid else None
        await client.close()
        left = await _abort_all(url, session_ids if not finalize else
                                [sid for sid in session_ids if sid not in finalized], token=token)
    if refused:
        raise BenchAuthError(refused[0], left)
    total = sum(sent)
    return {
        "url": url,
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
        "errors_by_status": {str(k): v for k, v in sorted(client.errors.items())},
        "failures": failures[:20],
        "server_pid": server_pid,
        "server_peak_rss_mib": round(rss, 1) if rss is not None else None,
    }


async def _abort_all(url: str, session_ids: list[str], *, token: str | None = None) -> int:
    """Abort sessions concurrently, each with a short timeout (their reserved space is freed);
    return how many the server refused to abort for the token (401/403)."""
    if not session_ids:
        return 0
    async with ChunkdClient(url, timeout=10, token=token) as cleaner:
        async def abort(sid: str) -> bool:
            try:
                await cleaner.abort(sid)
            except ChunkdClientError as exc:
                # gone already, or the server is not answering: the sweeper will do it
                return exc.status in AUTH_STATUSES
            return False

        return sum(await asyncio.gather(*(abort(sid) for sid in session_ids)))


def table(r: dict[str, Any]) -> str:
    lat = r["chunk_latency_ms"]
    rows = [
        ("target", r["url"]),
        ("load", f"{r['sessions']} sessions x {r['size_bytes'] / MiB:g} MiB, "
                 f"{r['chunk_size_bytes'] / MiB:g} MiB chunks, {r['parallel']} in flight each"),
        ("completed", f"{r['completed_sessions']}/{r['sessions']} sessions"
                      + (" (stopped by --duration)" if r["stopped_by_duration"] else "")),
        ("sent", f"{r['bytes_sent'] / MiB:.1f} MiB in {r['elapsed_s']:.2f} s"),
        ("throughput", f"{r['throughput_mb_s']} MB/s"),
        ("chunk latency", f"p50 {lat['p50']} ms, p95 {lat['p95']} ms, p99 {lat['p99']} ms "
                          f"({r['chunks']} chunks)"),
        ("finalize", f"{r['finalize_ms_median']} ms median" if r["finalize_ms_median"] else "-"),
        ("errors", ", ".join(f"{k or 'no answer'}: {v}" for k, v in r["errors_by_status"].items())
         or "none"),
        ("server peak RSS", f"{r['server_peak_rss_mib']} MiB (pid {r['server_pid']})"
         if r["server_peak_rss_mib"] is not None else "n/a (server not local)"),
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


def add_parser(sub: Any) -> None:
    p = sub.add_parser("bench", help="load-test a chunkd server with concurrent uploads",
                       description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--url", required=True)
    p.add_argument("--sessions", type=int, default=4, help="concurrent uploads (default 4)")
    p.add_argument("--parallel", type=int, default=4, help="chunks in flight per upload (4)")
    p.add_argument("--size", default="256MiB", help="bytes per upload (default 256MiB)")
    p.add_argument("--chunk-size", default="50MiB", help="chunk size (default 50MiB)")
    p.add_argument("--duration", default="300s", help="stop after this long (default 300s)")
    p.add_argument("--finalize", action="store_true",
                   help="finalize each upload (measures finalize; the server keeps the files)")
    p.add_argument("--server-pid", type=int, help="pid for peak RSS (found by itself if local)")
    p.add_argument("--token", default=os.environ.get("CHUNKD_TOKEN"),
                   help="chunkd's bearer token, for a server with auth on (default: $CHUNKD_TOKEN)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def run(args: argparse.Namespace) -> int:
    try:
        size, chunk = parse_size(args.size), parse_size(args.chunk_size)
        duration = parse_duration(args.duration)
    except ConfigError as exc:
        print(f"chunkd bench: error: {exc}", file=sys.stderr)
        return 2
    if args.sessions < 1 or args.parallel < 1 or size < 1 or chunk < 1024 or duration <= 0:
        print("chunkd bench: error: sessions, parallel, size, chunk size (>=1KiB) and duration "
              "must be positive", file=sys.stderr)
        return 2
    if not args.url.startswith(("http://", "https://")):
        print("chunkd bench: error: --url must start with http:// or https://", file=sys.stderr)
        return 2
    pid = args.server_pid or local_server_pid(args.url)
    try:
        result = asyncio.run(run_bench(
            args.url, sessions=args.sessions, parallel=args.parallel, size=size,
            chunk_size=chunk, duration=duration, finalize=args.finalize, server_pid=pid,
            show_progress=not args.json and sys.stderr.isatty(), token=args.token or None,
        ))
    except KeyboardInterrupt:
        print("\nchunkd bench: interrupted; its sessions were aborted", file=sys.stderr)
        return 130
    except BenchAuthError as exc:
        left = (f" ({exc.left} session{'s' if exc.left > 1 else ''} left to expire on the "
                "server)" if exc.left else "")
        print(f"chunkd bench: error: {auth_message(exc.error, args.url, bool(args.token))}"
              f"{left}", file=sys.stderr)
        return 1
    print(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode() if args.json else table(result))
    return 0 if result["completed_sessions"] == args.sessions else 1
