"""HTTP handlers for the chunked-upload contract: they parse, call a use case or the store, and
shape JSON. Decisions live in :mod:`chunkd.core`."""

from __future__ import annotations

import asyncio
import logging
import re
import time
from datetime import UTC, datetime
from typing import Any

import orjson
from aiohttp import web

from chunkd import __version__
from chunkd import errors as E
from chunkd.api.access import check_owner, owned_session, quota_client, subject_of
from chunkd.api.body import RequestBody
from chunkd.api.middleware import BUSY_RETRY_AFTER, error_response, expect_handler
from chunkd.core import quotas, uploads
from chunkd.core.finalize import StillFinalizing, finalize
from chunkd.handoff.whisperx import user_credential
from chunkd.keys import BODY_SLOTS, CONFIG, HUB, QUOTAS, RUNNER, STORE
from chunkd.model.session import Phase, SessionState
from chunkd.validate import check_new_session, max_chunk_size, min_chunk_size

_CHECKSUM = re.compile(r"sha256=([0-9a-fA-F]{64})")

routes = web.RouteTableDef()
#: A session request is a small JSON object (the task_params are at most 16 KiB).
MAX_SESSION_BODY = 64 * 1024
log = logging.getLogger("chunkd.api")


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def json_response(doc: dict[str, Any], status: int = 200) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(doc), content_type="application/json")


@routes.get("/healthz", expect_handler=expect_handler)
async def healthz(request: web.Request) -> web.Response:
    """For load balancers and Cloudflare health checks: the data folder is there and writable."""
    health = await request.app[STORE].health()
    return json_response({"status": health, "version": __version__},
                         status=200 if health == "ok" else 503)


@routes.post("/upload/chunked/session", expect_handler=expect_handler)
async def create_session(request: web.Request) -> web.Response:
    config = request.app[CONFIG]
    subject = subject_of(request)
    if request.content_type not in ("application/json", "application/octet-stream"):
        raise E.UNSUPPORTED_CONTENT_TYPE(expected="application/json")
    raw = await _small_body(request, MAX_SESSION_BODY, config.body_timeout)
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise E.INVALID_JSON.saying(f"the body is not valid JSON: {exc}") from None
    store = request.app[STORE]
    fields = check_new_session(doc, config, store.limits)
    client = quota_client(request, subject)
    limits = request.app[QUOTAS]
    async with limits.lock:  # check and create as one step: concurrent creates cannot overshoot
        await quotas.check_new_session(store, limits, client, fields["total_size"])
        meta = await store.create(ttl=config.session_ttl, owner=subject, client=client,
                                  **fields)
        if limits.active:
            limits.created(meta.session_id, client, meta.total_size)
    return json_response(
        {
            "session_id": meta.session_id,
            "chunk_size": meta.chunk_size,
            "total_chunks": meta.total_chunks,
            "total_size": meta.total_size,
            "max_chunk_size": max_chunk_size(config, store.limits),
            "min_chunk_size": min_chunk_size(config, store.limits),
            "expires_at": iso(meta.open_until(config.idle_session_ttl)),
            "status": Phase.UPLOADING.value,
        },
        status=201,
    )


async def _small_body(request: web.Request, limit: int, idle: float) -> bytes:
    """A small body (at most ``limit`` bytes: 413 beyond), under the same idle deadline as a
    chunk's, so a slow sender cannot hold the connection."""
    if (request.content_length or 0) > limit:
        raise E.TOO_LARGE()
    parts: list[bytes] = []
    size = 0
    while True:
        try:
            data = await asyncio.wait_for(request.content.readany(), idle)
        except TimeoutError:
            raise E.BODY_TIMEOUT(seconds=idle) from None
        if not data:
            return b"".join(parts)
        size += len(data)
        if size > limit:
            raise E.TOO_LARGE()
        parts.append(data)


def _chunk_index(request: web.Request, total_chunks: int) -> int:
    text = request.query.get("index")
    if text is None:
        raise E.MISSING_INDEX()
    if not re.fullmatch(r"[0-9]{1,9}", text):
        raise E.INVALID_INDEX()
    index = int(text)
    if index >= total_chunks:
        raise E.INDEX_OUT_OF_RANGE(field="index", last_index=total_chunks - 1,
                                   total_chunks=total_chunks)
    return index


def _checksum(request: web.Request) -> str | None:
    header = request.headers.get("X-Chunk-Checksum")
    if header is None:
        return None
    m = _CHECKSUM.fullmatch(header.strip())
    if not m:
        raise E.INVALID_CHECKSUM_HEADER()
    return m.group(1).lower()


#: Content-Encodings of a chunk body that aiohttp decodes (one, not a list).
BODY_ENCODINGS = frozenset({"identity", "gzip", "x-gzip", "deflate"})


