"""The progress hub: what each WebSocket subscriber of a session is told, and when.

Everything a subscriber hears is derived from the store, not from in-process events, so a
subscriber on one process sees chunks that another process received, and a subscriber that
joins late (or after a restart) starts from the truth on disk:

    store.state(session) ──► _Watch (one per watched session, only while someone listens)
                                 │  rescans on a poke (this process counted a chunk / a task
                                 │  moved) or every ``poll_interval`` (other processes)
                                 ▼
                  Subscriber queues (bounded; a subscriber that falls behind is dropped)

A new subscriber first gets a snapshot (upload counts, the task's last stage); after that only
changes. Bursts are coalesced (at most one round per ``min_gap``, so ~10 messages a second),
and the last state is never skipped: a round always sends the newest state. When the task
reaches a final stage (``complete`` or an error), every subscriber gets that final message once
and is closed normally.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from chunkd.errors import ChunkdError
from chunkd.model.session import SessionState
from chunkd.model.task import Step, Task
from chunkd.store.base import SessionStore

log = logging.getLogger("chunkd.progress")

#: WebSocket close codes (4000-4999 are the application's own).
CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_UNKNOWN_SESSION = 4404
CLOSE_SESSION_GONE = 4410
CLOSE_TOO_SLOW = 4008


def close_code_for(exc: ChunkdError) -> int:
    """How a stream ends on a store error: the session is gone (410) or unknown."""
    return CLOSE_SESSION_GONE if exc.status == 410 else CLOSE_UNKNOWN_SESSION


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def upload_message(state: SessionState) -> dict[str, Any]:
    meta = state.meta
    received = len(state.received)
    return {
        "type": "upload_progress",
        "session_id": meta.session_id,
        "uploaded_chunks": received,
        "total_chunks": meta.total_chunks,
        # tus counts bytes (one "chunk" is the whole file); the chunk API counts chunks
        "percentage": (int(state.received_bytes * 100 / meta.total_size)
                       if meta.is_tus and meta.total_size
                       else int(received * 100 / meta.total_chunks)),
        "uploaded_bytes": state.received_bytes,
        "total_bytes": meta.total_size,
        "timestamp": now_iso(),
    }


def error_message(task_id: str | None, code: str, user: str, detail: str = "") -> dict[str, Any]:
    return {
        "type": "error",
        "task_id": task_id,
        "error_code": code,
        "user_message": user,
        "technical_detail": detail,
        "timestamp": now_iso(),
    }


def _progress(task: Task, step: Step) -> dict[str, Any]:
    msg = {
        "type": "progress",
        "task_id": task.task_id,
        "stage": step.stage.value,
        "percentage": step.percentage,
        "message": step.message,
        "timestamp": now_iso(),
    }
    if task.identifier is not None:  # the service's own id: the transcript and history are there
        msg["identifier"] = task.identifier
    return msg


def final_message(state: SessionState, result: Any = None) -> dict[str, Any] | None:
    """The task's final message (``complete`` or ``error``), or None while it runs."""
    if state.failure is not None:  # finalize refused the file (e.g. 415)
        refused = ChunkdError.from_record(state.failure)
        detail = ", ".join(str(v) for v in refused.details.values())  # e.g. the detected type
        return error_message(state.task_id, refused.code, refused.message, detail)
    task = state.task
    if task is None or not task.stage.is_final:
        return None
    if state.error is not None:
        err = task.error or {}
        failed = error_message(task.task_id, state.error["code"], state.error["message"],
                               err.get("technical_detail", ""))
        if task.identifier is not None:
            failed["identifier"] = task.identifier
        return failed
    msg = _progress(task, Step(task.stage, task.percentage, task.message, 0.0))
    if result is not None:
        msg["result"] = result
    if task.location is not None:
        msg["location"] = task.location
    return msg


def task_messages(state: SessionState, since: int | None, result: Any = None
                  ) -> tuple[list[dict[str, Any]], int]:
    """Messages for the task's steps after ``since`` (None: a snapshot of its latest step).

    Steps come from the task's ``history`` (appended by its one writer), so no stage is ever
    skipped, however fast they follow each other. Returns the messages and the new position.
    """
    final = final_message(state, result)
    task = state.task
    if task is None:
        return ([final] if final is not None else []), 0
    history = task.history
    if since is None:
        if final is not None:
            return [final], len(history)
        return ([_progress(task, history[-1])] if history else []), len(history)
    msgs = [_progress(task, step) for step in history[since:]
            if not step.stage.is_final]
    if final is not None:
        msgs.append(final)
    return msgs, len(history)


@dataclass(eq=False)
class Subscriber:
    """One listener. Its queue holds messages, then ``Close`` when the stream ends."""

    session_id: str
    queue: asyncio.Queue[dict[str, Any] | Close] = field(default_factory=asyncio.Queue)
    fresh: bool = True  # still waiting for its snapshot
    ready: asyncio.Event = field(default_factory=asyncio.Event)  # snapshot queued (or ended)


