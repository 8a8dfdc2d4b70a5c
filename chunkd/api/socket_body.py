"""Taking a request body off aiohttp, straight from the socket: the one place that knows
aiohttp's connection internals (aiohttp 3.14: its protocol, parser and payload stream).

aiohttp parses the request line and headers as usual. For a large body of known length, sent
as is (``Content-Length``, no ``Transfer-Encoding``, no ``Content-Encoding``, plain TCP), the
handler then takes the rest of the body off the connection::

    payload stream ──► prefix (what aiohttp already read; its parser's held-back bytes too)
    transport.pause_reading()
    socket ──recv_into──► the range writer's buffer ──pwrite──► disk   (one worker thread)
    body whole: a fresh HTTP parser, transport.resume_reading()  (keep-alive, pipelining)
    body cut:   the connection closes after the response        (its parser is mid-body)

The worker reads a ``dup`` of the socket's descriptor (the connection's own descriptor may be
closed by aiohttp meanwhile, and its number reused), never past the body's last byte, so a
pipelined request behind the body stays in the kernel for the fresh parser.
"""

from __future__ import annotations

import os
import socket
import threading
from typing import Any

from aiohttp import web

#: A body with fewer bytes than this left on the wire is read through aiohttp as usual.
MIN_DIRECT_BYTES = 1024 * 1024
#: How long one blocking read waits before the reader looks at its stop flag and idle clock.
POLL_SECONDS = 0.2


class TakenSocket:
    """The rest of a request body, read from the socket with :meth:`recv_into` (blocking, in a
    worker thread), then given back to aiohttp with :meth:`give_back`."""

    def __init__(self, request: web.Request, prefix: list[bytes], remaining: int) -> None:
        self._request = request
        self.prefix = prefix
        self.remaining = remaining
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        self._closing = False
        if remaining:
            transport = request.transport
            assert transport is not None
            fd = transport.get_extra_info("socket").fileno()
            self._sock = socket.socket(fileno=os.dup(fd))
            self._sock.settimeout(POLL_SECONDS)  # the shared description stays non-blocking
            transport.pause_reading()

    def recv_into(self, view: memoryview) -> int:
        """One read of at most ``len(view)`` bytes; raises ``TimeoutError`` after
        :data:`POLL_SECONDS` of silence and ``ConnectionError`` once given back."""
        with self._lock:
            try:
                if self._closing or self._sock is None:
                    raise ConnectionAbortedError("the body's socket was given back")
                return self._sock.recv_into(view)
            finally:
                if self._closing:
                    self._close()

    def _close(self) -> None:
        if self._sock is not None:
            self._sock.close()  # the dup only: the connection is aiohttp's

    def give_back(self, whole: bool) -> None:
        """Hand the connection back to aiohttp: with a fresh parser if the body was read to its
        last byte, else marked to close after the response. Safe to call while a worker thread
        is still inside :meth:`recv_into`: it then closes the dup on its way out."""
        content = self._request.content
        protocol: Any = self._request.protocol
        if self._sock is not None:
            self._closing = True
            if self._lock.acquire(blocking=False):
                try:
                    self._close()
                finally:
                    self._lock.release()
            if whole and protocol.transport is not None:
                _fresh_parser(protocol)
                protocol.transport.resume_reading()
            else:
                protocol.close()  # the old parser is mid-body: this connection is done
        content.feed_eof()  # the handler has the body; aiohttp must not wait to drain it


def take(request: web.Request, content_length: int | None) -> TakenSocket | None:
    """Take the rest of ``request``'s body off aiohttp, or None when it must stay there (small,
    encoded, chunked, TLS, or aiohttp's state is not the one this module knows)."""
    if content_length is None or not _plain(request):
        return None
    content = request.content
    if content_length - content.total_bytes < MIN_DIRECT_BYTES:
        return None
    prefix = []
    # What the stream holds; taking it lets the parser feed its held-back bytes: take those too.
    while data := content.read_nowait():
        prefix.append(data)
    if content.is_eof():  # the parser had the whole body: it stays in charge
        return TakenSocket(request, prefix, 0)
    return TakenSocket(request, prefix, content_length - content.total_bytes)


def _plain(request: web.Request) -> bool:
    headers = request.headers
    if "Transfer-Encoding" in headers:
        return False
    if headers.get("Content-Encoding", "identity").strip().lower() != "identity":
        return False
    protocol: Any = request.protocol
    transport = request.transport
    if transport is None or transport.get_extra_info("sslcontext") is not None:
        return False
    sock = transport.get_extra_info("socket")
    if sock is None or sock.type != socket.SOCK_STREAM:
        return False
    content: Any = request.content
    try:
        return (protocol._parser is not None and not protocol._messages
                and not protocol._upgraded and protocol._payload_parser is None
                and content.exception() is None and content._waiter is None
                and not content.is_eof())
    except AttributeError:  # another aiohttp: keep to its public path
        return False


def _fresh_parser(protocol: Any) -> None:
    """The connection's parser counted the body as still to come: a new one, made as
    ``RequestHandler.__init__`` makes it, for the next request on the connection."""
    old = protocol._parser
    kwargs = protocol._manager._kwargs if protocol._manager is not None else {}
    protocol._parser = type(old)(
        protocol, protocol._loop, protocol._read_bufsize,
        max_line_size=protocol.max_line_size, max_field_size=protocol.max_field_size,
        max_headers=protocol.max_headers, payload_exception=web.RequestPayloadError,
        auto_decompress=kwargs.get("auto_decompress", True),
        max_msg_queue_size=protocol._max_msg_queue_size,
    )
