"""One middleware turns every error into chunkd's JSON error shape; no trace ever leaks."""

from __future__ import annotations

import asyncio
import errno
import logging
from http import HTTPStatus
from typing import Any, cast

import orjson
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.typedefs import Handler
from aiohttp.web_protocol import RequestHandler, RequestPayloadError
from aiohttp.web_request import BaseRequest

from chunkd import errors as E
from chunkd.api.access import address_key, trusted
from chunkd.api.tus_wire import add_tus_headers, for_tus_client, is_tus, method_of
from chunkd.core.tus import StopRequested
from chunkd.errors import ChunkdError, ErrorCode
from chunkd.keys import CONFIG

log = logging.getLogger("chunkd")

#: The ``Server`` header of every answer: no version of Python or aiohttp for scanners.
SERVER_NAME = "chunkd"


async def server_header(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: replace aiohttp's ``Server: Python/3.x aiohttp/3.y``."""
    response.headers["Server"] = SERVER_NAME

#: aiohttp's own HTTP errors (unknown route, wrong method, body over client_max_size, ...).
_HTTP_CODES = {e.status: e for e in (E.BAD_REQUEST, E.NOT_FOUND, E.METHOD_NOT_ALLOWED,
                                     E.TOO_LARGE)}


def error_response(exc: ChunkdError) -> web.Response:
    """The JSON API's rendering of an error: its status, ``{"error": {code, message, ...}}``."""
    try:
        body = orjson.dumps(exc.to_json())
    except TypeError:  # a detail JSON cannot hold (e.g. an integer past 64 bits): drop details
        body = orjson.dumps({"error": {"code": exc.code, "message": exc.message}})
    resp = web.Response(status=exc.status, body=body, content_type="application/json")
    if "retry_after" in exc.details:  # the one place a Retry-After is set
        resp.headers["Retry-After"] = str(exc.details["retry_after"])
    if exc.status == 401:  # RFC 6750: say which scheme, and why
        reason = "invalid_token" if exc.code in ("invalid_token", "token_expired") else ""
        resp.headers["WWW-Authenticate"] = 'Bearer realm="chunkd"' + (
            f', error="{reason}"' if reason else "")
    return resp


async def expect_handler(request: web.Request) -> web.StreamResponse | None:
    """``Expect:`` runs before any middleware: ``100-continue`` as aiohttp does, anything else a
    JSON 417 that does not echo the header (aiohttp's own is text/plain and quotes it)."""
    expect = request.headers.get("Expect", "")
    if expect.lower() == "100-continue":
        if request.version >= (1, 1):
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        return None
    resp = error_response(E.EXPECTATION_FAILED())
    resp.force_close()  # the body that may follow is not read
    return resp


def _aiohttp_error(status: int, message: str, other: ErrorCode = E.HTTP_ERROR) -> ChunkdError:
    """One of aiohttp's own errors, with its status; a status without a code of its own gets
    ``other``'s code."""
    return ChunkdError(_HTTP_CODES.get(status, other).code, status, message, {})


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every error as JSON; on the tus path also as a tus client must see it (``Tus-Resumable``,
    and statuses it acts on rightly: :func:`chunkd.api.tus_wire.for_tus_client`)."""
    tus = is_tus(request, request.app[CONFIG].tus_path)
    try:
        resp = await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        resp = _render(request, _aiohttp_error(exc.status, exc.reason), tus)
        if "Allow" in exc.headers:  # a 405 must say which methods are allowed
            resp.headers["Allow"] = exc.headers["Allow"]
    except ChunkdError as exc:
        if exc.status >= 500 and exc.status != 507:
            log.error("%s %s: %s", request.method, request.path, exc.message)
        resp = _render(request, exc, tus)
    except Exception as exc:  # noqa: BLE001 (every error gets an answer; unknown ones a 500)
        resp = _render(request, _as_error(request, exc), tus)
    if tus and not resp.prepared:
        add_tus_headers(resp, resp.status)
    return resp


def _render(request: web.Request, exc: ChunkdError, tus: bool) -> web.Response:
    if tus:
        exc = for_tus_client(method_of(request), exc)
    resp = error_response(exc)
    if exc.status == 408 or exc.code in ("invalid_body", "body_stalled", "server_busy"):
        # A body too slow, silent, unreadable or not read at all (busy): the rest of it is not
        # waited for, so the client must not reuse the connection.
        resp.force_close()
    return resp


def _as_error(request: web.Request, exc: Exception) -> ChunkdError:
    """Any exception a handler raised, as one of the table's errors (logged once)."""
    if isinstance(exc, HttpProcessingError | RequestPayloadError):
        # The body could not be decoded (bad Content-Encoding, broken chunked framing, ...).
        log.info("%s %s: unreadable body (%s)", request.method, request.path, exc)
        return E.INVALID_BODY()
    if isinstance(exc, OSError):
        if isinstance(exc, ConnectionError):
            # The client went away mid-body; nothing was counted and nobody is left to answer.
            log.info("%s %s: client disconnected (%s)", request.method, request.path, exc)
            return E.CLIENT_DISCONNECTED()
        if exc.errno in (errno.EMFILE, errno.ENFILE):
            log.warning("%s %s: out of file descriptors", request.method, request.path)
            return E.SERVER_BUSY(retry_after=5)
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            log.warning("%s %s: the data dir is full", request.method, request.path)
            return E.INSUFFICIENT_STORAGE(reason="the disk is full")
        if exc.errno in (errno.EROFS, errno.EIO):
            log.error("%s %s: the data dir cannot be written (%s)", request.method, request.path,
                      exc.strerror)
            return E.STORAGE_UNAVAILABLE(retry_after=30)
    log.exception("%s %s failed", request.method, request.path)
    return E.INTERNAL_ERROR()


#: Seconds a client turned away for being over a connection cap is asked to wait.
BUSY_RETRY_AFTER = 2
#: A connection closed by the server but still there this long after (its peer reads nothing of
#: what is buffered) is aborted; closing ones are looked for every REAP_INTERVAL seconds.
CLOSE_GRACE = 10.0
REAP_INTERVAL = 2.0


def _busy_reply() -> bytes:
    """The whole HTTP answer given to a connection over the cap, before it sent anything."""
    exc = E.SERVER_BUSY(retry_after=BUSY_RETRY_AFTER)
    body = orjson.dumps(exc.to_json())
    head = (f"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nRetry-After: {BUSY_RETRY_AFTER}\r\n"
            f"Server: {SERVER_NAME}\r\nConnection: close\r\n\r\n")
    return head.encode() + body


_BUSY = _busy_reply()


class _ClientFaultsOnOneLine(logging.Filter):
    """aiohttp reads on (and fails again) after an undecodable body was answered, and logs that
    as an "Unhandled exception" with tracebacks: a client's fault, so one INFO line instead."""

    FAULTS = (HttpProcessingError, RequestPayloadError)

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, StopRequested):  # the rest of a stale tus PATCH, which was stopped
            log.info("the rest of a stopped PATCH's body was not read")
            return False
        if isinstance(exc, self.FAULTS) or isinstance(getattr(exc, "__cause__", None),
                                                      self.FAULTS):
            log.info("unreadable request body: %s", type(exc).__name__)
            return False
        return True


