"""Reading a chunk's or a PATCH's body off the HTTP request.

:class:`RequestBody` is the :class:`~chunkd.core.uploads.BodySource` of a request. It owns the
idle deadline (a body silent for ``idle_timeout`` is cut off with 408, the slow-loris guard), the
minimum rate (a trickle is cut off too) and the length checks. A large plain body is taken off
aiohttp (:mod:`chunkd.api.socket_body`) and read straight from the socket into the range
writer's buffer by one worker thread (:meth:`~chunkd.store.base.RangeWriter.fill_from`); any
other body comes through aiohttp's stream, each network piece handed to the writer as it came.

Memory: the server reads every request with a small buffer (``cli.READ_BUFSIZE``), so a request
whose body nobody reads holds little; a body that got one of the :class:`BodySlots` holds the
writer's buffer (1 MiB) or, through aiohttp, raises the read size to :data:`BODY_READ_SIZE`. So
buffered bytes are bounded by the connection cap times the small buffer plus the slots times
the large one.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable

from aiohttp import web

from chunkd import errors as E
from chunkd.api import socket_body
from chunkd.store.base import RangeWriter

#: aiohttp reads a chunk body in pieces of up to 2x this before pausing the socket. Its default
#: (64 KiB) pauses and resumes the socket thousands of times a second at ~1 GB/s. Measured with
#: chunkd bench (1 GiB, 1 in flight, 5 runs): 256 KiB gave +16% (durable off) and +7% (on) with
#: peak RSS for 16 parallel chunks at ~85 MiB; 512 KiB gave +37% / +25% but ~105 MiB.
BODY_READ_SIZE = 256 * 1024


class _Pace:
    """The minimum rate, checked per window of ``idle`` seconds (not on average since the
    start: a body cannot send fast first and then trickle for hours)."""

    def __init__(self, min_rate: int, window: float) -> None:
        self._min_rate, self._window = min_rate, window
        self.total = 0
        self._start, self._bytes = time.monotonic(), 0

    def seen(self, n: int) -> None:
        self.total += n
        self._bytes += n
        elapsed = time.monotonic() - self._start
        if self._min_rate and elapsed > self._window:
            if self._bytes < self._min_rate * elapsed:
                raise E.BODY_TOO_SLOW(min_rate=self._min_rate, received_bytes=self.total,
                                      seconds=round(elapsed))
            self._start, self._bytes = time.monotonic(), 0


class RequestEnded(Exception):
    """Raised in a worker still reading a body whose request has ended (cancelled): not an
    ``OSError``, so the writer keeps counting what it wrote (a tus PATCH keeps its prefix)."""


class RequestBody:
    def __init__(self, request: web.Request, idle_timeout: float, min_rate: int = 0, *,
                 from_socket: bool = True) -> None:
        self._request = request
        self._content = request.content
        self._content.set_read_chunk_size(BODY_READ_SIZE)
        self._idle = idle_timeout
        self._from_socket = from_socket
        self._stopped: BaseException | None = None
        self._taken: socket_body.TakenSocket | None = None
        self._pace = _Pace(min_rate, idle_timeout)
        self._last_byte = time.monotonic()

    def stop(self, exc: BaseException) -> None:
        """Make the body's next read raise ``exc`` (a reader waiting now wakes up with it)."""
        self._stopped = exc
        self._content.set_exception(exc)

    async def _next(self) -> bytes:
        """The next network piece (b"" at the end), within the idle deadline."""
        try:
            return await asyncio.wait_for(self._content.readany(), self._idle)
        except TimeoutError:
            raise E.BODY_TIMEOUT(seconds=self._idle) from None

    async def pieces(self) -> AsyncIterator[bytes]:
        """The body's network pieces through aiohttp, as they come, within the idle deadline
        and the minimum rate (408 ``body_timeout`` / ``body_too_slow``)."""
        while data := await self._next():
            self._pace.seen(len(data))
            yield data

    def _read(self, view: memoryview) -> int:
        """The worker thread's read of the taken socket, with the same deadlines."""
        assert self._taken is not None
        while True:
            if self._stopped is not None:
                raise self._stopped
            try:
                n = self._taken.recv_into(view)
            except TimeoutError:
                if time.monotonic() - self._last_byte > self._idle:
                    raise E.BODY_TIMEOUT(seconds=self._idle) from None
                continue
            except OSError:  # reset or given back: the body ends here
                return 0
            if n:
                self._last_byte = time.monotonic()
                self._pace.seen(n)
            return n

    async def copy_into(self, writer: RangeWriter, *, limit: int,
                        too_long: Callable[[], Exception], every: float | None = None,
                        checkpoint: Callable[[], Awaitable[None]] | None = None) -> int:
        """Move the body into ``writer``, at most ``limit`` bytes (``too_long()`` is raised past
        it); with ``checkpoint``, await it about every ``every`` seconds while the body lasts.
        Returns the bytes moved. A body that ends before its ``Content-Length`` raises (what
        came of it is in the writer, not committed)."""
        length = self._request.content_length
        taken = None
        if self._from_socket and length is not None and length <= limit:
            taken = socket_body.take(self._request, length)
        if taken is None:
            return await self._copy_pieces(self.pieces(), writer, limit, too_long, every,
                                           checkpoint)
        self._taken = taken
        whole = False
        try:
            total = await self._copy_pieces(_listed(taken.prefix), writer, limit, too_long,
                                            every, checkpoint)
            remaining = taken.remaining
            self._last_byte = time.monotonic()
            while remaining:
                n, ended = await writer.fill_from(self._read, remaining,
                                                  seconds=every if checkpoint else None)
                total += n
                remaining -= n
                if ended:  # as aiohttp says it: the middleware answers 400 invalid_body
                    raise web.RequestPayloadError(
                        f"the body ended {remaining} bytes before its Content-Length")
                if checkpoint is not None and remaining:
                    await checkpoint()
            whole = True
            return total
        finally:
            if self._stopped is None:  # a worker still reading (cancelled) stops at its next read
                self._stopped = RequestEnded()
            taken.give_back(whole)

    async def _copy_pieces(self, pieces: AsyncIterator[bytes], writer: RangeWriter | None,
                           limit: int, too_long: Callable[[], Exception], every: float | None,
                           checkpoint: Callable[[], Awaitable[None]] | None) -> int:
        total = 0
        last = time.monotonic()
        async for data in pieces:
            total += len(data)
            if total > limit:
                raise too_long()
            if writer is not None:
                await writer.write(data)
            if checkpoint is not None and every is not None and time.monotonic() - last >= every:
                await checkpoint()
                last = time.monotonic()
        return total

    async def copy_to(self, writer: RangeWriter, length: int, index: int) -> None:
        total = await self.copy_into(
            writer, limit=length, too_long=lambda: E.CHUNK_TOO_LONG(chunk_index=index,
                                                                      expected_bytes=length))
        _check_whole(total, length, index)

    async def drain(self, length: int, index: int) -> None:
        total = await self._copy_pieces(
            self.pieces(), None, length,
            lambda: E.CHUNK_TOO_LONG(chunk_index=index, expected_bytes=length), None, None)
        _check_whole(total, length, index)


def _check_whole(total: int, length: int, index: int) -> None:
    if total < length:
        raise E.CHUNK_INCOMPLETE(chunk_index=index, expected_bytes=length, received_bytes=total)


async def _listed(items: list[bytes]) -> AsyncIterator[bytes]:
    for item in items:
        yield item


class BodySlots:
    """How many chunk bodies are being read right now, at most ``limit`` (per process) and at
    most ``per_client`` for one client: each holds buffers, so this bounds the memory all
    uploads use together, and one client cannot take every slot."""

    def __init__(self, limit: int, per_client: int | None = None) -> None:
        self.limit = limit
        self.per_client = per_client or limit
        self.active = 0
        self._held: dict[str, int] = {}

    def take(self, client: str) -> bool:
        held = self._held.get(client, 0)
        if self.active >= self.limit or held >= self.per_client:
            return False
        self.active += 1
        self._held[client] = held + 1
        return True

    def give(self, client: str) -> None:
        self.active -= 1
        held = self._held.pop(client) - 1
        if held:
            self._held[client] = held
