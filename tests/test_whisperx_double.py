"""The whisperX-FastAPI double speaks the real service's protocol (both variants), over real HTTP."""

from __future__ import annotations

import asyncio
import re
import time

import aiohttp
import pytest

from conftest import MEDIA
from whisperx_double import RESULT, WhisperXDouble

SPEECH = (MEDIA / "speech.wav").read_bytes()
INT_MSG = "Input should be a valid integer, unable to parse string as an integer"


def upload(name: str = "speech.wav", data: bytes = SPEECH) -> aiohttp.FormData:
    form = aiohttp.FormData()
    form.add_field("file", data, filename=name, content_type="application/octet-stream")
    return form


@pytest.fixture
def serve(aiohttp_client):
    async def start(double: WhisperXDouble):
        return await aiohttp_client(double.app())
    return start


async def until(check, timeout: float = 2.0, every: float = 0.005):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = await check()
        if got:
            return got
        await asyncio.sleep(every)
    raise AssertionError("condition not met in time")


async def post(client, headers=None, params=None, name="speech.wav", data=SPEECH):
    return await client.post("/speech-to-text", data=upload(name, data), params=params,
                             headers=headers or {})


async def submit(client, headers=None, params=None) -> str:
    resp = await post(client, headers, params)
    assert resp.status == 200, await resp.text()
    body = await resp.json()
    assert body["message"] == "Task queued"
    return body["identifier"]


async def test_upstream_queued_processing_completed_and_no_progress_route(serve):
    double = WhisperXDouble(queue_seconds=0.1, step_seconds=0.01)
    client = await serve(double)
    params = {"language": "en", "model": "large-v3", "min_speakers": "1", "max_speakers": "2"}
    ident = await submit(client, params=params)
    seen = [(await (await client.get(f"/task/{ident}")).json())["status"]]

    async def finished():
        doc = await (await client.get(f"/task/{ident}")).json()
        seen.append(doc["status"])
        return doc if doc["status"] == "completed" else None

    doc = await until(finished)
    assert seen[0] == "queued" and "processing" in seen
    assert seen.index("processing") > seen.index("queued")
    assert doc["result"] == RESULT and "language" not in doc["result"]
    assert doc["error"] is None
    meta = doc["metadata"]
    assert meta["file_name"] == "speech.wav" and meta["audio_duration"] == 6.4
    assert meta["task_params"]["model"] == "large-v3" and meta["task_params"]["device"] == "cuda"
    assert meta["task_params"]["asr_options"]["suppress_tokens"] == [-1]
    assert double.submissions[0]["params"] == params  # single keys stay strings
    assert double.submissions[0]["user"] is None
    assert double.tasks[ident].looks == len(seen)

    resp = await client.get(f"/tasks/{ident}/progress")
    assert resp.status == 404 and await resp.json() == {"detail": "Not Found"}
    with pytest.raises(aiohttp.WSServerHandshakeError) as info:
        await client.ws_connect(f"/ws/tasks/{ident}")
    assert info.value.status == 403
    listing = await (await client.get("/task/all")).json()
    assert [t["identifier"] for t in listing["tasks"]] == [ident]


async def test_upstream_unknown_task_and_token(serve):
    client = await serve(WhisperXDouble(token="s3cret"))
    resp = await post(client)
    assert resp.status == 401
    assert await resp.json() == {"detail": "Authentication required"}
    assert resp.headers["WWW-Authenticate"] == 'Bearer realm="whisperx"'
    resp = await client.get("/task/nope", headers={"Authorization": "Bearer s3cret"})
    assert resp.status == 404
    err = (await resp.json())["error"]
    assert err["code"] == "TASK_NOT_FOUND" and err["identifier"] == "nope"
    assert err["correlation_id"] and err["message"]


