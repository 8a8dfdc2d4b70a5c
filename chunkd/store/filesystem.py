"""The file-system session store: the one module that knows chunkd's on-disk layout.

    <data_dir>/
      sessions/
        <session_id>/
          metadata.json     what was fixed at creation (temp file, fsync, rename; never rewritten)
          data              the file itself, reserved up front; chunk i lives at i * chunk_size
          chunks/<i>        one marker per counted chunk (holds the chunk's sha256 when known);
                            created by rename after the chunk's bytes were written and flushed
          end.claim         the session's one-time end: finalize, abort or expire; created with
                            link(2), which fails if it exists, so exactly one caller wins
          task.json         the task's state after finalize (stage, progress, result or error),
                            written only by the process holding the lease
          result.json       a finished task's result (e.g. the transcript's segments)
          failed.json       why finalize refused the file (its bytes are then removed)
          lease.<n>         who drives the task: generation n, created O_EXCL, renewed by mtime;
                            a stale lease (owner dead or silent) is taken by creating lease.<n+1>
          <name>.once       one-time claims of a hand-off (e.g. submit.once: never submit twice)
        .new-<id>/          a session being created; renamed into place when complete
      tasks/<task_id>       the session id a task belongs to (so /ws/tasks/<task_id> finds it)
      gone/<session_id>     tombstone of a removed session (answers 410 instead of 404)
      trash/                sessions being deleted: renamed here first, so removal is atomic

Nothing here is a read-modify-write of shared state: received chunks are the markers present,
the end of a session is whichever claim got linked first. That is what makes several chunkd
processes on one folder safe, and a restart (kill -9 included) lose nothing that was counted.
The session's filename is metadata only; no path is ever built from it.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import fcntl
import hashlib
import os
import re
import shutil
import socket
import struct
import time
import uuid
import logging
from collections.abc import AsyncIterable, AsyncIterator
from pathlib import Path
from typing import Any

import aiofiles.os
import orjson

from chunkd.atomic import read_json, write_json_atomic
from chunkd.errors import (
    BadRequest,
    ChecksumMismatch,
    Conflict,
    Gone,
    InsufficientStorage,
    NotFound,
    RequestTimeout,
    TooLarge,
)
from chunkd.store.base import ChunkReceipt, Claim, SessionMeta, SessionState

log = logging.getLogger("chunkd.store")

#: Bytes gathered from the network before one write to disk (one thread hop per buffer).
WRITE_BUFFER = 512 * 1024
#: A finalize claim with no outcome after this long is taken to be from a dead process.
STALE_CLAIM_SECONDS = 60.0
#: A session whose data file was written this recently is never swept.
BUSY_GRACE_SECONDS = 300.0
#: A task lease not renewed for this long belongs to a dead process.
LEASE_STALE_SECONDS = 30.0
#: Half-created sessions (``.new-*``) older than this are debris from a crash.
STAGING_DEBRIS_SECONDS = 3600.0

_SESSION_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def is_session_id(text: str) -> bool:
    return _SESSION_ID.fullmatch(text) is not None


class LeaseLost(Exception):
    """This process no longer drives the task: another one took it over."""


def _lease_generations(folder: Path) -> list[int]:
    return [int(n[6:]) for n in os.listdir(folder) if n.startswith("lease.") and n[6:].isdigit()]


def _holds(lease: Path) -> bool:
    """Is ``lease`` still the newest generation, and not released?"""
    try:
        if max(_lease_generations(lease.parent), default=0) != int(lease.name[6:]):
            return False
        return not orjson.loads(lease.read_bytes() or b"{}").get("released")
    except (FileNotFoundError, orjson.JSONDecodeError):
        return False


def _pwrite_all(
    fd: int, pieces: list[bytes], offset: int, hasher: Any, start_writeback: bool
) -> None:
    """One thread hop per batch: hash it (when asked), write it at ``offset`` with one
    ``pwritev`` (the network's pieces go to the kernel as they are, never joined), and in durable
    mode start its writeback now, so the fdatasync at the chunk's end has little left to do."""
    if hasher is not None:
        for piece in pieces:
            hasher.update(piece)
    start = offset
    views = [memoryview(p) for p in pieces]
    while views:
        n = os.pwritev(fd, views[:_IOV_MAX], offset)
        offset += n
        while views and n >= len(views[0]):  # drop what was written, keep the rest
            n -= len(views[0])
            views.pop(0)
        if n:
            views[0] = views[0][n:]
    if start_writeback:
        _sync_file_range(fd, start, offset - start)


_IOV_MAX = 1024


def _load_sync_file_range() -> Any:
    """Linux's sync_file_range(2) (not in ``os``): start writeback of a range without waiting."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.sync_file_range
    except (OSError, AttributeError):
        return lambda fd, offset, length: None
    fn.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    write = 2  # SYNC_FILE_RANGE_WRITE

    def call(fd: int, offset: int, length: int) -> None:
        fn(fd, offset, length, write)  # a hint: errors only mean no early writeback

    return call


_sync_file_range = _load_sync_file_range()


_pwrite_async = aiofiles.os.wrap(_pwrite_all)
_open_async = aiofiles.os.wrap(os.open)
_close_async = aiofiles.os.wrap(os.close)
_fdatasync_async = aiofiles.os.wrap(os.fdatasync)


class FileSystemStore:
    """A :class:`~chunkd.store.base.SessionStore` on a local (or shared POSIX) file system."""

    def __init__(self, root: Path, *, durable: bool = True) -> None:
        self.root = root.resolve()
        self.durable = durable
        self.sessions_dir = self.root / "sessions"
        self.gone_dir = self.root / "gone"
        self.tasks_dir = self.root / "tasks"
        self.trash_dir = self.root / "trash"
        self._meta_cache: dict[str, SessionMeta] = {}
        #: session id -> chunk writes in flight in this process (the sweeper leaves these alone).
        self.inflight: dict[str, int] = {}
        for d in (self.sessions_dir, self.gone_dir, self.tasks_dir, self.trash_dir):
            d.mkdir(parents=True, exist_ok=True)

    # -- paths (the layout above, nowhere else) --------------------------------------------

    def _dir(self, sid: str) -> Path:
        return self.sessions_dir / sid

    def data_path(self, session_id: str) -> Path:
        return self._dir(session_id) / "data"

    def _marker(self, sid: str, index: int) -> Path:
        return self._dir(sid) / "chunks" / str(index)

    # -- create ----------------------------------------------------------------------------

    async def create(self, *, ttl: float, **fields: Any) -> SessionMeta:
        now = time.time()
        meta = SessionMeta(
            session_id=str(uuid.uuid4()), created_at=now, expires_at=now + ttl, **fields
        )
        await asyncio.to_thread(self._create_sync, meta)
        self._meta_cache[meta.session_id] = meta
        return meta

    def _create_sync(self, meta: SessionMeta) -> None:
        staging = self.sessions_dir / f".new-{meta.session_id}"
        try:
            staging.mkdir()
            (staging / "chunks").mkdir()
            free = shutil.disk_usage(self.root).free
            if meta.total_size > free:
                raise InsufficientStorage(
                    f"not enough disk space for {meta.total_size} bytes ({free} free)",
                    code="insufficient_storage", free_bytes=free,
                )
            fd = os.open(staging / "data", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                # Reserve every byte now, so a session that cannot fit fails here with 507
                # instead of in the middle of its upload.
                os.posix_fallocate(fd, 0, meta.total_size)
            except OSError as exc:
                if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                    raise InsufficientStorage(
                        f"cannot reserve {meta.total_size} bytes: {os.strerror(exc.errno)}",
                        code="insufficient_storage",
                    ) from None
                raise
            finally:
                os.close(fd)
            write_json_atomic(staging / "metadata.json", meta.to_json())
            os.rename(staging, self._dir(meta.session_id))
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise

    # -- read ------------------------------------------------------------------------------

    async def get(self, session_id: str) -> SessionMeta:
        meta = await asyncio.to_thread(self._get_sync, session_id)
        return meta

    def _get_sync(self, sid: str, now: float | None = None) -> SessionMeta:
        if not is_session_id(sid):
            raise NotFound("no upload session with this id", code="session_not_found")
        meta = self._meta_cache.get(sid)
        if meta is None or not self._dir(sid).is_dir():
            doc = read_json(self._dir(sid) / "metadata.json")
            if doc is None:
                self._meta_cache.pop(sid, None)
                self._raise_missing(sid)
            meta = SessionMeta.from_json(doc)
            self._meta_cache[sid] = meta
        claim = self._read_claim(sid)
        if claim is not None and claim.kind != "finalize":
            self._raise_gone(sid, claim.kind)
        if claim is None and (now or time.time()) > meta.expires_at:
            # A finalized session lives on until its task is over and the sweeper takes it.
            self._raise_gone(sid, "expire")
        return meta

    def _raise_missing(self, sid: str) -> None:
        tomb = read_json(self.gone_dir / sid)
        if tomb is not None:
            self._raise_gone(sid, tomb.get("reason", "abort"))
        raise NotFound("no upload session with this id", code="session_not_found")

    @staticmethod
    def _raise_gone(sid: str, reason: str) -> None:
        if reason == "expire":
            raise Gone("this upload session has expired", code="session_expired")
        raise Gone("this upload session was aborted", code="session_aborted")

    def _read_claim(self, sid: str) -> Claim | None:
        doc = read_json(self._dir(sid) / "end.claim")
        if doc is None:
            return None
        return Claim(doc["kind"], doc.get("task_id"), doc["claimed_at"], won=False)

    def _received(self, sid: str) -> frozenset[int]:
        try:
            names = os.listdir(self._dir(sid) / "chunks")
        except FileNotFoundError:
            self._raise_missing(sid)
        return frozenset(int(n) for n in names if n.isdigit())

    async def resolve(self, any_id: str) -> str:
        """The session id for a session id or a task id (unknown ids are returned as they are)."""
        if not is_session_id(any_id):
            raise NotFound("no upload session or task with this id", code="session_not_found")
        try:
            sid = (await asyncio.to_thread((self.tasks_dir / any_id).read_text)).strip()
        except FileNotFoundError:
            return any_id
        return sid if is_session_id(sid) else any_id

    async def state(self, session_id: str) -> SessionState:
        return await asyncio.to_thread(self._state_sync, session_id)

    def _state_sync(self, sid: str) -> SessionState:
        meta = self._get_sync(sid)
        d = self._dir(sid)
        return SessionState(
            meta=meta,
            received=self._received(sid),
            claim=self._read_claim(sid),
            task=read_json(d / "task.json"),
            failure=read_json(d / "failed.json"),
        )

    # -- chunks ----------------------------------------------------------------------------

    async def put_chunk(
        self,
        meta: SessionMeta,
        index: int,
        body: AsyncIterable[bytes],
        *,
        sha256: str | None = None,
        idle_timeout: float | None = None,
    ) -> ChunkReceipt:
        sid = meta.session_id
        expected = meta.chunk_length(index)
        offset = meta.chunk_offset(index)
        marker = self._marker(sid, index)
        if idle_timeout is not None:
            body = _with_idle_timeout(body, idle_timeout)
        try:
            fd = await _open_async(self.data_path(sid), os.O_WRONLY)
        except FileNotFoundError:
            await asyncio.to_thread(self._check_open_for_chunks, sid)  # handed off: 409
            self._raise_missing(sid)
        self.inflight[sid] = self.inflight.get(sid, 0) + 1
        try:
            # One writer per chunk, in any process: an OFD lock on the chunk's byte range. Every
            # check below happens under it, so a chunk counted by someone else is never written
            # again, and no write can land after finalize (which needs every chunk counted).
            await _lock_range(fd, offset, expected, index)
            stored = await asyncio.to_thread(self._already_counted, sid, marker)
            if stored is not None:
                if sha256 is not None and stored and stored != sha256:
                    raise Conflict(
                        f"chunk {index} was already received with other content",
                        code="chunk_conflict", stored_sha256=stored,
                    )
                await _drain(body, expected)
                received = await asyncio.to_thread(self._received, sid)
                return ChunkReceipt(index, len(received), already_received=True)
            digest = await self._write_range(fd, offset, expected, body, sha256)
            if sha256 is not None and digest != sha256:
                raise ChecksumMismatch(
                    f"chunk {index} does not match its X-Chunk-Checksum; send it again",
                    expected=sha256, actual=digest,
                )
            received = await asyncio.to_thread(self._count_chunk, sid, index, digest)
        finally:
            left = self.inflight[sid] - 1
            if left:
                self.inflight[sid] = left
            else:
                del self.inflight[sid]
            await _close_async(fd)  # also releases the range lock
        return ChunkReceipt(index, len(received), already_received=False)

    def _already_counted(self, sid: str, marker: Path) -> str | None:
        """Is the session still open (else raise), and is this chunk counted (its digest)?"""
        self._check_open_for_chunks(sid)
        try:
            return marker.read_text()
        except FileNotFoundError:
            return None

    def _check_open_for_chunks(self, sid: str) -> None:
        claim = self._read_claim(sid)
        if claim is None:
            return
        if claim.kind == "finalize":
            raise Conflict(
                "this upload session is already finalized; it takes no more chunks",
                code="session_finalized", task_id=claim.task_id,
            )
        self._raise_gone(sid, claim.kind)

    async def _write_range(
        self, fd: int, offset: int, length: int, body: AsyncIterable[bytes], sha256: str | None
    ) -> str | None:
        """Stream exactly ``length`` bytes of ``body`` to the data file at ``offset``.

        Network reads fill one buffer while the previous one is written in a thread, so disk and
        network overlap and at most two buffers per request are in memory. Returns the body's
        sha256 when ``sha256`` was given. The range is tus-ready: any offset, any length.
        """
        hasher = hashlib.sha256() if sha256 is not None else None
        pending: asyncio.Future[None] | None = None
        try:
            batch: list[bytes] = []
            batched = 0
            total = 0
            pos = offset
            async for data in body:
                total += len(data)
                if total > length:
                    raise _too_long(length)
                batch.append(data)  # pieces are kept as they came: no copy in Python
                batched += len(data)
                if batched < WRITE_BUFFER:
                    continue
                if pending is not None:
                    await pending
                pending = asyncio.ensure_future(
                    _pwrite_async(fd, batch, pos, hasher, self.durable)
                )
                pos += batched
                batch, batched = [], 0
            if total < length:
                raise _too_short(total, length)
            if pending is not None:
                await pending
                pending = None
            if batch:
                await _pwrite_async(fd, batch, pos, hasher, False)
            if self.durable:
                await _fdatasync_async(fd)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise InsufficientStorage("the disk is full", code="insufficient_storage") from None
            raise
        finally:
            if pending is not None:
                # A thread cannot be cancelled: let its write finish before the file is closed.
                with contextlib.suppress(BaseException):
                    await asyncio.shield(pending)
        return hasher.hexdigest() if hasher is not None else None

    def _count_chunk(self, sid: str, index: int, digest: str | None) -> frozenset[int]:
        """Make the chunk count: create its marker by rename (atomic), then re-read the set."""
        self._check_open_for_chunks(sid)
        marker = self._marker(sid, index)
        tmp = marker.with_name(f".{index}.{uuid.uuid4().hex}.tmp")
        try:
            with open(tmp, "x") as f:
                f.write(digest or "")
        except FileNotFoundError:
            self._raise_missing(sid)  # removed while the body was streaming
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise InsufficientStorage("the disk is full", code="insufficient_storage") from None
            raise
        os.replace(tmp, marker)
        return self._received(sid)

    # -- the one-time end ------------------------------------------------------------------

    async def claim_end(self, session_id: str, kind: str) -> Claim:
        return await asyncio.to_thread(self._claim_sync, session_id, kind)

    def _claim_sync(self, sid: str, kind: str) -> Claim:
        doc = {
            "kind": kind,
            "task_id": str(uuid.uuid4()) if kind == "finalize" else None,
            "claimed_at": time.time(),
            "pid": os.getpid(),
            "host": socket.gethostname(),
        }
        d = self._dir(sid)
        tmp = d / f".end.{uuid.uuid4().hex}.tmp"
        try:
            write_json_atomic(tmp, doc)
        except FileNotFoundError:
            self._raise_missing(sid)
        index = self.tasks_dir / doc["task_id"] if doc["task_id"] else None
        if index is not None:  # before the claim, so a task id is always resolvable
            index.write_text(sid)
        try:
            os.link(tmp, d / "end.claim")  # fails with EEXIST when someone else won
            won = True
        except FileExistsError:
            won = False
            if index is not None:
                index.unlink()
        finally:
            os.unlink(tmp)
        if won:
            return Claim(kind, doc["task_id"], doc["claimed_at"], won=True)
        claim = self._read_claim(sid)
        assert claim is not None
        return claim

    def stale(self, claim: Claim, now: float | None = None) -> bool:
        return (now or time.time()) - claim.claimed_at > STALE_CLAIM_SECONDS

    async def record_task(
        self, session_id: str, task: dict[str, Any], *, lease: Path | None = None
    ) -> None:
        """Replace the task's state; with ``lease``, only while that lease is still current
        (raises :class:`LeaseLost` otherwise, so a process that was taken over stops writing)."""
        def run() -> None:
            if lease is not None and not _holds(lease):
                raise LeaseLost(str(lease))
            write_json_atomic(self._dir(session_id) / "task.json", task)

        await asyncio.to_thread(run)

    async def record_failure(self, session_id: str, error: dict[str, Any]) -> None:
        def run() -> None:
            write_json_atomic(self._dir(session_id) / "failed.json", error)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.data_path(session_id))

        await asyncio.to_thread(run)

    async def read_result(self, session_id: str) -> Any:
        return await asyncio.to_thread(read_json, self._dir(session_id) / "result.json")

    async def record_result(self, session_id: str, result: Any) -> None:
        await asyncio.to_thread(write_json_atomic, self._dir(session_id) / "result.json", result)

    # -- tasks: one-time claims and leases -------------------------------------------------

    async def claim_once(self, session_id: str, name: str) -> bool:
        """Create ``<name>.once`` if nobody did before; True for the one caller that did."""
        def run() -> bool:
            try:
                fd = os.open(self._dir(session_id) / f"{name}.once", os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                return False
            os.close(fd)
            return True

        return await asyncio.to_thread(run)

    async def release_once(self, session_id: str, name: str) -> None:
        """Keep an old one-time claim as history and free the name (``chunkd retry``)."""
        def run() -> None:
            src = self._dir(session_id) / f"{name}.once"
            with contextlib.suppress(FileNotFoundError):
                os.rename(src, src.with_name(f"{name}.once.{time.time_ns()}"))

        await asyncio.to_thread(run)

    async def take_lease(self, session_id: str) -> Path | None:
        """Become the one process driving this session's task, unless a live owner exists."""
        return await asyncio.to_thread(self._take_lease_sync, session_id)

    def _take_lease_sync(self, sid: str) -> Path | None:
        d = self._dir(sid)
        gens = _lease_generations(d)
        nxt = 1
        if gens:
            current = d / f"lease.{max(gens)}"
            if not self._lease_stale(current):
                return None
            nxt = max(gens) + 1
        lease = d / f"lease.{nxt}"
        try:
            fd = os.open(lease, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return None  # another process took over first
        try:
            os.write(fd, orjson.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
        finally:
            os.close(fd)
        return lease

    @staticmethod
    def _lease_stale(lease: Path) -> bool:
        try:
            age = time.time() - lease.stat().st_mtime
            owner = orjson.loads(lease.read_bytes() or b"{}")
        except (FileNotFoundError, orjson.JSONDecodeError):
            return True
        if age > LEASE_STALE_SECONDS or owner.get("released"):
            return True
        if owner.get("host") == socket.gethostname() and owner.get("pid") != os.getpid():
            try:
                os.kill(owner["pid"], 0)
            except ProcessLookupError:
                return True  # its owner on this machine is dead (kill -9): no need to wait
            except (PermissionError, KeyError, TypeError):
                pass
        return False

    async def renew_lease(self, lease: Path) -> bool:
        """Touch the lease; False if it was lost (another process took over)."""
        def run() -> bool:
            if not _holds(lease):
                return False
            os.utime(lease)
            return True

        return await asyncio.to_thread(run)

    async def release_lease(self, lease: Path) -> None:
        """The task is over: mark the lease released, so a retried task is taken at once. (It is
        not deleted: generations only grow, so an old owner can never think it holds it again.)"""
        def run() -> None:
            with contextlib.suppress(FileNotFoundError):
                write_json_atomic(lease, {"pid": os.getpid(), "host": socket.gethostname(),
                                          "released": True}, durable=False)  # losing it is harmless

        await asyncio.to_thread(run)

    async def stuck_finalizing(self) -> list[str]:
        """Sessions whose finalize claim is stale with no outcome: its process died mid-way."""
        def stuck(sid: str) -> bool:
            claim = self._read_claim(sid)
            d = self._dir(sid)
            return (claim is not None and claim.kind == "finalize" and self.stale(claim)
                    and not (d / "task.json").exists() and not (d / "failed.json").exists())

        return await asyncio.to_thread(self._sessions_where, stuck)

    async def open_tasks(self) -> list[str]:
        """Sessions whose task has not reached a final stage (for resuming after a restart)."""
        def unfinished(sid: str) -> bool:
            task = read_json(self._dir(sid) / "task.json")
            return task is not None and task.get("stage") not in ("complete", "failed")

        return await asyncio.to_thread(self._sessions_where, unfinished)

    def _sessions_where(self, test: Any) -> list[str]:
        """Ids of the sessions passing ``test``; one unreadable session is skipped, not fatal."""
        out = []
        for entry in os.scandir(self.sessions_dir):
            if not is_session_id(entry.name):
                continue
            try:
                if test(entry.name):
                    out.append(entry.name)
            except (ValueError, KeyError, OSError) as exc:
                log.warning("skipping session %s: %r", entry.name, exc)
        return out

    # -- removal ---------------------------------------------------------------------------

    async def remove(self, session_id: str, reason: str) -> None:
        await asyncio.to_thread(self._remove_sync, session_id, reason)

    def _remove_sync(self, sid: str, reason: str) -> None:
        """Tombstone first, then one rename out of ``sessions/``, then delete at leisure."""
        write_json_atomic(self.gone_dir / sid, {"reason": reason, "at": time.time()})
        target = self.trash_dir / f"{sid}.{uuid.uuid4().hex}"
        try:
            os.rename(self._dir(sid), target)
        except FileNotFoundError:
            return
        self._meta_cache.pop(sid, None)
        shutil.rmtree(target, ignore_errors=True)

    async def sweep(self, now: float, busy: set[str]) -> list[str]:
        return await asyncio.to_thread(self._sweep_sync, now, busy)

    def _sweep_sync(self, now: float, busy: set[str]) -> list[str]:
        removed = []
        for entry in os.scandir(self.sessions_dir):
            name = entry.name
            if name.startswith(".new-"):
                if now - entry.stat().st_mtime > STAGING_DEBRIS_SECONDS:
                    shutil.rmtree(entry.path, ignore_errors=True)
                continue
            if not is_session_id(name) or name in busy:
                continue
            try:
                if self._sweep_one(name, now):
                    removed.append(name)
            except (ValueError, KeyError, OSError) as exc:  # one bad session must not stop the rest
                log.warning("sweep: skipping session %s: %r", name, exc)
        for entry in os.scandir(self.trash_dir):
            shutil.rmtree(entry.path, ignore_errors=True)
        ttl_floor = now - 7 * 86400
        for folder in (self.gone_dir, self.tasks_dir):
            for entry in os.scandir(folder):
                if entry.stat().st_mtime < ttl_floor:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(entry.path)
        return removed

    def _sweep_one(self, sid: str, now: float) -> bool:
        doc = read_json(self._dir(sid) / "metadata.json")
        if doc is None:
            return False
        claim = self._read_claim(sid)
        if claim is not None and claim.kind in ("abort", "expire"):
            self._remove_sync(sid, claim.kind)  # a removal that a crash interrupted
            return True
        if now <= doc["expires_at"]:
            return False
        try:
            if now - os.stat(self.data_path(sid)).st_mtime < BUSY_GRACE_SECONDS:
                return False  # bytes arrived recently, maybe from another process
        except FileNotFoundError:
            pass  # handed off or failed: nothing is being written
        if claim is None:
            claim = self._claim_sync(sid, "expire")
            if not claim.won and claim.kind == "finalize":
                return False
        elif claim.kind == "finalize":
            task = read_json(self._dir(sid) / "task.json")
            if task is not None and task.get("stage") not in ("complete", "failed"):
                return False  # its task is still running
            finished = task is not None or (self._dir(sid) / "failed.json").exists()
            if not finished:
                return False  # being finalized (or waiting for the task runner to finish it)
        self._remove_sync(sid, "expire")
        return True


#: How long a chunk waits for another upload of the same chunk to finish before answering 409.
CHUNK_LOCK_WAIT_SECONDS = 30.0


async def _lock_range(fd: int, offset: int, length: int, index: int) -> None:
    """Take an exclusive OFD lock on [offset, offset+length), polling up to a bound."""
    request = struct.pack("hhqqi", fcntl.F_WRLCK, os.SEEK_SET, offset, length, 0)
    deadline = time.monotonic() + CHUNK_LOCK_WAIT_SECONDS
    while True:
        try:
            fcntl.fcntl(fd, _F_OFD_SETLK, request)  # non-blocking, no thread needed
            return
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                raise
        if time.monotonic() > deadline:
            raise Conflict(
                f"chunk {index} is being uploaded by another request; try again later",
                code="chunk_busy",
            )
        await asyncio.sleep(0.02)


_F_OFD_SETLK = getattr(fcntl, "F_OFD_SETLK", 37)  # Linux open-file-description locks


async def _with_idle_timeout(body: AsyncIterable[bytes], seconds: float) -> AsyncIterator[bytes]:
    """The body, but a client that sends nothing for ``seconds`` gets 408 (slow-loris guard)."""
    it = aiter(body)
    while True:
        try:
            data = await asyncio.wait_for(anext(it), seconds)
        except StopAsyncIteration:
            return
        except asyncio.TimeoutError:
            raise RequestTimeout(
                f"no chunk data arrived for {seconds:g} s", code="body_timeout"
            ) from None
        yield data


def _too_long(length: int) -> TooLarge:
    return TooLarge(
        f"chunk body is longer than the expected {length} bytes",
        code="chunk_too_long", expected_bytes=length,
    )


def _too_short(total: int, length: int) -> BadRequest:
    return BadRequest(
        f"chunk body ended after {total} of {length} bytes",
        code="chunk_incomplete", expected_bytes=length, received_bytes=total,
    )


async def _drain(body: AsyncIterable[bytes], length: int) -> None:
    """Read and drop a body (for a chunk that was already counted), still checking its length."""
    total = 0
    async for data in body:
        total += len(data)
        if total > length:
            raise _too_long(length)
    if total < length:
        raise _too_short(total, length)
