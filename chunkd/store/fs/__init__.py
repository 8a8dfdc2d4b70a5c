"""The file-system store (see :mod:`chunkd.store.fs.layout` for the tree it keeps)."""

from chunkd.store.fs.layout import is_session_id
from chunkd.store.fs.store import FileBlob, FileSystemStore

__all__ = ["FileBlob", "FileSystemStore", "is_session_id"]
