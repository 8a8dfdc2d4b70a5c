"""The WhisperX hand-off: submit the file to a whisperX-FastAPI service and follow its task.

The service's protocol (upstream pavelzbornik/whisperX-FastAPI and the logingrupa fork; the
facts, with file and line references, are in the project's research notes):

- ``POST /speech-to-text``: multipart field ``file``; every option is a query parameter
  (``language``, ``model``, ``task``, ``min_speakers``, ...; a list such as ``suppress_tokens``
  as repeated keys). Reply ``{"identifier": "<uuid>", "message": "Task queued"}``. The service
  reads and decodes the whole file before it answers, which can take longer than any proxy
  timeout: this runs in the background, never inside the finalize request. The fork answers 429
  with ``Retry-After`` (60 s or 3600 s) for its rate and concurrency limits, 403/402 for its
  plan limits, 401 without a credential.
- ``GET /task/{identifier}``: ``{"status": "queued"|"processing"|"completed"|"failed",
  "result": {"segments": [...], "word_segments": [...]}, "error": str|null, "metadata": {...}}``.
  The fork scopes tasks to their owner (another user's task is a 404).
- ``GET /tasks/{identifier}/progress`` (the fork only; upstream answers 404):
  ``{"progress_stage", "progress_percentage", ...}`` with the stages its frontend shows. The
  fork writes ``complete`` a moment before ``status`` says ``completed``.

Exactly once: the submission is claimed (``submit.once``) before the POST and the identifier is
remembered right after, so a restart polls the same task. A crash between the two leaves the
claim without an identifier; that is reported (``submission_interrupted``), never guessed at by
submitting again. Only answers that prove the service did not take the file (it could not be
reached, or answered 503/429: busy) are sent again: after the service's ``Retry-After`` for as
long as ``retry_window`` allows, else after a backoff (at least as long as the last send took) up
to ``retries`` times. A 500, a proxy's 502/504, a timeout or a dropped connection may come after
the service took the file, so they are reported instead (``chunkd retry`` sends it again).

Following ends on ``completed`` or ``failed``, and also when nothing moved for ``stall_timeout``
(or three times the audio's length, if longer; a task waiting ``queued`` for a worker never
stalls) -- the service loses its running tasks on a restart and leaves them ``processing``
forever -- or after ``max_duration``: each is an error ``chunkd retry`` recovers from. Looks that
fail in between only wait. Progress only moves forward.

Credentials: the service token (``--whisperx-token``), or, with ``--whisperx-credentials user``,
the credential of the user who finalized (``job.credential``, memory only), so the task is
theirs on the service. After a restart that credential is gone: the task is followed with the
service token if there is one, else reported as ``not_followable`` with its identifier.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import ipaddress
import random
import time
from collections.abc import Mapping, Sequence
from http.cookies import CookieError, SimpleCookie
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import orjson

from chunkd import errors as E
from chunkd.config import PROXY_BODY_LIMIT, ConfigError
from chunkd.errors import HandoffFailed
from chunkd.handoff.base import Credential, Job, Outcome
from chunkd.model.task import Stage
from chunkd.store.base import Blob

#: The fork's cookie auth: its ``session`` cookie (a JWT) and the double-submit CSRF cookie,
#: whose value the ``X-CSRF-Token`` header must repeat on a POST.
SESSION_COOKIE = "session"
CSRF_COOKIE = "csrf_token"


#: Where a user's service API key travels when ``Authorization`` carries chunkd's own token.
SERVICE_AUTH_HEADER = "X-WhisperX-Authorization"


def user_credential(headers: Mapping[str, str], *, chunkd_auth: bool = False
                    ) -> Credential | None:
    """The user's credential for the service from a request's headers, or None: a Bearer key
    in ``X-WhisperX-Authorization`` (or in ``Authorization`` when chunkd's own auth is off and
    that header is free), else the ``session`` cookie with ``X-CSRF-Token``. Only those are
    kept: other cookies of the origin (e.g. Cloudflare's) are not the service's business, and
    a cookie without the CSRF token could not submit."""
    names = (SERVICE_AUTH_HEADER,) if chunkd_auth else (SERVICE_AUTH_HEADER, "Authorization")
    for name in names:
        auth = headers.get(name, "")
        if auth.lower().startswith("bearer ") and auth[7:].strip():
            return Credential({"Authorization": auth})
    jar: SimpleCookie = SimpleCookie()
    with contextlib.suppress(CookieError):
        jar.load(headers.get("Cookie", ""))
    csrf = headers.get("X-CSRF-Token", "")
    if SESSION_COOKIE not in jar or not jar[SESSION_COOKIE].value or not csrf:
        return None
    cookies = [f"{name}={jar[name].value}" for name in (SESSION_COOKIE, CSRF_COOKIE) if name in jar]
    return Credential({"Cookie": "; ".join(cookies), "X-CSRF-Token": csrf})


def _query_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return orjson.dumps(value).decode()
    return str(value)


def query_params(job: Job, defaults: Sequence[tuple[str, str]] = ()) -> list[tuple[str, str]]:
    """The session's language, model and task_params as query parameters, over the operator's
    ``defaults``. A list goes as repeated keys (``suppress_tokens=-1&suppress_tokens=5``), as
    FastAPI reads a ``list[int]`` query. ``language`` ``auto`` is left out: the service has no
    auto-detection and uses its own default language (``DEFAULT_LANG``, ``en``) when none is
    sent, which is what its own upload path does with ``auto`` too."""
    meta = job.meta
    repeated: dict[str, list[str]] = {}
    for key, value in defaults:  # a repeated key is a list, as on the session's side
        repeated.setdefault(key, []).append(value)
    params: dict[str, Any] = {k: v[0] if len(v) == 1 else v for k, v in repeated.items()}
    if meta.language:
        params["language"] = meta.language
    if meta.model:
        params["model"] = meta.model
    params.update(meta.task_params)
    if str(params.get("language", "")).strip().lower() == "auto":
        del params["language"]
    out = []
    for key, value in params.items():
        for item in value if isinstance(value, (list, tuple)) else [value]:
            if item is not None:
                out.append((key, _query_text(item)))
    return out


def retry_after(headers: Mapping[str, str], now: float | None = None) -> float | None:
    """``Retry-After`` in seconds (a number, or an HTTP date); None when absent or unreadable."""
    text = (headers.get("Retry-After") or "").strip()
    if not text:
        return None
    if text.isdigit():
        return float(text)
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def _json_object(body: bytes) -> dict[str, Any]:
    """A 200 look's body, or :class:`_Transient` when it is not a JSON object."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise _Transient("the answer is not JSON") from None
    if not isinstance(doc, dict):
        raise _Transient("the answer is not a JSON object")
    return doc


def _audio_seconds(doc: dict[str, Any]) -> float:
    """The task's audio length from its ``metadata`` (0 when the service does not say)."""
    metadata = doc.get("metadata")
    value = metadata.get("audio_duration") if isinstance(metadata, dict) else None
    return float(value) if isinstance(value, (int, float)) and value > 0 else 0.0


def _describe(exc: BaseException) -> str:
    """An error for ``technical_detail``. Never ``repr``: an aiohttp error's repr holds the
    request's headers, which may carry the user's credential."""
    return f"{type(exc).__name__}: {exc}"


def task_failure(raw: str) -> HandoffFailed:
    """A failed task for people: a stable code, a sentence they can act on, the service's raw
    text (often a Python exception) kept for operators in ``technical_detail``."""
    if "out of memory" in raw.lower():
        return E.TRANSCRIPTION_OUT_OF_MEMORY.handoff(raw)
    return E.TRANSCRIPTION_FAILED.handoff(raw)


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


#: Refusals that prove the service did not take the file (it says: busy, come back later).
RESEND_STATUSES = (429, 503)
#: A task may show no change for this many times its audio's length before it counts as lost
#: (a CPU transcription runs at about real time; upstream reports no progress while it works).
STALL_AUDIO_FACTOR = 3.0


class _Transient(Exception):
    """A look at the task that may work next time (timeout, 5xx, 429, dropped connection)."""


class _NoProgressRoute(Exception):
    """The service has no ``/tasks/{id}/progress`` (upstream)."""


class WhisperXHandoff:
    name = "whisperx"
    inline = False
    once_claims: tuple[str, ...] = ("submit",)

    def __init__(
        self,
        base_url: str,
        *,
        token: str | None = None,
        act_as_user: bool = False,
        defaults: Sequence[tuple[str, str]] = (),
        submit_timeout: float = 3600.0,
        poll_interval: float = 2.0,
        retries: int = 5,
        retry_delay: float = 1.0,
        retry_window: float = 900.0,
        stall_timeout: float = 1800.0,
        max_duration: float = 86400.0,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.service = Credential({"Authorization": f"Bearer {token}"}) if token else None
        self.act_as_user = act_as_user
        self.defaults = tuple(defaults)
        self.submit_timeout = submit_timeout
        self.poll_interval = poll_interval
        self.retries = retries
        self.retry_delay = retry_delay
        self.retry_window = retry_window
        self.stall_timeout = stall_timeout
        self.max_duration = max_duration

    def _backoff(self, attempt: int) -> float:
        return self.retry_delay * (2 ** (attempt - 1)) * random.uniform(0.8, 1.2)

    def _credentials(self, job: Job) -> list[tuple[str, Credential | None]]:
        """Who to ask as, in order: the user (when acting as them), then the service token."""
        found: list[tuple[str, Credential | None]] = []
        if job.credential is not None:
            found.append(("the user's credential", job.credential))
        if self.service is not None:
            found.append(("--whisperx-token", self.service))
        if not found and not self.act_as_user:
            found.append(("no credential", None))  # a service without auth (upstream)
        return found

    async def run(self, job: Job) -> Outcome:
        credentials = self._credentials(job)
        async with aiohttp.ClientSession() as http:
            identifier = job.remembered.get("identifier")
            if identifier is None:
                if self.act_as_user and job.credential is None:
                    raise E.CREDENTIAL_LOST.handoff()  # never submit as someone else
                if not await job.claim_once("submit"):
                    raise E.SUBMISSION_INTERRUPTED.handoff()
                await job.report(Stage.QUEUED, 0, "Sending the file to the transcription service")
                identifier = await self._submit(http, job, credentials[0][1])
                await job.remember(identifier=identifier, submitted_at=time.time())
                await job.report(Stage.QUEUED, 0, "Queued for transcription")
            if not credentials:
                raise E.NOT_FOLLOWABLE.handoff(
                    identifier=identifier,
                    reason="it keeps no user's credential across a restart, and no "
                    "--whisperx-token is configured")
            submitted = float(job.remembered.get("submitted_at") or time.time())
            return await self._follow(http, job, str(identifier), credentials, submitted)

    async def _submit(self, http: aiohttp.ClientSession, job: Job, who: Credential | None
                      ) -> str:
        url = f"{self.base_url}/speech-to-text"
        params = query_params(job, self.defaults)
        headers = dict(who.headers) if who is not None else {}
        last = ""
        if job.blob is None:
            raise E.PROCESSING_FAILED.handoff("the finished file is gone")
        window_ends = time.monotonic() + self.retry_window
        sends = tries = 0  # tries: refusals that did not say when to come back
        while True:
            sends += 1
            sent_at = time.monotonic()
            asked: float | None = None  # the service's Retry-After
            try:
                with contextlib.ExitStack() as files:
                    form = aiohttp.FormData()
                    form.add_field("file", _file_field(job.blob, files), filename=job.meta.filename,
                                   content_type=job.mime_type or "application/octet-stream")
                    timeout = aiohttp.ClientTimeout(total=None, sock_connect=30,
                                                    sock_read=self.submit_timeout)
                    async with http.post(url, params=params, data=form, headers=headers,
                                         timeout=timeout, allow_redirects=False) as resp:
                        body = await resp.read()
                        status = resp.status
                        asked = retry_after(resp.headers)
            except aiohttp.ClientConnectorError as exc:
                last = f"cannot reach {self.base_url}: {exc}"
            except TimeoutError:
                raise E.SERVICE_TIMEOUT.handoff(seconds=self.submit_timeout) from None
            except (aiohttp.ClientError, OSError) as exc:
                raise E.SERVICE_DISCONNECTED.handoff(_describe(exc)) from None
            else:
                if 200 <= status < 300:
                    try:
                        return str(orjson.loads(body)["identifier"])
                    except (orjson.JSONDecodeError, KeyError, TypeError):
                        raise E.BAD_SERVICE_REPLY.handoff(
                            body[:2000].decode("utf-8", "replace")) from None
                refused = service_error(status, body)
                if status not in RESEND_STATUSES:
                    # 4xx will not get better; a 500, or a proxy's 502/504, may come after the
                    # service took the file: sending it again could make a second task.
                    raise refused
                last = f"{status} {refused.code}: {refused.message}"
            if asked is None:
                tries += 1
                if tries >= self.retries:
                    break
            # Each send is the whole file: wait as the service asked, else back off; never less
            # than the send took (at most half the time goes to resending) or the retry delay.
            pause = max(asked if asked is not None else self._backoff(tries),
                        time.monotonic() - sent_at, self.retry_delay)
            if time.monotonic() + pause > window_ends:
                if asked is not None:
                    raise E.SERVICE_BUSY.handoff(last, wait=asked, window=self.retry_window)
                break
            await job.report(Stage.QUEUED, 0, f"The transcription service is busy; sending "
                             f"again in {pause:.0f} s")
            await asyncio.sleep(pause)
        raise E.SERVICE_UNAVAILABLE.handoff(last, tries=sends)

    async def _follow(self, http: aiohttp.ClientSession, job: Job, identifier: str,
                      credentials: list[tuple[str, Credential | None]], submitted: float
                      ) -> Outcome:
        has_progress = True
        failures = 0
        seen: tuple[Any, ...] | None = None
        moved = time.monotonic()  # when the task last changed (or following began)
        waiting = False  # queued: in line for a worker, which is no stall however long
        stall_limit = self.stall_timeout
        while True:
            if time.time() - submitted > self.max_duration:
                raise E.TRANSCRIPTION_TIMEOUT.handoff(
                    f"identifier {identifier}", identifier=identifier,
                    hours=self.max_duration / 3600)
            if not waiting and time.monotonic() - moved > stall_limit:
                raise E.SERVICE_STALLED.handoff(
                    f"identifier {identifier}; last seen {seen}", identifier=identifier,
                    minutes=stall_limit / 60)
            who, credential = credentials[0]
            headers = dict(credential.headers) if credential is not None else {}
            try:
                status, body = await self._get(http, f"/task/{identifier}", headers)
                if status in (401, 403, 404) and (len(credentials) > 1 or self.act_as_user):
                    if len(credentials) > 1:  # e.g. the user's session expired: the token next
                        credentials = credentials[1:]
                        continue
                    raise E.NOT_FOLLOWABLE.handoff(
                        body[:2000].decode("utf-8", "replace"), identifier=identifier,
                        reason=f"the service answers {status} to {who}")
                if status != 200:
                    raise service_error(status, body)
                doc = _json_object(body)  # e.g. a proxy's HTML maintenance page: look again
                state = doc.get("status")
                stall_limit = max(self.stall_timeout, STALL_AUDIO_FACTOR * _audio_seconds(doc))
                if state == "completed":
                    return Outcome(message="Transcription complete", result=doc.get("result"))
                if state == "failed":
                    raise task_failure(str(doc.get("error") or "the service gave no reason"))
                progress = None
                waiting = state in ("queued", "pending")  # the service's words for waiting
                if waiting:
                    progress = (Stage.QUEUED, 0)
                elif has_progress:
                    try:
                        progress = await self._progress(http, identifier, headers)
                    except _NoProgressRoute:
                        has_progress = False
                if not has_progress:
                    progress = (Stage.TRANSCRIBING, 10)  # all a service without the route says
                now_seen = (state, progress)
                if now_seen != seen:
                    seen, moved = now_seen, time.monotonic()
                if progress is not None:  # a null, final or unknown stage: keep the last one
                    await job.report(progress[0], progress[1], progress[0].capitalize())
                failures = 0
            except _Transient:
                failures += 1  # only the deadlines above end the following
                await asyncio.sleep(min(max(self._backoff(failures), self.poll_interval), 30.0))
                continue
            await asyncio.sleep(self.poll_interval)

    async def _get(self, http: aiohttp.ClientSession, path: str, headers: dict[str, str]
                   ) -> tuple[int, bytes]:
        """One look; a timeout, a dropped connection, a 5xx or a 429 is :class:`_Transient`."""
        try:
            async with http.get(f"{self.base_url}{path}", headers=headers, allow_redirects=False,
                                timeout=aiohttp.ClientTimeout(total=60)) as resp:
                body = await resp.read()
                if resp.status >= 500 or resp.status == 429:
                    raise _Transient(f"{resp.status} {body[:200].decode('utf-8', 'replace')}")
                return resp.status, body
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise _Transient(_describe(exc)) from None

    async def _progress(self, http: aiohttp.ClientSession, identifier: str,
                        headers: dict[str, str]) -> tuple[Stage, int] | None:
        """The finer stage from ``/tasks/{id}/progress``; None when it names no working stage
        (null before the worker starts, or ``complete`` before ``completed``). Raises
        :class:`_NoProgressRoute` for a service without the route (upstream)."""
        status, body = await self._get(http, f"/tasks/{identifier}/progress", headers)
        if status in (404, 405):
            raise _NoProgressRoute
        if status != 200:
            raise _Transient(f"progress answered {status}")
        doc = _json_object(body)
        try:
            stage = Stage(str(doc.get("progress_stage")))
        except ValueError:
            return None
        if stage.is_final:
            return None
        return stage, int(doc.get("progress_percentage") or 0)


async def check_service_url(url: str, max_file_size: int, *, timeout: float = 5.0) -> list[str]:
    """At start: is ``url`` the service's own origin, or a proxy with a body limit in front?

    A submission is the whole file in one request; through Cloudflare (100 MB) a bigger one gets
    413. An answer carrying Cloudflare's headers (``CF-RAY``, ``Server: cloudflare``) is refused
    when files over that limit are allowed (:class:`~chunkd.config.ConfigError`); a service that
    cannot be reached now, or a public address, is only warned about (returned lines).
    """
    warnings: list[str] = []
    host = urlsplit(url).hostname or ""
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, None)
        addresses = {ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos}
    except (OSError, ValueError):
        addresses = set()
    if addresses and not any(a.is_private or a.is_loopback for a in addresses):
        warnings.append(
            f"--whisperx-url {url} is a public address; if a proxy with a body limit (Cloudflare: "
            f"100 MB) sits in front of it, big files will be refused. Use the service's internal "
            f"origin.")
    try:
        async with aiohttp.ClientSession() as http, http.get(
            url.rstrip("/") + "/", timeout=aiohttp.ClientTimeout(total=timeout),
            allow_redirects=False,
        ) as resp:
            headers = resp.headers
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        warnings.append(f"cannot reach the WhisperX service at {url} now ({type(exc).__name__}); "
                        f"each hand-off will try again")
        return warnings
    proxied = "CF-RAY" in headers or headers.get("Server", "").lower() == "cloudflare"
    if proxied and max_file_size > PROXY_BODY_LIMIT:
        raise ConfigError(
            f"--whisperx-url {url} answers through Cloudflare (CF-RAY header): a submission is "
            f"the whole file in one request, so any file over 100 MB would get 413. Use the "
            f"service's internal origin (e.g. http://whisperx:8000), or --max-file-size 95MB")
    return warnings
