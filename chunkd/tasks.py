"""The task runner: drives each finalized upload through its hand-off, exactly once.

    finalize ──► start(upload): task.json = queued ──► take the lease ──► handoff.run(job)
                                                                          │ report / remember
                                                                          ▼
                                              task.json: stage, percentage, message ... then
                                              complete (+ result.json) or failed (+ error)

All of a task's state is in its session folder, written only by the process holding the task's
lease. Every ``rescan_interval`` each process looks for tasks that are not final and whose lease
is stale (its owner was killed, even with -9) and takes them over; the hand-off then resumes
from ``job.state`` (e.g. polls the service with the identifier it remembered) instead of
starting again, and its one-time claims (``submit.once``) make a second submission impossible.
Every change pokes the progress hub, which tells the subscribers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from pathlib import Path
from collections.abc import Awaitable, Callable
from typing import Any

from chunkd.errors import ChunkdError
from chunkd.handoff.base import FinishedUpload, Handoff, HandoffFailed, Job
from chunkd.progress import ProgressHub
from chunkd.store.filesystem import LEASE_STALE_SECONDS, FileSystemStore, LeaseLost

log = logging.getLogger("chunkd.tasks")

#: Steps kept in a task's history (a WhisperX task has a handful; a chatty command may have more).
MAX_HISTORY = 500


class TaskRunner:
    def __init__(
        self,
        store: FileSystemStore,
        handoff: Handoff,
        hub: ProgressHub,
        *,
        rescan_interval: float = 5.0,
    ) -> None:
        self.store = store
        self.handoff = handoff
        self.hub = hub
        self.rescan_interval = rescan_interval
        self._running: dict[str, asyncio.Task[None]] = {}
        #: Finishes a finalize whose process died after claiming it (set by the app).
        self.recover: Callable[[str], Awaitable[Any]] | None = None
        self._rescan: asyncio.Task[None] | None = None

    # -- life cycle (aiohttp cleanup_ctx) --------------------------------------------------

    async def open(self) -> None:
        self._rescan = asyncio.create_task(self._rescan_forever())

    async def close(self) -> None:
        tasks = [t for t in (self._rescan, *self._running.values()) if t is not None]
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        self._running.clear()

    # -- starting and resuming -------------------------------------------------------------

    async def start(self, upload: FinishedUpload) -> dict[str, Any]:
        """Record the new task (queued) and start its hand-off; return the task record.

        An inline hand-off (the folder) finishes before this returns; the others run in the
        background and report as they go.
        """
        sid = upload.meta.session_id
        task = {
            "task_id": upload.task_id,
            "session_id": sid,
            "handoff": self.handoff.name,
            "stage": "queued",
            "percentage": 0,
            "message": "Queued for processing",
            "mime_type": upload.mime_type,
            "attempt": 1,
            "updated_at": time.time(),
        }
        task["history"] = [{"stage": "queued", "percentage": 0, "message": task["message"],
                            "at": task["updated_at"]}]
        existing = (await self.store.state(sid)).task
        if existing is not None:  # a finalize that took over a dead one's claim
            return existing
        if not self.handoff.inline:  # an inline hand-off records only its outcome: one fsync less
            await self.store.record_task(sid, task)
            self.hub.poke(sid)
        lease = await self.store.take_lease(sid)
        if lease is None:
            return task
        if self.handoff.inline:
            return await self._drive(sid, lease, task)
        self._spawn(sid, lease)
        return task

    def _spawn(self, sid: str, lease: Path) -> None:
        t = asyncio.create_task(self._drive(sid, lease))
        self._running[sid] = t
        t.add_done_callback(lambda _: self._running.pop(sid, None))

    async def _rescan_forever(self) -> None:
        while True:
            try:
                await self.resume_orphans()
            except Exception:
                log.exception("task rescan failed")
            await asyncio.sleep(self.rescan_interval)

    async def resume_orphans(self) -> None:
        """Take over every unfinished task whose owner is gone (or that ``chunkd retry`` reset),
        and finish every finalize whose process died between its claim and its task."""
        if self.recover is not None:
            for sid in await self.store.stuck_finalizing():
                try:
                    await self.recover(sid)
                    log.info("finished the interrupted finalize of session %s", sid)
                except ChunkdError as exc:
                    log.info("interrupted finalize of session %s: %s", sid, exc.message)
        for sid in await self.store.open_tasks():
            if sid in self._running:
                continue
            with contextlib.suppress(ChunkdError, FileNotFoundError):
                lease = await self.store.take_lease(sid)
                if lease is not None:
                    log.info("resuming task of session %s", sid)
                    self._spawn(sid, lease)

    # -- driving one task ------------------------------------------------------------------

    async def _drive(self, sid: str, lease: Path, first: dict[str, Any] | None = None
                     ) -> dict[str, Any]:
        state = await self.store.state(sid)
        task = dict(first if first is not None else state.task or {})
        upload = FinishedUpload(
            task_id=task["task_id"],
            path=self.store.data_path(sid),
            mime_type=task.get("mime_type", ""),
            meta=state.meta,
        )

        async def save() -> None:
            task["updated_at"] = time.time()
            if lost.is_set():
                raise LeaseLost(str(lease))
            step = {k: task.get(k) for k in ("stage", "percentage", "message")}
            history = task.setdefault("history", [])
            if not history or {k: history[-1].get(k) for k in step} != step:
                # Every step is kept, so a subscriber sees each stage even when they come fast.
                history.append({**step, "at": task["updated_at"]})
                del history[:-MAX_HISTORY]
            await self.store.record_task(sid, task, lease=lease)
            self.hub.poke(sid)

        async def report(stage: str, percentage: int, message: str) -> None:
            if (task.get("stage"), task.get("percentage"), task.get("message")) == (
                stage, percentage, message,
            ):
                return
            task.update(stage=stage, percentage=max(0, min(100, int(percentage))), message=message)
            await save()

        async def remember(**fields: Any) -> None:
            task.update(fields)
            await save()

        async def claim_once(name: str) -> bool:
            return await self.store.claim_once(sid, name)

        lost = asyncio.Event()
        renewer = asyncio.create_task(self._renew(lease, asyncio.current_task(), lost))
        try:
            extra = await self.handoff.run(Job(upload, task, report, remember, claim_once))
            result = extra.pop("result", None)
            if result is not None:
                await self.store.record_result(sid, result)
                task["has_result"] = True
            task.update({"stage": "complete", "percentage": 100, "message": "Done", **extra})
            task.pop("error", None)
        except HandoffFailed as exc:
            task.update(stage="failed", error=exc.to_json(), message=exc.user_message)
        except LeaseLost:
            log.warning("session %s: another process took the task over; stopping here", sid)
            return task
        except asyncio.CancelledError:
            if lost.is_set():  # cancelled by _renew: another process drives the task now
                log.warning("session %s: lease lost; stopped the hand-off here", sid)
                return task
            raise  # shutdown: the lease goes stale and someone resumes the task
        except Exception as exc:
            log.exception("hand-off of session %s failed", sid)
            task.update(
                stage="failed", message="processing failed",
                error=HandoffFailed("internal_error", "processing failed", repr(exc)).to_json(),
            )
        finally:
            renewer.cancel()
        try:
            await save()
        except LeaseLost:
            return task
        await self.store.release_lease(lease)
        return task

    async def _renew(self, lease: Path, driver: asyncio.Task[Any] | None, lost: asyncio.Event
                     ) -> None:
        """Keep the lease fresh; if it was taken over, stop the driver: one writer per task."""
        while True:
            await asyncio.sleep(LEASE_STALE_SECONDS / 3)
            if not await self.store.renew_lease(lease):
                lost.set()
                if driver is not None:
                    driver.cancel()
                return


async def retry_task(store: FileSystemStore, task_id: str) -> dict[str, Any]:
    """Queue a failed task again (``chunkd retry``): a running chunkd picks it up within seconds.

    Its one-time claims are kept as history and freed, so the hand-off submits or runs once more.
    """
    sid = await store.resolve(task_id)
    await store.get(sid)  # unknown or removed: a clear error, not a missing folder
    # Hold the task's lease while checking and resetting it: no runner (and no second retry)
    # can act on the task in between.
    lease = await store.take_lease(sid)
    if lease is None:
        raise ChunkdError(f"task {task_id} is being worked on right now", code="task_busy")
    try:
        task = (await store.state(sid)).task
        if task is None or task.get("task_id") != task_id:
            raise ChunkdError(f"no task {task_id}", code="task_not_found")
        if task.get("stage") != "failed":
            raise ChunkdError(f"task {task_id} is {task.get('stage')}, not failed",
                              code="not_failed")
        if not store.data_path(sid).exists():
            raise ChunkdError(f"the file of task {task_id} is gone; it cannot be retried",
                              code="file_gone")
        for name in ("submit", "run"):
            await store.release_once(sid, name)
        for key in ("error", "identifier", "has_result"):
            task.pop(key, None)
        task.update(stage="queued", percentage=0, message="Queued again by chunkd retry",
                    attempt=int(task.get("attempt", 1)) + 1, updated_at=time.time())
        await store.record_task(sid, task, lease=lease)
    finally:
        await store.release_lease(lease)
    return task
