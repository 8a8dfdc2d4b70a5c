"""One middleware turns every error into chunkd's JSON error shape; no trace ever leaks."""

from __future__ import annotations

import logging

import orjson
from aiohttp import web
from aiohttp.typedefs import Handler

from chunkd.errors import ChunkdError

log = logging.getLogger("chunkd")

#: aiohttp's own HTTP errors (unknown route, wrong method, body over client_max_size, ...).
_HTTP_CODES = {
    400: "bad_request",
    404: "not_found",
    405: "method_not_allowed",
    413: "too_large",
}


def error_response(status: int, code: str, message: str, **details: object) -> web.Response:
    body = {"error": {"code": code, "message": message, **details}}
    return web.Response(status=status, body=orjson.dumps(body), content_type="application/json")


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ChunkdError as exc:
        if exc.status >= 500 and exc.status != 507:
            log.error("%s %s: %s", request.method, request.path, exc.message)
        return web.Response(
            status=exc.status, body=orjson.dumps(exc.to_json()), content_type="application/json"
        )
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = _HTTP_CODES.get(exc.status, "http_error")
        return error_response(exc.status, code, exc.reason)
    except ConnectionError as exc:
        # The client went away mid-body; nothing was counted and nobody is left to answer.
        log.info("%s %s: client disconnected (%s)", request.method, request.path, exc)
        return error_response(400, "client_disconnected", "the connection was closed")
    except Exception:
        log.exception("%s %s failed", request.method, request.path)
        return error_response(500, "internal_error", "an internal error occurred")
