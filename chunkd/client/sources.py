"""Byte sources for uploads: a file on disk, or generated data for benchmarks."""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator
from pathlib import Path

PIECE = 1024 * 1024


class FileSource:
    """A file read one piece at a time (``pread`` in a thread): memory stays flat."""

    def __init__(self, path: str | os.PathLike[str], name: str | None = None) -> None:
        self.path = Path(path)
        st = self.path.stat()
        self.size = st.st_size
        self.mtime_ns = st.st_mtime_ns
        self.name = name or self.path.name

    def _read(self, offset: int, length: int) -> bytes:
        with open(self.path, "rb", buffering=0) as f:
            return os.pread(f.fileno(), length, offset)

    async def pieces(self, offset: int, length: int) -> AsyncIterator[bytes]:
        end = offset + length
        while offset < end:
            data = await asyncio.to_thread(self._read, offset, min(PIECE, end - offset))
            if not data:
                raise OSError(f"{self.path} got shorter while it was being uploaded")
            yield data
            offset += len(data)

    async def sha256(self, offset: int, length: int) -> str:
        def run() -> str:
            h = hashlib.sha256()
            with open(self.path, "rb", buffering=0) as f:
                pos, end = offset, offset + length
                while pos < end:
                    data = os.pread(f.fileno(), min(PIECE, end - pos), pos)
                    if not data:
                        raise OSError(f"{self.path} got shorter while it was being uploaded")
                    h.update(data)
                    pos += len(data)
            return h.hexdigest()

        return await asyncio.to_thread(run)


class GeneratedSource:
    """``size`` bytes made of one random block repeated, behind a real media header so the
    server's libmagic check accepts it. Nothing is read from disk: the client is not the limit."""

    def __init__(self, size: int, *, name: str = "bench.wav", header: bytes = b"", seed: int = 0
                 ) -> None:
        import random

        self.size = size
        self.name = name
        self.header = header[:size]
        self.block = random.Random(seed).randbytes(PIECE)

    def _slices(self, offset: int, length: int) -> list[memoryview]:
        out = []
        end = offset + length
        pos = offset
        while pos < end:
            if pos < len(self.header):
                piece = memoryview(self.header)[pos : min(end, len(self.header))]
            else:
                at = (pos - len(self.header)) % PIECE
                piece = memoryview(self.block)[at : at + min(PIECE - at, end - pos)]
            out.append(piece)
            pos += len(piece)
        return out

    async def pieces(self, offset: int, length: int) -> AsyncIterator[bytes]:
        for piece in self._slices(offset, length):
            yield bytes(piece)

    async def sha256(self, offset: int, length: int) -> str | None:
        return None  # benchmarks measure the server, not the client's hashing
