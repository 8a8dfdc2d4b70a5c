"""chunkd's tus 1.0 endpoint driven by the real clients, against real ``chunkd serve`` processes.

* tus-js-client 4.3.1 under Node.js (``tests/tus_clients/upload.mjs``; ``make tusclients``):
  a chunked upload, ``parallelUploads`` (concatenation), resume with a ``FileUrlStorage`` after
  chunkd is ``kill -9``'d in the middle of a PATCH body, ``abort(true)`` (termination), and the
  fork's ``taskId`` metadata followed on ``/ws/tasks/{taskId}``;
* tuspy 1.1.0: ``chunk_size``, ``upload_checksum=True`` (sha1), resume from its ``FileStorage``
  after a restart, and a wrong sha1 refused.

Every upload ends at the folder hand-off: the file under ``completed/<task_id>/`` must hash to
the source. The research notes these tests follow are ``shared/research/tus-clients.md`` §1.1
(tus-js-client) and §1.3 (tuspy); each test names the pitfalls (§0 / §2 rows) it covers.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
from pathlib import Path
from typing import Any

import pytest

from tus_support import (
    Media,
    MiB,
    NodeUpload,
    completed_file,
    disk_bytes,
    file_sha256,
    follow_task,
    make_media,
    node_binary,
    require_tuspy,
    run_node,
    tus_request,
    upload_id,
    wait_disk_at_most,
)

UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
META = {"filename": "talk.wav", "filetype": "audio/wav"}


@pytest.fixture
def node() -> str:
    return node_binary()


@pytest.fixture
def tuspy() -> None:
    require_tuspy()


def endpoint(srv) -> str:
    return f"{srv.url}/files/"


def port_of(srv) -> str:
    return srv.url.rsplit(":", 1)[1]


async def final_of(srv, task: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Follow ``/ws/tasks/{task}`` to its end; it must end with ``complete`` and a normal close."""
    messages, code = await follow_task(srv.url, task)
    assert messages, f"/ws/tasks/{task} sent nothing"
    final = messages[-1]
    assert final.get("type") == "progress" and final.get("stage") == "complete", messages[-5:]
    assert code == 1000, (code, messages[-3:])
    return messages, final


def assert_handed_off(srv, final: dict[str, Any], media: Media) -> Path:
    path = completed_file(srv.data_dir, final)
    assert path.is_file(), f"{final['location']} is not in {srv.data_dir}"
    assert path.stat().st_size == media.size
    assert file_sha256(path) == media.sha256, "the handed-off file differs from the source"
    return path


def ok(res: dict[str, Any], node: NodeUpload) -> None:
    assert res["ok"], f"tus-js-client failed: {res}\n{node.transcript()}"


# -- tus-js-client 4.3.1 -----------------------------------------------------------------------


async def test_tus_js_client_chunked_upload(node, server_factory, tmp_path: Path):
    """A plain upload in 1 MiB PATCHes, as a client behind a body-size cap sends it.

    Pitfalls: §0.3 / §2 row 1 (Location path-absolute, resolved by the client against the
    endpoint), §0.5 / row 3 (no media extension in the upload URL; HEAD ``no-store``), §0.7 (each
    PATCH answers the offset the next one starts at), §1.1 (a finished upload HEADs as complete,
    which is what tus-js-client sees when the same file is given again).
    """
    srv = server_factory()
    media = make_media(tmp_path, "talk.wav", 3 * MiB + 777, seed=1)
    res, log = await run_node({"endpoint": endpoint(srv), "file": str(media.path),
                               "chunkSize": MiB, "metadata": META})
    ok(res, log)

    (post,) = log.requests("POST")
    assert post["req"]["upload-length"] == str(media.size)
    assert 200 <= post["status"] < 300
    location = post["res"]["location"]
    assert location.startswith("/files/"), f"Location should be path-absolute: {location!r}"
    assert "." not in location.rsplit("/", 1)[-1], f"a file extension in {location!r}"
    assert res["url"] == f"{srv.url}{location}"

    patches = log.requests("PATCH")
    assert [p["req"]["upload-offset"] for p in patches] == [str(o) for o in range(0, 4 * MiB, MiB)]
    assert all(p["status"] == 204 for p in patches), [p["status"] for p in patches]
    assert [p["res"]["upload-offset"] for p in patches] == [
        str(MiB), str(2 * MiB), str(3 * MiB), str(media.size)]
    assert res["bytesSent"] == media.size  # nothing sent twice

    _, final = await final_of(srv, upload_id(res["url"]))
    path = assert_handed_off(srv, final, media)
    record = json.loads((path.parent / "session.json").read_text())
    assert record["filename"] == "talk.wav"

    status, headers, _ = await tus_request("HEAD", res["url"])
    assert status == 200, status
    assert headers["Upload-Offset"] == headers["Upload-Length"] == str(media.size)
    assert "no-store" in headers.get("Cache-Control", "")


