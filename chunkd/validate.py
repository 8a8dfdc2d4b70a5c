"""Checks on what clients send: session fields, and the finished file's content (libmagic)."""

from __future__ import annotations

import asyncio
import math
import threading
from pathlib import Path
from typing import Any

import magic
import orjson

from chunkd.config import MAX_CHUNKS, MIN_CHUNK_SIZE, Config
from chunkd.errors import BadRequest, InvalidField, TooLarge, UnsupportedMediaType

#: Top-level MIME types libmagic may report for a file chunkd accepts.
ALLOWED_MIME_PREFIXES = ("audio/", "video/")
MAX_FILENAME_BYTES = 255
MAX_SHORT_TEXT = 64  # language, model
MAX_TASK_PARAMS_BYTES = 16 * 1024


def _int_field(doc: dict[str, Any], name: str, *, required: bool = True) -> int | None:
    value = doc.get(name)
    if value is None:
        if required:
            raise InvalidField(f"{name} is required", code="missing_field", field=name)
        return None
    if isinstance(value, float) and value.is_integer() and abs(value) >= 2**63:
        return int(value)  # orjson gives integers past 64 bits as floats: still an integer
    # bool is an int in Python; JSON true is not a size.
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidField(f"{name} must be an integer", code="invalid_type", field=name)
    return value


def _text_field(doc: dict[str, Any], name: str) -> str | None:
    value = doc.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidField(f"{name} must be a string", code="invalid_type", field=name)
    if len(value) > MAX_SHORT_TEXT or not value.isprintable():
        raise InvalidField(
            f"{name} must be printable text of at most {MAX_SHORT_TEXT} characters",
            code="invalid_value", field=name,
        )
    return value


def check_filename(value: Any, allowed: frozenset[str]) -> tuple[str, str]:
    """Return ``(filename, extension)``. The name is kept as metadata, never used as a path."""
    if value is None:
        raise InvalidField("filename is required", code="missing_field", field="filename")
    if not isinstance(value, str):
        raise InvalidField("filename must be a string", code="invalid_type", field="filename")
    if len(value.encode("utf-8", "surrogatepass")) > MAX_FILENAME_BYTES:
        raise InvalidField(
            f"filename is longer than {MAX_FILENAME_BYTES} bytes",
            code="filename_too_long", field="filename",
        )
    if not value.strip() or not value.isprintable():
        raise InvalidField(
            "filename must be non-empty printable text (no NUL or control characters)",
            code="invalid_filename", field="filename",
        )
    if "/" in value or "\\" in value or value in (".", ".."):
        raise InvalidField(
            "filename must be a bare file name, without '/' or '\\'",
            code="invalid_filename", field="filename",
        )
    stem, dot, ext = value.rpartition(".")
    ext = ext.lower()
    if not dot or not stem or ext not in allowed:
        raise InvalidField(
            "filename must end with an audio or video extension",
            code="extension_not_allowed", field="filename", allowed_extensions=sorted(allowed),
        )
    return value, ext


def check_new_session(doc: Any, config: Config) -> dict[str, Any]:
    """Validate a ``POST /upload/chunked/session`` body; return the store's ``create`` fields."""
    if not isinstance(doc, dict):
        raise BadRequest("the request body must be a JSON object", code="invalid_json")
    filename, extension = check_filename(doc.get("filename"), config.allowed_extensions)
    total_size = _int_field(doc, "total_size")
    assert total_size is not None
    if total_size <= 0:
        raise InvalidField("total_size must be positive", code="invalid_value", field="total_size")
    if total_size > config.max_file_size:
        raise TooLarge(
            f"total_size {total_size} is over the limit of {config.max_file_size} bytes",
            code="file_too_large", max_file_size=config.max_file_size,
        )
    chunk_size = _int_field(doc, "chunk_size", required=False)
    if chunk_size is None:
        chunk_size = config.chunk_size
    if chunk_size > config.max_chunk_size:
        raise TooLarge(
            f"chunk_size {chunk_size} is over the limit of {config.max_chunk_size} bytes",
            code="chunk_size_too_large", max_chunk_size=config.max_chunk_size,
        )
    if chunk_size < MIN_CHUNK_SIZE:
        raise InvalidField(
            f"chunk_size must be at least {MIN_CHUNK_SIZE} bytes",
            code="invalid_value", field="chunk_size", min_chunk_size=MIN_CHUNK_SIZE,
        )
    expected_chunks = math.ceil(total_size / chunk_size)
    total_chunks = _int_field(doc, "total_chunks")
    if total_chunks != expected_chunks:
        raise InvalidField(
            f"total_chunks must be ceil(total_size / chunk_size) = {expected_chunks}",
            code="total_chunks_mismatch", field="total_chunks",
            expected=expected_chunks, chunk_size=chunk_size,
        )
    if total_chunks > MAX_CHUNKS:
        raise InvalidField(
            f"a session has at most {MAX_CHUNKS} chunks; use a larger chunk_size",
            code="too_many_chunks", field="total_chunks",
        )
    task_params = doc.get("task_params")
    if task_params is None:
        task_params = {}
    if not isinstance(task_params, dict):
        raise InvalidField("task_params must be an object", code="invalid_type", field="task_params")
    try:
        encoded = orjson.dumps(task_params)
    except orjson.JSONEncodeError:  # e.g. nested deeper than orjson writes
        raise InvalidField("task_params is nested too deeply", code="invalid_value",
                           field="task_params") from None
    if len(encoded) > MAX_TASK_PARAMS_BYTES:
        raise InvalidField("task_params is too large", code="invalid_value", field="task_params")
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


def sniff_mime(path: Path) -> str:
    """libmagic's MIME type of the file's content (blocking: run it in a thread)."""
    return _detector().from_file(str(path))


async def check_media(path: Path) -> str:
    """Return the file's MIME type, or raise 415 when it is not audio or video."""
    try:
        mime = await asyncio.to_thread(sniff_mime, path)
    except magic.MagicException:  # libmagic could not make sense of it: not a media file we know
        mime = "application/octet-stream"
    if not mime.startswith(ALLOWED_MIME_PREFIXES):
        raise UnsupportedMediaType(
            f"the file's content is {mime}, not audio or video",
            code="unsupported_content", detected_type=mime,
        )
    return mime
