"""A small tus 1.0.0 client for benchmarks: creation, PATCHes one after the other, a HEAD.

    tus = TusClient(http, "http://127.0.0.1:8080/files/", chunk_size=50 * 1024 * 1024)
    up = await tus.upload(GeneratedSource(size), filetype="audio/wav")
    await tus.delete(up.url)                             # termination, where the server has it

It speaks only the core protocol and the creation extension, so it drives any tus 1.0 server
(chunkd's ``--tus-path``, tusd, tuspyserver, @tus/server) with the same requests. Every upload
carries ``filename``, ``filetype`` and a ``taskId`` UUID in ``Upload-Metadata``, as the WhisperX
fork's frontend sends them. Nothing is retried: a refused or failed request fails the upload
with a :class:`TusError` (and is counted in ``errors``), which is what a benchmark must see.
"""

from __future__ import annotations

import base64
import time
import uuid
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urljoin

import aiohttp

from chunkd.client.core import ChunkdClientError, Source, answer_error

TUS_VERSION = "1.0.0"
OFFSET_STREAM = "application/offset+octet-stream"
#: ``TusError.code`` when the URL answers creation like no tus server would.
NOT_TUS = "not_tus"
#: Statuses that say who is asking is the problem, not the protocol.
AUTH_STATUSES = (401, 403)


class TusError(ChunkdClientError):
    """A tus request failed (``status`` 0: no answer); ``code`` :data:`NOT_TUS`: the URL is not
    a tus 1.0 creation endpoint."""


@dataclass
class TusUpload:
    url: str                  # the upload's URL (``Location``, resolved against the endpoint)
    size: int
    task_id: str              # the ``taskId`` its metadata carried
    latencies: list[float]    # seconds per PATCH, in order
    lengths: list[int]        # bytes per PATCH


def encode_metadata(pairs: Mapping[str, str]) -> str:
    """``Upload-Metadata``: ``key base64(value)`` pairs, comma-separated."""
    return ",".join(f"{k} {base64.b64encode(v.encode()).decode('ascii')}"
                    for k, v in pairs.items())


def _offset(headers: Mapping[str, str]) -> int:
    try:
        return int(headers.get("Upload-Offset", ""))
    except ValueError:
        return -1


class TusClient:
    """tus requests through the caller's ``http`` session (its timeouts and connection pool),
    with ``Authorization: Bearer <token>`` on each when a token is given."""

    def __init__(self, http: aiohttp.ClientSession, endpoint: str, *, chunk_size: int,
                 token: str | None = None) -> None:
        if chunk_size < 1:
            raise ValueError("chunk_size must be at least 1")
        self.http = http
        self.endpoint = endpoint
        self.chunk_size = chunk_size
        self.token = token
        #: Failed requests by HTTP status (0: no answer); termination not included.
        self.errors: Counter[int] = Counter()

    async def _send(self, method: str, url: str, headers: Mapping[str, str] | None = None,
                    data: Any = None, *, counted: bool = True
                    ) -> tuple[int, Mapping[str, str], bytes]:
        sent = {"Tus-Resumable": TUS_VERSION, **(headers or {})}
        if self.token:
            sent["Authorization"] = f"Bearer {self.token}"
        try:
            async with self.http.request(method, url, headers=sent, data=data) as resp:
                return resp.status, resp.headers, await resp.read()
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            if counted:
                self.errors[0] += 1
            raise TusError(0, "connection_error",
                           f"cannot reach {url}: {exc or type(exc).__name__}") from None

    def _refused(self, status: int, body: bytes, what: str) -> TusError:
        self.errors[status] += 1
        err = answer_error(status, body)
        return TusError(status, err.code, f"{what}: {err.message}", err.details)

    async def create(self, size: int, metadata: Mapping[str, str]) -> str:
        """POST (creation) with ``Upload-Length``; the new upload's URL."""
        status, headers, body = await self._send("POST", self.endpoint, {
            "Upload-Length": str(size), "Content-Length": "0",
            "Upload-Metadata": encode_metadata(metadata)})
        if status == 201 and "Location" in headers:
            return urljoin(self.endpoint, headers["Location"])
        if status not in AUTH_STATUSES and (status == 201 or "Tus-Resumable" not in headers):
            self.errors[status] += 1
            lacks = "Location" if status == 201 else "Tus-Resumable header"
            raise TusError(status, NOT_TUS, f"{self.endpoint} is not a tus 1.0 creation endpoint "
                           f"(its answer to the creation POST, {status}, has no {lacks})",
                           {"server": headers.get("Server", "")})
        raise self._refused(status, body, "tus creation POST")

    async def patch(self, url: str, source: Source, offset: int, length: int) -> int:
        """Send ``length`` bytes of ``source`` at ``offset``; the server's new offset, which
        must be ``offset + length``."""
        status, headers, body = await self._send("PATCH", url, {
            "Upload-Offset": str(offset), "Content-Length": str(length),
            "Content-Type": OFFSET_STREAM}, source.pieces(offset, length))
        if status != 204:
            raise self._refused(status, body, f"tus PATCH at offset {offset}")
        got = _offset(headers)
        if got != offset + length:
            self.errors[status] += 1
            raise TusError(status, "bad_offset", f"tus PATCH of {length} bytes at offset {offset}:"
                           f" the server says offset {got}")
        return got

    async def head(self, url: str) -> int:
        """The upload's offset as the server has it."""
        status, headers, body = await self._send("HEAD", url)
        if status not in (200, 204):
            raise self._refused(status, body, "tus HEAD")
        return _offset(headers)

    async def delete(self, url: str) -> int:
        """Termination; the answer's status (204: removed; 0: no answer). Never raises: a server
        without the termination extension keeps the upload, that is all."""
        try:
            status, _, _ = await self._send("DELETE", url, counted=False)  # not part of the load
        except TusError:
            return 0
        return status

    async def upload(
        self,
        source: Source,
        *,
        filetype: str = "application/octet-stream",
        task_id: str | None = None,
        on_created: Callable[[str], None] | None = None,
        on_patch: Callable[[int, float], None] | None = None,
    ) -> TusUpload:
        """Create the upload, PATCH it ``chunk_size`` at a time (each PATCH starts at the offset
        the last one ended at: a tus upload is sequential), then check with a HEAD that the
        server has it all. ``on_created(url)`` once the server made it (so a caller can remove
        it even if this is cancelled); ``on_patch(offset, seconds)`` after each PATCH."""
        task_id = task_id or str(uuid.uuid4())
        url = await self.create(source.size, {"filename": source.name, "filetype": filetype,
                                              "taskId": task_id})
        if on_created is not None:
            on_created(url)
        latencies: list[float] = []
        lengths: list[int] = []
        offset = 0
        while offset < source.size:
            length = min(self.chunk_size, source.size - offset)
            t0 = time.perf_counter()
            offset = await self.patch(url, source, offset, length)
            latencies.append(time.perf_counter() - t0)
            lengths.append(length)
            if on_patch is not None:
                on_patch(offset, latencies[-1])
        have = await self.head(url)
        if have != source.size:
            self.errors[200] += 1
            raise TusError(200, "bad_offset", f"tus HEAD after the last PATCH: the server has "
                           f"{have} of {source.size} bytes")
        return TusUpload(url, source.size, task_id, latencies, lengths)
