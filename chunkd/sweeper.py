"""The sweeper: every ``sweep_interval`` seconds, remove expired sessions and their bytes."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator

from aiohttp import web

from chunkd.keys import CONFIG, STORE

log = logging.getLogger("chunkd.sweeper")


async def sweep_forever(app: web.Application) -> None:
    store, interval = app[STORE], app[CONFIG].sweep_interval
    while True:
        try:
            removed = await store.sweep(time.time(), busy=set(store.inflight))
            if removed:
                log.info("swept %d expired session(s): %s", len(removed), ", ".join(removed))
        except Exception:  # a bad sweep must not stop the next one
            log.exception("sweep failed")
        await asyncio.sleep(interval)


async def sweeper_ctx(app: web.Application) -> AsyncIterator[None]:
    """``cleanup_ctx`` entry: run the sweeper while the app runs."""
    task = asyncio.create_task(sweep_forever(app))
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
