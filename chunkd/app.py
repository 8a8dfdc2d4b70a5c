"""``make_app(config)``: the aiohttp application, wired from its parts."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator

from aiohttp import web

from chunkd.api.cors import cors_middleware
from chunkd.api.middleware import errors_middleware
from chunkd.api.uploads import routes as upload_routes
from chunkd.api.ws import routes as ws_routes
from chunkd.config import Config
from chunkd.drain import Drain
from chunkd.finalize import finalize
from chunkd.handoff import make_handoff
from chunkd.keys import CONFIG, DRAIN, HUB, RUNNER, STORE
from chunkd.progress import ProgressHub
from chunkd.store.filesystem import FileSystemStore
from chunkd.sweeper import sweeper_ctx
from chunkd.tasks import TaskRunner
from chunkd.validate import warm_up


async def _tasks_ctx(app: web.Application) -> AsyncIterator[None]:
    """Resume unfinished tasks at start; stop them on the way out (a restart resumes them)."""
    await asyncio.to_thread(warm_up)  # libmagic's database, before any finalize needs it
    await app[RUNNER].open()
    yield
    await app[RUNNER].close()


async def _close_sockets(app: web.Application) -> None:
    """on_shutdown: tell every WebSocket GOING_AWAY before aiohttp cancels the handlers."""
    await app[HUB].close()


def make_app(config: Config) -> web.Application:
    """Build the app for ``config``; creates the data folder's layout if it is not there."""
    drain = Drain()
    middlewares = [errors_middleware, drain.middleware]
    if config.cors_origins:
        middlewares.insert(0, cors_middleware(config.cors_origins))
    app = web.Application(middlewares=middlewares)
    store = FileSystemStore(config.data_dir, durable=config.durable)
    hub = ProgressHub(store)
    app[CONFIG] = config
    app[DRAIN] = drain
    app[STORE] = store
    app[HUB] = hub
    runner = app[RUNNER] = TaskRunner(store, make_handoff(config), hub)
    runner.recover = functools.partial(finalize, store, runner)
    app.add_routes(upload_routes)
    app.add_routes(ws_routes)
    app.cleanup_ctx.append(sweeper_ctx)
    app.cleanup_ctx.append(_tasks_ctx)
    app.on_shutdown.append(_close_sockets)
    return app
