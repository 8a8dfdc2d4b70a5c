#!/usr/bin/env python3
"""The one-command benchmark (what ``make bench`` runs): core.py + peers.py -> docs/.

    .venv/bin/python benchmarks/run.py            # full: ~20 min on 2 cores; writes
                                                  #   docs/BENCHMARKS.md and docs/benchmarks.png
    .venv/bin/python benchmarks/run.py --quick    # smoke test: small sizes, 1 run; writes to
                                                  #   benchmarks/.peers/quick/ unless --out-dir
    .venv/bin/python benchmarks/run.py --auth     # also chunkd's throughput rows with auth on
                                                  #   (JWT), and auth on ÷ auth off; the same
                                                  #   as CHUNKD_BENCH_AUTH=1 make bench

On first use it installs its peers (tuspyserver + uvicorn + FastAPI + matplotlib in
benchmarks/.peers/py, @tus/server + @tus/file-store in benchmarks/.peers/node); later runs reuse
them. Nothing is added to chunkd's own environment. Needs python3, node/npm and the package
registries; the two measurement scripts run one after the other (never in parallel), each in
its own process, with the interpreter this script runs with (the project's venv).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
STEP_TIMEOUT = 3 * 3600  #: seconds, each of core.py and peers.py

try:
    import chunkd  # noqa: F401
except ImportError:  # started with another python: use the project's venv if there is one
    venv_python = REPO / ".venv" / "bin" / "python"
    if venv_python.exists() and Path(sys.executable) != venv_python:
        os.execv(str(venv_python), [str(venv_python), *sys.argv])
    raise SystemExit("run this with the project's venv: .venv/bin/python benchmarks/run.py "
                     "(make setup creates it)") from None

sys.path.insert(0, str(HERE))
import core  # noqa: E402
import peers  # noqa: E402


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def step(name: str, cmd: list[str]) -> None:
    say(f"== {name}: {' '.join(shlex.quote(c) for c in cmd)}")
    t0 = time.monotonic()
    # stderr (progress) goes straight through; stdout (the step's own report) is not needed.
    proc = subprocess.run(cmd, cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                          timeout=STEP_TIMEOUT)
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed with exit code {proc.returncode}")
    say(f"== {name} done in {time.monotonic() - t0:.0f} s")


def headline(pdoc: dict, cdoc: dict) -> list[str]:
    """One table with the figures that matter, and whether chunkd beats each peer by 1.5x."""
    r = pdoc["results"]
    med = lambda k: r[k]["median"] if k in r else float("nan")  # noqa: E731
    size = pdoc["size_bytes"]
    raw = med("raw:write")
    out = ["## Summary\n"]
    out.append(f"Medians of {pdoc['runs']} runs. Throughput in MB/s (10^6 bytes/s), "
               f"{core.human(pdoc['chunk_bytes'])} chunks over loopback, same disk for all; "
               f"raw write ({core.human(size)}, plain Python, no sync, same rounds) "
               f"{raw:.0f} MB/s.\n")
    out.append(f"| server | 1 x {core.human(size)} MB/s | chunkd off ÷ this | chunkd on ÷ this | "
               f"4 x {core.human(size // 4)} parallel MB/s | chunkd off ÷ this | chunkd on ÷ this | "
               "chunk p50 / p95 (1 x) | finalize* (1 x) | peak RSS (1 x / 4 x) | "
               "server CPU s/GiB (1 x / 4 x) |")
    out.append("|---|---|---|---|---|---|---|---|---|---|---|")
    ratio = peers.ratio_text  # one formatting rule for both reports

    def finalize(k: str) -> str:
        text = f"{med(k + ':finalize'):.1f} ms"
        if k + ":handoff" in r:
            text += f" + {med(k + ':handoff'):.1f} ms hand-off**"
        return text

    for kind, label in peers.SERVERS.items():
        a, b = f"1x:{kind}", f"4x:{kind}"
        if f"{a}:mbps" not in r:
            continue
        ra, rb = med(f"{a}:mbps"), med(f"{b}:mbps")
        out.append(
            f"| {label} | {ra:.0f} | {ratio(med('1x:chunkd-off:mbps'), ra)} | "
            f"{ratio(med('1x:chunkd-on:mbps'), ra)} | {rb:.0f} | "
            f"{ratio(med('4x:chunkd-off:mbps'), rb)} | {ratio(med('4x:chunkd-on:mbps'), rb)} | "
            f"{med(a + ':p50'):.0f} / {med(a + ':p95'):.0f} ms | {finalize(a)} | "
            f"{med(a + ':hwm'):.0f} / {med(b + ':hwm'):.0f} MiB | "
            f"{med(a + ':server_cpu_gib'):.2f} / {med(b + ':server_cpu_gib'):.2f} |")
    for kind in peers.CHUNKED_KINDS:
        k = f"1x-p4:{kind}:mbps"
        if k in r:
            out.append(f"| {peers.SERVERS[kind]}, 4 chunks in flight | {med(k):.0f} | | | | | | "
                       f"{med(f'1x-p4:{kind}:p50'):.0f} / {med(f'1x-p4:{kind}:p95'):.0f} ms | "
                       f"{med(f'1x-p4:{kind}:finalize'):.1f} ms | "
                       f"{med(f'1x-p4:{kind}:hwm'):.0f} MiB | "
                       f"{med(f'1x-p4:{kind}:server_cpu_gib'):.2f} |")
    out.append("")
    if any(k.endswith(":handoff") for k in r):
        out.append("\\*\\* chunkd's tus path answers the last PATCH before its completion "
                   "(libmagic, hand-off) is done; the hand-off figure is how long after that "
                   "answer the file was in `completed/`. The chunked API's finalize round trip "
                   "includes both.\n")
    out.append("chunkd ÷ raw write (same rounds): " + ", ".join(
        f"{peers.SERVERS[kind]} {sc}: {med(f'{sc}:{kind}:mbps') / raw:.2f} x"
        for kind in (*peers.CHUNKED_KINDS, *peers.CHUNKD_TUS_KINDS) for sc in ("1x", "4x", "1x-p4")
        if f"{sc}:{kind}:mbps" in r) + ".\n")
    for mine in ("chunkd-off", "chunkd-tus-off"):
        verdict = []
        for kind in peers.PEER_KINDS:
            for sc in ("1x", "4x"):
                if f"{sc}:{kind}:mbps" not in r or f"{sc}:{mine}:mbps" not in r:
                    continue
                x = med(f"{sc}:{mine}:mbps") / med(f"{sc}:{kind}:mbps")
                verdict.append(f"{peers.SERVERS[kind]} {sc}: {x:.2f} x "
                               f"({'≥' if x >= 1.5 else '<'} 1.5)")
        if verdict:
            out.append(f"{peers.SERVERS[mine]} (no fsync, like both peers) ÷ peer: "
                       + "; ".join(verdict) + ".\n")
    sp = peers.same_protocol(pdoc)
    if sp:
        out.append("### Same protocol (tus): chunkd vs the peers\n")
        out.extend(sp)
    res = core_results(cdoc)
    if core.auth_rows(res):
        out.append(f"chunkd {core.AUTH_LABEL} ÷ auth off (core.py, {core.human(cdoc['size_bytes'])}, "
                   "same rounds): " + "; ".join(core.auth_summary(res)) + ".\n")
    return out


def core_results(cdoc: dict) -> core.Results:
    return core.Results(rows={k: v["runs"] for k, v in cdoc["results"].items()},
                        units={k: v["unit"] for k, v in cdoc["results"].items()})


WHERE_THE_TIME_GOES = HERE / "where-the-time-goes.md"  #: hand-written from profile.py's output


def targets(pdoc: dict, cdoc: dict) -> list[str]:
    """The issue's targets, each with the measured medians, met / missed and by how much."""
    c = cdoc["results"]
    r = pdoc["results"]
    cm = lambda k: c[k]["median"] if k in c else float("nan")  # noqa: E731
    pm = lambda k: r[k]["median"] if k in r else float("nan")  # noqa: E731
    size = core.human(cdoc["size_bytes"])
    rows: list[tuple[str, str, str, bool, str]] = []  # target, measured, need, met, by how much

    def ratio_row(target: str, value: float, need: float, detail: str,
                  at_most: bool = False) -> None:
        """A ratio that must be ≥ ``need`` (or, ``at_most``, ≤ ``need``)."""
        if at_most:
            met = value <= need
            by = (f"{(1 - value / need) * 100:.0f}% under" if met else
                  f"{(value / need - 1) * 100:.0f}% over ({value:.2f} of {need:.2f})")
        else:
            met = value >= need
            by = (f"+{(value / need - 1) * 100:.0f}% over" if met else
                  f"{(1 - value / need) * 100:.0f}% short ({value:.2f} of {need:.2f})")
        rows.append((target, f"{value:.2f} x ({detail})", f"{'≤' if at_most else '≥'} {need:g} x",
                     met, by))

    raw, fsync = cm("raw:write"), cm("raw:fsync_end")
    for par in (1, 4):
        v = cm(f"chunkd:durable=off:parallel={par}")
        ratio_row(f"one {size} upload, --durable off, {par} in flight ÷ raw write",
                  v / raw, 0.8, f"{v:.0f} ÷ {raw:.0f} MB/s")
    for par in (1, 4):
        v = cm(f"chunkd:durable=on:parallel={par}")
        ratio_row(f"one {size} upload, --durable on, {par} in flight ÷ raw write + fsync",
                  v / fsync, 0.9, f"{v:.0f} ÷ {fsync:.0f} MB/s")
    for durable in (True, False):  # the limit row: the same client, disk and --durable
        for par in (1, 4):
            if core.limit_key(durable, par) in c:
                v, lim = cm(core.chunkd_key(durable, par)), cm(core.limit_key(durable, par))
                ratio_row(f"one {size} upload, --durable {'on' if durable else 'off'}, {par} in "
                          "flight ÷ the limit receiver (recv_into + pwrite"
                          f"{' + fdatasync' if durable else ''})", v / lim, 0.9,
                          f"{v:.0f} ÷ {lim:.0f} MB/s")
    for durable in (True, False):  # server CPU per GiB, chunkd ÷ the bare aiohttp sink
        for par in (1, 4):
            mine, sink = core.chunkd_key(durable, par), f"sink:parallel={par}"
            if f"{mine}:server_cpu_gib" in c and f"{sink}:server_cpu_gib" in c:
                v, s = cm(f"{mine}:server_cpu_gib"), cm(f"{sink}:server_cpu_gib")
                ratio_row(f"server CPU s/GiB, --durable {'on' if durable else 'off'}, {par} in "
                          "flight: chunkd ÷ the bare aiohttp sink", v / s, 2,
                          f"{v:.2f} ÷ {s:.2f} s/GiB", at_most=True)
    fin = sorted((k.split(":", 1)[1] for k in c if k.startswith("finalize:")),
                 key=_bytes)
    if len(fin) > 1:
        lo, hi = fin[0], fin[-1]
        v = cm(f"finalize:{hi}") / cm(f"finalize:{lo}")
        met = v <= 2
        rows.append((f"finalize time {hi} / {lo}", f"{v:.2f} x ({cm(f'finalize:{hi}'):.1f} ÷ "
                     f"{cm(f'finalize:{lo}'):.1f} ms)", "≤ 2 x", met,
                     f"{(1 - v / 2) * 100:.0f}% under" if met else f"{(v / 2 - 1) * 100:.0f}% over"))
    hwm = {t.split(":", 2)[2]: cm(t) for t in c if t.startswith("rss:hwm-after:")}
    if hwm:
        peak = max(hwm.values())
        rows.append(("peak server RSS (VmHWM), 16 parallel chunks of " + " / ".join(hwm),
                     " / ".join(f"{v:.1f} MiB" for v in hwm.values()), "< 100 MiB",
                     peak < 100, f"{100 - peak:.1f} MiB under" if peak < 100
                     else f"{peak - 100:.1f} MiB over"))
        big, small = hwm.get("95 MiB"), hwm.get("8 MiB")
        if big is not None and small is not None:
            rows.append(("peak RSS with 95 MiB chunks no larger than with 8 MiB chunks",
                         f"{big:.1f} vs {small:.1f} MiB", "95 ≤ 8", big <= small,
                         f"{small - big:.1f} MiB smaller" if big <= small else
                         f"{big - small:.1f} MiB ({(big / small - 1) * 100:.1f}%) larger"))
    if "many:completed" in c:  # every round: all sessions completed, no error status at all
        done, errs = c["many:completed"]["runs"], c["many:errors"]["runs"]
        n, busy = core.MANY_SESSIONS, c["many:errors_503"]["runs"]
        met = min(done) == n and max(errs) == 0
        rows.append((f"{n} sessions × {core.MANY_PARALLEL} chunks in flight "
                     f"({core.human(core.MANY_SIZE)} sessions, {core.human(core.MANY_CHUNK)} "
                     "chunks, --durable on): no error",
                     f"at worst {min(done):.0f}/{n} completed, {max(errs):.0f} error answers "
                     f"({max(busy):.0f} 503 server_busy) in a round; chunk p99 "
                     f"{cm('many:p99'):.0f} ms (p50 {cm('many:p50'):.0f}, p95 "
                     f"{cm('many:p95'):.0f})", f"{n}/{n}, no error status", met,
                     "none in any round" if met else
                     f"{n - min(done):.0f} of {n} sessions failed; error statuses per round "
                     f"{core.many_statuses(core_results(cdoc))}"))
    scenarios = (("1x", f"1 x {core.human(pdoc['size_bytes'])}"),
                 ("4x", f"4 x {core.human(pdoc['size_bytes'] // 4)} in parallel"))
    for mine in ("chunkd-on", "chunkd-tus-on"):  # server CPU per GiB, chunkd ÷ the lowest peer
        for sc, label in scenarios:
            peer_cpu = {k: pm(f"{sc}:{k}:server_cpu_gib") for k in peers.PEER_KINDS
                        if f"{sc}:{k}:server_cpu_gib" in r}
            if f"{sc}:{mine}:server_cpu_gib" not in r or not peer_cpu:
                continue
            v, low = pm(f"{sc}:{mine}:server_cpu_gib"), min(peer_cpu.values())
            ratio_row(f"server CPU s/GiB the lowest of the servers: {peers.SERVERS[mine]} ÷ "
                      f"the lower of {' and '.join(peers.SERVERS[k] for k in peer_cpu)}, {label}",
                      v / low, 1,
                      f"{v:.2f} vs " + ", ".join(f"{peers.SERVERS[k]} {x:.2f}"
                                                 for k, x in peer_cpu.items()) + " s/GiB",
                      at_most=True)
    for kind in peers.PEER_KINDS:
        for sc, label in scenarios:
            if f"{sc}:{kind}:mbps" not in r:
                continue
            peer = pm(f"{sc}:{kind}:mbps")
            for mine, what in (("chunkd-off", "chunkd --durable off"),
                               ("chunkd-on", "chunkd --durable on"),
                               ("chunkd-tus-off", "chunkd tus --durable off (same protocol)"),
                               ("chunkd-tus-on", "chunkd tus --durable on (same protocol)")):
                if f"{sc}:{mine}:mbps" not in r:
                    continue
                v = pm(f"{sc}:{mine}:mbps")
                ratio_row(f"{what} ÷ {peers.SERVERS[kind]}, {label}",
                          v / peer, 1.5, f"{v:.0f} ÷ {peer:.0f} MB/s")
        ours, theirs = pm("1x:chunkd-on:finalize"), pm(f"1x:{kind}:finalize")
        met = ours < theirs
        rows.append((f"finalize faster than {peers.SERVERS[kind]} (1 x {core.human(pdoc['size_bytes'])})",
                     f"{ours:.1f} vs {theirs:.1f} ms*", "chunkd < peer", met,
                     f"{theirs - ours:.1f} ms faster" if met else f"{ours - theirs:.1f} ms slower"))
    met_n = sum(1 for row in rows if row[3])
    out = ["## Targets\n"]
    out.append(f"The issue's targets, checked on this run (medians of {cdoc['runs']} runs): "
               f"**{met_n} of {len(rows)} met**. Throughput ratios compare medians measured in "
               "the same rounds; the throughput, limit receiver, server CPU and RSS figures come "
               "from `core.py`, the peer ratios and the finalize comparison from `peers.py`.\n")
    out.append("| target | measured | needed | | by how much |")
    out.append("|---|---|---|---|---|")
    for target, measured, need, met, by in rows:
        out.append(f"| {target} | {measured} | {need} | {'met' if met else '**missed**'} | {by} |")
    out.append("")
    out.append("\\* tus has no finalize step: the peers' figure is how much longer their last "
               "PATCH took than its bytes take at the upload's average speed (they only rewrite "
               "a small .info/.json file at completion; they neither check nor move the file), so "
               "it is about 0 ± noise. chunkd's is the `POST /finalize` round trip with --durable "
               "on (size check, libmagic, hand-off by rename). Against the seed's design "
               "(concatenate + fsync) see the finalize table in the core section. The rows "
               "marked *same protocol* send the very same tus requests (bytes, PATCH size, "
               "concurrency) to chunkd's tus path as to the peer.\n")
    return out


