"""Every error chunkd can answer with, declared once: one :class:`ErrorCode` per code.

    ChunkdError                  raised as ``SOME_CODE(**details)``: code, status, message, details
     └── HandoffFailed           a hand-off gave up (its message is for people, ``detail`` for
                                 operators); codes the outside service spelled are forwarded

Each entry below is ``(code, status, message template)``; the template is filled from the
raise site's details, which also go into the reply. Nothing else declares a code or a status:
the JSON API (``chunkd.api.middleware``), the WebSocket messages (``chunkd.progress``) and later
tus render what they get from here. An unexpected exception becomes a 500 ``internal_error``
without a trace.

Statuses: 400 malformed, 401/403 auth, 404 unknown, 408 body stopped, 409 state conflict,
410 expired or aborted, 413 too large, 415 not audio/video, 422 bad field value, 500 ours,
502 the hand-off's service failed, 503 retry later, 507 disk full.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any


class ChunkdError(Exception):
    """An error with a stable snake_case ``code``, an HTTP ``status``, a human ``message`` and
    ``details`` (extra JSON fields of the reply)."""

    def __init__(self, code: str, status: int, message: str, details: dict[str, Any]) -> None:
        super().__init__(message)
        self.code = code
        self.status = status
        self.message = message
        self.details = details

    def to_json(self) -> dict[str, Any]:
        """The reply body: ``{"error": {"code", "message", **details}}``."""
        return {"error": {"code": self.code, "message": self.message, **self.details}}

    def to_record(self) -> dict[str, Any]:
        """What a store keeps of it (e.g. why finalize refused a file): the reply and its status."""
        return {"status": self.status, **self.to_json()}

    @classmethod
    def from_record(cls, doc: dict[str, Any]) -> ChunkdError:
        """The error :meth:`to_record` stored, raised again with the same status and body."""
        body = dict(doc["error"])
        code, message = str(body.pop("code")), str(body.pop("message"))
        return cls(code, int(doc.get("status", 500)), message, body)


_ABSOLUTE_PATH = re.compile(r"(?<![\w.:/])/(?:[^\s'\"/:]+/)+([^\s'\"/:]*)")


def without_paths(text: str) -> str:
    """``text`` with every absolute path cut to ``…/<last part>``."""
    return _ABSOLUTE_PATH.sub(lambda m: f"…/{m.group(1)}", text)


class HandoffFailed(ChunkdError):
    """The hand-off gave up. ``message`` is the user-facing sentence, ``detail`` is technical
    (the service's reply, stderr, an exception); both reach the task's subscribers."""

    def __init__(self, code: str, status: int, message: str, detail: str = "") -> None:
        super().__init__(code, status, message, {})
        # Clients see the detail: absolute paths (of the data dir, a program) become their last
        # part. ``raw_detail`` is for the server's log only.
        self.detail = without_paths(detail)
        self.raw_detail = detail

    def to_task_error(self) -> dict[str, str]:
        """The shape the WhisperX frontend reads (``task.error`` and WebSocket ``error``)."""
        return {"error_code": self.code, "user_message": self.message,
                "technical_detail": self.detail}


@dataclass(frozen=True)
class ErrorCode:
    """One code of the table: raise it as ``CODE(**details)`` (the template is filled from them)."""

    code: str
    status: int
    template: str

    def __call__(self, **details: Any) -> ChunkdError:
        return ChunkdError(self.code, self.status, self.template.format(**details), details)

    def saying(self, message: str, **details: Any) -> ChunkdError:
        """The error with a message built elsewhere (e.g. aiohttp's reason, a parser's complaint)."""
        return ChunkdError(self.code, self.status, message, details)

    def handoff(self, detail: str = "", **fields: Any) -> HandoffFailed:
        """As a hand-off failure (template filled from ``fields``, ``detail`` for operators)."""
        return HandoffFailed(self.code, self.status, self.template.format(**fields), detail)

    def forward(self, code: str, message: str, detail: str = "") -> HandoffFailed:
        """A failure whose code and message the outside service chose (e.g. its own
        ``UNSUPPORTED_FILE_EXTENSION``): forwarded as it spelled them, with this entry's status."""
        return HandoffFailed(code, self.status, message, detail)


TABLE: dict[str, ErrorCode] = {}


def _e(code: str, status: int, template: str) -> ErrorCode:
    assert code not in TABLE, code
    TABLE[code] = entry = ErrorCode(code, status, template)
    return entry


# -- 400: the request is malformed ------------------------------------------------------------
BAD_REQUEST = _e("bad_request", 400, "the request is malformed")
INVALID_JSON = _e("invalid_json", 400, "the request body must be a JSON object")
MISSING_INDEX = _e("missing_index", 400, "the query parameter index is required")
INVALID_INDEX = _e("invalid_index", 400, "index must be a non-negative integer")
INVALID_CHECKSUM_HEADER = _e("invalid_checksum_header", 400,
                             "X-Chunk-Checksum must be sha256=<64 hex digits>")
CHUNK_INCOMPLETE = _e("chunk_incomplete", 400,
                      "chunk {chunk_index} must be {expected_bytes} bytes, got {received_bytes}")
CHECKSUM_MISMATCH = _e("checksum_mismatch", 400,
                       "chunk {chunk_index} does not match its X-Chunk-Checksum; send it again")
INVALID_BODY = _e("invalid_body", 400, "the request body could not be read")
CLIENT_DISCONNECTED = _e("client_disconnected", 400, "the connection was closed")
# -- 401 / 403: who is asking -----------------------------------------------------------------
UNAUTHORIZED = _e("unauthorized", 401, "a valid bearer token is required")
MISSING_TOKEN = _e("missing_token", 401,
                   "a bearer token is required (Authorization: Bearer <token>; on a WebSocket "
                   "also ?access_token=<token>)")
INVALID_TOKEN = _e("invalid_token", 401, "the bearer token is not valid")
TOKEN_EXPIRED = _e("token_expired", 401, "the bearer token has expired; get a new one")
FORBIDDEN = _e("forbidden", 403, "this token may not access this upload session")
CREDENTIAL_REQUIRED = _e(
    "credential_required", 401,
    "finalize needs your transcription service credential: a Bearer key in "
    "X-WhisperX-Authorization (or Authorization, when chunkd's own auth is off), or the "
    "service's session cookie with X-CSRF-Token")
# -- 404 ----------------------------------------------------------------------------------------
NOT_FOUND = _e("not_found", 404, "no such resource")
SESSION_NOT_FOUND = _e("session_not_found", 404, "no upload session with this id")
TASK_NOT_FOUND = _e("task_not_found", 404, "no task {task_id}")
METHOD_NOT_ALLOWED = _e("method_not_allowed", 405, "method not allowed")
# -- 408 ----------------------------------------------------------------------------------------
BODY_TIMEOUT = _e("body_timeout", 408, "no chunk data arrived for {seconds:g} s")
BODY_TOO_SLOW = _e("body_too_slow", 408,
                   "the chunk arrived slower than {min_rate} bytes a second; send it again")
# -- 409: the session's state does not allow it -----------------------------------------------
CHUNKS_MISSING = _e("chunks_missing", 409,
                    "{missing_count} of {total_chunks} chunks are missing")
CHUNK_CONFLICT = _e("chunk_conflict", 409,
                    "chunk {chunk_index} was already received with other content")
CHUNK_BUSY = _e("chunk_busy", 409,
                "chunk {chunk_index} is being uploaded by another request; try again later")
SESSION_FINALIZED = _e("session_finalized", 409,
                       "this upload session is already finalized; it takes no more changes")
TASK_BUSY = _e("task_busy", 409, "task {task_id} is being worked on right now")
NOT_FAILED = _e("not_failed", 409, "task {task_id} is {stage}, not failed")
FILE_GONE = _e("file_gone", 409, "the file of task {task_id} is gone; it cannot be retried")
# -- 410: the session ended -------------------------------------------------------------------
SESSION_EXPIRED = _e("session_expired", 410, "this upload session has expired")
SESSION_ABORTED = _e("session_aborted", 410, "this upload session was aborted")
# -- 417 ----------------------------------------------------------------------------------------
EXPECTATION_FAILED = _e("expectation_failed", 417,
                        "the only Expect this server knows is 100-continue")
# -- 413 ----------------------------------------------------------------------------------------
TOO_LARGE = _e("too_large", 413, "the request is too large")
FILE_TOO_LARGE = _e("file_too_large", 413, "total_size is over the limit of {max_file_size} bytes")
CHUNK_SIZE_TOO_LARGE = _e("chunk_size_too_large", 413,
                          "chunk_size {chunk_size} is over the limit of {max_chunk_size} bytes")
CHUNK_TOO_LONG = _e("chunk_too_long", 413,
                    "chunk {chunk_index} must be {expected_bytes} bytes; its body is longer")
# -- 415 ----------------------------------------------------------------------------------------
UNSUPPORTED_CONTENT_TYPE = _e("unsupported_content_type", 415, "send the body as {expected}")
UNSUPPORTED_ENCODING = _e("unsupported_encoding", 415,
                          "a chunk body may be sent as identity, gzip or deflate only")
UNSUPPORTED_CONTENT = _e("unsupported_content", 415,
                         "the file's content is {detected_type}, not audio or video")
# -- 422: a field has a wrong type or value ---------------------------------------------------
MISSING_FIELD = _e("missing_field", 422, "{field} is required")
INVALID_TYPE = _e("invalid_type", 422, "{field} must be {expected}")
INVALID_VALUE = _e("invalid_value", 422, "{field} {rule}")
FILENAME_TOO_LONG = _e("filename_too_long", 422, "filename is longer than {max_bytes} bytes")
INVALID_FILENAME = _e("invalid_filename", 422, "filename must be {rule}")
EXTENSION_NOT_ALLOWED = _e("extension_not_allowed", 422,
                           "filename must end with an audio or video extension")
INDEX_OUT_OF_RANGE = _e("index_out_of_range", 422,
                        "index must be between 0 and {last_index}")
TOTAL_CHUNKS_MISMATCH = _e("total_chunks_mismatch", 422,
                           "total_chunks must be ceil(total_size / chunk_size) = {expected}")
TOO_MANY_CHUNKS = _e("too_many_chunks", 422,
                     "a session has at most {max_chunks} chunks; use a larger chunk_size")
# -- 429: quotas and rate limits ----------------------------------------------------------------
SESSION_QUOTA = _e("session_quota", 429,
                   "at most {max_sessions} open upload sessions per client; finish or abort one "
                   "first")
STORAGE_QUOTA = _e("storage_quota", 429,
                   "this session would make your open uploads reserve more than {max_bytes} bytes; "
                   "finish or abort one first")
RATE_LIMITED = _e("rate_limited", 429, "too many requests; retry after {retry_after:g} s")
# -- 5xx ----------------------------------------------------------------------------------------
INTERNAL_ERROR = _e("internal_error", 500, "an internal error occurred")
HTTP_ERROR = _e("http_error", 500, "the request failed")
BAD_GATEWAY = _e("bad_gateway", 502, "the transcription service could not be reached")
SHUTTING_DOWN = _e("shutting_down", 503, "chunkd is shutting down; retry in a moment")
SERVER_BUSY = _e("server_busy", 503, "the server is busy; retry in a moment")
STORAGE_UNAVAILABLE = _e("storage_unavailable", 503,
                         "the data dir cannot be written right now (read-only or failing); "
                         "retry later")
INSUFFICIENT_STORAGE = _e("insufficient_storage", 507, "not enough disk space: {reason}")
# -- tus 1.0 (the statuses tus clients act on: 409 and 423 are retried, other 4xx are not,
#    5xx are retried, except on HEAD, where tus-js-client starts over: never 5xx there) -------
TUS_VERSION_UNSUPPORTED = _e("tus_version_unsupported", 412,
                             "send Tus-Resumable: 1.0.0 (the tus version this server speaks)")
UPLOAD_LOCKED = _e("upload_locked", 423,
                   "another request is writing this upload right now; retry in a moment")
RETRY_LATER = _e("retry_later", 423, "{reason}; retry in a moment")
OFFSET_MISMATCH = _e("offset_mismatch", 409,
                     "Upload-Offset must be {offset}, the bytes received so far")
INVALID_OFFSET = _e("invalid_offset", 400, "Upload-Offset must be a non-negative integer")
INVALID_LENGTH = _e("invalid_length", 400, "{reason}")
UPLOAD_TOO_LARGE = _e("upload_too_large", 413,
                      "Upload-Length is over the limit of {max_size} bytes (Tus-Max-Size)")
PATCH_TOO_LARGE = _e("patch_too_large", 413,
                     "a PATCH body may be at most {max_patch_size} bytes; send smaller PATCHes "
                     "(tus-js-client: chunkSize, tuspy: chunk_size)")
SIZE_EXCEEDED = _e("size_exceeded", 413,
                   "the body goes past the end of the upload ({length} bytes)")
INVALID_METADATA = _e("invalid_metadata", 400, "Upload-Metadata: {reason}")
INVALID_TASK_ID = _e("invalid_task_id", 422, "the metadata taskId must be a UUID")
TASK_ID_IN_USE = _e("task_id_in_use", 422, "task id {task_id} is taken; choose a new one")
INVALID_UPLOAD_CHECKSUM = _e("invalid_upload_checksum", 400,
                             "Upload-Checksum must be '<algorithm> <base64 digest>' with an "
                             "algorithm of {supported}")
UPLOAD_CHECKSUM_MISMATCH = _e("upload_checksum_mismatch", 460,
                              "the PATCH body does not match its Upload-Checksum; none of it "
                              "was kept")
BODY_STALLED = _e("body_stalled", 503,
                  "the body stopped ({reason}); the upload keeps the {offset} bytes it has: ask "
                  "HEAD for the offset and go on")
INVALID_CONCAT = _e("invalid_concat", 400, "Upload-Concat: {reason}")
PARTIAL_INCOMPLETE = _e("partial_incomplete", 400,
                        "partial upload {upload_id} has {offset} of its {length} bytes")
PARTIAL_IN_USE = _e("partial_in_use", 409,
                    "partial upload {upload_id} is part of another final upload")
PARTIAL_GONE = _e("partial_gone", 410, "the bytes of partial upload {upload_id} are gone")
FINAL_UPLOAD = _e("final_upload", 403,
                  "a final (concatenated) upload is whole when it is made; it takes no PATCH")
# -- hand-off failures (a task's final error, never an HTTP reply) ------------------------------
PROCESSING_FAILED = _e("processing_failed", 500, "processing failed")
SUBMISSION_INTERRUPTED = _e(
    "submission_interrupted", 502,
    "chunkd stopped while sending this file to the transcription service, so it may or may not "
    "have it; `chunkd retry <task_id>` sends it again")
SERVICE_TIMEOUT = _e(
    "service_timeout", 504,
    "The transcription service did not answer within {seconds:g} s; it may still be working on "
    "the file. `chunkd retry <task_id>` sends it again")
SERVICE_DISCONNECTED = _e("service_disconnected", 502,
                          "The connection to the transcription service broke while it had the file")
BAD_SERVICE_REPLY = _e("bad_service_reply", 502,
                       "The transcription service's reply had no task identifier")
SERVICE_UNAVAILABLE = _e("service_unavailable", 503,
                         "The transcription service did not take the file after {tries} tries")
SERVICE_BUSY = _e(
    "service_busy", 429,
    "The transcription service is busy and asked to wait {wait:g} s, longer than chunkd waits "
    "({window:g} s); `chunkd retry <task_id>` sends the file again later")
SERVICE_REFUSED = _e("service_refused", 502, "The transcription service answered {status}")
SERVICE_STALLED = _e(
    "service_stalled", 504,
    "The transcription service showed no progress on task {identifier} for {minutes:g} min and "
    "has probably lost it (a restart loses its running tasks); `chunkd retry <task_id>` sends "
    "the file again")
TRANSCRIPTION_TIMEOUT = _e(
    "transcription_timeout", 504,
    "Task {identifier} was not finished {hours:g} h after it was sent; `chunkd retry <task_id>` "
    "sends the file again")
TRANSCRIPTION_FAILED = _e("transcription_failed", 502,
                          "Transcription processing failed. Please try again.")
TRANSCRIPTION_OUT_OF_MEMORY = _e(
    "transcription_out_of_memory", 502,
    "The transcription service ran out of memory on this file. Try a smaller model, or try "
    "again later.")
CREDENTIAL_LOST = _e(
    "credential_lost", 401,
    "chunkd has no credential of the user to send this file with (it keeps none across a "
    "restart, and `chunkd retry` has none); finalize the session again with the user's "
    "credential to send it")
NOT_FOLLOWABLE = _e(
    "not_followable", 502,
    "The file was handed to the transcription service as task {identifier}, but chunkd can no "
    "longer follow it ({reason}); follow it on the service with that identifier")
COMMAND_INTERRUPTED = _e(
    "interrupted", 500,
    "chunkd stopped while the command was running; `chunkd retry <task_id>` runs it again")
COMMAND_NOT_RUNNABLE = _e("command_not_runnable", 500, "cannot run {program}")
COMMAND_FAILED = _e("command_failed", 500, "{program} exited with status {status}")
