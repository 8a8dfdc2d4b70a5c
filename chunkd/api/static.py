"""The browser side, served by chunkd itself: the upload page at ``/``, the ES module it uses
(``/static/chunkd.js``) with its TypeScript types, and ``GET /upload/chunked/limits``, which
tells a client the chunk sizes to use before it creates a session.

Only the files named in :data:`FILES` are served (no path from the request reaches the file
system); each is read once, on first use.
"""

from __future__ import annotations

import functools
from importlib import resources

from aiohttp import web

from chunkd import errors as E
from chunkd.api.middleware import expect_handler
from chunkd.keys import AUTH, CONFIG, STORE
from chunkd.validate import max_chunk_size, min_chunk_size

routes = web.RouteTableDef()

#: name under /static/ -> content type. ``index.html`` is the page at ``/``.
FILES = {
    "index.html": "text/html; charset=utf-8",
    "chunkd.js": "text/javascript; charset=utf-8",
    "chunkd.d.ts": "text/plain; charset=utf-8",  # what browsers show; editors read it by name
    "page.js": "text/javascript; charset=utf-8",
    "page.css": "text/css; charset=utf-8",
}
#: The page loads only itself: no CDN, no inline script.
PAGE_POLICY = ("default-src 'self'; connect-src 'self'; img-src 'self' data:; "
               "style-src 'self'; script-src 'self'; object-src 'none'; base-uri 'none'; "
               "form-action 'none'; frame-ancestors 'none'")


@functools.cache
def _read(name: str) -> bytes | None:
    try:
        return (resources.files("chunkd") / "static" / name).read_bytes()
    except (FileNotFoundError, OSError):
        return None


def _file(name: str) -> web.Response:
    body = _read(name) if name in FILES else None
    if body is None:
        raise E.NOT_FOUND()
    resp = web.Response(body=body, headers={"Content-Type": FILES[name],
                                            "Cache-Control": "no-cache",
                                            "X-Content-Type-Options": "nosniff"})
    if name.endswith(".html"):
        resp.headers["Content-Security-Policy"] = PAGE_POLICY
    return resp


@routes.get("/", expect_handler=expect_handler)
async def page(request: web.Request) -> web.Response:
    return _file("index.html")


@routes.get("/static/{name}", expect_handler=expect_handler)
async def static_file(request: web.Request) -> web.Response:
    return _file(request.match_info["name"])


@routes.get("/upload/chunked/limits", expect_handler=expect_handler)
async def limits(request: web.Request) -> web.Response:
    """What a client needs before it creates a session (no credential needed: nothing here is
    a secret, and the page shows it before anyone signs in)."""
    config = request.app[CONFIG]
    store_limits = request.app[STORE].limits
    doc = {
        "chunk_size": config.chunk_size,
        "min_chunk_size": min_chunk_size(config, store_limits),
        "max_chunk_size": max_chunk_size(config, store_limits),
        "max_chunks": store_limits.max_parts,
        "max_file_size": config.max_file_size,
        "allowed_extensions": sorted(config.allowed_extensions),
        "auth": request.app.get(AUTH) is not None,
        "handoff": config.handoff,
    }
    return web.json_response(doc)
