"""The WhisperX hand-off: submit the file to a whisperX-FastAPI service and follow its task.

The service's protocol (pavelzbornik/whisperX-FastAPI and forks):

- ``POST /speech-to-text``: multipart field ``file``; every option is a query parameter
  (``language``, ``model``, ``task``, ``min_speakers``, ``max_speakers``, ``batch_size``,
  ``compute_type``, ...). Reply ``{"identifier": "<uuid>", "message": "Task queued"}``.
  The service decodes the audio before it answers, which can take longer than any proxy timeout:
  this runs in the background, never inside the finalize request.
- ``GET /task/{identifier}``: ``{"status": "queued"|"processing"|"completed"|"failed",
  "result": {"segments": [...]}, "error": ..., "metadata": {...}}``.
- ``GET /tasks/{identifier}/progress`` (some versions): ``{"progress_stage", "progress_percentage"}``
  with the stages the WhisperX frontend shows; used for finer progress when it exists.
- Errors: ``{"error": {"message", "code", ...}}`` or FastAPI's ``{"detail": ...}``.

Exactly once: the submission is claimed (``submit.once``) before the POST and the identifier is
remembered right after, so a restart polls the same task. A crash between the two leaves the
claim without an identifier; that is reported (``submission_interrupted``), never guessed at by
submitting again. Only failures that prove the service did not take the file (it could not be
reached, or answered 5xx/429) are retried, with backoff; a timeout or a dropped connection after
the file went out might have been accepted, so it is reported instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from typing import Any

import aiohttp
import orjson

from chunkd import errors as E
from chunkd.errors import HandoffFailed
from chunkd.handoff.base import Job, Outcome
from chunkd.model.task import Stage
from chunkd.store.base import Blob


def query_params(job: Job) -> dict[str, str]:
    """The session's language, model and task_params as query parameters."""
    meta = job.meta
    params: dict[str, Any] = {}
    if meta.language:
        params["language"] = meta.language
    if meta.model:
        params["model"] = meta.model
    params.update(meta.task_params)
    out = {}
    for key, value in params.items():
        if value is None:
            continue
        if isinstance(value, bool):
            out[key] = "true" if value else "false"
        elif isinstance(value, (dict, list)):
            out[key] = orjson.dumps(value).decode()
        else:
            out[key] = str(value)
    return out


def _file_field(blob: Blob, files: contextlib.ExitStack) -> Any:
    """The file for the multipart body, streamed so memory stays flat. A local file goes as a
    file object (aiohttp reads it in 64 KiB pieces and sends a Content-Length); a blob without a
    local path is streamed with chunked transfer encoding."""
    path = blob.local_path()
    if path is not None:
        return files.enter_context(open(path, "rb"))
    return blob.stream()


def service_error(status: int, body: bytes) -> HandoffFailed:
    """The service's error reply as a failure, with the code and message the service chose."""
    detail = body[:2000].decode("utf-8", "replace")
    answered = E.SERVICE_REFUSED.template.format(status=status)  # when it says nothing itself
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return E.SERVICE_REFUSED.forward(f"http_{status}", answered, detail)
    if isinstance(doc, dict) and isinstance(doc.get("error"), dict):
        err = doc["error"]
        return E.SERVICE_REFUSED.forward(str(err.get("code") or f"http_{status}"),
                                         str(err.get("message") or detail), detail)
    if isinstance(doc, dict) and "detail" in doc:
        d = doc["detail"]
        if isinstance(d, list):  # FastAPI validation: [{"loc": [...], "msg": "..."}]
            msg = "; ".join(
                f"{'.'.join(str(p) for p in e.get('loc', []))}: {e.get('msg', '')}"
                for e in d if isinstance(e, dict)
            )
            return E.SERVICE_REFUSED.forward("validation_error", msg or detail, detail)
        return E.SERVICE_REFUSED.forward(f"http_{status}", str(d), detail)
    return E.SERVICE_REFUSED.forward(f"http_{status}", answered, detail)


