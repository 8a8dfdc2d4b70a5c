"""The file-system session store: :class:`FileSystemStore` composes the layout
(:mod:`.layout`, which draws the tree), the range writer (:mod:`.ranges`) and the leases
(:mod:`.leases`) into a :class:`~chunkd.store.base.SessionStore`.

Each operation is one synchronous helper (``_x_sync``) run in one thread hop, the way aiohttp's
``FileResponse`` groups its blocking calls. In durable mode, an operation that answers a client
(a counted chunk, a new session, a claim, a task step) has fsynced its files and the folders
that name them before it returns, so the answer survives a power cut, not just kill -9.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import logging
import os
import shutil
import socket
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import orjson

from chunkd import errors as E
from chunkd.atomic import (
    create_once,
    fsync_dir,
    read_json,
    write_json_atomic,
    write_text_durably,
)
from chunkd.errors import ChunkdError
from chunkd.model.session import Claim, EndKind, SessionMeta, SessionState
from chunkd.model.task import Task
from chunkd.store.base import Lease, LeaseLost, StoreLimits
from chunkd.store.fs.layout import Layout, is_session_id
from chunkd.store.fs.leases import FileLeases
from chunkd.store.fs.ranges import FileRangeWriter, disk_full, lock_range, range_locked

log = logging.getLogger("chunkd.store")

#: Smallest chunk (and so most marker files per byte) this store accepts.
MIN_CHUNK_SIZE = 1024
#: Largest chunk: one pwrite range, no limit of its own that matters (the proxy's is far lower).
MAX_CHUNK_SIZE = 1 << 40
#: Most chunks per session: one marker file each (an inode and a block), counted at creation.
MAX_CHUNKS = 10_000
#: How much of a session's marker reserve a full disk releases at a time (16 blocks).
RESERVE_STEP = 64 * 1024
#: Inodes kept free beyond a new session's markers (claims, task records, other sessions' files).
INODE_FLOOR = 256
#: Half-created sessions (``.new-*``) older than this are debris from a crash.
STAGING_DEBRIS_SECONDS = 3600.0
#: Tombstones (410 instead of 404) and task-id entries are kept this long after a removal.
TOMBSTONE_SECONDS = 7 * 86400.0
#: How long a tus PATCH waits for the upload's lock (after asking its holder to let go) before
#: answering 423.
APPEND_LOCK_WAIT_SECONDS = 3.0


class FileChunkSlot:
    """A held chunk: the OFD lock on its byte range is held until the slot closes."""

    def __init__(self, store: FileSystemStore, meta: SessionMeta, index: int,
                 writer: FileRangeWriter, counted: str | None) -> None:
        self._store = store
        self._meta = meta
        self._index = index
        self.writer = writer
        self.counted = counted

    async def count(self, digest: str | None) -> frozenset[int]:
        if self.counted is not None:
            raise ValueError(f"chunk {self._index} is counted already")
        if self.writer.durable_bytes != self._meta.chunk_length(self._index):
            raise ValueError(f"chunk {self._index} is not whole and committed")
        received = await asyncio.to_thread(
            self._store._count_chunk_sync, self._meta.session_id, self._index, digest)
        self.counted = digest or ""
        return received


class FileBlob:
    """The finished ``data`` file of a session."""

    def __init__(self, path: Path, size: int, durable: bool) -> None:
        self._path = path
        self._durable = durable
        self.size = size

    async def read(self, offset: int, n: int) -> bytes:
        return await asyncio.to_thread(self._read_sync, offset, n)

    def _read_sync(self, offset: int, n: int) -> bytes:
        with open(self._path, "rb") as f:
            return os.pread(f.fileno(), n, offset)

    async def stream(self, piece: int = 1024 * 1024) -> AsyncIterator[bytes]:
        f = await asyncio.to_thread(open, self._path, "rb")
        try:
            while data := await asyncio.to_thread(f.read, piece):
                yield data
        finally:
            f.close()

    def local_path(self) -> Path:
        return self._path

    async def move_to(self, target: Path) -> None:
        await asyncio.to_thread(self._move_to_sync, target)

    def _move_to_sync(self, target: Path) -> None:
        try:
            os.rename(self._path, target)
        except FileNotFoundError:
            if not target.exists():  # not an earlier try of this same move
                raise
        if self._durable:
            fsync_dir(target.parent)  # the rename itself must survive a power cut


#: The joined file of a final upload's parts (``parts/whole``), when a hand-off needed one.
WHOLE = "whole"


class PartsBlob:
    """The file of a tus final upload: its partial uploads' data, one after the other, never
    copied to make it. ``move_to`` renames the first part into place and appends the others
    to it (``copy_file_range``, each part removed once it is in and flushed), so at most one
    part's bytes are on the disk twice, and only while it moves."""

    def __init__(self, paths: list[Path], sizes: tuple[int, ...], durable: bool) -> None:
        self._paths = paths
        self._sizes = sizes
        self._durable = durable
        self.size = sum(sizes)

    async def read(self, offset: int, n: int) -> bytes:
        return await asyncio.to_thread(self._read_sync, offset, n)

    def _read_sync(self, offset: int, n: int) -> bytes:
        out: list[bytes] = []
        start = 0
        for path, size in zip(self._paths, self._sizes, strict=True):
            if n <= 0:
                break
            if offset < start + size:
                with open(path, "rb") as f:
                    data = os.pread(f.fileno(), min(n, start + size - offset), offset - start)
                out.append(data)
                offset += len(data)
                n -= len(data)
            start += size
        return b"".join(out)

    async def stream(self, piece: int = 1024 * 1024) -> AsyncIterator[bytes]:
        for path in self._paths:
            async for data in FileBlob(path, 0, self._durable).stream(piece):
                yield data

    def local_path(self) -> Path | None:
        return self._paths[0] if len(self._paths) == 1 else None

    async def move_to(self, target: Path) -> None:
        await asyncio.to_thread(self._move_to_sync, target)

    async def assemble(self) -> Path:
        """Join the parts into ``parts/whole`` (for a program that needs one file)."""
        whole = self._paths[0].with_name(WHOLE)
        await self.move_to(whole)
        self._paths, self._sizes = [whole], (self.size,)
        return whole

    def _move_to_sync(self, target: Path) -> None:
        # Joined under another name, renamed to ``target`` when whole: whoever watches the
        # target's folder never sees a part of the file. Idempotent: a part still in the folder
        # is not in the joined file yet (or only partly).
        joining = target.with_name(f".{target.name}.joining")
        if target.exists() and not joining.exists() and not self._paths[0].exists():
            return  # moved whole by an earlier try of this same move
        FileBlob(self._paths[0], self._sizes[0], self._durable)._move_to_sync(joining)
        with open(joining, "r+b") as out:
            offset = self._sizes[0]
            for path, size in zip(self._paths[1:], self._sizes[1:], strict=True):
                try:
                    src = open(path, "rb")  # noqa: SIM115 (closed below)
                except FileNotFoundError:
                    offset += size  # appended before a crash
                    continue
                with src:
                    done = 0
                    while done < size:
                        n = os.copy_file_range(src.fileno(), out.fileno(), size - done,
                                               done, offset + done)
                        if n == 0:
                            raise OSError(f"{path} is shorter than {size} bytes")
                        done += n
                if self._durable:
                    os.fdatasync(out.fileno())
                os.unlink(path)
                offset += size
            out.truncate(offset)
        os.rename(joining, target)
        if self._durable:
            fsync_dir(target.parent)
            fsync_dir(self._paths[0].parent)


