"""The Python client for chunkd: ``ChunkdClient`` and its byte sources."""

from chunkd.client.core import ChunkdClient, ChunkdClientError, Progress, Source, UploadResult
from chunkd.client.sources import FileSource, GeneratedSource

__all__ = [
    "ChunkdClient",
    "ChunkdClientError",
    "FileSource",
    "GeneratedSource",
    "Progress",
    "Source",
    "UploadResult",
]