def quiet_client_faults() -> None:
    """Install :class:`_ClientFaultsOnOneLine` on aiohttp's server logger (once)."""
    server_log = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, _ClientFaultsOnOneLine) for f in server_log.filters):
        server_log.addFilter(_ClientFaultsOnOneLine())


class _JsonErrorRequestHandler(RequestHandler):
    """aiohttp answers requests it cannot parse (a request line over 8190 bytes, a broken header)
    before any middleware runs, in text/plain and echoing the input; chunkd answers in JSON.
    A new connection that sends no whole request head within ``header_timeout`` is closed; one
    beyond ``max_connections`` open ones gets 503 ``server_busy`` at once and is closed."""

    header_timeout: float = 0.0
    max_connections: int = 0
    #: Most connections one untrusted peer address (an IPv6 /64) may hold (0: no cap); the
    #: trusted proxies (Cloudflare) carry many users each and are not capped.
    max_per_address: int = 0
    trusted_proxies: tuple[str, ...] = ()
    per_address: dict[str, int] | None = None  # shared by every handler of the server
    _address_key: str | None = None

    def _refuse(self, transport: asyncio.BaseTransport, why: str) -> None:
        # The answer goes out before the request is read; the connection is then closed.
        log.info("connection from %s refused: %s", transport.get_extra_info("peername"), why)
        tcp = cast(asyncio.Transport, transport)  # uvloop's is no asyncio.Transport subclass
        tcp.write(_BUSY)
        tcp.close()

    def _take_address_place(self, transport: asyncio.BaseTransport) -> bool:
        peer = transport.get_extra_info("peername")
        if not self.max_per_address or self.per_address is None or not peer:
            return True
        if self.trusted_proxies and trusted(peer[0], self.trusted_proxies):
            return True
        key = address_key(peer[0]) or peer[0]
        held = self.per_address.get(key, 0)
        if held >= self.max_per_address:
            return False
        self.per_address[key] = held + 1
        self._address_key = key
        return True

    def connection_lost(self, exc: BaseException | None) -> None:
        key, self._address_key = self._address_key, None
        if key is not None and self.per_address is not None:
            left = self.per_address.pop(key, 1) - 1
            if left > 0:
                self.per_address[key] = left
        super().connection_lost(exc)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        manager = self._manager
        # Each connection holds a descriptor and up to one socket read of buffered body: the
        # caps bound both.
        if self.max_connections and manager is not None and (
            len(manager.connections) > self.max_connections
        ):
            self._refuse(transport, f"{len(manager.connections) - 1} open")
            return
        if not self._take_address_place(transport):
            self._refuse(transport, f"{self.max_per_address} open from that address")
            return
        if self.header_timeout > 0:
            # aiohttp closes an idle connection at its keep-alive deadline, which it also sets
            # for a new connection: a new one gets the (shorter) header deadline instead.
            self._next_keepalive_close_time = self._loop.time() + self.header_timeout
            if self._keepalive_handle is not None:
                self._keepalive_handle.cancel()
            self._keepalive_handle = self._loop.call_at(self._next_keepalive_close_time,
                                                        self._process_keepalive)

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        # A bad request from the internet is one short line: no traceback, no echo of the input
        # (aiohttp's own would log a traceback each time and quote up to 8 KB of the request).
        if status >= 500:
            log.error("error handling a request from %s", request.remote, exc_info=exc)
        else:
            log.info("unparseable request from %s: %s", request.remote,
                     type(exc).__name__ if exc else status)
        if request.writer.output_size > 0:  # some of an answer went out: the connection is done
            raise ConnectionError("response already started; cannot send the error")
        if status >= 500:
            resp = error_response(E.INTERNAL_ERROR())
        else:
            phrase = HTTPStatus(status).phrase if status in HTTPStatus._value2member_map_ else ""
            text = f"the HTTP request could not be parsed ({phrase or status})"
            resp = error_response(_aiohttp_error(status, text, E.BAD_REQUEST))
        resp.headers["Server"] = SERVER_NAME
        resp.force_close()
        return resp


