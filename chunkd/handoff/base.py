"""The hand-off seam: what happens to a file once it is whole and valid.

A hand-off gets a :class:`FinishedUpload` (the task id claimed at finalize, the file's path, the
session's metadata) and returns the task's first record, which the store keeps as ``task.json``.
``submit`` must be idempotent for one task id: after a crash, finalize may call it again.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from chunkd.store.base import SessionMeta


@dataclass(frozen=True)
class FinishedUpload:
    task_id: str
    path: Path       # the whole file; the hand-off may move it (same file system: rename)
    mime_type: str   # what libmagic found
    meta: SessionMeta


class Handoff(Protocol):
    name: str

    async def submit(self, upload: FinishedUpload) -> dict[str, Any]:
        """Take the file; return the task record (``task_id``, ``stage``, and where it went)."""
        ...
