"""tus 1.0.0 on the wire: its headers, ``Upload-Metadata``, and how chunkd's errors are told to a
tus client. No handlers here (they are in :mod:`chunkd.api.tus`), so the error middleware can
use it too.

What tus clients do with a status decides the mapping (``../shared/research/tus-clients.md``):
tus-js-client retries 409, 423 and every 5xx on POST and PATCH, and nothing else of 4xx; on a
``HEAD`` (the resume) any answer but 2xx or 423 makes it forget the upload and start again from
byte 0. So a transient refusal of a HEAD (draining, busy, rate-limited, storage unavailable) is
423, and a rate limit elsewhere is a 503, which is retried, not a fatal 429. (A body that stalls
is a 503 too; :func:`chunkd.core.tus.append` says so, with the offset it kept.)
"""

from __future__ import annotations

import base64
import binascii
import email.utils
import hashlib
import re

from aiohttp import web

from chunkd import errors as E
from chunkd.errors import ChunkdError

TUS_VERSION = "1.0.0"
EXTENSIONS = ("creation", "creation-with-upload", "creation-defer-length", "termination",
              "expiration", "checksum", "concatenation")
#: ``Upload-Checksum`` algorithms (sha1 is the one the spec requires), as hashlib names.
CHECKSUMS = ("sha1", "sha256", "md5")
OFFSET_STREAM = "application/offset+octet-stream"
#: The request headers of tus (plus those its clients add), for CORS.
REQUEST_HEADERS = ("Tus-Resumable", "Upload-Length", "Upload-Offset", "Upload-Metadata",
                   "Upload-Defer-Length", "Upload-Concat", "Upload-Checksum",
                   "X-HTTP-Method-Override", "X-Request-ID", "X-Requested-With")
#: The answer headers a browser must be able to read (named: ``*`` does not count with
#: credentials).
EXPOSE_HEADERS = ("Location", "Upload-Offset", "Upload-Length", "Upload-Expires",
                  "Upload-Metadata", "Upload-Defer-Length", "Upload-Concat", "Tus-Resumable",
                  "Tus-Version", "Tus-Extension", "Tus-Max-Size", "Tus-Checksum-Algorithm")
MAX_METADATA_PAIRS = 64
_KEY = re.compile(r"[^\s,]+")
_DIGITS = re.compile(r"[0-9]{1,19}")


def method_of(request: web.Request) -> str:
    """The method a tus client meant (``X-HTTP-Method-Override`` on a POST, for proxies that
    only pass GET and POST)."""
    if request.method == "POST":
        override = request.headers.get("X-HTTP-Method-Override", "").strip().upper()
        if override in ("PATCH", "DELETE", "HEAD"):
            return override
    return request.method


def http_date(ts: float) -> str:
    """RFC 9110 date (``Upload-Expires``), never a Unix timestamp."""
    return email.utils.formatdate(ts, usegmt=True)


def parse_int_header(text: str | None) -> int | None:
    if text is None:
        return None
    text = text.strip()
    if not _DIGITS.fullmatch(text):
        raise ValueError(text)
    return int(text)


def parse_metadata(header: str | None) -> dict[str, str]:
    """``key base64,key2 base64,flag``: each value decoded (UTF-8). A key without a value (or
    with an empty one) is "" (tuspy sends an empty header; empty ``filetype`` is common)."""
    out: dict[str, str] = {}
    if header is None or not header.strip():
        return out
    pairs = header.split(",")
    if len(pairs) > MAX_METADATA_PAIRS:
        raise E.INVALID_METADATA(reason=f"at most {MAX_METADATA_PAIRS} pairs")
    for pair in pairs:
        key, _, value = pair.strip().partition(" ")
        value = value.strip()
        if not _KEY.fullmatch(key):
            raise E.INVALID_METADATA(reason=f"a key is empty or has spaces or commas: {pair!r}")
        if key in out:
            raise E.INVALID_METADATA(reason=f"the key {key!r} is given twice")
        try:
            out[key] = base64.b64decode(value, validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError, ValueError):
            raise E.INVALID_METADATA(
                reason=f"the value of {key!r} is not base64 of UTF-8 text") from None
    return out


def parse_checksum(header: str | None) -> tuple[str, str] | None:
    """``Upload-Checksum: <algorithm> <base64>`` as (hashlib name, hex digest)."""
    if header is None:
        return None
    algorithm, _, value = header.strip().partition(" ")
    algorithm = algorithm.lower()
    if algorithm not in CHECKSUMS:
        raise E.INVALID_UPLOAD_CHECKSUM(supported=", ".join(CHECKSUMS))
    try:
        digest = base64.b64decode(value.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise E.INVALID_UPLOAD_CHECKSUM(supported=", ".join(CHECKSUMS)) from None
    if len(digest) != hashlib.new(algorithm).digest_size:  # refused before the body is read
        raise E.INVALID_UPLOAD_CHECKSUM(supported=", ".join(CHECKSUMS))
    return algorithm, digest.hex()


def is_tus(request: web.Request, tus_path: str) -> bool:
    return bool(tus_path) and (request.path == tus_path.rstrip("/")
                               or request.path.startswith(tus_path))


def for_tus_client(method: str, exc: ChunkdError) -> ChunkdError:
    """The error as a tus client should see it (see the module's docstring)."""
    if method == "HEAD" and (exc.status >= 500 or exc.status == 429):
        return E.RETRY_LATER(reason=exc.message)
    if exc.code == "rate_limited":
        return E.SERVER_BUSY(retry_after=exc.details.get("retry_after", 1))
    return exc  # (a stalled body is already 503 body_stalled: chunkd.core.tus.append)


def add_tus_headers(resp: web.StreamResponse, status: int) -> None:
    resp.headers["Tus-Resumable"] = TUS_VERSION
    if status == 412:
        resp.headers["Tus-Version"] = TUS_VERSION