class FileAppendSlot:
    """A tus upload held for one PATCH (an OFD lock on the whole ``data`` file)."""

    def __init__(self, store: FileSystemStore, fd: int, meta: SessionMeta, offset: int,
                 hashed: bool | str) -> None:
        self._store = store
        self._fd = fd
        self._hashed = hashed
        self.meta = meta
        self.offset = offset
        self._writer: FileRangeWriter | None = None
        self._base = offset

    def writer(self, room: int) -> FileRangeWriter:
        """The writer of the next ``room`` bytes at the offset."""
        if self._writer is None:
            self._writer = FileRangeWriter(self._fd, self.offset, room, hashed=self._hashed,
                                           durable=self._store.durable)
        return self._writer

    async def declare_length(self, length: int) -> SessionMeta:
        self.meta = await asyncio.to_thread(self._store._declare_length_sync, self.meta, length)
        return self.meta

    async def advance(self) -> int:
        """Count what the writer has made durable: the new offset, itself durable."""
        if self._writer is None:
            return self.offset
        new = self._base + self._writer.durable_bytes
        if new > self.offset:
            await asyncio.to_thread(self._store._advance_sync, self.meta.session_id,
                                    self.offset, new)
            self.offset = new
        return self.offset

    async def close(self) -> None:
        if self._writer is not None:
            await self._writer.close()


