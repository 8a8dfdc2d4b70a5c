"""A finalized upload's task: its stages, its steps and the record kept of it (``task.json``).

    queued ──► transcribing ──► aligning ──► diarizing ──► complete
       └────────────┴──────────────┴────────────┴────────► failed (with the error)

Only :class:`Task` knows the record's JSON shape; the runner's journal is its one writer.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, replace
from typing import Any

#: Steps kept in a task's history (a WhisperX task has a handful; a chatty command may have more).
MAX_HISTORY = 500


class Stage(enum.StrEnum):
    """Where a task is. The non-final ones are the stages the WhisperX frontend shows, in order."""

    QUEUED = "queued"
    TRANSCRIBING = "transcribing"
    ALIGNING = "aligning"
    DIARIZING = "diarizing"
    COMPLETE = "complete"
    FAILED = "failed"

    @property
    def is_final(self) -> bool:
        return self in (Stage.COMPLETE, Stage.FAILED)

    @property
    def rank(self) -> int:
        """Order along the pipeline (queued 0 … complete 4); ``failed`` ranks with nothing."""
        return -1 if self is Stage.FAILED else list(Stage).index(self)

    @classmethod
    def reported(cls, text: object) -> Stage:
        """A stage a hand-off reports while working: a final or unknown one is ``transcribing``
        ("complete" is said once, by the runner, when the hand-off returned)."""
        try:
            stage = cls(str(text))
        except ValueError:
            return cls.TRANSCRIBING
        return cls.TRANSCRIBING if stage.is_final else stage


@dataclass(frozen=True)
class Step:
    """One entry of a task's history: what a subscriber is told."""

    stage: Stage
    percentage: int
    message: str
    at: float

    def to_json(self) -> dict[str, Any]:
        return {"stage": self.stage.value, "percentage": self.percentage,
                "message": self.message, "at": self.at}

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> Step:
        return cls(Stage(doc.get("stage", "queued")), int(doc.get("percentage", 0)),
                   str(doc.get("message", "")), float(doc.get("at", 0.0)))


#: The record's own keys; any other key is something a hand-off remembered (e.g. ``identifier``).
_OWN_KEYS = frozenset({"task_id", "session_id", "handoff", "stage", "percentage", "message",
                       "mime_type", "attempt", "updated_at", "history", "error", "has_result",
                       "location"})


@dataclass(frozen=True)
class Task:
    """The task of one finalized session. Immutable: each change returns a new record."""

    task_id: str
    session_id: str
    handoff: str
    mime_type: str
    updated_at: float
    stage: Stage = Stage.QUEUED
    percentage: int = 0
    message: str = "Queued for processing"
    attempt: int = 1
    history: tuple[Step, ...] = ()
    #: The failure, as the frontend reads it (``error_code``, ``user_message``, ``technical_detail``).
    error: dict[str, str] | None = None
    has_result: bool = False
    location: str | None = None
    #: What the hand-off remembered to resume after a restart (e.g. the service's ``identifier``).
    remembered: dict[str, Any] = field(default_factory=dict)

    @property
    def identifier(self) -> str | None:
        """The outside service's own id for this task, once known (the WhisperX ``identifier``):
        a frontend reads the transcript and history from the service with it."""
        value = self.remembered.get("identifier")
        return None if value is None else str(value)

    @classmethod
    def queued(cls, task_id: str, session_id: str, handoff: str, mime_type: str, now: float
               ) -> Task:
        first = cls(task_id, session_id, handoff, mime_type, now)
        return first.with_step(Stage.QUEUED, 0, first.message, now)

    # -- transitions -------------------------------------------------------------------------

    def with_step(self, stage: Stage, percentage: int, message: str, now: float) -> Task:
        """The task at a new step; the step is appended to the history unless it repeats the last
        (every step is kept, so a subscriber sees each stage even when they come fast)."""
        pct = max(0, min(100, int(percentage)))
        history = self.history
        if not history or (history[-1].stage, history[-1].percentage, history[-1].message) != (
            stage, pct, message
        ):
            history = (*history, Step(stage, pct, message, now))[-MAX_HISTORY:]
        return replace(self, stage=stage, percentage=pct, message=message, history=history,
                       updated_at=now)

    def remembering(self, now: float, **fields: Any) -> Task:
        clash = _OWN_KEYS.intersection(fields)
        if clash:
            raise ValueError(f"a hand-off cannot overwrite the task's own fields: {sorted(clash)}")
        return replace(self, remembered={**self.remembered, **fields}, updated_at=now)

    def completed(self, now: float, *, message: str, location: str | None, has_result: bool
                  ) -> Task:
        done = replace(self, error=None, location=location, has_result=has_result)
        return done.with_step(Stage.COMPLETE, 100, message, now)

    def failed(self, error: dict[str, str], now: float) -> Task:
        message = error.get("user_message", "processing failed")
        return replace(self, error=error).with_step(Stage.FAILED, self.percentage, message, now)

    def requeued(self, now: float, message: str) -> Task:
        """Queued again (``chunkd retry``): the error, the result and what the hand-off
        remembered are dropped, so it starts over."""
        again = replace(self, error=None, has_result=False, remembered={},
                        attempt=self.attempt + 1)
        return again.with_step(Stage.QUEUED, 0, message, now)

    # -- the record --------------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            **self.remembered,
            "task_id": self.task_id,
            "session_id": self.session_id,
            "handoff": self.handoff,
            "stage": self.stage.value,
            "percentage": self.percentage,
            "message": self.message,
            "mime_type": self.mime_type,
            "attempt": self.attempt,
            "updated_at": self.updated_at,
            "history": [s.to_json() for s in self.history],
        }
        if self.error is not None:
            doc["error"] = self.error
        if self.has_result:
            doc["has_result"] = True
        if self.location is not None:
            doc["location"] = self.location
        return doc

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> Task:
        return cls(
            task_id=str(doc["task_id"]),
            session_id=str(doc["session_id"]),
            handoff=str(doc.get("handoff", "")),
            mime_type=str(doc.get("mime_type", "")),
            updated_at=float(doc.get("updated_at", 0.0)),
            stage=Stage(doc.get("stage", "queued")),
            percentage=int(doc.get("percentage", 0)),
            message=str(doc.get("message", "")),
            attempt=int(doc.get("attempt", 1)),
            history=tuple(Step.from_json(s) for s in doc.get("history", [])),
            error=doc.get("error"),
            has_result=bool(doc.get("has_result", False)),
            location=doc.get("location"),
            remembered={k: v for k, v in doc.items() if k not in _OWN_KEYS},
        )
