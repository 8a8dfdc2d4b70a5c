"""HTTP handlers for the chunked-upload contract. They only translate HTTP to store calls."""

from __future__ import annotations

import asyncio
import os
import logging
import re
import time
from datetime import UTC, datetime
from typing import Any

import orjson
from aiohttp import web

from chunkd import __version__
from chunkd.errors import BadRequest, Conflict, Gone, InvalidField, TooLarge, UnsupportedMediaType
from chunkd.finalize import finalize
from chunkd.keys import CONFIG, HUB, RUNNER, STORE
from chunkd.store.base import Phase, SessionState
from chunkd.validate import check_new_session

_CHECKSUM = re.compile(r"sha256=([0-9a-fA-F]{64})")

routes = web.RouteTableDef()
log = logging.getLogger("chunkd.api")


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def json_response(doc: dict[str, Any], status: int = 200) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(doc), content_type="application/json")


@routes.get("/healthz")
async def healthz(request: web.Request) -> web.Response:
    """For load balancers and Cloudflare health checks: the data folder is there and writable."""
    store = request.app[STORE]
    ok = await asyncio.to_thread(os.access, store.sessions_dir, os.W_OK)
    return json_response({"status": "ok" if ok else "data_dir_not_writable",
                          "version": __version__}, status=200 if ok else 503)


@routes.post("/upload/chunked/session")
async def create_session(request: web.Request) -> web.Response:
    config = request.app[CONFIG]
    if request.content_type not in ("application/json", "application/octet-stream"):
        raise UnsupportedMediaType(
            "send the session as application/json", code="unsupported_content_type"
        )
    raw = await request.read()  # bounded by client_max_size (1 MiB): 413 beyond it
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"the body is not valid JSON: {exc}", code="invalid_json") from None
    fields = check_new_session(doc, config)
    meta = await request.app[STORE].create(ttl=config.session_ttl, **fields)
    return json_response(
        {
            "session_id": meta.session_id,
            "chunk_size": meta.chunk_size,
            "total_chunks": meta.total_chunks,
            "total_size": meta.total_size,
            "max_chunk_size": config.max_chunk_size,
            "expires_at": iso(meta.expires_at),
            "status": Phase.UPLOADING.value,
        },
        status=201,
    )


def _chunk_index(request: web.Request, total_chunks: int) -> int:
    text = request.query.get("index")
    if text is None:
        raise BadRequest("the query parameter index is required", code="missing_index")
    if not re.fullmatch(r"[0-9]{1,9}", text):
        raise BadRequest("index must be a non-negative integer", code="invalid_index")
    index = int(text)
    if index >= total_chunks:
        raise InvalidField(
            f"index must be between 0 and {total_chunks - 1}",
            code="index_out_of_range", field="index", total_chunks=total_chunks,
        )
    return index


def _checksum(request: web.Request) -> str | None:
    header = request.headers.get("X-Chunk-Checksum")
    if header is None:
        return None
    m = _CHECKSUM.fullmatch(header.strip())
    if not m:
        raise BadRequest(
            "X-Chunk-Checksum must be sha256=<64 hex digits>", code="invalid_checksum_header"
        )
    return m.group(1).lower()


@routes.post("/upload/chunked/{session_id}/chunk")
async def put_chunk(request: web.Request) -> web.Response:
    store = request.app[STORE]
    meta = await store.get(request.match_info["session_id"])
    index = _chunk_index(request, meta.total_chunks)
    if request.content_type != "application/octet-stream":
        raise UnsupportedMediaType(
            "send chunk bodies as application/octet-stream", code="unsupported_content_type"
        )
    expected = meta.chunk_length(index)
    # With a Content-Encoding, Content-Length counts the encoded bytes: only the decoded body
    # can be checked (the store counts it).
    encoded = request.headers.get("Content-Encoding", "identity").lower() != "identity"
    declared = None if encoded else request.content_length
    if declared is not None and declared > expected:
        raise TooLarge(
            f"chunk {index} must be {expected} bytes, Content-Length says {declared}",
            code="chunk_too_long", expected_bytes=expected,
        )
    if declared is not None and declared < expected:
        raise BadRequest(
            f"chunk {index} must be {expected} bytes, Content-Length says {declared}",
            code="chunk_incomplete", expected_bytes=expected, received_bytes=declared,
        )
    sha256 = _checksum(request)
    receipt = await store.put_chunk(
        meta, index, request.content.iter_any(), sha256=sha256,
        idle_timeout=request.app[CONFIG].body_timeout,
    )
    request.app[HUB].poke(meta.session_id)
    done = receipt.received == meta.total_chunks
    return json_response(
        {
            "session_id": meta.session_id,
            "chunk_index": index,
            "received_chunks": receipt.received,
            "total_chunks": meta.total_chunks,
            "status": (Phase.COMPLETE if done else Phase.UPLOADING).value,
            "already_received": receipt.already_received,
        }
    )


def status_document(state: SessionState) -> dict[str, Any]:
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
        "expires_at": iso(meta.expires_at),
    }
    if state.claim is not None and state.claim.task_id:
        doc["task_id"] = state.claim.task_id
    if state.task is not None:
        doc["task"] = {k: v for k, v in state.task.items() if k != "history"}
    if state.failure is not None:
        doc["error"] = state.failure["error"]
    return doc


@routes.get("/upload/chunked/{session_id}/status")
async def get_status(request: web.Request) -> web.Response:
    state = await request.app[STORE].state(request.match_info["session_id"])
    return json_response(status_document(state))


@routes.post("/upload/chunked/{session_id}/finalize")
async def finalize_session(request: web.Request) -> web.Response:
    sid = request.match_info["session_id"]
    started = time.perf_counter()
    task = await finalize(request.app[STORE], request.app[RUNNER], sid)
    log.info("finalize %s: task %s, %s, in %.1f ms", sid, task["task_id"], task.get("stage"),
             (time.perf_counter() - started) * 1000)
    request.app[HUB].poke(sid)
    if task.get("stage") == "finalizing":  # another request (or process) is still at it
        return json_response({
            "session_id": sid, "task_id": task["task_id"], "status": Phase.FINALIZING.value,
            "message": "The file is still being checked; ask again (same task id)",
        }, status=202)
    doc = {
        "session_id": sid,
        "task_id": task["task_id"],
        "status": Phase.PROCESSING.value,
        "message": "File received and handed off for processing",
    }
    if "location" in task:
        doc["location"] = task["location"]
    return json_response(doc)


@routes.delete("/upload/chunked/{session_id}/abort")
async def abort_session(request: web.Request) -> web.Response:
    store = request.app[STORE]
    sid = request.match_info["session_id"]
    state = await store.state(sid)
    claim = await store.claim_end(sid, "abort")
    if not claim.won and claim.kind == "finalize" and state.failure is None:
        raise Conflict(
            "this upload session is already finalized and cannot be aborted",
            code="session_finalized", task_id=claim.task_id,
        )
    if not claim.won and claim.kind != "finalize":
        raise Gone("this upload session was already aborted", code="session_aborted")
    await store.remove(sid, "abort")
    request.app[HUB].poke(sid)
    return json_response(
        {"session_id": sid, "status": "aborted", "message": "Upload cancelled, chunks deleted"}
    )
