#!/usr/bin/env python3
"""Where chunkd's server spends its time during one upload: py-spy against the server's PID.

Run from the repository root with the project's venv (py-spy lives in benchmarks/.peers/py, which
``benchmarks/peers.py`` installs; never in chunkd's environment; it needs ptrace rights on the
server, e.g. root or kernel.yama.ptrace_scope=0):

    .venv/bin/python benchmarks/profile.py [--size-mib 2048] [--parallel 1] [--durable off]

It starts one ``chunkd serve`` on 127.0.0.1 (fresh data dir), attaches
``py-spy record --threads --nonblocking --format raw`` to it, sends one upload through
``chunkd.client.ChunkdClient`` (GeneratedSource, no checksums, 50 MiB chunks), stops py-spy and
the server by PID and prints, per thread group (event loop / write threads), the frames with the
most samples: "self" (the frame that was running) and "total" (the frame anywhere on the stack).
With ``--speedscope FILE`` it also records a speedscope profile for a flame graph. py-spy only
sees Python frames: time inside C (uvloop, the kernel's copy into the page cache) is charged to the
Python frame that called it.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import functools
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import aiohttp  # noqa: E402

import core  # noqa: E402
from chunkd.client import ChunkdClient, GeneratedSource  # noqa: E402

PY_SPY = HERE / ".peers" / "py" / "bin" / "py-spy"
RATE = 200  #: samples per second


def stop_profiler(spy: subprocess.Popen[bytes]) -> None:
    if spy.poll() is None:
        os.kill(spy.pid, signal.SIGINT)  # py-spy writes its output on SIGINT


def short(frame: str) -> str:
    """'func (path/to/module.py:123)' -> 'func (module.py:123)'."""
    m = re.match(r"(.*) \((.*?):(\d+)\)$", frame)
    if not m:
        return frame
    func, path, line = m.groups()
    parts = Path(path).parts
    tail = "/".join(parts[-2:]) if "chunkd" in parts or "aiohttp" in parts else parts[-1]
    return f"{func} ({tail}:{line})"


def summarize(raw: Path, seconds: float, top: int) -> str:
    """Text tables from py-spy's raw (collapsed stacks) output."""
    groups: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    selfs: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    totals: collections.Counter[str] = collections.Counter()
    for line in raw.read_text(errors="replace").splitlines():
        if not line.strip():
            continue
        stack, _, count = line.rpartition(" ")
        n = int(count)
        frames = stack.split(";")
        thread, frames = frames[0], frames[1:]
        # Group the threads: the event loop (runs the asyncio loop) vs the worker threads.
        group = "write threads (asyncio.to_thread pool)" if any(
            "_worker (concurrent/futures/thread.py" in f or "thread.py" in f and "_worker" in f
            for f in frames) else "event loop thread"
        totals[group] += n
        if frames:
            selfs[group][short(frames[-1])] += n
        for f in set(short(x) for x in frames):
            groups[group][f] += n
        del thread
    out = []
    all_samples = sum(totals.values())
    out.append(f"{all_samples} samples at {RATE}/s over {seconds:.2f} s of upload "
               f"(= {all_samples / RATE:.2f} s of Python-visible busy time across threads)")
    for group, n in sorted(totals.items(), key=lambda kv: -kv[1]):
        out.append(f"\n## {group}: {n} samples ({n / RATE:.2f} s, "
                   f"{100 * n / all_samples:.0f}% of all samples)")
        out.append("self (running):")
        for f, c in selfs[group].most_common(top):
            out.append(f"  {100 * c / n:5.1f}%  {f}")
        out.append("total (on the stack):")
        for f, c in groups[group].most_common(top + 6):
            out.append(f"  {100 * c / n:5.1f}%  {f}")
    return "\n".join(out)


async def upload(url: str, size: int, parallel: int, on_done=None) -> float:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
        client = ChunkdClient(url, parallel=parallel, chunk_size=core.CHUNK, retries=1,
                              checksum=False, timeout=300, session=http)
        source = GeneratedSource(size, name="bench.wav", header=core.AUDIO_HEAD.read_bytes())
        t0 = time.perf_counter()
        res = await client.upload(source, finalize=False)
        seconds = time.perf_counter() - t0
        if on_done is not None:
            on_done()  # stop sampling before the abort (its rmtree is not the upload's time)
        await client.abort(res.session_id)
        return seconds


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size-mib", type=int, default=2048)
    p.add_argument("--parallel", type=int, default=1)
    p.add_argument("--durable", choices=("on", "off"), default="off")
    p.add_argument("--top", type=int, default=12)
    p.add_argument("--native", action="store_true",
                   help="also sample C frames (uvloop, libc); py-spy then pauses the server per "
                        "sample, which slows it down")
    p.add_argument("--speedscope", type=Path, default=None,
                   help="also write a speedscope JSON here (a second, separate upload)")
    args = p.parse_args()
    if not PY_SPY.exists():
        raise SystemExit(f"{PY_SPY} missing: benchmarks/.peers/py/bin/pip install py-spy")
    size = args.size_mib * core.MiB
    scratch = Path(tempfile.mkdtemp(prefix="chunkd-profile-"))
    try:
        runs = [("raw", scratch / "profile.txt")]
        if args.speedscope:
            runs.append(("speedscope", args.speedscope))
        for fmt, out in runs:
            with core.Server(scratch, durable=args.durable == "on") as server:
                spy = subprocess.Popen(
                    [str(PY_SPY), "record", "--pid", str(server.pid), "--rate", str(RATE),
                     "--threads", *(["--native"] if args.native else ["--nonblocking"]),
                     "--format", fmt, "--output", str(out)],
                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE)

                stop_spy = functools.partial(stop_profiler, spy)

                try:
                    time.sleep(1.0)  # py-spy attached
                    seconds = asyncio.run(upload(server.url, size, args.parallel, stop_spy))
                finally:
                    stop_spy()
                    try:
                        _, err = spy.communicate(timeout=60)
                    except subprocess.TimeoutExpired:
                        os.kill(spy.pid, signal.SIGKILL)
                        _, err = spy.communicate(timeout=10)
            if not out.exists():
                raise SystemExit(f"py-spy wrote nothing: {err.decode(errors='replace')[-2000:]}")
            say = (f"chunkd --durable {args.durable}, one {core.human(size)} upload, "
                   f"{args.parallel} in flight: {core.mb_per_s(size, seconds):.0f} MB/s "
                   f"({seconds:.2f} s) while sampled")
            print(f"# {fmt}: {say}", file=sys.stderr)
            if fmt == "raw":
                print(f"# {say}\n")
                print(summarize(out, seconds, args.top))
    finally:
        import shutil
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
