"""Bad input, against a real server on 127.0.0.1: every refusal is the right status, chunkd's JSON
error shape, never a 500 or a trace, and nothing already stored is lost or created by accident.
"""

from __future__ import annotations

import asyncio
import math
import re
import shutil
import time
import uuid
from pathlib import Path
from urllib.parse import quote

import aiohttp
import orjson
import pytest
import yarl

from chunkd.app import make_app
from chunkd.config import Config
from chunkd.keys import STORE
from chunkd.store.fs.store import MAX_CHUNKS, MIN_CHUNK_SIZE
from conftest import MEDIA, chunks_of, create_session, put_chunk, session_body, sha256

CHUNK = 4096
OGG = (MEDIA / "speech.ogg").read_bytes()  # 17674 bytes: 5 chunks of 4 KiB, the last 1290
PARTS = chunks_of(OGG, CHUNK)
#: The store's own top-level folders (tasks/ maps task ids to sessions) and the hand-off's.
LAYOUT = {"sessions", "gone", "tasks", "trash", "completed"}
SNAKE = re.compile(r"[a-z][a-z0-9]*(_[a-z0-9]+)*")


# -- helpers ---------------------------------------------------------------------------------------


async def expect_error(resp: aiohttp.ClientResponse, status: int, code: str | set[str]) -> dict:
    """The reply is ``status`` with chunkd's JSON error shape and ``code``; return the error."""
    text = await resp.text()
    assert resp.status != 500, text
    assert "Traceback" not in text and 'File "' not in text, text
    assert resp.status == status, text
    assert resp.content_type == "application/json", (resp.content_type, text)
    doc = orjson.loads(text)
    assert isinstance(doc, dict) and set(doc) == {"error"}, doc
    err = doc["error"]
    assert isinstance(err["code"], str) and SNAKE.fullmatch(err["code"]), err
    assert isinstance(err["message"], str) and err["message"], err
    assert err["code"] in ({code} if isinstance(code, str) else code), err
    return err


def tree(root: Path) -> set[str]:
    """Every path under ``root``, relative, so a test can see anything created or removed."""
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def assert_layout(data_dir: Path) -> None:
    """Only the store's own folders at the top, no half-created session left in sessions/."""
    assert {p.name for p in data_dir.iterdir()} <= LAYOUT
    assert not [p.name for p in (data_dir / "sessions").iterdir() if p.name.startswith(".")]


async def status_of(client, sid: str) -> dict:
    resp = await client.get(f"/upload/chunked/{sid}/status")
    assert resp.status == 200, await resp.text()
    return await resp.json()


async def counted(client, sid: str) -> set[int]:
    doc = await status_of(client, sid)
    return set(range(doc["total_chunks"])) - set(doc["missing_chunks"])


def raw_url(client, path: str) -> yarl.URL:
    """``path`` sent as written: no normalising of ``..`` and no re-quoting of ``%2f``."""
    return yarl.URL(str(client.make_url("/")).rstrip("/") + path, encoded=True)


async def finish_and_check(client, config: Config, sid: str) -> None:
    """Send every chunk not yet counted, finalize, and compare the handed-off file to the source."""
    for i in sorted(set(range(len(PARTS))) - await counted(client, sid)):
        resp = await put_chunk(client, sid, i, PARTS[i])
        assert resp.status == 200, await resp.text()
    resp = await client.post(f"/upload/chunked/{sid}/finalize")
    assert resp.status == 200, await resp.text()
    task_dir = config.data_dir / "completed" / (await resp.json())["task_id"]
    assert sha256((task_dir / "upload.ogg").read_bytes()) == sha256(OGG)
    assert_layout(config.data_dir)


async def body_stream(data: bytes, piece: int = 1000):
    """An async generator body: aiohttp sends it chunked (Transfer-Encoding), no Content-Length."""
    for i in range(0, len(data), piece):
        yield data[i : i + piece]
        await asyncio.sleep(0)


@pytest.fixture
async def sid(client) -> str:
    """An uploading speech.ogg session with chunk 0 already counted."""
    sid = (await create_session(client, "speech.ogg", OGG, CHUNK))["session_id"]
    resp = await put_chunk(client, sid, 0, PARTS[0])
    assert resp.status == 200
    return sid


