"""The file-system store's on-disk layout: the one place that names chunkd's files.

    <data_dir>/
      sessions/
        <session_id>/
          metadata.json     what was fixed at creation (temp file, fsync, rename; never rewritten)
          data              the file itself, reserved up front; chunk i lives at i * chunk_size
          chunks/<i>        one marker per counted chunk (holds the chunk's sha256 when known);
                            created by rename after the chunk's bytes were written and flushed
          chunks/.<i>.pending  the marker's inode, made at creation (one empty file per chunk,
                            so a full inode table cannot stop a reserved session): counting a
                            chunk writes its digest into it and renames it to <i>
          reserve           blocks reserved at creation for the markers (one per chunk): on a
                            full disk a marker's write shrinks it and tries again
          end.claim         the session's one-time end: finalize, abort or expire; created with
                            link(2), which fails if it exists, so exactly one caller wins
          end.abort,        the abort and expire claims, written at creation: ending a session
          end.expire        that way is one link(2), which needs no free space (a full disk
                            can still be freed)
          task.json         the task's record after finalize (stage, steps, result or error),
                            written only by the process holding the lease
          result.json       a finished task's result (e.g. the transcript's segments)
          failed.json       why finalize refused the file (its bytes are then removed)
          lease.<n>         who drives the task: generation n, created O_EXCL, renewed by mtime;
                            a stale lease (owner dead or silent) is taken by creating lease.<n+1>
          <name>.once       one-time claims of a hand-off (e.g. submit.once: never submit twice)
          offset/<n>        tus: the bytes durably received (one file, renamed from offset/<old>
                            to offset/<new> after the bytes were flushed: no new inode or block)
          length            tus, a deferred length: declared once (created by link(2))
          parts/<k>         tus, a final (concatenated) upload: the k-th partial upload's data,
                            moved here by rename when the final upload was created (no copy)
          stop              tus: a request (from another process) to the PATCH holding the
                            upload to stop, keep what it has and let go
        .new-<id>/          a session being created; renamed into place when complete
      tasks/<task_id>       the session id a task belongs to (so /ws/tasks/<task_id> finds it)
      gone/<session_id>     tombstone of a removed session (answers 410 instead of 404)
      trash/                sessions being deleted: renamed here first, so removal is atomic

Nothing here is a read-modify-write of shared state: received chunks are the markers present,
the end of a session is whichever claim got linked first. That is what makes several chunkd
processes on one folder safe, and a restart (kill -9 included) lose nothing that was counted.
In durable mode every answered write is also fsynced with its folder, so it survives a power
cut. The session's filename is metadata only; no path is ever built from it.
"""

from __future__ import annotations

import re
from pathlib import Path

_SESSION_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def is_session_id(text: str) -> bool:
    return _SESSION_ID.fullmatch(text) is not None


class Layout:
    """Every path of the tree above, for one data folder."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self.sessions = self.root / "sessions"
        self.gone = self.root / "gone"
        self.tasks = self.root / "tasks"
        self.trash = self.root / "trash"

    def make(self) -> None:
        for d in (self.sessions, self.gone, self.tasks, self.trash):
            d.mkdir(parents=True, exist_ok=True)

    def session(self, sid: str) -> Path:
        return self.sessions / sid

    def staging(self, sid: str) -> Path:
        return self.sessions / f".new-{sid}"

    @staticmethod
    def is_staging(name: str) -> bool:
        return name.startswith(".new-")

    def metadata(self, sid: str) -> Path:
        return self.session(sid) / "metadata.json"

    def data(self, sid: str) -> Path:
        return self.session(sid) / "data"

    def chunks(self, sid: str) -> Path:
        return self.session(sid) / "chunks"

    def marker(self, sid: str, index: int) -> Path:
        return self.chunks(sid) / str(index)

    def pending_marker(self, sid: str, index: int) -> Path:
        return self.chunks(sid) / f".{index}.pending"

    def reserve(self, sid: str) -> Path:
        return self.session(sid) / "reserve"

    def claim(self, sid: str) -> Path:
        return self.session(sid) / "end.claim"

    def end_intent(self, sid: str, kind: str) -> Path:
        """The prepared claim of an abort or expiry (``end.abort``, ``end.expire``)."""
        return self.session(sid) / f"end.{kind}"

    def task(self, sid: str) -> Path:
        return self.session(sid) / "task.json"

    def result(self, sid: str) -> Path:
        return self.session(sid) / "result.json"

    def failure(self, sid: str) -> Path:
        return self.session(sid) / "failed.json"

    def lease(self, sid: str, generation: int) -> Path:
        return self.session(sid) / f"lease.{generation}"

    def once(self, sid: str, name: str) -> Path:
        if not re.fullmatch(r"[a-z][a-z0-9_]*", name):
            raise ValueError(f"bad once-claim name {name!r}")
        return self.session(sid) / f"{name}.once"

    def offsets(self, sid: str) -> Path:
        return self.session(sid) / "offset"

    def length(self, sid: str) -> Path:
        return self.session(sid) / "length"

    def parts(self, sid: str) -> Path:
        return self.session(sid) / "parts"

    def part(self, sid: str, k: int) -> Path:
        return self.parts(sid) / str(k)

    def stop_request(self, sid: str) -> Path:
        return self.session(sid) / "stop"

    def task_index(self, task_id: str) -> Path:
        return self.tasks / task_id

    def tombstone(self, sid: str) -> Path:
        return self.gone / sid

    @staticmethod
    def lease_generation(name: str) -> int | None:
        if name.startswith("lease.") and name[6:].isdigit():
            return int(name[6:])
        return None
