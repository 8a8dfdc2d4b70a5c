"""The hostile battery (scripts/battery.py) against a real ``chunkd serve``, for 25 s (its three
faults run one after another and need the time): normal uploads by the chunk API and by tus
1.0 (at ``/files/``, concatenations too), hostile requests on both and the injected faults
(full disk, read-only remount, kill -9 and restart). No answer may be a 500 or an undocumented
5xx, no acknowledged chunk and no tus byte may be lost, a tus HEAD is never 5xx, and every fault
must really have been injected."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

BATTERY = Path(__file__).resolve().parent.parent / "scripts" / "battery.py"

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("mkfs.ext4") is None or shutil.which("mount") is None,
    reason="the battery's disk faults need root, mkfs.ext4 and mount (a loop-mounted ext4 image)")


def test_battery_25s() -> None:
    proc = subprocess.run(
        [sys.executable, str(BATTERY), "--duration", "25", "--settle", "10", "--json"],
        capture_output=True, text=True, timeout=150,
    )
    assert proc.stdout.strip(), f"no JSON report (exit {proc.returncode}): {proc.stderr[-3000:]}"
    report = json.loads(proc.stdout)
    context = proc.stderr[-4000:]
    if report["disk"].startswith("loop mount failed"):
        pytest.skip(f"no loop-mounted file system here: {report['disk']}")
    assert "error" not in report, f"{report['error']}\n{context}"
    assert report["status_500"] == 0, context
    assert report["undocumented_5xx"] == 0, context
    assert report["unexpected_answers"] == 0, json.dumps(report["unexpected"][:5], indent=1)
    assert report["chunks_lost"] == 0, json.dumps(report["lost_detail"], indent=1)
    assert report["requests_tried"] > 500, context
    assert report["uploads"]["verified"] > 5, context
    for kind in ("disk_full", "remount_ro", "kill9"):
        assert report["faults_injected"][kind] >= 1, (kind, report["faults_skipped"])
    tus = report["tus"]
    assert tus["enabled"], report["notes"]
    assert tus["bytes_lost"] == 0, json.dumps(tus["lost_detail"], indent=1)
    assert tus["head_5xx"] == 0, json.dumps(tus["answers"], indent=1)
    assert tus["uploads"]["verified"] > 5, json.dumps(tus["uploads"])
    assert tus["uploads"]["concat_verified"] >= 1, json.dumps(tus["uploads"])
    assert tus["uploads"]["failed"] == 0 and tus["uploads"]["unfinished"] == 0, \
        json.dumps(tus["uploads"])
    tus_scenarios = {k for k in report["scenarios"] if k.startswith("tus_")}
    assert len(tus_scenarios) >= 5, report["scenarios"]
    assert report["ok"], context
