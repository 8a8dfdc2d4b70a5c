"""Checks on what clients send: session fields, and the finished file's content (libmagic)."""

from __future__ import annotations

import asyncio
import math
import threading
from typing import Any

import magic
import orjson

from chunkd import errors as E
from chunkd.config import Config
from chunkd.store.base import StoreLimits

#: Top-level MIME types libmagic may report for a file chunkd accepts.
ALLOWED_MIME_PREFIXES = ("audio/", "video/")
MAX_FILENAME_BYTES = 255
MAX_SHORT_TEXT = 64  # language, model
MAX_TASK_PARAMS_BYTES = 16 * 1024


def _int_field(doc: dict[str, Any], name: str, *, required: bool = True) -> int | None:
    value = doc.get(name)
    if value is None:
        if required:
            raise E.MISSING_FIELD(field=name)
        return None
    if isinstance(value, float) and value.is_integer() and abs(value) >= 2**63:
        return int(value)  # orjson gives integers past 64 bits as floats: still an integer
    # bool is an int in Python; JSON true is not a size.
    if isinstance(value, bool) or not isinstance(value, int):
        raise E.INVALID_TYPE(field=name, expected="an integer")
    return value


def _text_field(doc: dict[str, Any], name: str) -> str | None:
    value = doc.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise E.INVALID_TYPE(field=name, expected="a string")
    if len(value) > MAX_SHORT_TEXT or not value.isprintable():
        raise E.INVALID_VALUE(
            field=name, rule=f"must be printable text of at most {MAX_SHORT_TEXT} characters"
        )
    return value


def check_filename(value: Any, allowed: frozenset[str]) -> tuple[str, str]:
    """Return ``(filename, extension)``. The name is kept as metadata, never used as a path."""
    if value is None:
        raise E.MISSING_FIELD(field="filename")
    if not isinstance(value, str):
        raise E.INVALID_TYPE(field="filename", expected="a string")
    if len(value.encode("utf-8", "surrogatepass")) > MAX_FILENAME_BYTES:
        raise E.FILENAME_TOO_LONG(field="filename", max_bytes=MAX_FILENAME_BYTES)
    if not value.strip() or not value.isprintable():
        raise E.INVALID_FILENAME(
            field="filename", rule="non-empty printable text (no NUL or control characters)"
        )
    if "/" in value or "\\" in value or value in (".", ".."):
        raise E.INVALID_FILENAME(field="filename", rule="a bare file name, without '/' or '\\'")
    stem, dot, ext = value.rpartition(".")
    ext = ext.lower()
    if not dot or not stem or ext not in allowed:
        raise E.EXTENSION_NOT_ALLOWED(field="filename", allowed_extensions=sorted(allowed))
    return value, ext


def max_chunk_size(config: Config, limits: StoreLimits) -> int:
    """The largest chunk a session may use: the server's limit (under the proxy's body cap) or
    the store's largest part, whichever is smaller."""
    return min(config.max_chunk_size, limits.max_part_size)


def min_chunk_size(config: Config, limits: StoreLimits) -> int:
    """The smallest chunk a session may use (unless its whole file is smaller): the server's
    setting or the store's smallest part, whichever is larger."""
    return max(config.min_chunk_size, limits.min_part_size)


def check_new_session(doc: Any, config: Config, limits: StoreLimits) -> dict[str, Any]:
    """Validate a ``POST /upload/chunked/session`` body against the server's limits and the
    store's; return the store's ``create`` fields."""
    if not isinstance(doc, dict):
        raise E.INVALID_JSON()
    filename, extension = check_filename(doc.get("filename"), config.allowed_extensions)
    total_size = _int_field(doc, "total_size")
    assert total_size is not None
    if total_size <= 0:
        raise E.INVALID_VALUE(field="total_size", rule="must be positive")
    if total_size > config.max_file_size:
        raise E.FILE_TOO_LARGE(max_file_size=config.max_file_size)
    chunk_size = _int_field(doc, "chunk_size", required=False)
    if chunk_size is None:
        chunk_size = config.chunk_size
    largest = max_chunk_size(config, limits)
    if chunk_size > largest:
        raise E.CHUNK_SIZE_TOO_LARGE(chunk_size=chunk_size, max_chunk_size=largest)
    smallest = min_chunk_size(config, limits)
    if chunk_size < min(smallest, total_size):
        raise E.INVALID_VALUE(field="chunk_size", rule=f"must be at least {smallest} bytes (or "
                              "the whole file)", min_chunk_size=smallest)
    expected_chunks = math.ceil(total_size / chunk_size)
    total_chunks = _int_field(doc, "total_chunks")
    if total_chunks != expected_chunks:
        raise E.TOTAL_CHUNKS_MISMATCH(field="total_chunks", expected=expected_chunks,
                                      chunk_size=chunk_size)
    if total_chunks > limits.max_parts:
        raise E.TOO_MANY_CHUNKS(field="total_chunks", max_chunks=limits.max_parts)
    task_params = doc.get("task_params")
    if task_params is None:
        task_params = {}
    if not isinstance(task_params, dict):
        raise E.INVALID_TYPE(field="task_params", expected="an object")
    try:
        encoded = orjson.dumps(task_params)
    except orjson.JSONEncodeError:  # e.g. nested deeper than orjson writes
        raise E.INVALID_VALUE(field="task_params", rule="is nested too deeply") from None
    if len(encoded) > MAX_TASK_PARAMS_BYTES:
        raise E.INVALID_VALUE(field="task_params", rule="is too large")
    return {
        "filename": filename,
        "extension": extension,
        "total_size": total_size,
        "chunk_size": chunk_size,
        "total_chunks": total_chunks,
        "language": _text_field(doc, "language"),
        "model": _text_field(doc, "model"),
        "task_params": task_params,
    }


#: How much of a file libmagic looks at. Its default (7 MiB in libmagic 5.44) made one check of
#: a large WAV take ~8 ms of CPU; 1 MiB (the default of earlier libmagic) takes ~0.3 ms and gives
#: the same answers on every fixture in tests/media.
MAGIC_BYTES_MAX = 1024 * 1024
_magic: magic.Magic | None = None
_magic_lock = threading.Lock()


def _detector() -> magic.Magic:
    global _magic
    with _magic_lock:
        if _magic is None:
            m = magic.Magic(mime=True)
            m.setparam(magic.MAGIC_PARAM_BYTES_MAX, MAGIC_BYTES_MAX)
            _magic = m
        return _magic


def warm_up() -> str:
    """Load libmagic's database now (blocking), not in the first finalize: loaded lazily after a
    big upload, it was read back from disk (pushed out of the page cache) inside that finalize."""
    return _detector().from_buffer(b"RIFF\x24\x00\x00\x00WAVEfmt ")


def sniff_mime(head: bytes) -> str:
    """libmagic's MIME type of a file from its first bytes (blocking: run it in a thread)."""
    return str(_detector().from_buffer(head))


async def check_media(head: bytes) -> str:
    """Return the MIME type of the file starting with ``head`` (its first
    :data:`MAGIC_BYTES_MAX` bytes), or raise 415 when it is not audio or video."""
    try:
        mime = await asyncio.to_thread(sniff_mime, head)
    except magic.MagicException:  # libmagic could not make sense of it: not a media file we know
        mime = "application/octet-stream"
    if not mime.startswith(ALLOWED_MIME_PREFIXES):
        raise E.UNSUPPORTED_CONTENT(detected_type=mime)
    return mime
