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

from chunkd import errors as E
from chunkd.handoff.base import Job, Outcome
from chunkd.store.base import Assemblable


class CommandHandoff:
    name = "command"
    inline = False
    once_claims: tuple[str, ...] = ("run",)

    def __init__(self, command: str) -> None:
        self.argv = shlex.split(command)

    async def run(self, job: Job) -> Outcome:
        if not await job.claim_once("run"):
            raise E.COMMAND_INTERRUPTED.handoff()
        path = job.blob.local_path() if job.blob is not None else None
        if path is None and isinstance(job.blob, Assemblable):  # a tus final upload's parts
            path = await job.blob.assemble()
        if path is None:
            raise E.PROCESSING_FAILED.handoff("the command hand-off needs the file on a local disk")
        meta = job.meta
        env = {
            **os.environ,
            "CHUNKD_TASK_ID": job.task_id,
            "CHUNKD_SESSION_ID": meta.session_id,
            "CHUNKD_FILENAME": meta.filename,
            "CHUNKD_LANGUAGE": meta.language or "",
            "CHUNKD_MODEL": meta.model or "",
            "CHUNKD_TASK_PARAMS": orjson.dumps(meta.task_params).decode(),
        }
        try:
            proc = await asyncio.create_subprocess_exec(
                *self.argv, str(path), env=env, stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            )
        except OSError as exc:
            raise E.COMMAND_NOT_RUNNABLE.handoff(exc.strerror or type(exc).__name__,
                                                 program=os.path.basename(self.argv[0])
                                                 ) from None
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
                    pct = doc.get("percentage", 0)
                    await job.report(str(doc["stage"]),
                                     int(pct) if isinstance(pct, (int, float)) else 0,
                                     str(doc.get("message", "")))
            code = await proc.wait()
        finally:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        stderr = (await stderr_task)[-2000:].decode("utf-8", "replace")
        if code != 0:
            raise E.COMMAND_FAILED.handoff(stderr, program=os.path.basename(self.argv[0]),
                                           status=code)
        return Outcome(result=result)
