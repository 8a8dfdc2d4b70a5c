"""HTTP handlers of tus 1.0.0 at ``--tus-path`` (default ``/files/``): parse the tus headers,
call :mod:`chunkd.core.tus` or the store, answer with tus headers. The errors are rendered by
the error middleware (:func:`chunkd.api.tus_wire.for_tus_client`).

    OPTIONS <path>        capabilities (no auth: it tells nothing about uploads)
    POST    <path>        creation (+ with-upload, defer-length, concatenation)
    HEAD    <path><id>    the offset (never blocked long by a stale PATCH, never 5xx)
    PATCH   <path><id>    bytes at the offset
    DELETE  <path><id>    termination (204)
    POST    <path><id>    the above with X-HTTP-Method-Override

An upload's id is its session id: a UUID, so an upload URL never ends in a media extension
(Cloudflare caches by extension). ``Location`` is path-absolute, so it is right behind any
proxy, whatever scheme or host the client used.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from aiohttp import web

from chunkd import errors as E
from chunkd.api.access import check_owner, owned_session, quota_client, subject_of
from chunkd.api.body import RequestBody
from chunkd.api.middleware import BUSY_RETRY_AFTER, expect_handler
from chunkd.api.tus_wire import (
    CHECKSUMS,
    EXTENSIONS,
    OFFSET_STREAM,
    TUS_VERSION,
    http_date,
    method_of,
    parse_checksum,
    parse_int_header,
    parse_metadata,
)
from chunkd.api.uploads import BODY_ENCODINGS
from chunkd.config import Config
from chunkd.core import quotas, tus, uploads
from chunkd.core.finalize import finalize
from chunkd.errors import ChunkdError
from chunkd.handoff.base import Credential
from chunkd.handoff.whisperx import user_credential
from chunkd.keys import BODY_SLOTS, CONFIG, HUB, QUOTAS, RUNNER, STORE
from chunkd.model.session import EndKind, SessionMeta, SessionState
from chunkd.validate import _text_field, check_filename, max_chunk_size

log = logging.getLogger("chunkd.tus")

#: How long a HEAD waits for a stale PATCH it asked to stop to let go of the upload.
HEAD_WAIT_SECONDS = 2.0
#: How long a PATCH or DELETE waits for a stale PATCH it asked to stop to let go (then the
#: upload's lock is waited for as long again: 423 after that).
STALE_WAIT_SECONDS = 3.0
#: How often a PATCH looks for a stop request from another process.
STOP_POLL_SECONDS = 1.0


@dataclass
class _Active:
    """A PATCH of this process that holds an upload."""

    body: RequestBody
    done: asyncio.Event = field(default_factory=asyncio.Event)


class TusState:
    """Per process: the PATCHes running, and the finalizes started by a last byte."""

    def __init__(self) -> None:
        self.active: dict[str, _Active] = {}
        self.finalizing: set[asyncio.Task[None]] = set()

    async def close(self) -> None:
        for job in list(self.finalizing):
            job.cancel()
        for job in list(self.finalizing):
            with contextlib.suppress(BaseException):
                await job


TUS = web.AppKey("tus", TusState)


def add_routes(app: web.Application, base: str) -> None:
    app[TUS] = TusState()
    # on_shutdown: before the runner closes (cleanup), so no finalize starts a hand-off late.
    app.on_shutdown.append(lambda app: app[TUS].close())
    item = base + "{upload_id}"
    for path in (base, base.rstrip("/")):
        app.router.add_route("OPTIONS", path, options, expect_handler=expect_handler)
        app.router.add_route("POST", path, create, expect_handler=expect_handler)
    app.router.add_route("OPTIONS", item, options, expect_handler=expect_handler)
    app.router.add_route("HEAD", item, head, expect_handler=expect_handler)
    app.router.add_route("PATCH", item, patch, expect_handler=expect_handler)
    app.router.add_route("DELETE", item, delete, expect_handler=expect_handler)
    app.router.add_route("POST", item, overridden, expect_handler=expect_handler)


def _base(request: web.Request) -> str:
    return request.app[CONFIG].tus_path


def _check_version(request: web.Request) -> None:
    if request.headers.get("Tus-Resumable", "").strip() != TUS_VERSION:
        raise E.TUS_VERSION_UNSUPPORTED()


async def _upload(request: web.Request) -> SessionMeta:
    """The upload of the URL, for this request: 401 without a valid token, 412 without
    ``Tus-Resumable: 1.0.0``, 404/410 as the store says, 403 if it is another subject's."""
    subject_of(request)  # (verified once per request: owned_session asks again)
    _check_version(request)
    return await owned_session(request, request.match_info["upload_id"], protocol="tus")


