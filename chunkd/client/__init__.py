"""The Python client for chunkd: ``ChunkdClient`` and its byte sources; ``TusClient``, the small
tus 1.0 client of the benchmarks (any tus server)."""

from chunkd.client.core import ChunkdClient, ChunkdClientError, Progress, Source, UploadResult
from chunkd.client.sources import FileSource, GeneratedSource
from chunkd.client.tus import TusClient, TusError, TusUpload

__all__ = [
    "ChunkdClient",
    "ChunkdClientError",
    "FileSource",
    "GeneratedSource",
    "Progress",
    "Source",
    "TusClient",
    "TusError",
    "TusUpload",
    "UploadResult",
]
