"""``make_app(config)``: the aiohttp application, wired from its parts."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from aiohttp import web
from aiohttp.typedefs import Middleware

from chunkd.api.body import BodySlots
from chunkd.api.cors import cors_middleware
from chunkd.api.middleware import errors_middleware, quiet_client_faults, server_header
from chunkd.api.ratelimit import RateLimiter, rate_limit_middleware
from chunkd.api.static import routes as static_routes
from chunkd.api.tus import add_routes as add_tus_routes
from chunkd.api.uploads import routes as upload_routes
from chunkd.api.ws import routes as ws_routes
from chunkd.api.ws_proxy import Relay, service_ws_url
from chunkd.auth import make_authenticator
from chunkd.config import Config
from chunkd.core.periodic import Periodic
from chunkd.core.quotas import Quotas
from chunkd.core.recovery import recover_once
from chunkd.core.sweeper import sweep
from chunkd.core.tasks import TaskRunner
from chunkd.drain import Drain
from chunkd.handoff import make_handoff
from chunkd.keys import (
    AUTH,
    BODY_SLOTS,
    CONFIG,
    DRAIN,
    HUB,
    QUOTAS,
    RELAYS,
    RUNNER,
    SERVICE_WS,
    STORE,
)
from chunkd.progress import ProgressHub
from chunkd.store import FileSystemStore, SessionStore
from chunkd.validate import warm_up

#: How often each process looks for interrupted finalizes and orphaned tasks.
RECOVERY_INTERVAL = 5.0


async def _background_ctx(app: web.Application) -> AsyncIterator[None]:
    """The sweeper and recovery run while the app runs; hand-offs stop on the way out (their
    leases go stale and a restart resumes them)."""
    await asyncio.to_thread(warm_up)  # libmagic's database, before any finalize needs it
    store, runner = app[STORE], app[RUNNER]
    jobs = [
        Periodic("sweeper", app[CONFIG].sweep_interval,
                 lambda: sweep(store, store.clock(), idle_ttl=app[CONFIG].idle_session_ttl)),
        Periodic("recovery", RECOVERY_INTERVAL, lambda: recover_once(store, runner)),
    ]
    for job in jobs:
        job.start()
    yield
    for job in jobs:
        await job.stop()
    await runner.close()


async def _close_sockets(app: web.Application) -> None:
    """on_shutdown: tell every WebSocket GOING_AWAY before aiohttp cancels the handlers."""
    await app[HUB].close()
    relays: set[Relay] = app[RELAYS]
    if relays:  # all at once: a peer that never answers its close costs its timeout once
        await asyncio.wait([asyncio.create_task(pair.shutdown()) for pair in relays], timeout=15)


def make_app(config: Config, store: SessionStore | None = None) -> web.Application:
    """Build the app for ``config``, on ``store`` (default: the file-system store in
    ``config.data_dir``, whose layout is created if it is not there)."""
    drain = Drain()
    quiet_client_faults()
    middlewares: list[Middleware] = [errors_middleware, drain.middleware]
    if config.rate_limit > 0:
        middlewares.append(rate_limit_middleware(RateLimiter(config.rate_limit,
                                                             config.rate_burst)))
    if config.cors_origins:
        middlewares.insert(0, cors_middleware(config.cors_origins))
    app = web.Application(middlewares=middlewares)
    if store is None:
        store = FileSystemStore(config.data_dir, durable=config.durable,
                                min_free=config.min_free_space,
                                idle_ttl=config.idle_session_ttl)
    hub = ProgressHub(store)
    app[CONFIG] = config
    app[DRAIN] = drain
    app[STORE] = store
    app[HUB] = hub
    app[RUNNER] = TaskRunner(store, make_handoff(config), hub)
    app[RELAYS] = set()
    app[BODY_SLOTS] = BodySlots(config.max_concurrent_chunks, config.max_chunks_per_client)
    app[QUOTAS] = Quotas(config.max_sessions_per_subject, config.max_reserved_bytes_per_subject,
                         config.max_reserved_bytes)
    authenticator = make_authenticator(config)
    if authenticator is not None:
        app[AUTH] = authenticator
    if config.handoff == "whisperx" and config.whisperx_ws_proxy and config.whisperx_url:
        app[SERVICE_WS] = service_ws_url(config.whisperx_url)
    app.add_routes(upload_routes)
    app.add_routes(static_routes)
    app.add_routes(ws_routes)
    if config.tus_path:
        add_tus_routes(app, config.tus_path)
    app.cleanup_ctx.append(_background_ctx)
    app.on_shutdown.append(_close_sockets)
    app.on_response_prepare.append(server_header)
    return app
