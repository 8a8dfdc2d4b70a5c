"""What a session store is: small protocols, each one idea, composed into :class:`SessionStore`.

    Sessions     create / get / state / resolve / scan / remove / purge / health, and its limits
    Chunks       the chunk ledger: open_chunk(meta, index) -> ChunkSlot (one writer per chunk;
                 counted only when whole and durable) with a RangeWriter for the bytes
    Ends         claim_end: the session's one-time end (finalize | abort | expire)
    Leases       acquire / renew / release an opaque Lease: one driver per task
    OnceClaims   claim_once / release_once: a hand-off's never-twice steps ("submit", "run")
    TaskRecords  write_task / write_result (under a lease), read_result, record_failure
    Blobs        blob(sid) -> Blob: the finished file (size, read, stream; local_path / move_to
                 only where the backend has a file system)
    Appends      tus: open_append(meta) -> AppendSlot (one holder per upload; the durable
                 offset; bytes counted by moving it), concatenate(parts), stop requests

Everything a caller sees is derived from the store's durable state, so it is right after a
restart (kill -9 or power cut: an answered write is durable) and when several chunkd processes
share one store. Every method may be called from several processes at once. Nothing above the
store knows how it lays out its data (see ``chunkd.store.fs`` for the file-system one).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from chunkd.errors import ChunkdError
from chunkd.model.session import Claim, EndKind, SessionMeta, SessionState
from chunkd.model.task import Task

#: A lease not renewed for this long belongs to a dead (or hung) process and may be taken over.
LEASE_STALE_SECONDS = 30.0


class LeaseLost(Exception):
    """This process no longer drives the task: another one took it over. Stop writing."""


@dataclass(frozen=True)
class Lease:
    """Proof of driving one session's task. Opaque: only the store that issued it reads ``token``."""

    session_id: str
    token: str


@dataclass(frozen=True)
class StoreLimits:
    """What the backend can hold; session validation reads these (S3 multipart, for instance,
    needs parts of at least 5 MiB and at most 10 000 of them)."""

    min_part_size: int
    max_part_size: int
    max_parts: int


class Sessions(Protocol):
    limits: StoreLimits
    #: The store's clock (seconds since the epoch): every timestamp it writes comes from it.
    clock: Callable[[], float]

    async def create(
        self, *, ttl: float, filename: str, extension: str, total_size: int, chunk_size: int,
        total_chunks: int, language: str | None, model: str | None, task_params: dict[str, Any],
        owner: str | None = None, client: str | None = None, **tus: Any,
    ) -> SessionMeta:
        """Create a session and reserve ``total_size`` bytes for it; durable when it returns.
        ``tus``: the tus fields of :class:`SessionMeta` (``protocol="tus"``, a ``task_id`` the
        client chose, which must be new: 422 ``task_id_in_use``, ...).

        Raises ``insufficient_storage`` (507) when the bytes cannot be reserved; nothing of the
        session is left behind then.
        """
        ...

    async def get(self, session_id: str) -> SessionMeta:
        """The metadata of an open or finalized session. Raises ``session_not_found`` (404,
        unknown or malformed id) or ``session_expired`` / ``session_aborted`` (410)."""
        ...

    async def state(self, session_id: str) -> SessionState:
        """The session's current state, read from the store (same errors as :meth:`get`)."""
        ...

    async def resolve(self, any_id: str) -> str:
        """The session id behind a session id or a task id (an unknown well-formed id is returned
        as it is; :meth:`get` then says 404). Raises ``session_not_found`` if malformed."""
        ...

    async def scan(self) -> list[SessionState]:
        """Every session in the store, expired and claimed ones included (for the sweeper and
        recovery, which apply their own policy). One unreadable session is skipped, not fatal."""
        ...

    async def remove(self, session_id: str, reason: EndKind) -> None:
        """Delete the session and its bytes, leaving a tombstone so later calls get 410.
        Idempotent."""
        ...

    async def purge(self, now: float) -> None:
        """Housekeeping: debris of interrupted creations and removals, and tombstones and task
        ids older than a week."""
        ...

    async def health(self) -> str:
        """``ok``; ``data_dir_full`` (sessions in flight can finish, new ones do not fit);
        ``data_dir_not_writable`` (read-only, or failing)."""
        ...


