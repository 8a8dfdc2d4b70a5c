"""The hand-off seam: what happens to a file once it is whole and valid.

A hand-off gets a :class:`Job`: the task id, the session's metadata, the MIME type libmagic
found, the finished file as a :class:`~chunkd.store.base.Blob` (None if a crashed earlier try
already moved it), what this hand-off remembered on an earlier try, and three ways to touch the
task (all through the runner's journal, the task's one writer):

- ``report(stage, percentage, message)``: a progress step, relayed to WebSocket subscribers
  (a final or unknown stage is shown as ``transcribing``: the runner says ``complete``);
- ``remember(**fields)``: persist something needed after a restart (e.g. the service's id);
- ``claim_once(name)``: an atomic, one-time claim (e.g. "submit") so that nothing is ever
  submitted twice, whatever restarts and races happen. A hand-off lists its names in
  ``once_claims``; ``chunkd retry`` frees them.

``job.credential`` is the end user's own credential for the outside service, when the operator
asked to act as the user: held in memory only, never written to the store or a log, so it is
None after a restart.

``run(job)`` returns an :class:`Outcome` or raises :class:`~chunkd.errors.HandoffFailed`. It must
be safe to call again for the same task after a crash: look at ``job.remembered`` to resume.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from chunkd.model.session import SessionMeta
from chunkd.store.base import Blob


class Journal(Protocol):
    async def report(self, stage: str, percentage: int, message: str) -> None: ...
    async def remember(self, **fields: Any) -> None: ...
    async def claim_once(self, name: str) -> bool: ...


@dataclass(frozen=True)
class Credential:
    """Request headers that prove who the end user is to the outside service (their
    ``Authorization``, or their session cookie and CSRF token). Its repr hides them, so a log
    line or a traceback never shows one."""

    headers: Mapping[str, str] = field(repr=False)

    def __repr__(self) -> str:
        return f"Credential({', '.join(sorted(self.headers))}: hidden)"


@dataclass(frozen=True)
class Job:
    task_id: str
    meta: SessionMeta
    mime_type: str
    blob: Blob | None
    remembered: Mapping[str, Any]
    journal: Journal
    credential: Credential | None = None

    async def report(self, stage: str, percentage: int, message: str) -> None:
        await self.journal.report(stage, percentage, message)

    async def remember(self, **fields: Any) -> None:
        await self.journal.remember(**fields)

    async def claim_once(self, name: str) -> bool:
        return await self.journal.claim_once(name)


@dataclass(frozen=True)
class Outcome:
    """What a finished hand-off tells the task (and its subscribers)."""

    message: str = "Done"
    result: Any = None          # e.g. the transcript; kept beside the task, sent at the end
    location: str | None = None  # where the file went, for a hand-off that keeps it locally


class Handoff(Protocol):
    #: Name recorded in the task (``folder``, ``whisperx``, ``command``).
    name: str
    #: True when ``run`` finishes at once (finalize then waits for it and answers with the result).
    inline: bool
    #: The names this hand-off claims with ``job.claim_once`` (freed by ``chunkd retry``).
    once_claims: tuple[str, ...]

    async def run(self, job: Job) -> Outcome:
        """Take the file; return the outcome or raise HandoffFailed."""
        ...
