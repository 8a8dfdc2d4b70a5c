"""The task runner: drives each finalized upload through its hand-off, exactly once.

    start(sid, task_id, mime) ──► acquire the lease ──► task.json = queued ──► handoff.run(job)
                                                                                │ job.report /
                                                                                ▼ job.remember
                                   TaskJournal: the task's one writer, always under the lease
                                                                                │
                                              complete (+ result.json) or failed (+ error)

All of a task's state is in the store, written only by the holder of the task's lease (renewed
every ``renew_interval``; a renewal that finds the lease taken over cancels the hand-off, and
any later write raises :class:`~chunkd.store.base.LeaseLost`). A task whose owner died is
adopted by :mod:`chunkd.core.recovery`; the hand-off then resumes from what it remembered, and
its one-time claims (``submit.once``) make a second submission impossible. Every write pokes
the progress hub, which tells the subscribers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from chunkd import errors as E
from chunkd.errors import HandoffFailed
from chunkd.handoff.base import Credential, Handoff, Job
from chunkd.model.session import SessionMeta, SessionState
from chunkd.model.task import Stage, Task
from chunkd.progress import ProgressHub
from chunkd.store.base import LEASE_STALE_SECONDS, Lease, LeaseLost, SessionStore

log = logging.getLogger("chunkd.tasks")


class TaskJournal:
    """The only writer of one task's record: every change goes through here, under the lease."""

    def __init__(self, store: SessionStore, hub: ProgressHub, lease: Lease, task: Task) -> None:
        self.store = store
        self.hub = hub
        self.lease = lease
        self.task = task
        #: Set when the lease was found taken over: nothing may be written any more.
        self.lost = asyncio.Event()

    async def save(self, task: Task) -> None:
        if self.lost.is_set():
            raise LeaseLost(f"session {task.session_id}")
        await self.store.write_task(task, self.lease)
        self.task = task
        self.hub.poke(task.session_id)

    async def report(self, stage: str, percentage: int, message: str) -> None:
        """A progress step. A final or unknown stage is reported as ``transcribing``: only the
        runner says ``complete`` or ``failed``, once, when the hand-off returned. A step behind
        the task's current one (an earlier stage, or a lower percentage) is dropped."""
        step = (Stage.reported(stage), max(0, min(100, int(percentage))), message)
        if (self.task.stage, self.task.percentage, self.task.message) == step:
            return
        if step[0].rank < self.task.stage.rank or (
            step[0] is self.task.stage and step[1] < self.task.percentage
        ):
            return  # progress never goes backwards (a service may say an earlier stage late)
        await self.save(self.task.with_step(*step, self.store.clock()))

    async def remember(self, **fields: Any) -> None:
        await self.save(self.task.remembering(self.store.clock(), **fields))

    async def claim_once(self, name: str) -> bool:
        return await self.store.claim_once(self.task.session_id, name)


