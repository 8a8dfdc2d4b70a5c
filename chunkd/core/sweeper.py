"""The sweeper: remove expired sessions and their bytes, never one still in use.

The policy is :func:`sweep_reason`, applied to what :meth:`~chunkd.store.base.Sessions.scan`
returns; the store only claims and removes.
"""

from __future__ import annotations

import logging

from chunkd.errors import ChunkdError
from chunkd.model.session import EndKind, SessionState
from chunkd.store.base import SessionStore

log = logging.getLogger("chunkd.sweeper")

#: A session whose bytes were written this recently (by any process) is never swept.
BUSY_GRACE_SECONDS = 300.0


def sweep_reason(state: SessionState, now: float, busy_grace: float = BUSY_GRACE_SECONDS,
                 idle_ttl: float | None = None) -> EndKind | None:
    """Why ``state``'s session should be removed now, or None to keep it. With ``idle_ttl``, an
    open session that received no chunk for that long expires early."""
    claim = state.claim
    if claim is not None and claim.kind is EndKind.CONCAT:
        # A tus partial upload whose bytes went into a final one: kept (HEAD says it is whole,
        # for a client that retries its final POST) until its lifetime ends.
        return EndKind.EXPIRE if now > state.meta.expires_at else None
    if claim is not None and claim.kind is not EndKind.FINALIZE:
        return claim.kind  # an abort or expiry whose removal a crash interrupted
    if now <= state.expires_at(idle_ttl):
        return None
    if state.writing:
        return None  # a chunk is being written in this process
    if state.last_write is not None and now - state.last_write < busy_grace:
        return None  # bytes arrived recently, maybe from another process
    if claim is not None and not state.finished:
        return None  # being finalized, or its task is still running
    return EndKind.EXPIRE


async def sweep(store: SessionStore, now: float, busy_grace: float = BUSY_GRACE_SECONDS,
                idle_ttl: float | None = None) -> list[str]:
    """One sweep; returns the ids of the sessions removed."""
    removed = []
    for state in await store.scan():
        sid = state.meta.session_id
        reason = sweep_reason(state, now, busy_grace, idle_ttl)
        if reason is None:
            continue
        try:
            if state.claim is None:
                claim = await store.claim_end(sid, EndKind.EXPIRE)
                if not claim.won and claim.kind is EndKind.FINALIZE:
                    continue  # finalized meanwhile
            await store.remove(sid, reason)
            removed.append(sid)
        except ChunkdError as exc:  # removed by someone else meanwhile
            log.info("sweep: session %s: %s", sid, exc.message)
    await store.purge(now)
    if removed:
        log.info("swept %d expired session(s): %s", len(removed), ", ".join(removed))
    return removed
