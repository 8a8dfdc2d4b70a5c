"""tus 1.0 use cases on the same store as the chunk API, protocol-neutral (no aiohttp).

A tus upload is a session of one "chunk", the whole file, whose bytes arrive in order: the
store keeps its durable offset (``offset/<n>``, moved by rename after the bytes are flushed), so
``Upload-Offset`` is read from the disk, right after ``kill -9`` and in every process.

    PATCH ──► open_append (one holder per upload, any process; 423 after a short wait)
                │ offset == Upload-Offset? (409 otherwise, nothing touched)
                ▼
              write the body ──► every CHECKPOINT_SECONDS: flush, offset moves (progress)
                │ the body ends early / times out: flush, keep the prefix, 503 (retried)
                │ Upload-Checksum given: all or nothing (460, nothing kept)
                ▼
              offset == length ──► finalize (libmagic, claimed once, hand-off) in the
                                   background: the last PATCH is answered at once

A final (concatenated) upload takes its partial uploads' ``data`` files by rename: O(1), no
second copy, and the same partial list always gives the same final upload (idempotent POST).
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Awaitable, Callable
from typing import Protocol

from chunkd import errors as E
from chunkd.errors import ChunkdError
from chunkd.model.session import EndKind, SessionMeta, SessionState
from chunkd.store.base import AppendSlot, RangeWriter, SessionStore

#: While a PATCH body streams, its bytes are flushed and counted this often: progress shows as
#: the bytes arrive, and a crash or a cut connection loses at most this much of the body.
CHECKPOINT_SECONDS = 1.0
#: The namespace of final uploads' ids: uuid5(owner and partial ids), so that a retried final
#: POST finds the upload the first one made.
_FINAL_NAMESPACE = uuid.UUID("5c1b2f64-8a4e-4a7e-9a57-0c6f3d2d1e90")


class Body(Protocol):
    """A request body (the HTTP layer's; it owns the idle deadline)."""

    async def copy_into(self, writer: RangeWriter, *, limit: int,
                        too_long: Callable[[], Exception], every: float | None = None,
                        checkpoint: Callable[[], Awaitable[None]] | None = None) -> int:
        """Move the body into ``writer`` (at most ``limit`` bytes, else ``too_long()``),
        awaiting ``checkpoint`` about every ``every`` seconds; return the bytes moved."""
        ...


def ready_to_finalize(state: SessionState) -> bool:
    """A whole tus upload (not a partial one) that nobody finalized yet: a crash came between
    its last byte and its finalize, or the finalize is still to start."""
    return (state.meta.is_tus and state.meta.concat != "partial" and state.claim is None
            and not state.missing and state.failure is None)


async def append(store: SessionStore, meta: SessionMeta, *, offset: int, body: Body,
                 content_length: int | None, declared_length: int | None,
                 checksum: tuple[str, str] | None, max_patch: int, max_file_size: int,
                 progressed: Callable[[], None]) -> tuple[SessionMeta, int]:
    """One PATCH: the bytes at ``offset``; returns the (maybe newly sized) metadata and the new
    offset. Raises 409 ``offset_mismatch`` (nothing touched), 413, 460, or 503
    ``body_stalled`` when the body stopped (its durable prefix is kept then)."""
    async with store.open_append(meta, hashed=checksum[0] if checksum else False) as slot:
        meta = slot.meta
        if slot.offset != offset:
            raise E.OFFSET_MISMATCH(offset=slot.offset)
        if declared_length is not None:
            meta = await _declare(slot, meta, declared_length, max_file_size)
        end = meta.total_size if meta.length_known else max_file_size
        room = end - offset
        limit = min(room, max_patch)
        if content_length is not None:
            if content_length > room:
                raise E.SIZE_EXCEEDED(length=end)
            if content_length > max_patch:
                raise E.PATCH_TOO_LARGE(max_patch_size=max_patch)
        writer = slot.writer(room)
        keep_prefix = checksum is None  # a checksummed body counts whole or not at all

        def too_long() -> Exception:
            if limit == room:
                return E.SIZE_EXCEEDED(length=end)
            return E.PATCH_TOO_LARGE(max_patch_size=max_patch)

        async def checkpoint() -> None:
            await writer.commit()
            await slot.advance()
            progressed()

        try:
            await body.copy_into(writer, limit=limit, too_long=too_long, every=CHECKPOINT_SECONDS,
                                 checkpoint=checkpoint if keep_prefix else None)
            digest = await writer.commit()
        except BaseException as exc:
            if keep_prefix:  # what arrived whole is kept: the client goes on from there
                with contextlib.suppress(Exception):
                    await asyncio.shield(_keep(slot))
                progressed()
            if isinstance(exc, ChunkdError) and exc.status == 408:
                raise E.BODY_STALLED(reason=exc.message, offset=slot.offset) from None
            if isinstance(exc, StopRequested):
                raise E.BODY_STALLED(reason="a newer request for this upload took over",
                                     offset=slot.offset) from None
            raise
        if checksum is not None and digest != checksum[1]:
            raise E.UPLOAD_CHECKSUM_MISMATCH()
        new = await slot.advance()
    progressed()
    return meta, new


class StopRequested(Exception):
    """Set on a PATCH's body stream when a newer request for the same upload arrives: the
    client gave up on this one (tusd does the same), so it keeps what it has and lets go."""


async def _keep(slot: AppendSlot) -> None:
    await slot.writer(0).commit()  # the slot's writer (made above): flush what it has
    await slot.advance()


async def _declare(slot: AppendSlot, meta: SessionMeta, length: int, max_file_size: int
                   ) -> SessionMeta:
    """``Upload-Length`` on a PATCH: declares a deferred length once; afterwards it must match."""
    if meta.length_known:
        if length != meta.total_size:
            raise E.INVALID_LENGTH(reason=f"the upload's length is {meta.total_size} already")
        return meta
    if length > max_file_size:
        raise E.UPLOAD_TOO_LARGE(max_size=max_file_size)
    if length < slot.offset:
        raise E.INVALID_LENGTH(reason=f"Upload-Length {length} is less than the {slot.offset} "
                                      f"bytes received")
    return await slot.declare_length(length)


def final_id(owner: str | None, part_ids: list[str]) -> str:
    return str(uuid.uuid5(_FINAL_NAMESPACE, f"{owner or ''}|{' '.join(part_ids)}"))


async def check_partials(store: SessionStore, part_ids: list[str], owner: str | None,
                         check_owner: Callable[[SessionMeta], None]) -> list[SessionMeta]:
    """The partial uploads of a final POST: each one the caller's, partial, and whole."""
    if not part_ids:
        raise E.INVALID_CONCAT(reason="a final upload needs at least one partial upload")
    if len(set(part_ids)) != len(part_ids):
        raise E.INVALID_CONCAT(reason="a partial upload is named twice")
    metas = []
    for pid in part_ids:
        state = await store.state(pid)
        check_owner(state.meta)
        if state.meta.concat != "partial":
            raise E.INVALID_CONCAT(reason=f"{pid} is not a partial upload")
        consumed = state.claim is not None and state.claim.kind is EndKind.CONCAT
        if state.missing and not consumed:
            raise E.PARTIAL_INCOMPLETE(upload_id=pid, offset=state.offset,
                                       length=state.meta.total_size)
        metas.append(state.meta)
    return metas