async def test_fork_stages_and_complete_before_completed(serve):
    double = WhisperXDouble(variant="fork", step_seconds=0.01, complete_window=0.1,
                            decode_seconds=0.1)
    alice = double.add_user("alice")
    client = await serve(double)
    began = time.monotonic()
    ident = await submit(client, alice.bearer())
    assert time.monotonic() - began >= 0.1  # the POST answers after the decode
    seen: list[tuple] = []

    async def done():
        doc = await (await client.get(f"/tasks/{ident}/progress", headers=alice.bearer())).json()
        assert doc["identifier"] == ident and doc["error"] is None
        row = (doc["status"], doc["progress_stage"], doc["progress_percentage"])
        if not seen or seen[-1] != row:
            seen.append(row)
        return row[0] == "completed"

    await until(done, every=0.002)
    assert seen[0] in (("processing", None, 0), ("processing", "queued", 0))
    assert seen[-2:] == [("processing", "complete", 100), ("completed", "complete", 100)]
    pcts = [pct for _, _, pct in seen]
    assert pcts == sorted(pcts) and "queued" not in {s for s, _, _ in seen}
    doc = await (await client.get(f"/task/{ident}", headers=alice.bearer())).json()
    assert doc["result"] == RESULT and doc["metadata"]["task_params"]["model"] == "tiny"
    assert double.submissions[0]["user"] == "alice"


async def test_list_params_are_repeated_keys_and_json_lists_are_422(serve):
    double = WhisperXDouble()
    client = await serve(double)
    ident = await submit(client, params=[("suppress_tokens", "-1"), ("suppress_tokens", "5")])
    assert double.submissions[0]["params"] == {"suppress_tokens": ["-1", "5"]}
    doc = await (await client.get(f"/task/{ident}")).json()
    assert doc["metadata"]["task_params"]["asr_options"]["suppress_tokens"] == [-1, 5]

    resp = await post(client, params={"suppress_tokens": "[-1]"})
    assert resp.status == 422
    assert await resp.json() == {"detail": [{"type": "int_parsing",
                                             "loc": ["query", "suppress_tokens", 0],
                                             "msg": INT_MSG, "input": "[-1]"}]}
    assert double.posts == 2 and len(double.submissions) == 1 and double.answers == [200, 422]


async def test_types_and_enums_are_validated_like_pydantic(serve):
    client = await serve(WhisperXDouble())
    resp = await post(client, params={"model": "huge", "beam_size": "x", "suppress_numerals": "ja",
                                      "vad_onset": "half", "diarize": "whatever",
                                      "return_char_alignments": "YES"})
    assert resp.status == 422
    detail = (await resp.json())["detail"]
    assert [(d["type"], d["loc"]) for d in detail] == [
        ("enum", ["query", "model"]), ("int_parsing", ["query", "beam_size"]),
        ("bool_parsing", ["query", "suppress_numerals"]), ("float_parsing", ["query", "vad_onset"]),
    ]  # unknown keys (diarize) are ignored; "YES" is a boolean
    enum = detail[0]
    assert enum["input"] == "huge"
    assert enum["msg"] == f"Input should be {enum['ctx']['expected']}"
    assert enum["ctx"]["expected"].startswith("'tiny', 'tiny.en', 'base'")
    assert enum["ctx"]["expected"].endswith("'distil-large-v3' or 'nyrahealth/faster_CrisperWhisper'")
    for key, value in (("task", "summarize"), ("device", "tpu"), ("compute_type", "int4"),
                       ("interpolate_method", "cubic")):
        resp = await post(client, params={key: value})
        assert (await resp.json())["detail"][0]["type"] == "enum", key

    resp = await client.post("/speech-to-text", data={"language": "en"})
    assert resp.status == 422
    assert (await resp.json())["detail"] == [
        {"type": "missing", "loc": ["body", "file"], "msg": "Field required", "input": None}]


async def test_extension_and_undecodable_files_are_400(serve):
    double = WhisperXDouble()
    client = await serve(double)
    for name in ("speech.flac", "speech.webm", "not-audio.png"):
        resp = await post(client, name=name, data=(MEDIA / name).read_bytes())
        assert resp.status == 400
        detail = (await resp.json())["detail"]
        assert detail.startswith(f"Invalid file extension for file {name}. Allowed: {{'.mp3', '.wav'")
    for name in ("text-renamed.mp3", "elf-renamed.wav", "archive-renamed.m4a"):
        resp = await post(client, name=name, data=(MEDIA / name).read_bytes())
        assert resp.status == 400, name
        assert (await resp.json())["error"]["code"] == "AUDIO_PROCESSING_ERROR"
    for name in ("speech.mp3", "speech.m4a", "speech.aac", "speech.ogg", "speech.mkv", "speech.mp4"):
        resp = await post(client, name=name, data=(MEDIA / name).read_bytes())
        assert resp.status == 200, name
    double.undecodable = True
    resp = await post(client)
    assert resp.status == 400 and (await resp.json())["error"]["code"] == "AUDIO_PROCESSING_ERROR"


