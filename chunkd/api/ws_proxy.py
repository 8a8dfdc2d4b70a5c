"""``/ws/tasks/{id}`` for an id chunkd does not know: relayed to the WhisperX service's own
WebSocket, so one route prefix (``/ws/tasks/*``, e.g. one Cloudflare rule) serves both.

The service's frontend opens ``/ws/tasks/{service identifier}?ticket=...`` for the tasks it
created itself (direct uploads, its own tus uploads): chunkd passes the query string, the
cookies, ``Authorization`` and ``Origin`` through, answers with the service's own refusal when
the handshake fails (the fork refuses a missing or used ticket with 403 before accepting), and
then copies frames both ways until one side closes, relaying the close code and reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from urllib.parse import urlencode

import aiohttp
from aiohttp import WSMsgType, web
from yarl import URL

from chunkd import errors as E
from chunkd.handoff.whisperx import SERVICE_AUTH_HEADER

log = logging.getLogger("chunkd.ws_proxy")

#: Ids that are relayed: a plain token (the service's are UUIDs). Anything else (``..``, ``%2F``)
#: is not, so a relayed handshake can only ever reach the service's ``/ws/tasks/{id}``.
RELAYABLE_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")
#: Most relayed sockets open at once (each holds two connections); more get 503.
MAX_RELAYS = 1000
#: Request headers the service may need to tell who is asking.
PASSED_HEADERS = ("Cookie", "Authorization", "Origin", "User-Agent")
#: Close codes that cannot be sent in a close frame; an abrupt end is relayed as 1011.
_UNSENDABLE = (1005, 1006, 1015)
#: The service's refusals relayed with the same status (anything else is a 502).
_REFUSALS = {401: E.UNAUTHORIZED, 403: E.FORBIDDEN, 404: E.NOT_FOUND}
#: After one side closed, how long the other direction may take to finish its close handshake.
_CLOSE_GRACE = 10.0


def service_ws_url(http_url: str) -> str:
    """``http://host:8000/base`` → ``ws://host:8000/base`` (https → wss)."""
    base = http_url.rstrip("/")
    if base.startswith("https://"):
        return "wss://" + base[len("https://"):]
    return "ws://" + base.removeprefix("http://")


class Relay:
    """One relayed pair of sockets: the browser's and the service's."""

    def __init__(self, client: web.WebSocketResponse,
                 upstream: aiohttp.ClientWebSocketResponse) -> None:
        self.client = client
        self.upstream = upstream

    async def shutdown(self) -> None:
        """chunkd is stopping: both sides are told GOING_AWAY (the service first)."""
        for side in (self.upstream, self.client):
            if not side.closed:
                with contextlib.suppress(Exception):
                    await side.close(code=1001, message=b"chunkd shutting down")


