#!/usr/bin/env python3
"""A black-box hostile test battery for chunkd.

It starts its own ``chunkd serve`` (127.0.0.1 only, auth on with a generated HS256 secret, two
subjects) on a small loop-mounted ext4 image (when run as root; else on a plain temp folder,
and the disk faults are skipped), then for ``--duration`` seconds (and at most ``--rounds``
scenarios) runs at once:

- normal uploads by both subjects: real media from tests/media (as is, padded with random bytes
  or truncated: libmagic reads the head), random chunk sizes and order, some with
  ``X-Chunk-Checksum``, some followed on the WebSocket; each is finalized and the file the
  folder hand-off put at ``<data-dir>/<location>`` must have the sha256 of what was sent;
- hostile requests: bad, expired, ``alg: none``, wrongly signed and other-subject tokens, bad
  indexes, bodies too long and too short, corrupt checksums, huge headers, garbage request
  lines, bad ``Expect``, ``Content-Encoding``, chunked transfer encoding, connections dropped in
  the middle of a body, idle and trickling sockets, concurrent abort/abort, abort/finalize,
  finalize/finalize, duplicate chunks, chunks after abort, requests on 404/410 sessions;
- tus 1.0 at ``/files/`` (``--tus-path``), next to the chunk API: normal uploads (creation,
  sometimes with upload, sometimes with a deferred length declared by a later PATCH; PATCHes of
  random sizes, some with ``Upload-Checksum``; ``taskId`` metadata sometimes), resumed from
  ``HEAD`` after any failure; concatenations of 2-4 partial uploads (the final POST sometimes
  sent twice); each handed-off file, found from ``/ws/tasks/<taskId or upload id>``, must have
  the sha256 of what was sent. Hostile tus requests (412, 400, 413, 415, 422, 409, 460, 403,
  404, 410, 401, method override), and races: two PATCHes at one offset, a stale PATCH that a
  HEAD must stop within ~3 s, a PATCH dropped mid-body, DELETE during a PATCH;
- injected faults: the disk filled to the last block (uploads, aborts and a finalize go on),
  the data dir remounted read-only for a few seconds, and ``kill -9`` of the server in the
  middle of uploads followed by a restart on the same data dir (the uploads resume from
  ``/status`` or tus ``HEAD`` and must still end with the right sha256). A tus HEAD is never
  5xx, also during the faults (``423`` is its transient answer).

Every answer must be JSON, errors ``{"error": {"code", "message"}}`` with a code and status
listed in docs/API.md; a 5xx other than ``503 storage_unavailable/server_busy/shutting_down``
and ``507`` is a failure; every answer outside what the scenario expects is recorded
(method, path, status, body excerpt). A chunk is *lost* when the server answered 200 for it and
``/status`` later calls it missing or the finished file does not hold its bytes; tus bytes are
*lost* when an offset the server answered (201, 204, HEAD, or an error's ``offset``) is later
answered lower by a HEAD, or the handed-off file differs from what was sent.

Exit status 0 only with no 500, no chunk or tus byte lost, no tus HEAD answered 5xx and no
unexpected answer. ``--json`` prints the
machine-readable report on stdout (the table then goes to stderr).

    sudo .venv/bin/python scripts/battery.py --duration 60 [--json] [--seed N]

Safety: only 127.0.0.1; every loop is bounded in count and time; only processes this script
started are signalled, by PID; the loop mount is unmounted and the image removed on the way
out, also after an error or Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import ctypes
import gzip
import hashlib
import itertools
import json
import math
import os
import random
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import zlib
from collections import Counter, deque
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import yarl

ROOT = Path(__file__).resolve().parent.parent
MEDIA = ROOT / "tests" / "media"
API_DOC = ROOT / "docs" / "API.md"
KiB = 1024
MiB = 1024 * KiB
GOOD_MEDIA = ("speech.wav", "speech.mp3", "speech-noid3.mp3", "speech.m4a", "speech.aac",
              "speech.ogg", "speech.flac", "speech.webm", "speech.mp4", "speech.mkv")
NOT_MEDIA = ("text-renamed.mp3", "elf-renamed.wav", "archive-renamed.m4a")
SUBJECTS = ("alice", "bob")
#: 5xx answers the contract documents (anything else 5xx is a failure).
ALLOWED_5XX = {(503, "storage_unavailable"), (503, "server_busy"), (503, "shutting_down"),
               (503, "body_stalled"), (507, "insufficient_storage")}
#: Seconds around a fault within which its errors are expected.
FAULT_GRACE = 1.5
#: Server settings (each passed only if ``chunkd serve --help`` lists the flag).
HEADER_TIMEOUT = 2.0
BODY_TIMEOUT = 2.0
MAX_FILE_SIZE = "1GiB"
MAX_FILE_SIZE_BYTES = 1024 ** 3
MAX_CONNECTIONS = 256
UNEXPECTED_KEPT = 300
#: tus: the path chunkd serves it at (passed as --tus-path), its version and body type.
TUS_PATH = "/files/"
TUS_VERSION = "1.0.0"
OFFSET_STREAM = "application/offset+octet-stream"
TUS_ALGORITHMS = ("sha1", "sha256", "md5")
#: A HEAD for an upload a stale PATCH holds must answer within this (docs: at most 2 s waiting
#: for the PATCH to let go; the rest is slack for a loaded machine).
STALE_HEAD_LIMIT = 3.5
UUID_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


# -- small helpers --------------------------------------------------------------------------

def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def excerpt(raw: bytes | str, n: int = 300) -> str:
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
    return text if len(text) <= n else text[:n] + "..."


def documented_errors(path: Path) -> dict[str, set[int]]:
    """code -> statuses, from the ``## Errors`` table of docs/API.md (read at start, so the
    battery follows the contract as it is documented now)."""
    table: dict[str, set[int]] = {}
    try:
        text = path.read_text(encoding="utf-8")
    except OSError:
        return table
    section = text.split("## Errors", 1)[-1].split("\n### ", 1)[0]
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 2 or not re.fullmatch(r"[0-9, ]+", cells[0]):
            continue
        statuses = {int(s) for s in re.findall(r"[0-9]{3}", cells[0])}
        for code in re.findall(r"`([a-z_0-9]+)`", cells[1]):
            table.setdefault(code, set()).update(statuses)
    return table


class Expect:
    """What a scenario accepts: statuses, optionally narrowed to error codes."""

    def __init__(self, *items: int | tuple[int, str | Iterable[str] | None]) -> None:
        self.allowed: dict[int, set[str] | None] = {}
        for item in items:
            if isinstance(item, int):
                self.allowed[item] = None
            else:
                status, codes = item
                if codes is None:
                    self.allowed[status] = None
                    continue
                wanted = {codes} if isinstance(codes, str) else set(codes)
                if status in self.allowed and self.allowed[status] is None:
                    continue
                self.allowed[status] = (self.allowed.get(status) or set()) | wanted

    def plus(self, *items: int | tuple[int, str | Iterable[str] | None]) -> Expect:
        """This and ``items``."""
        out, more = Expect(), Expect(*items)
        out.allowed = dict(self.allowed)
        for status, codes in more.allowed.items():
            if codes is None or (status in out.allowed and out.allowed[status] is None):
                out.allowed[status] = None
            else:
                out.allowed[status] = (out.allowed.get(status) or set()) | codes
        return out

    def ok(self, status: int, code: str | None) -> bool:
        if status not in self.allowed:
            return False
        codes = self.allowed[status]
        return codes is None or code in codes

    def __str__(self) -> str:
        return ", ".join(f"{s}" if c is None else f"{s} {'/'.join(sorted(c))}"
                         for s, c in sorted(self.allowed.items()))


@dataclass
class Resp:
    status: int
    doc: Any
    body: bytes
    headers: dict[str, str]

    @property
    def code(self) -> str | None:
        if isinstance(self.doc, dict) and isinstance(self.doc.get("error"), dict):
            code = self.doc["error"].get("code")
            return code if isinstance(code, str) else None
        return None


@dataclass
class Interval:
    kind: str
    start: float
    end: float | None = None

    def overlaps(self, t0: float, t1: float, grace: float) -> bool:
        end = self.end if self.end is not None else math.inf
        return t0 <= end + grace and t1 >= self.start - grace


@dataclass
class Upload:
    """One upload session as the battery knows it: what it sent and what was acknowledged."""

    owner: str
    data: bytes
    filename: str
    chunk_size: int
    scenario: str
    sid: str = ""
    acked: set[int] = field(default_factory=set)
    lost: set[int] = field(default_factory=set)
    attempts: Counter[int] = field(default_factory=Counter)
    epoch: int = 0
    checksums: str = "none"  # none | all | some
    task_id: str | None = None
    wrong_duplicates: set[int] = field(default_factory=set)

    @property
    def total_chunks(self) -> int:
        return max(1, math.ceil(len(self.data) / self.chunk_size))

    def chunk(self, i: int) -> bytes:
        return self.data[i * self.chunk_size:(i + 1) * self.chunk_size]

    @property
    def extension(self) -> str:
        return self.filename.rsplit(".", 1)[-1].lower()

    def session_body(self) -> dict[str, Any]:
        return {"filename": self.filename, "total_size": len(self.data),
                "chunk_size": self.chunk_size, "total_chunks": self.total_chunks}


def hdr(r: Resp, name: str) -> str | None:
    """A header of an answer, by its name in any case."""
    lname = name.lower()
    return next((v for k, v in r.headers.items() if k.lower() == lname), None)


def tus_md(pairs: list[tuple[str, str | None]]) -> str:
    """``Upload-Metadata``: ``key base64`` pairs (a key alone for None)."""
    return ",".join(k if v is None else f"{k} {base64.b64encode(v.encode()).decode()}"
                    for k, v in pairs)


def tus_digest(algorithm: str, body: bytes) -> str:
    """The base64 digest of ``Upload-Checksum``."""
    return base64.b64encode(hashlib.new(algorithm, body).digest()).decode()


async def paced_body(parts: list[bytes], pause: float) -> AsyncIterator[bytes]:
    """A request body in pieces with a pause before each but the first (chunked encoding)."""
    for k, part in enumerate(parts):
        if k:
            await asyncio.sleep(pause)
        yield part


#: What a normal tus PATCH may be answered (beyond what a fault explains): 409 and 423 tell the
#: client to HEAD or retry, 503 to retry after a HEAD.
PATCH_OK = Expect(204, (409, "offset_mismatch"), (423, "upload_locked"),
                  (503, ("server_busy", "body_stalled")))


@dataclass
class TusUpload:
    """One tus upload as the battery knows it: what it sent and the offsets it was answered."""

    owner: str
    data: bytes
    scenario: str
    filename: str | None = None  # None: no filename in the metadata (stored as upload.bin)
    name_key: str = "filename"  # or Uppy's "name"
    task_id: str | None = None
    extra_md: list[tuple[str, str | None]] = field(default_factory=list)
    deferred: bool = False
    partial: bool = False
    final: bool = False
    checksums: str = "none"  # none | all | some
    url: str = ""
    declared: bool = False  # a deferred length told to the server
    confirmed: int = 0  # the highest offset the server answered
    sent: int = 0  # the end of the furthest byte put on the wire
    lost: int = 0
    handoff: dict[str, Any] | None = None  # the task's final message, once seen

    @property
    def uid(self) -> str:
        return self.url.rsplit("/", 1)[-1]

    @property
    def extension(self) -> str:
        return self.filename.rsplit(".", 1)[-1].lower() if self.filename else "bin"

    @property
    def length_known(self) -> bool:
        return not self.deferred or self.declared

    @property
    def completes(self) -> bool:
        """Its last byte starts a finalize (a partial's does not)."""
        return not self.partial

    def metadata(self) -> str | None:
        pairs: list[tuple[str, str | None]] = []
        if self.filename is not None:
            pairs.append((self.name_key, self.filename))
        if self.task_id is not None:
            pairs.append(("taskId", self.task_id))
        pairs += self.extra_md
        return tus_md(pairs) if pairs else None


class Gate:
    """Finalizes pass in ``shared`` mode; a fault holds it ``exclusive`` so that no finalize is
    cut in two by it (a finalize interrupted between its claim and its task is only finished
    after the documented 60 s; that is probed on purpose, on throw-away sessions)."""

    def __init__(self) -> None:
        self.shared_count = 0
        self.closed = False

    @contextlib.asynccontextmanager
    async def shared(self) -> AsyncIterator[None]:
        while self.closed:
            await asyncio.sleep(0.02)
        self.shared_count += 1
        try:
            yield
        finally:
            self.shared_count -= 1

    @contextlib.asynccontextmanager
    async def exclusive(self, wait: float = 12.0) -> AsyncIterator[None]:
        while self.closed:
            await asyncio.sleep(0.02)
        self.closed = True
        try:
            limit = time.monotonic() + wait
            while self.shared_count and time.monotonic() < limit:
                await asyncio.sleep(0.02)
            yield
        finally:
            self.closed = False


# -- the disk -------------------------------------------------------------------------------

class Sandbox:
    """A temp folder; as root, a small ext4 image loop-mounted in it for the data dir."""

    def __init__(self, disk_mib: int, plain: bool = False) -> None:
        self.disk_mib = disk_mib
        self.plain = plain
        self.tmp = Path(tempfile.mkdtemp(prefix="chunkd-battery-", dir="/tmp"))
        self.mnt: Path | None = None
        self.image: Path | None = None
        self.reason = ""

    def setup(self) -> Path:
        tools = all(shutil.which(t) for t in ("mkfs.ext4", "mount", "umount"))
        if os.geteuid() != 0 or not tools or self.plain:
            why = ("--no-disk-faults" if self.plain else "not root" if os.geteuid() != 0
                   else "mkfs.ext4/mount missing")
            self.reason = f"{why}: plain temp dir, disk faults (full disk, read-only remount) " \
                "skipped"
            data = self.tmp / "data"
            data.mkdir()
            return data
        image, mnt = self.tmp / "disk.img", self.tmp / "mnt"
        mnt.mkdir()
        with open(image, "wb") as f:
            f.truncate(self.disk_mib * MiB)
        try:
            subprocess.run(["mkfs.ext4", "-q", "-F", "-m", "0", "-N", "32768", str(image)],
                           check=True, capture_output=True, timeout=60)
            subprocess.run(["mount", "-o", "loop", str(image), str(mnt)], check=True,
                           capture_output=True, timeout=30)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
            err = getattr(exc, "stderr", b"") or b""
            self.reason = ("loop mount failed (" + err.decode(errors="replace").strip()[:120] +
                           "): plain temp dir, disk faults (full disk, read-only remount) skipped")
            image.unlink()
            data = self.tmp / "data"
            data.mkdir()
            return data
        self.image, self.mnt = image, mnt
        data = self.mnt / "data"
        data.mkdir()
        self.reason = f"ext4 image of {self.disk_mib} MiB, loop-mounted"
        return data

    @property
    def disk_faults(self) -> bool:
        return self.mnt is not None

    def remount(self, mode: str) -> tuple[bool, str]:
        assert self.mnt is not None
        r = subprocess.run(["mount", "-o", f"remount,{mode}", str(self.mnt)],
                           capture_output=True, text=True, timeout=15)
        return r.returncode == 0, (r.stderr or r.stdout).strip()

    def free_bytes(self) -> int:
        root = self.mnt or self.tmp
        st = os.statvfs(root)
        return st.f_bavail * st.f_frsize

    def cleanup(self) -> None:
        if self.mnt is not None:
            with contextlib.suppress(Exception):
                self.remount("rw")
            for _ in range(10):
                r = subprocess.run(["umount", str(self.mnt)], capture_output=True, timeout=30)
                if r.returncode == 0:
                    break
                time.sleep(0.3)
            else:
                subprocess.run(["umount", "-l", str(self.mnt)], capture_output=True, timeout=30)
        shutil.rmtree(self.tmp, ignore_errors=True)


def fill_disk(folder: Path, limit_seconds: float = 10.0) -> int:
    """Fill the file system under ``folder`` to its last block (a big file, then one-block
    files until none fits). Returns the bytes written."""
    folder.mkdir(exist_ok=True)
    written = 0
    deadline = time.monotonic() + limit_seconds
    n = len(list(folder.iterdir()))
    big = folder / f"big{n}"
    with contextlib.suppress(OSError), open(big, "wb", buffering=0) as f:
        st = os.statvfs(folder)
        free = st.f_bavail * st.f_frsize
        if free > 2 * MiB:
            with contextlib.suppress(OSError):
                os.posix_fallocate(f.fileno(), 0, free - MiB)
                written += free - MiB
        f.seek(0, os.SEEK_END)
        block = b"\0" * MiB
        while time.monotonic() < deadline:
            written += f.write(block) or 0
    for i in range(20_000):
        if time.monotonic() > deadline:
            break
        try:
            with open(folder / f"s{n}-{i}", "wb", buffering=0) as f:
                f.write(b"x")
                written += 1
        except OSError:
            break
    os.sync()
    return written


# -- the server -----------------------------------------------------------------------------

def _pdeathsig() -> None:
    """In the child: get SIGKILL if the battery dies, so no server outlives it."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def serve_flags() -> set[str]:
    out = subprocess.run([sys.executable, "-m", "chunkd", "serve", "--help"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    return set(re.findall(r"(--[a-z][a-z0-9-]+)", out.stdout))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``python -m chunkd serve`` as a child process; its output is kept (tail and errors)."""

    def __init__(self, args: list[str]) -> None:
        self.args = args
        self.proc: subprocess.Popen[str] | None = None
        self.url = ""
        self.banner: list[str] = []
        self.tail: deque[str] = deque(maxlen=400)
        self.errors: list[str] = []
        self.instances = 0
        self.hwm: list[int] = []  # VmHWM (KiB) of each instance

    def spawn(self, port: int) -> None:
        """Start the process. Call it from the main thread: the child's parent-death signal
        fires when the thread that forked it ends."""
        cmd = [sys.executable, "-m", "chunkd", "serve", "--port", str(port), *self.args]
        env = {k: v for k, v in os.environ.items() if not k.startswith("CHUNKD_")}
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, env=env,
                                     preexec_fn=_pdeathsig)
        self.instances += 1
        self.hwm.append(0)

    def wait_banner(self, timeout: float = 30.0) -> None:
        """Read the banner up to its "listening on" line (blocking: run it in a thread)."""
        assert self.proc is not None and self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        banner: list[str] = []
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                self.proc.wait(10)
                raise RuntimeError("chunkd exited at start: " + " | ".join(banner[-10:]))
            banner.append(line.rstrip())
            if " listening on " in line:
                self.url = line.split(" listening on ", 1)[1].strip()
                break
        else:
            self.kill()
            raise RuntimeError("chunkd did not print its banner in time")
        self.banner = banner
        threading.Thread(target=self._pump, args=(self.proc, self.instances), daemon=True).start()

    def _pump(self, proc: subprocess.Popen[str], instance: int) -> None:
        assert proc.stdout is not None
        in_trace = False
        for line in proc.stdout:
            line = line.rstrip()
            self.tail.append(f"[{instance}] {line}")
            starts_record = re.match(r"[0-9]{4}-[0-9]{2}-[0-9]{2} ", line) is not None
            if starts_record:
                in_trace = False
            if "Traceback" in line:
                in_trace = True
            if (in_trace or (starts_record and (" ERROR " in line or " CRITICAL " in line))) \
                    and len(self.errors) < 2000:
                self.errors.append(f"[{instance}] {line}")

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def sample_hwm(self) -> int:
        if self.proc is None:
            return 0
        try:
            with open(f"/proc/{self.proc.pid}/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        kib = int(line.split()[1])
                        self.hwm[-1] = max(self.hwm[-1], kib)
                        return kib
        except (OSError, ValueError):
            pass
        return 0

    def kill(self) -> None:
        """SIGKILL by PID (only this child), and reap it."""
        if self.proc is not None and self.proc.poll() is None:
            self.sample_hwm()
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(15)

    def terminate(self, timeout: float = 15.0) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.sample_hwm()
        os.kill(self.proc.pid, signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return None


# -- the report -----------------------------------------------------------------------------

@dataclass
class Report:
    tried: int = 0
    by_status: Counter[int] = field(default_factory=Counter)
    no_answer: Counter[str] = field(default_factory=Counter)
    status_500: int = 0
    bad_5xx: int = 0
    unexpected_total: int = 0
    unexpected: list[dict[str, Any]] = field(default_factory=list)
    faults: Counter[str] = field(default_factory=Counter)
    faults_skipped: dict[str, str] = field(default_factory=dict)
    uploads: Counter[str] = field(default_factory=Counter)
    chunks_acked: int = 0
    chunks_lost: int = 0
    lost_detail: list[dict[str, Any]] = field(default_factory=list)
    scenarios: Counter[str] = field(default_factory=Counter)
    tus: Counter[str] = field(default_factory=Counter)
    tus_answers: Counter[str] = field(default_factory=Counter)
    tus_bytes_acked: int = 0
    tus_bytes_lost: int = 0
    tus_lost_detail: list[dict[str, Any]] = field(default_factory=list)
    tus_head_5xx: int = 0
    tus_head_max_s: float = 0.0
    findings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def finding(self, text: str) -> None:
        if text not in self.findings and len(self.findings) < 100:
            self.findings.append(text)


class Battery:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.rng = random.Random(args.seed)
        self.report = Report()
        self.docs = documented_errors(API_DOC)
        self.sandbox = Sandbox(args.disk_mib, plain=args.no_disk_faults)
        self.server: Server | None = None
        self.data_dir = Path()
        self.port = 0
        self.secret = secrets.token_hex(32)
        self.http: aiohttp.ClientSession | None = None
        self.faults: list[Interval] = []
        self.epoch = 0
        self.paused = False
        self.inflight = 0
        self.inflight_chunks = 0
        self.gate = Gate()
        self.min_chunk = 1024
        self.t0 = time.monotonic()
        self.deadline = self.t0 + args.duration
        self.hard_deadline = self.deadline + args.settle
        self.rounds = 0
        self.media = {name: (MEDIA / name).read_bytes() for name in GOOD_MEDIA + NOT_MEDIA}
        self.background: set[asyncio.Task[Any]] = set()
        self.server_down = False
        self.temp_left: dict[str, list[str]] = {}
        self.max_connections = 0
        self.tus_on = False
        self.max_patch = 95 * MiB  # read from GET /upload/chunked/limits at start
        self.max_file_size = MAX_FILE_SIZE_BYTES

    # -- time and budget ------------------------------------------------------------------

    def now(self) -> float:
        return time.monotonic()

    def running(self) -> bool:
        return self.now() < self.deadline

    def take_round(self) -> bool:
        if not self.running() or self.rounds >= self.args.rounds:
            return False
        self.rounds += 1
        return True

    # -- tokens ---------------------------------------------------------------------------

    def token(self, sub: str, *, exp: int = 3600, alg: str = "HS256", secret: str | None = None,
              extra: dict[str, Any] | None = None, drop: tuple[str, ...] = ()) -> str:
        claims: dict[str, Any] = {"sub": sub, "exp": int(time.time()) + exp, **(extra or {})}
        for k in drop:
            claims.pop(k, None)
        return jwt.encode(claims, secret or self.secret, algorithm=alg)

    def auth(self, sub: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token(sub)}"}

    def bad_tokens(self, owner: str) -> list[tuple[str, dict[str, str], Expect]]:
        """(name, headers, expected) for every way a credential can be wrong."""
        header = b64url(json.dumps({"alg": "none", "typ": "JWT"}).encode())
        payload = b64url(json.dumps({"sub": owner, "exp": int(time.time()) + 3600}).encode())
        other = "bob" if owner == "alice" else "alice"

        def bearer(tok: str) -> dict[str, str]:
            return {"Authorization": f"Bearer {tok}"}

        inv, exp_ = Expect((401, "invalid_token")), Expect((401, "token_expired"))
        return [
            ("no token", {}, Expect((401, "missing_token"))),
            ("basic scheme", {"Authorization": "Basic YWxpY2U6eA=="},
             Expect((401, "missing_token"))),
            ("empty bearer", {"Authorization": "Bearer "}, Expect((401, "missing_token"))),
            ("garbage", bearer("not-a-jwt"), inv),
            ("expired", bearer(self.token(owner, exp=-600)), exp_),
            ("alg none", bearer(f"{header}.{payload}."), inv),
            ("wrong secret", bearer(self.token(owner, secret=secrets.token_hex(32))), inv),
            ("HS512", bearer(self.token(owner, alg="HS512")), inv),
            ("no sub", bearer(self.token(owner, drop=("sub",))), inv),
            ("no exp", bearer(self.token(owner, drop=("exp",))), inv),
            ("empty sub", bearer(self.token("", extra={})), inv),
            ("nbf future", bearer(self.token(owner, extra={"nbf": int(time.time()) + 3600})),
             inv),
            ("tampered payload", bearer(self.token(owner)[:-4] + "AAAA"), inv),
            ("other subject", bearer(self.token(other)), Expect((403, "forbidden"))),
        ]

    # -- HTTP -----------------------------------------------------------------------------

    def fault_allowance(self, t0: float, t1: float) -> tuple[set[tuple[int, str]], bool]:
        """Error answers a fault overlapping [t0, t1] explains, and whether no answer at all
        (the server was killed) is explained."""
        allowed: set[tuple[int, str]] = set()
        no_answer = False
        for iv in self.faults:
            if not iv.overlaps(t0, t1, FAULT_GRACE):
                continue
            if iv.kind == "disk_full":
                allowed.add((507, "insufficient_storage"))
            elif iv.kind == "remount_ro":
                allowed.add((503, "storage_unavailable"))
            elif iv.kind == "kill9":
                no_answer = True
            elif iv.kind == "conn_flood":
                allowed.add((503, "server_busy"))
        # The disk may also be nearly full of the battery's own sessions.
        if self.sandbox.free_bytes() < 4 * MiB:
            allowed.add((507, "insufficient_storage"))
        return allowed, no_answer

    def unexpected(self, scenario: str, method: str, path: str, status: int | str,
                   body: bytes | str, expected: str, note: str = "") -> None:
        self.report.unexpected_total += 1
        if len(self.report.unexpected) < UNEXPECTED_KEPT:
            self.report.unexpected.append({
                "t": round(self.now() - self.t0, 2), "scenario": scenario, "method": method,
                "path": path, "status": status, "expected": expected, "note": note,
                "body": excerpt(body)})

    def shape_problem(self, method: str, status: int, body: bytes, ctype: str,
                      tus: bool = False) -> str | None:
        """Why an answer breaks the API's JSON contract, or None. (tus: a success has no body;
        its errors are the API's JSON.)"""
        if method == "HEAD" or status == 101:
            return None
        if tus and status < 300 and not body:
            return None
        try:
            doc = json.loads(body)
        except ValueError:
            return "the body is not JSON"
        if "json" not in ctype:
            return f"Content-Type is {ctype!r}"
        if not isinstance(doc, dict):
            return "the body is not a JSON object"
        if status < 400:
            return None
        err = doc.get("error")
        if not isinstance(err, dict) or not isinstance(err.get("code"), str) or \
                not isinstance(err.get("message"), str):
            return "an error without error.code / error.message"
        if self.docs:
            statuses = self.docs.get(err["code"])
            if statuses is None:
                return f"error code {err['code']!r} is not in docs/API.md"
            if status not in statuses:
                return f"error code {err['code']!r} with status {status}, documented {statuses}"
        return None

    def judge(self, scenario: str, method: str, path: str, status: int, body: bytes,
              ctype: str, expect: Expect, t0: float, tus: bool = False) -> Resp:
        rep = self.report
        rep.by_status[status] += 1
        try:
            doc = json.loads(body) if body else None
        except ValueError:
            doc = None
        resp = Resp(status, doc, body, {})
        code = resp.code
        allowed, _ = self.fault_allowance(t0, self.now())
        health = health_state(status, doc)
        if health is not None:  # /healthz: 503 {"status": data_dir_full | data_dir_not_writable}
            expected_health = {"data_dir_full": (507, "insufficient_storage"),
                               "data_dir_not_writable": (503, "storage_unavailable")}
            is_ok = expect.ok(status, None) or expected_health[health] in allowed
        else:
            is_ok = expect.ok(status, code) or (status, code) in allowed
        if status == 500:
            rep.status_500 += 1
        # A HEAD answer has no body, so no code: a 503 the scenario allows (HEAD /healthz on a
        # full disk) cannot be told apart from another 503, and is not counted against chunkd.
        headless = method == "HEAD" and expect.ok(status, None)
        if health is None and status >= 500 and (status, code) not in ALLOWED_5XX and \
                status != 507 and not headless:
            rep.bad_5xx += 1
            if is_ok:  # a 5xx is never fine, whatever the scenario said
                self.unexpected(scenario, method, path, status, body, str(expect),
                                "undocumented 5xx")
                return resp
        problem = None if health is not None else self.shape_problem(method, status, body, ctype,
                                                                     tus)
        if problem is not None:
            self.unexpected(scenario, method, path, status, body, str(expect), problem)
        elif not is_ok:
            self.unexpected(scenario, method, path, status, body, str(expect))
        return resp

    async def _wait_unpaused(self) -> None:
        limit = self.now() + 30
        while self.paused and self.now() < limit:
            await asyncio.sleep(0.02)

    async def call(self, scenario: str, method: str, path: str, *, expect: Expect,
                   headers: dict[str, str] | None = None, json_body: Any = None,
                   data: Any = None, params: dict[str, Any] | None = None,
                   timeout: float = 20.0, allow_no_answer: bool = False,
                   encoded_path: bool = False, chunk: bool = False,
                   privileged: bool = False, tus: bool = False, **kwargs: Any) -> Resp | None:
        """One request through aiohttp: counted, judged, recorded. None when no answer."""
        assert self.http is not None
        if not privileged:
            await self._wait_unpaused()
        url = yarl.URL(self.server_url() + path, encoded=encoded_path)
        self.report.tried += 1
        self.inflight += 1
        self.inflight_chunks += chunk
        t0 = self.now()
        try:
            async with self.http.request(
                method, url, headers=headers, json=json_body, data=data, params=params,
                timeout=aiohttp.ClientTimeout(total=timeout), **kwargs,
            ) as r:
                body = await r.read()
                resp = self.judge(scenario, method, path, r.status, body,
                                  r.headers.get("Content-Type", ""), expect, t0, tus)
                resp.headers = dict(r.headers)
                return resp
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            kind = type(exc).__name__
            self.report.no_answer[kind] += 1
            _, killed = self.fault_allowance(t0, self.now())
            if not (allow_no_answer or killed):
                self.unexpected(scenario, method, path, "no answer", "", str(expect),
                                f"{kind}: {exc}"[:200])
            return None
        finally:
            self.inflight -= 1
            self.inflight_chunks -= chunk

    def server_url(self) -> str:
        assert self.server is not None
        return self.server.url

    async def raw(self, scenario: str, pieces: list[tuple[bytes, float]], *,
                  expect: Expect | None, label: str, responses: int = 1,
                  timeout: float = 10.0, allow_no_answer: bool = False,
                  rst: bool = False, read: bool = True, tus: bool = False) -> list[Resp]:
        """Bytes straight on a socket (each piece then its pause); read ``responses`` answers.
        ``expect`` None: no answer is wanted (the client hangs up)."""
        await self._wait_unpaused()
        assert self.server is not None
        host, port = yarl.URL(self.server.url).host, yarl.URL(self.server.url).port
        self.report.tried += 1
        self.inflight += 1
        t0 = self.now()
        out: list[Resp] = []
        writer = None
        reading: asyncio.Task[list[tuple[int, str, bytes]]] | None = None

        async def read_all(reader: asyncio.StreamReader) -> list[tuple[int, str, bytes]]:
            got = []
            for _ in range(responses):
                got.append(await read_http_response(reader))
            return got

        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 5)
            if read and expect is not None:
                # Read while sending: an early answer (then a close) is not lost to a reset.
                reading = asyncio.create_task(read_all(reader))
            for data, pause in pieces:
                if reading is not None and reading.done():
                    break
                with contextlib.suppress(ConnectionError):
                    writer.write(data)
                    await writer.drain()
                if pause:
                    await asyncio.sleep(pause)
            if reading is None or expect is None:
                return out
            for status, ctype, body in await asyncio.wait_for(reading, timeout):
                out.append(self.judge(scenario, "RAW", label, status, body, ctype, expect, t0,
                                      tus))
                if tus:
                    code = out[-1].code
                    self.report.tus_answers[f"RAW {label}: {status}"
                                           f"{' ' + code if code else ''}"] += 1
        except (TimeoutError, OSError, asyncio.IncompleteReadError, ValueError) as exc:
            kind = f"raw {type(exc).__name__}"
            self.report.no_answer[kind] += 1
            _, killed = self.fault_allowance(t0, self.now())
            if not (allow_no_answer or killed):
                self.unexpected(scenario, "RAW", label, "no answer", "",
                                str(expect), f"{kind}: {exc}"[:200])
        finally:
            self.inflight -= 1
            if reading is not None and not reading.done():
                reading.cancel()
                with contextlib.suppress(BaseException):
                    await reading
            if writer is not None:
                if rst:
                    with contextlib.suppress(OSError):
                        sock = writer.get_extra_info("socket")
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                        b"\x01\x00\x00\x00\x00\x00\x00\x00")
                writer.close()
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(writer.wait_closed(), 2)
        return out

    def head(self, method: str, path: str, sub: str | None, extra: str = "",
             length: int | None = None, ctype: str = "application/octet-stream") -> bytes:
        lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1"]
        if sub is not None:
            lines.append(f"Authorization: Bearer {self.token(sub)}")
        if ctype:
            lines.append(f"Content-Type: {ctype}")
        if length is not None:
            lines.append(f"Content-Length: {length}")
        text = "\r\n".join(lines) + "\r\n" + extra + "\r\n"
        return text.encode("latin-1")

    # -- sessions and chunks --------------------------------------------------------------

    def make_media(self, *, small: bool = False) -> tuple[str, bytes]:
        name = self.rng.choice(GOOD_MEDIA if not small else
                               ("speech.ogg", "speech.webm", "speech.aac", "speech.mp3"))
        data = self.media[name]
        roll = self.rng.random()
        if roll < 0.4:
            data = data + self.rng.randbytes(self.rng.randint(1, 64 * KiB))
        elif roll < 0.6 and len(data) > 8 * KiB:
            data = data[:self.rng.randint(4 * KiB, len(data))]
        return name, data

    def pick_chunk_size(self, size: int) -> int:
        choices = [c for c in (1 * KiB, 2 * KiB, 4 * KiB, 8 * KiB, 16 * KiB, 64 * KiB)
                   if c >= self.min_chunk and math.ceil(size / c) <= 400]
        if not choices:
            return max(self.min_chunk, math.ceil(size / 400))
        weights = [1 if c == 1 * KiB else 3 for c in choices]
        return self.rng.choices(choices, weights)[0]

    async def create(self, up: Upload, *, expect: Expect | None = None,
                     retry: bool = True) -> bool:
        """Create the session (retried through faults while the battery runs)."""
        for _ in range(200):
            r = await self.call(up.scenario, "POST", "/upload/chunked/session",
                                headers=self.auth(up.owner), json_body=up.session_body(),
                                expect=expect or Expect(201))
            if r is not None and r.status == 201 and isinstance(r.doc, dict):
                up.sid = str(r.doc.get("session_id", ""))
                up.epoch = self.epoch
                if r.doc.get("total_chunks") != up.total_chunks or \
                        r.doc.get("chunk_size") != up.chunk_size:
                    self.unexpected(up.scenario, "POST", "/upload/chunked/session", 201, r.body,
                                    "the asked chunk_size/total_chunks", "echoed other values")
                return bool(up.sid)
            if not retry or self.now() > self.hard_deadline or (
                    r is not None and r.status not in (503, 507)):
                return False
            await self.backoff(r)
        return False

    async def backoff(self, r: Resp | None, base: float = 0.1) -> None:
        if r is None:
            await self.wait_server_up()
            await asyncio.sleep(base + self.rng.random() * 0.2)
            return
        retry_after = 0.0
        with contextlib.suppress(ValueError, KeyError):
            retry_after = float(r.headers.get("Retry-After", "0"))
        await asyncio.sleep(min(max(base, retry_after), 0.5) + self.rng.random() * 0.1)

    async def wait_server_up(self) -> None:
        limit = self.now() + 40
        while self.now() < limit and (self.server is None or not self.server.alive()
                                      or self.server_down):
            await asyncio.sleep(0.05)

    def chunk_headers(self, up: Upload, i: int, checksum: bool | None = None) -> dict[str, str]:
        h = {**self.auth(up.owner), "Content-Type": "application/octet-stream"}
        if checksum is None:
            checksum = up.checksums == "all" or (up.checksums == "some" and i % 2 == 0)
        if checksum:
            h["X-Chunk-Checksum"] = f"sha256={sha256(up.chunk(i))}"
        return h

    async def status(self, up: Upload, *, expect: Expect | None = None) -> Resp | None:
        return await self.call(up.scenario, "GET", f"/upload/chunked/{up.sid}/status",
                               headers=self.auth(up.owner), expect=expect or Expect(200))

    def reconcile(self, up: Upload, doc: Any, where: str) -> set[int]:
        """Compare a /status (or chunks_missing) document with what was acknowledged: a chunk
        answered 200 and now missing is lost. Returns the missing set."""
        if not isinstance(doc, dict):
            return set()
        missing_list = doc.get("missing_chunks")
        if missing_list is None and isinstance(doc.get("error"), dict):
            missing_list = doc["error"].get("missing_chunks")
        if not isinstance(missing_list, list):
            return set()
        missing = {int(i) for i in missing_list if isinstance(i, int)}
        if "received_chunks" in doc and doc["received_chunks"] != up.total_chunks - len(missing):
            self.unexpected(up.scenario, "GET", f"/upload/chunked/{up.sid}/status", 200,
                            json.dumps(doc)[:300], "received_chunks + missing = total",
                            "inconsistent counts")
        gone = (up.acked & missing) - up.lost
        if gone:
            self.report.chunks_lost += len(gone)
            self.report.lost_detail.append({
                "scenario": up.scenario, "session_id": up.sid, "chunks": sorted(gone)[:50],
                "where": where, "t": round(self.now() - self.t0, 2), "epoch": self.epoch})
            up.lost |= gone
            up.acked -= gone  # sent again so the upload can still finish
        return missing

    async def resume(self, up: Upload) -> None:
        """After a restart: ask /status what the server has, as a resuming client does."""
        for _ in range(50):
            await self.wait_server_up()
            r = await self.status(up)
            if r is not None and r.status == 200:
                self.reconcile(up, r.doc, "status after restart")
                up.epoch = self.epoch
                self.report.uploads["resumed_after_restart"] += 1
                return
            if self.now() > self.hard_deadline:
                return
            await self.backoff(r)

    async def put(self, up: Upload, i: int, *, body: bytes | None = None,
                  headers: dict[str, str] | None = None, expect: Expect | None = None,
                  **kwargs: Any) -> Resp | None:
        return await self.call(
            up.scenario, "POST", f"/upload/chunked/{up.sid}/chunk", params={"index": str(i)},
            data=up.chunk(i) if body is None else body,
            headers=headers if headers is not None else self.chunk_headers(up, i),
            expect=expect or Expect(200, (503, "server_busy"), (409, "chunk_busy")),
            chunk=True, **kwargs)

    async def put_until_acked(self, up: Upload, i: int) -> bool:
        for _ in range(120):
            if self.now() > self.hard_deadline:
                return False
            if up.epoch != self.epoch:
                await self.resume(up)
                if i in up.acked:
                    return True
            up.attempts[i] += 1
            r = await self.put(up, i)
            if r is None:
                await self.backoff(None)
                continue
            if r.status == 200 and isinstance(r.doc, dict):
                doc = r.doc
                if doc.get("chunk_index") != i or doc.get("total_chunks") != up.total_chunks:
                    self.unexpected(up.scenario, "POST", f"/upload/chunked/{up.sid}/chunk", 200,
                                    r.body, f"chunk_index {i}", "wrong receipt")
                if doc.get("already_received") and up.attempts[i] == 1 and i not in up.acked:
                    self.unexpected(up.scenario, "POST", f"/upload/chunked/{up.sid}/chunk", 200,
                                    r.body, "already_received false", "first send of the chunk")
                if i not in up.acked:
                    up.acked.add(i)
                    self.report.chunks_acked += 1
                return True
            if r.status in (503, 507, 409, 408):
                await self.backoff(r)
                continue
            return False  # recorded as unexpected by call()
        return False

    async def send_all(self, up: Upload, order: list[int], parallel: int) -> bool:
        queue = deque(i for i in order if i not in up.acked)
        failed = False

        async def sender() -> None:
            nonlocal failed
            while queue and not failed:
                i = queue.popleft()
                if not await self.put_until_acked(up, i):
                    failed = True

        await asyncio.gather(*(sender() for _ in range(max(1, parallel))))
        return not failed

    async def complete(self, up: Upload, parallel: int = 1) -> bool:
        """Send what is missing until /status says nothing is (bounded)."""
        order = list(range(up.total_chunks))
        self.rng.shuffle(order)
        for _ in range(20):
            if not await self.send_all(up, order, parallel):
                return False
            r = await self.status(up)
            if r is None:
                await self.backoff(None)
                continue
            if r.status != 200:
                if r.status in (503, 507):
                    await self.backoff(r)
                    continue
                return False
            missing = self.reconcile(up, r.doc, "status after the last chunk")
            if not missing:
                return True
            order = sorted(missing)
            up.acked -= missing
            if self.now() > self.hard_deadline:
                return False
        return False

    async def finalize(self, up: Upload, *, expect: Expect | None = None) -> Resp | None:
        async with self.gate.shared():
            return await self.call(up.scenario, "POST", f"/upload/chunked/{up.sid}/finalize",
                                   headers=self.auth(up.owner),
                                   expect=expect or Expect(200, 202, (409, "chunks_missing")))

    async def finalize_until_done(self, up: Upload, twice: bool = False) -> dict[str, Any] | None:
        for _ in range(400):
            if self.now() > self.hard_deadline:
                self.report.uploads["unfinished"] += 1
                self.report.finding(f"{up.scenario}: session {up.sid} still not finalized at the "
                                    "end of the settle time")
                return None
            if up.epoch != self.epoch:
                await self.resume(up)
            if twice:
                rs = await asyncio.gather(self.finalize(up), self.finalize(up))
                twice = False
                ids = {r.doc.get("task_id") for r in rs
                       if r is not None and r.status in (200, 202) and isinstance(r.doc, dict)}
                if len(ids) > 1:
                    self.unexpected(up.scenario, "POST", f"/upload/chunked/{up.sid}/finalize",
                                    200, json.dumps([r.doc for r in rs if r]), "one task_id",
                                    f"two concurrent finalizes gave task ids {sorted(ids)}")
                r = next((x for x in rs if x is not None and x.status == 200), rs[0])
            else:
                r = await self.finalize(up)
            if r is None:
                await self.backoff(None)
                continue
            if r.status == 200 and isinstance(r.doc, dict):
                return r.doc
            if r.status == 202:
                await asyncio.sleep(0.5)
                continue
            if r.status == 409 and r.code == "chunks_missing":
                missing = self.reconcile(up, r.doc, "finalize said chunks_missing")
                up.acked -= missing
                if not await self.complete(up):
                    return None
                continue
            if r.status in (503, 507):
                await self.backoff(r, 0.2)
                continue
            return None
        return None

    async def verify(self, up: Upload, doc: dict[str, Any]) -> bool:
        """The folder hand-off's file must hold exactly what was sent."""
        task_id = doc.get("task_id")
        location = doc.get("location")
        path = f"/upload/chunked/{up.sid}/finalize"
        if not isinstance(task_id, str) or not isinstance(location, str):
            self.unexpected(up.scenario, "POST", path, 200, json.dumps(doc), "task_id and location",
                            "finalize 200 without task_id/location")
            return False
        if up.task_id is not None and up.task_id != task_id:
            self.unexpected(up.scenario, "POST", path, 200, json.dumps(doc), up.task_id,
                            "finalize gave another task_id than before")
        up.task_id = task_id
        if location != f"completed/{task_id}/upload.{up.extension}" or ".." in location:
            self.unexpected(up.scenario, "POST", path, 200, json.dumps(doc),
                            "completed/<task_id>/upload.<ext>", "unexpected location")
            return False
        target = self.data_dir / location
        try:
            stored = await asyncio.to_thread(target.read_bytes)
        except OSError as exc:
            self.unexpected(up.scenario, "POST", path, 200, json.dumps(doc), "a file there",
                            f"the finished file cannot be read: {exc}")
            self.report.chunks_lost += len(up.acked)
            self.report.lost_detail.append({"scenario": up.scenario, "session_id": up.sid,
                                            "where": "finished file missing",
                                            "chunks": sorted(up.acked)[:50]})
            return False
        ok = sha256(stored) == sha256(up.data)
        if not ok:
            bad = {i for i in range(up.total_chunks)
                   if stored[i * up.chunk_size:(i + 1) * up.chunk_size] != up.chunk(i)}
            gone = bad - up.lost
            self.report.chunks_lost += len(gone)
            self.report.lost_detail.append({
                "scenario": up.scenario, "session_id": up.sid, "task_id": task_id,
                "where": "finished file", "chunks": sorted(gone)[:50],
                "size_sent": len(up.data), "size_stored": len(stored),
                "wrong_duplicates_sent": sorted(up.wrong_duplicates)[:20]})
        st = await self.status(up)
        if st is not None and st.status == 200 and isinstance(st.doc, dict):
            task = st.doc.get("task") or {}
            if st.doc.get("status") not in ("processing", "completed") or \
                    st.doc.get("task_id") != task_id or task.get("location") != location:
                self.unexpected(up.scenario, "GET", f"/upload/chunked/{up.sid}/status", 200,
                                st.body, "completed with the same task and location",
                                "status after finalize disagrees")
        with contextlib.suppress(OSError):  # keep the small disk from filling with our files
            await asyncio.to_thread(shutil.rmtree, target.parent)
        return ok

    async def upload_through(self, up: Upload, *, parallel: int = 1, twice: bool = False) -> bool:
        """Send every chunk, finalize, verify (the path of a normal upload)."""
        self.report.uploads["started"] += 1
        if not await self.complete(up, parallel):
            self.report.uploads["failed"] += 1
            return False
        doc = await self.finalize_until_done(up, twice=twice)
        if doc is None:
            self.report.uploads["failed"] += 1
            return False
        self.report.uploads["completed"] += 1
        if await self.verify(up, doc):
            self.report.uploads["verified"] += 1
            return True
        return False

    # -- normal uploads -------------------------------------------------------------------

    async def upload_worker(self, n: int) -> None:
        while self.take_round():
            owner = SUBJECTS[n % 2] if self.rng.random() < 0.7 else self.rng.choice(SUBJECTS)
            name, data = self.make_media()
            up = Upload(owner, data, name, self.pick_chunk_size(len(data)), "upload")
            up.checksums = self.rng.choice(("none", "all", "all", "some"))
            self.report.scenarios["upload"] += 1
            if not await self.create(up):
                self.report.uploads["not_created"] += 1
                continue
            follower = None
            if self.rng.random() < 0.15:
                follower = asyncio.create_task(self.follow(up))
            order = list(range(up.total_chunks))
            self.rng.shuffle(order)
            parallel = self.rng.choice((1, 1, 2, 3, 4))
            if await self.send_all(up, order, parallel) and self.rng.random() < 0.2 and up.acked:
                # A client retrying a chunk it already sent: same bytes, counted once.
                i = self.rng.choice(sorted(up.acked))
                r = await self.put(up, i)
                if r is not None and r.status == 200 and isinstance(r.doc, dict) and \
                        r.doc.get("already_received") is not True:
                    self.unexpected(up.scenario, "POST", f"/upload/chunked/{up.sid}/chunk", 200,
                                    r.body, "already_received true", "a duplicate was counted")
            ok = await self.upload_through(up, parallel=parallel, twice=self.rng.random() < 0.1)
            if follower is not None:
                await self.finish_follow(follower, up, ok)

    async def follow(self, up: Upload) -> list[dict[str, Any]]:
        """The session's WebSocket, to its final message (or until it drops)."""
        assert self.http is not None
        url = f"{self.server_url()}/ws/tasks/{up.sid}?access_token={self.token(up.owner)}"
        msgs: list[dict[str, Any]] = []
        self.report.tried += 1
        try:
            async with self.http.ws_connect(url, timeout=aiohttp.ClientWSTimeout(ws_close=5),
                                            heartbeat=None) as ws:
                self.report.by_status[101] += 1
                async for msg in ws:
                    if msg.type != aiohttp.WSMsgType.TEXT:
                        break
                    doc = json.loads(msg.data)
                    msgs.append(doc)
                    if doc.get("type") == "error" or (doc.get("type") == "progress" and
                                                      doc.get("stage") == "complete"):
                        break
        except (TimeoutError, aiohttp.ClientError, OSError, ValueError) as exc:
            self.report.no_answer[f"ws {type(exc).__name__}"] += 1
        return msgs

    async def finish_follow(self, task: asyncio.Task[list[dict[str, Any]]], up: Upload,
                            ok: bool) -> None:
        try:
            msgs = await asyncio.wait_for(task, 8)
        except TimeoutError:
            if ok:
                self.report.finding("a WebSocket follower got no final message within 8 s of "
                                    "a verified upload")
            return
        last = -1
        for m in msgs:
            if "type" not in m or "timestamp" not in m:
                self.unexpected("websocket", "WS", f"/ws/tasks/{up.sid}", 101, json.dumps(m),
                                "type and timestamp", "a message without type/timestamp")
            if m.get("type") == "upload_progress":
                got = m.get("uploaded_chunks", -1)
                if got < last:
                    self.unexpected("websocket", "WS", f"/ws/tasks/{up.sid}", 101, json.dumps(m),
                                    "uploaded_chunks never decreasing", f"{got} after {last}")
                last = max(last, got)
            if m.get("type") == "error" and ok:
                self.unexpected("websocket", "WS", f"/ws/tasks/{up.sid}", 101, json.dumps(m),
                                "progress complete", "an error for a verified upload")

    # -- hostile scenarios ----------------------------------------------------------------

    async def small_session(self, scenario: str, owner: str = "alice", *, media: bool = True,
                            chunk_size: int | None = None, data: bytes | None = None,
                            filename: str | None = None) -> Upload | None:
        if data is None:
            name, data = self.make_media(small=True) if media else ("x.wav", os.urandom(5000))
        else:
            name = filename or "x.wav"
        cs = max(self.min_chunk, chunk_size or 4 * KiB)
        up = Upload(owner, data, filename or name, cs, scenario)
        up.checksums = "all"
        return up if await self.create(up) else None

    async def h_auth(self) -> None:
        s = "auth"
        up = await self.small_session(s)
        if up is None:
            return
        cases = self.bad_tokens(up.owner)
        self.rng.shuffle(cases)
        path = f"/upload/chunked/{up.sid}"
        for name, headers, exp in cases[:7]:
            ep = self.rng.choice(("status", "chunk", "finalize", "abort", "ws"))
            if ep == "status":
                await self.call(f"{s}: {name}", "GET", f"{path}/status", headers=headers,
                                expect=exp)
            elif ep == "chunk":
                await self.call(f"{s}: {name}", "POST", f"{path}/chunk", params={"index": "0"},
                                data=up.chunk(0), headers={**headers, "Content-Type":
                                                           "application/octet-stream"},
                                expect=exp, chunk=True)
            elif ep == "finalize":
                await self.call(f"{s}: {name}", "POST", f"{path}/finalize", headers=headers,
                                expect=exp)
            elif ep == "abort":
                await self.call(f"{s}: {name}", "DELETE", f"{path}/abort", headers=headers,
                                expect=exp)
            else:
                await self.ws_refused(f"{s}: {name}", up.sid, headers, exp)
        # A session cannot be created with a bad token either.
        name, headers, exp = self.rng.choice([c for c in cases if c[0] != "other subject"])
        await self.call(f"{s}: create with {name}", "POST", "/upload/chunked/session",
                        headers=headers, json_body=up.session_body(), expect=exp)
        # A non-ASCII token (raw, the client library would refuse it).
        await self.raw(s, [(b"GET /upload/chunked/" + up.sid.encode() + b"/status HTTP/1.1\r\n"
                            b"Host: x\r\nAuthorization: Bearer \xff\xfe\xe9t\r\n"
                            b"Connection: close\r\n\r\n", 0)],
                       expect=Expect((401, "invalid_token"), (400, "bad_request")),
                       label="status with a non-ASCII token")
        # None of that touched the session: the owner sees it whole and ends it.
        r = await self.status(up)
        if r is not None and r.status == 200:
            self.reconcile(up, r.doc, "after bad tokens")
            if isinstance(r.doc, dict) and r.doc.get("status") != "uploading":
                self.unexpected(s, "GET", f"{path}/status", 200, r.body, "uploading",
                                "bad tokens changed the session")
        await self.abort(up)

    async def ws_refused(self, scenario: str, sid: str, headers: dict[str, str],
                         exp: Expect) -> None:
        assert self.http is not None
        self.report.tried += 1
        url = f"{self.server_url()}/ws/tasks/{sid}"
        t0 = self.now()
        try:
            async with self.http.ws_connect(url, headers=headers,
                                            timeout=aiohttp.ClientWSTimeout(ws_close=3)) as ws:
                self.report.by_status[101] += 1
                self.unexpected(scenario, "WS", f"/ws/tasks/{sid}", 101, "", str(exp),
                                "the handshake was accepted")
                await ws.close()
        except aiohttp.WSServerHandshakeError as exc:
            self.report.by_status[exc.status] += 1
            if exc.status not in exp.allowed and exc.status != 503:
                self.unexpected(scenario, "WS", f"/ws/tasks/{sid}", exc.status, exc.message,
                                str(exp))
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            self.report.no_answer[f"ws {type(exc).__name__}"] += 1
            if not self.fault_allowance(t0, self.now())[1]:
                self.unexpected(scenario, "WS", f"/ws/tasks/{sid}", "no answer", "", str(exp),
                                type(exc).__name__)

    async def abort(self, up: Upload, expect: Expect | None = None) -> Resp | None:
        for _ in range(40):
            r = await self.call(up.scenario, "DELETE", f"/upload/chunked/{up.sid}/abort",
                                headers=self.auth(up.owner), expect=expect or Expect(200))
            if r is None or r.status in (503, 507):
                if self.now() > self.hard_deadline:
                    return r
                await self.backoff(r)
                continue
            return r
        return None

    async def h_index(self) -> None:
        s = "index"
        up = await self.small_session(s)
        if up is None:
            return
        n = up.total_chunks
        bad = [("", Expect((400, "invalid_index"), (400, "missing_index"))),
               ("-1", Expect((400, "invalid_index"))), ("abc", Expect((400, "invalid_index"))),
               ("1.5", Expect((400, "invalid_index"))), ("1e3", Expect((400, "invalid_index"))),
               ("0x1", Expect((400, "invalid_index"))), ("+1", Expect((400, "invalid_index"))),
               ("%20" + "1", Expect((400, "invalid_index"))),
               ("%D9%A1", Expect((400, "invalid_index"))),  # an Arabic-Indic digit one
               ("9" * 10, Expect((400, "invalid_index"))), ("9" * 400, Expect((400, "invalid_index"))),
               (str(n), Expect((422, "index_out_of_range"))),
               (str(n + 12345), Expect((422, "index_out_of_range"))),
               ("%00", Expect((400, "invalid_index")))]
        for text, exp in self.rng.sample(bad, 6):
            await self.call(f"{s}: index={text[:20]}", "POST",
                            f"/upload/chunked/{up.sid}/chunk?index={text}", data=up.chunk(0),
                            headers=self.chunk_headers(up, 0), expect=exp, encoded_path=True,
                            chunk=True)
        await self.call(f"{s}: no index", "POST", f"/upload/chunked/{up.sid}/chunk",
                        data=up.chunk(0), headers=self.chunk_headers(up, 0),
                        expect=Expect((400, "missing_index")), chunk=True)
        # Index 0 with the body of index 1 (same length): counted as sent, a client's mistake;
        # with the checksum of the real chunk 1 it must be refused.
        if n > 2:
            await self.put(up, 0, body=up.chunk(1), headers={
                **self.chunk_headers(up, 0, False),
                "X-Chunk-Checksum": f"sha256={sha256(up.chunk(0))}"},
                expect=Expect((400, "checksum_mismatch")))
        await self.upload_through(up)

    async def h_body_length(self) -> None:
        s = "body length"
        up = await self.small_session(s)
        if up is None:
            return
        i = self.rng.randrange(up.total_chunks)
        body = up.chunk(i)
        plain = self.chunk_headers(up, i, False)
        await self.put(up, i, body=body + b"x", headers=plain,
                       expect=Expect((413, "chunk_too_long")))
        await self.put(up, i, body=body[:-1], headers=plain,
                       expect=Expect((400, "chunk_incomplete")))
        await self.put(up, i, body=b"", headers=plain, expect=Expect((400, "chunk_incomplete")))
        await self.put(up, i, body=body, headers={**plain, "Content-Type": "text/plain"},
                       expect=Expect((415, "unsupported_content_type")))
        await self.put(up, i, body=body, headers={**plain, "Content-Type": "application/json"},
                       expect=Expect((415, "unsupported_content_type")))
        # A Content-Length that lies: shorter than the body (the rest is a second "request").
        sid = up.sid
        await self.raw(s, [(self.head("POST", f"/upload/chunked/{sid}/chunk?index={i}", up.owner,
                                      length=len(body) - 10) + body, 0)],
                       expect=Expect((400, "chunk_incomplete"), (400, "bad_request")),
                       label="chunk with a short Content-Length", allow_no_answer=True)
        # A body far over the chunk, with no length announced (chunked): cut off early.
        r = await self.call(s, "POST", f"/upload/chunked/{sid}/chunk", params={"index": str(i)},
                            data=gen_chunks([os.urandom(8 * KiB) for _ in range(64)]),
                            headers=plain, expect=Expect((413, "chunk_too_long")),
                            allow_no_answer=True, chunk=True)
        del r
        r2 = await self.status(up)
        if r2 is not None and r2.status == 200 and isinstance(r2.doc, dict) and \
                i not in r2.doc.get("missing_chunks", []):
            self.unexpected(s, "GET", f"/upload/chunked/{sid}/status", 200, r2.body,
                            f"chunk {i} missing", "a refused body was counted")
        await self.upload_through(up)

    async def h_checksum(self) -> None:
        s = "checksum"
        up = await self.small_session(s)
        if up is None:
            return
        i = self.rng.randrange(up.total_chunks)
        plain = self.chunk_headers(up, i, False)
        wrong = sha256(up.chunk(i) + b"!")
        await self.put(up, i, headers={**plain, "X-Chunk-Checksum": f"sha256={wrong}"},
                       expect=Expect((400, "checksum_mismatch")))
        for bad in ("md5=" + "0" * 32, "sha256=" + "z" * 64, "sha256=" + "0" * 63,
                    "sha256:" + sha256(up.chunk(i)), "sha256=" + sha256(up.chunk(i)) + "00", ""):
            await self.put(up, i, headers={**plain, "X-Chunk-Checksum": bad},
                           expect=Expect((400, "invalid_checksum_header")))
        r = await self.status(up)
        if r is not None and r.status == 200 and isinstance(r.doc, dict) and \
                i not in r.doc.get("missing_chunks", []):
            self.unexpected(s, "GET", f"/upload/chunked/{up.sid}/status", 200, r.body,
                            f"chunk {i} missing", "a chunk with a bad checksum was counted")
        # Upper-case hex is a valid sha256: accepted.
        r = await self.put(up, i, headers={
            **plain, "X-Chunk-Checksum": f"sha256={sha256(up.chunk(i)).upper()}"})
        if r is not None and r.status == 200:
            up.acked.add(i)
            self.report.chunks_acked += 1
            # The same chunk with other content and its checksum: a conflict, not a rewrite.
            other = os.urandom(len(up.chunk(i)))
            await self.put(up, i, body=other, headers={
                **plain, "X-Chunk-Checksum": f"sha256={sha256(other)}"},
                expect=Expect((409, "chunk_conflict")))
            # Other content without a checksum: dropped (already_received), never written.
            r = await self.put(up, i, body=other, headers=plain)
            if r is not None and r.status == 200 and isinstance(r.doc, dict) and \
                    r.doc.get("already_received") is not True:
                self.unexpected(s, "POST", f"/upload/chunked/{up.sid}/chunk", 200, r.body,
                                "already_received true", "a counted chunk was taken again")
            up.wrong_duplicates.add(i)
        await self.upload_through(up)

    async def h_encodings(self) -> None:
        s = "encodings"
        up = await self.small_session(s)
        if up is None:
            return
        n = up.total_chunks
        idx = list(range(n))
        self.rng.shuffle(idx)
        plain = self.chunk_headers(up, idx[0], False)
        sid = up.sid
        # Chunked transfer encoding with the right bytes: fine.
        i = idx[0]
        r = await self.call(f"{s}: chunked TE", "POST", f"/upload/chunked/{sid}/chunk",
                            params={"index": str(i)}, headers=self.chunk_headers(up, i),
                            data=gen_chunks(split(up.chunk(i), 3)),
                            expect=Expect(200, (503, "server_busy")), chunk=True)
        if r is not None and r.status == 200:
            up.acked.add(i)
            self.report.chunks_acked += 1
        if n > 1:
            i = idx[1]
            # gzip of the right bytes: decoded, counted as the decoded bytes.
            r = await self.call(f"{s}: gzip", "POST", f"/upload/chunked/{sid}/chunk",
                                params={"index": str(i)}, data=gzip.compress(up.chunk(i)),
                                headers={**self.chunk_headers(up, i), "Content-Encoding": "gzip"},
                                expect=Expect(200, (503, "server_busy"), (415, None)), chunk=True)
            if r is not None and r.status == 200:
                up.acked.add(i)
                self.report.chunks_acked += 1
        j = idx[-1]
        await self.call(f"{s}: broken gzip", "POST", f"/upload/chunked/{sid}/chunk",
                        params={"index": str(j)}, data=b"\x1f\x8b\x08\x00garbage" * 50,
                        headers={**plain, "Content-Encoding": "gzip"},
                        expect=Expect((400, "invalid_body"), (400, "bad_request"),
                                      (415, "unsupported_content_type")),
                        allow_no_answer=True, chunk=True)
        bomb = gzip.compress(b"\0" * (4 * MiB), 9)
        await self.call(f"{s}: gzip bomb", "POST", f"/upload/chunked/{sid}/chunk",
                        params={"index": str(j)}, data=bomb,
                        headers={**plain, "Content-Encoding": "gzip"},
                        expect=Expect((413, "chunk_too_long"), (415, "unsupported_content_type")),
                        allow_no_answer=True, chunk=True)
        await self.call(f"{s}: deflate bomb on the session route", "POST",
                        "/upload/chunked/session", data=zlib.compress(b" " * (8 * MiB), 9),
                        headers={**self.auth(up.owner), "Content-Type": "application/json",
                                 "Content-Encoding": "deflate"},
                        expect=Expect((413, "too_large"), (400, "invalid_body")),
                        allow_no_answer=True)
        for enc in ("br", "zstd", "x-unknown", "gzip, gzip"):
            # The chunk's own bytes, labelled with an encoding they are not in: refused, or
            # (a server that passes unknown encodings through) stored as they are.
            r = await self.call(f"{s}: Content-Encoding {enc}", "POST",
                                f"/upload/chunked/{sid}/chunk", params={"index": str(j)},
                                data=up.chunk(j), headers={**self.chunk_headers(up, j),
                                                           "Content-Encoding": enc},
                                expect=Expect((400, None), (415, None), (413, "chunk_too_long"),
                                              200),
                                allow_no_answer=True, chunk=True)
            if r is not None and r.status == 200:
                self.report.finding(f"a chunk sent with 'Content-Encoding: {enc}' was accepted "
                                    "and stored as it came (not decoded, not refused with 415)")
                if j not in up.acked:
                    up.acked.add(j)
                    self.report.chunks_acked += 1
        # The chunked framing broken by hand, and a request smuggling attempt.
        path = f"/upload/chunked/{sid}/chunk?index={j}"
        await self.raw(s, [(self.head("POST", path, up.owner, "Transfer-Encoding: chunked\r\n")
                            + b"zz\r\nhello\r\n0\r\n\r\n", 0)],
                       expect=Expect((400, None)), label="broken chunked framing",
                       allow_no_answer=True)
        await self.raw(s, [(self.head("POST", path, up.owner, "Transfer-Encoding: chunked\r\n",
                                      length=len(up.chunk(j))) + b"0\r\n\r\n", 0)],
                       expect=Expect((400, None)), label="Content-Length + chunked",
                       allow_no_answer=True)
        await self.raw(s, [(self.head("POST", path, up.owner,
                                      f"Content-Length: {len(up.chunk(j)) + 1}\r\n",
                                      length=len(up.chunk(j))) + up.chunk(j), 0)],
                       expect=Expect((400, None)), label="two Content-Lengths",
                       allow_no_answer=True)
        # Which chunks were refused must still be missing; then the upload ends whole.
        await self.upload_through(up)

    async def h_expect(self) -> None:
        s = "expect"
        up = await self.small_session(s)
        if up is None:
            return
        i = self.rng.randrange(up.total_chunks)
        path = f"/upload/chunked/{up.sid}/chunk?index={i}"
        await self.raw(s, [(self.head("POST", path, up.owner, "Expect: something-else\r\n",
                                      length=len(up.chunk(i))) + up.chunk(i), 0)],
                       expect=Expect((417, "expectation_failed")), label="Expect: something-else",
                       allow_no_answer=True)
        # 100-continue, then the body: an interim 100 then the 200.
        rs = await self.raw(s, [(self.head("POST", path, up.owner, "Expect: 100-continue\r\n",
                                           length=len(up.chunk(i))), 0.2), (up.chunk(i), 0)],
                            expect=Expect(200, (503, "server_busy")),
                            label="Expect: 100-continue")
        if rs and rs[0].status == 200:
            up.acked.add(i)
            self.report.chunks_acked += 1
        # 100-continue with a length that is wrong: refused before the body is sent.
        await self.raw(s, [(self.head("POST", path, up.owner, "Expect: 100-continue\r\n",
                                      length=len(up.chunk(i)) + 99), 0)],
                       expect=Expect((413, "chunk_too_long")), label="Expect with a long body",
                       allow_no_answer=True)
        await self.upload_through(up)

    async def h_garbage(self) -> None:
        s = "garbage"
        sid = str(uuid.uuid4())
        bad400 = Expect((400, "bad_request"), (431, None), (413, "too_large"))
        cases: list[tuple[str, bytes]] = [
            ("garbage line", b"GARBAGE\r\n\r\n"),
            ("binary", os.urandom(200) + b"\r\n\r\n"),
            ("TLS hello", bytes.fromhex("16030100a5010000a10303") + os.urandom(100)),
            ("HTTP/2 preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"),
            ("HTTP/9.9", b"GET /healthz HTTP/9.9\r\nHost: x\r\n\r\n"),
            ("NUL in header", b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\n\r\n"),
            ("header without colon", b"GET /healthz HTTP/1.1\r\nHost: x\r\nNoColon\r\n\r\n"),
            ("100 KB header", b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 100_000
             + b"\r\n\r\n"),
            ("1000 headers", b"GET /healthz HTTP/1.1\r\nHost: x\r\n" +
             b"".join(b"X-H%d: v\r\n" % k for k in range(1000)) + b"\r\n"),
            ("10 KB request line", b"GET /" + b"a" * 10_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n"),
            ("negative length", b"POST /upload/chunked/session HTTP/1.1\r\nHost: x\r\n"
             b"Content-Length: -1\r\n\r\n"),
            ("length not a number", b"POST /upload/chunked/session HTTP/1.1\r\nHost: x\r\n"
             b"Content-Length: 1e3\r\n\r\n"),
            ("space before colon", b"GET /healthz HTTP/1.1\r\nHost : x\r\n\r\n"),
            ("lower-case method", b"get /healthz HTTP/1.1\r\nHost: x\r\n\r\n"),
            ("obs-fold", b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-A: a\r\n b\r\n\r\n"),
        ]
        for name, payload in self.rng.sample(cases, 6):
            await self.raw(s, [(payload, 0)], expect=bad400, label=name, allow_no_answer=True,
                           timeout=5)
        # A 100 KB header on a real route via the client library too.
        await self.call(f"{s}: huge header", "GET", f"/upload/chunked/{sid}/status",
                        headers={**self.auth("alice"), "X-Big": "b" * 100_000},
                        expect=bad400, allow_no_answer=True)
        # Well-formed oddities are answered normally.
        ok = Expect(200)
        for name, payload in (("HTTP/1.0 without Host", b"GET /healthz HTTP/1.0\r\n\r\n"),
                              ("absolute URI", b"GET http://elsewhere/healthz HTTP/1.1\r\n"
                               b"Host: x\r\nConnection: close\r\n\r\n"),
                              ("Upgrade: h2c", b"GET /healthz HTTP/1.1\r\nHost: x\r\nUpgrade: "
                               b"h2c\r\nConnection: Upgrade, close\r\n\r\n")):
            await self.raw(s, [(payload, 0)], expect=ok, label=name)
        await self.raw(s, [(b"OPTIONS * HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", 0)],
                       expect=Expect((404, "not_found"), (405, "method_not_allowed"), 400),
                       label="OPTIONS *")
        # 30 requests pipelined in one write: 30 answers in order.
        pipelined = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n" * 29 + \
            b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        t0 = self.now()
        rs = await self.raw(s, [(pipelined, 0)], expect=Expect(200), label="30 pipelined",
                            responses=30)
        if len(rs) != 30 and not self.fault_allowance(t0, self.now())[1]:
            self.report.finding(f"30 pipelined /healthz requests got {len(rs)} answers")
        await self.call(s, "GET", "/healthz", expect=Expect(200))

    async def h_routes(self) -> None:
        s = "routes"
        a = self.auth("alice")
        nf = Expect((404, "session_not_found"))
        sid = str(uuid.uuid4())
        for method, suffix in (("GET", "status"), ("POST", "finalize"), ("DELETE", "abort")):
            await self.call(f"{s}: unknown session", method, f"/upload/chunked/{sid}/{suffix}",
                            headers=a, expect=nf)
        await self.call(f"{s}: unknown session", "POST", f"/upload/chunked/{sid}/chunk",
                        params={"index": "0"}, data=b"x" * 1024,
                        headers={**a, "Content-Type": "application/octet-stream"}, expect=nf,
                        chunk=True)
        for bad in (sid.upper(), sid + "0", "x" * 300, "..%2F..%2Fetc", "%2e%2e", "null",
                    "%00", "%E2%80%AE" + sid[:8], "00000000-0000-0000-0000-00000000000g"):
            await self.call(f"{s}: malformed id", "GET", f"/upload/chunked/{bad}/status",
                            headers=a, expect=Expect((404, "session_not_found"),
                                                     (404, "not_found")), encoded_path=True)
        await self.call(s, "GET", "/nothing-here", headers=a, expect=Expect((404, "not_found")))
        await self.call(s, "GET", "/upload/chunked/session", headers=a,
                        expect=Expect((405, "method_not_allowed")))
        await self.call(s, "PUT", f"/upload/chunked/{sid}/chunk", headers=a,
                        expect=Expect((405, "method_not_allowed")))
        # (a HEAD answer has no body: an unhealthy data dir's 503 cannot show its status)
        await self.call(s, "HEAD", "/healthz", expect=Expect(200, 503, (405, "method_not_allowed")))
        await self.call(s, "GET", "/healthz?x=" + "y" * 2000, expect=Expect(200))

    async def h_create_bad(self) -> None:
        s = "create"
        a = {**self.auth(self.rng.choice(SUBJECTS))}
        good = {"filename": "a.wav", "total_size": 10_000, "chunk_size": max(self.min_chunk, 4096),
                "total_chunks": math.ceil(10_000 / max(self.min_chunk, 4096))}
        v422 = 422

        def doc(**kw: Any) -> dict[str, Any]:
            d = {**good, **kw}
            return {k: v for k, v in d.items() if v is not ...}

        cases: list[tuple[str, Any, Expect]] = [
            ("missing filename", doc(filename=...), Expect((v422, "missing_field"))),
            ("missing total_size", doc(total_size=...), Expect((v422, "missing_field"))),
            ("size as text", doc(total_size="10000"), Expect((v422, "invalid_type"))),
            ("size as float", doc(total_size=10000.5), Expect((v422, "invalid_type"))),
            ("size as bool", doc(total_size=True), Expect((v422, "invalid_type"),
                                                          (v422, "invalid_value"),
                                                          (v422, "total_chunks_mismatch"))),
            ("size 2**70", doc(total_size=2**70),
             Expect((413, "file_too_large"), (v422, "invalid_value"), (v422, "invalid_type"),
                    (v422, "total_chunks_mismatch"), (v422, "too_many_chunks"))),
            ("size 0", doc(total_size=0, total_chunks=0), Expect((v422, "invalid_value"))),
            ("size -1", doc(total_size=-1, total_chunks=1), Expect((v422, "invalid_value"))),
            ("chunks mismatch", doc(total_chunks=99), Expect((v422, "total_chunks_mismatch"))),
            ("chunk 1 byte", doc(chunk_size=1, total_chunks=10_000),
             Expect((v422, "invalid_value"))),
            ("chunk 0", doc(chunk_size=0), Expect((v422, "invalid_value"))),
            ("chunk over max", doc(chunk_size=200 * MiB, total_chunks=1),
             Expect((413, "chunk_size_too_large"))),
            ("file over max", doc(total_size=2 * 1024 * MiB, chunk_size=64 * MiB,
                                  total_chunks=32), Expect((413, "file_too_large"))),
            ("file over the disk", doc(total_size=600 * MiB, chunk_size=64 * MiB,
                                       total_chunks=10),
             Expect((507, "insufficient_storage"))),
            ("too many chunks", doc(total_size=20 * MiB, chunk_size=1024,
                                    total_chunks=20 * 1024),
             Expect((v422, "too_many_chunks"), (v422, "invalid_value"),
                    (507, "insufficient_storage"))),
            ("slash", doc(filename="../../etc/x.wav"), Expect((v422, "invalid_filename"))),
            ("backslash", doc(filename="..\\x.wav"), Expect((v422, "invalid_filename"))),
            ("NUL", doc(filename="a\u0000.wav"), Expect((v422, "invalid_filename"))),
            ("control", doc(filename="a\u001b[31m.wav"), Expect((v422, "invalid_filename"))),
            ("empty name", doc(filename=""), Expect((v422, "invalid_filename"),
                                                    (v422, "extension_not_allowed"),
                                                    (v422, "invalid_value"))),
            ("300 bytes", doc(filename="é" * 150 + ".wav"), Expect((v422, "filename_too_long"))),
            ("exe", doc(filename="a.exe"), Expect((v422, "extension_not_allowed"))),
            ("no extension", doc(filename="wav"), Expect((v422, "extension_not_allowed"))),
            ("name as list", doc(filename=["a.wav"]), Expect((v422, "invalid_type"))),
            ("long language", doc(language="x" * 100), Expect((v422, "invalid_value"),
                                                              (v422, "invalid_type"))),
            ("task_params list", doc(task_params=[1]), Expect((v422, "invalid_type"))),
            ("task_params 20 KiB", doc(task_params={"x": "y" * 20_000}),
             Expect((v422, "invalid_value"), (413, "too_large"))),
        ]
        if not self.sandbox.disk_faults:  # a big disk may well hold 600 MiB
            cases = [c for c in cases if c[0] != "file over the disk"]
        for name, body, exp in self.rng.sample(cases, 9):
            r = await self.call(f"{s}: {name}", "POST", "/upload/chunked/session", headers=a,
                                json_body=body, expect=exp)
            if r is not None and r.status == 201 and isinstance(r.doc, dict):  # not kept
                await self.call(s, "DELETE", f"/upload/chunked/{r.doc.get('session_id')}/abort",
                                headers=a, expect=Expect(200))
        for name, raw_body, ctype, exp in (
            ("not JSON", b"{nope", "application/json", Expect((400, "invalid_json"))),
            ("JSON array", b"[1, 2]", "application/json", Expect((400, "invalid_json"))),
            ("JSON string", b'"x"', "application/json", Expect((400, "invalid_json"))),
            ("deep JSON", b"[" * 100_000 + b"]" * 100_000, "application/json",
             Expect((400, "invalid_json"), (413, "too_large"))),
            ("invalid UTF-8", b'{"filename": "\xff.wav"}', "application/json",
             Expect((400, "invalid_json"))),
            ("text/plain", json.dumps(good).encode(), "text/plain",
             Expect((415, "unsupported_content_type"))),
            ("70 KiB body", json.dumps({**good, "pad": "x" * 70_000}).encode(),
             "application/json", Expect((413, "too_large"))),
        ):
            await self.call(f"{s}: {name}", "POST", "/upload/chunked/session",
                            headers={**a, "Content-Type": ctype}, data=raw_body, expect=exp)

    async def h_not_media(self) -> None:
        s = "not media"
        name = self.rng.choice(NOT_MEDIA + ("not-audio.png",))
        data = self.media.get(name) or (MEDIA / name).read_bytes()
        fname = name if name != "not-audio.png" else "picture.wav"
        up = Upload(self.rng.choice(SUBJECTS), data, fname, max(self.min_chunk, 1024), s)
        if not await self.create(up) or not await self.complete(up):
            return
        r = await self.finalize(up, expect=Expect((415, "unsupported_content")))
        if r is None or r.status != 415:
            return
        st = await self.status(up)
        if st is not None and st.status == 200 and isinstance(st.doc, dict):
            err = st.doc.get("error") or {}
            if st.doc.get("status") != "failed" or err.get("code") != "unsupported_content":
                self.unexpected(s, "GET", f"/upload/chunked/{up.sid}/status", 200, st.body,
                                "failed / unsupported_content", "status after a refused file")
        await self.finalize(up, expect=Expect((415, "unsupported_content")))
        await self.put(up, 0, expect=Expect((409, "session_finalized"), (410, None)))
        await self.abort(up, Expect(200))
        await self.status(up, expect=Expect((410, "session_aborted")))

    async def h_incomplete(self) -> None:
        s = "finalize incomplete"
        up = await self.small_session(s, chunk_size=max(self.min_chunk, 2 * KiB))
        if up is None or up.total_chunks < 2:
            return
        keep = set(self.rng.sample(range(up.total_chunks), up.total_chunks // 2))
        order = [i for i in range(up.total_chunks) if i not in keep]
        if not await self.send_all(up, order, 2):
            return
        r = await self.finalize(up, expect=Expect((409, "chunks_missing")))
        if r is not None and r.status == 409:
            missing = set(r.doc["error"].get("missing_chunks", [])) if r.code else set()
            if missing != keep:
                self.unexpected(s, "POST", f"/upload/chunked/{up.sid}/finalize", 409, r.body,
                                f"missing_chunks {sorted(keep)[:20]}", "wrong missing list")
            self.reconcile(up, r.doc, "finalize of an incomplete session")
        await self.upload_through(up)

    async def h_races(self) -> None:
        s = "races"
        kind = self.rng.choice(("abort+abort", "abort+finalize", "finalize+finalize",
                                "same chunk twice", "chunk during abort", "after the end"))
        up = await self.small_session(f"{s}: {kind}")
        if up is None:
            return
        a = self.auth(up.owner)
        base = f"/upload/chunked/{up.sid}"
        sc = up.scenario
        if kind == "abort+abort":
            rs = await asyncio.gather(*(self.call(sc, "DELETE", f"{base}/abort", headers=a,
                                                  expect=Expect(200, (410, "session_aborted")))
                                        for _ in range(3)))
            self.exactly_one(sc, f"{base}/abort", rs)
            await self.status(up, expect=Expect((410, "session_aborted")))
        elif kind == "abort+finalize":
            if not await self.complete(up):
                return
            async with self.gate.shared():
                ra, rf = await asyncio.gather(
                    self.call(sc, "DELETE", f"{base}/abort", headers=a,
                              expect=Expect(200, (409, "session_finalized"))),
                    self.call(sc, "POST", f"{base}/finalize", headers=a,
                              expect=Expect(200, (410, "session_aborted"))))
            self.exactly_one(sc, base, [ra, rf])
            if rf is not None and rf.status == 200 and isinstance(rf.doc, dict):
                self.report.uploads["started"] += 1
                self.report.uploads["completed"] += 1
                if await self.verify(up, rf.doc):
                    self.report.uploads["verified"] += 1
        elif kind == "finalize+finalize":
            if await self.complete(up):
                await self.upload_through(up, twice=True)
        elif kind == "same chunk twice":
            i = self.rng.randrange(up.total_chunks)
            path = f"{base}/chunk?index={i}"
            body = up.chunk(i)
            # One request holds the chunk with half its body and stalls; another sends all of
            # it: the first is cut off (408), the second waits for it and is counted once.
            stall = asyncio.create_task(self.raw(
                sc, [(self.head("POST", path, up.owner, length=len(body)) + body[:len(body) // 2],
                      0)], expect=Expect((408, "body_timeout"), (408, "body_too_slow")),
                label="stalled body", timeout=BODY_TIMEOUT + 8))
            await asyncio.sleep(0.3)
            r = await self.put(up, i, expect=Expect(200, (409, "chunk_busy"),
                                                    (503, "server_busy")))
            await stall
            if r is not None and r.status == 200:
                up.acked.add(i)
                self.report.chunks_acked += 1
            await self.upload_through(up)
        elif kind == "chunk during abort":
            i = self.rng.randrange(up.total_chunks)
            body = up.chunk(i)
            path = f"{base}/chunk?index={i}"

            async def late_body() -> list[Resp]:
                return await self.raw(sc, [(self.head("POST", path, up.owner, length=len(body))
                                            + body[:len(body) // 2], 0.6),
                                           (body[len(body) // 2:], 0)],
                                      expect=Expect((410, "session_aborted"),
                                                    (404, "session_not_found")),
                                      label="chunk finished after abort", timeout=10)
            t = asyncio.create_task(late_body())
            await asyncio.sleep(0.2)
            await self.abort(up, Expect(200))
            await t
            await self.put(up, i, expect=Expect((410, "session_aborted")))
        else:  # after the end: every call on an aborted and on a finalized session
            if not await self.complete(up):
                return
            up2 = await self.small_session(sc)
            self.report.uploads["started"] += 1
            doc = await self.finalize_until_done(up)
            if doc is not None:
                self.report.uploads["completed"] += 1
                if await self.verify(up, doc):
                    self.report.uploads["verified"] += 1
                fin = Expect((409, "session_finalized"))
                await self.put(up, 0, expect=fin)
                await self.call(sc, "DELETE", f"{base}/abort", headers=a, expect=fin)
                await self.finalize(up, expect=Expect(200))
            if up2 is not None:
                await self.abort(up2, Expect(200))
                gone = Expect((410, "session_aborted"))
                await self.put(up2, 0, expect=gone)
                await self.status(up2, expect=gone)
                await self.finalize(up2, expect=gone)
                await self.call(sc, "DELETE", f"/upload/chunked/{up2.sid}/abort", headers=a,
                                expect=gone)

    def exactly_one(self, scenario: str, path: str, rs: list[Resp | None]) -> None:
        wins = [r for r in rs if r is not None and r.status == 200]
        answered = [r for r in rs if r is not None]
        if len(answered) == len(rs) and len(wins) != 1:
            self.unexpected(scenario, "RACE", path, ",".join(str(r.status) for r in answered),
                            json.dumps([r.doc for r in answered])[:300], "exactly one 200",
                            f"{len(wins)} winners")

    async def h_dropped(self) -> None:
        s = "dropped body"
        up = await self.small_session(s)
        if up is None:
            return
        i = self.rng.randrange(up.total_chunks)
        body = up.chunk(i)
        path = f"/upload/chunked/{up.sid}/chunk?index={i}"
        for rst in (False, True):
            await self.raw(s, [(self.head("POST", path, up.owner, length=len(body))
                                + body[:self.rng.randint(0, len(body) - 1)], 0.1)],
                           expect=None, label="hang up mid-body", rst=rst)
        # A body that stops and never resumes: 408 after --body-timeout.
        j = (i + 1) % up.total_chunks
        body_j = up.chunk(j)
        await self.raw(s, [(self.head("POST", f"/upload/chunked/{up.sid}/chunk?index={j}",
                                      up.owner, length=len(body_j)) + body_j[:10], 0)],
                       expect=Expect((408, "body_timeout"), (408, "body_too_slow")),
                       label="stalled body", timeout=BODY_TIMEOUT + 8)
        await asyncio.sleep(0.2)
        r = await self.status(up)
        if r is not None and r.status == 200 and isinstance(r.doc, dict):
            miss = r.doc.get("missing_chunks", [])
            if i not in miss or j not in miss:
                self.unexpected(s, "GET", f"/upload/chunked/{up.sid}/status", 200, r.body,
                                f"chunks {i} and {j} missing", "a cut-off body was counted")
        await self.upload_through(up)

    async def h_slow(self) -> None:
        """A trickle: whole head, then the body a few bytes at a time (bounded)."""
        s = "slow body"
        up = await self.small_session(s, chunk_size=max(self.min_chunk, 8 * KiB))
        if up is None:
            return
        i = 0
        body = up.chunk(i)
        pieces = [(self.head("POST", f"/upload/chunked/{up.sid}/chunk?index={i}", up.owner,
                             length=len(body)), 0.0)]
        pieces += [(body[k:k + 64], 0.25) for k in range(0, min(len(body), 64 * 24), 64)]
        await self.raw(s, pieces, expect=Expect((408, "body_too_slow"), (408, "body_timeout")),
                       label="trickled body", timeout=BODY_TIMEOUT + 8, allow_no_answer=True)
        await self.upload_through(up)

    async def h_idle(self) -> None:
        """Idle and trickling sockets must be closed by the server (header timeout)."""
        s = "idle sockets"
        assert self.server is not None
        url = yarl.URL(self.server.url)
        socks: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        closed: set[int] = set()

        async def check(k: int) -> None:
            reader = socks[k][0]
            try:
                data = await asyncio.wait_for(reader.read(65536), 0.01)
            except TimeoutError:
                return
            except OSError:
                closed.add(k)
                return
            if not data:
                closed.add(k)

        try:
            for _ in range(20):
                self.report.tried += 1
                with contextlib.suppress(OSError, asyncio.TimeoutError):
                    socks.append(await asyncio.wait_for(
                        asyncio.open_connection(url.host, url.port), 3))
            epoch = self.epoch
            trickle = socks[:4]
            for _, w in trickle:
                w.write(b"GET /healthz HTTP/1.1\r\n")
            limit = self.now() + HEADER_TIMEOUT + 5
            while self.now() < limit:
                for _, w in trickle:
                    with contextlib.suppress(OSError):
                        w.write(b"X-Slow: 1\r\n")
                await asyncio.sleep(0.3)
                for k in range(len(socks)):
                    if k not in closed:
                        await check(k)
                if len(closed) == len(socks):
                    break
                await self.call(s, "GET", "/healthz", expect=Expect(200, (503, None)))
            for k in range(len(socks)):
                if k not in closed and epoch == self.epoch:
                    kind = "trickling" if k < len(trickle) else "idle"
                    self.unexpected(s, "RAW", "(no request)", "socket open", "",
                                    f"closed within {HEADER_TIMEOUT + 5:g} s",
                                    f"an {kind} socket was not closed by the server")
        finally:
            for _, w in socks:
                w.close()

    async def h_flood(self) -> None:
        """More connections than --max-connections: the ones beyond get 503 server_busy (JSON)
        at once and are closed; the server stays up."""
        if not self.max_connections:
            return
        s = "connection flood"
        assert self.server is not None
        url = yarl.URL(self.server.url)
        iv = self.begin_fault("conn_flood")
        socks: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        busy = 0
        epoch = self.epoch
        try:
            for _ in range(self.max_connections + 40):
                self.report.tried += 1
                try:
                    socks.append(await asyncio.wait_for(
                        asyncio.open_connection(url.host, url.port), 2))
                except (OSError, TimeoutError):
                    self.report.no_answer["flood connect"] += 1
            await asyncio.sleep(0.3)
            for reader, _ in socks:
                try:
                    status, ctype, body = await asyncio.wait_for(read_http_response(reader), 0.02)
                except (TimeoutError, OSError, asyncio.IncompleteReadError, ValueError):
                    continue
                busy += 1
                self.judge(s, "RAW", "(connection over the cap)", status, body, ctype,
                           Expect((503, "server_busy")), iv.start)
        finally:
            for _, w in socks:
                w.close()
            iv.end = self.now()
        if busy == 0 and epoch == self.epoch:
            self.unexpected(s, "RAW", "(connections)", "none refused", "",
                            f"503 server_busy beyond {self.max_connections} connections",
                            f"{len(socks)} connections open, none refused")

    async def h_websocket(self) -> None:
        s = "websocket"
        up = await self.small_session(s)
        if up is None:
            return
        other = "bob" if up.owner == "alice" else "alice"
        await self.ws_refused(s, up.sid, {}, Expect((401, "missing_token")))
        await self.ws_refused(s, up.sid, self.auth(other), Expect((403, "forbidden")))
        await self.ws_refused(s, up.sid, {"Authorization": "Bearer x.y.z"},
                              Expect((401, "invalid_token")))
        assert self.http is not None
        self.report.tried += 1
        url = f"{self.server_url()}/ws/tasks/{uuid.uuid4()}?access_token={self.token(up.owner)}"
        with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError, OSError):
            async with self.http.ws_connect(url, timeout=aiohttp.ClientWSTimeout(ws_close=3)) as ws:
                self.report.by_status[101] += 1
                msg = await ws.receive(timeout=5)
                if msg.type not in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED,
                                    aiohttp.WSMsgType.CLOSING) or \
                        4404 not in (msg.data, ws.close_code):
                    self.unexpected(s, "WS", "/ws/tasks/<unknown>", 101, str(msg.data)[:200],
                                    "close 4404", f"close code {ws.close_code}")
        follower = asyncio.create_task(self.follow(up))
        ok = await self.upload_through(up, parallel=2)
        await self.finish_follow(follower, up, ok)

    # -- tus: requests and bookkeeping ----------------------------------------------------

    def tus_headers(self, owner: str | None, **extra: str) -> dict[str, str]:
        h = {"Tus-Resumable": TUS_VERSION}
        if owner is not None:
            h.update(self.auth(owner))
        h.update(extra)
        return h

    async def tus_call(self, scenario: str, method: str, path: str, *, expect: Expect,
                       headers: dict[str, str], data: Any = None, head_like: bool = False,
                       **kwargs: Any) -> Resp | None:
        """One tus request: judged like any other, and every answer must carry
        ``Tus-Resumable: 1.0.0`` (412 also ``Tus-Version``); a HEAD (or a POST overridden to
        HEAD) answered 5xx is counted on its own: never allowed, faults or not."""
        r = await self.call(scenario, method, path, expect=expect, headers=headers, data=data,
                            tus=True, **kwargs)
        verb = "HEAD (override)" if head_like else method
        self.report.tus_answers[f"{verb} {r.status if r else 'none'}"
                               f"{' ' + r.code if r is not None and r.code else ''}"] += 1
        if r is None:
            return None
        if hdr(r, "Tus-Resumable") != TUS_VERSION:
            self.unexpected(scenario, method, path, r.status, r.body, "Tus-Resumable: 1.0.0",
                            "a tus answer without Tus-Resumable: 1.0.0")
        if r.status == 412 and hdr(r, "Tus-Version") != TUS_VERSION:
            self.unexpected(scenario, method, path, 412, r.body, "Tus-Version: 1.0.0",
                            "412 without Tus-Version")
        if (method == "HEAD" or head_like) and r.status >= 500:
            self.report.tus_head_5xx += 1
        return r

    def tus_offset(self, up: TusUpload, off: int, where: str, check: bool = True) -> None:
        """An offset the server answered: never beyond what was sent, never below one it
        answered before (that would be bytes lost). ``check`` False: only a lower bound for
        what follows (an answer that raced others)."""
        if off > up.sent:
            self.unexpected(up.scenario, where, up.url, off, "", f"<= {up.sent} bytes sent",
                            "an offset beyond the bytes sent")
            return
        if off < up.confirmed and not check:
            return
        if off < up.confirmed:
            gone = up.confirmed - off
            self.report.tus_bytes_lost += gone
            up.lost += gone
            self.report.tus_lost_detail.append({
                "scenario": up.scenario, "upload": up.url, "where": where,
                "answered_before": up.confirmed, "now": off, "bytes": gone,
                "t": round(self.now() - self.t0, 2), "epoch": self.epoch})
            up.confirmed = off  # sent again, so that the upload can still finish
        elif off > up.confirmed:
            self.report.tus_bytes_acked += off - up.confirmed
            up.confirmed = off

    def tus_error_offset(self, up: TusUpload, r: Resp, where: str, check: bool = True) -> None:
        """409 offset_mismatch and 503 body_stalled name the server's offset: an answer too."""
        if isinstance(r.doc, dict) and isinstance(r.doc.get("error"), dict):
            off = r.doc["error"].get("offset")
            if isinstance(off, int) and not isinstance(off, bool):
                self.tus_offset(up, off, where, check)

    def tus_check_head(self, up: TusUpload, r: Resp, where: str) -> int | None:
        """A HEAD's 200: its headers as documented; its offset is booked. Returns it."""
        try:
            off = int(hdr(r, "Upload-Offset") or "")
        except ValueError:
            self.unexpected(up.scenario, "HEAD", up.url, 200, str(r.headers)[:300],
                            "Upload-Offset", "HEAD without a numeric Upload-Offset")
            return None
        length, defer = hdr(r, "Upload-Length"), hdr(r, "Upload-Defer-Length")
        if length is not None:
            if length != str(len(up.data)):
                self.unexpected(up.scenario, "HEAD", up.url, 200, f"Upload-Length: {length}",
                                f"Upload-Length: {len(up.data)}", "wrong Upload-Length")
            up.declared = up.declared or up.deferred
        elif defer != "1" or up.declared or not up.deferred:
            self.unexpected(up.scenario, "HEAD", up.url, 200, str(r.headers)[:300],
                            "Upload-Length" if up.length_known else "Upload-Defer-Length: 1",
                            "HEAD without the length it should show")
        if "no-store" not in (hdr(r, "Cache-Control") or ""):
            self.unexpected(up.scenario, "HEAD", up.url, 200, str(r.headers)[:300],
                            "Cache-Control: no-store", "a HEAD answer that may be cached")
        md = up.metadata()
        if md and (hdr(r, "Upload-Metadata") or "").strip() != md.strip():  # HTTP trims values
            self.unexpected(up.scenario, "HEAD", up.url, 200,
                            f"Upload-Metadata: {hdr(r, 'Upload-Metadata')}", md,
                            "Upload-Metadata not as sent")
        concat = hdr(r, "Upload-Concat")
        if (up.partial and concat != "partial") or (up.final and not (concat or "").startswith(
                "final;")):
            self.unexpected(up.scenario, "HEAD", up.url, 200, f"Upload-Concat: {concat}",
                            "partial" if up.partial else "final;...", "wrong Upload-Concat")
        self.tus_offset(up, off, where)
        return off

    async def tus_head(self, up: TusUpload, *, tries: int = 120, where: str = "HEAD",
                       privileged: bool = False) -> Resp | None:
        """HEAD until it answers 200 (423 and no answer are waited out; a 5xx is counted and
        retried). Another answer is returned as it is (the caller judged it)."""
        r: Resp | None = None
        for _ in range(tries):
            t0 = self.now()
            r = await self.tus_call(up.scenario, "HEAD", up.url, headers=self.tus_headers(
                up.owner), expect=Expect(200, (423, None)), privileged=privileged)
            self.report.tus_head_max_s = max(self.report.tus_head_max_s, self.now() - t0)
            if r is not None and r.status == 200:
                self.tus_check_head(up, r, where)
                return r
            if r is not None and r.status < 500 and r.status != 423:
                return r
            if self.now() > self.hard_deadline:
                return r
            await self.backoff(r)
        return r

    def tus_patch_headers(self, up: TusUpload, offset: int, body: bytes, *,
                          declare: bool = False, checksum: bool | None = None) -> dict[str, str]:
        h = self.tus_headers(up.owner, **{"Content-Type": OFFSET_STREAM,
                                          "Upload-Offset": str(offset)})
        if declare:
            h["Upload-Length"] = str(len(up.data))
        if checksum is None:
            checksum = up.checksums == "all" or (up.checksums == "some" and
                                                 self.rng.random() < 0.5)
        if checksum:
            algorithm = self.rng.choice(TUS_ALGORITHMS)
            h["Upload-Checksum"] = f"{algorithm} {tus_digest(algorithm, body)}"
        return h

    async def tus_create(self, up: TusUpload, first: int = 0, *, retry: bool = True,
                         expect: Expect | None = None, privileged: bool = False) -> bool:
        """POST the upload (``first`` bytes with it: creation-with-upload). A creation that got
        no answer may exist or not: a client that lost its Location starts a new upload (with
        a new taskId: the old one may be taken)."""
        for _ in range(200):
            headers = self.tus_headers(up.owner)
            if up.deferred:
                headers["Upload-Defer-Length"] = "1"
            else:
                headers["Upload-Length"] = str(len(up.data))
            if up.partial:
                headers["Upload-Concat"] = "partial"
            md = up.metadata()
            if md is not None:
                headers["Upload-Metadata"] = md
            body = None
            if first:
                body = up.data[:first]
                headers.update(self.tus_patch_headers(up, 0, body))
                del headers["Upload-Offset"]
            whole = first == len(up.data) and up.completes
            async with self.gate.shared() if whole else contextlib.nullcontext():
                up.sent = max(up.sent, first)
                r = await self.tus_call(up.scenario, "POST", TUS_PATH, headers=headers,
                                        data=body, chunk=bool(first), privileged=privileged,
                                        expect=expect or Expect(201, (503, "server_busy")))
                if r is not None and r.status == 201:
                    loc = hdr(r, "Location") or ""
                    if not re.fullmatch(re.escape(TUS_PATH) + UUID_RE.pattern, loc):
                        self.unexpected(up.scenario, "POST", TUS_PATH, 201, f"Location: {loc}",
                                        f"{TUS_PATH}<uuid>", "a Location that is not "
                                        "path-absolute /files/<uuid>")
                        return False
                    up.url = loc
                    try:
                        off = int(hdr(r, "Upload-Offset") or "")
                    except ValueError:
                        self.unexpected(up.scenario, "POST", TUS_PATH, 201, str(r.headers)[:300],
                                        "Upload-Offset", "a creation without Upload-Offset")
                        off = 0
                    if first and off != first:
                        self.report.tus["creation_body_cut"] += 1
                    self.tus_offset(up, off, "creation")
                    if not hdr(r, "Upload-Expires"):
                        self.unexpected(up.scenario, "POST", TUS_PATH, 201, str(r.headers)[:300],
                                        "Upload-Expires", "a creation without Upload-Expires")
                    if whole and off == len(up.data):
                        up.handoff = await self.tus_handoff(up, self.now() + 8)
                    return True
            if not retry or self.now() > self.hard_deadline or (
                    r is not None and r.status not in (503, 507)):
                return False
            if up.task_id is not None:
                up.task_id = str(uuid.uuid4())
            up.sent = up.confirmed = 0
            await self.backoff(r)
        return False

    async def tus_send(self, up: TusUpload, *, privileged: bool = False) -> bool:
        """PATCH from the confirmed offset until the upload is whole, as a resuming client:
        409 → HEAD and go on from its offset; 423 → the same PATCH again; no answer or 5xx →
        HEAD, then on. The PATCH that completes the upload holds the finalize gate up to the
        hand-off (so that no fault cuts a finalize in two)."""
        total = len(up.data)
        per = max(1, total // self.rng.choice((1, 2, 3, 4, 6, 10, 25)))
        offset, need_head = up.confirmed, False
        for _ in range(800):
            if self.now() > self.hard_deadline:
                return False
            if need_head:
                r = await self.tus_head(up, privileged=privileged)
                if r is None or r.status != 200:
                    return False
                offset, need_head = up.confirmed, False
                self.report.tus["resumed_by_head"] += 1
            if offset >= total and up.length_known:
                return True
            end = min(total, offset + self.rng.randint(max(1, per // 2), max(1, per * 3 // 2)))
            last = end == total
            declare = up.deferred and not up.declared and (last or self.rng.random() < 0.15)
            body = up.data[offset:end]
            headers = self.tus_patch_headers(up, offset, body, declare=declare)
            completes = last and up.completes and (up.length_known or declare)
            async with self.gate.shared() if completes else contextlib.nullcontext():
                up.sent = max(up.sent, end)
                r = await self.tus_call(up.scenario, "PATCH", up.url, headers=headers, data=body,
                                        expect=PATCH_OK, chunk=True, privileged=privileged)
                if r is not None and r.status == 204:
                    new = hdr(r, "Upload-Offset")
                    if new != str(end):
                        self.unexpected(up.scenario, "PATCH", up.url, 204,
                                        f"Upload-Offset: {new}", f"Upload-Offset: {end}",
                                        "a 204 with another offset than sent")
                        need_head = True
                        continue
                    if declare:
                        up.declared = True
                    self.tus_offset(up, end, "PATCH 204")
                    offset = up.confirmed
                    if completes:
                        up.handoff = await self.tus_handoff(up, self.now() + 8)
                    continue
            if r is None:
                await self.backoff(None)
                need_head = True
                continue
            self.tus_error_offset(up, r, f"PATCH {r.status}")
            if r.status == 409 and r.code == "offset_mismatch":
                self.report.tus["offset_mismatch_resumed"] += 1
                need_head = True
                continue
            if r.status == 423:
                await self.backoff(r)
                continue
            if r.status >= 500:
                if r.code == "body_stalled":
                    self.report.tus["patch_body_stalled"] += 1
                await self.backoff(r)
                need_head = True
                continue
            return False  # recorded as unexpected by call()
        return False

    async def tus_follow(self, up: TusUpload, wsid: str, timeout: float
                         ) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
        """``/ws/tasks/<wsid>`` until its final message (or ``timeout``)."""
        assert self.http is not None
        url = f"{self.server_url()}/ws/tasks/{wsid}?access_token={self.token(up.owner)}"
        msgs: list[dict[str, Any]] = []
        final = None
        self.report.tried += 1
        t0 = self.now()
        try:
            async with asyncio.timeout(max(0.2, timeout)):
                async with self.http.ws_connect(url, heartbeat=None,
                                                timeout=aiohttp.ClientWSTimeout(ws_close=3)) as ws:
                    self.report.by_status[101] += 1
                    async for msg in ws:
                        if msg.type != aiohttp.WSMsgType.TEXT:
                            break
                        doc = json.loads(msg.data)
                        msgs.append(doc)
                        if doc.get("type") == "error" or (doc.get("type") == "progress" and
                                                          doc.get("stage") == "complete"):
                            final = doc
                            break
        except aiohttp.WSServerHandshakeError as exc:
            self.report.by_status[exc.status] += 1
            allowed, killed = self.fault_allowance(t0, self.now())
            if exc.status != 503 and not killed:
                self.unexpected(up.scenario, "WS", f"/ws/tasks/{wsid}", exc.status, exc.message,
                                "101", "the task's WebSocket was refused")
        except TimeoutError:
            pass
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            self.report.no_answer[f"ws {type(exc).__name__}"] += 1
        last = -1
        for m in msgs:
            if m.get("type") == "upload_progress":
                got = m.get("uploaded_bytes", -1)
                if not isinstance(got, int) or got < last or got > len(up.data):
                    self.unexpected(up.scenario, "WS", f"/ws/tasks/{wsid}", 101, json.dumps(m),
                                    f"uploaded_bytes rising, at most {len(up.data)}",
                                    f"{got} after {last}")
                last = max(last, got if isinstance(got, int) else last)
        return final, msgs

    async def tus_handoff(self, up: TusUpload, limit: float) -> dict[str, Any] | None:
        """The task's final message, from ``/ws/tasks/<taskId or upload id>``; between tries a
        HEAD (which finalizes a whole upload that nobody finalized)."""
        wsid = up.task_id or up.uid
        while self.now() < limit:
            final, _ = await self.tus_follow(up, wsid, min(6.0, limit - self.now()))
            if final is not None:
                return final
            if self.now() >= limit:
                break
            await self.backoff(None)
            await self.tus_head(up, tries=3)
        return None

    async def tus_finish(self, up: TusUpload) -> bool:
        """The upload is whole: its hand-off, then the file checked."""
        msg = up.handoff or await self.tus_handoff(up, self.hard_deadline)
        if msg is None:
            self.report.tus["unfinished"] += 1
            self.report.finding(f"{up.scenario}: tus upload {up.url} whole but not handed off "
                                "by the end of the settle time")
            return False
        self.report.tus["completed"] += 1
        if await self.tus_verify(up, msg):
            self.report.tus["verified"] += 1
            return True
        return False

    async def tus_verify(self, up: TusUpload, msg: dict[str, Any]) -> bool:
        """The folder hand-off's file (``completed/<task id>/upload.<ext>``, the task id being
        the metadata taskId when given) holds exactly what was sent."""
        wsid = f"/ws/tasks/{up.task_id or up.uid}"
        if msg.get("type") == "error":
            self.unexpected(up.scenario, "WS", wsid, 101, json.dumps(msg), "progress complete",
                            "the task of a whole upload failed")
            return False
        task_id, location = msg.get("task_id"), msg.get("location")
        if up.task_id is not None and task_id != up.task_id:
            self.unexpected(up.scenario, "WS", wsid, 101, json.dumps(msg), f"task_id {up.task_id}",
                            "the task id is not the metadata's taskId")
        if location != f"completed/{task_id}/upload.{up.extension}":
            self.unexpected(up.scenario, "WS", wsid, 101, json.dumps(msg),
                            f"location completed/{task_id}/upload.{up.extension}",
                            "unexpected location")
            return False
        target = self.data_dir / location
        try:
            stored = await asyncio.to_thread(target.read_bytes)
        except OSError as exc:
            self.unexpected(up.scenario, "WS", wsid, 101, json.dumps(msg), "a file there",
                            f"the handed-off file cannot be read: {exc}")
            stored = b""
        ok = sha256(stored) == sha256(up.data)
        if not ok:
            same = next((k for k, (x, y) in enumerate(zip(stored, up.data, strict=False))
                         if x != y), min(len(stored), len(up.data)))
            gone = len(up.data) - same
            self.report.tus_bytes_lost += gone
            self.report.tus_lost_detail.append({
                "scenario": up.scenario, "upload": up.url, "task_id": task_id,
                "where": "handed-off file", "size_sent": len(up.data),
                "size_stored": len(stored), "first_difference": same, "bytes": gone})
        if self.rng.random() < 0.3:  # a resuming client finds it whole
            r = await self.tus_head(up, tries=20)
            if r is not None and r.status == 200 and hdr(r, "Upload-Offset") != str(len(up.data)):
                self.unexpected(up.scenario, "HEAD", up.url, 200, str(r.headers)[:300],
                                "Upload-Offset = Upload-Length", "a handed-off upload not whole")
        with contextlib.suppress(OSError):  # keep the small disk from filling with our files
            await asyncio.to_thread(shutil.rmtree, target.parent)
        return ok

    async def tus_complete(self, up: TusUpload, *, privileged: bool = False) -> bool:
        """From wherever the upload is (HEAD first) to a verified hand-off."""
        self.report.tus["started"] += 1
        r = await self.tus_head(up, privileged=privileged)
        if r is None or r.status != 200 or not await self.tus_send(up, privileged=privileged):
            self.report.tus["failed"] += 1
            return False
        return await self.tus_finish(up)

    async def tus_delete(self, up: TusUpload, expect: Expect | None = None) -> Resp | None:
        exp = expect or Expect(204)
        for _ in range(40):
            r = await self.tus_call(up.scenario, "DELETE", up.url,
                                    headers=self.tus_headers(up.owner), expect=exp)
            if r is None:  # it may have been done before the answer was lost (kill -9)
                exp = exp.plus((410, "session_aborted"))
            if r is not None and r.status == 204 and r.body:
                self.unexpected(up.scenario, "DELETE", up.url, 204, r.body, "an empty 204",
                                "a DELETE 204 with a body")
            if r is None or r.status in (503, 507):
                if self.now() > self.hard_deadline:
                    return r
                await self.backoff(r)
                continue
            return r
        return None

    # -- tus: normal uploads --------------------------------------------------------------

    def new_tus(self, scenario: str, owner: str | None = None, *, small: bool = False,
                data: bytes | None = None, filename: str | None = "", **kw: Any) -> TusUpload:
        """A tus upload of real media (``filename`` "" picks the media's own name)."""
        if data is None:
            name, data = self.make_media(small=small)
            filename = name if filename == "" else filename
        up = TusUpload(owner or self.rng.choice(SUBJECTS), data, scenario,
                       filename=filename or None, **kw)
        return up

    async def tus_small(self, scenario: str, owner: str | None = None, **kw: Any
                        ) -> TusUpload | None:
        up = self.new_tus(scenario, owner, small=True, **kw)
        return up if await self.tus_create(up) else None

    async def tus_worker(self, n: int) -> None:
        while self.take_round():
            if self.rng.random() < 0.3:
                self.report.scenarios["tus concat"] += 1
                await self.tus_concat_upload(n)
            else:
                self.report.scenarios["tus upload"] += 1
                await self.tus_upload(n)

    async def tus_upload(self, n: int) -> bool:
        owner = SUBJECTS[n % 2] if self.rng.random() < 0.7 else self.rng.choice(SUBJECTS)
        name, data = self.make_media()
        up = TusUpload(owner, data, "tus upload")
        roll = self.rng.random()
        if roll < 0.1:
            up.filename = None  # stored as upload.bin
        else:
            up.filename = name
            up.name_key = "name" if self.rng.random() < 0.15 else "filename"
        if self.rng.random() < 0.4:
            up.task_id = str(uuid.uuid4())
        if self.rng.random() < 0.3:
            extras: list[tuple[str, str | None]] = [("language", "en"), ("model", "small"),
                                                    ("filetype", ""), ("flag", None)]
            up.extra_md = self.rng.sample(extras, self.rng.randint(1, len(extras)))
        up.deferred = self.rng.random() < 0.25
        up.checksums = self.rng.choice(("none", "none", "all", "some"))
        first = 0
        if self.rng.random() < 0.3:
            first = len(data) if not up.deferred and self.rng.random() < 0.3 else \
                self.rng.randint(1, len(data) - 1)
        up.scenario = ("tus upload" + (", deferred" if up.deferred else "") +
                       (", with upload" if first else "") + (", taskId" if up.task_id else ""))
        self.report.tus["started"] += 1
        if not await self.tus_create(up, first):
            self.report.tus["not_created"] += 1
            return False
        follower = None
        if self.rng.random() < 0.15:  # progress followed while it uploads
            follower = asyncio.create_task(self.tus_follow(up, up.task_id or up.uid, 30))
        ok = await self.tus_send(up)
        if not ok:
            self.report.tus["failed"] += 1
        else:
            ok = await self.tus_finish(up)
        if follower is not None:
            with contextlib.suppress(TimeoutError):
                final, _ = await asyncio.wait_for(follower, 10)
                if ok and final is not None and final.get("type") == "error":
                    self.unexpected(up.scenario, "WS", up.url, 101, json.dumps(final),
                                    "progress complete", "an error for a verified upload")
        return ok

    async def tus_concat_upload(self, n: int) -> bool:
        """2-4 partial uploads, then the final POST (sometimes twice); the whole is checked."""
        owner = SUBJECTS[n % 2] if self.rng.random() < 0.7 else self.rng.choice(SUBJECTS)
        name, data = self.make_media()
        k = self.rng.randint(2, 4)
        cuts = sorted(self.rng.sample(range(1, len(data)), k - 1))
        bounds = [0, *cuts, len(data)]
        parts = [TusUpload(owner, data[a:b], "tus concat: partial", partial=True,
                           checksums=self.rng.choice(("none", "all", "some")))
                 for a, b in itertools.pairwise(bounds)]
        self.report.tus["concat_started"] += 1
        self.report.tus["started"] += 1
        for p in parts:
            first = self.rng.randint(1, len(p.data)) if self.rng.random() < 0.3 else 0
            if not await self.tus_create(p, first):
                self.report.tus["concat_failed"] += 1
                return False
        if self.rng.random() < 0.5:
            sent = [await self.tus_send(p) for p in parts]
        else:
            sent = list(await asyncio.gather(*(self.tus_send(p) for p in parts)))
        if not all(sent):
            self.report.tus["concat_failed"] += 1
            return False
        final = TusUpload(owner, data, "tus concat: final", filename=name, final=True)
        if self.rng.random() < 0.4:
            final.task_id = str(uuid.uuid4())
        twice = self.rng.choice((None, None, "again", "at once"))
        if not await self.tus_final_post(final, parts, twice):
            self.report.tus["concat_failed"] += 1
            return False
        r = await self.tus_head(final)
        if r is not None and r.status == 200 and hdr(r, "Upload-Offset") != str(len(data)):
            self.unexpected(final.scenario, "HEAD", final.url, 200, str(r.headers)[:300],
                            f"Upload-Offset {len(data)}", "a final upload not whole")
        if self.rng.random() < 0.3:
            p = self.rng.choice(parts)
            await self.tus_head(p)  # still whole for a client that retries the whole flow
        ok = await self.tus_finish(final)
        if ok:
            self.report.tus["concat_verified"] += 1
        return ok

    async def tus_final_post(self, final: TusUpload, parts: list[TusUpload],
                             twice: str | None = None, *, expect: Expect | None = None) -> bool:
        """The final POST of a concatenation, retried through faults (the same list is the same
        upload); ``twice``: sent again after its answer, or two at once: one Location."""
        urls = [p.url for p in parts]
        if self.rng.random() < 0.5:  # as tus-js-client sends them: absolute
            urls = [f"http://example.test{u}" for u in urls]
        headers = self.tus_headers(final.owner, **{"Upload-Concat": "final;" + " ".join(urls)})
        md = final.metadata()
        if md is not None:
            headers["Upload-Metadata"] = md
        exp = expect or Expect(201, (503, "server_busy"))
        final.sent = final.confirmed = 0
        for _ in range(100):
            async with self.gate.shared():
                post = self.tus_call(final.scenario, "POST", TUS_PATH, headers=headers,
                                     expect=exp)
                if twice == "at once":
                    rs = list(await asyncio.gather(post, self.tus_call(
                        final.scenario, "POST", TUS_PATH, headers=headers, expect=exp)))
                elif twice == "again":
                    rs = [await post]
                    if rs[0] is not None and rs[0].status == 201:
                        rs.append(await self.tus_call(final.scenario, "POST", TUS_PATH,
                                                      headers=headers, expect=exp))
                else:
                    rs = [await post]
                locs = {hdr(r, "Location") for r in rs if r is not None and r.status == 201}
                if len(locs) > 1:
                    self.unexpected(final.scenario, "POST", TUS_PATH, 201, json.dumps(sorted(
                        str(x) for x in locs)), "one Location", "one partial list, two uploads")
                if locs:
                    final.url = str(sorted(str(x) for x in locs)[0])
                    final.sent = final.confirmed = len(final.data)  # whole from the start
                    final.handoff = await self.tus_handoff(final, self.now() + 8)
                    return True
            if self.now() > self.hard_deadline or any(
                    r is not None and r.status not in (503, 507) for r in rs):
                return False
            twice = None
            await self.backoff(next((r for r in rs if r is not None), None))
        return False

    # -- tus: hostile requests ------------------------------------------------------------

    async def tus_patch(self, up: TusUpload, offset: int, body: Any, expect: Expect,
                        sent: int | None = None, *, racing: bool = False,
                        allow_no_answer: bool = False, privileged: bool = False,
                        hdrs: dict[str, str] | None = None) -> Resp | None:
        """One PATCH as given (``hdrs`` override the usual ones; "\\0" removes one).
        ``racing``: other requests for the upload run at once, so this answer's offset is only
        booked as a lower bound (answers of concurrent requests come back in any order)."""
        h = self.tus_headers(up.owner, **{"Content-Type": OFFSET_STREAM,
                                          "Upload-Offset": str(offset)})
        h.update(hdrs or {})
        h = {k: v for k, v in h.items() if v != "\0"}
        up.sent = max(up.sent, sent if sent is not None else
                      offset + (len(body) if isinstance(body, bytes) else 0))
        r = await self.tus_call(up.scenario, "PATCH", up.url, headers=h, data=body,
                                expect=expect, chunk=True, allow_no_answer=allow_no_answer or
                                racing, privileged=privileged)
        if r is not None and r.status == 204:
            with contextlib.suppress(ValueError):
                self.tus_offset(up, int(hdr(r, "Upload-Offset") or ""), "PATCH 204",
                                check=not racing)
        elif r is not None:
            self.tus_error_offset(up, r, f"PATCH {r.status}", check=not racing)
        return r

    async def tus_advance(self, up: TusUpload, upto: int) -> bool:
        """Plain PATCHes to ``upto`` bytes (a scenario's starting point)."""
        for _ in range(40):
            if up.confirmed >= upto:
                return True
            r = await self.tus_patch(up, up.confirmed, up.data[up.confirmed:upto], PATCH_OK)
            if r is None or r.status != 204:
                h = await self.tus_head(up)
                if h is None or h.status != 200:
                    return False
        return up.confirmed >= upto

    async def tus_expect_offset(self, up: TusUpload, want: int | tuple[int, int],
                                why: str) -> int | None:
        """HEAD; the offset must be ``want`` (or within the range)."""
        r = await self.tus_head(up)
        if r is None or r.status != 200:
            return None
        off = up.confirmed
        lo, hi = (want, want) if isinstance(want, int) else want
        if not lo <= off <= hi:
            self.unexpected(up.scenario, "HEAD", up.url, 200, f"Upload-Offset: {off}",
                            f"Upload-Offset {lo}" + (f"..{hi}" if hi != lo else ""), why)
        return off

    def status_only(self, exp: Expect) -> Expect:
        """The same statuses without codes (a HEAD answer has no body)."""
        return Expect(*[(s, None) for s in exp.allowed])

    async def h_tus_version(self) -> None:
        s = "tus version"
        up = await self.tus_small(s)
        if up is None:
            return
        cases = [(m, v) for m in ("POST", "HEAD", "PATCH", "DELETE")
                 for v in (None, "0.2.2", "1.0", "1.0.0.0")]
        for method, version in self.rng.sample(cases, 5):
            headers = {**self.auth(up.owner), "Upload-Length": "10", "Upload-Offset": "0",
                       "Content-Type": OFFSET_STREAM}
            if version is not None:
                headers["Tus-Resumable"] = version
            exp = Expect((412, "tus_version_unsupported"))
            await self.tus_call(f"{s}: {method} {version}", method,
                                TUS_PATH if method == "POST" else up.url, headers=headers,
                                data=b"x" * 10 if method == "PATCH" else None,
                                expect=self.status_only(exp) if method == "HEAD" else exp)
        for path in (TUS_PATH, up.url, TUS_PATH.rstrip("/")):
            r = await self.tus_call(s, "OPTIONS", path, headers={}, expect=Expect(204))
            if r is not None and r.status == 204:
                ext = set((hdr(r, "Tus-Extension") or "").split(","))
                want = {"creation", "creation-with-upload", "creation-defer-length",
                        "termination", "expiration", "checksum", "concatenation"}
                if hdr(r, "Tus-Version") != TUS_VERSION or not want <= ext or \
                        hdr(r, "Tus-Max-Size") != str(self.max_file_size) or \
                        set((hdr(r, "Tus-Checksum-Algorithm") or "").split(",")) != \
                        set(TUS_ALGORITHMS):
                    self.unexpected(s, "OPTIONS", path, 204, str(r.headers)[:300],
                                    "Tus-Version, Tus-Extension, Tus-Max-Size, "
                                    "Tus-Checksum-Algorithm", "OPTIONS headers")
        await self.tus_expect_offset(up, 0, "requests refused with 412 touched the upload")
        await self.tus_delete(up)

    async def h_tus_create_bad(self) -> None:
        s = "tus create"
        owner = self.rng.choice(SUBJECTS)
        L, D, M = "Upload-Length", "Upload-Defer-Length", "Upload-Metadata"
        inv_len, inv_md = Expect((400, "invalid_length")), Expect((400, "invalid_metadata"))
        cases: list[tuple[str, dict[str, str], Expect]] = [
            ("no length", {}, inv_len),
            ("length and defer", {L: "10", D: "1"}, inv_len),
            ("length -1", {L: "-1"}, inv_len), ("length ten", {L: "ten"}, inv_len),
            ("length 1.5", {L: "1.5"}, inv_len), ("length 0x10", {L: "0x10"}, inv_len),
            ("length +10", {L: "+10"}, inv_len), ("length 20 digits", {L: "9" * 20}, inv_len),
            ("defer 2", {D: "2"}, inv_len), ("defer 0", {D: "0"}, inv_len),
            ("defer yes", {D: "yes"}, inv_len),
            ("length over max", {L: str(2 * 1024 * MiB)}, Expect((413, "upload_too_large"))),
            ("metadata not base64", {L: "10", M: "filename !!!"}, inv_md),
            ("metadata key twice", {L: "10", M: "a YQ==,a YQ=="}, inv_md),
            ("metadata not UTF-8", {L: "10", M: "filename " + base64.b64encode(
                b"\xff\xfe.wav").decode()}, inv_md),
            ("metadata 65 pairs", {L: "10", M: ",".join(f"k{i} YQ==" for i in range(65))},
             inv_md),
            ("metadata empty pair", {L: "10", M: tus_md([("filename", "a.wav")]) + ",,x"},
             inv_md),
            ("filename exe", {L: "10", M: tus_md([("filename", "a.exe")])},
             Expect((422, "extension_not_allowed"))),
            ("name exe (Uppy)", {L: "10", M: tus_md([("name", "a.exe")])},
             Expect((422, "extension_not_allowed"))),
            ("filename with a slash", {L: "10", M: tus_md([("filename", "../a.wav")])},
             Expect((422, "invalid_filename"))),
            ("filename 300 bytes", {L: "10", M: tus_md([("filename", "é" * 150 + ".wav")])},
             Expect((422, "filename_too_long"))),
            ("taskId not a UUID", {L: "10", M: tus_md([("taskId", "not-a-uuid")])},
             Expect((422, "invalid_task_id"))),
            ("language 100 chars", {L: "10", M: tus_md([("language", "x" * 100)])},
             Expect((422, "invalid_value"))),
            ("concat sideways", {L: "10", "Upload-Concat": "sideways"},
             Expect((400, "invalid_concat"))),
            ("final of nothing", {"Upload-Concat": "final;"}, Expect((400, "invalid_concat"))),
        ]
        if self.sandbox.disk_faults:
            cases.append(("length over the disk", {L: str(600 * MiB)},
                          Expect((507, "insufficient_storage"))))
        for name, headers, exp in self.rng.sample(cases, 9):
            r = await self.tus_call(f"{s}: {name}", "POST", TUS_PATH,
                                    headers=self.tus_headers(owner, **headers), expect=exp)
            if r is not None and r.status == 201:  # not kept
                await self.tus_call(s, "DELETE", hdr(r, "Location") or TUS_PATH,
                                    headers=self.tus_headers(owner), expect=Expect(204))
        # A taskId may name one task only.
        up = self.new_tus(f"{s}: taskId reused", owner, small=True, task_id=str(uuid.uuid4()))
        if await self.tus_create(up):  # (a creation retried after a fault has a new taskId)
            other = self.new_tus(up.scenario, self.rng.choice(SUBJECTS), small=True,
                                 task_id=up.task_id)
            if await self.tus_create(other, retry=False,
                                     expect=Expect((422, "task_id_in_use"))):
                await self.tus_delete(other)
            if self.rng.random() < 0.5:
                await self.tus_complete(up)
            else:
                await self.tus_delete(up)
        # Creation-with-upload whose body is past the length: the upload exists (201), with
        # the offset that was kept (none of it).
        up = self.new_tus(f"{s}: with a body past the length", owner, small=True)
        h = self.tus_headers(owner, **{"Upload-Length": "100", "Content-Type": OFFSET_STREAM})
        r = await self.tus_call(up.scenario, "POST", TUS_PATH, headers=h, data=up.data[:200],
                                expect=Expect(201, (413, "size_exceeded")))
        if r is not None and r.status == 201:
            if hdr(r, "Upload-Offset") != "0":
                self.unexpected(up.scenario, "POST", TUS_PATH, 201, str(r.headers)[:300],
                                "Upload-Offset: 0", "a body past the length was kept")
            up.url = hdr(r, "Location") or ""
            await self.tus_delete(up)

    async def h_tus_patch_bad(self) -> None:
        s = "tus patch"
        up = await self.tus_small(s)
        if up is None:
            return
        o = self.rng.randint(1, min(500, len(up.data) // 2))
        if not await self.tus_advance(up, o):
            return
        total = len(up.data)
        body = up.data[o:o + 100]
        mismatch = Expect((409, "offset_mismatch"))
        inv_off = Expect((400, "invalid_offset"))
        cases: list[tuple[str, dict[str, str], bytes, Expect]] = [
            ("offset ahead", {"Upload-Offset": str(o + 100)}, body, mismatch),
            ("offset behind", {"Upload-Offset": "0"}, body, mismatch),
            ("offset empty", {"Upload-Offset": ""}, body, inv_off),
            ("offset -5", {"Upload-Offset": "-5"}, body, inv_off),
            ("offset 5.0", {"Upload-Offset": f"{o}.0"}, body, inv_off),
            ("offset hex", {"Upload-Offset": hex(o)}, body, inv_off),
            ("no offset", {"Upload-Offset": "\0"}, body, inv_off),
            ("octet-stream", {"Content-Type": "application/octet-stream"}, body,
             Expect((415, "unsupported_content_type"))),
            ("json", {"Content-Type": "application/json"}, body,
             Expect((415, "unsupported_content_type"))),
            ("past the length", {}, up.data[o:] + b"!", Expect((413, "size_exceeded"))),
            ("another length", {"Upload-Length": str(total + 1)}, body,
             Expect((400, "invalid_length"))),
            ("length not a number", {"Upload-Length": "x"}, body,
             Expect((400, "invalid_length"))),
            ("encoding", {"Content-Encoding": "x-unknown"}, body,
             Expect((415, "unsupported_encoding"))),
        ]
        for name, headers, data, exp in self.rng.sample(cases, 6):
            r = await self.tus_patch(up, o, data, exp, sent=o, hdrs=headers)
            if r is not None and r.status == 409 and isinstance(r.doc, dict) and \
                    r.doc.get("error", {}).get("offset") != o:
                self.unexpected(f"{s}: {name}", "PATCH", up.url, 409, r.body,
                                f"offset {o}", "409 naming another offset")
        await self.tus_expect_offset(up, o, "a refused PATCH touched the upload")
        # Over --max-chunk-size: refused on its Content-Length, before a byte of the body.
        await self.raw(s, [(self.head("PATCH", up.url, up.owner, ctype=OFFSET_STREAM,
                                      length=self.max_patch + 1,
                                      extra=f"Tus-Resumable: {TUS_VERSION}\r\n"
                                            f"Upload-Offset: {o}\r\n"), 0)],
                       expect=Expect((413, "patch_too_large")), label="tus PATCH over the max",
                       tus=True)
        await self.tus_expect_offset(up, o, "a PATCH over the max touched the upload")
        # No Content-Length (chunked) and past the length: cut there, the prefix is kept (it
        # may make the upload whole: then it is finalized).
        if self.rng.random() < 0.5:
            async with self.gate.shared():
                up.sent = total
                r = await self.tus_patch(up, o, gen_chunks(split(up.data[o:] + b"!" * 3000, 4)),
                                         Expect((413, "size_exceeded")), sent=total,
                                         allow_no_answer=True)
                await self.tus_expect_offset(up, (o, total), "a body past the length")
                if up.confirmed == total:
                    up.handoff = await self.tus_handoff(up, self.now() + 8)
        await self.tus_complete(up)

    async def h_tus_checksum(self) -> None:
        s = "tus checksum"
        up = await self.tus_small(s)
        if up is None:
            return
        o = self.rng.choice((0, self.rng.randint(1, len(up.data) // 3)))
        if not await self.tus_advance(up, o):
            return
        body = up.data[o:o + self.rng.randint(1, len(up.data) - o)]
        for algorithm in self.rng.sample(TUS_ALGORITHMS, 2):
            await self.tus_patch(up, o, body, Expect((460, "upload_checksum_mismatch")), sent=o,
                                 hdrs={"Upload-Checksum":
                                       f"{algorithm} {tus_digest(algorithm, body + b'!')}"})
            await self.tus_expect_offset(up, o, "a body with a wrong checksum was kept")
        bad = Expect((400, "invalid_upload_checksum"))
        for value, exp in self.rng.sample([
                (f"crc32 {tus_digest('md5', body)}", bad), ("sha512 AAAA", bad),
                (f"blake2b {tus_digest('sha256', body)}", bad), ("sha1 %%%", bad),
                ("", bad), ("sha1", Expect((400, "invalid_upload_checksum"),
                                           (460, "upload_checksum_mismatch"))),
                ("md5 AAAA", Expect((400, "invalid_upload_checksum"),
                                    (460, "upload_checksum_mismatch")))], 3):
            await self.tus_patch(up, o, body, exp, sent=o, hdrs={"Upload-Checksum": value})
        await self.tus_expect_offset(up, o, "a PATCH with a bad Upload-Checksum was kept")
        algorithm = self.rng.choice(TUS_ALGORITHMS)
        r = await self.tus_patch(up, o, body, PATCH_OK, hdrs={
            "Upload-Checksum": f"{algorithm} {tus_digest(algorithm, body)}"})
        if r is not None and r.status == 204 and hdr(r, "Upload-Offset") != str(o + len(body)):
            self.unexpected(s, "PATCH", up.url, 204, str(r.headers)[:300],
                            f"Upload-Offset {o + len(body)}", "a right checksum, a wrong offset")
        await self.tus_complete(up)

    async def h_tus_concat_bad(self) -> None:
        s = "tus concat refusals"
        owner = self.rng.choice(SUBJECTS)
        other = "bob" if owner == "alice" else "alice"
        name, data = self.make_media(small=True)
        cut = self.rng.randint(1, len(data) - 1)
        a = TusUpload(owner, data[:cut], s, partial=True)
        b = TusUpload(owner, data[cut:], s, partial=True)
        c = TusUpload(owner, os.urandom(300), s, partial=True)  # left incomplete
        d = TusUpload(other, os.urandom(300), s, partial=True)  # another subject's
        plain = TusUpload(owner, os.urandom(300), s)  # not partial
        for u in (a, b, c, d, plain):
            if not await self.tus_create(u):
                return
        for u in (a, b, d):
            if not await self.tus_send(u):
                return
        await self.tus_advance(c, 100)
        final = TusUpload(owner, data, f"{s}: final", filename=name, final=True)

        async def post(case: str, urls: list[str], exp: Expect, **extra: str) -> Resp | None:
            h = self.tus_headers(owner, **{"Upload-Concat": "final;" + " ".join(urls)}, **extra)
            return await self.tus_call(f"{s}: {case}", "POST", TUS_PATH, headers=h, expect=exp)

        cases: list[tuple[str, list[str], Expect, dict[str, str]]] = [
            ("incomplete partial", [a.url, b.url, c.url], Expect((400, "partial_incomplete")),
             {}),
            ("unknown partial", [a.url, f"{TUS_PATH}{uuid.uuid4()}"],
             Expect((404, "session_not_found")), {}),
            ("not a partial", [a.url, plain.url], Expect((400, "invalid_concat")), {}),
            ("named twice", [a.url, b.url, a.url], Expect((400, "invalid_concat")), {}),
            ("another server's URL", [a.url, f"/elsewhere/{uuid.uuid4()}"],
             Expect((400, "invalid_concat")), {}),
            ("a path below an upload", [a.url, b.url + "/x"], Expect((400, "invalid_concat"),
                                                                      (404, None)), {}),
            # docs/API.md: "401 / 403, also for the partials of a final POST" (the error table
            # also lists "not the caller's" under invalid_concat)
            ("another subject's partial", [a.url, d.url],
             Expect((403, "forbidden"), (400, "invalid_concat")), {}),
            ("with a length", [a.url, b.url], Expect((400, "invalid_length")),
             {"Upload-Length": str(len(data))}),
            ("bad filename", [a.url, b.url], Expect((422, "extension_not_allowed")),
             {"Upload-Metadata": tus_md([("filename", "x.exe")])}),
            ("garbage list", ["%%%", "::"], Expect((400, "invalid_concat")), {}),
        ]
        for case, urls, exp, extra in self.rng.sample(cases, 5):
            await post(case, urls, exp, **extra)
        # None of that took a partial: the right list still works, once.
        if not await self.tus_final_post(final, [a, b]):
            return
        await self.tus_patch(final, len(data), b"x", Expect((403, "final_upload")), sent=0)
        if await self.tus_advance(c, len(c.data)):  # (a fault may have refused its PATCH)
            await post("a partial in another final", [a.url, c.url],
                       Expect((409, "partial_in_use"), (410, "partial_gone")))
        await post("a final as a partial", [final.url, c.url], Expect((400, "invalid_concat")))
        self.report.tus["concat_started"] += 1
        self.report.tus["started"] += 1
        if await self.tus_finish(final):
            self.report.tus["concat_verified"] += 1
        # A partial taken by a final: DELETE removes its record only.
        await self.tus_delete(a)
        await self.tus_call(s, "HEAD", a.url, headers=self.tus_headers(owner),
                            expect=Expect((410, None)))
        for u in (b, c, d, plain):
            await self.tus_delete(u, Expect(204, (409, "partial_in_use")))

    async def h_tus_delete(self) -> None:
        s = "tus delete"
        up = await self.tus_small(s)
        if up is None:
            return
        await self.tus_advance(up, self.rng.randint(0, len(up.data) - 1))
        if self.rng.random() < 0.5:
            await self.tus_delete(up)
        else:  # through a proxy that passes only GET and POST
            await self.tus_call(s, "POST", up.url, expect=Expect(204), headers=self.tus_headers(
                up.owner, **{"X-HTTP-Method-Override": "DELETE"}))
        gone = Expect((410, "session_aborted"))
        await self.tus_call(s, "HEAD", up.url, headers=self.tus_headers(up.owner),
                            expect=Expect((410, None)))
        await self.tus_patch(up, up.confirmed, up.data[up.confirmed:], gone, sent=0)
        await self.tus_call(s, "DELETE", up.url, headers=self.tus_headers(up.owner), expect=gone)
        await self.tus_call(s, "POST", up.url, expect=gone, headers=self.tus_headers(
            up.owner, **{"X-HTTP-Method-Override": "HEAD"}), head_like=True)
        await self.ws_closed(s, up, 4410)
        # A handed-off upload: no more changes, but a HEAD still says it is whole.
        done = await self.tus_small(f"{s}: after the hand-off")
        if done is None or not await self.tus_complete(done):
            return
        fin = Expect((409, "session_finalized"))
        await self.tus_delete(done, fin)
        await self.tus_patch(done, len(done.data), b"", fin)
        await self.tus_expect_offset(done, len(done.data), "a handed-off upload")

    async def ws_closed(self, scenario: str, up: TusUpload, code: int) -> None:
        """The upload's WebSocket closes at once with ``code``."""
        assert self.http is not None
        self.report.tried += 1
        url = f"{self.server_url()}/ws/tasks/{up.uid}?access_token={self.token(up.owner)}"
        with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError, OSError):
            async with self.http.ws_connect(url, timeout=aiohttp.ClientWSTimeout(ws_close=3)) as ws:
                self.report.by_status[101] += 1
                msg = await ws.receive(timeout=5)
                if msg.type not in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED,
                                    aiohttp.WSMsgType.CLOSING) or code not in (msg.data,
                                                                               ws.close_code):
                    self.unexpected(scenario, "WS", f"/ws/tasks/{up.uid}", 101,
                                    str(msg.data)[:200], f"close {code}",
                                    f"close code {ws.close_code}")

    async def h_tus_override(self) -> None:
        s = "tus method override"
        up = await self.tus_small(s)
        if up is None:
            return
        k = self.rng.randint(1, len(up.data) - 1)
        for override in self.rng.sample(("PATCH", "patch", " Patch "), 1):
            up.sent = k
            r = await self.tus_call(s, "POST", up.url, data=up.data[:k], expect=Expect(204),
                                    headers=self.tus_headers(up.owner, **{
                                        "X-HTTP-Method-Override": override,
                                        "Content-Type": OFFSET_STREAM, "Upload-Offset": "0"}))
            if r is not None and r.status == 204:
                self.tus_offset(up, int(hdr(r, "Upload-Offset") or "0"), "override PATCH")
        r = await self.tus_call(s, "POST", up.url, expect=Expect(200), head_like=True,
                                headers=self.tus_headers(up.owner,
                                                         **{"X-HTTP-Method-Override": "HEAD"}))
        if r is not None and r.status == 200:
            self.tus_check_head(up, r, "override HEAD")
        for override in ("GET", "PUT", "OPTIONS", ""):
            extra: dict[str, str] = {"X-HTTP-Method-Override": override} if override else {}
            await self.tus_call(s, "POST", up.url, expect=Expect((405, "method_not_allowed")),
                                headers=self.tus_headers(up.owner, **extra))
        await self.tus_expect_offset(up, up.confirmed, "refused overrides touched the upload")
        await self.tus_complete(up)

    async def h_tus_auth(self) -> None:
        s = "tus auth"
        up = await self.tus_small(s)
        if up is None:
            return
        cases = self.bad_tokens(up.owner)
        self.rng.shuffle(cases)
        always = [c for c in cases if c[0] in ("no token", "other subject")]
        for name, headers, exp in always + [c for c in cases if c not in always][:5]:
            ep = self.rng.choice(("HEAD", "PATCH", "DELETE", "POST", "override", "ws"))
            h = {**headers, "Tus-Resumable": TUS_VERSION}
            sc = f"{s}: {name}"
            if ep == "HEAD":
                await self.tus_call(sc, "HEAD", up.url, headers=h, expect=self.status_only(exp))
            elif ep == "PATCH":
                await self.tus_call(sc, "PATCH", up.url, data=up.data[:100], expect=exp,
                                    headers={**h, "Content-Type": OFFSET_STREAM,
                                             "Upload-Offset": "0"})
            elif ep == "DELETE":
                await self.tus_call(sc, "DELETE", up.url, headers=h, expect=exp)
            elif ep == "override":
                await self.tus_call(sc, "POST", up.url, expect=exp, headers={
                    **h, "X-HTTP-Method-Override": "DELETE"})
            elif ep == "POST" and name != "other subject":
                await self.tus_call(sc, "POST", TUS_PATH, expect=exp,
                                    headers={**h, "Upload-Length": "100"})
            else:
                await self.ws_refused(sc, up.uid, headers, exp)
        await self.tus_expect_offset(up, 0, "requests with bad tokens touched the upload")
        await self.tus_complete(up)

    async def h_tus_routes(self) -> None:
        s = "tus routes"
        owner = self.rng.choice(SUBJECTS)
        a = self.tus_headers(owner)
        nf = Expect((404, "session_not_found"))
        unknown = f"{TUS_PATH}{uuid.uuid4()}"
        await self.tus_call(s, "HEAD", unknown, headers=a, expect=Expect((404, None)))
        await self.tus_call(s, "PATCH", unknown, data=b"x", expect=nf,
                            headers={**a, "Content-Type": OFFSET_STREAM, "Upload-Offset": "0"})
        await self.tus_call(s, "DELETE", unknown, headers=a, expect=nf)
        for bad in self.rng.sample(("x" * 300, "..%2F..%2Fetc", "%00", "null", "%2e%2e",
                                    str(uuid.uuid4()).upper(), str(uuid.uuid4()) + "0",
                                    "00000000-0000-0000-0000-00000000000g"), 4):
            await self.tus_call(s, "PATCH", TUS_PATH + bad, data=b"x", encoded_path=True,
                                expect=Expect((404, "session_not_found"), (404, "not_found")),
                                headers={**a, "Content-Type": OFFSET_STREAM,
                                         "Upload-Offset": "0"})
        for method in ("GET", "PUT"):
            await self.call(s, method, TUS_PATH, headers=a, tus=True,
                            expect=Expect((405, "method_not_allowed")))
        # The chunk API and tus do not reach each other's uploads.
        up = await self.tus_small(s, owner)
        chunked = await self.small_session(s, owner)
        if up is not None:
            await self.call(s, "GET", f"/upload/chunked/{up.uid}/status", headers=a, expect=nf)
            await self.call(s, "POST", f"/upload/chunked/{up.uid}/finalize", headers=a,
                            expect=nf)
            await self.call(s, "GET", up.url, headers=a, tus=True,
                            expect=Expect((405, "method_not_allowed")))
        if chunked is not None:
            await self.tus_call(s, "HEAD", f"{TUS_PATH}{chunked.sid}", headers=a,
                                expect=Expect((404, None)))
            await self.tus_call(s, "PATCH", f"{TUS_PATH}{chunked.sid}", data=chunked.chunk(0),
                                expect=nf, headers={**a, "Content-Type": OFFSET_STREAM,
                                                    "Upload-Offset": "0"})
            await self.tus_call(s, "DELETE", f"{TUS_PATH}{chunked.sid}", headers=a, expect=nf)
            await self.abort(chunked)
        if up is not None:
            await self.tus_delete(up)

    # -- tus: races and timing ------------------------------------------------------------

    async def h_tus_same_offset(self) -> None:
        """Two PATCHes at one offset at once: at most one counts, and the offset is then the
        bytes of exactly that one."""
        s = "tus two PATCHes at one offset"
        up = await self.tus_small(s)
        if up is None:
            return
        total = len(up.data)
        o = self.rng.randint(0, total // 2)
        if not await self.tus_advance(up, o):
            return
        room = total - o - 1  # neither completes the upload
        la = self.rng.randint(max(1, room // 3), room)
        lb = self.rng.randint(1, room)
        if lb == la:
            lb = max(1, la - 1) if la > 1 else la + 1
        paced = self.rng.random() < 0.6
        body_a: Any = paced_body(split(up.data[o:o + la], 4), 0.15) if paced else \
            up.data[o:o + la]
        exp = Expect(204, (409, "offset_mismatch"), (423, "upload_locked"),
                     (503, ("body_stalled", "server_busy")))
        up.sent = max(up.sent, o + max(la, lb))

        async def second() -> Resp | None:
            await asyncio.sleep(self.rng.uniform(0.05, 0.3) if paced else 0)
            return await self.tus_patch(up, o, up.data[o:o + lb], exp, racing=True)

        ra, rb = await asyncio.gather(
            self.tus_patch(up, o, body_a, exp, sent=o + la, racing=True), second())
        wins = [(r, n) for r, n in ((ra, la), (rb, lb)) if r is not None and r.status == 204]
        statuses = ",".join(str(r.status) if r else "none" for r in (ra, rb))
        if len(wins) == 2:
            self.unexpected(s, "RACE", up.url, statuses, "", "at most one 204",
                            "two PATCHes at one offset both counted")
        r = await self.tus_head(up)
        if r is None or r.status != 200:
            return
        off = up.confirmed
        if len(wins) == 1 and off != o + wins[0][1]:
            self.unexpected(s, "RACE", up.url, statuses, f"Upload-Offset: {off}",
                            f"{o + wins[0][1]} (the bytes of the one counted)",
                            "the offset is not that of the PATCH that was counted")
        elif not wins and not o <= off <= o + max(la, lb):
            self.unexpected(s, "RACE", up.url, statuses, f"Upload-Offset: {off}",
                            f"{o}..{o + max(la, lb)}", "an offset beyond both bodies")
        self.report.tus[f"same offset: {statuses}"] += 1
        await self.tus_complete(up)

    def tus_raw_head(self, up: TusUpload, offset: int, length: int, extra: str = "") -> bytes:
        return self.head("PATCH", up.url, up.owner, ctype=OFFSET_STREAM, length=length,
                         extra=f"Tus-Resumable: {TUS_VERSION}\r\nUpload-Offset: {offset}\r\n"
                               + extra)

    async def h_tus_stale(self) -> None:
        """A PATCH sends part of its body and goes silent with its socket open (its client gave
        up on it unseen): a HEAD answers within ~3 s with the prefix it kept; then on."""
        s = "tus stale PATCH"
        up = await self.tus_small(s)
        if up is None:
            return
        total = len(up.data)
        o = self.rng.choice((0, self.rng.randint(1, total // 2)))
        if not await self.tus_advance(up, o):
            return
        n = self.rng.randint(2, total - o)
        k = self.rng.randint(1, n - 1)
        up.sent = max(up.sent, o + k)
        stale = asyncio.create_task(self.raw(
            s, [(self.tus_raw_head(up, o, n) + up.data[o:o + k], 0)],
            expect=Expect((503, "body_stalled")), label="tus stale PATCH", timeout=12, tus=True))
        await asyncio.sleep(self.rng.uniform(0.5, 1.2))
        t0 = self.now()
        r = await self.tus_call(s, "HEAD", up.url, headers=self.tus_headers(up.owner),
                                expect=Expect(200, (423, None)))
        took = self.now() - t0
        self.report.tus_head_max_s = max(self.report.tus_head_max_s, took)
        stalled_by_fault = bool(self.fault_allowance(t0, self.now())[0]) or \
            self.fault_allowance(t0, self.now())[1]
        if took > STALE_HEAD_LIMIT and not stalled_by_fault:
            self.unexpected(s, "HEAD", up.url, r.status if r else "no answer", "",
                            f"an answer within {STALE_HEAD_LIMIT:g} s",
                            f"a HEAD behind a stale PATCH took {took:.1f} s")
        if r is not None and r.status == 200:
            self.tus_check_head(up, r, "HEAD after a stale PATCH")
            if up.confirmed != o + k and not stalled_by_fault:
                self.unexpected(s, "HEAD", up.url, 200, f"Upload-Offset: {up.confirmed}",
                                f"Upload-Offset {o + k} (the {k} bytes the PATCH sent)",
                                "the stale PATCH's prefix was not kept whole")
        await stale
        await self.tus_complete(up)

    async def h_tus_dropped(self) -> None:
        """A PATCH dropped mid-body (closed or reset) keeps a prefix of what it sent; one that
        stops sending is cut after --body-timeout with 503 body_stalled and keeps all of it."""
        s = "tus dropped PATCH"
        up = await self.tus_small(s)
        if up is None:
            return
        total = len(up.data)
        o = self.rng.choice((0, self.rng.randint(1, total // 2)))
        if not await self.tus_advance(up, o):
            return
        n = self.rng.randint(2, total - o)
        k = self.rng.randint(0, n - 1)
        up.sent = max(up.sent, o + k)
        if self.rng.random() < 0.7:
            await self.raw(s, [(self.tus_raw_head(up, o, n) + up.data[o:o + k], 0.1)],
                           expect=None, label="tus PATCH dropped mid-body",
                           rst=self.rng.random() < 0.5)
            await self.tus_expect_offset(up, (o, o + k), "a dropped PATCH kept more than it sent")
        else:
            t0 = self.now()
            await self.raw(s, [(self.tus_raw_head(up, o, n) + up.data[o:o + k], 0)],
                           expect=Expect((503, "body_stalled")), label="tus PATCH gone silent",
                           timeout=BODY_TIMEOUT + 8, tus=True)
            faulted = any(self.fault_allowance(t0, self.now()))
            await self.tus_expect_offset(up, (o, o + k) if faulted else o + k,
                                         "a silent PATCH did not keep what it sent")
        await self.tus_complete(up)

    async def h_tus_delete_race(self) -> None:
        """DELETE while a PATCH streams: 204, the PATCH stops, the upload is gone."""
        s = "tus DELETE during a PATCH"
        up = await self.tus_small(s)
        if up is None:
            return
        total = len(up.data)
        o = self.rng.randint(0, total // 3)
        if not await self.tus_advance(up, o):
            return
        n = self.rng.randint(total // 3, total - o - 1)
        exp = Expect(204, (503, ("body_stalled", "server_busy")), (410, "session_aborted"),
                     (404, "session_not_found"), (423, "upload_locked"))
        patch = asyncio.create_task(self.tus_patch(
            up, o, paced_body(split(up.data[o:o + n], 6), 0.15), exp, sent=o + n, racing=True))
        await asyncio.sleep(self.rng.uniform(0.1, 0.5))
        await self.tus_delete(up)
        await patch
        await self.tus_call(s, "HEAD", up.url, headers=self.tus_headers(up.owner),
                            expect=Expect((410, None)))
        await self.tus_patch(up, 0, b"x", Expect((410, "session_aborted")), sent=0)

    async def h_tus_not_media(self) -> None:
        s = "tus not media"
        name = self.rng.choice(NOT_MEDIA + ("not-audio.png",))
        data = self.media.get(name) or (MEDIA / name).read_bytes()
        up = TusUpload(self.rng.choice(SUBJECTS), data, s, filename="picture.wav",
                       task_id=str(uuid.uuid4()) if self.rng.random() < 0.5 else None)
        if not await self.tus_create(up):
            return
        async with self.gate.shared():
            r = await self.tus_patch(up, 0, data, Expect(204))
            if r is None or r.status != 204:
                return
            final, _ = await self.tus_follow(up, up.task_id or up.uid, 8)
        if final is None or final.get("type") != "error" or \
                final.get("error_code") != "unsupported_content":
            self.unexpected(s, "WS", f"/ws/tasks/{up.task_id or up.uid}", 101,
                            json.dumps(final), "error unsupported_content",
                            "a file that is not media was not refused on the WebSocket")
            return
        await self.tus_call(s, "HEAD", up.url, headers=self.tus_headers(up.owner),
                            expect=Expect((415, None)))
        await self.tus_patch(up, len(data), b"", Expect((415, "unsupported_content")))
        await self.tus_delete(up, Expect(204, (409, "session_finalized")))


    # -- tus during the faults ------------------------------------------------------------

    async def tus_probe(self, scenario: str) -> TusUpload | None:
        """A tus upload with a third of its bytes, for a fault to find in the middle."""
        if not self.tus_on:
            return None
        up = TusUpload(self.rng.choice(SUBJECTS), self.media["speech.wav"], scenario,
                       filename="probe.wav", checksums=self.rng.choice(("none", "some")))
        if not await self.tus_create(up, retry=False):
            return None
        return up if await self.tus_advance(up, len(up.data) // 3) else None

    async def tus_during_fault(self, up: TusUpload, patch_expect: Expect) -> None:
        """HEAD (200 or 423, never 5xx), one PATCH (as the fault allows), HEAD again: the offset
        never goes backwards (tus_check_head books it)."""
        for k in range(2):
            r = await self.tus_call(up.scenario, "HEAD", up.url, privileged=True,
                                    headers=self.tus_headers(up.owner),
                                    expect=Expect(200, (423, None)))
            if r is not None and r.status == 200:
                self.tus_check_head(up, r, "HEAD during a fault")
            if k == 1:
                break
            end = min(len(up.data) - 1, up.confirmed + self.rng.randint(1, 16 * KiB))
            await self.tus_patch(up, up.confirmed, up.data[up.confirmed:end], patch_expect,
                                 privileged=True)

    async def tus_create_during_fault(self, scenario: str, expect: Expect) -> None:
        owner = self.rng.choice(SUBJECTS)
        r = await self.tus_call(scenario, "POST", TUS_PATH, privileged=True, expect=expect,
                                headers=self.tus_headers(owner, **{"Upload-Length": "1000"}))
        if r is not None and r.status == 201:
            self.spawn(self.tus_call(scenario, "DELETE", hdr(r, "Location") or TUS_PATH,
                                     headers=self.tus_headers(owner), expect=Expect(204)))

    # -- faults ---------------------------------------------------------------------------

    async def temp_files(self) -> dict[str, list[str]]:
        """Temp files (``*.tmp``) still in the data dir once every request is over, by what was
        going on when each was written (its mtime against the fault windows): a write refused
        by a full or read-only disk must leave none behind; a kill -9 may."""
        wall_minus_mono = time.time() - time.monotonic()

        def scan() -> list[tuple[str, float]]:
            out = []
            for p in self.data_dir.rglob("*.tmp"):
                with contextlib.suppress(OSError):
                    out.append((str(p.relative_to(self.data_dir)), p.stat().st_mtime))
            return out

        found: dict[str, list[str]] = {}
        for name, mtime in sorted(await asyncio.to_thread(scan)):
            t = mtime - wall_minus_mono
            kinds = sorted({iv.kind for iv in self.faults if iv.overlaps(t, t, 0.5)})
            label = ("during " + "+".join(kinds)) if kinds else "outside any fault"
            found.setdefault(label, []).append(f"{name} (t={t - self.t0:.1f} s)")
        return found

    def begin_fault(self, kind: str) -> Interval:
        iv = Interval(kind, self.now())
        self.faults.append(iv)
        return iv

    async def fault_disk_full(self) -> None:
        assert self.sandbox.mnt is not None
        s = "fault disk_full"
        filler = self.sandbox.mnt / "filler"
        spares = []
        for _ in range(2):
            up = Upload("alice", os.urandom(3 * MiB), "spare.wav", 64 * KiB, s)
            if await self.create(up, retry=False):
                spares.append(up)
        sac = Upload("bob", self.media["speech.ogg"], "sacrifice.ogg",
                     max(self.min_chunk, 4 * KiB), "fault disk_full: finalize on a full disk")
        sac_ready = await self.create(sac, retry=False) and await self.complete(sac)
        half = Upload("alice", self.media["speech.wav"], "half.wav", max(self.min_chunk, 4 * KiB),
                      "fault disk_full: chunks on a full disk")
        half.checksums = "some"  # markers with a digest need a block; empty ones do not
        half_ready = await self.create(half, retry=False)
        if half_ready:
            await self.send_all(half, list(range(half.total_chunks // 3)), 2)
        tprobe = await self.tus_probe("fault disk_full: tus PATCH on a full disk")
        sac_result: Resp | None = None
        async with self.gate.exclusive():
            iv = self.begin_fault("disk_full")
            try:
                written = await asyncio.to_thread(fill_disk, filler)
                self.report.faults["disk_full"] += 1
                self.report.notes.append(f"disk_full: filler wrote {written // MiB} MiB, free "
                                         f"{self.sandbox.free_bytes()} bytes left")
                full = Expect((507, "insufficient_storage"))
                await self.call(s, "POST", "/upload/chunked/session", headers=self.auth("bob"),
                                json_body={"filename": "c.wav", "total_size": 1000,
                                           "chunk_size": 1000, "total_chunks": 1},
                                expect=full, privileged=True)
                r = await self.call(s, "GET", "/healthz", expect=Expect((503, None)),
                                    privileged=True)
                if r is not None and isinstance(r.doc, dict) and \
                        r.doc.get("status") != "data_dir_full":
                    self.unexpected(s, "GET", "/healthz", r.status, r.body, "data_dir_full")
                if half_ready:  # chunks of a reserved session: 200 or a clear 507
                    for i in range(half.total_chunks // 3, half.total_chunks):
                        rr = await self.put(half, i, expect=Expect(200, (507,
                                                                         "insufficient_storage")),
                                            privileged=True)
                        if rr is not None and rr.status == 200:
                            half.acked.add(i)
                            self.report.chunks_acked += 1
                    st = await self.status(half)
                    if st is not None and st.status == 200:
                        self.reconcile(half, st.doc, "status on a full disk")
                if tprobe is not None:  # reserved at creation: 204, or a clear 507
                    await self.tus_during_fault(tprobe, Expect(204, (507,
                                                                     "insufficient_storage")))
                if self.tus_on:
                    await self.tus_create_during_fault(s, full)
                if sac_ready:
                    sac_result = await self.call(
                        sac.scenario, "POST", f"/upload/chunked/{sac.sid}/finalize",
                        headers=self.auth(sac.owner),
                        expect=Expect(200, (507, "insufficient_storage"),
                                      (409, "chunks_missing")), privileged=True)
                for k, spare in enumerate(spares):
                    before = self.sandbox.free_bytes()
                    r = await self.call(s, "DELETE", f"/upload/chunked/{spare.sid}/abort",
                                        headers=self.auth(spare.owner), expect=Expect(200),
                                        privileged=True)
                    if r is not None and r.status == 200 and \
                            self.sandbox.free_bytes() <= before:
                        self.report.finding("abort on a full disk freed no space")
                    if k == 0:  # full again, for what follows
                        await asyncio.to_thread(fill_disk, filler)
                await asyncio.sleep(min(1.5, max(0.2, self.deadline - self.now())))
            finally:
                await asyncio.to_thread(shutil.rmtree, filler, True)
                await asyncio.to_thread(os.sync)
                iv.end = self.now()
        await self.expect_healthy(s)
        if sac_ready:
            self.spawn(self.after_full_finalize(sac, sac_result))
        if half_ready:
            self.spawn(self.upload_through(half, parallel=2))
        if tprobe is not None:
            self.spawn(self.tus_complete(tprobe))

    async def after_full_finalize(self, up: Upload, first: Resp | None) -> None:
        """The session finalized on a full disk: once there is room, finalize must work."""
        t = self.now()
        self.report.uploads["started"] += 1
        doc = await self.finalize_until_done(up)
        waited = self.now() - t
        self.report.notes.append(
            "finalize on a full disk answered " + (str(first.status) if first else "nothing"))
        if first is not None and first.status == 507:
            self.report.notes.append(f"finalize on a full disk: 507; finalized {waited:.1f} s "
                                     "after the disk had room again")
            if doc is None or waited > 12:
                self.report.finding(
                    f"a finalize answered 507 on a full disk left session {up.sid} 'finalizing' "
                    f"for {waited:.0f} s after space was back (202 until the 60 s stale-claim "
                    "takeover)" + ("" if doc is not None else "; not finished within the run"))
        if doc is not None:
            self.report.uploads["completed"] += 1
            if await self.verify(up, doc):
                self.report.uploads["verified"] += 1

    async def fault_remount_ro(self) -> None:
        s = "fault remount_ro"
        probe = await self.small_session(s)
        if probe is not None:
            await self.send_all(probe, [0], 1)
        tprobe = await self.tus_probe("fault remount_ro: tus")
        async with self.gate.exclusive():
            self.paused = True
            limit = self.now() + 8
            while self.inflight and self.now() < limit:
                await asyncio.sleep(0.02)
            ok, err = False, ""
            iv = self.begin_fault("remount_ro")
            for _ in range(40):
                ok, err = await asyncio.to_thread(self.sandbox.remount, "ro")
                if ok:
                    break
                await asyncio.sleep(0.1)
            self.paused = False
            if not ok:
                iv.end = self.now()
                self.faults.remove(iv)
                self.report.faults_skipped["remount_ro"] = f"mount -o remount,ro failed: {err}"
                return
            self.report.faults["remount_ro"] += 1
            try:
                ro = Expect((503, "storage_unavailable"))
                r = await self.call(s, "GET", "/healthz", expect=Expect((503, None)),
                                    privileged=True)
                if r is not None and isinstance(r.doc, dict) and \
                        r.doc.get("status") != "data_dir_not_writable":
                    self.unexpected(s, "GET", "/healthz", r.status, r.body,
                                    "data_dir_not_writable")
                await self.call(s, "POST", "/upload/chunked/session", headers=self.auth("alice"),
                                json_body={"filename": "c.wav", "total_size": 1000,
                                           "chunk_size": 1000, "total_chunks": 1},
                                expect=ro, privileged=True)
                if probe is not None:
                    await self.status(probe)
                    i = probe.total_chunks - 1
                    await self.put(probe, i, expect=ro, privileged=True)
                    await self.call(s, "DELETE", f"/upload/chunked/{probe.sid}/abort",
                                    headers=self.auth(probe.owner), expect=ro, privileged=True)
                    await self.call(s, "POST", f"/upload/chunked/{probe.sid}/finalize",
                                    headers=self.auth(probe.owner),
                                    expect=Expect((503, "storage_unavailable"),
                                                  (409, "chunks_missing")), privileged=True)
                if tprobe is not None:
                    await self.tus_during_fault(tprobe, ro)
                if self.tus_on:
                    await self.tus_create_during_fault(s, ro)
                await asyncio.sleep(min(2.0, max(0.3, self.deadline - self.now())))
            finally:
                for _ in range(20):
                    ok, err = await asyncio.to_thread(self.sandbox.remount, "rw")
                    if ok:
                        break
                    await asyncio.sleep(0.2)
                iv.end = self.now()
                if not ok:
                    self.report.finding(f"could not remount the data dir rw: {err}")
        await self.expect_healthy(s)
        if probe is not None:
            self.spawn(self.upload_through(probe))
        if tprobe is not None:
            self.spawn(self.tus_complete(tprobe))

    async def fault_kill9(self) -> None:
        assert self.server is not None
        s = "fault kill9"
        # A tus PATCH streaming slowly when the server dies: after the restart its HEAD is at
        # least every offset answered before, at most what was sent.
        tprobe = await self.tus_probe("fault kill9: tus PATCH cut by kill -9")
        slow = None
        if tprobe is not None:
            o = tprobe.confirmed
            n = min(len(tprobe.data) - 1 - o, 64 * KiB)
            slow = asyncio.create_task(self.tus_patch(
                tprobe, o, paced_body(split(tprobe.data[o:o + n], 20), 0.2), PATCH_OK,
                sent=o + n, allow_no_answer=True))
            await asyncio.sleep(0.3)
        async with self.gate.exclusive():
            limit = self.now() + 3
            while self.inflight_chunks == 0 and self.now() < limit:
                await asyncio.sleep(0.01)
            in_flight = self.inflight_chunks
            iv = self.begin_fault("kill9")
            self.server_down = True
            try:
                await asyncio.to_thread(self.server.kill)
                self.epoch += 1
                self.report.faults["kill9"] += 1
                self.report.notes.append(f"kill -9 with {in_flight} chunk request(s) in flight")
                await asyncio.sleep(0.3)
                await self.start_server()
            finally:
                self.server_down = False
                iv.end = self.now()
        await self.expect_healthy(s)
        if slow is not None and tprobe is not None:
            await slow
            self.spawn(self.tus_complete(tprobe))

    async def expect_healthy(self, scenario: str) -> None:
        limit = self.now() + 5
        r = None
        while self.now() < limit:
            r = await self.call(scenario, "GET", "/healthz", expect=Expect(200, (503, None)),
                                privileged=True)
            if r is not None and r.status == 200:
                return
            await asyncio.sleep(0.2)
        self.unexpected(scenario, "GET", "/healthz", r.status if r else "no answer",
                        r.body if r else "", "200 within 5 s of the fault's end")

    async def fault_injector(self) -> None:
        d = self.args.duration
        plan = [(0.16, "disk_full"), (0.40, "remount_ro"), (0.64, "kill9")]
        if d >= 40:
            plan.append((0.84, "kill9"))
        for at, kind in plan:
            while self.now() < self.t0 + at * d:
                await asyncio.sleep(0.05)
            if self.now() > self.deadline - 1:
                self.report.faults_skipped.setdefault(kind, "no time left in the run")
                continue
            if kind in ("disk_full", "remount_ro") and not self.sandbox.disk_faults:
                self.report.faults_skipped[kind] = self.sandbox.reason
                continue
            await getattr(self, f"fault_{kind}")()

    # -- monitoring and orchestration -----------------------------------------------------

    async def monitor(self) -> None:
        assert self.server is not None
        while True:
            await asyncio.sleep(0.25)
            self.server.sample_hwm()
            if not self.server_down and not self.server.alive():
                code = self.server.proc.returncode if self.server.proc else None
                self.unexpected("monitor", "-", "-", f"exit {code}", "",
                                "the server keeps running", "chunkd exited by itself")
                self.server_down = True
                self.epoch += 1
                iv = self.begin_fault("kill9")  # so that the failed requests are not doubled
                try:
                    await self.start_server()
                finally:
                    self.server_down = False
                    iv.end = self.now()

    async def start_server(self) -> None:
        assert self.server is not None
        try:
            self.server.spawn(self.port)
            await asyncio.to_thread(self.server.wait_banner)
        except RuntimeError:  # e.g. the port was taken meanwhile: another free one
            self.port = await asyncio.to_thread(free_port)
            self.server.spawn(self.port)
            await asyncio.to_thread(self.server.wait_banner)

    def spawn(self, coro: Any) -> None:
        t = asyncio.create_task(coro)
        self.background.add(t)
        t.add_done_callback(self.background.discard)

    async def hostile_worker(self, n: int, names: list[str] | None = None) -> None:
        if names is None:
            names = ["auth", "index", "body_length", "checksum", "encodings", "expect",
                     "garbage", "routes", "create_bad", "not_media", "incomplete", "races",
                     "races", "dropped", "slow", "websocket", "idle"]
            if n == 0:
                names.insert(0, "idle")  # once early, whatever the duration
        while True:
            batch = names[:]
            self.rng.shuffle(batch)
            for name in batch:
                if not self.take_round():
                    return
                self.report.scenarios[name] += 1
                try:
                    await asyncio.wait_for(getattr(self, f"h_{name}")(),
                                           max(5.0, self.hard_deadline - self.now()))
                except TimeoutError:
                    self.report.finding(f"scenario {name} did not finish in time")

    async def run(self) -> None:
        self.data_dir = self.sandbox.setup()
        secret_file = self.sandbox.tmp / "jwt.secret"
        secret_file.write_text(self.secret + "\n")
        os.chmod(secret_file, 0o600)
        flags = await asyncio.to_thread(serve_flags)
        wanted = [("--host", "127.0.0.1"), ("--data-dir", str(self.data_dir)),
                  ("--jwt-secret-file", str(secret_file)), ("--min-free-space", "1MiB"),
                  ("--min-chunk-size", "1KiB"), ("--chunk-size", "64KiB"),
                  ("--rate-limit", "0"), ("--header-timeout", f"{HEADER_TIMEOUT:g}s"),
                  ("--body-timeout", f"{BODY_TIMEOUT:g}s"),
                  ("--max-sessions-per-subject", "500"), ("--max-file-size", MAX_FILE_SIZE),
                  ("--sweep-interval", "2s"), ("--max-connections", str(MAX_CONNECTIONS)),
                  ("--log-level", "info")]
        wanted.append(("--tus-path", TUS_PATH))
        args = [x for flag, value in wanted if flag in flags for x in (flag, value)]
        self.tus_on = "--tus-path" in flags
        if not self.tus_on:
            self.report.notes.append("chunkd serve has no --tus-path: the tus scenarios skipped")
        self.max_connections = MAX_CONNECTIONS if "--max-connections" in flags else 0
        if "--min-chunk-size" not in flags:
            self.report.notes.append("chunkd serve has no --min-chunk-size: its own minimum")
        self.server = Server(args)
        self.port = await asyncio.to_thread(free_port)
        await self.start_server()
        m = re.search(r"([0-9.]+) (B|KiB|MiB) min", "\n".join(self.server.banner))
        if m:
            self.min_chunk = int(float(m.group(1)) * {"B": 1, "KiB": KiB, "MiB": MiB}[m.group(2)])
        connector = aiohttp.TCPConnector(limit=100)
        async with aiohttp.ClientSession(connector=connector) as http:
            self.http = http
            self.t0 = self.now()
            self.deadline = self.t0 + self.args.duration
            self.hard_deadline = self.deadline + self.args.settle
            monitor = asyncio.create_task(self.monitor())
            r = await self.call("start", "GET", "/upload/chunked/limits", expect=Expect(200))
            if r is not None and isinstance(r.doc, dict) and \
                    isinstance(r.doc.get("max_chunk_size"), int):
                self.max_patch = r.doc["max_chunk_size"]
            workers = [asyncio.create_task(self.upload_worker(n))
                       for n in range(self.args.workers)]
            workers += [asyncio.create_task(self.hostile_worker(n))
                        for n in range(self.args.hostile_workers)]
            if self.tus_on:
                workers += [asyncio.create_task(self.tus_worker(n))
                            for n in range(self.args.tus_workers)]
                workers += [asyncio.create_task(self.hostile_worker(n, TUS_HOSTILE[:]))
                            for n in range(self.args.tus_hostile_workers)]
            workers.append(asyncio.create_task(self.fault_injector()))
            try:
                done, pending = await asyncio.wait(
                    workers, timeout=self.hard_deadline - self.now() + 30)
                for t in done:
                    if t.exception() is not None:
                        raise t.exception()  # type: ignore[misc]
                while self.background and self.now() < self.hard_deadline + 30:
                    await asyncio.sleep(0.1)
                for t in [*pending, *self.background]:
                    t.cancel()
                    self.report.finding("a battery task was still running at the hard deadline")
                await asyncio.gather(*pending, *self.background, return_exceptions=True)
                await self.expect_healthy("end")
                await asyncio.sleep(0.5)  # the server finishes what the last requests started
                self.temp_left = await self.temp_files()
                for label, names in self.temp_left.items():
                    self.report.finding(f"{len(names)} temp file(s) left in the data dir, written "
                                        f"{label}, e.g. {names[0]}")
                # Last, on its own (it may take the server down): more connections than
                # --max-connections, then the server must still answer.
                self.report.scenarios["flood"] += 1
                await self.h_flood()
                await self.expect_healthy("after the connection flood")
            finally:
                monitor.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await monitor

    def close(self) -> None:
        try:
            if self.server is not None and self.server.alive():
                code = self.server.terminate()
                if code != 0:
                    self.report.finding(f"chunkd did not exit cleanly on SIGTERM (exit {code})")
        finally:
            self.sandbox.cleanup()

    # -- output ---------------------------------------------------------------------------

    def result(self, elapsed: float) -> dict[str, Any]:
        rep = self.report
        hwm = self.server.hwm if self.server else []
        unhandled = sum("Unhandled exception" in line for line in
                        (self.server.errors if self.server else []))
        if unhandled:
            rep.finding(f"the server logged {unhandled} unhandled exception(s) with a traceback "
                        "(see server_log_errors)")
        ok = rep.status_500 == 0 and rep.chunks_lost == 0 and rep.unexpected_total == 0 and \
            rep.tus_bytes_lost == 0 and rep.tus_head_5xx == 0
        return {
            "ok": ok,
            "seed": self.args.seed,
            "duration_s": self.args.duration,
            "elapsed_s": round(elapsed, 1),
            "rounds": self.rounds,
            "disk": self.sandbox.reason,
            "requests_tried": rep.tried,
            "responses_by_status": {str(k): v for k, v in sorted(rep.by_status.items(),
                                                                 key=lambda kv: str(kv[0]))},
            "no_answer": dict(rep.no_answer),
            "status_500": rep.status_500,
            "undocumented_5xx": rep.bad_5xx,
            "unexpected_answers": rep.unexpected_total,
            "unexpected": rep.unexpected,
            "faults_injected": {k: rep.faults.get(k, 0) for k in ("disk_full", "remount_ro",
                                                                   "kill9")},
            "faults_skipped": rep.faults_skipped,
            "uploads": {k: rep.uploads.get(k, 0) for k in ("started", "completed", "verified",
                                                           "failed", "unfinished",
                                                           "not_created",
                                                           "resumed_after_restart")},
            "chunks_acked": rep.chunks_acked,
            "chunks_lost": rep.chunks_lost,
            "lost_detail": rep.lost_detail,
            "tus": {
                "enabled": self.tus_on,
                "uploads": {k: rep.tus.get(k, 0) for k in (
                    "started", "completed", "verified", "failed", "unfinished", "not_created",
                    "concat_started", "concat_verified", "concat_failed")},
                "bytes_acked": rep.tus_bytes_acked,
                "bytes_lost": rep.tus_bytes_lost,
                "head_5xx": rep.tus_head_5xx,
                "head_max_s": round(rep.tus_head_max_s, 2),
                "answers": dict(sorted(rep.tus_answers.items())),
                "events": {k: v for k, v in sorted(rep.tus.items())
                           if k not in ("started", "completed", "verified", "failed",
                                        "unfinished", "not_created", "concat_started",
                                        "concat_verified", "concat_failed")},
                "lost_detail": rep.tus_lost_detail,
            },
            "scenarios": dict(rep.scenarios),
            "peak_rss_kib": max(hwm, default=0),
            "rss_per_instance_kib": hwm,
            "server_instances": self.server.instances if self.server else 0,
            "server_log_errors": server_errors(self.server.errors if self.server else []),
            "temp_files_left": self.temp_left,
            "findings": rep.findings,
            "notes": rep.notes,
        }


#: The tus scenarios of the hostile worker(s) for tus (each once per shuffled round).
TUS_HOSTILE = ["tus_version", "tus_create_bad", "tus_patch_bad", "tus_checksum",
               "tus_concat_bad", "tus_delete", "tus_override", "tus_auth", "tus_routes",
               "tus_same_offset", "tus_same_offset", "tus_stale", "tus_dropped",
               "tus_delete_race", "tus_not_media"]


def health_state(status: int, doc: Any) -> str | None:
    """The documented unhealthy answer of /healthz (503 with a status, not an error), or None."""
    if status == 503 and isinstance(doc, dict) and "error" not in doc and "version" in doc and \
            doc.get("status") in ("data_dir_full", "data_dir_not_writable"):
        return str(doc["status"])
    return None


async def read_http_response(reader: asyncio.StreamReader) -> tuple[int, str, bytes]:
    """One HTTP/1.x answer off a stream: (status, Content-Type, body); interim 1xx skipped."""
    while True:
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/"):
            raise ValueError(f"not an HTTP answer: {lines[0][:80]!r}")
        status = int(parts[1])
        headers = {}
        for line in lines[1:]:
            if ":" in line:
                k, v = line.split(":", 1)
                headers[k.strip().lower()] = v.strip()
        if 100 <= status < 200 and status != 101:
            continue
        if "content-length" in headers:
            body = await reader.readexactly(int(headers["content-length"]))
        elif "chunked" in headers.get("transfer-encoding", "").lower():
            body = b""
            while True:
                size = int((await reader.readuntil(b"\r\n")).split(b";")[0].strip(), 16)
                if size == 0:
                    await reader.readuntil(b"\r\n")
                    break
                body += await reader.readexactly(size)
                await reader.readexactly(2)
        else:
            body = await reader.read(1 << 20)
        return status, headers.get("content-type", ""), body


async def gen_chunks(parts: list[bytes]) -> AsyncIterator[bytes]:
    for p in parts:
        yield p


def split(data: bytes, n: int) -> list[bytes]:
    step = max(1, math.ceil(len(data) / n))
    return [data[k:k + step] for k in range(0, len(data), step)]


def server_errors(lines: list[str]) -> list[str]:
    """The server's error lines, the expected ones (read-only disk) summed up, tracebacks
    whole."""
    out: list[str] = []
    expected = Counter()
    for line in lines:
        m = re.search(r"ERROR chunkd: (\S+) \S+: the data dir cannot be written", line)
        if m:
            expected[m.group(1)] += 1
            continue
        if len(out) < 200:
            out.append(line)
    if expected:
        out.insert(0, "storage_unavailable logged (read-only data dir): " +
                   ", ".join(f"{k} x{v}" for k, v in expected.items()))
    return out


def table(res: dict[str, Any]) -> str:
    rows = [
        ("result", "PASS" if res["ok"] else "FAIL"),
        ("seed / duration / elapsed", f"{res['seed']} / {res['duration_s']} s / "
                                      f"{res['elapsed_s']} s"),
        ("disk", res["disk"]),
        ("requests tried", res["requests_tried"]),
        ("responses by status", ", ".join(f"{k}: {v}" for k, v in
                                          res["responses_by_status"].items())),
        ("no answer (by kind)", ", ".join(f"{k}: {v}" for k, v in res["no_answer"].items())
         or "-"),
        ("500s seen", res["status_500"]),
        ("undocumented 5xx", res["undocumented_5xx"]),
        ("unexpected answers", res["unexpected_answers"]),
        ("faults injected", ", ".join(f"{k}: {v}" for k, v in res["faults_injected"].items())),
        ("faults skipped", ", ".join(f"{k}: {v}" for k, v in res["faults_skipped"].items())
         or "-"),
        ("uploads", ", ".join(f"{k}: {v}" for k, v in res["uploads"].items())),
        ("chunks acknowledged", res["chunks_acked"]),
        ("chunks lost", res["chunks_lost"]),
        ("tus uploads", ", ".join(f"{k}: {v}" for k, v in res["tus"]["uploads"].items())
         if res["tus"]["enabled"] else "off (no --tus-path)"),
        ("tus bytes acknowledged", res["tus"]["bytes_acked"]),
        ("tus bytes lost", res["tus"]["bytes_lost"]),
        ("tus HEAD 5xx / slowest HEAD", f"{res['tus']['head_5xx']} / "
                                        f"{res['tus']['head_max_s']} s"),
        ("peak server RSS (VmHWM)", f"{res['peak_rss_kib'] / 1024:.1f} MiB "
                                    f"(per instance: {', '.join(str(round(k / 1024, 1)) for k in res['rss_per_instance_kib'])})"),
        ("server instances", res["server_instances"]),
        ("scenarios run", ", ".join(f"{k}: {v}" for k, v in sorted(res["scenarios"].items()))),
    ]
    width = max(len(r[0]) for r in rows)
    out = [f"{name.ljust(width)}  {value}" for name, value in rows]
    for title, items in (("findings", res["findings"]), ("notes", res["notes"])):
        if items:
            out.append(f"{title}:")
            out += [f"  - {x}" for x in items]
    if res["unexpected"]:
        out.append("unexpected answers (first 25):")
        for u in res["unexpected"][:25]:
            out.append(f"  - t={u['t']}s [{u['scenario']}] {u['method']} {u['path']} -> "
                       f"{u['status']} (expected {u['expected']}) {u['note']} {u['body'][:160]}")
    if res["lost_detail"]:
        out.append("chunks lost:")
        out += [f"  - {json.dumps(x)}" for x in res["lost_detail"][:20]]
    if res["tus"]["lost_detail"]:
        out.append("tus bytes lost:")
        out += [f"  - {json.dumps(x)}" for x in res["tus"]["lost_detail"][:20]]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, default=60.0, help="seconds of load (default 60)")
    p.add_argument("--rounds", type=int, default=100_000,
                   help="most scenarios (uploads and hostile runs) started (default 100000)")
    p.add_argument("--settle", type=float, default=20.0,
                   help="seconds after --duration for started uploads to finish (default 20)")
    p.add_argument("--workers", type=int, default=4, help="concurrent normal uploads (4)")
    p.add_argument("--hostile-workers", type=int, default=2, help="concurrent hostile runs (2)")
    p.add_argument("--tus-workers", type=int, default=2,
                   help="concurrent normal tus uploads and concatenations (2)")
    p.add_argument("--tus-hostile-workers", type=int, default=1,
                   help="concurrent hostile tus runs (1)")
    p.add_argument("--disk-mib", type=int, default=64, help="size of the ext4 image (64)")
    p.add_argument("--no-disk-faults", action="store_true",
                   help="a plain temp dir, no full disk or read-only remount (what a run that "
                   "is not root does)")
    p.add_argument("--seed", type=int, default=None, help="random seed (default: random)")
    p.add_argument("--json", action="store_true", help="JSON report on stdout")
    args = p.parse_args(argv)
    if args.seed is None:
        args.seed = secrets.randbelow(1 << 31)
    if args.duration <= 0 or args.rounds <= 0:
        p.error("--duration and --rounds must be positive")
    battery = Battery(args)
    started = time.monotonic()

    def on_signal(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_signal)
    error = None
    try:
        asyncio.run(battery.run())
    except KeyboardInterrupt as exc:
        error = f"interrupted: {exc}"
    except Exception as exc:  # report it, clean up, fail
        error = f"battery error: {type(exc).__name__}: {exc}"
    finally:
        battery.close()
    res = battery.result(time.monotonic() - started)
    if error:
        res["ok"] = False
        res["error"] = error
        res["server_log_tail"] = list(battery.server.tail)[-40:] if battery.server else []
    text = table(res) + (f"\nerror: {error}" if error else "")
    if args.json:
        print(text, file=sys.stderr)
        print(json.dumps(res, indent=2))
    else:
        print(text)
    return 0 if res["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
