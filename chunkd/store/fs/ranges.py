"""Writing one byte range of a session's ``data`` file: the OFD range lock and the range writer.

The writer takes bytes two ways. Given bytes (:meth:`FileRangeWriter.write`), it gathers them
into batches of :data:`WRITE_BUFFER` bytes and writes each batch with one ``pwritev`` in one
thread hop (hashing it there too, when asked), while the next batch is being gathered: disk and
network overlap and at most two batches per request are in memory. Given a blocking reader
(:meth:`FileRangeWriter.fill_from`, the HTTP layer's socket reader), one worker thread reads
into the writer's own :data:`FILL_BUFFER` and writes it out, buffer after buffer, for the whole
body: no copy in Python and no thread hop per buffer. In durable mode each batch's or buffer's
writeback is started at once (``sync_file_range``) so the ``fdatasync`` of
:meth:`FileRangeWriter.commit` has little left to do.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import fcntl
import hashlib
import os
import struct
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import aiofiles.os

from chunkd import errors as E

#: Bytes gathered before one write to disk (one thread hop per batch). Measured on this kind of
#: machine: writes of 256-512 KiB ran several times faster than writes of 1 MiB and more.
WRITE_BUFFER = 512 * 1024
#: The buffer :meth:`FileRangeWriter.fill_from` reads the socket into, one per request: the
#: reference receiver of issue 13 (``recv_into`` + ``pwrite``) ran fastest with 1 MiB.
FILL_BUFFER = 1024 * 1024
#: Threads for :meth:`FileRangeWriter.fill_from` (made as needed; each holds one request for as
#: long as its body lasts, so they are kept apart from the default executor's short jobs). The
#: server's body slots (``--max-concurrent-chunks``) bound how many run at once.
FILL_THREADS = 256
#: How long a chunk waits for another upload of the same chunk to finish before answering 409.
CHUNK_LOCK_WAIT_SECONDS = 30.0
_IOV_MAX = 1024
_F_OFD_SETLK = getattr(fcntl, "F_OFD_SETLK", 37)  # Linux open-file-description locks
_F_OFD_GETLK = getattr(fcntl, "F_OFD_GETLK", 36)
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def disk_full(exc: OSError) -> bool:
    return exc.errno in _DISK_FULL


def _load_sync_file_range() -> Callable[[int, int, int], None]:
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


def _pwrite_all(fd: int, pieces: list[bytes | memoryview], offset: int, hasher: Any,
                start_writeback: bool) -> None:
    """One thread hop per batch: hash it (when asked), write it at ``offset`` with ``pwritev``
    (the pieces go to the kernel as they are, never joined), start its writeback if asked."""
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


_fill_executor: ThreadPoolExecutor | None = None


def _fill_threads() -> ThreadPoolExecutor:
    global _fill_executor
    if _fill_executor is None:
        _fill_executor = ThreadPoolExecutor(FILL_THREADS, thread_name_prefix="chunkd-fill")
    return _fill_executor


_pwrite_async = aiofiles.os.wrap(_pwrite_all)  # one thread hop each (aiofiles: the design card's)
_fdatasync_async = aiofiles.os.wrap(os.fdatasync)


async def lock_range(fd: int, offset: int, length: int, index: int, *,
                     wait: float = CHUNK_LOCK_WAIT_SECONDS,
                     busy: Callable[[], Exception] | None = None) -> None:
    """Take an exclusive OFD lock on [offset, offset+length) (length 0: to the end and beyond),
    polling for up to ``wait`` seconds; then raise ``busy()`` (default: 409 ``chunk_busy``).

    OFD locks belong to the open file description, so they exclude other processes and other
    opens in this one; closing the fd releases it."""
    request = struct.pack("hhqqi", fcntl.F_WRLCK, os.SEEK_SET, offset, length, 0)
    deadline = time.monotonic() + wait
    while True:
        try:
            fcntl.fcntl(fd, _F_OFD_SETLK, request)  # non-blocking, no thread needed
            return
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                raise
        if time.monotonic() > deadline:
            raise busy() if busy is not None else E.CHUNK_BUSY(chunk_index=index)
        await asyncio.sleep(0.02)


def range_locked(fd: int, offset: int, length: int) -> bool:
    """Does someone (another open of the file, in any process) hold a lock on the range?"""
    request = struct.pack("hhqqi", fcntl.F_WRLCK, os.SEEK_SET, offset, length, 0)
    answer = fcntl.fcntl(fd, _F_OFD_GETLK, request)
    kind: int = struct.unpack("hhqqi", answer)[0]
    return kind != fcntl.F_UNLCK


class FileRangeWriter:
    """A :class:`~chunkd.store.base.RangeWriter` on an open file descriptor."""

    def __init__(self, fd: int, offset: int, length: int, *, hashed: bool | str,
                 durable: bool) -> None:
        self._fd = fd
        self._start = offset
        self._length = length
        self._durable = durable
        # ``hashed``: True for SHA-256, or a hashlib name (tus checksums: sha1, md5, ...).
        algorithm = "sha256" if hashed is True else hashed
        self._hasher = hashlib.new(algorithm) if algorithm else None
        self._batch: list[bytes | memoryview] = []
        self._batched = 0
        self._pos = offset            # file offset of the batch being gathered
        self._written = 0
        self._synced = 0
        self._pending: asyncio.Future[Any] | None = None
        #: A batch write that failed: its bytes are not on disk, so nothing after may count.
        self._failure: BaseException | None = None
        self._lent: list[bytearray] = []  # the two buffers lent to buffer()/filled()
        self._lent_fill = 0
        self._fill_buffer: bytearray | None = None  # fill_from's, made on first use

    @property
    def written(self) -> int:
        return self._written

    @property
    def durable_bytes(self) -> int:
        return self._synced

    def _room(self) -> int:
        return self._length - self._written

    async def write(self, data: bytes) -> None:
        if len(data) > self._room():
            raise ValueError(f"{len(data)} bytes past the range's end ({self._room()} left)")
        self._batch.append(data)  # kept as it came: no copy in Python
        self._batched += len(data)
        self._written += len(data)
        if self._batched >= WRITE_BUFFER:
            await self._submit()

    def buffer(self) -> memoryview:
        if not self._lent:
            self._lent = [bytearray(WRITE_BUFFER), bytearray(WRITE_BUFFER)]
        buf = self._lent[0]
        end = min(len(buf), self._lent_fill + self._room())
        return memoryview(buf)[self._lent_fill:end]

    async def filled(self, n: int) -> None:
        if n > self._room() or self._lent_fill + n > WRITE_BUFFER:
            raise ValueError("filled() past the lent buffer or the range's end")
        self._lent_fill += n
        self._written += n
        if self._lent_fill == WRITE_BUFFER or self._room() == 0:
            await self._submit_lent()

    async def fill_from(self, read: Callable[[memoryview], int], n: int, *,
                        seconds: float | None = None) -> tuple[int, bool]:
        """Take up to ``n`` more bytes from ``read`` (blocking ``recv_into``-like: fills a view,
        returns the count, 0 at the end), in one worker thread: read into this writer's buffer,
        write it out, again. Returns ``(bytes taken, ended)``; stops after ``seconds`` if given
        (at a buffer's end). What ``read`` put in the buffer before it raised is written too,
        then the error is raised: those bytes are the range's, like any others."""
        if n > self._room():
            raise ValueError(f"{n} bytes past the range's end ({self._room()} left)")
        await self._submit_lent()
        if self._batch:
            await self._submit()
        await self._wait_pending()  # everything before self._pos is written
        if self._fill_buffer is None:
            self._fill_buffer = bytearray(FILL_BUFFER)
        until = time.monotonic() + seconds if seconds is not None else None
        taken: list[int] = [0]
        raised: list[Exception] = []
        job = asyncio.get_running_loop().run_in_executor(
            _fill_threads(), self._fill_sync, read, n, until, taken, raised)

        def account(_: object) -> None:  # when the worker is done, also after a cancelled wait
            self._written += taken[0]    # (if it failed, nothing after counts anyway)

        job.add_done_callback(account)  # before any waiter's: they see the count
        self._pending = asyncio.ensure_future(job)
        await self._wait_pending()
        if raised:
            raise raised[0]
        return taken[0], job.result()

    def _fill_sync(self, read: Callable[[memoryview], int], n: int, until: float | None,
                   taken: list[int], raised: list[Exception]) -> bool:
        """The worker's loop. An error of ``read`` (deadline, stop) is the caller's: it is
        handed back in ``raised``, not as the job's failure, which would make the writer
        unusable for keeping what was written; a failed write is the job's failure."""
        assert self._fill_buffer is not None
        view = memoryview(self._fill_buffer)
        while taken[0] < n:
            want, got, ended = min(len(view), n - taken[0]), 0, False
            error: Exception | None = None
            try:
                while got < want:
                    k = read(view[got:want])
                    if k == 0:
                        ended = True
                        break
                    got += k
                    if until is not None and time.monotonic() >= until:
                        break  # a checkpoint is due: write what there is
            except Exception as exc:  # noqa: BLE001 (handed to the caller below)
                error = exc
            if got:  # also when read raised: what it delivered is written
                _pwrite_all(self._fd, [view[:got]], self._pos, self._hasher, self._durable)
                self._pos += got
                taken[0] += got
            if error is not None:
                raised.append(error)
                return False
            if ended:
                return True
            if until is not None and time.monotonic() >= until:
                return False
        return False

    async def _submit_lent(self) -> None:
        if self._lent_fill == 0:
            return
        full = self._lent[0]
        self._batch.append(memoryview(full)[: self._lent_fill])
        self._batched += self._lent_fill
        self._lent_fill = 0
        await self._submit()
        # the other buffer is free: _submit waited for the write that used it
        self._lent.reverse()

    async def _submit(self) -> None:
        """Start writing the gathered batch once the previous one is written."""
        await self._wait_pending()
        batch, pos = self._batch, self._pos
        self._batch, self._pos, self._batched = [], pos + self._batched, 0
        self._pending = asyncio.ensure_future(
            _pwrite_async(self._fd, batch, pos, self._hasher, self._durable))

    async def _wait_pending(self) -> None:
        if self._failure is not None:
            raise self._failure
        pending = self._pending
        if pending is None:
            return
        try:
            # Shielded: a cancelled caller leaves the write pending (a thread cannot be
            # stopped), and whoever commits or closes next waits for it.
            await asyncio.shield(pending)
        except asyncio.CancelledError:
            if not pending.done():
                raise
            self._failure = OSError("the write was cancelled")
            raise
        except OSError as exc:
            self._failure = (E.INSUFFICIENT_STORAGE(reason="the disk is full")
                             if disk_full(exc) else exc)
            raise self._failure from None
        finally:
            if pending.done():
                self._pending = None

    async def commit(self) -> str | None:
        await self._submit_lent()
        if self._batch:
            await self._submit()
        await self._wait_pending()  # raises if any batch failed: nothing after it may count
        if self._durable:
            try:
                await _fdatasync_async(self._fd)
            except OSError as exc:
                if disk_full(exc):
                    raise E.INSUFFICIENT_STORAGE(reason="the disk is full") from None
                raise
        self._synced = self._written
        return self._hasher.hexdigest() if self._hasher is not None else None

    async def close(self) -> None:
        """Wait for a write still running (a thread cannot be cancelled) before the fd closes."""
        pending, self._pending = self._pending, None
        if pending is not None:
            with contextlib.suppress(BaseException):
                await asyncio.shield(pending)
