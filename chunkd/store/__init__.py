"""Session stores: the protocols (:mod:`chunkd.store.base`) and the file-system store."""

from chunkd.store.base import (
    LEASE_STALE_SECONDS,
    Blob,
    ChunkSlot,
    Lease,
    LeaseLost,
    Movable,
    RangeWriter,
    SessionStore,
    StoreLimits,
)
from chunkd.store.fs import FileSystemStore, is_session_id

__all__ = [
    "LEASE_STALE_SECONDS",
    "Blob",
    "ChunkSlot",
    "FileSystemStore",
    "Lease",
    "LeaseLost",
    "Movable",
    "RangeWriter",
    "SessionStore",
    "StoreLimits",
    "is_session_id",
]
