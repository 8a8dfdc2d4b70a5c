"""The upload use cases, protocol-neutral (no aiohttp): receive a chunk, abort a session.

A request's body comes in through a :class:`BodySource` that the HTTP layer provides (it owns
the socket, the idle deadline and the length checks); the bytes go to the store's range writer.
"""

from __future__ import annotations

from typing import Protocol

from chunkd import errors as E
from chunkd.model.session import ChunkReceipt, EndKind, SessionMeta
from chunkd.store.base import RangeWriter, SessionStore


class BodySource(Protocol):
    """A request body of a known expected length, read by the HTTP layer."""

    async def copy_to(self, writer: RangeWriter, length: int, index: int) -> None:
        """Move exactly ``length`` bytes into ``writer``. Raises ``chunk_too_long`` (413),
        ``chunk_incomplete`` (400) or ``body_timeout`` (408)."""
        ...

    async def drain(self, length: int, index: int) -> None:
        """Read and drop the body, with the same length checks."""
        ...


async def receive_chunk(store: SessionStore, meta: SessionMeta, index: int, body: BodySource,
                        sha256: str | None) -> ChunkReceipt:
    """Write chunk ``index`` and count it once it is whole, matches ``sha256`` and is durable.

    Idempotent: a chunk counted before is read and dropped (409 ``chunk_conflict`` if the client
    says it has other content). On any error the chunk is not counted and nothing counted before
    is touched.
    """
    length = meta.chunk_length(index)
    async with store.open_chunk(meta, index, hashed=sha256 is not None) as slot:
        if slot.counted is not None:
            if sha256 is not None and slot.counted and slot.counted != sha256:
                raise E.CHUNK_CONFLICT(chunk_index=index, stored_sha256=slot.counted)
            await body.drain(length, index)
            received = (await store.state(meta.session_id)).received
            return ChunkReceipt(index, len(received), already_received=True)
        await body.copy_to(slot.writer, length, index)
        digest = await slot.writer.commit()
        if sha256 is not None and digest != sha256:
            raise E.CHECKSUM_MISMATCH(chunk_index=index, expected=sha256, actual=digest)
        if store.clock() >= meta.expires_at:  # the body outlived the session: it never counts
            raise E.SESSION_EXPIRED()
        received = await slot.count(digest)
    return ChunkReceipt(index, len(received), already_received=False)


async def abort(store: SessionStore, session_id: str) -> None:
    """End the session by abort and remove its bytes. A finalized session cannot be aborted
    (409), unless finalize refused its file; an aborted or expired one is 410."""
    state = await store.state(session_id)
    claim = await store.claim_end(session_id, EndKind.ABORT)
    if not claim.won:
        if claim.kind is not EndKind.FINALIZE:
            raise E.SESSION_ABORTED()
        if state.failure is None:
            raise E.SESSION_FINALIZED(task_id=claim.task_id)
    await store.remove(session_id, EndKind.ABORT)
