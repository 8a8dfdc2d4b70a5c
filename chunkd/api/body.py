"""Reading a chunk's body off the HTTP request: the one place that touches aiohttp's stream.

:class:`RequestBody` is the :class:`~chunkd.core.uploads.BodySource` of a request. It owns the
idle deadline (a body silent for ``idle_timeout`` is cut off with 408, the slow-loris guard), the
minimum average rate (a trickle is cut off too) and the length checks, and hands each network
piece to the store's range writer as it came (an owned ``bytes``: no copy in Python). A faster
reader (``recv_into`` the writer's lent buffers) replaces this class without touching the store.

Memory: the server reads every request with a small buffer (``cli.READ_BUFSIZE``), so a request
whose body nobody reads holds little; a chunk body that got one of the :class:`BodySlots` raises
it to :data:`BODY_READ_SIZE`. So buffered bytes are bounded by the connection cap times the small
buffer plus the slots times the large one.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from aiohttp import web

from chunkd import errors as E
from chunkd.store.base import RangeWriter

#: aiohttp reads a chunk body in pieces of up to 2x this before pausing the socket. Its default
#: (64 KiB) pauses and resumes the socket thousands of times a second at ~1 GB/s. Measured with
#: chunkd bench (1 GiB, 1 in flight, 5 runs): 256 KiB gave +16% (durable off) and +7% (on) with
#: peak RSS for 16 parallel chunks at ~85 MiB; 512 KiB gave +37% / +25% but ~105 MiB.
BODY_READ_SIZE = 256 * 1024


class RequestBody:
    def __init__(self, request: web.Request, idle_timeout: float, min_rate: int = 0) -> None:
        self._content = request.content
        self._content.set_read_chunk_size(BODY_READ_SIZE)
        self._idle = idle_timeout
        self._min_rate = min_rate
        self._loop = asyncio.get_running_loop()

    def stop(self, exc: BaseException) -> None:
        """Make the body's next read raise ``exc`` (a reader waiting now wakes up with it)."""
        self._content.set_exception(exc)

    async def _next(self) -> bytes:
        """The next network piece (b"" at the end), within the idle deadline."""
        try:
            return await asyncio.wait_for(self._content.readany(), self._idle)
        except TimeoutError:
            raise E.BODY_TIMEOUT(seconds=self._idle) from None

    async def pieces(self) -> AsyncIterator[bytes]:
        """The body's network pieces as they come, within the idle deadline and the minimum
        rate (408 ``body_timeout`` / ``body_too_slow``)."""
        total = 0
        # The rate is checked per window of ``idle_timeout`` seconds, not on average since the
        # start: a body cannot send fast first and then trickle for hours.
        window_start, window_bytes = self._loop.time(), 0
        while data := await self._next():
            total += len(data)
            window_bytes += len(data)
            elapsed = self._loop.time() - window_start
            if self._min_rate and elapsed > self._idle:
                if window_bytes < self._min_rate * elapsed:
                    raise E.BODY_TOO_SLOW(min_rate=self._min_rate, received_bytes=total,
                                          seconds=round(elapsed))
                window_start, window_bytes = self._loop.time(), 0
            yield data

    async def _each(self, length: int, index: int, sink: RangeWriter | None) -> None:
        total = 0
        async for data in self.pieces():
            total += len(data)
            if total > length:
                raise E.CHUNK_TOO_LONG(chunk_index=index, expected_bytes=length)
            if sink is not None:
                await sink.write(data)
        if total < length:
            raise E.CHUNK_INCOMPLETE(chunk_index=index, expected_bytes=length,
                                     received_bytes=total)

    async def copy_to(self, writer: RangeWriter, length: int, index: int) -> None:
        await self._each(length, index, writer)

    async def drain(self, length: int, index: int) -> None:
        await self._each(length, index, None)


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
