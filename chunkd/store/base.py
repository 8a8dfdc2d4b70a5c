"""What a session store is: the data it hands out and the :class:`SessionStore` protocol.

A store keeps upload sessions: their creation-time metadata, the bytes received so far (one file
per session), which chunks are counted, and the one-time end of a session (finalize, abort or
expiry). Everything a caller sees is derived from the store's durable state, so it is right after
a restart and when several chunkd processes share one store.
"""

from __future__ import annotations

import enum
from collections.abc import AsyncIterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol


class Phase(enum.StrEnum):
    """Where a session is in its life (the ``status`` field of the HTTP replies)."""

    UPLOADING = "uploading"    # chunks still missing
    COMPLETE = "complete"      # every chunk counted, not finalized yet
    FINALIZING = "finalizing"  # finalize claimed, validation / hand-off under way
    PROCESSING = "processing"  # handed off; the pipeline is working on it
    COMPLETED = "completed"    # the hand-off finished
    FAILED = "failed"          # finalize refused the file (its bytes are removed)


@dataclass(frozen=True)
class SessionMeta:
    """What was fixed when the session was created. Never changes afterwards."""

    session_id: str
    filename: str
    extension: str
    total_size: int
    chunk_size: int
    total_chunks: int
    created_at: float
    expires_at: float
    language: str | None = None
    model: str | None = None
    task_params: dict[str, Any] = field(default_factory=dict)

    def chunk_offset(self, index: int) -> int:
        return index * self.chunk_size

    def chunk_length(self, index: int) -> int:
        """Every chunk is ``chunk_size`` bytes; the last one holds the remainder."""
        return min(self.chunk_size, self.total_size - index * self.chunk_size)

    def to_json(self) -> dict[str, Any]:
        return {
            "session_id": self.session_id,
            "filename": self.filename,
            "extension": self.extension,
            "total_size": self.total_size,
            "chunk_size": self.chunk_size,
            "total_chunks": self.total_chunks,
            "created_at": self.created_at,
            "expires_at": self.expires_at,
            "language": self.language,
            "model": self.model,
            "task_params": self.task_params,
        }

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> SessionMeta:
        return cls(**{k: doc[k] for k in cls.__dataclass_fields__ if k in doc})


@dataclass(frozen=True)
class Claim:
    """The one-time end of a session, claimed atomically by whoever got there first."""

    kind: str          # "finalize" | "abort" | "expire"
    task_id: str | None
    claimed_at: float
    won: bool          # True for the caller that created the claim


@dataclass(frozen=True)
class SessionState:
    """A snapshot of one session, derived from the store."""

    meta: SessionMeta
    received: frozenset[int]
    claim: Claim | None = None
    task: dict[str, Any] | None = None
    failure: dict[str, Any] | None = None

    @property
    def missing(self) -> list[int]:
        return [i for i in range(self.meta.total_chunks) if i not in self.received]

    @property
    def received_bytes(self) -> int:
        return sum(self.meta.chunk_length(i) for i in self.received)

    @property
    def phase(self) -> Phase:
        if self.failure is not None:
            return Phase.FAILED
        if self.task is not None:
            return Phase.COMPLETED if self.task.get("stage") == "complete" else Phase.PROCESSING
        if self.claim is not None and self.claim.kind == "finalize":
            return Phase.FINALIZING
        if len(self.received) == self.meta.total_chunks:
            return Phase.COMPLETE
        return Phase.UPLOADING


@dataclass(frozen=True)
class ChunkReceipt:
    """The result of :meth:`SessionStore.put_chunk`."""

    index: int
    received: int           # chunks counted after this one
    already_received: bool  # the chunk had been counted before; the body was read and dropped


class SessionStore(Protocol):
    """A place to keep upload sessions. Every method is safe to call from several processes."""

    async def create(
        self,
        *,
        filename: str,
        extension: str,
        total_size: int,
        chunk_size: int,
        total_chunks: int,
        ttl: float,
        language: str | None,
        model: str | None,
        task_params: dict[str, Any],
    ) -> SessionMeta:
        """Create a session and reserve ``total_size`` bytes for it.

        Raises :class:`~chunkd.errors.InsufficientStorage` when the bytes cannot be reserved;
        nothing of the session is left behind then.
        """
        ...

    async def get(self, session_id: str) -> SessionMeta:
        """The session's metadata. Raises ``NotFound`` (unknown or malformed id) or ``Gone``."""
        ...

    async def resolve(self, any_id: str) -> str:
        """The session id behind a session id or a task id. Raises ``NotFound`` if malformed."""
        ...

    async def state(self, session_id: str) -> SessionState:
        """The session's current state, read from the store (same errors as :meth:`get`)."""
        ...

    async def put_chunk(
        self,
        meta: SessionMeta,
        index: int,
        body: AsyncIterable[bytes],
        *,
        sha256: str | None = None,
    ) -> ChunkReceipt:
        """Stream chunk ``index`` to its place and count it once it is whole (and flushed).

        Idempotent: a chunk already counted is read, checked for length and dropped. Raises
        ``BadRequest`` (body too short), ``TooLarge`` (too long), ``ChecksumMismatch``,
        ``Conflict`` (session already finalized) or ``Gone`` (aborted meanwhile); in each case
        the chunk is not counted and nothing counted before is touched.
        """
        ...

    async def claim_end(self, session_id: str, kind: str) -> Claim:
        """Claim the session's one-time end (``finalize``/``abort``/``expire``) atomically.

        Exactly one caller, in any process, gets ``won=True``; every later call returns that
        same claim with ``won=False``. A finalize claim carries a fresh task id.
        """
        ...

    def stale(self, claim: Claim) -> bool:
        """True when a finalize claim has waited so long for an outcome that its owner is dead."""
        ...

    def data_path(self, session_id: str) -> Path:
        """Where the session's bytes are (until a hand-off moves them away)."""
        ...

    async def record_task(
        self, session_id: str, task: dict[str, Any], *, lease: Path | None = None
    ) -> None:
        """Store the task's state (atomically replaced); with ``lease``, only while it holds."""
        ...

    async def record_failure(self, session_id: str, error: dict[str, Any]) -> None:
        """Mark the session failed with ``error`` and remove its bytes."""
        ...

    async def remove(self, session_id: str, reason: str) -> None:
        """Delete the session and its bytes, leaving a tombstone so later calls get ``Gone``."""
        ...

    async def sweep(self, now: float, busy: set[str]) -> list[str]:
        """Remove expired sessions, except those in ``busy`` or being written or finalized."""
        ...
