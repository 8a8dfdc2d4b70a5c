"""Quotas on new sessions: how many a client may have open, how many bytes they may reserve,
and how many bytes all open sessions may reserve together.

A *client* is the authenticated subject, or the client's address when auth is off. Counted from
the store's own state (``scan``), so every process on the folder sees the same totals; a scan is
reused for a second or more (see :data:`MIN_SCAN_AGE`), with this process's own creations and
aborts applied at once, so what other processes did shows up within that time. Within a process
the check and the creation are one step (``Quotas.lock``); creations racing in two processes
may each pass once.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from chunkd import errors as E
from chunkd.model.session import EndKind
from chunkd.store.base import SessionStore

#: A scan of the store is reused for at least this long (and ten times as long as it took), so
#: the cost of quota checks does not grow with sessions x creation rate.
MIN_SCAN_AGE = 1.0


@dataclass
class _Usage:
    """What the last scan found, kept up to date with what this process created and ended since:
    session id -> (client, bytes held)."""

    held: dict[str, tuple[str, int]] = field(default_factory=dict)
    scanned_at: float = float("-inf")
    scan_seconds: float = 0.0


@dataclass(frozen=True)
class Quotas:
    """The limits; ``lock`` makes check-then-create one step within this process."""

    max_sessions_per_client: int = 0  # 0: no limit
    max_bytes_per_client: int = 0
    max_bytes_total: int = 0
    lock: asyncio.Lock = field(default_factory=asyncio.Lock, compare=False, repr=False)
    usage: _Usage = field(default_factory=_Usage, compare=False, repr=False)

    @property
    def active(self) -> bool:
        return bool(self.max_sessions_per_client or self.max_bytes_per_client
                    or self.max_bytes_total)

    def created(self, session_id: str, client: str, total_size: int) -> None:
        """A session this process just created holds its bytes."""
        self.usage.held[session_id] = (client, total_size)

    def ended(self, session_id: str) -> None:
        """A session this process just aborted holds nothing any more."""
        self.usage.held.pop(session_id, None)


async def _held(store: SessionStore, quotas: Quotas) -> dict[str, tuple[str, int]]:
    usage = quotas.usage
    now = time.monotonic()
    if now - usage.scanned_at < max(MIN_SCAN_AGE, 10 * usage.scan_seconds):
        return usage.held
    clock = store.clock()
    states = await store.scan()
    # Open sessions, and finalized ones whose hand-off still holds their bytes.
    usage.held = {s.meta.session_id: (s.meta.client or "", s.meta.total_size) for s in states
                  if (s.claim is None and clock <= s.meta.expires_at)
                  or (s.claim is not None and s.claim.kind is EndKind.FINALIZE
                      and not s.finished)}
    usage.scanned_at = time.monotonic()
    usage.scan_seconds = usage.scanned_at - now
    return usage.held


async def check_new_session(store: SessionStore, quotas: Quotas, client: str, total_size: int,
                            *, new: bool = True) -> None:
    """Raise ``session_quota`` / ``storage_quota`` (429) or ``insufficient_storage`` (507) if a
    new session of ``total_size`` bytes for ``client`` would go over a quota (``new=False``:
    ``total_size`` more bytes for a session the client has, e.g. a tus length declared late)."""
    if not quotas.active:
        return
    held = list((await _held(store, quotas)).values())
    mine = [size for who, size in held if who == client]
    if new and quotas.max_sessions_per_client and len(mine) >= quotas.max_sessions_per_client:
        raise E.SESSION_QUOTA(max_sessions=quotas.max_sessions_per_client)
    if quotas.max_bytes_per_client and sum(mine) + total_size > quotas.max_bytes_per_client:
        raise E.STORAGE_QUOTA(max_bytes=quotas.max_bytes_per_client)
    if quotas.max_bytes_total and (
        sum(size for _, size in held) + total_size > quotas.max_bytes_total
    ):
        raise E.INSUFFICIENT_STORAGE(reason="the server's upload space is taken; retry later")
