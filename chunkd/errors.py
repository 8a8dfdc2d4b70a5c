"""Every error chunkd can answer with, declared once.

    ChunkdError                      (500 internal_error)
     ├── BadRequest                  400  malformed request (JSON, query, headers, body length)
     │    └── ChecksumMismatch       400  checksum_mismatch: body does not match X-Chunk-Checksum
     ├── NotFound                    404  unknown session or route
     ├── RequestTimeout              408  the body stopped arriving
     ├── Conflict                    409  state conflict (missing chunks, already finalized, ...)
     ├── Gone                        410  session expired or aborted
     ├── TooLarge                    413  file, chunk or body over a limit
     ├── UnsupportedMediaType        415  content type / libmagic type not allowed
     ├── InvalidField                422  a field has a wrong type or value
     ├── ServiceUnavailable          503  shutting down: retry (on another instance)
     └── InsufficientStorage         507  not enough disk space

Handlers and the store raise these; one middleware (``chunkd.api.middleware``) renders them as
``{"error": {"code": ..., "message": ..., **details}}`` with the class's status. Nothing else
ever reaches the client: an unexpected exception becomes a 500 ``internal_error`` without a trace.
"""

from __future__ import annotations

from typing import Any


class ChunkdError(Exception):
    """Base class: a stable ``code``, an HTTP ``status``, a human ``message`` and ``details``."""

    status: int = 500
    code: str = "internal_error"

    def __init__(self, message: str, *, code: str | None = None, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.details = details

    def to_json(self) -> dict[str, Any]:
        return {"error": {"code": self.code, "message": self.message, **self.details}}

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> ChunkdError:
        """Rebuild an error stored as ``{"status": ..., **to_json()}`` (e.g. a failed finalize)."""
        body = dict(doc["error"])
        status = doc.get("status", 500)
        kind = next((k for k in _all_subclasses(ChunkdError) if k.status == status), ChunkdError)
        err = kind(body.pop("message"), code=body.pop("code"), **body)
        err.status = status
        return err


def _all_subclasses(cls: type) -> list[type]:
    out = []
    for sub in cls.__subclasses__():
        out += [sub, *_all_subclasses(sub)]
    return out


class BadRequest(ChunkdError):
    status = 400
    code = "bad_request"


class ChecksumMismatch(BadRequest):
    """The chunk's bytes do not hash to the client's ``X-Chunk-Checksum``: resend the chunk."""

    code = "checksum_mismatch"


class NotFound(ChunkdError):
    status = 404
    code = "not_found"


class RequestTimeout(ChunkdError):
    status = 408
    code = "request_timeout"


class Conflict(ChunkdError):
    status = 409
    code = "conflict"


class Gone(ChunkdError):
    status = 410
    code = "gone"


class TooLarge(ChunkdError):
    status = 413
    code = "too_large"


class UnsupportedMediaType(ChunkdError):
    status = 415
    code = "unsupported_media_type"


class InvalidField(ChunkdError):
    status = 422
    code = "invalid_field"


class ServiceUnavailable(ChunkdError):
    status = 503
    code = "service_unavailable"


class InsufficientStorage(ChunkdError):
    status = 507
    code = "insufficient_storage"
