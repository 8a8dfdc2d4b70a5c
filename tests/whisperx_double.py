"""A test double of the whisperX-FastAPI transcription service, in two variants, on 127.0.0.1.

What it models (facts: ``/work/shared/research/whisperx-protocol.md`` §1 and §3; file references
are to ``pavelzbornik/whisperX-FastAPI`` ("upstream") and ``logingrupa/whisperX-FastAPI`` ("fork")):

``variant="upstream"`` (no auth, no progress route, no WebSocket):

- ``POST /speech-to-text`` (``app/api/audio_api.py``). Multipart field ``file``; every option is a
  query parameter of pydantic models behind ``Depends()`` (``app/schemas.py``; the fork's
  ``app/schemas/core_schemas.py`` is the same). The request goes in FastAPI's order: the whole
  body is read first; then the query is validated (422 ``{"detail": [{type, loc, msg, input}]}``:
  ``int_parsing``, ``float_parsing``, ``bool_parsing``, ``enum`` with ``ctx.expected``; a list
  field such as ``suppress_tokens`` is repeated keys, so ``suppress_tokens=[-1]`` is an
  ``int_parsing`` error at ``["query", "suppress_tokens", 0]``; a missing ``file`` is ``missing``
  at ``["body", "file"]``; unknown keys are ignored); then the extension against
  ``ALLOWED_EXTENSIONS`` (``app/core/config.py``; 400 ``{"detail": "Invalid file extension for file
  X. Allowed: {...}"}``, ``app/services/file_service.py``); then the decode of the whole file,
  inside the request (``decode_seconds``; an undecodable file is 400 ``AUDIO_PROCESSING_ERROR``,
  ``app/core/exceptions.py``). The answer is 200 ``{"identifier", "message": "Task queued"}``.
- The task is ``queued`` (for ``queue_seconds``), then ``processing``, then ``completed`` or
  ``failed`` with ``error=str(e)``.
- ``GET /task/{identifier}`` (``app/api/task_api.py``): ``Result`` = ``{status, result, metadata,
  error}``; unknown ids are 404 ``{"error": {"code": "TASK_NOT_FOUND", "identifier", ...}}``.
- ``GET /task/all``: ``{"tasks": [...]}``. Anything else: 404 ``{"detail": "Not Found"}``; a
  WebSocket handshake to a path with no WebSocket route is refused with 403, as Starlette's
  router does (``/ws/tasks/*`` on upstream).

``variant="fork"`` adds (all from the fork):

- Auth on every route (``app/core/dual_auth.py``, ``app/api/dependencies.py``):
  ``Authorization: Bearer whsk_<8>_<22>`` (a :class:`User`'s ``api_key``) wins; otherwise the
  ``session`` cookie. Failure: 401 ``{"detail": "Authentication required"}`` with
  ``WWW-Authenticate: Bearer realm="whisperx"``. For cookie auth, POST/PUT/PATCH/DELETE need
  ``X-CSRF-Token`` equal to the ``csrf_token`` cookie (double submit, ``app/core/csrf.py``,
  ``app/core/csrf_middleware.py``): 403 ``{"detail": "CSRF token missing"}`` or ``... mismatch``.
- The tier gate after the decode (``app/services/free_tier_gate.py``, ``app/core/plan_tiers.py``,
  ``app/api/exception_handlers.py``), fail-fast in the real order: trial expired (402
  ``TRIAL_EXPIRED``); hourly rate (429 ``RATE_LIMIT_EXCEEDED``, ``Retry-After`` 60); file length,
  model, diarization (``min_speakers``/``max_speakers``) (403 ``FREE_TIER_VIOLATION``); daily
  audio minutes (429 ``RATE_LIMIT_EXCEEDED``, ``Retry-After`` 3600); concurrency (429
  ``CONCURRENCY_LIMIT``, ``Retry-After`` 60). The hourly and daily buckets are token buckets
  consumed as each gate passes (a later refusal does not give the token back); a concurrency slot
  is held until the pipeline ends. free/trial: 5/h, 5 min per file, 30 min/day, tiny+small, no
  diarization, 1 at a time. pro: 100/h, 60 min per file, 600 min/day, tiny base small medium large
  large-v2 large-v3, 3 at a time.
- Tasks start ``processing`` with ``progress_stage`` null and belong to their user (another
  user's task is 404 ``TASK_NOT_FOUND``). The pipeline (``app/services/whisperx_wrapper_service.py``)
  writes queued 0, transcribing 10, aligning 40, diarizing 60, diarizing 80, complete 100, and
  only then ``status=completed`` with the result (``complete_window`` apart).
- ``GET /tasks/{identifier}/progress``: ``{identifier, status, progress_percentage,
  progress_stage, error}``.
- ``POST /api/ws/ticket {"task_id"}`` (``app/api/ws_ticket_routes.py``,
  ``app/services/ws_ticket_service.py``): 201 ``{ticket, expires_at}``, single use, 60 s, for the
  caller's own task; else 404 ``{"detail": "Task not found"}``.
- ``/ws/tasks/{task_id}?ticket=`` (``app/api/websocket_api.py``,
  ``app/infrastructure/websocket/``): a missing, bad, used or expired ticket is refused before
  the handshake (403). Then ``progress`` messages as the pipeline moves, ``error``
  (``PROCESSING_FAILED``) when it fails, ``heartbeat`` every ``heartbeat_seconds``, ``pong`` for
  ``ping``; messages sent while nobody listened (at most 20) go to the next joiner, once. The
  server never closes the socket after ``complete``.

Knobs: ``variant``; ``users`` (fork), :meth:`WhisperXDouble.add_user` and ``user(name)``
(:meth:`User.bearer` and :meth:`User.cookie` give the request headers); ``token`` (upstream:
require exactly ``Bearer <token>``; fork: a pro user with that API key); ``decode_seconds``;
``step_seconds`` (time between pipeline stages); ``complete_window``; ``queue_seconds``;
``fail_posts`` (that many 503 ``INFRASTRUCTURE_ERROR`` after the body is read); ``reject`` (a
fixed ``(status, body)`` answer after the body is read); ``hang`` (the POST never answers);
``hold`` (an Event: tasks wait at transcribing until it is set); ``fail_task`` (the pipeline raises
this text at diarizing 60; ``True`` means a CUDA out-of-memory text); ``lose_tasks`` (as after a
service restart: tasks stay processing at transcribing 10 forever); ``audio_seconds`` (what the
decode finds); ``undecodable`` (every decode fails; it also fails when libmagic says the bytes are
not audio or video); ``heartbeat_seconds``, ``ticket_seconds``, ``hourly_retry_after``,
``daily_retry_after``, ``concurrency_retry_after``.

Records: ``posts`` (every POST /speech-to-text), ``answers`` (their statuses, in order),
``submissions`` (the accepted ones), ``tasks`` (identifier -> :class:`_Task`: ``looks`` counts
``GET /task/{id}``, ``progress_looks`` the progress route; ``owner``, ``status``, ``stage``,
``percentage``), ``tickets`` (issued tickets).

The pipeline runs as asyncio tasks driven by time, not by polls; they stop when the app shuts down.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import secrets
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import magic
from aiohttp import BodyPartReader, WSMsgType, web

# app/core/config.py (both repositories), in that order.
ALLOWED_EXTENSIONS = (".mp3", ".wav", ".awb", ".aac", ".ogg", ".oga", ".m4a", ".wma", ".amr",
                      ".mp4", ".mov", ".avi", ".wmv", ".mkv")
# WhisperModel, TaskEnum, Device, ComputeType, InterpolateMethod (schemas).
WHISPER_MODELS = ("tiny", "tiny.en", "base", "base.en", "small", "small.en", "medium",
                  "medium.en", "large", "large-v1", "large-v2", "large-v3", "large-v3-turbo",
                  "distil-large-v2", "distil-medium.en", "distil-small.en", "distil-large-v3",
                  "nyrahealth/faster_CrisperWhisper")
TASKS = ("transcribe", "translate")
DEVICES = ("cuda", "cpu")
COMPUTE_TYPES = ("float16", "float32", "int8")
INTERPOLATE_METHODS = ("nearest", "linear", "ignore")

#: (stage, percentage) as the fork's pipeline writes them.
STEPS = (("queued", 0), ("transcribing", 10), ("aligning", 40), ("diarizing", 60),
         ("diarizing", 80), ("complete", 100))
#: What ``fail_task=True`` raises.
CUDA_OOM = "CUDA out of memory while diarizing"
PENDING_MAX = 20
FAILED_USER_MESSAGE = "Transcription processing failed. Please try again."


def _words(text: str, start: float, end: float, speaker: str) -> list[dict[str, Any]]:
    parts = text.split()
    step = (end - start) / len(parts)
    return [{"word": w, "start": round(start + i * step, 3), "end": round(start + (i + 1) * step - 0.05, 3),
             "score": 0.9, "speaker": speaker} for i, w in enumerate(parts)]


def _result() -> dict[str, Any]:
    segments: list[dict[str, Any]] = []
    for start, end, text in ((0.0, 2.9, " The quick brown fox jumps over the lazy dog."),
                             (3.1, 6.3, " Chunked uploads carry large recordings past the proxy limit.")):
        segments.append({"start": start, "end": end, "text": text, "speaker": "SPEAKER_00",
                         "words": _words(text, start, end, "SPEAKER_00")})
    return {"segments": segments, "word_segments": [w for s in segments for w in s["words"]]}


#: The transcript every completed task has (segments with words, word_segments; no language).
RESULT: dict[str, Any] = _result()


# ---------------------------------------------------------------------------------------------
# Query validation, as FastAPI + pydantic v2 answer it
# ---------------------------------------------------------------------------------------------

_TRUE = {"1", "on", "t", "true", "y", "yes"}
_FALSE = {"0", "off", "f", "false", "n", "no"}
_INT_RE = re.compile(r"[+-]?\d+")

#: (name, kind, default) in the order FastAPI validates them: WhisperModelParams, AlignmentParams,
#: DiarizationParams, ASROptions, VADOptions, then callback_url. kind: str|int|int?|float|bool|
#: list[int] or a tuple of enum values.
FIELDS: tuple[tuple[str, Any, Any], ...] = (
    ("language", "str", "en"), ("task", TASKS, "transcribe"), ("model", WHISPER_MODELS, "tiny"),
    ("device", DEVICES, "cuda"), ("device_index", "int", 0), ("threads", "int", 0),
    ("batch_size", "int", 8), ("chunk_size", "int", 20), ("compute_type", COMPUTE_TYPES, "float16"),
    ("align_model", "str", None), ("interpolate_method", INTERPOLATE_METHODS, "nearest"),
    ("return_char_alignments", "bool", False),
    ("min_speakers", "int?", None), ("max_speakers", "int?", None),
    ("beam_size", "int", 5), ("best_of", "int", 5), ("patience", "float", 1.0),
    ("length_penalty", "float", 1.0), ("temperatures", "float", 0.0),
    ("compression_ratio_threshold", "float", 2.4), ("log_prob_threshold", "float", -1.0),
    ("no_speech_threshold", "float", 0.6), ("initial_prompt", "str", None),
    ("suppress_tokens", "list[int]", [-1]), ("suppress_numerals", "bool", False),
    ("hotwords", "str", None), ("vad_onset", "float", 0.5), ("vad_offset", "float", 0.363),
    ("callback_url", "str", None),
)
_ASR = ("beam_size", "best_of", "patience", "length_penalty", "temperatures",
        "compression_ratio_threshold", "log_prob_threshold", "no_speech_threshold",
        "initial_prompt", "suppress_tokens", "suppress_numerals", "hotwords")
_VAD = ("vad_onset", "vad_offset")


def _expected(values: Sequence[str]) -> str:
    quoted = [f"'{v}'" for v in values]
    return ", ".join(quoted[:-1]) + " or " + quoted[-1]


def _error(kind: str, loc: list[Any], raw: str) -> dict[str, Any]:
    msgs = {
        "int_parsing": "Input should be a valid integer, unable to parse string as an integer",
        "float_parsing": "Input should be a valid number, unable to parse string as a number",
        "bool_parsing": "Input should be a valid boolean, unable to interpret input",
    }
    return {"type": kind, "loc": loc, "msg": msgs[kind], "input": raw}


def _parse(kind: Any, name: str, raw: str, loc: list[Any]) -> tuple[Any, dict[str, Any] | None]:
    text = raw.strip()
    if isinstance(kind, tuple):
        if raw in kind:
            return raw, None
        expected = _expected(kind)
        return None, {"type": "enum", "loc": loc, "msg": f"Input should be {expected}",
                      "input": raw, "ctx": {"expected": expected}}
    if kind in ("int", "int?"):
        if _INT_RE.fullmatch(text):
            return int(text), None
        return None, _error("int_parsing", loc, raw)
    if kind == "float":
        try:
            if "_" in text:
                raise ValueError(text)
            return float(text), None
        except ValueError:
            return None, _error("float_parsing", loc, raw)
    if kind == "bool":
        if text.lower() in _TRUE:
            return True, None
        if text.lower() in _FALSE:
            return False, None
        return None, _error("bool_parsing", loc, raw)
    return raw, None


def validate_query(query: Any) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The typed values of the known query fields (defaults filled in), and 422 error items."""
    values: dict[str, Any] = {}
    errors: list[dict[str, Any]] = []
    for name, kind, default in FIELDS:
        raws = query.getall(name, [])
        if not raws:
            values[name] = list(default) if isinstance(default, list) else default
            continue
        if kind == "list[int]":
            items = []
            for i, raw in enumerate(raws):
                value, err = _parse("int", name, raw, ["query", name, i])
                if err:
                    errors.append(err)
                items.append(value)
            values[name] = items
            continue
        raw = raws[-1]  # a repeated scalar key: the last one wins (Starlette's QueryParams)
        value, err = _parse(kind, name, raw, ["query", name])
        if err:
            errors.append(err)
        values[name] = value
    return values, errors


