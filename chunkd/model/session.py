"""An upload session: what was fixed at creation, its one-time end, and a snapshot of its state.

Every field a caller sees is derived from these snapshots, which a store builds from its durable
state; nothing here does I/O.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from chunkd.model.task import Stage, Task


class Phase(enum.StrEnum):
    """Where a session is in its life (the ``status`` field of the HTTP replies)."""

    UPLOADING = "uploading"    # chunks still missing
    RECEIVED = "complete"      # every chunk counted, not finalized yet (wire name: "complete")
    FINALIZING = "finalizing"  # finalize claimed, validation / hand-off under way
    PROCESSING = "processing"  # handed off; the task is working on it
    COMPLETED = "completed"    # the task finished
    FAILED = "failed"          # finalize refused the file, or the task failed (see ``error``)


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
    #: The subject (user) that created the session, when auth is on; only it may touch it.
    owner: str | None = None
    #: Who the quotas count it for: the subject with auth, else the client's address.
    client: str | None = None
    #: ``chunked`` (the chunk API) or ``tus`` (tus 1.0: one byte stream, counted by offset).
    protocol: str = "chunked"
    #: The task id, when the client chose it at creation (tus metadata ``taskId``); otherwise
    #: finalize draws one.
    task_id: str | None = None
    #: tus: the ``Upload-Metadata`` header as the client sent it (HEAD gives it back).
    upload_metadata: str | None = None
    #: tus concatenation: ``partial`` or ``final`` (None for a plain upload).
    concat: str | None = None
    #: tus, a final upload: the partial uploads it is made of, in order, and their sizes.
    parts: tuple[str, ...] = ()
    part_sizes: tuple[int, ...] = ()
    #: tus: the length was deferred at creation; ``total_size`` is 0 until a PATCH declares it.
    deferred_length: bool = False

    @property
    def is_tus(self) -> bool:
        return self.protocol == "tus"

    @property
    def length_known(self) -> bool:
        return not self.deferred_length

    def chunk_offset(self, index: int) -> int:
        return index * self.chunk_size

    def chunk_length(self, index: int) -> int:
        """Every chunk is ``chunk_size`` bytes; the last one holds the remainder."""
        return min(self.chunk_size, self.total_size - index * self.chunk_size)

    def open_until(self, idle_ttl: float | None, last_write: float | None = None) -> float:
        """When the session expires while open: the end of its lifetime, or earlier, ``idle_ttl``
        after its bytes were last written (or its creation). The one rule for the replies, the
        store and the sweeper."""
        if idle_ttl is None:
            return self.expires_at
        return min(self.expires_at, (last_write or self.created_at) + idle_ttl)

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
            "owner": self.owner,
            "client": self.client,
            "protocol": self.protocol,
            "task_id": self.task_id,
            "upload_metadata": self.upload_metadata,
            "concat": self.concat,
            "parts": list(self.parts),
            "part_sizes": list(self.part_sizes),
            "deferred_length": self.deferred_length,
        }

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> SessionMeta:
        """Unknown keys are ignored and missing optional ones take their defaults, so records
        written by other versions still load."""
        fields = {k: doc[k] for k in cls.__dataclass_fields__ if k in doc}
        for name in ("parts", "part_sizes"):
            if name in fields:
                fields[name] = tuple(fields[name])
        return cls(**fields)


class EndKind(enum.StrEnum):
    """How a session ends; exactly one of them, claimed once."""

    FINALIZE = "finalize"
    ABORT = "abort"
    EXPIRE = "expire"
    #: A tus partial upload taken into a final (concatenated) one, whose id the claim carries
    #: as ``task_id``; its bytes belong to that final upload from then on.
    CONCAT = "concat"


@dataclass(frozen=True)
class Claim:
    """The one-time end of a session, claimed atomically by whoever got there first."""

    kind: EndKind
    task_id: str | None  # a finalize claim carries the task's id
    claimed_at: float
    won: bool            # True for the caller that created the claim


@dataclass(frozen=True)
class ChunkReceipt:
    """What receiving one chunk did."""

    index: int
    received: int           # chunks counted after this one
    already_received: bool  # the chunk had been counted before; the body was read and dropped


@dataclass(frozen=True)
class SessionState:
    """A snapshot of one session, derived from the store."""

    meta: SessionMeta
    received: frozenset[int]
    claim: Claim | None = None
    task: Task | None = None
    #: Why finalize refused the file (``ChunkdError.to_record()``); its bytes are gone then.
    failure: dict[str, Any] | None = None
    #: When its bytes were last written (any process), if the store knows.
    last_write: float | None = None
    #: A chunk of it is being written by this process right now.
    writing: bool = False
    #: tus: the bytes durably received, from the start of the file.
    offset: int = 0

    @property
    def missing(self) -> list[int]:
        return [i for i in range(self.meta.total_chunks) if i not in self.received]

    def expires_at(self, idle_ttl: float | None = None) -> float:
        """When the session expires: at the end of its lifetime, or, while it is open, earlier:
        ``idle_ttl`` after its last chunk (or its creation)."""
        if self.claim is not None or self.waits_for_concat:
            return self.meta.expires_at
        return self.meta.open_until(idle_ttl, self.last_write)

    @property
    def waits_for_concat(self) -> bool:
        """A whole tus partial upload, waiting for its siblings and the final POST: not idle."""
        return self.meta.concat == "partial" and not self.missing

    @property
    def received_bytes(self) -> int:
        if self.meta.is_tus:
            return self.offset
        return sum(self.meta.chunk_length(i) for i in self.received)

    @property
    def task_id(self) -> str | None:
        return self.claim.task_id if self.claim is not None else None

    @property
    def finished(self) -> bool:
        """The finalize has an outcome that will not change by itself: refused, or a task that
        reached a final stage."""
        if self.claim is not None and self.claim.kind is EndKind.CONCAT:
            return True  # its bytes went into the final upload
        return self.failure is not None or (self.task is not None and self.task.stage.is_final)

    @property
    def phase(self) -> Phase:
        if self.failure is not None:
            return Phase.FAILED
        if self.task is not None:
            if self.task.stage is Stage.COMPLETE:
                return Phase.COMPLETED
            return Phase.FAILED if self.task.stage is Stage.FAILED else Phase.PROCESSING
        if self.claim is not None and self.claim.kind is EndKind.FINALIZE:
            return Phase.FINALIZING
        if len(self.received) == self.meta.total_chunks:
            return Phase.RECEIVED
        return Phase.UPLOADING

    @property
    def error(self) -> dict[str, Any] | None:
        """Why it failed, in the API's error shape (``code``, ``message``, details)."""
        if self.failure is not None:
            return dict(self.failure["error"])
        if self.task is not None and self.task.stage is Stage.FAILED:
            err = self.task.error or {}
            return {"code": err.get("error_code", "processing_failed"),
                    "message": err.get("user_message", self.task.message)}
        return None