async def test_tus_js_client_parallel_uploads_concatenate(node, server_factory, tmp_path: Path):
    """``parallelUploads: 3``: three partials, then ``Upload-Concat: final;<urls>``.

    Pitfalls: §0.8 / §2 row 10 (partials come without metadata, the final POST carries it and is
    validated; the final's partial URLs are absolute, with scheme and host, and must be parsed by
    path; the final answers at once and leaves no second copy of the bytes on disk).
    """
    srv = server_factory()
    media = make_media(tmp_path, "talk.wav", 6 * MiB + 12345, seed=2)  # not a multiple of 3
    res, log = await run_node({"endpoint": endpoint(srv), "file": str(media.path),
                               "chunkSize": MiB, "parallelUploads": 3, "metadata": META})
    ok(res, log)

    posts = log.requests("POST")
    partials = [p for p in posts if p["req"].get("upload-concat") == "partial"]
    finals = [p for p in posts if p["req"].get("upload-concat", "").startswith("final;")]
    assert len(partials) == 3 and len(finals) == 1, [p["req"] for p in posts]
    assert all("upload-metadata" not in p["req"] for p in partials)
    assert all(200 <= p["status"] < 300 for p in posts), [p["status"] for p in posts]
    assert sum(int(p["req"]["upload-length"]) for p in partials) == media.size
    (final_post,) = finals
    listed = final_post["req"]["upload-concat"].removeprefix("final;").split(" ")
    assert all(u.startswith(f"{srv.url}/files/") for u in listed), listed  # absolute URLs
    assert "upload-length" not in final_post["req"]
    assert res["url"].startswith(f"{srv.url}/files/")
    assert res["url"] not in listed
    assert res["bytesSent"] == media.size

    _, final = await final_of(srv, upload_id(res["url"]))
    assert_handed_off(srv, final, media)

    # One copy of the bytes: the partials' data is not left beside the handed-off file.
    slack = MiB  # metadata, markers, task records
    used = await wait_disk_at_most(srv.data_dir, media.size + slack)
    assert used <= media.size + slack, (
        f"{used} bytes on disk under the data dir for a {media.size}-byte upload")

    status, headers, _ = await tus_request("HEAD", res["url"])
    assert status == 200, status
    assert headers["Upload-Offset"] == str(media.size)


async def test_tus_js_client_resumes_after_kill9_mid_patch(node, server_factory, tmp_path: Path):
    """chunkd is ``kill -9``'d while a PATCH body streams; restarted on the same folder and port,
    the same file resumes from the stored URL (``FileUrlStorage``) where chunkd left off.

    Pitfalls: §0.1 / §2 row 4 (the resume HEAD must not be 5xx, or tus-js-client starts a new
    upload from byte 0), row 5 (the killed PATCH's lock must not block the upload), §0.7
    (``Upload-Offset`` is what is durably on disk after the crash: more than the last answered
    PATCH, since chunkd checkpoints a streaming body every second, never more than was sent).
    """
    srv = server_factory()
    media = make_media(tmp_path, "talk.wav", 10 * MiB + 4321, seed=3)
    storage = tmp_path / "tus-urls.json"
    chunk = 4 * MiB
    common = {"endpoint": endpoint(srv), "file": str(media.path), "chunkSize": chunk,
              "metadata": META, "urlStorage": str(storage)}

    # Run 1, slowed to 2 MiB/s, no retries: killed ~1.75 s into its second PATCH's body
    # (chunkd's checkpoint: every CHECKPOINT_SECONDS = 1 s of a streaming body).
    async with NodeUpload({**common, "throttle": 2 * MiB, "retryDelays": None}) as first:
        await first.wait_for("progress", 20, bytes=lambda b: b >= chunk + 3.5 * MiB)
        srv.kill9()
        res1 = await first.result()
    assert not res1["ok"], f"the upload outlived the server: {first.transcript()}"
    acked = max(e["accepted"] for e in first.of("chunk"))
    assert acked == chunk, first.transcript()
    cut = first.requests("PATCH")[-1]
    assert "error" in cut and cut["req"]["upload-offset"] == str(acked), cut  # killed mid-PATCH
    sent_at_most = acked + cut["bodyBytes"]
    stored = json.loads(storage.read_text())
    assert [v["uploadUrl"] for v in stored.values()] == [res1["url"]]

    srv2 = server_factory("--port", port_of(srv), data_dir=srv.data_dir)
    assert srv2.url == srv.url

    # Run 2: a new process finds the stored URL and resumes (no throttle, default-like retries).
    res2, second = await run_node({**common, "resume": True})
    ok(res2, second)
    (start,) = second.of("start")
    assert start["previous"] == [res1["url"]]
    assert res2["url"] == res1["url"], "a new upload was created instead of resuming"
    assert second.requests("POST") == [], second.transcript()
    head = second.requests()[0]
    assert head["method"] == "HEAD" and head["status"] == 200, head
    assert head["res"]["upload-length"] == str(media.size)
    resumed_at = int(head["res"]["upload-offset"])
    # the killed PATCH's checkpointed prefix survived kill -9, and nothing past what was sent
    assert acked < resumed_at <= sent_at_most, (acked, resumed_at, sent_at_most)
    assert second.requests("PATCH")[0]["req"]["upload-offset"] == str(resumed_at)
    assert res2["bytesSent"] == media.size - resumed_at  # not re-sent from 0

    _, final = await final_of(srv2, upload_id(res2["url"]))
    assert_handed_off(srv2, final, media)


