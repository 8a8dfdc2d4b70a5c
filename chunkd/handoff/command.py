"""The command hand-off: run a program on the finished file, relaying what it prints.

The program gets the file's path as its last argument, and ``CHUNKD_TASK_ID``,
``CHUNKD_SESSION_ID``, ``CHUNKD_FILENAME``, ``CHUNKD_LANGUAGE``, ``CHUNKD_MODEL`` and
``CHUNKD_TASK_PARAMS`` (JSON) in its environment. Each line it prints on stdout that is a JSON
object is a progress step: ``{"stage": "transcribing", "percentage": 40, "message": "..."}``;
a line with ``"result"`` sets the task's result. Exit status 0 means complete, anything else
failed (with the end of its stderr). Other output is ignored.

The run is claimed once (``run.once``): if chunkd dies while the program runs, the task is
reported interrupted after the restart rather than run a second time (``chunkd retry`` reruns it).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
from typing import Any

import orjson

from chunkd.handoff.base import STAGES, HandoffFailed, Job


class CommandHandoff:
    name = "command"
    inline = False

    def __init__(self, command: str) -> None:
        self.argv = shlex.split(command)

    async def run(self, job: Job) -> dict[str, Any]:
        if not await job.claim_once("run"):
            raise HandoffFailed(
                "interrupted",
                "chunkd stopped while the command was running; `chunkd retry <task_id>` runs it again",
            )
        meta = job.upload.meta
        env = {
            **os.environ,
            "CHUNKD_TASK_ID": job.upload.task_id,
            "CHUNKD_SESSION_ID": meta.session_id,
            "CHUNKD_FILENAME": meta.filename,
            "CHUNKD_LANGUAGE": meta.language or "",
            "CHUNKD_MODEL": meta.model or "",
            "CHUNKD_TASK_PARAMS": orjson.dumps(meta.task_params).decode(),
        }
        try:
            proc = await asyncio.create_subprocess_exec(
                *self.argv, str(job.upload.path), env=env, stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            )
        except OSError as exc:
            raise HandoffFailed("command_not_runnable", f"cannot run {self.argv[0]}", repr(exc)) from None
        assert proc.stdout is not None and proc.stderr is not None
        stderr_task = asyncio.create_task(proc.stderr.read())
        result: Any = None
        try:
            async for raw in proc.stdout:
                try:
                    doc = orjson.loads(raw)
                except orjson.JSONDecodeError:
                    continue
                if not isinstance(doc, dict):
                    continue
                if "result" in doc:
                    result = doc["result"]
                if "stage" in doc:
                    stage = str(doc["stage"])
                    if stage == "complete" or stage not in STAGES:
                        stage = "transcribing"  # "complete" is said once, at exit 0
                    pct = doc.get("percentage", 0)
                    await job.report(stage, int(pct) if isinstance(pct, (int, float)) else 0,
                                     str(doc.get("message", "")))
            code = await proc.wait()
        finally:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        stderr = (await stderr_task)[-2000:].decode("utf-8", "replace")
        if code != 0:
            raise HandoffFailed(
                "command_failed", f"{os.path.basename(self.argv[0])} exited with status {code}", stderr
            )
        return {"result": result} if result is not None else {}
