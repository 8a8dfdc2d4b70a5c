"""The embedded default hand-off: move the file to ``completed/<task_id>/`` with a JSON record.

    <completed_dir>/<task_id>/
      upload.<ext>     the file, moved by rename (never copied), so it costs the same for any size
      session.json     filename, language, model, task_params, sizes, times, MIME type
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

from chunkd.atomic import fsync_dir, write_json_atomic
from chunkd.handoff.base import FinishedUpload, Job


class FolderHandoff:
    name = "folder"
    inline = True

    def __init__(self, completed_dir: Path) -> None:
        self.completed_dir = completed_dir.resolve()
        self.completed_dir.mkdir(parents=True, exist_ok=True)

    async def run(self, job: Job) -> dict[str, Any]:
        return await asyncio.to_thread(self._move, job.upload)

    def _move(self, upload: FinishedUpload) -> dict[str, Any]:
        target_dir = self.completed_dir / upload.task_id
        target_dir.mkdir(exist_ok=True)
        target = target_dir / f"upload.{upload.meta.extension}"
        record = {
            **upload.meta.to_json(),
            "task_id": upload.task_id,
            "mime_type": upload.mime_type,
            "completed_at": time.time(),
            "file": target.name,
        }
        write_json_atomic(target_dir / "session.json", record)
        try:
            os.rename(upload.path, target)
        except FileNotFoundError:
            if not target.exists():  # not an earlier try of this same hand-off
                raise
        fsync_dir(target_dir)  # make the rename itself survive a power cut
        return {"location": str(target), "message": f"Saved to {target}"}