def task_params(values: dict[str, Any]) -> dict[str, Any]:
    """``task_params`` as the service stores them (model_dump of each params model)."""
    out = {k: v for k, v in values.items() if k not in _ASR + _VAD + ("callback_url",)}
    out["asr_options"] = {k: values[k] for k in _ASR}
    out["vad_options"] = {k: values[k] for k in _VAD}
    return out


# ---------------------------------------------------------------------------------------------
# Users, tiers, tasks
# ---------------------------------------------------------------------------------------------

def _api_key() -> str:
    return f"whsk_{secrets.token_urlsafe(8)[:8]}_{secrets.token_urlsafe(16)[:22]}"


@dataclass
class User:
    """A fork account. ``api_key`` for Bearer auth; ``session`` + ``csrf`` for cookie auth."""

    name: str
    tier: str = "pro"  # "free" | "trial" | "pro" (anything but pro gets the free policy)
    trial_expired: bool = False  # -> 402 TRIAL_EXPIRED (only for tier "trial", as the real gate)
    api_key: str = field(default_factory=_api_key)
    session: str = field(default_factory=lambda: secrets.token_urlsafe(32))
    csrf: str = field(default_factory=lambda: secrets.token_urlsafe(32))

    def bearer(self) -> dict[str, str]:
        """Request headers for API-key auth."""
        return {"Authorization": f"Bearer {self.api_key}"}

    def cookie(self, csrf: str | None = "") -> dict[str, str]:
        """Request headers for cookie auth; ``csrf`` "" sends the right token, None none."""
        headers = {"Cookie": f"session={self.session}; csrf_token={self.csrf}"}
        if csrf is not None:
            headers["X-CSRF-Token"] = csrf or self.csrf
        return headers