class RangeWriter(Protocol):
    """Writes one byte range of a session's file, in order. The caller either hands over bytes it
    owns (:meth:`write`) or fills buffers the writer lends (:meth:`buffer`, then :meth:`filled`),
    so a reader can ``recv_into`` them without a copy. Nothing is durable before :meth:`commit`."""

    @property
    def written(self) -> int:
        """Bytes accepted so far (written or queued)."""
        ...

    @property
    def durable_bytes(self) -> int:
        """Bytes of the range known to be on stable storage."""
        ...

    async def write(self, data: bytes) -> None:
        """Append ``data`` (kept, not copied, until written). Raises ``ValueError`` past the end."""
        ...

    def buffer(self) -> memoryview:
        """A buffer to fill with the next bytes (lent until :meth:`filled`); never empty while
        the range has room."""
        ...

    async def filled(self, n: int) -> None:
        """The first ``n`` bytes of the last :meth:`buffer` are the range's next bytes."""
        ...

    async def fill_from(self, read: Callable[[memoryview], int], n: int, *,
                        seconds: float | None = None) -> tuple[int, bool]:
        """Take up to ``n`` more bytes from the blocking ``read`` (fills a view, returns the
        count, 0 at the end), called in a worker thread, into the writer's own buffers. Returns
        ``(bytes taken, ended)``; returns early after ``seconds``. Bytes ``read`` delivered
        before it raised are taken too."""
        ...

    async def commit(self) -> str | None:
        """Write out what is pending and make it durable (in durable mode); return the SHA-256
        (hex) of every byte written when the range was opened ``hashed``."""
        ...


class ChunkSlot(Protocol):
    """One chunk, held exclusively (across processes) for as long as the slot is open."""

    @property
    def counted(self) -> str | None:
        """The chunk is counted already: its stored SHA-256 ("" when none was known), else None."""
        ...

    @property
    def writer(self) -> RangeWriter:
        ...

    async def count(self, digest: str | None) -> frozenset[int]:
        """Count the chunk (after a successful :meth:`RangeWriter.commit`); durable when it
        returns. Returns every chunk counted now. Raises 409 ``session_finalized`` or 410 if the
        session ended meanwhile."""
        ...


class Chunks(Protocol):
    def open_chunk(self, meta: SessionMeta, index: int, *, hashed: bool
                   ) -> AbstractAsyncContextManager[ChunkSlot]:
        """Hold chunk ``index`` for writing: one holder per chunk in any process (a second one
        waits, then gets 409 ``chunk_busy``); a chunk already counted is never written again.
        Raises 409 ``session_finalized`` once the session's end is claimed, 404/410 as
        :meth:`Sessions.get`. Leaving the block without :meth:`ChunkSlot.count` counts nothing."""
        ...


class Ends(Protocol):
    async def claim_end(self, session_id: str, kind: EndKind, ref: str | None = None) -> Claim:
        """Claim the session's one-time end atomically; durable when it returns.

        Exactly one caller, in any process, gets ``won=True``; every later call returns that
        same claim with ``won=False``. A finalize claim carries the task id (the one chosen at
        creation, else a fresh one), resolvable by :meth:`Sessions.resolve` from then on; a
        CONCAT claim carries ``ref``, the final upload's id.
        """
        ...


class AppendSlot(Protocol):
    """A tus upload held by one PATCH (across processes) for as long as the slot is open."""

    meta: SessionMeta
    #: The durable offset: bytes counted so far.
    offset: int

    def writer(self, room: int) -> RangeWriter:
        """The writer of the next bytes at :attr:`offset` (at most ``room`` of them)."""
        ...

    async def declare_length(self, length: int) -> SessionMeta:
        """A deferred length, set once (its bytes reserved: 507 if they do not fit)."""
        ...

    async def advance(self) -> int:
        """Count what the writer made durable (after its ``commit``): the new offset, durable."""
        ...