class TaskRunner:
    def __init__(self, store: SessionStore, handoff: Handoff, hub: ProgressHub, *,
                 renew_interval: float = LEASE_STALE_SECONDS / 3) -> None:
        self.store = store
        self.handoff = handoff
        self.hub = hub
        self.renew_interval = renew_interval
        self._running: dict[str, asyncio.Task[Task]] = {}
        #: End users' credentials by task id, in memory only (see Job.credential).
        self._credentials: dict[str, Credential] = {}

    async def close(self) -> None:
        """Stop every hand-off (shutdown): their leases go stale and a restart resumes them."""
        tasks = list(self._running.values())
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        self._running.clear()

    async def start(self, session_id: str, task_id: str, mime_type: str,
                    credential: Credential | None = None) -> Task:
        """Create the task of a just-finalized session and start its hand-off; return its record.

        An inline hand-off (the folder) finishes before this returns; the others run in the
        background and report as they go.
        """
        lease = await self.store.acquire(session_id)
        state = await self.store.state(session_id)
        if state.task is not None or lease is None:
            # A finalize that took over a dead one's claim finds the task there (or being made).
            if lease is not None:
                await self.store.release(lease)
            return state.task or Task.queued(task_id, session_id, self.handoff.name, mime_type,
                                             self.store.clock())
        task = Task.queued(task_id, session_id, self.handoff.name, mime_type, self.store.clock())
        if self.handoff.inline:
            # An inline hand-off records only its outcome: one durable write less per finalize.
            return await self._drive(lease, task, state.meta)
        await self.store.write_task(task, lease)
        self.hub.poke(session_id)
        if credential is not None:
            self._credentials[task_id] = credential
        self._spawn(lease, task, state.meta)
        return task

    async def send_again(self, session_id: str, credential: Credential) -> Task:
        """A failed task queued again by a new finalize that brings the end user's credential
        (a hand-off acting as the user cannot be retried without one): driven here, with it.
        A task that is not failed (or that another process holds) is returned as it is."""
        lease = await self.store.acquire(session_id)
        state = await self.store.state(session_id)
        if lease is None or state.task is None or state.task.stage is not Stage.FAILED:
            if lease is not None:
                await self.store.release(lease)
            assert state.task is not None
            return state.task
        try:
            task = await _requeue(self.store, session_id, None, lease, self.handoff.once_claims,
                                  "Sent again with the user's credential")
        except BaseException:
            await self.store.release(lease)
            raise
        self.hub.poke(session_id)
        self._credentials[task.task_id] = credential
        self._spawn(lease, task, state.meta)
        return task

    async def adopt(self, state: SessionState) -> bool:
        """Take over the unfinished task of ``state`` if its lease is free (its owner died, or
        ``chunkd retry`` queued it again). True if this process now drives it."""
        sid = state.meta.session_id
        if state.task is None or state.task.stage.is_final or sid in self._running:
            return False
        lease = await self.store.acquire(sid)
        if lease is None:
            return False
        log.info("resuming task %s of session %s", state.task.task_id, sid)
        self._spawn(lease, state.task, state.meta)
        return True

    def _spawn(self, lease: Lease, task: Task, meta: SessionMeta) -> None:
        sid = meta.session_id
        t = asyncio.create_task(self._drive(lease, task, meta))
        self._running[sid] = t
        t.add_done_callback(lambda _: self._running.pop(sid, None))

    async def _drive(self, lease: Lease, task: Task, meta: SessionMeta) -> Task:
        journal = TaskJournal(self.store, self.hub, lease, task)
        job = Job(task.task_id, meta, task.mime_type, await self.store.blob(meta.session_id),
                  dict(task.remembered), journal, self._credentials.get(task.task_id))
        renewer = asyncio.create_task(self._renew(lease, asyncio.current_task(), journal.lost))
        try:
            outcome = await self.handoff.run(job)
            if outcome.result is not None:
                await self.store.write_result(meta.session_id, outcome.result, lease)
            final = journal.task.completed(self.store.clock(), message=outcome.message,
                                           location=outcome.location,
                                           has_result=outcome.result is not None)
        except HandoffFailed as exc:
            log.warning("hand-off of session %s failed: %s (%s)", meta.session_id, exc.code,
                        exc.raw_detail[:2000])
            final = journal.task.failed(exc.to_task_error(), self.store.clock())
        except LeaseLost:
            log.warning("session %s: another process took the task over; stopping here",
                        meta.session_id)
            return journal.task
        except asyncio.CancelledError:
            if journal.lost.is_set():  # cancelled by _renew: another process drives it now
                log.warning("session %s: lease lost; stopped the hand-off", meta.session_id)
                return journal.task
            raise  # shutdown: the lease goes stale and someone resumes the task
        except Exception as exc:
            log.exception("hand-off of session %s failed", meta.session_id)
            # Never repr(exc): an HTTP client error's repr holds the request's headers.
            failure = E.PROCESSING_FAILED.handoff(f"{type(exc).__name__}: {exc}")
            final = journal.task.failed(failure.to_task_error(), self.store.clock())
        finally:
            renewer.cancel()
            self._credentials.pop(task.task_id, None)  # held only while this process drives it
        try:
            await journal.save(final)
        except LeaseLost:
            return journal.task
        await self.store.release(lease)
        return final

    async def _renew(self, lease: Lease, driver: asyncio.Task[Any] | None,
                     lost: asyncio.Event) -> None:
        """Keep the lease fresh; if it was taken over, stop the driver: one writer per task."""
        while True:
            await asyncio.sleep(self.renew_interval)
            if not await self.store.renew(lease):
                lost.set()
                if driver is not None:
                    driver.cancel()
                return


async def retry_task(store: SessionStore, task_id: str, once_claims: tuple[str, ...]) -> Task:
    """Queue a failed task again (``chunkd retry``): a running chunkd adopts it within seconds.

    The hand-off's one-time claims (``once_claims``) are kept as history and freed, so it
    submits or runs once more.
    """
    sid = await store.resolve(task_id)
    await store.get(sid)  # unknown or removed: a clear error, not a missing folder
    # Hold the task's lease while checking and resetting it: no runner (and no second retry)
    # can act on the task in between.
    lease = await store.acquire(sid)
    if lease is None:
        raise E.TASK_BUSY(task_id=task_id)
    try:
        return await _requeue(store, sid, task_id, lease, once_claims,
                              "Queued again by chunkd retry")
    finally:
        await store.release(lease)


async def _requeue(store: SessionStore, sid: str, task_id: str | None, lease: Lease,
                   once_claims: tuple[str, ...], message: str) -> Task:
    """Under ``lease``: the failed task queued again, its one-time claims freed."""
    task = (await store.state(sid)).task
    if task is None or (task_id is not None and task.task_id != task_id):
        raise E.TASK_NOT_FOUND(task_id=task_id)
    if task.stage is not Stage.FAILED:
        raise E.NOT_FAILED(task_id=task.task_id, stage=task.stage.value)
    if await store.blob(sid) is None:
        raise E.FILE_GONE(task_id=task.task_id)
    for name in once_claims:
        await store.release_once(sid, name)
    task = task.requeued(store.clock(), message)
    await store.write_task(task, lease)
    return task
