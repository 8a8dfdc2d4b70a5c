"""Small file helpers shared by the store and the hand-offs: atomic JSON files, durable writes."""

from __future__ import annotations

import contextlib
import errno
import os
import uuid
from pathlib import Path
from typing import Any

import orjson


def write_json_atomic(path: Path, doc: dict[str, Any], *, durable: bool = True) -> None:
    """Write ``doc`` to a temp file beside ``path``, fsync it, rename it over ``path``.

    Readers see the old document or the new one, never a half-written one.
    """
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        try:
            data = orjson.dumps(doc)
            if os.write(fd, data) != len(data):  # a short write: the disk filled up
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp))
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):  # a failed write leaves no temp file
            os.unlink(tmp)
        raise


def write_text_durably(path: Path, text: str, durable: bool = True) -> None:
    """Write ``text`` to ``path`` in place (for a file nobody reads before it is complete),
    fsynced when ``durable``."""
    with open(path, "w") as f:
        f.write(text)
        if durable:
            f.flush()
            os.fsync(f.fileno())


def create_once(path: Path, text: str, durable: bool = True) -> bool:
    """Create ``path`` holding ``text`` unless it exists (a whole file or none: written to a
    temp name, then ``link(2)``, which fails if the name is taken). True if this call made it;
    the caller fsyncs the folder."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    write_text_durably(tmp, text, durable)
    try:
        os.link(tmp, path)
    except FileExistsError:
        return False
    finally:
        os.unlink(tmp)
    return True


def read_json(path: Path) -> dict[str, Any] | None:
    """The JSON document at ``path``, or ``None`` when there is no such file."""
    try:
        return orjson.loads(path.read_bytes())
    except FileNotFoundError:
        return None


def fsync_dir(path: Path) -> None:
    """fsync a folder, so that renames into it are durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
