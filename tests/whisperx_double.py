"""A test double of the whisperX-FastAPI service, speaking its protocol on 127.0.0.1.

- ``POST /speech-to-text``: multipart field ``file``, options as query parameters; answers
  ``{"identifier": "<uuid>", "message": "Task queued"}``. It streams the file and keeps what it
  received (sha256, size, filename, query) so a test can check the whole file arrived.
- ``GET /task/{identifier}``: ``{"status", "result", "metadata", "error"}``; the task moves on one
  stage per look: queued → transcribing → aligning → diarizing → completed (``status`` goes
  ``processing`` → ``completed``), with a ``segments`` result.
- ``GET /tasks/{identifier}/progress``: ``{"identifier", "status", "progress_percentage",
  "progress_stage", "error"}``.
- Errors as the service gives them: ``{"error": {"message", "code", ...}}`` and ``{"detail": ...}``.

Knobs for failure tests: ``fail_posts`` (that many 503s first), ``reject`` (a fixed 4xx answer),
``hang`` (never answer the POST), ``hold`` (an Event: the task stays in transcribing until set),
``fail_task`` (the task ends ``failed``), ``token`` (require ``Authorization: Bearer``).
"""

from __future__ import annotations

import asyncio
import hashlib
import uuid
from dataclasses import dataclass, field
from typing import Any

from aiohttp import BodyPartReader, web

STEPS = [("queued", 0), ("transcribing", 10), ("aligning", 40), ("diarizing", 60), ("complete", 100)]
ALLOWED = {".wav", ".mp3", ".m4a", ".aac", ".ogg", ".flac", ".webm", ".mp4", ".mkv", ".oga"}

RESULT = {
    "language": "en",
    "segments": [
        {"start": 0.0, "end": 2.9, "text": " The quick brown fox jumps over the lazy dog.",
         "speaker": "SPEAKER_00"},
        {"start": 3.1, "end": 6.3, "text": " Chunked uploads carry large recordings past the "
         "proxy limit.", "speaker": "SPEAKER_00"},
    ],
}


@dataclass
class _Task:
    identifier: str
    filename: str
    params: dict[str, str]
    step: int = 0
    looks: int = 0


@dataclass
class WhisperXDouble:
    token: str | None = None
    fail_posts: int = 0
    reject: tuple[int, dict[str, Any]] | None = None
    hang: bool = False
    hold: asyncio.Event | None = None
    fail_task: bool = False
    posts: int = 0
    submissions: list[dict[str, Any]] = field(default_factory=list)
    tasks: dict[str, _Task] = field(default_factory=dict)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/speech-to-text", self.speech_to_text)
        app.router.add_get("/task/{identifier}", self.get_task)
        app.router.add_get("/tasks/{identifier}/progress", self.get_progress)
        return app

    def _auth(self, request: web.Request) -> None:
        if self.token and request.headers.get("Authorization") != f"Bearer {self.token}":
            raise web.HTTPUnauthorized(
                text='{"detail":"Authentication required"}', content_type="application/json",
                headers={"WWW-Authenticate": 'Bearer realm="whisperx"'},
            )

    async def speech_to_text(self, request: web.Request) -> web.Response:
        self._auth(request)
        self.posts += 1
        if self.hang:
            await asyncio.sleep(3600)
        if self.fail_posts > 0:
            self.fail_posts -= 1
            return web.json_response(
                {"error": {"message": "A temporary system error occurred. Please try again later.",
                           "code": "INFRASTRUCTURE_ERROR", "correlation_id": str(uuid.uuid4())}},
                status=503,
            )
        reader = await request.multipart()
        part = await reader.next()
        # a nested multipart (MultipartReader) is no file field either
        if not isinstance(part, BodyPartReader) or part.name != "file":
            return web.json_response(
                {"detail": [{"loc": ["body", "file"], "msg": "Field required", "type": "missing"}]},
                status=422,
            )
        digest, size = hashlib.sha256(), 0
        while chunk := await part.read_chunk(256 * 1024):
            digest.update(chunk)
            size += len(chunk)
        filename = part.filename or ""
        if not any(filename.lower().endswith(ext) for ext in ALLOWED):
            return web.json_response(
                {"detail": f"Invalid file extension for file {filename}. Allowed: {sorted(ALLOWED)}"},
                status=400,
            )
        if self.reject is not None:
            status, body = self.reject
            return web.json_response(body, status=status)
        identifier = str(uuid.uuid4())
        params = dict(request.query)
        self.tasks[identifier] = _Task(identifier, filename, params)
        self.submissions.append({
            "identifier": identifier, "sha256": digest.hexdigest(), "size": size,
            "filename": filename, "params": params,
            "content_type": part.headers.get("Content-Type"),
        })
        return web.json_response({"identifier": identifier, "message": "Task queued"})

    def _task(self, request: web.Request) -> _Task:
        self._auth(request)
        task = self.tasks.get(request.match_info["identifier"])
        if task is None:
            raise web.HTTPNotFound(text='{"detail":"Identifier not found"}',
                                   content_type="application/json")
        return task

    def _status(self, task: _Task) -> str:
        stage = STEPS[task.step][0]
        if stage == "complete":
            return "failed" if self.fail_task else "completed"
        return "processing"

    async def get_task(self, request: web.Request) -> web.Response:
        task = self._task(request)
        task.looks += 1
        held = self.hold is not None and not self.hold.is_set() and STEPS[task.step][0] == "transcribing"
        if not held and task.step < len(STEPS) - 1:
            task.step += 1
        status = self._status(task)
        return web.json_response({
            "status": status,
            "result": RESULT if status == "completed" else None,
            "metadata": {"task_type": "full_process", "task_params": task.params,
                         "language": task.params.get("language"), "file_name": task.filename,
                         "url": None, "duration": None, "audio_duration": 6.4,
                         "start_time": None, "end_time": None},
            "error": "CUDA out of memory while diarizing" if status == "failed" else None,
        })

    async def get_progress(self, request: web.Request) -> web.Response:
        task = self._task(request)
        stage, pct = STEPS[task.step]
        return web.json_response({
            "identifier": task.identifier, "status": self._status(task),
            "progress_percentage": pct, "progress_stage": stage, "error": None,
        })