class _JsonErrorServer(web.Server):
    #: Seconds a new connection has to send its first request's headers (set by the runner).
    header_timeout: float = 0.0
    #: Most open connections (0: no cap), and per untrusted peer address.
    max_connections: int = 0
    max_per_address: int = 0
    trusted_proxies: tuple[str, ...] = ()
    per_address: dict[str, int] | None = None

    def __call__(self) -> RequestHandler:
        handler = _JsonErrorRequestHandler(self, loop=self._loop, **self._kwargs)
        handler.header_timeout = self.header_timeout
        handler.max_connections = self.max_connections
        handler.max_per_address = self.max_per_address
        handler.trusted_proxies = self.trusted_proxies
        handler.per_address = self.per_address
        return handler


class JsonErrorAppRunner(web.AppRunner):
    """An ``AppRunner`` whose unparseable-request errors are JSON too, and whose connections
    must send their first request's headers within ``header_timeout`` seconds (0: only
    aiohttp's keep-alive timeout), so idle sockets cannot pile up until the fd limit, and at
    most ``max_connections`` of which are open at once (0: no cap)."""

    def __init__(self, app: web.Application, *, header_timeout: float = 0.0,
                 max_connections: int = 0, max_per_address: int = 0,
                 trusted_proxies: tuple[str, ...] = (), **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self.header_timeout = header_timeout
        self.max_connections = max_connections
        self.max_per_address = max_per_address
        self.trusted_proxies = trusted_proxies
        self._reaper: asyncio.Task[None] | None = None

    async def _cleanup_server(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
        await super()._cleanup_server()

    async def _reap(self, server: web.Server) -> None:
        """Abort connections that were closed but never went away. A graceful close waits for
        the peer to read what is still buffered; a peer that never reads (a zero TCP window)
        would keep the connection, and its place under the cap, for ever."""
        closing_since: dict[asyncio.Transport, float] = {}
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(REAP_INTERVAL)
            now = loop.time()
            live = set()
            for handler in server.connections:
                transport = handler.transport
                if transport is None or not transport.is_closing():
                    continue
                live.add(transport)
                since = closing_since.setdefault(transport, now)
                if now - since >= CLOSE_GRACE:
                    log.info("aborting a connection whose peer does not read")
                    transport.abort()
            for gone in [t for t in closing_since if t not in live]:
                del closing_since[gone]

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        self._reaper = asyncio.get_running_loop().create_task(self._reap(server))
        server.__class__ = _JsonErrorServer  # same object, only the handler class differs
        assert isinstance(server, _JsonErrorServer)
        server.header_timeout = self.header_timeout
        server.max_connections = self.max_connections
        server.max_per_address = self.max_per_address
        server.trusted_proxies = self.trusted_proxies
        server.per_address = {}
        return server