async def assert_only_chunk0(client, config: Config, sid: str) -> None:
    """Chunk 0 is still counted, nothing else is, and its bytes on disk are intact."""
    assert await counted(client, sid) == {0}
    data = (config.data_dir / "sessions" / sid / "data").read_bytes()
    assert data[:CHUNK] == PARTS[0]
    assert_layout(config.data_dir)


# -- session create --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [b"{", b"", b"{'filename': 'a.mp3'}", b'{"filename": "a.mp3",}', b"\xff\xfe{}", b"nope",
     b'{"total_size": 1e400}'],
    ids=["open-brace", "empty", "single-quotes", "trailing-comma", "not-utf8", "bare-word", "inf"],
)
async def test_create_malformed_json_is_400(client, config, tmp_path, raw):
    before = tree(tmp_path)
    resp = await client.post(
        "/upload/chunked/session", data=raw, headers={"Content-Type": "application/json"}
    )
    await expect_error(resp, 400, "invalid_json")
    assert tree(tmp_path) == before


@pytest.mark.parametrize("raw", [b"[]", b'"a.mp3"', b"42", b"null", b"true",
                                 b'[{"filename": "a.mp3", "total_size": 1, "total_chunks": 1}]'])
async def test_create_json_that_is_not_an_object_is_400(client, tmp_path, raw):
    before = tree(tmp_path)
    resp = await client.post(
        "/upload/chunked/session", data=raw, headers={"Content-Type": "application/json"}
    )
    await expect_error(resp, 400, "invalid_json")
    assert tree(tmp_path) == before


@pytest.mark.parametrize(
    ("field", "value"),
    [("total_size", "10000"), ("total_size", True), ("total_size", 10000.0),
     ("total_size", [10000]),
     ("chunk_size", "4096"), ("chunk_size", True), ("chunk_size", 4096.0),
     ("total_chunks", "3"), ("total_chunks", 3.0), ("total_chunks", False),
     ("filename", ["a.mp3"]), ("filename", 123), ("filename", {"name": "a.mp3"}),
     ("task_params", []), ("task_params", "min_speakers=2"), ("task_params", 5),
     ("language", 5), ("model", ["large"])],
)
async def test_create_wrong_types_are_422(client, tmp_path, field, value):
    before = tree(tmp_path)
    body = session_body("a.mp3", 10_000, CHUNK)
    body[field] = value
    err = await expect_error(await client.post("/upload/chunked/session", json=body), 422,
                             "invalid_type")
    assert err["field"] == field
    assert tree(tmp_path) == before


@pytest.mark.parametrize("field", ["filename", "total_size", "total_chunks"])
async def test_create_missing_field_is_422(client, field):
    body = session_body("a.mp3", 10_000, CHUNK)
    del body[field]
    err = await expect_error(await client.post("/upload/chunked/session", json=body), 422,
                             "missing_field")
    assert err["field"] == field


@pytest.mark.parametrize("total_size", [0, -1, -(1 << 40)])
async def test_create_nonpositive_total_size_is_422(client, tmp_path, total_size):
    before = tree(tmp_path)
    body = {"filename": "a.mp3", "total_size": total_size, "chunk_size": CHUNK, "total_chunks": 1}
    err = await expect_error(await client.post("/upload/chunked/session", json=body), 422,
                             "invalid_value")
    assert err["field"] == "total_size"
    assert tree(tmp_path) == before