class Appends(Protocol):
    def open_append(self, meta: SessionMeta, *, hashed: bool | str = False
                    ) -> AbstractAsyncContextManager[AppendSlot]:
        """Hold the tus upload for one PATCH (one holder in any process: 423 ``upload_locked``
        after a short wait). Raises 409 / 404 / 410 like :meth:`Chunks.open_chunk`."""
        ...

    async def concatenate(self, parts: list[SessionMeta], *, ttl: float, session_id: str,
                          **fields: Any) -> SessionMeta:
        """Make (or find: idempotent) the final upload ``session_id`` of ``parts``, taking each
        part once (409 ``partial_in_use`` if another final has it) and its bytes without
        copying them."""
        ...

    async def request_stop(self, session_id: str) -> None:
        """Ask the PATCH holding the upload, in any process, to stop and keep what it has."""
        ...

    async def stop_mark(self, session_id: str) -> object:
        """Changes whenever :meth:`request_stop` is called for the upload (compare two)."""
        ...

    async def held(self, session_id: str) -> bool:
        """Is the upload held by a PATCH right now (any process)?"""
        ...


class Leases(Protocol):
    async def acquire(self, session_id: str) -> Lease | None:
        """Become the one driver of the session's task, unless a live one exists (None then).
        A lease that was released, or not renewed for :data:`LEASE_STALE_SECONDS`, is taken
        over; the old holder's writes fail with :class:`LeaseLost` from then on."""
        ...

    async def renew(self, lease: Lease) -> bool:
        """Keep the lease live; False if it was taken over."""
        ...

    async def release(self, lease: Lease) -> None:
        """The task is over (or handed back): anyone may acquire it at once."""
        ...


class OnceClaims(Protocol):
    async def claim_once(self, session_id: str, name: str) -> bool:
        """True for the one caller, ever, in any process, that claims ``name``; durable."""
        ...

    async def release_once(self, session_id: str, name: str) -> None:
        """Free ``name`` again (``chunkd retry``), keeping the old claim as history."""
        ...


class TaskRecords(Protocol):
    async def write_task(self, task: Task, lease: Lease) -> None:
        """Replace the task's record, only while ``lease`` holds (raises :class:`LeaseLost`
        otherwise); durable when it returns."""
        ...

    async def write_result(self, session_id: str, result: Any, lease: Lease) -> None:
        """Keep a finished task's result (e.g. a transcript), under ``lease``."""
        ...

    async def read_result(self, session_id: str) -> Any:
        ...

    async def record_failure(self, session_id: str, error: ChunkdError) -> None:
        """Finalize refused the file: keep why, and remove its bytes."""
        ...


class Blob(Protocol):
    """The finished file of a session."""

    size: int

    async def read(self, offset: int, n: int) -> bytes:
        ...

    def stream(self, piece: int = 1024 * 1024) -> AsyncIterator[bytes]:
        """The whole file in pieces of at most ``piece`` bytes (memory stays flat)."""
        ...

    def local_path(self) -> Path | None:
        """A path a program can open, where the backend has one (None otherwise)."""
        ...


@runtime_checkable
class Movable(Protocol):
    """A blob that can be moved into a local folder without copying (same file system)."""

    async def move_to(self, target: Path) -> None:
        """Rename the file to ``target`` (durably). Idempotent: done again after a crash, it
        succeeds when ``target`` is already there."""
        ...


@runtime_checkable
class Assemblable(Protocol):
    """A blob in several pieces (a tus final upload) that can be joined into one local file."""

    async def assemble(self) -> Path:
        """Join the pieces into one file (no piece is left twice on disk) and return its path.
        Idempotent, also after a crash part-way."""
        ...


class Blobs(Protocol):
    async def blob(self, session_id: str) -> Blob | None:
        """The finished file, or None when its bytes are gone (moved away or refused)."""
        ...


class SessionStore(Sessions, Chunks, Ends, Leases, OnceClaims, TaskRecords, Blobs, Appends,
                   Protocol):
    """Everything chunkd needs of a store."""