async def test_tus_js_client_abort_terminates(node, server_factory, tmp_path: Path):
    """``abort(true)`` after two PATCHes: DELETE answered exactly 204, then the upload is gone.

    Pitfalls: §0.6 / §2 row 11 (tus-js-client accepts only 204 for a DELETE, anything else is
    retried and then an error; later requests 404 or 410), and the bytes are freed.
    """
    srv = server_factory()
    media = make_media(tmp_path, "talk.wav", 4 * MiB, seed=4)
    storage = tmp_path / "tus-urls.json"
    res, log = await run_node({"endpoint": endpoint(srv), "file": str(media.path),
                               "chunkSize": MiB, "metadata": META, "urlStorage": str(storage),
                               "abortAfter": 2 * MiB})
    ok(res, log)
    assert res["aborted"]
    (delete,) = log.requests("DELETE")
    assert delete["url"] == res["url"] and delete["status"] == 204, delete
    assert len(log.requests("PATCH")) == 2

    status, _, _ = await tus_request("HEAD", res["url"])
    assert status in (404, 410), status
    status, _, _ = await tus_request(
        "PATCH", res["url"], data=b"\0" * 1024,
        headers={"Upload-Offset": str(MiB), "Content-Type": "application/offset+octet-stream"})
    assert status in (404, 410), status
    used = disk_bytes(srv.data_dir)
    assert used < MiB, f"{used} bytes left on disk after the upload was terminated"

    # tus-js-client forgets the URL after the 204: the same file would start a new upload.
    assert res["remembered"] == 0
    assert json.loads(storage.read_text() or "{}") == {}


async def test_tus_js_client_task_id_followed_on_websocket(node, server_factory, tmp_path: Path):
    """The fork's metadata (``filename, filetype, language, taskId = crypto.randomUUID()``): the
    page opens ``/ws/tasks/{taskId}`` once the upload exists and follows it to ``complete``.

    Pitfalls: §0.9 / §2 row 12 (a tus client cannot see the hand-off in the last PATCH: the result
    goes out of band, on the task's WebSocket), §4 (the fork's metadata keys and ``taskId``).
    """
    srv = server_factory()
    media = make_media(tmp_path, "talk.wav", 4 * MiB + 99, seed=5)
    async with NodeUpload({"endpoint": endpoint(srv), "file": str(media.path), "chunkSize": MiB,
                           "throttle": 2 * MiB,
                           "metadata": {**META, "language": "en", "taskId": "random"}}) as up:
        created = await up.wait_for("url", 20)
        task_id = created["taskId"]
        assert UUID.match(task_id), task_id
        follow = asyncio.create_task(follow_task(srv.url, task_id))
        res = await up.result()
        ok(res, up)
        messages, code = await follow
    assert code == 1000, (code, messages[-3:])

    uploads = [m for m in messages if m["type"] == "upload_progress"]
    sent = [m["uploaded_bytes"] for m in uploads]
    assert sent == sorted(sent) and sent[-1] == media.size, sent
    assert any(0 < b < media.size for b in sent), f"no progress while the bytes arrived: {sent}"
    assert all(m["total_bytes"] == media.size for m in uploads)
    final = messages[-1]
    assert final["type"] == "progress" and final["stage"] == "complete", messages[-3:]
    assert final["task_id"] == task_id
    assert final["location"].startswith(f"completed/{task_id}/"), final
    path = assert_handed_off(srv, final, media)
    record = json.loads((path.parent / "session.json").read_text())
    assert record["language"] == "en" and record["filename"] == "talk.wav"