def _answer(status: int, headers: dict[str, str] | None = None) -> web.Response:
    resp = web.Response(status=status)
    resp.headers["Tus-Resumable"] = TUS_VERSION
    if headers:
        resp.headers.update(headers)
    return resp


def _expires(request: web.Request, meta: SessionMeta, state: SessionState | None = None
             ) -> dict[str, str]:
    """``Upload-Expires``: when the upload expires unless more bytes come (just written, when
    no ``state`` is given)."""
    if state is not None and state.claim is not None:
        return {}  # finished: it no longer expires for lack of bytes
    idle = request.app[CONFIG].idle_session_ttl
    ts = state.expires_at(idle) if state is not None else \
        meta.open_until(idle, request.app[STORE].clock())
    return {"Upload-Expires": http_date(ts)}


async def options(request: web.Request) -> web.Response:
    config = request.app[CONFIG]
    return _answer(204, {
        "Tus-Version": TUS_VERSION,
        "Tus-Extension": ",".join(EXTENSIONS),
        "Tus-Max-Size": str(config.max_file_size),
        "Tus-Checksum-Algorithm": ",".join(CHECKSUMS),
    })


async def overridden(request: web.Request) -> web.StreamResponse:
    method = method_of(request)
    if method == "PATCH":
        return await patch(request)
    if method == "DELETE":
        return await delete(request)
    if method == "HEAD":
        return await head(request)
    raise E.METHOD_NOT_ALLOWED()


# -- creation ------------------------------------------------------------------------------------

def _fields(metadata: dict[str, str], config: Config, *, partial: bool) -> dict[str, Any]:
    """The session fields from ``Upload-Metadata``: ``filename`` (checked like the chunk API's:
    an audio or video extension), ``language``, ``model``, ``taskId`` (a UUID)."""
    name = metadata.get("filename") or metadata.get("name")
    if name and not partial:
        filename, extension = check_filename(name, config.allowed_extensions)
    else:
        filename, extension = "upload", "bin"
    task_id = metadata.get("taskId")
    if task_id:
        try:
            task_id = str(uuid.UUID(task_id))
        except ValueError:
            raise E.INVALID_TASK_ID() from None
    language = _text_field({"language": metadata.get("language") or None}, "language")
    model = _text_field({"model": metadata.get("model") or None}, "model")
    return {"filename": filename, "extension": extension, "language": language,
            "model": model, "task_params": {}, "task_id": task_id or None}


def _length(request: web.Request, config: Config) -> int | None:
    """``Upload-Length`` (None: deferred with ``Upload-Defer-Length: 1``)."""
    text, defer = request.headers.get("Upload-Length"), request.headers.get("Upload-Defer-Length")
    if (text is None) == (defer is None):
        raise E.INVALID_LENGTH(reason="send Upload-Length or Upload-Defer-Length: 1 (one of them)")
    if defer is not None:
        if defer.strip() != "1":
            raise E.INVALID_LENGTH(reason="Upload-Defer-Length must be 1")
        return None
    try:
        length = parse_int_header(text)
    except ValueError:
        raise E.INVALID_LENGTH(reason="Upload-Length must be a non-negative integer") from None
    assert length is not None
    if length > config.max_file_size:
        raise E.UPLOAD_TOO_LARGE(max_size=config.max_file_size)
    return length


