"""The hand-off seam: what happens to a file once it is whole and valid.

A hand-off gets a :class:`Job`: the finished upload (task id, path, MIME type, session metadata),
the task's persisted state, and three ways to touch that state:

- ``report(stage, percentage, message)``: a progress step, relayed to WebSocket subscribers;
- ``remember(**fields)``: persist something needed after a restart (e.g. the service's id);
- ``claim_once(name)``: an atomic, one-time claim (e.g. "submit") so that nothing is ever
  submitted twice, whatever restarts and races happen.

``run(job)`` returns the final record's extra fields (``result``, ``location``, ...) or raises
:class:`HandoffFailed` with a code and the user-facing message. It must be safe to call again
for the same task after a crash: look at ``job.state`` to resume instead of starting over.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from chunkd.store.base import SessionMeta

#: The stages the WhisperX frontend knows, in order.
STAGES = ("queued", "transcribing", "aligning", "diarizing", "complete")


@dataclass(frozen=True)
class FinishedUpload:
    task_id: str
    path: Path       # the whole file; a hand-off may move it (same file system: rename)
    mime_type: str   # what libmagic found
    meta: SessionMeta


class HandoffFailed(Exception):
    """The hand-off gave up: ``code`` is stable, ``user_message`` is for people."""

    def __init__(self, code: str, user_message: str, technical_detail: str = "") -> None:
        super().__init__(f"{code}: {user_message}")
        self.code = code
        self.user_message = user_message
        self.technical_detail = technical_detail

    def to_json(self) -> dict[str, str]:
        return {
            "error_code": self.code,
            "user_message": self.user_message,
            "technical_detail": self.technical_detail,
        }


@dataclass
class Job:
    upload: FinishedUpload
    state: dict[str, Any]
    report: Callable[[str, int, str], Awaitable[None]]
    remember: Callable[..., Awaitable[None]]
    claim_once: Callable[[str], Awaitable[bool]]


class Handoff(Protocol):
    #: Name recorded in the task (``folder``, ``whisperx``, ``command``).
    name: str
    #: True when ``run`` finishes at once (finalize then waits for it and answers with the result).
    inline: bool

    async def run(self, job: Job) -> dict[str, Any]:
        """Take the file; return the final record's extra fields or raise HandoffFailed."""
        ...