@pytest.mark.parametrize(
    "over", [1, 1 << 40, (1 << 63) - 1, 1 << 64, 10**20, 10**40],
    ids=["limit+1", "1TiB", "2^63-1", "2^64", "1e20", "1e40"],
)
async def test_create_huge_total_size_is_413(client, config, tmp_path, over):
    """A size over max_file_size is 413 file_too_large, however many digits the integer has."""
    before = tree(tmp_path)
    total = config.max_file_size + over if over == 1 else over
    body = {"filename": "a.mp3", "total_size": total, "chunk_size": config.max_chunk_size,
            "total_chunks": -(-total // config.max_chunk_size)}
    err = await expect_error(await client.post("/upload/chunked/session", json=body), 413,
                             "file_too_large")
    assert err["max_file_size"] == config.max_file_size
    assert tree(tmp_path) == before


@pytest.mark.parametrize("delta", [+1, -1], ids=["one-too-many", "one-too-few"])
@pytest.mark.parametrize("total_size", [10_000, 3 * CHUNK, 1])
async def test_create_total_chunks_mismatch_is_422(client, tmp_path, total_size, delta):
    before = tree(tmp_path)
    expected = math.ceil(total_size / CHUNK)
    body = {"filename": "a.mp3", "total_size": total_size, "chunk_size": CHUNK,
            "total_chunks": expected + delta}
    err = await expect_error(await client.post("/upload/chunked/session", json=body), 422,
                             "total_chunks_mismatch")
    assert err["expected"] == expected
    assert err["field"] == "total_chunks"
    assert tree(tmp_path) == before


async def test_create_chunk_size_over_max_is_413(client, config, tmp_path):
    before = tree(tmp_path)
    size = config.max_chunk_size + 1
    body = session_body("a.mp3", 3 * size, size)
    err = await expect_error(await client.post("/upload/chunked/session", json=body), 413,
                             "chunk_size_too_large")
    assert err["max_chunk_size"] == config.max_chunk_size
    assert tree(tmp_path) == before


@pytest.mark.parametrize("chunk_size", [MIN_CHUNK_SIZE - 1, 1, 0, -4096])
async def test_create_chunk_size_under_min_is_422(client, config, tmp_path, chunk_size):
    """Too small a chunk_size is refused. For 0 the client's total_chunks is computed with the
    server's default chunk size: a server that silently swaps 0 for its default would take it."""
    before = tree(tmp_path)
    per_chunk = chunk_size if chunk_size > 0 else config.chunk_size
    body = {"filename": "a.mp3", "total_size": 10_000, "chunk_size": chunk_size,
            "total_chunks": math.ceil(10_000 / per_chunk)}
    err = await expect_error(await client.post("/upload/chunked/session", json=body), 422,
                             "invalid_value")
    assert err["field"] == "chunk_size"
    assert err["min_chunk_size"] == MIN_CHUNK_SIZE
    assert tree(tmp_path) == before


@pytest.mark.parametrize(
    "filename",
    ["talk.png", "setup.exe", "README", "talk.", ".mp3", "mp3", "talk.mp3.exe", "talk.mp3 "],
)
async def test_create_disallowed_extension_is_422(client, config, tmp_path, filename):
    before = tree(tmp_path)
    body = session_body(filename, 10_000, CHUNK)
    err = await expect_error(await client.post("/upload/chunked/session", json=body), 422,
                             "extension_not_allowed")
    assert err["field"] == "filename"
    assert set(err["allowed_extensions"]) == config.allowed_extensions
    assert tree(tmp_path) == before


@pytest.mark.parametrize(
    ("filename", "code"),
    [("../evil.mp3", "invalid_filename"),
     ("../../../../../../tmp/evil.mp3", "invalid_filename"),
     ("sub/evil.mp3", "invalid_filename"),
     ("/evil.mp3", "invalid_filename"),
     ("..\\evil.mp3", "invalid_filename"),
     ("C:\\Windows\\evil.mp3", "invalid_filename"),
     ("evil\x00.mp3", "invalid_filename"),
     ("evil.mp3\x00.png", "invalid_filename"),
     ("evil\n.mp3", "invalid_filename"),
     ("..", "invalid_filename"),
     ("", "invalid_filename"),
     ("   ", "invalid_filename"),
     ("x" * 10_000 + ".mp3", "filename_too_long"),
     ("é" * 200 + ".mp3", "filename_too_long")],  # 404 bytes in UTF-8, 204 characters
    ids=["dotdot", "deep-dotdot", "slash", "absolute", "backslash", "windows", "nul", "nul-ext",
         "newline", "dotdot-only", "empty", "blank", "10kB", "multibyte-long"],
)
async def test_create_unsafe_filename_is_422_and_creates_nothing(client, tmp_path, filename, code):
    before = tree(tmp_path)
    body = session_body(filename, 10_000, CHUNK)
    err = await expect_error(await client.post("/upload/chunked/session", json=body), 422, code)
    assert err["field"] == "filename"
    assert tree(tmp_path) == before
    assert not (tmp_path.parent / "evil.mp3").exists()


@pytest.mark.parametrize(
    "content_type",
    ["text/plain", "multipart/form-data; boundary=xyz", "application/x-www-form-urlencoded",
     "application/xml", "image/png"],
)
async def test_create_wrong_content_type_is_415(client, tmp_path, content_type):
    before = tree(tmp_path)
    body = orjson.dumps(session_body("a.mp3", 10_000, CHUNK))
    resp = await client.post(
        "/upload/chunked/session", data=body, headers={"Content-Type": content_type}
    )
    await expect_error(resp, 415, "unsupported_content_type")
    assert tree(tmp_path) == before


async def test_create_real_multipart_form_is_415(client, tmp_path):
    before = tree(tmp_path)
    form = aiohttp.FormData()
    form.add_field("filename", "a.mp3")
    form.add_field("file", b"\0" * 100, filename="a.mp3", content_type="audio/mpeg")
    resp = await client.post("/upload/chunked/session", data=form)
    await expect_error(resp, 415, "unsupported_content_type")
    assert tree(tmp_path) == before


async def test_create_body_over_one_mib_is_413(client, tmp_path):
    before = tree(tmp_path)
    body = session_body("a.mp3", 10_000, CHUNK, task_params={"pad": "x" * (2 << 20)})
    resp = await client.post("/upload/chunked/session", json=body)
    await expect_error(resp, 413, {"too_large", "body_too_large"})
    assert tree(tmp_path) == before


# -- unknown and malformed session ids, on every endpoint ------------------------------------------

ENDPOINTS = {
    "status": ("GET", "status", {}),
    "chunk": ("POST", "chunk?index=0",
              {"data": PARTS[0], "headers": {"Content-Type": "application/octet-stream"}}),
    "finalize": ("POST", "finalize", {}),
    "abort": ("DELETE", "abort", {}),
}
BAD_IDS = {
    "unknown-uuid": lambda real: str(uuid.uuid4()),
    "dotdot-etc": lambda real: "../../etc",
    "encoded-dotdot": lambda real: "%2e%2e%2f",
    "encoded-dotdot-etc": lambda real: "%2e%2e%2f%2e%2e%2f%2e%2e%2fetc",
    # resolves to the real session's folder if the id were ever joined to a path unchecked
    "encoded-traversal-to-real": lambda real: f"%2e%2e%2fsessions%2f{real}",
    "dot-new-staging": lambda real: f".new-{real}",
    "uppercase-real": lambda real: real.upper(),
    "uppercase-junk": lambda real: "ZZZZZZZZ-JUNK-NOT-AN-ID",
    "real-plus-suffix": lambda real: real + "0",
    "very-long": lambda real: "a" * 4000,
    "very-long-uuid-ish": lambda real: "-".join([real] * 60),
}


@pytest.mark.parametrize("endpoint", sorted(ENDPOINTS))
@pytest.mark.parametrize("bad", sorted(BAD_IDS))
async def test_unknown_or_malformed_session_id_is_404_and_touches_nothing(
    client, config, tmp_path, sid, endpoint, bad
):
    method, tail, kwargs = ENDPOINTS[endpoint]
    bad_id = BAD_IDS[bad](sid)
    before = tree(tmp_path)
    resp = await client.session.request(
        method, raw_url(client, f"/upload/chunked/{bad_id}/{tail}"), **kwargs
    )
    # "../../etc" is resolved by the URL itself and matches no route: plain not_found then.
    codes = {"not_found", "session_not_found"} if bad == "dotdot-etc" else "session_not_found"
    await expect_error(resp, 404, codes)
    assert tree(tmp_path) == before
    # The real session is untouched: still uploading, chunk 0 still counted.
    assert (await status_of(client, sid))["status"] == "uploading"
    await assert_only_chunk0(client, config, sid)


@pytest.mark.parametrize("endpoint", sorted(ENDPOINTS))
async def test_session_id_longer_than_the_request_line_limit_is_json(
    client, config, tmp_path, sid, endpoint
):
    """A 20 kB id overflows aiohttp's 8190-byte request line: still chunkd's JSON error shape,
    not aiohttp's text/plain parser message echoing the request back."""
    method, tail, kwargs = ENDPOINTS[endpoint]
    before = tree(tmp_path)
    resp = await client.session.request(
        method, raw_url(client, f"/upload/chunked/{'a' * 20_000}/{tail}"), **kwargs
    )
    assert resp.status in (400, 404, 414), resp.status  # 414 URI Too Long fits best
    await expect_error(resp, resp.status, {"session_not_found", "bad_request", "uri_too_long"})
    assert "bytearray" not in await resp.text()
    assert tree(tmp_path) == before
    await assert_only_chunk0(client, config, sid)


# -- chunk: index, content type, checksum header ---------------------------------------------------


async def test_chunk_without_index_is_400(client, config, sid):
    resp = await client.post(f"/upload/chunked/{sid}/chunk", data=PARTS[1],
                             headers={"Content-Type": "application/octet-stream"})
    await expect_error(resp, 400, "missing_index")
    await assert_only_chunk0(client, config, sid)
    await finish_and_check(client, config, sid)


@pytest.mark.parametrize(
    "index", ["abc", "-1", "1.5", "1e3", "", " 1", "1 ", "0x1", "+1", "1,2", "9" * 30]
)
async def test_chunk_index_not_an_integer_is_400(client, config, sid, index):
    resp = await client.session.post(
        raw_url(client, f"/upload/chunked/{sid}/chunk?index={quote(index, safe='')}"),
        data=PARTS[1], headers={"Content-Type": "application/octet-stream"},
    )
    await expect_error(resp, 400, "invalid_index")
    await assert_only_chunk0(client, config, sid)


@pytest.mark.parametrize("index", [len(PARTS), len(PARTS) + 1, 999_999_999])
async def test_chunk_index_out_of_range_is_422(client, config, sid, index):
    resp = await put_chunk(client, sid, index, PARTS[1])
    err = await expect_error(resp, 422, "index_out_of_range")
    assert err["total_chunks"] == len(PARTS)
    await assert_only_chunk0(client, config, sid)


@pytest.mark.parametrize(
    "content_type",
    ["text/plain", "multipart/form-data; boundary=xyz", "application/json",
     "application/x-www-form-urlencoded", "audio/ogg"],
)
@pytest.mark.parametrize("index", [1, 0], ids=["new-chunk", "counted-chunk"])
async def test_chunk_wrong_content_type_is_415(client, config, sid, content_type, index):
    resp = await client.post(
        f"/upload/chunked/{sid}/chunk", params={"index": str(index)},
        data=b"\xee" * len(PARTS[index]), headers={"Content-Type": content_type},
    )
    await expect_error(resp, 415, "unsupported_content_type")
    await assert_only_chunk0(client, config, sid)
    await finish_and_check(client, config, sid)


async def test_chunk_as_real_multipart_form_is_415(client, config, sid):
    form = aiohttp.FormData()
    form.add_field("chunk", PARTS[1], filename="blob", content_type="application/octet-stream")
    resp = await client.post(f"/upload/chunked/{sid}/chunk", params={"index": "1"}, data=form)
    await expect_error(resp, 415, "unsupported_content_type")
    await assert_only_chunk0(client, config, sid)


@pytest.mark.parametrize(
    "header",
    ["sha256=" + "0" * 63, "sha256=" + "0" * 65, "sha256=" + "g" * 64, "md5=" + "0" * 32,
     "sha256:" + "0" * 64, "0" * 64, "sha256=", "", "sha256=" + "0" * 64 + ",x"],
    ids=["63-hex", "65-hex", "non-hex", "md5", "colon", "bare-hex", "no-digest", "empty",
         "trailing-junk"],
)
async def test_chunk_malformed_checksum_header_is_400(client, config, sid, header):
    resp = await put_chunk(client, sid, 1, PARTS[1], **{"X-Chunk-Checksum": header})
    await expect_error(resp, 400, "invalid_checksum_header")
    await assert_only_chunk0(client, config, sid)
    await finish_and_check(client, config, sid)


# -- chunk: body length ----------------------------------------------------------------------------

# (index, body, expected status, code). PARTS[4] is the short last chunk (1290 bytes).
LENGTH_CASES = {
    "short-by-1": (1, PARTS[1][:-1], 400, "chunk_incomplete"),
    "half": (1, PARTS[1][: CHUNK // 2], 400, "chunk_incomplete"),
    "one-byte": (1, PARTS[1][:1], 400, "chunk_incomplete"),
    "long-by-1": (1, PARTS[1] + b"\0", 413, "chunk_too_long"),
    "double": (1, PARTS[1] * 2, 413, "chunk_too_long"),
    "last-short": (4, PARTS[4][:-10], 400, "chunk_incomplete"),
    "last-as-full-chunk": (4, PARTS[4].ljust(CHUNK, b"\0"), 413, "chunk_too_long"),
    "counted-short": (0, PARTS[0][:-1], 400, "chunk_incomplete"),
    "counted-long": (0, PARTS[0] + b"\0", 413, "chunk_too_long"),
}


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
@pytest.mark.parametrize("case", list(LENGTH_CASES))
async def test_chunk_wrong_length_is_refused_and_not_counted(client, config, sid, case, framing):
    index, body, status, code = LENGTH_CASES[case]
    data = body if framing == "content-length" else body_stream(body)
    resp = await client.post(f"/upload/chunked/{sid}/chunk", params={"index": str(index)},
                             data=data, headers={"Content-Type": "application/octet-stream"})
    err = await expect_error(resp, status, code)
    assert err["expected_bytes"] == len(PARTS[index])
    await assert_only_chunk0(client, config, sid)
    # The same chunk sent right afterwards is counted, and the whole file comes out intact.
    resp = await put_chunk(client, sid, index, PARTS[index])
    assert resp.status == 200, await resp.text()
    await finish_and_check(client, config, sid)


async def test_empty_chunk_body_is_incomplete(client, config, sid):
    resp = await put_chunk(client, sid, 1, b"")
    err = await expect_error(resp, 400, "chunk_incomplete")
    assert err["expected_bytes"] == CHUNK
    await assert_only_chunk0(client, config, sid)


# -- a connection dropped mid-body -----------------------------------------------------------------


async def _send_half_and_drop(client, sid: str, index: int, framing: str) -> None:
    host, port = client.server.host, client.server.port
    assert host == "127.0.0.1"
    reader, writer = await asyncio.open_connection(host, port)
    body = PARTS[index]
    head = (f"POST /upload/chunked/{sid}/chunk?index={index} HTTP/1.1\r\n"
            f"Host: {host}:{port}\r\nContent-Type: application/octet-stream\r\n")
    if framing == "content-length":
        writer.write(f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body[: len(body) // 2])
    else:
        half = body[: len(body) // 2]
        writer.write(f"{head}Transfer-Encoding: chunked\r\n\r\n".encode()
                     + f"{len(half):x}\r\n".encode() + half + b"\r\n")
    await writer.drain()
    await asyncio.sleep(0.05)  # let the server start streaming the body
    writer.close()
    await writer.wait_closed()


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
@pytest.mark.parametrize("index", [1, 0], ids=["new-chunk", "counted-chunk"])
async def test_connection_dropped_mid_chunk_counts_nothing(client, config, sid, framing, index):
    await _send_half_and_drop(client, sid, index, framing)
    store = client.server.app[STORE]
    deadline = time.monotonic() + 5
    while (await store.state(sid)).writing and time.monotonic() < deadline:  # noticed the drop
        await asyncio.sleep(0.02)
    assert not (await store.state(sid)).writing, "a dropped request is still counted as in flight"
    await assert_only_chunk0(client, config, sid)
    resp = await put_chunk(client, sid, index, PARTS[index])
    assert resp.status == 200, await resp.text()
    assert (await resp.json())["already_received"] is (index == 0)
    await finish_and_check(client, config, sid)


# -- finalize, abort and what comes after ----------------------------------------------------------


async def test_finalize_with_chunks_missing_is_409(client, config, sid):
    err = await expect_error(await client.post(f"/upload/chunked/{sid}/finalize"), 409,
                             "chunks_missing")
    assert err["missing_chunks"] == [1, 2, 3, 4]
    assert (await status_of(client, sid))["status"] == "uploading"
    await assert_only_chunk0(client, config, sid)
    assert list((config.data_dir / "completed").iterdir()) == []
    await finish_and_check(client, config, sid)  # finalize still works once every chunk is in


@pytest.mark.parametrize("index", [0, 1])
async def test_chunk_after_finalize_is_409(client, config, sid, index):
    await finish_and_check(client, config, sid)
    task_dir = next((config.data_dir / "completed").iterdir())
    resp = await put_chunk(client, sid, index, b"\xee" * len(PARTS[index]))
    err = await expect_error(resp, 409, "session_finalized")
    assert err["task_id"] == task_dir.name
    assert sha256((task_dir / "upload.ogg").read_bytes()) == sha256(OGG)
    assert (await status_of(client, sid))["status"] == "completed"


@pytest.mark.parametrize("index", [0, 1])
async def test_chunk_after_abort_is_410(client, config, sid, index):
    resp = await client.delete(f"/upload/chunked/{sid}/abort")
    assert resp.status == 200
    resp = await put_chunk(client, sid, index, PARTS[index])
    await expect_error(resp, 410, "session_aborted")
    for resp in [await client.get(f"/upload/chunked/{sid}/status"),
                 await client.post(f"/upload/chunked/{sid}/finalize"),
                 await client.delete(f"/upload/chunked/{sid}/abort")]:
        await expect_error(resp, 410, "session_aborted")
    assert not (config.data_dir / "sessions" / sid).exists()
    assert_layout(config.data_dir)


# -- routes and methods ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [("GET", "/nope", 404), ("GET", "/static/../README.md", 404), ("GET", "/static/nope.js", 404),
     ("POST", "/upload/chunked", 404),
     ("GET", "/upload/chunked/{sid}", 404), ("POST", "/upload/chunked/{sid}/chunks", 404),
     ("GET", "/upload/chunked/session", 405), ("PUT", "/upload/chunked/session", 405),
     ("PUT", "/upload/chunked/{sid}/chunk", 405), ("GET", "/upload/chunked/{sid}/chunk", 405),
     ("GET", "/upload/chunked/{sid}/finalize", 405), ("POST", "/upload/chunked/{sid}/abort", 405),
     ("DELETE", "/upload/chunked/{sid}/status", 405),
     ("PATCH", "/upload/chunked/{sid}/status", 405)],
)
async def test_unknown_route_and_wrong_method_are_json(client, config, sid, method, path, status):
    resp = await client.request(method, path.format(sid=sid), data=PARTS[1],
                                headers={"Content-Type": "application/octet-stream"})
    await expect_error(resp, status, "not_found" if status == 404 else "method_not_allowed")
    await assert_only_chunk0(client, config, sid)


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [("GET", "/upload/chunked/session", {"POST"}),
     ("PUT", "/upload/chunked/{sid}/chunk", {"POST"}),
     ("POST", "/upload/chunked/{sid}/abort", {"DELETE"})],
)
async def test_wrong_method_names_the_allowed_ones(client, sid, method, path, allowed):
    """RFC 9110 15.5.6: a 405 MUST carry an Allow header listing the methods that work."""
    resp = await client.request(method, path.format(sid=sid))
    await expect_error(resp, 405, "method_not_allowed")
    assert "Allow" in resp.headers, dict(resp.headers)
    assert allowed <= {m.strip() for m in resp.headers["Allow"].split(",")}


# -- disk full and expiry --------------------------------------------------------------------------


async def test_session_bigger_than_free_disk_is_507(aiohttp_client, tmp_path):
    data_dir = tmp_path / "data"
    chunk = 99_000_000
    cfg = Config(min_chunk_size=1024, data_dir=data_dir, max_file_size=1 << 50, max_chunk_size=chunk, chunk_size=chunk,
                 sweep_interval=3600)
    client = await aiohttp_client(make_app(cfg))
    total = shutil.disk_usage(data_dir).free + (1 << 30)  # 1 GiB more than there is
    if math.ceil(total / chunk) > MAX_CHUNKS:
        pytest.skip("this disk is too big to overflow within MAX_CHUNKS chunks")
    before = tree(tmp_path)
    resp = await client.post("/upload/chunked/session", json=session_body("big.wav", total, chunk))
    await expect_error(resp, 507, "insufficient_storage")
    assert tree(tmp_path) == before  # no session folder, staging or reserved file left behind
    assert list((data_dir / "sessions").iterdir()) == []
    # The server is fine afterwards: a session that fits is created.
    resp = await client.post("/upload/chunked/session", json=session_body("a.wav", 10_000, chunk))
    assert resp.status == 201, await resp.text()


async def test_expired_session_is_410_everywhere(aiohttp_client, tmp_path):
    ttl = 0.5
    cfg = Config(min_chunk_size=1024, data_dir=tmp_path / "data", chunk_size=CHUNK, session_ttl=ttl, sweep_interval=3600)
    client = await aiohttp_client(make_app(cfg))
    sid = (await create_session(client, "speech.ogg", OGG, CHUNK))["session_id"]
    assert (await put_chunk(client, sid, 0, PARTS[0])).status == 200
    await asyncio.sleep(ttl + 0.2)
    for resp in [await put_chunk(client, sid, 1, PARTS[1]),
                 await client.get(f"/upload/chunked/{sid}/status"),
                 await client.post(f"/upload/chunked/{sid}/finalize"),
                 await client.delete(f"/upload/chunked/{sid}/abort")]:
        await expect_error(resp, 410, "session_expired")
    assert list((tmp_path / "data" / "completed").iterdir()) == []
    assert_layout(tmp_path / "data")
