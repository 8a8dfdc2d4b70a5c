"""Live progress over /ws/tasks/{id} and the WhisperX hand-off, against a real double."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import aiohttp
import orjson
import pytest

from chunkd.app import make_app
from chunkd.config import Config
from chunkd.core.tasks import retry_task
from chunkd.keys import STORE
from chunkd.progress import Close, ProgressHub
from chunkd.store import FileSystemStore
from conftest import (
    MEDIA,
    ChunkdTestServer,
    chunks_of,
    create_session,
    put_chunk,
    sha256,
    store_put,
    upload_all,
)
from whisperx_double import RESULT, WhisperXDouble

SPEECH = (MEDIA / "speech.wav").read_bytes()
CHUNK = 16 * 1024


async def collect(ws, into: list | None = None) -> list[dict]:
    """Every JSON message until the server closes the socket."""
    out = [] if into is None else into
    async for msg in ws:
        if msg.type == aiohttp.WSMsgType.TEXT:
            out.append(orjson.loads(msg.data))
    return out


async def chunkd_client(aiohttp_client, tmp_path: Path, **cfg) -> object:
    config = Config(min_chunk_size=1024, data_dir=tmp_path / "data", chunk_size=4096, whisperx_poll_interval=0.05,
                    handoff_retry_delay=0.05, **cfg)
    return await aiohttp_client(ChunkdTestServer(make_app(config)))


def stages(msgs: list[dict]) -> list[str]:
    return [m["stage"] for m in msgs if m["type"] == "progress"]


def assert_upload_counts_monotonic(msgs: list[dict], total: int) -> None:
    counts = [m["uploaded_chunks"] for m in msgs if m["type"] == "upload_progress"]
    assert counts == sorted(counts)
    assert counts[-1] == total


async def test_three_subscribers_and_the_whisperx_pipeline(aiohttp_client, double_url, tmp_path):
    # the fork has the finer stages; each lasts longer than a poll, so none is missed
    double = WhisperXDouble(variant="fork", token="t0k3n", step_seconds=0.2)
    client = await chunkd_client(aiohttp_client, tmp_path, handoff="whisperx",
                                 whisperx_url=await double_url(double), whisperx_token="t0k3n")
    parts = chunks_of(SPEECH, CHUNK)
    session = await create_session(client, "speech.wav", SPEECH, CHUNK, language="en",
                                   model="large-v3", task_params={"min_speakers": 1,
                                                                  "max_speakers": 2})
    sid = session["session_id"]
    early = await client.ws_connect(f"/ws/tasks/{sid}")
    early_msgs: list[dict] = []
    early_task = asyncio.create_task(collect(early, early_msgs))
    late_task = None
    for i, part in enumerate(parts):
        assert (await put_chunk(client, sid, i, part)).status == 200
        await asyncio.sleep(0.02)
        if i == len(parts) // 2:
            late = await client.ws_connect(f"/ws/tasks/{sid}")
            late_task = asyncio.create_task(collect(late))
    resp = await client.post(f"/upload/chunked/{sid}/finalize")
    assert resp.status == 200
    task_id = (await resp.json())["task_id"]
    early_msgs = await asyncio.wait_for(early_task, 20)
    late_msgs = await asyncio.wait_for(late_task, 20)
    after = await client.ws_connect(f"/ws/tasks/{task_id}")  # by task id, after the end
    after_msgs = await asyncio.wait_for(collect(after), 10)
    assert after.close_code == 1000

    order = ["queued", "transcribing", "aligning", "diarizing", "complete"]
    for msgs in (early_msgs, late_msgs, after_msgs):
        final = msgs[-1]
        assert final["type"] == "progress" and final["stage"] == "complete"
        assert final["result"] == RESULT
        assert final["task_id"] == task_id
        assert_upload_counts_monotonic(msgs, len(parts))
        seen = stages(msgs)
        assert seen == sorted(seen, key=order.index)  # in order, never back
        assert all(m["timestamp"].endswith("Z") for m in msgs)
    assert stages(early_msgs)[0] == "queued"
    assert {"transcribing", "aligning", "diarizing"} <= set(stages(early_msgs))
    assert len(after_msgs) == 2  # the snapshot: upload counts, then the final message at once

    assert len(double.submissions) == 1
    sub = double.submissions[0]
    assert sub["sha256"] == sha256(SPEECH) and sub["size"] == len(SPEECH)
    assert sub["filename"] == "speech.wav"
    assert sub["params"] == {"language": "en", "model": "large-v3", "min_speakers": "1",
                             "max_speakers": "2"}
    status = await (await client.get(f"/upload/chunked/{sid}/status")).json()
    assert status["status"] == "completed"
    assert status["task"]["identifier"] == sub["identifier"]


async def test_unknown_session_closes_with_a_code(client):
    for bad in ("00000000-0000-4000-8000-000000000000", "nope"):
        ws = await client.ws_connect(f"/ws/tasks/{bad}")
        msg = await asyncio.wait_for(ws.receive(), 5)
        assert msg.type == aiohttp.WSMsgType.CLOSE
        assert ws.close_code == 4404
        assert "session_not_found" in msg.extra


async def test_ping_pong_and_heartbeat(aiohttp_client, tmp_path):
    client = await chunkd_client(aiohttp_client, tmp_path, heartbeat_interval=0.3)
    sid = (await create_session(client, "speech.wav", SPEECH, CHUNK))["session_id"]
    ws = await client.ws_connect(f"/ws/tasks/{sid}")
    await ws.send_str('{"type": "ping"}')
    got = []
    for _ in range(4):
        got.append(orjson.loads((await asyncio.wait_for(ws.receive(), 5)).data)["type"])
    assert got[0] == "upload_progress"
    assert "pong" in got and "heartbeat" in got
    await ws.close()


async def test_slow_subscriber_is_dropped_without_stalling_others(tmp_path):
    store = FileSystemStore(tmp_path)
    meta = await store.create(filename="a.wav", extension="wav", total_size=40 * 1024,
                              chunk_size=1024, total_chunks=40, ttl=60, language=None,
                              model=None, task_params={})
    hub = ProgressHub(store, poll_interval=0.01, min_gap=0, queue_size=5)
    slow = await hub.subscribe(meta.session_id)
    fast = await hub.subscribe(meta.session_id)
    seen: list[int] = []

    async def drain_fast() -> None:
        while True:
            item = await fast.queue.get()
            if isinstance(item, Close):
                return
            seen.append(item["uploaded_chunks"])

    reader = asyncio.create_task(drain_fast())

    for i in range(40):
        await store_put(store, meta, i, bytes(1024))
        hub.poke(meta.session_id)
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.2)
    items = []
    while not slow.queue.empty():
        items.append(slow.queue.get_nowait())
    assert isinstance(items[-1], Close) and items[-1].code == 4008
    assert len(items) <= 6
    assert seen[-1] == 40 and seen == sorted(seen)
    await hub.close()
    await asyncio.wait_for(reader, 5)


async def test_service_5xx_is_retried_then_succeeds(aiohttp_client, double_url, tmp_path):
    double = WhisperXDouble(fail_posts=2)
    client = await chunkd_client(aiohttp_client, tmp_path, handoff="whisperx",
                                 whisperx_url=await double_url(double))
    _, msgs = await upload_and_follow(client, "speech.wav", SPEECH)
    assert msgs[-1]["type"] == "progress" and msgs[-1]["stage"] == "complete"
    assert double.posts == 3 and len(double.submissions) == 1


async def upload_and_follow(client, name: str, data: bytes) -> tuple[str, list[dict]]:
    """Upload with a subscriber from the start; return the session id and all it was told."""
    sid = (await create_session(client, name, data, CHUNK))["session_id"]
    ws = await client.ws_connect(f"/ws/tasks/{sid}")
    follow = asyncio.create_task(collect(ws))
    for i, part in enumerate(chunks_of(data, CHUNK)):
        assert (await put_chunk(client, sid, i, part)).status == 200
    assert (await client.post(f"/upload/chunked/{sid}/finalize")).status == 200
    return sid, await asyncio.wait_for(follow, 30)


@pytest.mark.parametrize(
    "double, code, text",
    [
        (WhisperXDouble(reject=(422, {"error": {
            "message": "File extension '.wav' is not supported", "code": "UNSUPPORTED_FILE_EXTENSION",
            "correlation_id": "c0ffee"}})), "UNSUPPORTED_FILE_EXTENSION", "is not supported"),
        (WhisperXDouble(reject=(400, {"error": {"message": "Audio could not be decoded",
                                                "code": "AUDIO_PROCESSING_ERROR"}})),
         "AUDIO_PROCESSING_ERROR", "could not be decoded"),
        (WhisperXDouble(fail_posts=99), "service_unavailable", "did not take the file"),
        (WhisperXDouble(fail_task=True), "transcription_out_of_memory", "CUDA out of memory"),
        (WhisperXDouble(token="s3cret"), "http_401", "Authentication required"),
    ],
    ids=["422", "400", "5xx-forever", "task-failed", "no-token"],
)
async def test_service_errors_reach_the_subscriber_and_keep_the_file(
    aiohttp_client, double_url, tmp_path, double, code, text
):
    client = await chunkd_client(aiohttp_client, tmp_path, handoff="whisperx",
                                 whisperx_url=await double_url(double), handoff_retries=3)
    sid, msgs = await upload_and_follow(client, "speech.wav", SPEECH)
    final = msgs[-1]
    assert final["type"] == "error"
    assert final["error_code"] == code
    assert text in final["user_message"] + final["technical_detail"]
    store = client.server.app[STORE]
    blob = await store.blob(sid)  # kept for a retry
    assert blob is not None and sha256(await blob.read(0, blob.size)) == sha256(SPEECH)
    status = await (await client.get(f"/upload/chunked/{sid}/status")).json()
    assert status["task"]["stage"] == "failed"
    assert status["task"]["error"]["error_code"] == code
    if code == "service_unavailable":
        assert double.posts == 3


async def test_service_down_is_retried_then_reported(aiohttp_client, tmp_path, unused_tcp_port):
    client = await chunkd_client(aiohttp_client, tmp_path, handoff="whisperx", handoff_retries=3,
                                 whisperx_url=f"http://127.0.0.1:{unused_tcp_port}")
    sid, msgs = await upload_and_follow(client, "speech.wav", SPEECH)
    final = msgs[-1]
    assert final["type"] == "error" and final["error_code"] == "service_unavailable"
    assert "3 tries" in final["user_message"] and "cannot reach" in final["technical_detail"]
    assert await client.server.app[STORE].blob(sid) is not None


async def test_never_answering_service_times_out_and_retry_works(aiohttp_client, double_url, tmp_path):
    double = WhisperXDouble(hang=True)
    client = await chunkd_client(aiohttp_client, tmp_path, handoff="whisperx",
                                 whisperx_url=await double_url(double), whisperx_timeout=1)
    sid, msgs = await upload_and_follow(client, "speech.wav", SPEECH)
    assert msgs[-1]["type"] == "error" and msgs[-1]["error_code"] == "service_timeout"
    assert double.posts == 1  # a timeout is not retried: the service may have the file
    task_id = msgs[-1]["task_id"]

    double.hang = False
    store = client.server.app[STORE]
    await retry_task(store, task_id, ("submit",))
    ws = await client.ws_connect(f"/ws/tasks/{task_id}")
    again = await asyncio.wait_for(collect(ws), 30)  # the runner's rescan takes it within 5 s
    assert again[-1]["type"] == "progress" and again[-1]["stage"] == "complete"
    assert len(double.submissions) == 1
    status = await (await client.get(f"/upload/chunked/{sid}/status")).json()
    assert status["task"]["attempt"] == 2


SCRIPT = '''
import json, sys, os, hashlib
data = open(sys.argv[-1], "rb").read()
for stage, pct in (("transcribing", 20), ("aligning", 60), ("diarizing", 90)):
    print(json.dumps({"stage": stage, "percentage": pct, "message": stage + "..."}), flush=True)
print("not json, ignored")
print(json.dumps({"result": {"sha256": hashlib.sha256(data).hexdigest(),
                             "task": os.environ["CHUNKD_TASK_ID"],
                             "language": os.environ["CHUNKD_LANGUAGE"]}}))
sys.exit(int(os.environ.get("EXIT", "0")))
'''


@pytest.mark.parametrize("exit_code", [0, 3])
async def test_command_handoff_relays_json_lines(aiohttp_client, tmp_path, monkeypatch, exit_code):
    script = tmp_path / "pipeline.py"
    script.write_text(SCRIPT)
    monkeypatch.setenv("EXIT", str(exit_code))
    client = await chunkd_client(aiohttp_client, tmp_path, handoff="command",
                                 handoff_command=f"{sys.executable} {script}")
    sid = (await create_session(client, "speech.wav", SPEECH, CHUNK, language="de"))["session_id"]
    ws = await client.ws_connect(f"/ws/tasks/{sid}")
    follow = asyncio.create_task(collect(ws))
    for i, part in enumerate(chunks_of(SPEECH, CHUNK)):
        await put_chunk(client, sid, i, part)
    task_id = (await (await client.post(f"/upload/chunked/{sid}/finalize")).json())["task_id"]
    msgs = await asyncio.wait_for(follow, 30)
    assert stages(msgs)[:4] == ["queued", "transcribing", "aligning", "diarizing"]
    final = msgs[-1]
    if exit_code == 0:
        assert final["stage"] == "complete"
        assert final["result"] == {"sha256": sha256(SPEECH), "task": task_id, "language": "de"}
    else:
        assert final["type"] == "error" and final["error_code"] == "command_failed"
        assert "status 3" in final["user_message"]


BACKWARDS = '''
import json
for stage, pct in (("aligning", 60), ("transcribing", 20), ("aligning", 50), ("diarizing", 80)):
    print(json.dumps({"stage": stage, "percentage": pct, "message": stage}), flush=True)
'''


async def test_progress_never_goes_backwards(aiohttp_client, tmp_path):
    """Whatever a hand-off says late (an earlier stage, a lower percentage), subscribers only ever
    see the task move forward."""
    script = tmp_path / "pipeline.py"
    script.write_text(BACKWARDS)
    client = await chunkd_client(aiohttp_client, tmp_path, handoff="command",
                                 handoff_command=f"{sys.executable} {script}")
    sid = (await create_session(client, "speech.wav", SPEECH, CHUNK))["session_id"]
    ws = await client.ws_connect(f"/ws/tasks/{sid}")
    follow = asyncio.create_task(collect(ws))
    for i, part in enumerate(chunks_of(SPEECH, CHUNK)):
        await put_chunk(client, sid, i, part)
    await client.post(f"/upload/chunked/{sid}/finalize")
    msgs = await asyncio.wait_for(follow, 30)
    order = ["queued", "transcribing", "aligning", "diarizing", "complete"]
    steps = [(order.index(m["stage"]), m["percentage"]) for m in msgs if m["type"] == "progress"]
    assert steps == sorted(steps), steps
    assert (2, 60) in steps and (3, 80) in steps
    assert (1, 20) not in steps and (2, 50) not in steps


async def test_the_normal_close_reaches_a_client_that_reads_late(client):
    """The server's close (1000) waits for the client's close frame: a client that reads its
    messages a little later still sees 1000, not a dropped connection (1006)."""
    sid = await upload_all(client, "speech.wav", SPEECH, CHUNK)
    assert (await client.post(f"/upload/chunked/{sid}/finalize")).status == 200
    ws = await client.ws_connect(f"/ws/tasks/{sid}")
    await asyncio.sleep(0.5)  # the stream is over before the client reads anything
    messages = []
    async for msg in ws:
        messages.append(msg.json())
    assert messages[-1]["stage"] == "complete"
    assert ws.close_code == 1000