class FileSystemStore:
    """A :class:`~chunkd.store.base.SessionStore` on a local (or shared POSIX) file system."""

    limits = StoreLimits(min_part_size=MIN_CHUNK_SIZE, max_part_size=MAX_CHUNK_SIZE,
                         max_parts=MAX_CHUNKS)

    def __init__(self, root: Path, *, durable: bool = True,
                 clock: Callable[[], float] = time.time, min_free: int = 0,
                 idle_ttl: float | None = None) -> None:
        self.layout = Layout(root)
        self.layout.make()
        self.durable = durable
        self.clock = clock
        #: Bytes a new session's reservation must leave free: the room every session's
        #: bookkeeping (markers, claims, task records) is written in.
        self.min_free = min_free
        #: An open session whose bytes were last written this long ago is expired (410) at
        #: once, not only at the next sweep.
        self.idle_ttl = idle_ttl
        self._leases = FileLeases(self.layout, clock)
        self._meta_cache: dict[str, SessionMeta] = {}
        self._writing: dict[str, int] = {}  # session id -> chunk slots open in this process

    @staticmethod
    def is_data_dir(root: Path) -> bool:
        """Does ``root`` look like a data folder this store made?"""
        return Layout(root).sessions.is_dir()

    def _sync_dir(self, path: Path) -> None:
        if self.durable:
            fsync_dir(path)

    # -- sessions ----------------------------------------------------------------------------

    async def create(self, *, ttl: float, **fields: Any) -> SessionMeta:
        now = self.clock()
        # A deep copy of what the caller gave: the metadata never changes afterwards.
        fields = orjson.loads(orjson.dumps(fields))
        sid = fields.pop("session_id", None) or str(uuid.uuid4())
        meta = SessionMeta.from_json({"session_id": sid, "created_at": now,
                                      "expires_at": now + ttl, **fields})
        await asyncio.to_thread(self._create_sync, meta)
        self._meta_cache[meta.session_id] = meta
        return meta

    def _create_sync(self, meta: SessionMeta) -> None:
        sid = meta.session_id
        staging = self.layout.staging(sid)
        index = None
        staging.mkdir()  # before the try: a staging folder that exists is someone else's
        try:
            (staging / self.layout.chunks(sid).name).mkdir()
            disk = os.statvfs(self.layout.root)
            # Each chunk's marker takes a block and an inode: counted with the file's bytes.
            bookkeeping = meta.total_chunks * disk.f_bsize
            # A final tus upload's bytes are on the disk already (its parts are moved in).
            reserved = 0 if meta.concat == "final" else meta.total_size
            if reserved + bookkeeping + self.min_free > disk.f_bavail * disk.f_frsize:
                raise E.INSUFFICIENT_STORAGE(reason="the file does not fit on the disk")
            if disk.f_files and disk.f_favail < meta.total_chunks + INODE_FLOOR:
                raise E.INSUFFICIENT_STORAGE(reason="the disk has no room for more files")
            if meta.is_tus:
                (staging / self.layout.offsets(sid).name).mkdir()
                os.close(os.open(staging / self.layout.offsets(sid).name / "0",
                                 os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
            if meta.concat == "final":
                (staging / self.layout.parts(sid).name).mkdir()
            else:
                # Every byte reserved now: a session that cannot fit fails here with 507,
                # not in the middle of its upload.
                self._reserve_blocks(staging / self.layout.data(sid).name, reserved)
            self._reserve_blocks(staging / self.layout.reserve(sid).name, bookkeeping)
            self._reserve_inodes(staging / self.layout.chunks(sid).name, meta.total_chunks)
            write_json_atomic(staging / self.layout.metadata(sid).name, meta.to_json())
            for kind in (EndKind.ABORT, EndKind.EXPIRE):  # so that ending it needs no space
                write_json_atomic(staging / self.layout.end_intent(sid, kind.value).name,
                                  self._claim_doc(kind, None, meta.created_at), durable=False)
            free_after = shutil.disk_usage(self.layout.root).free
            if free_after < self.min_free + bookkeeping:
                raise E.INSUFFICIENT_STORAGE(
                    reason="the disk is too full for a session of this size")
            if meta.task_id is not None:  # chosen by the client: it must be new
                index = self._claim_task_id(meta.task_id, sid)
            self._sync_dir(staging)
            try:
                os.rename(staging, self.layout.session(sid))
            except OSError as exc:  # the same id made meanwhile (a final upload's, by a twin)
                if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
                    raise FileExistsError(exc.errno, "the session exists", str(sid)) from None
                raise
            self._sync_dir(self.layout.sessions)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            if index is not None:
                with contextlib.suppress(OSError):
                    index.unlink()
            raise

    def _claim_task_id(self, task_id: str, sid: str) -> Path | None:
        """Make ``tasks/<task_id>`` name the session, unless the id is taken (422). None when
        it named this session already (a twin request made it: not ours to remove)."""
        index = self.layout.task_index(task_id)
        if not create_once(index, sid, self.durable):
            if index.read_text().strip() != sid:  # not the same final upload, made meanwhile
                raise E.TASK_ID_IN_USE(task_id=task_id)
            return None
        self._sync_dir(index.parent)
        return index

    async def get(self, session_id: str) -> SessionMeta:
        return await asyncio.to_thread(self._get_sync, session_id)

    def _get_sync(self, sid: str) -> SessionMeta:
        meta = self._meta(sid)
        claim = self._read_claim(sid)
        if claim is not None and claim.kind not in (EndKind.FINALIZE, EndKind.CONCAT):
            raise _gone(claim.kind)
        if claim is None and self.clock() > self._deadline(meta):
            # A finalized session lives on until its task is over and the sweeper takes it.
            raise _gone(EndKind.EXPIRE)
        return meta

    def _deadline(self, meta: SessionMeta) -> float:
        """When an open session expires: its lifetime's end, or ``idle_ttl`` after its bytes
        were last written (by any process; never while this one writes it)."""
        if self.idle_ttl is None or meta.session_id in self._writing:
            return meta.expires_at
        if meta.concat == "partial" and self._offset(meta.session_id) >= meta.total_size \
                and meta.length_known:
            return meta.expires_at  # whole, waiting for the final POST (SessionState agrees)
        try:
            last: float | None = os.stat(self.layout.data(meta.session_id)).st_mtime
        except FileNotFoundError:
            last = None
        return meta.open_until(self.idle_ttl, last)

    def _meta(self, sid: str) -> SessionMeta:
        if not is_session_id(sid):
            raise E.SESSION_NOT_FOUND()
        meta = self._meta_cache.get(sid)
        if meta is None or not self.layout.session(sid).is_dir():
            doc = read_json(self.layout.metadata(sid))
            if doc is None:
                self._meta_cache.pop(sid, None)
                raise self._missing(sid)
            meta = SessionMeta.from_json(doc)
            if meta.deferred_length:
                meta = self._with_length(meta)
            if not meta.deferred_length:  # a length still to come is read again next time
                self._meta_cache[sid] = meta
        return meta

    def _with_length(self, meta: SessionMeta) -> SessionMeta:
        """A deferred-length upload with the length a PATCH declared, if one did."""
        try:
            length = int(self.layout.length(meta.session_id).read_text())
        except FileNotFoundError:
            return meta
        return dataclasses.replace(meta, total_size=length, chunk_size=max(length, 1),
                                   deferred_length=False)

    def _offset(self, sid: str) -> int:
        """A tus upload's durable offset: the name of the one file in ``offset/``."""
        try:
            names = os.listdir(self.layout.offsets(sid))
        except FileNotFoundError:
            raise self._missing(sid) from None
        return max((int(n) for n in names if n.isdigit()), default=0)

    def _missing(self, sid: str) -> ChunkdError:
        """The error for a session that is not (or no longer) on disk."""
        tomb = read_json(self.layout.tombstone(sid))
        if tomb is not None:
            return _gone(EndKind(tomb.get("reason", "abort")))
        return E.SESSION_NOT_FOUND()

    def _read_claim(self, sid: str) -> Claim | None:
        doc = read_json(self.layout.claim(sid))
        if doc is None:
            return None
        return Claim(EndKind(doc["kind"]), doc.get("task_id"), doc["claimed_at"], won=False)

    def _received(self, sid: str) -> frozenset[int]:
        try:
            names = os.listdir(self.layout.chunks(sid))
        except FileNotFoundError:
            raise self._missing(sid) from None
        return frozenset(int(n) for n in names if n.isdigit())

    def _read_state(self, sid: str) -> SessionState:
        meta = self._meta(sid)
        task = read_json(self.layout.task(sid))
        try:
            last_write: float | None = os.stat(self.layout.data(sid)).st_mtime
        except FileNotFoundError:
            last_write = None  # handed off or refused
        received = self._received(sid)
        offset = 0
        if meta.is_tus:
            offset = self._offset(sid)
            whole = meta.length_known and offset >= meta.total_size
            received = frozenset({0}) if whole else frozenset()
        return SessionState(
            meta=meta,
            received=received,
            offset=offset,
            claim=self._read_claim(sid),
            task=Task.from_json(task) if task is not None else None,
            failure=read_json(self.layout.failure(sid)),
            last_write=last_write,
            writing=sid in self._writing,
        )

    async def state(self, session_id: str) -> SessionState:
        return await asyncio.to_thread(self._state_sync, session_id)

    def _state_sync(self, session_id: str) -> SessionState:
        self._get_sync(session_id)
        return self._read_state(session_id)

    async def resolve(self, any_id: str) -> str:
        if not is_session_id(any_id):
            raise E.SESSION_NOT_FOUND()
        try:
            sid = (await asyncio.to_thread(self.layout.task_index(any_id).read_text)).strip()
        except FileNotFoundError:
            return any_id
        return sid if is_session_id(sid) else any_id

    async def scan(self) -> list[SessionState]:
        return await asyncio.to_thread(self._scan_sync)

    def _scan_sync(self) -> list[SessionState]:
        out = []
        for entry in os.scandir(self.layout.sessions):
            if not is_session_id(entry.name):
                continue
            try:
                out.append(self._read_state(entry.name))
            except (ChunkdError, ValueError, KeyError, TypeError, OSError) as exc:
                log.warning("skipping session %s: %r", entry.name, exc)
        return out

    async def remove(self, session_id: str, reason: EndKind) -> None:
        await asyncio.to_thread(self._remove_sync, session_id, reason)

    def _remove_sync(self, sid: str, reason: EndKind) -> None:
        """Tombstone first, then one rename out of ``sessions/``, then delete at leisure."""
        if not self.layout.session(sid).is_dir():
            return  # never existed, or removed already (its tombstone is there then)
        tomb = {"reason": reason.value, "at": self.clock()}
        try:
            write_json_atomic(self.layout.tombstone(sid), tomb)
            self._sync_dir(self.layout.gone)
        except OSError as exc:
            if not disk_full(exc):
                raise
            tomb_later = True  # the disk is full: remove first (that frees space), record after
        else:
            tomb_later = False
        target = self.layout.trash / f"{sid}.{uuid.uuid4().hex}"
        try:
            os.rename(self.layout.session(sid), target)
        except FileNotFoundError:
            return
        self._meta_cache.pop(sid, None)
        shutil.rmtree(target, ignore_errors=True)
        if tomb_later:
            write_json_atomic(self.layout.tombstone(sid), tomb)
            self._sync_dir(self.layout.gone)
        self._sync_dir(self.layout.sessions)

    async def purge(self, now: float) -> None:
        await asyncio.to_thread(self._purge_sync, now)

    def _purge_sync(self, now: float) -> None:
        for entry in os.scandir(self.layout.sessions):
            if Layout.is_staging(entry.name) and (
                now - entry.stat().st_mtime > STAGING_DEBRIS_SECONDS
            ):
                shutil.rmtree(entry.path, ignore_errors=True)
        for entry in os.scandir(self.layout.trash):
            shutil.rmtree(entry.path, ignore_errors=True)
        for folder in (self.layout.gone, self.layout.tasks):
            for entry in os.scandir(folder):
                with contextlib.suppress(FileNotFoundError):
                    if entry.stat().st_mtime < now - TOMBSTONE_SECONDS and not (
                        folder == self.layout.tasks and self._task_session_exists(entry.path)
                    ):
                        os.unlink(entry.path)

    def _task_session_exists(self, index: str) -> bool:
        """A task id stays resolvable for as long as its session exists."""
        sid = Path(index).read_text().strip()
        return is_session_id(sid) and self.layout.session(sid).is_dir()

    async def health(self) -> str:
        return await asyncio.to_thread(self._health_sync)

    def _health_sync(self) -> str:
        if not os.access(self.layout.sessions, os.W_OK):
            return "data_dir_not_writable"
        try:
            probe = self.layout.sessions / f".health.{uuid.uuid4().hex}"
            fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            os.close(fd)
            os.unlink(probe)
        except OSError as exc:
            return "data_dir_full" if disk_full(exc) else "data_dir_not_writable"
        if shutil.disk_usage(self.layout.root).free <= self.min_free:
            return "data_dir_full"  # existing sessions can finish; no new one fits
        return "ok"

    # -- chunks ------------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _data_fd(self, sid: str) -> AsyncIterator[int]:
        """The session's ``data`` file, open for writing (and counted as being written by this
        process) for the block; closing it releases the OFD locks taken on it."""
        try:
            fd = await asyncio.to_thread(os.open, self.layout.data(sid), os.O_WRONLY)
        except FileNotFoundError:
            await asyncio.to_thread(self._check_open_for_chunks, sid)  # handed off: 409
            raise self._missing(sid) from None
        self._writing[sid] = self._writing.get(sid, 0) + 1
        try:
            yield fd
        finally:
            left = self._writing[sid] - 1
            if left:
                self._writing[sid] = left
            else:
                del self._writing[sid]
            # Shielded: a handler cancelled now (its client went away, or shutdown) must still
            # close the file, or its OFD locks outlive the request and the chunk stays busy.
            await asyncio.shield(asyncio.to_thread(os.close, fd))

    @contextlib.asynccontextmanager
    async def open_chunk(self, meta: SessionMeta, index: int, *, hashed: bool
                         ) -> AsyncIterator[FileChunkSlot]:
        offset, length = meta.chunk_offset(index), meta.chunk_length(index)
        async with self._data_fd(meta.session_id) as fd:
            writer = FileRangeWriter(fd, offset, length, hashed=hashed, durable=self.durable)
            try:
                # One writer per chunk, in any process: an OFD lock on the chunk's byte range.
                # Every check below happens under it, so a chunk counted by someone else is
                # never written again, and no write can land after finalize (which needs every
                # chunk counted).
                await lock_range(fd, offset, length, index)
                counted = await asyncio.to_thread(self._counted_sync, meta, index)
                yield FileChunkSlot(self, meta, index, writer, counted)
            finally:
                await writer.close()  # before the fd closes (a write may still be running)

    def _counted_sync(self, meta: SessionMeta, index: int) -> str | None:
        """Is the session still open (else raise), and is this chunk counted (its digest)?"""
        sid = meta.session_id
        self._check_open_for_chunks(sid, meta.expires_at)
        try:
            return self.layout.marker(sid, index).read_text()
        except FileNotFoundError:
            return None

    def _check_open_for_chunks(self, sid: str, expires_at: float | None = None) -> None:
        claim = self._read_claim(sid)
        if claim is None:
            if expires_at is not None and self.clock() > expires_at:
                raise _gone(EndKind.EXPIRE)
            return
        if claim.kind is EndKind.FINALIZE:
            raise E.SESSION_FINALIZED(task_id=claim.task_id)
        if claim.kind is EndKind.CONCAT:
            raise E.SESSION_FINALIZED(task_id=None)
        raise _gone(claim.kind)

    # -- tus: one byte stream per upload, counted by its durable offset ----------------------

    @contextlib.asynccontextmanager
    async def open_append(self, meta: SessionMeta, *, hashed: bool | str = False
                          ) -> AsyncIterator[FileAppendSlot]:
        sid = meta.session_id
        async with self._data_fd(sid) as fd:
            # One PATCH per upload, in any process: an OFD lock on the whole file.
            await lock_range(fd, 0, 0, 0, wait=APPEND_LOCK_WAIT_SECONDS,
                             busy=lambda: E.UPLOAD_LOCKED())
            meta, offset = await asyncio.to_thread(self._append_check_sync, sid)
            slot = FileAppendSlot(self, fd, meta, offset, hashed)
            try:
                yield slot
            finally:
                await slot.close()  # before the fd closes (a write may still be running)

    def _append_check_sync(self, sid: str) -> tuple[SessionMeta, int]:
        """Under the lock: still open, not expired; the metadata (its length may have been
        declared meanwhile) and the durable offset."""
        meta = self._meta(sid)
        self._check_open_for_chunks(sid, self._deadline(meta))
        return meta, self._offset(sid)

    def _advance_sync(self, sid: str, old: int, new: int) -> None:
        """Move the offset from ``old`` to ``new``: one rename of the one offset file."""
        folder = self.layout.offsets(sid)
        self._check_open_for_chunks(sid)
        try:
            os.rename(folder / str(old), folder / str(new))
        except FileNotFoundError:
            raise self._missing(sid) from None
        self._sync_dir(folder)

    def _declare_length_sync(self, meta: SessionMeta, length: int) -> SessionMeta:
        """A deferred length, declared once: reserve its bytes, then record it (link(2))."""
        sid = meta.session_id
        path = self.layout.data(sid)
        disk = os.statvfs(self.layout.root)
        more = max(0, length - os.stat(path).st_blocks * 512)
        if more + self.min_free > disk.f_bavail * disk.f_frsize:
            raise E.INSUFFICIENT_STORAGE(reason="the file does not fit on the disk")
        fd = os.open(path, os.O_WRONLY)
        try:
            _allocate(fd, length)
        finally:
            os.close(fd)
        target = self.layout.length(sid)
        # (made by a request before when it exists: the caller checked it is the same length)
        create_once(target, str(length), self.durable)
        self._sync_dir(target.parent)
        self._meta_cache.pop(sid, None)
        return self._meta(sid)

    async def request_stop(self, session_id: str) -> None:
        """Ask the PATCH holding the upload (in any process) to stop and keep what it has."""
        await asyncio.to_thread(self._request_stop_sync, session_id)

    def _request_stop_sync(self, sid: str) -> None:
        """A new stop file (a new inode: its mark changes even within one clock tick)."""
        path = self.layout.stop_request(sid)
        tmp = path.with_name(f".stop.{uuid.uuid4().hex}")
        with contextlib.suppress(OSError):  # gone, or a full disk: the lock wait still works
            write_text_durably(tmp, str(os.getpid()), False)
            os.replace(tmp, path)
        with contextlib.suppress(OSError):
            os.unlink(tmp)

    async def stop_mark(self, session_id: str) -> object:
        """Something that changes whenever a stop is asked for (no clocks compared: hosts
        sharing the folder need not agree on the time)."""
        try:
            st = await asyncio.to_thread(os.stat, self.layout.stop_request(session_id))
        except FileNotFoundError:
            return None
        return (st.st_ino, st.st_mtime_ns)

    async def held(self, session_id: str) -> bool:
        """Is a PATCH (any process) holding the upload right now?"""
        return await asyncio.to_thread(self._held_sync, session_id)

    def _held_sync(self, sid: str) -> bool:
        try:
            fd = os.open(self.layout.data(sid), os.O_RDONLY)
        except FileNotFoundError:
            return False
        try:
            return range_locked(fd, 0, 0)
        finally:
            os.close(fd)

    async def concatenate(self, parts: list[SessionMeta], *, ttl: float, session_id: str,
                          **fields: Any) -> SessionMeta:
        return await asyncio.to_thread(self._concatenate_sync, parts, ttl, session_id, fields)

    def _concatenate_sync(self, parts: list[SessionMeta], ttl: float, fid: str,
                          fields: dict[str, Any]) -> SessionMeta:
        """Create the final upload ``fid`` (or find it: the same parts give the same id), take
        each part (a CONCAT claim: exactly one final gets it), and move the parts' data into it
        by rename. Every step can be done again after a crash."""
        try:
            meta = self._meta(fid)
        except ChunkdError as exc:
            if exc.status != 404:  # made before, and aborted or expired since: it stays gone
                raise
            now = self.clock()
            meta = SessionMeta.from_json({
                **orjson.loads(orjson.dumps(fields)), "session_id": fid, "created_at": now,
                "expires_at": now + ttl, "parts": [p.session_id for p in parts],
                "part_sizes": [p.total_size for p in parts]})
            try:
                self._create_sync(meta)
            except FileExistsError:  # the same final POST, at the same time: let it finish
                deadline = time.monotonic() + 10
                while not self.layout.session(fid).is_dir() and time.monotonic() < deadline:
                    time.sleep(0.02)
                log.info("final upload %s made by a concurrent request", fid)
            meta = self._meta(fid)
        failure = read_json(self.layout.failure(fid))
        if failure is not None:  # made before, and its file refused: say so again
            raise ChunkdError.from_record(failure)
        for part in parts:  # every part free (or this final's) before any is taken
            _part_free(part.session_id, self._read_claim(part.session_id), fid)
        for k, part in enumerate(parts):
            _part_free(part.session_id, self._claim_sync(part.session_id, EndKind.CONCAT, ref=fid),
                       fid)
            try:
                os.rename(self.layout.data(part.session_id), self.layout.part(fid, k))
            except FileNotFoundError:
                if not self.layout.part(fid, k).exists() and self._offset(fid) == 0:
                    raise E.PARTIAL_GONE(upload_id=part.session_id) from None
        self._sync_dir(self.layout.parts(fid))
        for part in parts:
            self._sync_dir(self.layout.session(part.session_id))
        with contextlib.suppress(FileNotFoundError):  # whole: done by an earlier request
            os.rename(self.layout.offsets(fid) / "0", self.layout.offsets(fid) / str(
                meta.total_size))
            self._sync_dir(self.layout.offsets(fid))
        return meta

    @staticmethod
    def _reserve_blocks(path: Path, size: int) -> None:
        """A new file of ``size`` bytes, all allocated (507 if they do not fit)."""
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            _allocate(fd, size)
        finally:
            os.close(fd)

    def _reserve_inodes(self, chunks: Path, count: int) -> None:
        """One empty file per chunk marker, now: its inode is the session's from here on."""
        for index in range(count):
            name = self.layout.pending_marker("", index).name
            try:
                os.close(os.open(chunks / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
            except OSError as exc:
                if disk_full(exc):
                    raise E.INSUFFICIENT_STORAGE(reason="the disk has no room for more files"
                                                 ) from None
                raise

    def _release_reserve(self, sid: str) -> bool:
        """Give back some of the session's reserved marker blocks; False if none are left."""
        path = self.layout.reserve(sid)
        try:
            size = path.stat().st_size
            if size == 0:
                return False
            os.truncate(path, max(0, size - RESERVE_STEP))
        except FileNotFoundError:
            return False  # made before the reserve existed, or removed meanwhile
        return True

    def _count_chunk_sync(self, sid: str, index: int, digest: str | None) -> frozenset[int]:
        """Create the chunk's marker by rename (atomic) and make that rename durable."""
        self._check_open_for_chunks(sid)
        marker = self.layout.marker(sid, index)
        pending = self.layout.pending_marker(sid, index)
        # The inode made for this marker at creation (sessions made before had none: a new one).
        reserved = pending.exists()
        tmp = pending if reserved else marker.with_name(f".{index}.{uuid.uuid4().hex}.tmp")
        while True:
            try:
                with open(tmp, "w" if reserved else "x") as f:
                    f.write(digest or "")
                break
            except FileNotFoundError:
                raise self._missing(sid) from None  # removed while the body was streaming
            except OSError as exc:
                if not reserved:
                    with contextlib.suppress(OSError):
                        os.unlink(tmp)
                if not disk_full(exc):
                    raise
                if not self._release_reserve(sid):  # the disk is full: use the reserved room
                    raise E.INSUFFICIENT_STORAGE(reason="the disk is full") from None
        try:
            os.replace(tmp, marker)
        except OSError:
            if not reserved:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
            raise
        self._sync_dir(marker.parent)
        return self._received(sid)

    # -- the one-time end --------------------------------------------------------------------

    async def claim_end(self, session_id: str, kind: EndKind, ref: str | None = None) -> Claim:
        return await asyncio.to_thread(self._claim_sync, session_id, kind, ref)

    @staticmethod
    def _claim_doc(kind: EndKind, task_id: str | None, claimed_at: float) -> dict[str, Any]:
        return {"kind": kind.value, "task_id": task_id, "claimed_at": claimed_at,
                "pid": os.getpid(), "host": socket.gethostname()}

    def _claim_sync(self, sid: str, kind: EndKind, ref: str | None = None) -> Claim:
        if kind in (EndKind.ABORT, EndKind.EXPIRE):
            prepared = self._claim_prepared(sid, kind)
            if prepared is not None:
                return prepared
        chosen = None  # a task id the client chose at creation: its index entry exists
        if kind is EndKind.FINALIZE:
            chosen = self._meta(sid).task_id
            task_id: str | None = chosen or str(uuid.uuid4())
        else:
            task_id = ref  # CONCAT: the final upload's id
        claimed_at = self.clock()
        doc = self._claim_doc(kind, task_id, claimed_at)
        folder = self.layout.session(sid)
        tmp = folder / f".end.{uuid.uuid4().hex}.tmp"
        try:
            write_json_atomic(tmp, doc)
        except FileNotFoundError:
            raise self._missing(sid) from None
        index = None
        if kind is EndKind.FINALIZE and chosen is None and task_id is not None:
            index = self.layout.task_index(task_id)
        won = False
        try:
            if index is not None:  # before the claim, so a task id is always resolvable
                write_text_durably(index, sid, self.durable)
                self._sync_dir(index.parent)
            try:
                os.link(tmp, self.layout.claim(sid))  # fails with EEXIST when someone else won
                won = True
            except FileExistsError:
                pass
            except FileNotFoundError:  # another end won and already removed the session
                raise self._missing(sid) from None
        finally:
            with contextlib.suppress(FileNotFoundError):  # gone with its folder
                os.unlink(tmp)
            if index is not None and not won:  # no task: no index entry left behind
                with contextlib.suppress(FileNotFoundError):
                    index.unlink()
        if won:
            self._sync_dir(folder)
            return Claim(kind, task_id, claimed_at, won=True)
        claim = self._read_claim(sid)
        if claim is None:  # the winner removed the session (and its claim) meanwhile
            raise self._missing(sid)
        return claim

    def _claim_prepared(self, sid: str, kind: EndKind) -> Claim | None:
        """An abort or expiry by linking the claim written at creation: no new block needed,
        so a full disk can always be freed. None for a session made before those existed."""
        intent = self.layout.end_intent(sid, kind.value)
        try:
            os.link(intent, self.layout.claim(sid))
        except FileExistsError:
            claim = self._read_claim(sid)
            if claim is None:  # the winner removed the session (and its claim) meanwhile
                raise self._missing(sid) from None
            return claim
        except FileNotFoundError:
            if not self.layout.session(sid).is_dir():
                raise self._missing(sid) from None
            return None  # no prepared claim: an older session
        with contextlib.suppress(OSError):  # durability of the claim; a full disk may refuse
            self._sync_dir(self.layout.session(sid))
        doc = read_json(intent) or {}
        return Claim(kind, None, float(doc.get("claimed_at", self.clock())), won=True)

    # -- leases and one-time claims ----------------------------------------------------------

    async def acquire(self, session_id: str) -> Lease | None:
        return await asyncio.to_thread(self._acquire_sync, session_id)

    def _acquire_sync(self, session_id: str) -> Lease | None:
        self._meta(session_id)  # unknown or removed: a clear error
        return self._leases.acquire(session_id)

    async def renew(self, lease: Lease) -> bool:
        return await asyncio.to_thread(self._leases.renew, lease)

    async def release(self, lease: Lease) -> None:
        await asyncio.to_thread(self._leases.release, lease)

    async def claim_once(self, session_id: str, name: str) -> bool:
        return await asyncio.to_thread(self._claim_once_sync, session_id, name)

    def _claim_once_sync(self, session_id: str, name: str) -> bool:
        path = self.layout.once(session_id, name)
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        except FileNotFoundError:
            raise self._missing(session_id) from None
        os.close(fd)
        self._sync_dir(path.parent)
        return True

    async def release_once(self, session_id: str, name: str) -> None:
        await asyncio.to_thread(self._release_once_sync, session_id, name)

    def _release_once_sync(self, session_id: str, name: str) -> None:
        src = self.layout.once(session_id, name)
        with contextlib.suppress(FileNotFoundError):
            os.rename(src, src.with_name(f"{src.name}.{time.time_ns()}"))
            self._sync_dir(src.parent)

    # -- task records ------------------------------------------------------------------------

    def _write_under(self, lease: Lease, path: Path, doc: Any) -> None:
        if path.parent != self.layout.session(lease.session_id):
            raise ValueError("a lease only covers its own session's records")
        if not self._leases.holds(lease):
            raise LeaseLost(f"session {lease.session_id}, lease {lease.token}")
        write_json_atomic(path, doc)
        self._sync_dir(path.parent)

    async def write_task(self, task: Task, lease: Lease) -> None:
        await asyncio.to_thread(
            self._write_under, lease, self.layout.task(task.session_id), task.to_json())

    async def write_result(self, session_id: str, result: Any, lease: Lease) -> None:
        await asyncio.to_thread(self._write_under, lease, self.layout.result(session_id), result)

    async def read_result(self, session_id: str) -> Any:
        return await asyncio.to_thread(self._read_result_sync, session_id)

    def _read_result_sync(self, session_id: str) -> Any:
        try:
            return orjson.loads(self.layout.result(session_id).read_bytes())
        except FileNotFoundError:
            return None

    async def record_failure(self, session_id: str, error: ChunkdError) -> None:
        await asyncio.to_thread(self._record_failure_sync, session_id, error)

    def _record_failure_sync(self, session_id: str, error: ChunkdError) -> None:
        path = self.layout.failure(session_id)
        write_json_atomic(path, error.to_record())
        self._sync_dir(path.parent)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.layout.data(session_id))
        shutil.rmtree(self.layout.parts(session_id), ignore_errors=True)

    # -- the finished file -------------------------------------------------------------------

    async def blob(self, session_id: str) -> FileBlob | PartsBlob | None:
        return await asyncio.to_thread(self._blob_sync, session_id)

    def _blob_sync(self, sid: str) -> FileBlob | PartsBlob | None:
        try:
            meta = self._meta(sid)
        except ChunkdError:
            return None  # removed meanwhile: no bytes
        if meta.concat == "final":
            whole = self.layout.parts(sid) / WHOLE
            paths = [self.layout.part(sid, k) for k in range(len(meta.parts))]
            if whole.exists() and not any(p.exists() for p in paths[1:]):
                return FileBlob(whole, meta.total_size, self.durable)
            if not any(p.exists() for p in paths):
                return None  # moved away by the hand-off (or refused)
            return PartsBlob(paths, meta.part_sizes, self.durable)
        path = self.layout.data(sid)
        try:
            size = os.stat(path).st_size
        except FileNotFoundError:
            return None
        return FileBlob(path, size, self.durable)


def _part_free(part_id: str, claim: Claim | None, fid: str) -> None:
    """A partial upload may go into the final upload ``fid`` only if nothing else has it."""
    if claim is not None and (claim.kind is not EndKind.CONCAT or claim.task_id != fid):
        raise E.PARTIAL_IN_USE(upload_id=part_id)


def _allocate(fd: int, size: int) -> None:
    """Allocate the file's first ``size`` bytes; 507 when the disk (or the file system's largest
    file, EFBIG) cannot hold them."""
    try:
        if size:
            os.posix_fallocate(fd, 0, size)
    except OSError as exc:
        if disk_full(exc) or exc.errno == 27:  # EFBIG
            raise E.INSUFFICIENT_STORAGE(reason="the file does not fit on the disk") from None
        raise


def _gone(kind: EndKind) -> ChunkdError:
    return E.SESSION_EXPIRED() if kind is EndKind.EXPIRE else E.SESSION_ABORTED()
