"""``make_app(config)``: the aiohttp application, wired from its parts."""

from __future__ import annotations

from aiohttp import web

from chunkd.api.middleware import errors_middleware
from chunkd.api.uploads import routes as upload_routes
from chunkd.config import Config
from chunkd.drain import Drain
from chunkd.handoff.folder import FolderHandoff
from chunkd.keys import CONFIG, DRAIN, HANDOFF, STORE
from chunkd.store.filesystem import FileSystemStore
from chunkd.sweeper import sweeper_ctx


def make_app(config: Config) -> web.Application:
    """Build the app for ``config``; creates the data folder's layout if it is not there."""
    drain = Drain()
    app = web.Application(middlewares=[errors_middleware, drain.middleware])
    app[CONFIG] = config
    app[DRAIN] = drain
    app[STORE] = FileSystemStore(config.data_dir, durable=config.durable)
    app[HANDOFF] = FolderHandoff(config.data_dir / "completed")
    app.add_routes(upload_routes)
    app.cleanup_ctx.append(sweeper_ctx)
    return app
