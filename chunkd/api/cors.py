"""CORS for browsers on another origin (local development, or a frontend on its own domain).

Off unless ``--cors-origins`` names the allowed origins (``*`` for any). Preflight ``OPTIONS``
requests are answered here; other answers get the ``Access-Control-*`` headers they need.
"""

from __future__ import annotations

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from chunkd.api import tus_wire

ALLOW_HEADERS = ", ".join((
    "Content-Type", "Content-Encoding", "X-Chunk-Checksum", "Authorization", "X-CSRF-Token",
    "X-WhisperX-Authorization", *tus_wire.REQUEST_HEADERS))
ALLOW_METHODS = "GET, POST, HEAD, PATCH, DELETE, OPTIONS"
#: Answer headers a page on another origin may read, by name (``*`` would not count with
#: credentials): chunkd's own, and tus's (tus-js-client reads Location, Upload-Offset, ...).
EXPOSE_HEADERS = ", ".join(("Retry-After", "WWW-Authenticate", *tus_wire.EXPOSE_HEADERS))


def cors_middleware(origins: frozenset[str]) -> Middleware:
    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        origin = request.headers.get("Origin")
        allowed = origin is not None and ("*" in origins or origin in origins)
        # Cookies only for origins named one by one, never for "*".
        credentials = origin is not None and origin in origins
        if request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
            resp: web.StreamResponse = web.Response(status=204 if allowed else 403)
            if allowed:
                resp.headers.update({
                    "Access-Control-Allow-Origin": origin or "",
                    "Access-Control-Allow-Methods": ALLOW_METHODS,
                    "Access-Control-Allow-Headers": ALLOW_HEADERS,
                    "Access-Control-Max-Age": "86400",
                    "Vary": "Origin",
                })
                if credentials:
                    resp.headers["Access-Control-Allow-Credentials"] = "true"
            return resp
        resp = await handler(request)
        if allowed and not resp.prepared:
            resp.headers["Access-Control-Allow-Origin"] = origin or ""
            resp.headers["Access-Control-Expose-Headers"] = EXPOSE_HEADERS
            resp.headers["Vary"] = "Origin"
            if credentials:
                resp.headers["Access-Control-Allow-Credentials"] = "true"
        return resp

    return middleware
