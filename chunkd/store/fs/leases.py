"""Task leases on the file system: ``lease.<n>`` files, generations only growing.

A lease is generation ``n`` of a session: created with ``O_EXCL`` (so two processes taking over
at once cannot both win), renewed by touching its mtime, released by writing ``released`` into
it. It is never deleted: an old owner can never believe it holds the session again. It is stale
when released, not renewed for ``LEASE_STALE_SECONDS`` (by the store's clock), or owned by a
dead pid on this host (kill -9: no need to wait).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable

import orjson

from chunkd.atomic import write_json_atomic
from chunkd.store.base import LEASE_STALE_SECONDS, Lease
from chunkd.store.fs.layout import Layout

_HOST = socket.gethostname()


def _owner() -> dict[str, object]:
    return {"pid": os.getpid(), "host": _HOST}


class FileLeases:
    def __init__(self, layout: Layout, clock: Callable[[], float]) -> None:
        self._layout = layout
        self._clock = clock

    def _generations(self, sid: str) -> list[int]:
        names = os.listdir(self._layout.session(sid))
        return [g for g in map(Layout.lease_generation, names) if g is not None]

    def _read(self, sid: str, generation: int) -> dict[str, object] | None:
        try:
            doc = orjson.loads(self._layout.lease(sid, generation).read_bytes() or b"{}")
        except (FileNotFoundError, orjson.JSONDecodeError):
            return None
        return doc if isinstance(doc, dict) else None

    def holds(self, lease: Lease) -> bool:
        """Is ``lease`` still the newest generation, and not released?"""
        generation = int(lease.token)
        try:
            if max(self._generations(lease.session_id), default=0) != generation:
                return False
        except FileNotFoundError:
            return False
        owner = self._read(lease.session_id, generation)
        return owner is not None and not owner.get("released")

    def _stale(self, sid: str, generation: int) -> bool:
        path = self._layout.lease(sid, generation)
        try:
            age = self._clock() - path.stat().st_mtime
        except FileNotFoundError:
            return True
        owner = self._read(sid, generation)
        if owner is None or owner.get("released") or age > LEASE_STALE_SECONDS:
            return True
        pid = owner.get("pid")
        if owner.get("host") == _HOST and isinstance(pid, int) and pid != os.getpid():
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return True  # its owner on this machine is dead (kill -9)
            except PermissionError:
                pass
        return False

    def acquire(self, sid: str) -> Lease | None:
        generations = self._generations(sid)
        current = max(generations, default=0)
        if current and not self._stale(sid, current):
            return None
        nxt = current + 1
        try:
            fd = os.open(self._layout.lease(sid, nxt), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return None  # another process took over first
        try:
            os.write(fd, orjson.dumps(_owner()))
        finally:
            os.close(fd)
        return Lease(sid, str(nxt))

    def renew(self, lease: Lease) -> bool:
        if not self.holds(lease):
            return False
        now = self._clock()
        os.utime(self._layout.lease(lease.session_id, int(lease.token)), (now, now))
        return True

    def release(self, lease: Lease) -> None:
        path = self._layout.lease(lease.session_id, int(lease.token))
        if path.exists() and self.holds(lease):
            # Losing this write in a crash is harmless: the lease then goes stale on its own.
            write_json_atomic(path, {**_owner(), "released": True}, durable=False)
