"""The embedded default hand-off: move the file to ``completed/<task_id>/`` with a JSON record.

    <completed_dir>/<task_id>/
      upload.<ext>     the file, moved by rename (never copied), so it costs the same for any size
      session.json     filename, language, model, task_params, sizes, times, MIME type

It needs a store whose blobs can be moved into a local folder (:class:`~chunkd.store.base.Movable`).
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from chunkd import errors as E
from chunkd.atomic import write_json_atomic
from chunkd.handoff.base import Job, Outcome
from chunkd.store.base import Movable


class FolderHandoff:
    name = "folder"
    inline = True
    once_claims: tuple[str, ...] = ()

    def __init__(self, completed_dir: Path) -> None:
        self.completed_dir = completed_dir.resolve()
        self.completed_dir.mkdir(parents=True, exist_ok=True)

    async def run(self, job: Job) -> Outcome:
        target_dir = self.completed_dir / job.task_id
        target = target_dir / f"upload.{job.meta.extension}"
        record = {
            **job.meta.to_json(),
            "task_id": job.task_id,
            "mime_type": job.mime_type,
            "completed_at": time.time(),
            "file": target.name,
        }

        def prepare() -> bool:
            target_dir.mkdir(exist_ok=True)
            write_json_atomic(target_dir / "session.json", record)
            return target.exists()

        already_there = await asyncio.to_thread(prepare)
        if job.blob is None:
            if not already_there:  # not an earlier try of this same hand-off
                raise E.PROCESSING_FAILED.handoff("the finished file is gone")
        elif isinstance(job.blob, Movable):
            await job.blob.move_to(target)
        else:
            raise E.PROCESSING_FAILED.handoff("the folder hand-off needs a file-system store")
        # Relative to the data dir: a reply never shows the server's own paths.
        shown = f"{self.completed_dir.name}/{job.task_id}/{target.name}"
        return Outcome(message=f"Saved to {shown}", location=shown)