async def relay(request: web.Request, base_ws_url: str, relays: set[Relay], *,
                chunkd_auth: bool = False) -> web.StreamResponse:
    """Connect to the service's socket for this id, then relay both ways."""
    if not web.WebSocketResponse().can_prepare(request).ok:
        # Not a WebSocket handshake: never open one to the service (it could use up a ticket).
        raise E.BAD_REQUEST.saying("this is a WebSocket endpoint: send an Upgrade handshake")
    if len(relays) >= MAX_RELAYS:
        raise E.SERVER_BUSY()
    target = f"{base_ws_url}/ws/tasks/{request.match_info['id']}"  # a plain id (RELAYABLE_ID)
    # chunkd's own token (?access_token=) is not the service's business
    query = [(k, v) for k, v in request.rel_url.query.items() if k != "access_token"]
    if query:
        target += "?" + urlencode(query)
    headers = {h: request.headers[h] for h in PASSED_HEADERS if h in request.headers}
    if chunkd_auth:  # Authorization is chunkd's own token then: never the service's business
        headers.pop("Authorization", None)
        if SERVICE_AUTH_HEADER in request.headers:
            headers["Authorization"] = request.headers[SERVICE_AUTH_HEADER]
    forwarded = request.headers.get("X-Forwarded-For")
    headers["X-Forwarded-For"] = f"{forwarded}, {request.remote}" if forwarded else str(
        request.remote or "")
    protocols = [p.strip() for p in request.headers.get("Sec-WebSocket-Protocol", "").split(",")
                 if p.strip()]
    http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, connect=10))
    pair: Relay | None = None
    try:
        try:
            upstream = await http.ws_connect(
                URL(target, encoded=True), headers=headers, protocols=protocols, autoping=True,
                max_msg_size=1 << 20, timeout=aiohttp.ClientWSTimeout(ws_close=_CLOSE_GRACE),
                autoclose=False)
        except aiohttp.WSServerHandshakeError as exc:
            entry = _REFUSALS.get(exc.status)
            reason = f"the transcription service refused this WebSocket ({exc.status})"
            if entry is None:
                raise E.BAD_GATEWAY.saying(reason) from None
            raise entry.saying(reason) from None
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise E.BAD_GATEWAY.saying(
                f"the transcription service's WebSocket cannot be reached ({type(exc).__name__})"
            ) from None
        ws = web.WebSocketResponse(protocols=[upstream.protocol] if upstream.protocol else ())
        pair = Relay(ws, upstream)
        relays.add(pair)  # from here on, a shutdown closes it
        await ws.prepare(request)
    except BaseException:
        if pair is not None:
            relays.discard(pair)
            with contextlib.suppress(Exception):
                await pair.upstream.close()
        await http.close()
        raise
    # The relay runs in its own task: when the browser's connection drops, aiohttp cancels this
    # handler, and the close must still reach the service with the browser's code.
    pump = asyncio.create_task(_relay_until_closed(http, pair, relays))
    _PUMPS.add(pump)
    pump.add_done_callback(_PUMPS.discard)
    await asyncio.shield(pump)
    return ws


#: Relays still running (asyncio keeps only weak references to tasks).
_PUMPS: set[asyncio.Task[None]] = set()


async def _relay_until_closed(http: aiohttp.ClientSession, pair: Relay, relays: set[Relay]
                              ) -> None:
    try:
        await _pump_both(pair.client, pair.upstream)
    except Exception:  # a relay must never take the server down; the sockets are closed below
        log.exception("WebSocket relay failed")
    finally:
        relays.discard(pair)
        with contextlib.suppress(Exception):
            await pair.upstream.close()
        await http.close()


async def _pump_both(client: web.WebSocketResponse,
                     upstream: aiohttp.ClientWebSocketResponse) -> None:
    """Both directions until one side closes; that side's close is relayed to the other, and
    the other direction then ends by itself (given ``_CLOSE_GRACE`` seconds)."""
    down = asyncio.create_task(_copy(upstream, client))
    up = asyncio.create_task(_copy(client, upstream))
    try:
        _, pending = await asyncio.wait((down, up), return_when=asyncio.FIRST_COMPLETED)
        if pending:
            await asyncio.wait(pending, timeout=_CLOSE_GRACE)
    finally:
        for t in (down, up):
            t.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        for side in (client, upstream):  # e.g. the handler was cancelled at shutdown
            if not side.closed:
                await side.close(code=1001, message=b"going away")


Socket = web.WebSocketResponse | aiohttp.ClientWebSocketResponse


async def _copy(source: Socket, dest: Socket) -> None:
    """Frames from ``source`` to ``dest`` until ``source`` closes; then ``dest`` is closed with
    the same code and reason (an abrupt end, which has no code, as 1011), unless ``dest`` is
    closed already (the other direction relayed first)."""
    while True:
        msg = await source.receive()
        if msg.type is WSMsgType.TEXT:
            await dest.send_str(msg.data)
        elif msg.type is WSMsgType.BINARY:
            await dest.send_bytes(msg.data)
        elif msg.type is WSMsgType.CLOSE:
            code, reason = int(msg.data or 1000), str(msg.extra or "")
            break
        elif msg.type is WSMsgType.CLOSING:  # this end is being closed here (shutdown, relay)
            code, reason = source.close_code or 1001, ""
            break
        elif msg.type in (WSMsgType.CLOSED, WSMsgType.ERROR):
            code, reason = source.close_code or 1011, ""
            break
    if not dest.closed:
        await dest.close(code=1011 if code in _UNSENDABLE else code,
                         message=reason.encode()[:120])
