"""Reading a chunk's body off the HTTP request: the one place that touches aiohttp's stream.

:class:`RequestBody` is the :class:`~chunkd.core.uploads.BodySource` of a request. It owns the
idle deadline (a body silent for ``idle_timeout`` is cut off with 408, the slow-loris guard) and
the length checks, and hands each network piece to the store's range writer as it came (an
owned ``bytes``: no copy in Python). A faster reader (``recv_into`` the writer's lent buffers)
replaces this class without touching the store.
"""

from __future__ import annotations

import asyncio

from aiohttp import web

from chunkd import errors as E
from chunkd.store.base import RangeWriter


class RequestBody:
    def __init__(self, request: web.Request, idle_timeout: float) -> None:
        self._content = request.content
        self._idle = idle_timeout

    async def _next(self) -> bytes:
        """The next network piece (b"" at the end), within the idle deadline."""
        try:
            return await asyncio.wait_for(self._content.readany(), self._idle)
        except TimeoutError:
            raise E.BODY_TIMEOUT(seconds=self._idle) from None

    async def _each(self, length: int, index: int, sink: RangeWriter | None) -> None:
        total = 0
        while data := await self._next():
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
    """How many chunk bodies are being read right now, at most ``limit`` (per process): each
    holds buffers, so this bounds the memory all uploads use together."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.active = 0

    def take(self) -> bool:
        if self.active >= self.limit:
            return False
        self.active += 1
        return True

    def give(self) -> None:
        self.active -= 1
