"""Byte sources for uploads: a file on disk, or generated data for benchmarks."""

from __future__ import annotations

import asyncio
import functools
import hashlib
import os
import random
import stat
from collections.abc import AsyncIterator
from pathlib import Path

PIECE = 1024 * 1024


class FileSource:
    """A file read one piece at a time (``pread`` in a thread): memory stays flat."""

    def __init__(self, path: str | os.PathLike[str], name: str | None = None) -> None:
        self.path = Path(path)
        st = self.path.stat()
        if not stat.S_ISREG(st.st_mode):
            raise IsADirectoryError(f"{path} is not a regular file")
        self.size = st.st_size
        self.name = name or self.path.name
        #: What identifies this version of the file: a resume must be into the same bytes.
        self.identity = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)

    def changed(self) -> bool:
        """True when the file is no longer the one this source was made from."""
        try:
            st = self.path.stat()
        except OSError:
            return True
        return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns) != self.identity

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


@functools.lru_cache(maxsize=4)
def _random_block(seed: int) -> bytes:
    """One random MiB per seed, shared by every source using it (bench runs many sources)."""
    return random.Random(seed).randbytes(PIECE)


class GeneratedSource:
    """``size`` bytes made of one random block repeated, behind a real media header so the
    server's libmagic check accepts it. Nothing is read from disk: the client is not the limit."""

    def __init__(self, size: int, *, name: str = "bench.wav", header: bytes = b"", seed: int = 0
                 ) -> None:
        self.size = size
        self.name = name
        self.header = header[:size]
        self.block = _random_block(seed)

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
