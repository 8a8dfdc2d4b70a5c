"""An asyncio client for chunkd's chunked-upload contract.

    client = ChunkdClient("https://example.org", parallel=4)
    result = await client.upload(FileSource("talk.mp4"), language="en", on_progress=print)
    final = await client.follow(result.task_id)          # the WebSocket, to the final message

Chunks go up ``parallel`` at a time, each with its ``X-Chunk-Checksum``, streamed from the source
in 1 MiB pieces (memory does not grow with the file or the chunk size). A chunk that fails in a
way that can succeed later (connection lost, timeout, 5xx, 429, checksum or length mismatch in
transit) is retried with exponential backoff and jitter; an answer that cannot change (404, 410,
413, 415, 422, ...) fails the upload at once with the server's message. ``resume(session_id)``
asks ``/status`` and sends only the missing chunks.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Protocol, TypeVar

import aiohttp
import orjson

#: Error codes worth sending the same chunk again for.
RETRY_CODES = {"checksum_mismatch", "chunk_incomplete", "client_disconnected", "shutting_down",
               "chunk_busy", "body_timeout", "body_too_slow",
               "server_busy"}
PIECE = 1024 * 1024

_T = TypeVar("_T")


class ChunkdClientError(Exception):
    """The server said no (or could not be reached). ``status`` 0: no HTTP answer at all."""

    def __init__(self, status: int, code: str, message: str, details: dict[str, Any] | None = None):
        super().__init__(f"{message} ({status} {code})" if status else message)
        self.status = status
        self.code = code
        self.message = message
        self.details = details or {}

    @property
    def retryable(self) -> bool:
        if self.status < 0:  # a local problem (the file): trying again will not help
            return False
        return self.status == 0 or self.status >= 500 or self.status == 429 or (
            self.code in RETRY_CODES
        )


def answer_error(status: int, body: bytes) -> ChunkdClientError:
    """The error an answer carries: chunkd's ``{"error": {"code", "message", ...}}``, else the
    start of the body as the message (any other server's)."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        doc = None
    err = doc.get("error") if isinstance(doc, dict) else None
    if isinstance(err, dict):
        details = {k: v for k, v in err.items() if k not in ("code", "message")}
        return ChunkdClientError(status, str(err.get("code")), str(err.get("message")), details)
    text = " ".join(body[:200].decode("utf-8", "replace").split())  # one line, even of HTML
    return ChunkdClientError(status, f"http_{status}", text or f"HTTP {status}")


class Source(Protocol):
    """Where the bytes come from: a file, or generated data for benchmarks."""

    name: str
    size: int

    def pieces(self, offset: int, length: int) -> AsyncIterator[bytes]: ...

    async def sha256(self, offset: int, length: int) -> str | None: ...


@dataclass
class Progress:
    """What the caller's ``on_progress`` gets after every chunk."""

    sent_bytes: int          # bytes acknowledged by the server in this run
    done_bytes: int          # bytes the server has, counting chunks it had before
    total_bytes: int
    done_chunks: int
    total_chunks: int
    elapsed: float
    retries: int = 0

    @property
    def speed(self) -> float:
        """Bytes per second sent in this run."""
        return self.sent_bytes / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def eta(self) -> float | None:
        left = self.total_bytes - self.done_bytes
        return left / self.speed if self.speed > 0 else None


@dataclass
class UploadResult:
    session_id: str
    task_id: str | None
    sent_bytes: int
    total_bytes: int
    elapsed: float
    finalize: dict[str, Any] = field(default_factory=dict)
    chunk_latencies: list[float] = field(default_factory=list)
    retries: int = 0


class ChunkdClient:
    def __init__(
        self,
        base_url: str,
        *,
        parallel: int = 4,
        chunk_size: int | None = None,
        retries: int = 6,
        backoff: float = 0.5,
        max_backoff: float = 30.0,
        checksum: bool = True,
        timeout: float = 600.0,
        session: aiohttp.ClientSession | None = None,
        headers: dict[str, str] | None = None,
        token: str | Callable[[], str | Awaitable[str]] | None = None,
    ) -> None:
        if parallel < 1:
            raise ValueError("parallel must be at least 1")
        self.base_url = base_url.rstrip("/")
        self.parallel = parallel
        self.chunk_size = chunk_size
        self.retries = retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.checksum = checksum
        self.timeout = aiohttp.ClientTimeout(total=timeout, sock_connect=30)
        self._session = session
        self._own_session = session is None
        #: Sent with every request (e.g. the user's ``Authorization`` for a server that acts as
        #: them towards the transcription service).
        self.headers = dict(headers or {})
        #: chunkd's bearer token (a server with auth on): a string, or a function returning a
        #: fresh one (called before each request, so a long upload outlives a short token).
        self.token = token
        #: Failed requests by HTTP status (0: no answer), retried ones included.
        self.errors: Counter[int] = Counter()

    async def __aenter__(self) -> ChunkdClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def http(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0), timeout=self.timeout,
                headers=self.headers,
            )
        return self._session

    async def close(self) -> None:
        if self._own_session and self._session is not None:
            await self._session.close()
            self._session = None

    # -- the five endpoints ----------------------------------------------------------------

    async def _auth_headers(self) -> dict[str, str]:
        if self.token is None:
            return {}
        token = self.token() if callable(self.token) else self.token
        if not isinstance(token, str):
            token = await token
        return {"Authorization": f"Bearer {token}"}

    async def _json(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        kwargs["headers"] = {**kwargs.get("headers", {}), **await self._auth_headers()}
        try:
            async with self.http.request(method, self.base_url + path, **kwargs) as resp:
                body = await resp.read()
                status = resp.status
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise ChunkdClientError(0, "connection_error",
                                    f"cannot reach {self.base_url}: {exc or type(exc).__name__}"
                                    ) from None
        try:
            doc = orjson.loads(body)
        except orjson.JSONDecodeError:
            doc = None
        if status >= 400 or not isinstance(doc, dict):
            raise answer_error(status, body)
        return doc

    async def create_session(
        self,
        filename: str,
        total_size: int,
        *,
        chunk_size: int | None = None,
        language: str | None = None,
        model: str | None = None,
        task_params: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        chunk_size = chunk_size or self.chunk_size or 50 * 1024 * 1024
        body: dict[str, Any] = {
            "filename": filename,
            "total_size": total_size,
            "chunk_size": chunk_size,
            "total_chunks": math.ceil(total_size / chunk_size),
        }
        for key, value in (("language", language), ("model", model), ("task_params", task_params)):
            if value is not None:
                body[key] = value
        return await self._json("POST", "/upload/chunked/session", json=body)

    async def status(self, session_id: str) -> dict[str, Any]:
        return await self._json("GET", f"/upload/chunked/{session_id}/status")

    async def finalize(self, session_id: str) -> dict[str, Any]:
        return await self._with_retries(
            lambda: self._json("POST", f"/upload/chunked/{session_id}/finalize")
        )

    async def abort(self, session_id: str) -> dict[str, Any]:
        return await self._json("DELETE", f"/upload/chunked/{session_id}/abort")

    async def put_chunk(
        self, session_id: str, index: int, source: Source, offset: int, length: int
    ) -> dict[str, Any]:
        """Send one chunk once (no retry); the body streams from ``source``."""
        headers = {"Content-Type": "application/octet-stream", "Content-Length": str(length)}
        if self.checksum:
            digest = await source.sha256(offset, length)
            if digest is not None:
                headers["X-Chunk-Checksum"] = f"sha256={digest}"
        return await self._json(
            "POST", f"/upload/chunked/{session_id}/chunk", params={"index": str(index)},
            data=source.pieces(offset, length), headers=headers,
        )

    # -- whole uploads ---------------------------------------------------------------------

    async def _with_retries(self, call: Callable[[], Awaitable[_T]],
                            on_retry: Callable[[], None] | None = None) -> _T:
        for attempt in range(1, self.retries + 1):
            try:
                return await call()
            except ChunkdClientError as exc:
                self.errors[exc.status] += 1
                if not exc.retryable or attempt == self.retries:
                    raise
                if on_retry is not None:
                    on_retry()
                delay = min(self.max_backoff, self.backoff * 2 ** (attempt - 1))
                await asyncio.sleep(delay * random.uniform(0.5, 1.5))
        raise AssertionError("unreachable")

    async def upload(
        self,
        source: Source,
        *,
        session_id: str | None = None,
        language: str | None = None,
        model: str | None = None,
        task_params: dict[str, Any] | None = None,
        finalize: bool = True,
        on_progress: Callable[[Progress], None] | None = None,
        on_session: Callable[[str], None] | None = None,
    ) -> UploadResult:
        """Upload ``source`` (resuming ``session_id`` if given) and finalize it."""
        chunk_size: int
        total_chunks: int
        if session_id is None:
            created = await self._with_retries(lambda: self.create_session(
                source.name, source.size, language=language, model=model,
                task_params=task_params))
            session_id = created["session_id"]
            chunk_size, total_chunks = created["chunk_size"], created["total_chunks"]
            missing = list(range(total_chunks))
        else:
            st = await self._with_retries(lambda: self.status(session_id))
            if st["total_bytes"] != source.size:
                raise ChunkdClientError(409, "size_changed",
                                        "the file's size differs from the session's")
            chunk_size, total_chunks = st["chunk_size"], st["total_chunks"]
            missing = list(st["missing_chunks"])
            if st.get("task_id"):  # finalized before: nothing left to send
                missing = []
        if on_session is not None:
            on_session(session_id)
        sid = session_id

        def length(i: int) -> int:
            return min(chunk_size, source.size - i * chunk_size)

        done_bytes = source.size - sum(length(i) for i in missing)
        state = Progress(0, done_bytes, source.size, total_chunks - len(missing), total_chunks, 0.0)
        latencies: list[float] = []
        start = time.monotonic()
        queue: asyncio.Queue[int] = asyncio.Queue()
        for i in missing:
            queue.put_nowait(i)

        def count_retry() -> None:
            state.retries += 1

        async def worker() -> None:
            while True:
                try:
                    i = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                t0 = time.monotonic()
                try:
                    await self._with_retries(
                        partial(self.put_chunk, sid, i, source, i * chunk_size, length(i)),
                        count_retry,
                    )
                except ChunkdClientError as exc:
                    if exc.code != "session_finalized":
                        raise
                    return  # another run of this upload finished it: finalize gives its task
                except OSError as exc:
                    raise ChunkdClientError(-1, "read_error", f"cannot read {source.name}: "
                                            f"{exc.strerror or exc}") from None
                latencies.append(time.monotonic() - t0)
                state.sent_bytes += length(i)
                state.done_bytes += length(i)
                state.done_chunks += 1
                state.elapsed = time.monotonic() - start
                if on_progress is not None:
                    on_progress(state)

        workers = [asyncio.create_task(worker()) for _ in range(min(self.parallel, len(missing)))]
        try:
            await asyncio.gather(*workers)
        finally:
            for w in workers:
                w.cancel()
            await asyncio.gather(*workers, return_exceptions=True)
        final: dict[str, Any] = {}
        changed = getattr(source, "changed", None)
        if changed is not None and changed():
            raise ChunkdClientError(-1, "file_changed", f"{source.name} changed while it was "
                                    "being uploaded; not finalizing it")
        if finalize:
            final = await self.finalize(sid)
        return UploadResult(sid, final.get("task_id"), state.sent_bytes, source.size,
                            time.monotonic() - start, final, latencies, state.retries)

    async def follow(
        self, any_id: str, on_message: Callable[[dict[str, Any]], None] | None = None
    ) -> dict[str, Any] | None:
        """Follow ``/ws/tasks/{id}`` until the server closes it; return the final message."""
        url = self.base_url.replace("http", "ws", 1) + f"/ws/tasks/{any_id}"
        last: dict[str, Any] | None = None
        try:
            async with self.http.ws_connect(url, heartbeat=None, timeout=aiohttp.ClientWSTimeout(
                    ws_close=10), headers=await self._auth_headers()) as ws:
                async for msg in ws:
                    if msg.type != aiohttp.WSMsgType.TEXT:
                        continue
                    doc = orjson.loads(msg.data)
                    if on_message is not None:
                        on_message(doc)
                    if doc.get("type") in ("progress", "error"):
                        last = doc
                if ws.close_code not in (1000, None) and (last is None or not _final(last)):
                    meaning = {4404: "unknown session or task", 4410: "session expired or aborted",
                               4008: "too slow", 1001: "server going away"}
                    raise ChunkdClientError(
                        0, f"ws_{ws.close_code}", f"progress stream closed: {ws.close_code} "
                        f"({meaning.get(ws.close_code or 0, 'unexpected')})")
        except aiohttp.WSServerHandshakeError as exc:
            # e.g. an id chunkd does not know, relayed to the WhisperX service, which refused it
            raise ChunkdClientError(exc.status, f"ws_http_{exc.status}",
                                    f"progress stream refused: HTTP {exc.status} (unknown session "
                                    f"or task, or not yours)") from None
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise ChunkdClientError(0, "connection_error",
                                    f"cannot follow progress at {url}: {exc or type(exc).__name__}"
                                    ) from None
        return last


def _final(msg: dict[str, Any]) -> bool:
    return msg.get("type") == "error" or msg.get("stage") == "complete"