class WhisperXHandoff:
    name = "whisperx"
    inline = False
    once_claims: tuple[str, ...] = ("submit",)

    def __init__(
        self,
        base_url: str,
        *,
        token: str | None = None,
        submit_timeout: float = 3600.0,
        poll_interval: float = 2.0,
        retries: int = 5,
        retry_delay: float = 1.0,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.submit_timeout = submit_timeout
        self.poll_interval = poll_interval
        self.retries = retries
        self.retry_delay = retry_delay

    def _backoff(self, attempt: int) -> float:
        return self.retry_delay * (2 ** (attempt - 1)) * random.uniform(0.8, 1.2)

    async def run(self, job: Job) -> Outcome:
        async with aiohttp.ClientSession(headers=self.headers) as http:
            identifier = job.remembered.get("identifier")
            if identifier is None:
                if not await job.claim_once("submit"):
                    raise E.SUBMISSION_INTERRUPTED.handoff()
                await job.report(Stage.QUEUED, 0, "Sending the file to the transcription service")
                identifier = await self._submit(http, job)
                await job.remember(identifier=identifier)
                await job.report(Stage.QUEUED, 0, "Queued for transcription")
            return await self._follow(http, job, identifier)

    async def _submit(self, http: aiohttp.ClientSession, job: Job) -> str:
        url = f"{self.base_url}/speech-to-text"
        params = query_params(job)
        last = ""
        if job.blob is None:
            raise E.PROCESSING_FAILED.handoff("the finished file is gone")
        for attempt in range(1, self.retries + 1):
            try:
                with contextlib.ExitStack() as files:
                    form = aiohttp.FormData()
                    form.add_field("file", _file_field(job.blob, files), filename=job.meta.filename,
                                   content_type=job.mime_type or "application/octet-stream")
                    timeout = aiohttp.ClientTimeout(total=None, sock_connect=30,
                                                    sock_read=self.submit_timeout)
                    async with http.post(url, params=params, data=form, timeout=timeout) as resp:
                        body = await resp.read()
                        status = resp.status
            except aiohttp.ClientConnectorError as exc:
                last = f"cannot reach {self.base_url}: {exc}"
            except TimeoutError:
                raise E.SERVICE_TIMEOUT.handoff(seconds=self.submit_timeout) from None
            except (aiohttp.ClientError, OSError) as exc:
                raise E.SERVICE_DISCONNECTED.handoff(repr(exc)) from None
            else:
                if 200 <= status < 300:
                    try:
                        return str(orjson.loads(body)["identifier"])
                    except (orjson.JSONDecodeError, KeyError, TypeError):
                        raise E.BAD_SERVICE_REPLY.handoff(
                            body[:2000].decode("utf-8", "replace")) from None
                refused = service_error(status, body)
                if status < 500 and status != 429:
                    raise refused  # it will not get better
                last = f"{status} {refused.code}: {refused.message}"
            if attempt < self.retries:
                await asyncio.sleep(self._backoff(attempt))
        raise E.SERVICE_UNAVAILABLE.handoff(last, tries=self.retries)

    async def _follow(self, http: aiohttp.ClientSession, job: Job, identifier: str) -> Outcome:
        failures = 0
        has_progress = True
        timeout = aiohttp.ClientTimeout(total=60)
        while True:
            try:
                async with http.get(f"{self.base_url}/task/{identifier}", timeout=timeout) as resp:
                    body = await resp.read()
                    status = resp.status
                if status >= 500 or status == 429:
                    raise aiohttp.ClientResponseError(
                        resp.request_info, (), status=status, message=body[:500].decode("utf-8", "replace")
                    )
                if status != 200:
                    raise service_error(status, body)
                doc = orjson.loads(body)
                state = doc.get("status")
                if state == "completed":
                    return Outcome(message="Transcription complete", result=doc.get("result"))
                if state == "failed":
                    error = doc.get("error") or "The transcription failed"
                    raise E.TRANSCRIPTION_FAILED.handoff(
                        body[:2000].decode("utf-8", "replace"), reason=str(error))
                waiting = state in ("queued", "pending")  # the service's words
                stage, pct = (Stage.QUEUED, 0) if waiting else (Stage.TRANSCRIBING, 10)
                if has_progress and not waiting:
                    found = await self._progress(http, identifier, timeout)
                    if found is None:
                        has_progress = False
                    else:
                        stage, pct = found
                await job.report(stage, pct, f"{stage.capitalize()}")
                failures = 0
            except (TimeoutError, aiohttp.ClientError, orjson.JSONDecodeError) as exc:
                failures += 1
                if failures >= self.retries:
                    raise E.SERVICE_UNREACHABLE.handoff(repr(exc), tries=failures) from None
                await asyncio.sleep(self._backoff(failures))
                continue
            await asyncio.sleep(self.poll_interval)

    async def _progress(
        self, http: aiohttp.ClientSession, identifier: str, timeout: aiohttp.ClientTimeout
    ) -> tuple[Stage, int] | None:
        """The finer stage from ``/tasks/{id}/progress``; None when the service has no such route."""
        async with http.get(f"{self.base_url}/tasks/{identifier}/progress", timeout=timeout) as resp:
            if resp.status in (404, 405):
                return None
            if resp.status != 200:
                raise aiohttp.ClientResponseError(resp.request_info, (), status=resp.status)
            doc = await resp.json(loads=orjson.loads)
        # An unknown or final stage is shown as transcribing by the journal ("complete" is said
        # once, with the result).
        stage = Stage.reported(doc.get("progress_stage") or Stage.TRANSCRIBING)
        return stage, int(doc.get("progress_percentage") or 0)