async def test_fork_auth_401_and_csrf(serve):
    double = WhisperXDouble(variant="fork")
    alice = double.add_user("alice")
    client = await serve(double)
    for headers in ({}, {"Authorization": "Bearer whsk_wrong"},
                    {"Authorization": "Bearer whsk_bad", **alice.cookie()},  # bearer wins
                    {"X-API-Key": alice.api_key}):
        resp = await post(client, headers)
        assert resp.status == 401
        assert await resp.json() == {"detail": "Authentication required"}
        assert resp.headers["WWW-Authenticate"] == 'Bearer realm="whisperx"'
    assert (await client.get("/task/all")).status == 401
    assert re.fullmatch(r"whsk_[\w-]{8}_[\w-]{22}", alice.api_key)

    resp = await post(client, alice.cookie(csrf=None))
    assert resp.status == 403 and await resp.json() == {"detail": "CSRF token missing"}
    resp = await post(client, alice.cookie(csrf="forged"))
    assert resp.status == 403 and await resp.json() == {"detail": "CSRF token mismatch"}
    ident = await submit(client, alice.cookie())
    resp = await client.get(f"/task/{ident}", headers=alice.cookie(csrf=None))  # GET: no CSRF
    assert resp.status == 200
    await submit(client, alice.bearer())  # bearer: no CSRF
    assert [s["user"] for s in double.submissions] == ["alice", "alice"]


async def test_fork_ownership_tasks_and_tickets(serve):
    double = WhisperXDouble(variant="fork")
    alice, bob = double.add_user("alice"), double.add_user("bob")
    client = await serve(double)
    ident = await submit(client, alice.bearer())
    for path in (f"/task/{ident}", f"/tasks/{ident}/progress"):
        resp = await client.get(path, headers=bob.bearer())
        assert resp.status == 404
        assert (await resp.json())["error"]["code"] == "TASK_NOT_FOUND"
        assert (await client.get(path, headers=alice.bearer())).status == 200
    resp = await client.post("/api/ws/ticket", json={"task_id": ident}, headers=bob.bearer())
    assert resp.status == 404 and await resp.json() == {"detail": "Task not found"}
    resp = await client.post("/api/ws/ticket", json={"task_id": "nope"}, headers=alice.bearer())
    assert resp.status == 404
    resp = await client.post("/api/ws/ticket", json={}, headers=alice.bearer())
    assert resp.status == 422 and (await resp.json())["detail"][0]["loc"] == ["body", "task_id"]
    mine = await (await client.get("/task/all", headers=alice.bearer())).json()
    theirs = await (await client.get("/task/all", headers=bob.bearer())).json()
    assert [t["identifier"] for t in mine["tasks"]] == [ident] and theirs["tasks"] == []


async def ticket(client, user, task_id: str) -> str:
    resp = await client.post("/api/ws/ticket", json={"task_id": task_id}, headers=user.bearer())
    assert resp.status == 201, await resp.text()
    body = await resp.json()
    assert len(body["ticket"]) == 32 and body["expires_at"].endswith("Z")
    return body["ticket"]


async def test_ticket_is_single_use_and_bad_tickets_get_403(serve):
    double = WhisperXDouble(variant="fork")
    alice = double.add_user("alice")
    client = await serve(double)
    first, second = await submit(client, alice.bearer()), await submit(client, alice.bearer())
    tk = await ticket(client, alice, first)
    ws = await client.ws_connect(f"/ws/tasks/{first}?ticket={tk}")
    for url in (f"/ws/tasks/{first}?ticket={tk}",  # used
                f"/ws/tasks/{first}?ticket=garbage", f"/ws/tasks/{first}",
                f"/ws/tasks/{second}?ticket={await ticket(client, alice, first)}"):  # other task
        with pytest.raises(aiohttp.WSServerHandshakeError) as info:
            await client.ws_connect(url)
        assert info.value.status == 403, url
    await ws.close()
    double.ticket_seconds = 0.0
    expired = await ticket(client, alice, first)
    await asyncio.sleep(0.01)
    with pytest.raises(aiohttp.WSServerHandshakeError):
        await client.ws_connect(f"/ws/tasks/{first}?ticket={expired}")