@dataclass(frozen=True)
class Close:
    code: int
    reason: str


class _Watch:
    def __init__(self) -> None:
        self.subscribers: set[Subscriber] = set()
        self.poke = asyncio.Event()
        self.task: asyncio.Task[None] | None = None
        self.upload_key: int | None = None
        self.task_pos = 0


class ProgressHub:
    """Per-session subscribers fed from store rescans."""

    def __init__(
        self,
        store: SessionStore,
        *,
        poll_interval: float = 0.5,
        min_gap: float = 0.1,
        queue_size: int = 256,
    ) -> None:
        self.store = store
        self.poll_interval = poll_interval
        self.min_gap = min_gap
        self.queue_size = queue_size
        self._watches: dict[str, _Watch] = {}

    async def subscribe(self, any_id: str) -> Subscriber:
        """Subscribe by session id or task id. Raises ``NotFound`` / ``Gone``."""
        session_id = await self.store.resolve(any_id)
        await self.store.get(session_id)  # unknown or gone: refuse before anything starts
        # Room past queue_size is kept for the Close, so the end is never lost.
        sub = Subscriber(session_id, asyncio.Queue(self.queue_size + 2))
        watch = self._watches.get(session_id)
        if watch is None:
            watch = self._watches[session_id] = _Watch()
            watch.task = asyncio.create_task(self._run(session_id, watch))
        watch.subscribers.add(sub)
        watch.poke.set()
        try:
            await sub.ready.wait()  # the snapshot goes first, before anything else is queued
        except BaseException:  # the client went away (or the handler was cancelled) meanwhile
            self.unsubscribe(sub)
            raise
        return sub

    def unsubscribe(self, sub: Subscriber) -> None:
        watch = self._watches.get(sub.session_id)
        if watch is not None:
            watch.subscribers.discard(sub)
            watch.poke.set()

    def poke(self, session_id: str) -> None:
        """Something changed for this session in this process: rescan now."""
        watch = self._watches.get(session_id)
        if watch is not None:
            watch.poke.set()

    async def close(self) -> None:
        """Close every stream with GOING_AWAY (server shutdown)."""
        for watch in list(self._watches.values()):
            for sub in list(watch.subscribers):
                self._end(watch, sub, Close(CLOSE_GOING_AWAY, "server shutting down"))
            if watch.task is not None:
                watch.task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watch.task
        self._watches.clear()

    # -- the watch loop --------------------------------------------------------------------

    async def _run(self, sid: str, watch: _Watch) -> None:
        try:
            while watch.subscribers:
                watch.poke.clear()
                try:
                    state = await self.store.state(sid)
                except ChunkdError as exc:  # unknown, or gone meanwhile
                    self._broadcast_end(watch, exc)
                    return
                result = None
                if state.task is not None and state.task.has_result:
                    result = await self.store.read_result(sid)
                self._round(watch, state, result)
                if not watch.subscribers:
                    return
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(watch.poke.wait(), self.poll_interval)
                await asyncio.sleep(self.min_gap)  # coalesce bursts: ~10 rounds a second at most
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("progress watch for %s failed", sid)
            for sub in list(watch.subscribers):
                self._end(watch, sub, Close(1011, "internal error"))
        finally:
            if self._watches.get(sid) is watch:
                del self._watches[sid]

    def _round(self, watch: _Watch, state: SessionState, result: Any = None) -> None:
        upload = upload_message(state)
        upload_changed = upload["uploaded_bytes"] != watch.upload_key
        watch.upload_key = upload["uploaded_bytes"]
        news, pos = task_messages(state, watch.task_pos, result)
        watch.task_pos = pos
        final = final_message(state, result) is not None
        for sub in list(watch.subscribers):
            if sub.fresh:
                sub.fresh = False
                sub.ready.set()
                msgs = [upload, *task_messages(state, None, result)[0]]
            else:
                msgs = ([upload] if upload_changed else []) + news
            for msg in msgs:
                self._send(watch, sub, msg)
            if final and sub in watch.subscribers:
                self._end(watch, sub, Close(CLOSE_NORMAL, "done"))

    def _broadcast_end(self, watch: _Watch, exc: ChunkdError) -> None:
        code = close_code_for(exc)
        for sub in list(watch.subscribers):
            self._send(watch, sub, error_message(None, exc.code, exc.message))
            self._end(watch, sub, Close(code, exc.message))

    def _send(self, watch: _Watch, sub: Subscriber, msg: dict[str, Any]) -> None:
        if sub.queue.qsize() >= self.queue_size:
            # A subscriber this far behind will not catch up; it must not hold the others.
            self._end(watch, sub, Close(CLOSE_TOO_SLOW, "subscriber too slow"))
            return
        sub.queue.put_nowait(msg)

    def _end(self, watch: _Watch, sub: Subscriber, close: Close) -> None:
        watch.subscribers.discard(sub)
        sub.ready.set()
        with contextlib.suppress(asyncio.QueueFull):
            sub.queue.put_nowait(close)