@routes.post("/upload/chunked/{session_id}/chunk", expect_handler=expect_handler)
async def put_chunk(request: web.Request) -> web.Response:
    store = request.app[STORE]
    meta = await owned_session(request, request.match_info["session_id"])
    index = _chunk_index(request, meta.total_chunks)
    if request.content_type != "application/octet-stream":
        raise E.UNSUPPORTED_CONTENT_TYPE(expected="application/octet-stream")
    expected = meta.chunk_length(index)
    # With a Content-Encoding, Content-Length counts the encoded bytes: only the decoded body
    # can be checked (the store counts it).
    encoding = request.headers.get("Content-Encoding", "identity").strip().lower()
    if encoding not in BODY_ENCODINGS:  # anything else would be stored as sent, undecoded
        raise E.UNSUPPORTED_ENCODING(accepted=sorted(BODY_ENCODINGS))
    encoded = encoding != "identity"
    declared = None if encoded else request.content_length
    if declared is not None and declared > expected:
        raise E.CHUNK_TOO_LONG(chunk_index=index, expected_bytes=expected)
    if declared is not None and declared < expected:
        raise E.CHUNK_INCOMPLETE(chunk_index=index, expected_bytes=expected,
                                 received_bytes=declared)
    sha256 = _checksum(request)
    slots = request.app[BODY_SLOTS]
    client = quota_client(request, subject_of(request))
    if not slots.take(client):
        # Answered before the body is read; the connection is closed so it is never read.
        busy = error_response(E.SERVER_BUSY(retry_after=BUSY_RETRY_AFTER))
        busy.force_close()
        return busy
    try:
        config = request.app[CONFIG]
        body = RequestBody(request, config.body_timeout, config.min_body_rate,
                           from_socket=config.socket_body)
        receipt = await uploads.receive_chunk(store, meta, index, body, sha256)
    finally:
        slots.give(client)
    request.app[HUB].poke(meta.session_id)
    done = receipt.received == meta.total_chunks
    return json_response(
        {
            "session_id": meta.session_id,
            "chunk_index": index,
            "received_chunks": receipt.received,
            "total_chunks": meta.total_chunks,
            "status": (Phase.RECEIVED if done else Phase.UPLOADING).value,
            "already_received": receipt.already_received,
        }
    )


def status_document(state: SessionState, idle_ttl: float | None = None) -> dict[str, Any]:
    meta = state.meta
    doc: dict[str, Any] = {
        "session_id": meta.session_id,
        "status": state.phase.value,
        "filename": meta.filename,
        "received_chunks": len(state.received),
        "total_chunks": meta.total_chunks,
        "missing_chunks": state.missing,
        "received_bytes": state.received_bytes,
        "total_bytes": meta.total_size,
        "chunk_size": meta.chunk_size,
        "created_at": iso(meta.created_at),
        "expires_at": iso(state.expires_at(idle_ttl)),
    }
    if state.task_id:
        doc["task_id"] = state.task_id
    if state.task is not None:
        doc["task"] = {k: v for k, v in state.task.to_json().items() if k != "history"}
    if state.error is not None:
        doc["error"] = state.error
    return doc


@routes.get("/upload/chunked/{session_id}/status", expect_handler=expect_handler)
async def get_status(request: web.Request) -> web.Response:
    subject = subject_of(request)
    state = await request.app[STORE].state(request.match_info["session_id"])
    if state.meta.is_tus:  # its progress is on the WebSocket; its state is tus's HEAD
        raise E.SESSION_NOT_FOUND()
    check_owner(state.meta, subject)
    return json_response(status_document(state, request.app[CONFIG].idle_session_ttl))


@routes.post("/upload/chunked/{session_id}/finalize", expect_handler=expect_handler)
async def finalize_session(request: web.Request) -> web.Response:
    sid = request.match_info["session_id"]
    started = time.perf_counter()
    await owned_session(request, sid)
    credential = None
    config = request.app[CONFIG]
    if config.handoff == "whisperx" and config.whisperx_credentials == "user":
        # The task will be the user's on the service: it needs their credential (memory only).
        credential = user_credential(request.headers, chunkd_auth=config.auth_on)
        if credential is None:
            raise E.CREDENTIAL_REQUIRED()
    outcome = await finalize(request.app[STORE], request.app[RUNNER], sid, credential)
    request.app[HUB].poke(sid)
    if isinstance(outcome, StillFinalizing):  # another request (or process) is still at it
        log.info("finalize %s: task %s still being checked", sid, outcome.task_id)
        return json_response({
            "session_id": sid, "task_id": outcome.task_id, "status": Phase.FINALIZING.value,
            "message": "The file is still being checked; ask again (same task id)",
        }, status=202)
    task = outcome.task
    log.info("finalize %s: task %s, %s, in %.1f ms", sid, task.task_id, task.stage,
             (time.perf_counter() - started) * 1000)
    doc = {
        "session_id": sid,
        "task_id": task.task_id,
        "status": Phase.PROCESSING.value,
        "message": "File received and handed off for processing",
    }
    if task.location is not None:
        doc["location"] = task.location
    return json_response(doc)


@routes.delete("/upload/chunked/{session_id}/abort", expect_handler=expect_handler)
async def abort_session(request: web.Request) -> web.Response:
    sid = request.match_info["session_id"]
    await owned_session(request, sid)
    await uploads.abort(request.app[STORE], sid)
    request.app[QUOTAS].ended(sid)
    request.app[HUB].poke(sid)
    return json_response(
        {"session_id": sid, "status": "aborted", "message": "Upload cancelled, chunks deleted"}
    )
