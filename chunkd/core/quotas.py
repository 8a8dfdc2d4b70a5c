"""Quotas on new sessions: how many a client may have open, how many bytes they may reserve,
and how many bytes all open sessions may reserve together.

A *client* is the authenticated subject, or the client's address when auth is off. Counted from
the store's own state (``scan``), so every process on the folder sees the same totals. Within
a process the check and the creation are one step (:data:`CREATION`); creations racing in two
processes may each pass once.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from chunkd import errors as E
from chunkd.model.session import EndKind
from chunkd.store.base import SessionStore


@dataclass(frozen=True)
class Quotas:
    """The limits; ``lock`` makes check-then-create one step within this process."""

    max_sessions_per_client: int = 0  # 0: no limit
    max_bytes_per_client: int = 0
    max_bytes_total: int = 0
    lock: asyncio.Lock = field(default_factory=asyncio.Lock, compare=False, repr=False)

    @property
    def active(self) -> bool:
        return bool(self.max_sessions_per_client or self.max_bytes_per_client
                    or self.max_bytes_total)


async def check_new_session(store: SessionStore, quotas: Quotas, client: str, total_size: int
                            ) -> None:
    """Raise ``session_quota`` / ``storage_quota`` (429) or ``insufficient_storage`` (507) if a
    new session of ``total_size`` bytes for ``client`` would go over a quota."""
    if not quotas.active:
        return
    now = store.clock()
    # Open sessions, and finalized ones whose hand-off still holds their bytes.
    open_sessions = [s.meta for s in await store.scan()
                     if (s.claim is None and now <= s.meta.expires_at)
                     or (s.claim is not None and s.claim.kind is EndKind.FINALIZE
                         and not s.finished)]
    mine = [m for m in open_sessions if m.client == client]
    if quotas.max_sessions_per_client and len(mine) >= quotas.max_sessions_per_client:
        raise E.SESSION_QUOTA(max_sessions=quotas.max_sessions_per_client)
    if quotas.max_bytes_per_client and (
        sum(m.total_size for m in mine) + total_size > quotas.max_bytes_per_client
    ):
        raise E.STORAGE_QUOTA(max_bytes=quotas.max_bytes_per_client)
    if quotas.max_bytes_total and (
        sum(m.total_size for m in open_sessions) + total_size > quotas.max_bytes_total
    ):
        raise E.INSUFFICIENT_STORAGE(reason="the server's upload space is taken; retry later")