async def create(request: web.Request) -> web.Response:
    subject = subject_of(request)
    _check_version(request)
    config, store = request.app[CONFIG], request.app[STORE]
    metadata = parse_metadata(request.headers.get("Upload-Metadata"))
    concat = request.headers.get("Upload-Concat", "").strip()
    if concat.startswith("final"):
        return await _create_final(request, concat, metadata, subject)
    if concat not in ("", "partial"):
        raise E.INVALID_CONCAT(reason="must be partial, or final;<upload URLs>")
    length = _length(request, config)
    fields = _fields(metadata, config, partial=concat == "partial")
    client = quota_client(request, subject)
    limits = request.app[QUOTAS]
    async with limits.lock:  # check and create as one step: concurrent creates cannot overshoot
        await quotas.check_new_session(store, limits, client, length or 0)
        meta = await store.create(
            ttl=config.session_ttl, owner=subject, client=client, protocol="tus",
            total_size=length or 0, chunk_size=max(length or 0, 1), total_chunks=1,
            upload_metadata=request.headers.get("Upload-Metadata"),
            concat=concat or None, deferred_length=length is None, **fields)
        if limits.active:
            limits.created(meta.session_id, client, meta.total_size)
    log.info("tus upload %s created (%s bytes%s)", meta.session_id,
             "deferred" if length is None else length, ", partial" if concat else "")
    headers = {"Location": _base(request) + meta.session_id}
    offset = 0
    if request.content_type == OFFSET_STREAM and (request.content_length or request.body_exists):
        # creation-with-upload: the first bytes came with the POST. Whatever happens to them,
        # the upload exists: 201 with the offset that was kept.
        try:
            meta, offset = await _append(request, meta, 0)
        except Exception as exc:  # noqa: BLE001 (the upload exists: the client must learn it)
            log.info("tus upload %s: the creation's body was not kept whole: %r",
                     meta.session_id, exc)
            offset = (await store.state(meta.session_id)).offset
    headers["Upload-Offset"] = str(offset)
    headers.update(_expires(request, meta))
    if length == offset and not concat:  # whole already (or empty)
        _finalize_later(request, meta.session_id, _credential(request))
    return _answer(201, headers)


def _part_ids(request: web.Request, concat: str) -> list[str]:
    """``final;<url> <url>``: each URL (absolute, or a path) named by its path under the tus
    path, whatever its scheme and host (clients resolve it against their endpoint)."""
    _, _, urls = concat.partition(";")
    base = _base(request)
    ids = []
    for url in urls.split():
        path = urlsplit(url).path
        if not path.startswith(base) or "/" in path[len(base):]:
            raise E.INVALID_CONCAT(reason=f"{url} is not an upload of this server")
        ids.append(path[len(base):])
    return ids


async def _create_final(request: web.Request, concat: str, metadata: dict[str, str],
                        subject: str | None) -> web.Response:
    config, store = request.app[CONFIG], request.app[STORE]
    if "Upload-Length" in request.headers or "Upload-Defer-Length" in request.headers:
        raise E.INVALID_LENGTH(reason="a final upload's length is its parts': send no "
                                      "Upload-Length")
    ids = _part_ids(request, concat)
    parts = await tus.check_partials(store, ids, subject, lambda meta: check_owner(meta, subject))
    fields = _fields(metadata, config, partial=False)
    total = sum(p.total_size for p in parts)
    fid = tus.final_id(subject, ids)
    meta = await store.concatenate(
        parts, ttl=config.session_ttl, session_id=fid, owner=subject,
        client=quota_client(request, subject), protocol="tus", total_size=total,
        chunk_size=max(total, 1), total_chunks=1, concat="final",
        upload_metadata=request.headers.get("Upload-Metadata"), **fields)
    for part in parts:
        request.app[QUOTAS].ended(part.session_id)
    log.info("tus final upload %s of %d parts (%d bytes)", fid, len(parts), total)
    _finalize_later(request, meta.session_id, _credential(request))
    return _answer(201, {"Location": _base(request) + meta.session_id})


