"""Power-cut durability: an answer means the write is on stable storage, with its folder.

A real ``chunkd serve`` runs under ``strace -f``, which records every fdatasync, fsync, rename
and link with its completion time and the path behind each fd. For a chunk, a new session, a
finalize claim and a task record, the test checks the order the kernel saw: data flushed, then
the marker renamed into place, then the folder holding the new name fsynced, and all of it done
before the client had its answer. (kill -9 survival needs none of this; a power cut does.)
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from conftest import MEDIA, chunks_of, session_body

OGG = (MEDIA / "speech.ogg").read_bytes()
CHUNK = 4096
TRACED = "fdatasync,fsync,rename,renameat,renameat2,link,linkat"

pytestmark = pytest.mark.skipif(
    shutil.which("strace") is None and not os.environ.get("CHUNKD_REQUIRE_STRACE"),
    reason="strace is not installed (make strace)",
)


@dataclass(frozen=True)
class Call:
    name: str
    args: str
    done_at: float  # when the syscall returned (wall clock, like the client's time.time())


_LINE = re.compile(r"^(\d+)\s+(\d+\.\d+)\s+(.*)$")


def parse(log: str) -> list[Call]:
    """Completed calls in completion order (strace splits a call that blocks into an
    ``<unfinished ...>`` line and a ``<... name resumed>`` line)."""
    calls, pending = [], {}
    for line in log.splitlines():
        m = _LINE.match(line)
        if not m:
            continue
        pid, at, rest = m.group(1), float(m.group(2)), m.group(3)
        if rest.endswith("<unfinished ...>"):
            name, _, args = rest.partition("(")
            pending[pid] = (name, args)
            continue
        resumed = re.match(r"<\.\.\. (\w+) resumed>(.*)", rest)
        if resumed:
            name, args = pending.pop(pid, (resumed.group(1), ""))
            args += resumed.group(2)
        else:
            name, _, args = rest.partition("(")
        if re.search(r"= -1 ", args):
            continue  # failed calls (e.g. link losing the race) flush nothing
        calls.append(Call(name, args, at))
    return calls


def first(calls: list[Call], name: str, pattern: str, after: int = 0) -> int:
    """Index of the first ``name*`` call at or after ``after`` whose arguments match."""
    for i in range(after, len(calls)):
        if calls[i].name.startswith(name) and re.search(pattern, calls[i].args):
            return i
    raise AssertionError(f"no {name} matching {pattern!r} after #{after}:\n"
                         + "\n".join(f"{c.name}({c.args}" for c in calls[after:]))


class TracedServer:
    def __init__(self, data_dir: Path, log: Path) -> None:
        self.log = log
        self.proc = subprocess.Popen(
            ["strace", "-f", "-ttt", "-y", "-qq", "-e", f"trace={TRACED}", "-o", str(log),
             sys.executable, "-m", "chunkd", "serve", "--host", "127.0.0.1", "--port", "0",
             "--data-dir", str(data_dir), "--min-chunk-size", "1KiB"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert self.proc.stdout is not None
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if " listening on " in line:
                self.url = line.split(" listening on ")[1].strip()
                return
            if not line:
                break
        self.stop()
        raise RuntimeError("chunkd did not start under strace")

    def stop(self) -> None:
        # Stop chunkd itself (strace's child), then strace: killing strace first would leave
        # the server running detached.
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
        with_pid = children.read_text().split() if children.exists() else []
        for pid in with_pid:
            with_suppress_kill(int(pid))
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


def with_suppress_kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        pass


async def test_every_answer_is_durable_before_it_is_sent(tmp_path):
    data_dir = tmp_path / "data"
    server = TracedServer(data_dir, tmp_path / "strace.log")
    try:
        async with aiohttp.ClientSession(server.url) as http:
            async with http.post("/upload/chunked/session",
                                 json=session_body("speech.ogg", len(OGG), CHUNK)) as resp:
                assert resp.status == 201
                sid = (await resp.json())["session_id"]
                created_at = time.time()
            answered = []
            for i, part in enumerate(chunks_of(OGG, CHUNK)):
                async with http.post(f"/upload/chunked/{sid}/chunk", params={"index": str(i)},
                                     data=part,
                                     headers={"Content-Type": "application/octet-stream"}) as resp:
                    assert resp.status == 200
                answered.append(time.time())
            async with http.post(f"/upload/chunked/{sid}/finalize") as resp:
                assert resp.status == 200
                task_id = (await resp.json())["task_id"]
            finalized_at = time.time()
    finally:
        server.stop()
    calls = parse(server.log.read_text())
    sdir = str(data_dir.resolve() / "sessions" / sid)

    # A new session: metadata flushed, staging folder flushed, renamed in, sessions/ flushed.
    meta = first(calls, "fsync", rf"\.new-{sid}/\.metadata\.json")
    staged = first(calls, "fsync", rf"\.new-{sid}>", meta)
    moved = first(calls, "rename", rf"\.new-{sid}\".*\"{sdir}\"", staged)
    listed = first(calls, "fsync", r"/sessions>", moved)
    assert calls[listed].done_at <= created_at

    # Each chunk: its bytes, then its marker, then the marker's folder, then the answer.
    for i, at in enumerate(answered):
        marker = first(calls, "rename", rf"{sdir}/chunks/{i}\"")
        data = max(j for j in range(marker) if calls[j].name == "fdatasync"
                   and f"{sdir}/data>" in calls[j].args)
        folder = first(calls, "fsync", rf"{sdir}/chunks>", marker)
        assert calls[data].done_at <= calls[marker].done_at <= calls[folder].done_at <= at

    # Finalize: the task id index and the claim are durable, then the task record with its folder.
    index = first(calls, "fsync", r"/tasks>")
    claim = first(calls, "link", rf"{sdir}/end\.claim", index)
    claim_dir = first(calls, "fsync", rf"{sdir}>", claim)
    record = first(calls, "rename", rf"{sdir}/task\.json\"", claim_dir)
    record_dir = first(calls, "fsync", rf"{sdir}>", record)
    assert calls[record_dir].done_at <= finalized_at
    assert task_id


async def test_every_tus_offset_is_durable_before_it_is_answered(tmp_path):
    """tus: a PATCH's bytes are flushed, then the offset file renamed to the new offset, then
    its folder flushed, before the 204 says that offset."""
    data_dir = tmp_path / "data"
    server = TracedServer(data_dir, tmp_path / "strace.log")
    tus = {"Tus-Resumable": "1.0.0"}
    try:
        async with aiohttp.ClientSession(server.url) as http:
            async with http.post("/files/", headers={**tus, "Upload-Length": str(len(OGG))}) as resp:
                assert resp.status == 201
                location = resp.headers["Location"]
            answered = []
            for i, part in enumerate(chunks_of(OGG, CHUNK)):
                async with http.patch(location, data=part, headers={
                        **tus, "Upload-Offset": str(i * CHUNK),
                        "Content-Type": "application/offset+octet-stream"}) as resp:
                    assert resp.status == 204
                    answered.append((int(resp.headers["Upload-Offset"]), time.time()))
    finally:
        server.stop()
    calls = parse(server.log.read_text())
    sdir = str(data_dir.resolve() / "sessions" / location.rsplit("/", 1)[1])
    for offset, at in answered:
        moved = first(calls, "rename", rf"{sdir}/offset/\d+\".*\"{sdir}/offset/{offset}\"")
        data = max(j for j in range(moved) if calls[j].name == "fdatasync"
                   and f"{sdir}/data>" in calls[j].args)
        folder = first(calls, "fsync", rf"{sdir}/offset>", moved)
        assert calls[data].done_at <= calls[moved].done_at <= calls[folder].done_at <= at