async def test_ws_progress_ping_heartbeat_and_no_close_after_complete(serve):
    hold = asyncio.Event()
    double = WhisperXDouble(variant="fork", hold=hold, step_seconds=0.01, heartbeat_seconds=0.05)
    alice = double.add_user("alice")
    client = await serve(double)
    ident = await submit(client, alice.bearer())
    ws = await client.ws_connect(f"/ws/tasks/{ident}?ticket={await ticket(client, alice, ident)}")
    await ws.send_json({"type": "ping"})
    msgs: list[dict] = []
    while not any(m["type"] == "pong" for m in msgs) or not any(
            m["type"] == "heartbeat" for m in msgs):
        msgs.append(await asyncio.wait_for(ws.receive_json(), 1))
    hold.set()
    while not any(m.get("stage") == "complete" for m in msgs):
        msgs.append(await asyncio.wait_for(ws.receive_json(), 1))
    progress = [m for m in msgs if m["type"] == "progress"]
    assert [(m["stage"], m["percentage"]) for m in progress] == [
        ("queued", 0), ("transcribing", 10), ("aligning", 40), ("diarizing", 60),
        ("diarizing", 80), ("complete", 100)]
    assert all(m["task_id"] == ident and m["message"] == "" for m in progress)
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}\+00:00", m["timestamp"])
               for m in progress)
    assert {"type": "pong"} in msgs
    beat = next(m for m in msgs if m["type"] == "heartbeat")
    assert set(beat) == {"type", "timestamp"}
    await asyncio.sleep(0.1)
    assert not ws.closed  # the service never closes after complete; the client does
    await ws.close()


async def test_ws_late_joiner_gets_the_buffer_once_and_failures(serve):
    double = WhisperXDouble(variant="fork", step_seconds=0.002)
    alice = double.add_user("alice")
    client = await serve(double)
    ident = await submit(client, alice.bearer())
    await until(lambda: asyncio.sleep(0, double.tasks[ident].status == "completed"))
    late = await client.ws_connect(f"/ws/tasks/{ident}?ticket={await ticket(client, alice, ident)}")
    replay = [await asyncio.wait_for(late.receive_json(), 1) for _ in range(6)]
    assert [m["stage"] for m in replay][-1] == "complete"
    again = await client.ws_connect(f"/ws/tasks/{ident}?ticket={await ticket(client, alice, ident)}")
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(again.receive_json(), 0.1)
    await late.close()
    await again.close()

    double.fail_task = "CUDA error: out of memory"
    ident = await submit(client, alice.bearer())
    ws = await client.ws_connect(f"/ws/tasks/{ident}?ticket={await ticket(client, alice, ident)}")
    msgs: list[dict] = []
    while not msgs or msgs[-1]["type"] != "error":
        msgs.append(await asyncio.wait_for(ws.receive_json(), 1))
    error = msgs[-1]
    assert error["error_code"] == "PROCESSING_FAILED" and error["task_id"] == ident
    assert error["user_message"] == "Transcription processing failed. Please try again."
    assert error["technical_detail"] == "CUDA error: out of memory"
    doc = await (await client.get(f"/task/{ident}", headers=alice.bearer())).json()
    assert doc["status"] == "failed" and doc["error"] == "CUDA error: out of memory"
    assert doc["result"] is None
    await ws.close()