# -- HEAD, PATCH, DELETE ---------------------------------------------------------------------------

async def _stop_stale(request: web.Request, sid: str, wait: float) -> None:
    """A request for an upload that a PATCH still holds means that PATCH is stale (its client
    gave up on it): ask it to stop and keep what it has, and wait for it up to ``wait``."""
    state = request.app[TUS]
    active = state.active.get(sid)
    if active is not None:
        active.body.stop(tus.StopRequested())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(active.done.wait(), wait)
        return
    store = request.app[STORE]
    if await store.held(sid):  # by another process: it looks for the request every second
        await store.request_stop(sid)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and await store.held(sid):
            await asyncio.sleep(0.05)


async def head(request: web.Request) -> web.Response:
    meta = await _upload(request)
    sid = meta.session_id
    await _stop_stale(request, sid, HEAD_WAIT_SECONDS)
    state = await request.app[STORE].state(sid)
    if state.failure is not None:  # refused (e.g. not audio): no longer an upload to resume
        raise ChunkdError.from_record(state.failure)
    if tus.ready_to_finalize(state) and sid not in request.app[TUS].active:
        _finalize_later(request, sid, _credential(request))  # whole, e.g. by a cut PATCH
    headers = {"Upload-Offset": str(state.offset), "Cache-Control": "no-store"}
    if state.meta.length_known:
        headers["Upload-Length"] = str(state.meta.total_size)
    else:
        headers["Upload-Defer-Length"] = "1"
    if meta.upload_metadata:
        headers["Upload-Metadata"] = meta.upload_metadata
    if meta.concat == "partial":
        headers["Upload-Concat"] = "partial"
    elif meta.concat == "final":
        headers["Upload-Concat"] = "final;" + " ".join(_base(request) + p for p in meta.parts)
    headers.update(_expires(request, meta, state))
    return _answer(200, headers)


async def patch(request: web.Request) -> web.Response:
    meta = await _upload(request)
    sid = meta.session_id
    if meta.concat == "final":
        raise E.FINAL_UPLOAD()
    if request.content_type != OFFSET_STREAM:
        raise E.UNSUPPORTED_CONTENT_TYPE(expected=OFFSET_STREAM)
    try:
        offset = parse_int_header(request.headers.get("Upload-Offset"))
    except ValueError:
        offset = None
    if offset is None:
        raise E.INVALID_OFFSET()
    try:
        meta, new = await _append(request, meta, offset)
    except ChunkdError as exc:
        state = await request.app[STORE].state(sid)
        if exc.code == "session_finalized" and state.failure is not None:
            raise ChunkdError.from_record(state.failure) from None  # refused: say why (4xx)
        if tus.ready_to_finalize(state):  # the prefix it kept made the upload whole
            _finalize_later(request, sid, _credential(request))
        raise
    headers = {"Upload-Offset": str(new)}
    headers.update(_expires(request, meta))
    if meta.length_known and new == meta.total_size and meta.concat != "partial":
        _finalize_later(request, sid, _credential(request))
    return _answer(204, headers)


