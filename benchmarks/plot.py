#!/usr/bin/env python3
"""Chart for docs/BENCHMARKS.md from peers.py's JSON: throughput bars and chunk latency bars.

Runs with the benchmark's own venv (matplotlib is never a dependency of chunkd):

    benchmarks/.peers/py/bin/python benchmarks/plot.py PEERS_JSON OUT_PNG
"""

from __future__ import annotations

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

SERVERS = {
    "chunkd-off": ("chunkd --durable off", "#1f77b4"),
    "chunkd-on": ("chunkd --durable on", "#6baed6"),
    "chunkd-tus-off": ("chunkd tus --durable off", "#9467bd"),
    "chunkd-tus-on": ("chunkd tus --durable on", "#b39ddb"),
    "tuspyserver": ("tuspyserver (uvicorn)", "#d62728"),
    "tus-node": ("@tus/server (Node)", "#2ca02c"),
}


def human(n: int) -> str:
    gib, mib = 1024**3, 1024**2
    return f"{n // gib} GiB" if n % gib == 0 else f"{n // mib} MiB"


def main(src: str, out: str) -> None:
    doc = json.load(open(src))
    r = doc["results"]
    size = doc["size_bytes"]
    med = lambda k: r[k]["median"] if k in r else None  # noqa: E731
    groups = [("1x", f"1 x {human(size)}\nsequential"),
              ("4x", f"4 x {human(size // 4)} in parallel\neach sequential"),
              ("1x-p4", f"1 x {human(size)}\n4 chunks in flight")]

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(14, 5.4))
    # only the servers this run measured (a run with --only has fewer bars, and older JSON no tus)
    servers = {k: v for k, v in SERVERS.items() if any(f"{g}:{k}:mbps" in r for g, _ in groups)}
    width = 0.8 / max(1, len(servers))
    centre = (len(servers) - 1) / 2
    for i, (kind, (label, color)) in enumerate(servers.items()):
        xs, ys = [], []
        for g, (key, _) in enumerate(groups):
            v = med(f"{key}:{kind}:mbps")
            if v is not None:
                xs.append(g + (i - centre) * width)
                ys.append(v)
        bars = ax1.bar(xs, ys, width, label=label, color=color)
        ax1.bar_label(bars, fmt="%.0f", fontsize=6, padding=2)
    raw = med("raw:write")
    if raw:
        ax1.axhline(raw, color="k", ls="--", lw=1, label=f"raw write, no sync ({raw:.0f} MB/s)")
    ax1.set_xticks(range(len(groups)), [g[1] for g in groups], fontsize=8)
    ax1.set_ylabel("MB/s (10^6 bytes/s), median")
    ax1.set_title(f"Upload throughput, {human(doc['chunk_bytes'])} chunks, loopback")
    ax1.legend(fontsize=7, loc="upper right")
    ax1.set_ylim(0, max(v["median"] for k, v in r.items() if k.endswith(":mbps") or k == "raw:write")
                 * 1.25)

    lat_groups = groups[:2]
    for i, (kind, (label, color)) in enumerate(servers.items()):
        for g, (key, _) in enumerate(lat_groups):
            p50, p95 = med(f"{key}:{kind}:p50"), med(f"{key}:{kind}:p95")
            if p50 is None:
                continue
            x = g + (i - centre) * width
            ax2.bar(x, p95, width, color=color, alpha=0.35)
            ax2.bar(x, p50, width, color=color, label=label if g == 0 else None)
            ax2.text(x, p95, f"{p95:.0f}", ha="center", va="bottom", fontsize=6)
    ax2.set_xticks(range(len(lat_groups)), [g[1] for g in lat_groups], fontsize=8)
    ax2.set_ylabel("ms per chunk request (solid p50, pale p95)")
    ax2.set_title("Chunk / PATCH latency, median of runs")
    ax2.legend(fontsize=7, loc="upper left")
    fig.suptitle(f"chunkd vs tus servers: median of {doc['runs']} runs; "
                 f"{doc['machine'].get('nproc', '?')} cores, {doc['machine'].get('ram', '?')} RAM",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
