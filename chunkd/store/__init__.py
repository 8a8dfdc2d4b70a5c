"""Session stores: the :class:`SessionStore` protocol and its file-system implementation."""

from chunkd.store.base import ChunkReceipt, Claim, Phase, SessionMeta, SessionState, SessionStore
from chunkd.store.filesystem import FileSystemStore, is_session_id

__all__ = [
    "ChunkReceipt",
    "Claim",
    "FileSystemStore",
    "Phase",
    "SessionMeta",
    "SessionState",
    "SessionStore",
    "is_session_id",
]