async def _append(request: web.Request, meta: SessionMeta, offset: int
                  ) -> tuple[SessionMeta, int]:
    """The request's body at ``offset`` (PATCH, or POST with creation-with-upload)."""
    config, store = request.app[CONFIG], request.app[STORE]
    encoding = request.headers.get("Content-Encoding", "identity").strip().lower()
    if encoding not in BODY_ENCODINGS:
        raise E.UNSUPPORTED_ENCODING(accepted=sorted(BODY_ENCODINGS))
    try:
        declared = parse_int_header(request.headers.get("Upload-Length"))
    except ValueError:
        raise E.INVALID_LENGTH(reason="Upload-Length must be a non-negative integer") from None
    checksum = parse_checksum(request.headers.get("Upload-Checksum"))
    max_patch = max_chunk_size(config, store.limits)
    if declared is not None and not meta.length_known:  # a late length: counted as a new one
        await quotas.check_new_session(store, request.app[QUOTAS], meta.client or "",
                                       declared, new=False)
    length = request.content_length if encoding == "identity" else None
    if length is not None and length > max_patch:
        raise E.PATCH_TOO_LARGE(max_patch_size=max_patch)
    slots = request.app[BODY_SLOTS]
    client = quota_client(request, subject_of(request))
    await _stop_stale(request, meta.session_id, STALE_WAIT_SECONDS)
    since = await store.stop_mark(meta.session_id)  # stop requests after this one count
    if not slots.take(client):  # answered before the body is read (the connection is closed)
        raise E.SERVER_BUSY(retry_after=BUSY_RETRY_AFTER)
    body = RequestBody(request, config.body_timeout, config.min_body_rate,
                       from_socket=config.socket_body)
    active = _Active(body)
    running = request.app[TUS].active
    running[meta.session_id] = active
    watcher = asyncio.create_task(_watch_stop(request, meta.session_id, body, since))
    hub = request.app[HUB]
    try:
        meta, new = await tus.append(
            store, meta, offset=offset, body=body, content_length=length,
            declared_length=declared, checksum=checksum, max_patch=max_patch,
            max_file_size=config.max_file_size,
            progressed=lambda: hub.poke(meta.session_id))
        if declared is not None and request.app[QUOTAS].active:
            request.app[QUOTAS].created(meta.session_id, meta.client or "", meta.total_size)
        return meta, new
    finally:
        watcher.cancel()
        slots.give(client)
        if running.get(meta.session_id) is active:
            del running[meta.session_id]
        active.done.set()


async def _watch_stop(request: web.Request, sid: str, body: RequestBody, since: object) -> None:
    """Another process may ask this PATCH to stop (the stop mark changes): look every second."""
    store = request.app[STORE]
    while True:
        await asyncio.sleep(STOP_POLL_SECONDS)
        try:
            if await store.stop_mark(sid) != since:
                body.stop(tus.StopRequested())
                return
        except (ChunkdError, OSError):  # this round only (the session may be going away)
            continue


async def delete(request: web.Request) -> web.Response:
    sid = (await _upload(request)).session_id
    await _stop_stale(request, sid, STALE_WAIT_SECONDS)
    store = request.app[STORE]
    state = await store.state(sid)
    if state.claim is not None and state.claim.kind is EndKind.CONCAT:
        await store.remove(sid, EndKind.ABORT)  # its bytes are the final upload's: only the rest
    else:
        await uploads.abort(store, sid)
    request.app[QUOTAS].ended(sid)
    request.app[HUB].poke(sid)
    return _answer(204)


# -- completion --------------------------------------------------------------------------------

def _credential(request: web.Request) -> Credential | None:
    config = request.app[CONFIG]
    if config.handoff == "whisperx" and config.whisperx_credentials == "user":
        return user_credential(request.headers, chunkd_auth=config.auth_on)
    return None


def _finalize_later(request: web.Request, sid: str, credential: Credential | None = None) -> None:
    """The upload is whole: validate and hand it off in the background (the last PATCH is
    answered at once). A refusal is recorded and shown on the task's WebSocket; recovery
    finishes what a crash interrupts."""
    app = request.app
    jobs = app[TUS].finalizing

    async def run() -> None:
        try:
            await finalize(app[STORE], app[RUNNER], sid, credential)
        except ChunkdError as exc:
            log.info("tus upload %s: finalize: %s", sid, exc.message)
        except Exception:
            log.exception("tus upload %s: finalize failed", sid)
        finally:
            app[HUB].poke(sid)

    job = asyncio.create_task(run())
    jobs.add(job)
    job.add_done_callback(jobs.discard)