def _bytes(tag: str) -> int:
    n, unit = tag.split()
    return int(n) * {"MiB": core.MiB, "GiB": core.GiB}.get(unit, 1)


def write_markdown(path: Path, pdoc: dict, cdoc: dict, command: str, png: str | None) -> None:
    facts = cdoc.get("machine") or pdoc["machine"]
    out = ["# chunkd benchmarks\n"]
    out.append(f"Produced by `{command}` (`make bench` runs it without flags), {time.strftime('%Y-%m-%d %H:%M %Z')}. "
               "Scripts: `benchmarks/run.py` runs `benchmarks/core.py` (raw disk vs chunkd, "
               "finalize, memory) and then `benchmarks/peers.py` (chunkd's chunked API and its tus "
               "path vs tuspyserver and @tus/server), one after the other on an otherwise idle machine; the peers are "
               "installed in `benchmarks/.peers/`, never into chunkd's environment. Client and "
               "servers share the machine's cores, over 127.0.0.1.\n")
    out.append("| machine | |")
    out.append("|---|---|")
    for k, v in facts.items():
        out.append(f"| {k} | {v} |")
    out.append("")
    if png:
        out.append(f"![throughput and chunk latency]({png})\n")
    out.extend(targets(pdoc, cdoc))
    if WHERE_THE_TIME_GOES.exists():
        out.append(WHERE_THE_TIME_GOES.read_text().rstrip() + "\n")
    out.extend(headline(pdoc, cdoc))
    out.append(peers.report(pdoc).replace("## chunkd vs tus servers", "## chunkd vs tus servers "
                                          "(details)", 1))
    res = core_results(cdoc)
    out.append(core.report(res, cdoc["machine"], cdoc["command"], cdoc["size_bytes"],
                           cdoc["runs"]).replace("## chunkd core benchmark",
                                                 "## chunkd vs the raw disk (core.py)", 1))
    path.write_text("\n".join(out).rstrip() + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small sizes, 1 run: a smoke test")
    p.add_argument("--runs", type=int, default=None, help="rounds (default 3; 1 with --quick)")
    p.add_argument("--out-dir", type=Path, default=None,
                   help="where BENCHMARKS.md and benchmarks.png go (default docs/, or "
                        "benchmarks/.peers/quick/ with --quick)")
    p.add_argument("--no-install", action="store_true", help="do not install the peers")
    p.add_argument("--auth", action="store_true",
                   default=os.environ.get("CHUNKD_BENCH_AUTH", "") not in ("", "0"),
                   help="also measure chunkd's throughput rows with auth on (a temporary "
                        "--jwt-secret-file, a PyJWT token) and report auth on ÷ auth off "
                        "(default: on if $CHUNKD_BENCH_AUTH is set, e.g. "
                        "CHUNKD_BENCH_AUTH=1 make bench)")
    args = p.parse_args(argv)
    runs = args.runs or (1 if args.quick else 3)
    out_dir = args.out_dir or (peers.PEERS / "quick" if args.quick else REPO / "docs")
    out_dir.mkdir(parents=True, exist_ok=True)
    command = " ".join(shlex.quote(a) for a in [
        os.path.relpath(sys.executable, REPO) if sys.executable.startswith(str(REPO)) else
        sys.executable, os.path.relpath(HERE / "run.py", REPO),
        *(sys.argv[1:] if argv is None else argv)])
    if args.auth and "--auth" not in command.split():  # from $CHUNKD_BENCH_AUTH: say so
        command += " --auth"

    if not args.no_install:
        peers.ensure_peers()
    with tempfile.TemporaryDirectory(prefix="chunkd-bench-run-") as tmp:
        core_json, peers_json = Path(tmp) / "core.json", Path(tmp) / "peers.json"
        core_cmd = [sys.executable, str(HERE / "core.py"), "--runs", str(runs),
                    "--json", str(core_json)]
        peers_cmd = [sys.executable, str(HERE / "peers.py"), "--runs", str(runs), "--no-install",
                     "--json", str(peers_json)]
        if args.auth:
            core_cmd += ["--auth"]
        if args.quick:
            core_cmd += ["--size-gib", "0.25", "--finalize-mib", "100,200",
                         "--rss-chunk-mib", "8,20"]
            peers_cmd += ["--size-mib", "256"]
        step("core.py", core_cmd)
        step("peers.py", peers_cmd)
        cdoc, pdoc = json.loads(core_json.read_text()), json.loads(peers_json.read_text())
        # the raw numbers of the last run, beside the peers (not committed)
        (peers.PEERS / "last-run.json").write_text(json.dumps(
            {"command": command, "core": cdoc, "peers": pdoc}, indent=1))
        png = out_dir / "benchmarks.png"
        try:
            subprocess.run([str(peers.PY_BIN), str(HERE / "plot.py"), str(peers_json), str(png)],
                           check=True, timeout=300)
            png_ref: str | None = png.name
        except (OSError, subprocess.SubprocessError) as exc:
            say(f"chart not drawn: {exc}")
            png_ref = None
        md = out_dir / "BENCHMARKS.md"
        write_markdown(md, pdoc, cdoc, command, png_ref)
    say(f"wrote {md}" + (f" and {png}" if png_ref else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
