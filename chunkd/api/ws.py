"""``GET /ws/tasks/{id}``: a session's (or its task's) progress as JSON text frames; an id
chunkd does not know goes to the WhisperX service's own socket (:mod:`chunkd.api.ws_proxy`)."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import orjson
from aiohttp import WSMsgType, web

from chunkd.api.access import check_owner, subject_of
from chunkd.api.middleware import expect_handler
from chunkd.api.ws_proxy import RELAYABLE_ID, relay
from chunkd.errors import ChunkdError
from chunkd.keys import CONFIG, HUB, RELAYS, SERVICE_WS, STORE
from chunkd.model.session import SessionMeta
from chunkd.progress import Close, Subscriber, close_code_for, now_iso
from chunkd.store.base import SessionStore

routes = web.RouteTableDef()


async def _send(ws: web.WebSocketResponse, msg: dict[str, Any]) -> None:
    # Text frames: browsers' WebSocket API hands binary frames over as Blobs.
    await ws.send_str(orjson.dumps(msg).decode())


async def _meta(store: SessionStore, any_id: str) -> tuple[bool, SessionMeta | None]:
    """Does chunkd have this session or task (live, or ended: it answers for both)? And its
    metadata while it is not gone."""
    try:
        return True, await store.get(await store.resolve(any_id))
    except ChunkdError as exc:
        return exc.status != 404, None


@routes.get("/ws/tasks/{id}", expect_handler=expect_handler)
async def task_socket(request: web.Request) -> web.StreamResponse:
    service = request.app.get(SERVICE_WS)
    any_id = request.match_info["id"]
    known, meta = await _meta(request.app[STORE], any_id)
    if service is not None and not known and RELAYABLE_ID.fullmatch(any_id):
        # The service's own task: the service checks who is asking (its ticket), not chunkd.
        return await relay(request, service, request.app[RELAYS],
                           chunkd_auth=request.app[CONFIG].auth_on)
    subject = subject_of(request, websocket=True)  # refused before the handshake: 401 / 403
    if meta is not None:
        check_owner(meta, subject)
    # A ping every heartbeat; a peer that does not answer with a pong within half of it (one
    # that never reads: browsers and WebSocket libraries answer by themselves) is closed.
    ws = web.WebSocketResponse(max_msg_size=64 * 1024,
                               heartbeat=request.app[CONFIG].heartbeat_interval)
    await ws.prepare(request)
    hub = request.app[HUB]
    try:
        sub = await hub.subscribe(request.match_info["id"])
    except ChunkdError as exc:
        await ws.close(code=close_code_for(exc), message=f"{exc.code}: {exc.message}".encode()[:120])
        return ws
    closing = asyncio.Event()  # the stream ended: the pump closes the socket
    listener = asyncio.create_task(_listen(ws, sub, hub.queue_size))
    pump = asyncio.create_task(_pump(ws, sub, request.app[CONFIG].heartbeat_interval,
                                     request.transport, listener, closing))
    # The client went away (or closed): nothing is left to send to.
    listener.add_done_callback(lambda _: None if closing.is_set() else pump.cancel())
    try:
        await asyncio.wait([pump])
    finally:
        hub.unsubscribe(sub)
        for job in (listener, pump):
            job.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await job
    return ws


async def _listen(ws: web.WebSocketResponse, sub: Subscriber, queue_size: int) -> None:
    """Read what the client sends (pongs, its close, and ``{"type": "ping"}``)."""
    async for msg in ws:
        if msg.type != WSMsgType.TEXT:
            continue
        with contextlib.suppress(orjson.JSONDecodeError, AttributeError):
            if orjson.loads(msg.data).get("type") == "ping" and (
                sub.queue.qsize() < queue_size  # a ping flood never crowds out the Close
            ):
                sub.queue.put_nowait({"type": "pong", "timestamp": now_iso()})


#: A peer that does not take a message (or the close) for this long is cut off: a socket that
#: never reads must not be kept forever.
SEND_TIMEOUT = 30.0


async def _pump(ws: web.WebSocketResponse, sub: Subscriber, heartbeat: float,
                transport: asyncio.Transport | None, listener: asyncio.Task[None],
                closing: asyncio.Event) -> None:
    """Forward the subscriber's queue to the socket; a heartbeat whenever it is quiet. At the
    end the listener is stopped first, so that the close waits for the client's close frame
    (aiohttp cuts the connection at once when another task is reading: the client would see
    1006, not the code sent)."""
    try:
        with contextlib.suppress(ConnectionError):
            while not ws.closed:
                try:
                    item = await asyncio.wait_for(sub.queue.get(), heartbeat)
                except TimeoutError:
                    item = {"type": "heartbeat", "timestamp": now_iso()}
                if isinstance(item, Close):
                    closing.set()
                    listener.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await listener
                    await asyncio.wait_for(
                        ws.close(code=item.code, message=item.reason.encode()), SEND_TIMEOUT)
                    return
                await asyncio.wait_for(_send(ws, item), SEND_TIMEOUT)
    except TimeoutError:  # the peer stopped reading
        if transport is not None:
            transport.abort()