async def test_free_tier_403_and_hourly_429(serve):
    double = WhisperXDouble(variant="fork")
    free = double.add_user("free", tier="free")
    client = await serve(double)
    for params, reason in (({"model": "large-v3"}, "Model 'large-v3' not available on your plan"),
                           ({"model": "small", "min_speakers": "2"},
                            "Diarization not available on your plan")):
        resp = await post(client, free.bearer(), params)
        assert resp.status == 403
        err = (await resp.json())["error"]
        assert err["code"] == "FREE_TIER_VIOLATION" and err["message"] == err["reason"] == reason
    double.audio_seconds = 301
    resp = await post(client, free.bearer(), {"model": "tiny"})
    assert (await resp.json())["error"]["reason"] == "File duration 301s exceeds tier limit 300s"
    # the hourly bucket was spent by those three refusals too (the gate is fail-fast, in order)
    for _ in range(2):
        assert (await post(client, free.bearer(), {"model": "large-v3"})).status == 403
    resp = await post(client, free.bearer(), {"model": "tiny"})
    assert resp.status == 429 and resp.headers["Retry-After"] == "60"
    err = (await resp.json())["error"]
    assert err["code"] == "RATE_LIMIT_EXCEEDED" and err["retry_after_seconds"] == 60
    assert double.submissions == []


async def test_concurrency_429_trial_402_and_pro_limits(serve):
    hold = asyncio.Event()
    double = WhisperXDouble(variant="fork", hold=hold, step_seconds=0.002)
    free = double.add_user("free", tier="free")
    expired = double.add_user("late", tier="trial", trial_expired=True)
    pro = double.add_user("pro")
    client = await serve(double)
    first = await submit(client, free.bearer())
    resp = await post(client, free.bearer())
    assert resp.status == 429 and resp.headers["Retry-After"] == "60"
    assert (await resp.json())["error"]["code"] == "CONCURRENCY_LIMIT"
    hold.set()
    await until(lambda: asyncio.sleep(0, double.tasks[first].status == "completed"))
    await submit(client, free.bearer())  # the slot came back

    resp = await post(client, expired.bearer())
    assert resp.status == 402 and (await resp.json())["error"]["code"] == "TRIAL_EXPIRED"
    await submit(client, pro.bearer(), {"model": "large-v3", "min_speakers": "1"})
    resp = await post(client, pro.bearer(), {"model": "large-v3-turbo"})
    assert resp.status == 403  # not in the pro tier's model list either
    double.audio_seconds = 3601
    resp = await post(client, pro.bearer())
    assert (await resp.json())["error"]["reason"] == "File duration 3601s exceeds tier limit 3600s"


async def test_lost_tasks_stay_processing(serve):
    for variant in ("upstream", "fork"):
        double = WhisperXDouble(variant=variant, lose_tasks=True, step_seconds=0.002)
        headers = double.add_user("a").bearer() if variant == "fork" else {}
        client = await serve(double)
        ident = await submit(client, headers)
        await asyncio.sleep(0.1)
        doc = await (await client.get(f"/task/{ident}", headers=headers)).json()
        assert doc["status"] == "processing" and doc["result"] is None
        assert (double.tasks[ident].stage, double.tasks[ident].percentage) == ("transcribing", 10)


async def test_failure_knobs_and_clean_shutdown(serve):
    double = WhisperXDouble(fail_posts=2, reject=None)
    client = await serve(double)
    statuses = [(await post(client)).status for _ in range(3)]
    assert statuses == [503, 503, 200] and double.posts == 3 and len(double.submissions) == 1
    double.reject = (400, {"error": {"code": "AUDIO_PROCESSING_ERROR", "message": "nope"}})
    resp = await post(client)
    assert resp.status == 400 and (await resp.json())["error"]["message"] == "nope"
    double.reject, double.hang = None, True
    with pytest.raises(asyncio.TimeoutError):
        await post_with_timeout(client, 0.2)
    assert double.posts == 5 and len(double.submissions) == 1
    double.hang, double.hold = False, asyncio.Event()  # never set: the task stays running
    await submit(client)
    assert double._running
    await client.close()  # on_cleanup stops the pipeline
    assert not double._running


async def post_with_timeout(client, seconds: float):
    return await client.post("/speech-to-text", data=upload(),
                             timeout=aiohttp.ClientTimeout(total=seconds))


async def test_fork_token_is_a_pro_key(serve):
    double = WhisperXDouble(variant="fork", token="whsk_abcdefgh_0123456789012345678901")
    client = await serve(double)
    headers = {"Authorization": f"Bearer {double.token}"}
    await submit(client, headers, {"model": "large-v3", "min_speakers": "1"})
    assert double.submissions[0]["user"] == "token"
    assert (await post(client)).status == 401