# -- tuspy 1.1.0 -------------------------------------------------------------------------------


async def test_tuspy_checksum_resume_after_restart(tuspy, server_factory, tmp_path: Path):
    """tuspy with ``chunk_size``, ``upload_checksum=True`` (sha1) and its ``FileStorage``: three
    chunks, chunkd killed and restarted on the same folder and port, a new uploader resumes at
    the stored offset.

    Pitfalls: §1.3 (tuspy always sends ``upload-metadata``, joins a relative Location with
    ``urljoin``, needs ``upload-offset`` in every PATCH answer, resumes only through its URL
    storage), §2 row 9 (checksum: ``sha1`` must be supported).
    """
    from tusclient import client
    from tusclient.storage import filestorage

    srv = server_factory()
    media = make_media(tmp_path, "talk.wav", 5 * MiB + 321, seed=6)
    db = tmp_path / "tuspy-urls.json"
    kwargs = {"file_path": str(media.path), "chunk_size": MiB, "upload_checksum": True,
              "store_url": True, "metadata": META}

    def first_part() -> tuple[str, int]:
        storage = filestorage.FileStorage(str(db))
        try:
            up = client.TusClient(endpoint(srv)).uploader(url_storage=storage, **kwargs)
            assert up.url is None  # nothing stored yet: a new upload
            for _ in range(3):
                up.upload_chunk()
            return up.url, up.offset
        finally:
            storage.close()

    url, offset = await asyncio.to_thread(first_part)
    assert offset == 3 * MiB
    assert url.startswith(f"{srv.url}/files/")

    srv.kill9()
    srv2 = server_factory("--port", port_of(srv), data_dir=srv.data_dir)

    def second_part() -> tuple[str, int, int]:
        storage = filestorage.FileStorage(str(db))
        try:
            up = client.TusClient(endpoint(srv2)).uploader(url_storage=storage, **kwargs)
            resumed = up.offset  # read with a HEAD of the stored URL in the constructor
            up.upload()
            return up.url, resumed, up.offset
        finally:
            storage.close()

    url2, resumed, end = await asyncio.to_thread(second_part)
    assert url2 == url, "tuspy created a new upload instead of resuming the stored one"
    assert resumed == 3 * MiB
    assert end == media.size

    _, final = await final_of(srv2, upload_id(url))
    assert_handed_off(srv2, final, media)


async def test_tuspy_wrong_sha1_is_refused_with_460(tuspy, server_factory, tmp_path: Path):
    """tuspy's ``upload_checksum=True`` is checked, not ignored: a chunk whose ``sha1`` does not
    match its bytes is answered 460 and not counted; the right one then is.

    Pitfalls: §2 row 9 (servers that advertise ``checksum`` and ignore it; 460 on a mismatch, the
    chunk discarded).
    """
    from tusclient import client
    from tusclient.exceptions import TusUploadFailed
    from tusclient.uploader import Uploader

    class WrongSha1(Uploader):
        CHECKSUM_ALGORITHM_PAIR = ("sha1", lambda data: hashlib.sha1(data + b"!"))

    srv = server_factory()
    media = make_media(tmp_path, "talk.wav", 2 * MiB, seed=7)

    def run() -> tuple[int | None, int, str]:
        tus = client.TusClient(endpoint(srv))
        bad = WrongSha1(file_path=str(media.path), client=tus, chunk_size=MiB,
                        upload_checksum=True, metadata=META)
        try:
            bad.upload_chunk()
        except TusUploadFailed as exc:
            refused: int | None = exc.status_code
        else:
            refused = None
        after = bad.get_offset()
        good = tus.uploader(file_path=str(media.path), url=bad.url, chunk_size=MiB,
                            upload_checksum=True)
        good.upload()
        return refused, after, good.url

    refused, after, url = await asyncio.to_thread(run)
    assert refused == 460
    assert after == 0, "a chunk with a wrong checksum was counted"

    _, final = await final_of(srv, upload_id(url))
    assert_handed_off(srv, final, media)
