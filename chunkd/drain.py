"""Graceful shutdown: stop taking requests, let the ones in flight finish, then stop.

aiohttp's own shutdown stops reading request bodies as soon as it starts (a connection being
closed drops incoming data), so a chunk half-way through its body could only time out. chunkd
therefore drains first: the listening socket is closed, new requests on open connections get a
503 ``shutting_down``, and requests already running (chunk bodies included) get up to
``shutdown_timeout`` to finish. Whatever is still running after that is cancelled, once, and
given :data:`CANCEL_GRACE` seconds to clean up (its shielded steps: a tus PATCH keeps what it
wrote, a data file is closed) before aiohttp's own shutdown; a cancelled chunk never got its
marker, so it is simply missing, never counted half-written.
"""

from __future__ import annotations

import asyncio
import contextlib

from aiohttp import web
from aiohttp.typedefs import Handler

from chunkd import errors as E

#: Seconds a request cancelled at shutdown has to finish its clean-up.
CANCEL_GRACE = 5.0


class Drain:
    """Counts requests in flight and refuses new ones once draining started."""

    def __init__(self) -> None:
        self.draining = False
        self.active = 0
        self._idle: asyncio.Event | None = None
        self._tasks: set[asyncio.Task[object]] = set()

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if self.draining:
            raise E.SHUTTING_DOWN()
        if request.headers.get("Upgrade", "").lower() == "websocket":
            # Sockets live long; they are closed by the hub at shutdown, not waited for.
            return await handler(request)
        self.active += 1
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            return await handler(request)
        finally:
            if task is not None:
                self._tasks.discard(task)
            self.active -= 1
            if self.active == 0 and self._idle is not None:
                self._idle.set()

    async def wait(self, timeout: float) -> bool:
        """Start draining; wait up to ``timeout`` s for requests in flight. True if all finished."""
        self.draining = True
        self._idle = asyncio.Event()
        if self.active == 0:
            return True
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._idle.wait(), timeout)
        return self.active == 0

    async def cancel(self, grace: float = CANCEL_GRACE) -> None:
        """Cancel the requests still running, once each, and wait up to ``grace`` s for them to
        clean up (aiohttp's shutdown would cancel them again and not wait)."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=grace)