@dataclass(frozen=True)
class Policy:
    max_per_hour: int
    max_file_seconds: int
    max_daily_seconds: int
    allowed_models: frozenset[str]
    diarization_allowed: bool
    max_concurrent: int


FREE_POLICY = Policy(5, 5 * 60, 30 * 60, frozenset({"tiny", "small"}), False, 1)
PRO_POLICY = Policy(100, 60 * 60, 600 * 60, frozenset(
    {"tiny", "base", "small", "medium", "large", "large-v2", "large-v3"}), True, 3)


@dataclass
class _Bucket:
    tokens: float
    stamp: float


@dataclass
class _Task:
    identifier: str
    filename: str
    params: dict[str, Any]  # the raw query, as in the submission
    task_params: dict[str, Any]
    owner: str | None = None
    callback_url: str | None = None
    audio_duration: float = 0.0
    status: str = "processing"
    stage: str | None = None
    percentage: int = 0
    result: Any = None
    error: str | None = None
    duration: float | None = None
    start_time: str | None = None
    end_time: str | None = None
    looks: int = 0
    progress_looks: int = 0


@dataclass
class _Ticket:
    user: str
    task_id: str
    expires: float
    consumed: bool = False


class _Reply(Exception):
    """An answer from deep inside a handler (turned into JSON by the middleware)."""

    def __init__(self, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
        super().__init__(status)
        self.status = status
        self.body = body
        self.headers = headers


def _error_body(message: str, code: str, **details: Any) -> dict[str, Any]:
    """``ApplicationError.to_dict()`` (app/core/exceptions.py)."""
    return {"error": {"message": message, "code": code, "correlation_id": str(uuid.uuid4()),
                      **details}}


def _now_iso() -> str:
    return datetime.now(UTC).isoformat()  # progress_emitter: "...+00:00"


def _now_json() -> str:
    # pydantic v2 dumps an aware UTC datetime with "Z" (heartbeat, ticket expiry)
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


_AUTH_REQUIRED = ({"detail": "Authentication required"},
                  {"WWW-Authenticate": 'Bearer realm="whisperx"'})
_MEDIA_TYPES = ("audio/", "video/", "application/ogg", "application/vnd.ms-asf")


def is_media(head: bytes) -> bool:
    """Whether libmagic takes the first bytes for audio or video (the decode's stand-in)."""
    try:
        mime = str(magic.from_buffer(head, mime=True))
    except magic.MagicException:
        return False
    return mime.startswith(_MEDIA_TYPES)


# ---------------------------------------------------------------------------------------------
# The double
# ---------------------------------------------------------------------------------------------

@dataclass
class WhisperXDouble:
    variant: str = "upstream"  # or "fork"
    users: list[User] = field(default_factory=list)
    token: str | None = None
    decode_seconds: float = 0.0
    step_seconds: float = 0.02
    complete_window: float = 0.0
    queue_seconds: float = 0.0
    fail_posts: int = 0
    reject: tuple[int, dict[str, Any]] | None = None
    hang: bool = False
    hold: asyncio.Event | None = None
    fail_task: str | bool | None = None
    lose_tasks: bool = False
    audio_seconds: float = 6.4
    undecodable: bool = False
    heartbeat_seconds: float = 30.0
    ticket_seconds: float = 60.0
    hourly_retry_after: int = 60
    daily_retry_after: int = 3600
    concurrency_retry_after: int = 60
    # records
    posts: int = 0
    answers: list[int] = field(default_factory=list)
    submissions: list[dict[str, Any]] = field(default_factory=list)
    tasks: dict[str, _Task] = field(default_factory=dict)
    tickets: dict[str, _Ticket] = field(default_factory=dict)
    # internals
    _buckets: dict[str, _Bucket] = field(default_factory=dict, repr=False)
    _running: set[asyncio.Task[None]] = field(default_factory=set, repr=False)
    _sockets: dict[str, list[web.WebSocketResponse]] = field(default_factory=dict, repr=False)
    _pending: dict[str, list[dict[str, Any]]] = field(default_factory=dict, repr=False)
    _stopping: asyncio.Event | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.variant not in ("upstream", "fork"):
            raise ValueError(f"variant must be 'upstream' or 'fork', not {self.variant!r}")
        if self.variant == "fork" and self.token and not any(
                u.api_key == self.token for u in self.users):
            self.users.append(User("token", tier="pro", api_key=self.token))

    @property
    def fork(self) -> bool:
        return self.variant == "fork"

    def add_user(self, name: str, tier: str = "pro", trial_expired: bool = False) -> User:
        user = User(name, tier=tier, trial_expired=trial_expired)
        self.users.append(user)
        return user

    def user(self, name: str) -> User:
        return next(u for u in self.users if u.name == name)

    # -- app ---------------------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._middleware])
        app.router.add_post("/speech-to-text", self.speech_to_text)
        app.router.add_get("/task/all", self.all_tasks)
        app.router.add_get("/task/{identifier}", self.get_task)
        if self.fork:
            app.router.add_get("/tasks/{identifier}/progress", self.get_progress)
            app.router.add_post("/api/ws/ticket", self.issue_ticket)
            app.router.add_get("/ws/tasks/{task_id}", self.task_socket)
        app.on_startup.append(self._on_startup)
        app.on_shutdown.append(self._on_shutdown)
        app.on_cleanup.append(self._on_cleanup)
        return app

    async def _on_startup(self, app: web.Application) -> None:
        self._stopping = asyncio.Event()

    async def _on_shutdown(self, app: web.Application) -> None:
        if self._stopping is not None:
            self._stopping.set()  # hanging POSTs give up
        for sockets in list(self._sockets.values()):
            for ws in list(sockets):
                await ws.close(code=1001, message=b"server shutdown")

    async def _on_cleanup(self, app: web.Application) -> None:
        running = list(self._running)
        for job in running:
            job.cancel()
        await asyncio.gather(*running, return_exceptions=True)

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        try:
            response = await handler(request)
        except _Reply as reply:
            response = web.json_response(reply.body, status=reply.status, headers=reply.headers)
        except web.HTTPNotFound:
            if request.headers.get("Upgrade", "").lower() == "websocket":
                response = web.Response(status=403)  # Starlette closes an unrouted WS: 403
            else:
                response = web.json_response({"detail": "Not Found"}, status=404)
        except web.HTTPMethodNotAllowed:
            response = web.json_response({"detail": "Method Not Allowed"}, status=405)
        if request.method == "POST" and request.path == "/speech-to-text":
            self.answers.append(response.status)
        return response

    # -- auth --------------------------------------------------------------------------------

    def _authenticate(self, request: web.Request) -> User | None:
        """The caller (fork), or None (upstream); raises the 401/403 answers."""
        header = request.headers.get("Authorization", "")
        if not self.fork:
            if self.token is not None and header != f"Bearer {self.token}":
                raise _Reply(401, *_AUTH_REQUIRED)
            return None
        if header.startswith("Bearer "):  # bearer wins, even over a good cookie
            key = header[len("Bearer "):].strip()
            for known in self.users:
                if secrets.compare_digest(known.api_key, key):
                    return known
            raise _Reply(401, *_AUTH_REQUIRED)
        session = request.cookies.get("session")
        user = next((u for u in self.users if session and u.session == session), None)
        if user is None:
            raise _Reply(401, *_AUTH_REQUIRED)
        if request.method in ("POST", "PUT", "PATCH", "DELETE"):
            cookie_token = request.cookies.get("csrf_token", "")
            header_token = request.headers.get("X-CSRF-Token", "")
            if not header_token:
                raise _Reply(403, {"detail": "CSRF token missing"})
            if not cookie_token or not secrets.compare_digest(cookie_token, header_token):
                raise _Reply(403, {"detail": "CSRF token mismatch"})
        return user

    def _owned(self, request: web.Request, identifier: str) -> _Task:
        user = self._authenticate(request)
        task = self.tasks.get(identifier)
        if task is None or (user is not None and task.owner != user.name):
            raise _Reply(404, _error_body(
                "The requested task could not be found. Please check the task ID.",
                "TASK_NOT_FOUND", identifier=identifier))
        return task

    # -- tier gate (fork) ----------------------------------------------------------------------

    def _take(self, key: str, need: float, rate: float, capacity: float) -> bool:
        now = time.monotonic()
        bucket = self._buckets.setdefault(key, _Bucket(capacity, now))
        bucket.tokens = min(capacity, bucket.tokens + (now - bucket.stamp) * rate)
        bucket.stamp = now
        if bucket.tokens < need:
            return False
        bucket.tokens -= need
        return True

    def _release(self, user: User) -> None:
        policy = PRO_POLICY if user.tier == "pro" else FREE_POLICY
        bucket = self._buckets.get(f"user:{user.name}:concurrent")
        if bucket is not None:
            bucket.tokens = min(policy.max_concurrent, bucket.tokens + 1)

    def _gate(self, user: User, seconds: float, model: str, diarize: bool) -> None:
        policy = PRO_POLICY if user.tier == "pro" else FREE_POLICY
        if user.tier == "trial" and user.trial_expired:
            raise _Reply(402, _error_body(
                "Your 7-day trial has expired. Please upgrade to continue.", "TRIAL_EXPIRED"))
        limited = "Too many requests. Please try again later."
        if not self._take(f"user:{user.name}:tx:hour", 1, policy.max_per_hour / 3600.0,
                          policy.max_per_hour):
            raise _Reply(429, _error_body(limited, "RATE_LIMIT_EXCEEDED",
                                          retry_after_seconds=self.hourly_retry_after),
                         {"Retry-After": str(self.hourly_retry_after)})
        reason = None
        if seconds > policy.max_file_seconds:
            reason = f"File duration {int(seconds)}s exceeds tier limit {policy.max_file_seconds}s"
        elif model not in policy.allowed_models:
            reason = f"Model '{model}' not available on your plan"
        elif diarize and not policy.diarization_allowed:
            reason = "Diarization not available on your plan"
        if reason is not None:
            raise _Reply(403, _error_body(reason, "FREE_TIER_VIOLATION", reason=reason))
        minutes = policy.max_daily_seconds // 60
        if not self._take(f"user:{user.name}:audio_min:day", max(1, int(seconds / 60)),
                          minutes / 86400.0, minutes):
            raise _Reply(429, _error_body(limited, "RATE_LIMIT_EXCEEDED",
                                          retry_after_seconds=self.daily_retry_after),
                         {"Retry-After": str(self.daily_retry_after)})
        if not self._take(f"user:{user.name}:concurrent", 1, 0.0, policy.max_concurrent):
            raise _Reply(429, _error_body(
                "You have a transcription in progress. Please wait for it to complete.",
                "CONCURRENCY_LIMIT", retry_after_seconds=self.concurrency_retry_after),
                {"Retry-After": str(self.concurrency_retry_after)})

    # -- POST /speech-to-text ----------------------------------------------------------------

    async def _read_upload(self, request: web.Request) -> dict[str, Any] | None:
        """Read the whole body, as FastAPI does before anything else; the last ``file`` part."""
        if not request.content_type.startswith("multipart/"):
            await request.read()
            return None
        upload = None
        try:
            reader = await request.multipart()
            while (part := await reader.next()) is not None:
                if not isinstance(part, BodyPartReader):
                    await part.release()  # a nested multipart is no file field
                    continue
                if part.name != "file" or part.filename is None:
                    await part.release()
                    continue
                digest, size, head = hashlib.sha256(), 0, bytearray()
                while chunk := await part.read_chunk(256 * 1024):
                    digest.update(chunk)
                    size += len(chunk)
                    if len(head) < 1024 * 1024:
                        head += chunk[: 1024 * 1024 - len(head)]
                upload = {"filename": part.filename, "sha256": digest.hexdigest(), "size": size,
                          "content_type": part.headers.get("Content-Type"), "head": bytes(head)}
        except (ValueError, AssertionError, RuntimeError) as exc:
            raise _Reply(400, {"detail": "There was an error parsing the body"}) from exc
        return upload

    async def speech_to_text(self, request: web.Request) -> web.Response:
        self.posts += 1
        upload = await self._read_upload(request)
        if self.fail_posts > 0:
            self.fail_posts -= 1
            raise _Reply(503, {"error": {
                "message": "A temporary system error occurred. Please try again later.",
                "code": "INFRASTRUCTURE_ERROR", "correlation_id": str(uuid.uuid4())}})
        if self.reject is not None:
            raise _Reply(*self.reject)
        if self.hang:
            assert self._stopping is not None
            await self._stopping.wait()
            raise _Reply(503, {"detail": "shutting down"})
        user = self._authenticate(request)
        values, errors = validate_query(request.query)
        if upload is None:
            errors.append({"type": "missing", "loc": ["body", "file"], "msg": "Field required",
                           "input": None})
        if errors:
            raise _Reply(422, {"detail": errors})
        assert upload is not None
        filename = upload["filename"]
        if os.path.splitext(filename)[1].lower() not in ALLOWED_EXTENSIONS:
            allowed = "{" + ", ".join(repr(e) for e in ALLOWED_EXTENSIONS) + "}"
            raise _Reply(400, {"detail": f"Invalid file extension for file {filename}. "
                                         f"Allowed: {allowed}"})
        await asyncio.sleep(self.decode_seconds)  # the whole file is decoded inside the request
        if self.undecodable or not await asyncio.to_thread(is_media, upload["head"]):
            raise _Reply(400, _error_body(
                "Audio processing failed. Please try again or use a different audio file.",
                "AUDIO_PROCESSING_ERROR", reason=f"could not decode {filename}",
                original_error="Failed to load audio: Invalid data found when processing input"))
        if user is not None:
            diarize = values["min_speakers"] is not None or values["max_speakers"] is not None
            self._gate(user, self.audio_seconds, values["model"], diarize)
        params: dict[str, Any] = {}
        for key in request.query:
            got = request.query.getall(key)
            params[key] = got[0] if len(got) == 1 else list(got)
        identifier = str(uuid.uuid4())
        task = _Task(identifier, filename, params, task_params(values),
                     owner=user.name if user else None, callback_url=values["callback_url"],
                     audio_duration=self.audio_seconds,
                     status="processing" if self.fork else "queued",
                     start_time=datetime.now(UTC).replace(tzinfo=None).isoformat())
        self.tasks[identifier] = task
        self.submissions.append({
            "identifier": identifier, "sha256": upload["sha256"], "size": upload["size"],
            "filename": filename, "params": params, "content_type": upload["content_type"],
            "user": user.name if user else None,
        })
        job = asyncio.get_running_loop().create_task(self._pipeline(task, user))
        self._running.add(job)
        job.add_done_callback(self._running.discard)
        return web.json_response({"identifier": identifier, "message": "Task queued"})

    # -- the pipeline ---------------------------------------------------------------------------

    async def _pipeline(self, task: _Task, user: User | None) -> None:
        started = time.monotonic()
        try:
            if not self.fork:
                await asyncio.sleep(self.queue_seconds)
                task.status = "processing"
            for stage, pct in STEPS:
                await asyncio.sleep(self.step_seconds)
                await self._progress(task, stage, pct)
                if stage == "transcribing":
                    if self.lose_tasks:
                        await asyncio.Event().wait()  # nobody will ever finish it
                    if self.hold is not None:
                        await self.hold.wait()
                if (stage, pct) == ("diarizing", 60) and self.fail_task:
                    raise RuntimeError(CUDA_OOM if self.fail_task is True else str(self.fail_task))
            if self.fork:
                await asyncio.sleep(self.complete_window)
            task.result = RESULT
            task.duration = round(time.monotonic() - started, 3)
            task.end_time = datetime.now(UTC).replace(tzinfo=None).isoformat()
            task.status = "completed"
        except RuntimeError as exc:
            if self.fork:
                await self._emit(task.identifier, {
                    "type": "error", "task_id": task.identifier, "error_code": "PROCESSING_FAILED",
                    "user_message": FAILED_USER_MESSAGE, "technical_detail": str(exc),
                    "timestamp": _now_iso()})
            task.error = str(exc)
            task.status = "failed"
        finally:
            if user is not None:
                self._release(user)

    async def _progress(self, task: _Task, stage: str, pct: int) -> None:
        task.stage, task.percentage = stage, pct
        if self.fork:
            await self._emit(task.identifier, {
                "type": "progress", "task_id": task.identifier, "stage": stage,
                "percentage": pct, "message": "", "timestamp": _now_iso()})

    async def _emit(self, task_id: str, message: dict[str, Any]) -> None:
        sockets = list(self._sockets.get(task_id, ()))
        if not sockets:
            pending = self._pending.setdefault(task_id, [])
            pending.append(message)
            del pending[:-PENDING_MAX]
            return
        for ws in sockets:
            try:
                await ws.send_json(message)
            except (ConnectionError, RuntimeError):
                pass

    # -- GET routes ------------------------------------------------------------------------------

    def _result(self, task: _Task) -> dict[str, Any]:
        return {
            "status": task.status,
            "result": task.result if task.status == "completed" else None,
            "metadata": {
                "task_type": "full_process", "task_params": task.task_params,
                "language": task.task_params.get("language"), "file_name": task.filename,
                "url": None, "callback_url": task.callback_url,
                "duration": task.duration, "audio_duration": task.audio_duration,
                "start_time": task.start_time, "end_time": task.end_time,
            },
            "error": task.error,
        }

    async def get_task(self, request: web.Request) -> web.Response:
        task = self._owned(request, request.match_info["identifier"])
        task.looks += 1
        return web.json_response(self._result(task))

    async def get_progress(self, request: web.Request) -> web.Response:
        task = self._owned(request, request.match_info["identifier"])
        task.progress_looks += 1
        return web.json_response({
            "identifier": task.identifier, "status": task.status,
            "progress_percentage": task.percentage, "progress_stage": task.stage,
            "error": task.error,
        })

    async def all_tasks(self, request: web.Request) -> web.Response:
        user = self._authenticate(request)
        mine = [t for t in self.tasks.values() if user is None or t.owner == user.name]
        rows = [{"identifier": t.identifier, "status": t.status, "task_type": "full_process",
                 "language": t.task_params.get("language"), "file_name": t.filename,
                 "error": t.error, "url": None, "callback_url": t.callback_url, "duration": t.duration,
                 "audio_duration": t.audio_duration, "start_time": t.start_time,
                 "end_time": t.end_time} for t in mine]
        if not self.fork:
            return web.json_response({"tasks": rows})
        return web.json_response({"tasks": rows, "total": len(rows), "page": 1,
                                  "page_size": 50})

    # -- WS tickets and the WS (fork) --------------------------------------------------------

    async def issue_ticket(self, request: web.Request) -> web.Response:
        user = self._authenticate(request)
        assert user is not None
        try:
            body = await request.json()
        except ValueError as exc:
            raise _Reply(422, {"detail": [{"type": "json_invalid", "loc": ["body", 0],
                                           "msg": "JSON decode error", "input": {},
                                           "ctx": {"error": "Expecting value"}}]}) from exc
        task_id = body.get("task_id") if isinstance(body, dict) else None
        if not isinstance(task_id, str) or not task_id:
            kind = "missing" if task_id is None else "string_type"
            msg = "Field required" if task_id is None else "Input should be a valid string"
            if task_id == "":
                kind, msg = "string_too_short", "String should have at least 1 character"
            raise _Reply(422, {"detail": [{"type": kind, "loc": ["body", "task_id"], "msg": msg,
                                           "input": body if task_id is None else task_id}]})
        task = self.tasks.get(task_id)
        if task is None or task.owner != user.name:
            raise _Reply(404, {"detail": "Task not found"})
        token = secrets.token_urlsafe(24)[:32]
        self.tickets[token] = _Ticket(user.name, task_id, time.monotonic() + self.ticket_seconds)
        expires = datetime.now(UTC) + timedelta(seconds=self.ticket_seconds)
        return web.json_response(
            {"ticket": token, "expires_at": expires.isoformat().replace("+00:00", "Z")},
            status=201)

    def _consume(self, token: str, task_id: str) -> bool:
        ticket = self.tickets.get(token)
        if ticket is None or ticket.consumed or ticket.expires < time.monotonic():
            return False
        if ticket.task_id != task_id:
            return False
        ticket.consumed = True
        return True

    async def task_socket(self, request: web.Request) -> web.StreamResponse:
        if request.headers.get("Upgrade", "").lower() != "websocket":
            raise web.HTTPNotFound()  # a plain GET finds no HTTP route there
        task_id = request.match_info["task_id"]
        if not self._consume(request.query.get("ticket", ""), task_id):
            return web.Response(status=403)  # closed with 1008 before accept: a 403 handshake
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        sockets = self._sockets.setdefault(task_id, [])
        sockets.append(ws)
        for message in self._pending.pop(task_id, []):
            await ws.send_json(message)
        beat = asyncio.get_running_loop().create_task(self._heartbeat(ws))
        try:
            async for msg in ws:
                if msg.type != WSMsgType.TEXT:
                    continue
                try:
                    data = json.loads(msg.data)
                except ValueError:
                    break  # receive_json raises: the endpoint ends and the socket closes
                if isinstance(data, dict) and data.get("type") == "ping":
                    await ws.send_json({"type": "pong"})
        finally:
            beat.cancel()
            sockets.remove(ws)
            if not sockets:
                self._sockets.pop(task_id, None)
            await ws.close()
        return ws

    async def _heartbeat(self, ws: web.WebSocketResponse) -> None:
        while not ws.closed:
            await asyncio.sleep(self.heartbeat_seconds)
            try:
                await ws.send_json({"type": "heartbeat", "timestamp": _now_json()})
            except (ConnectionError, RuntimeError):
                return
