"""Progress and hand-off across real chunkd processes: two on one folder, and kill -9."""

from __future__ import annotations

import asyncio

import aiohttp
import orjson

from conftest import MEDIA, chunks_of, session_body, sha256
from whisperx_double import RESULT, WhisperXDouble

SPEECH = (MEDIA / "speech.wav").read_bytes()
CHUNK = 8 * 1024


async def messages(ws: aiohttp.ClientWebSocketResponse, out: list[dict]) -> list[dict]:
    async for msg in ws:
        if msg.type == aiohttp.WSMsgType.TEXT:
            out.append(orjson.loads(msg.data))
    return out


async def create(http: aiohttp.ClientSession, url: str, data: bytes, **extra) -> str:
    async with http.post(f"{url}/upload/chunked/session",
                         json=session_body("speech.wav", len(data), CHUNK, **extra)) as resp:
        assert resp.status == 201, await resp.text()
        return (await resp.json())["session_id"]


async def send(http: aiohttp.ClientSession, url: str, sid: str, i: int, body: bytes) -> None:
    async with http.post(f"{url}/upload/chunked/{sid}/chunk", params={"index": str(i)}, data=body,
                         headers={"Content-Type": "application/octet-stream"}) as resp:
        assert resp.status == 200, await resp.text()


async def test_subscriber_on_one_process_sees_chunks_sent_to_the_other(server_factory):
    a, b = server_factory(), server_factory()
    parts = chunks_of(SPEECH, CHUNK)
    async with aiohttp.ClientSession() as http:
        sid = await create(http, a.url, SPEECH)
        ws = await http.ws_connect(f"{a.url}/ws/tasks/{sid}")
        seen: list[dict] = []
        follow = asyncio.create_task(messages(ws, seen))
        for i, part in enumerate(parts):
            await send(http, b.url, sid, i, part)  # every chunk goes to B
        for _ in range(50):
            if any(m.get("uploaded_chunks") == len(parts) for m in seen):
                break
            await asyncio.sleep(0.1)
        await ws.close()
        await follow
    counts = [m["uploaded_chunks"] for m in seen if m["type"] == "upload_progress"]
    assert counts[0] == 0 and counts[-1] == len(parts)
    assert counts == sorted(counts)


async def test_kill9_while_transcribing_resumes_the_same_task(server_factory, aiohttp_server):
    hold = asyncio.Event()
    double = WhisperXDouble(hold=hold)
    service = await aiohttp_server(double.app(), host="127.0.0.1")
    url = str(service.make_url("")).rstrip("/")
    args = ("--handoff", "whisperx", "--whisperx-url", url, "--whisperx-poll-interval", "0.1")
    first = server_factory(*args)
    parts = chunks_of(SPEECH, CHUNK)
    async with aiohttp.ClientSession() as http:
        sid = await create(http, first.url, SPEECH, language="en", model="small")
        for i, part in enumerate(parts):
            await send(http, first.url, sid, i, part)
        async with http.post(f"{first.url}/upload/chunked/{sid}/finalize") as resp:
            assert resp.status == 200
            task_id = (await resp.json())["task_id"]
        for _ in range(100):  # wait until the service is "transcribing" and being polled
            if double.tasks and next(iter(double.tasks.values())).looks >= 3:
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("chunkd never polled the service")
        first.kill9()

        second = server_factory(*args)  # same folder; resumes the task at start
        ws = await http.ws_connect(f"{second.url}/ws/tasks/{task_id}")
        seen: list[dict] = []
        follow = asyncio.create_task(messages(ws, seen))
        await asyncio.sleep(0.5)
        hold.set()
        await asyncio.wait_for(follow, 30)
    final = seen[-1]
    assert final["type"] == "progress" and final["stage"] == "complete"
    assert final["task_id"] == task_id and final["result"] == RESULT
    assert double.posts == 1 and len(double.submissions) == 1
    assert double.submissions[0]["sha256"] == sha256(SPEECH)
    assert double.submissions[0]["params"] == {"language": "en", "model": "small"}


async def test_real_speech_all_the_way_through_chunkd_serve(server_factory, aiohttp_server):
    double = WhisperXDouble(variant="fork", token="t0k3n", step_seconds=0.3)
    service = await aiohttp_server(double.app(), host="127.0.0.1")
    url = str(service.make_url("")).rstrip("/")
    srv = server_factory("--handoff", "whisperx", "--whisperx-url", url,
                         "--whisperx-poll-interval", "0.1",
                         env={"CHUNKD_WHISPERX_TOKEN": "t0k3n"})
    data = (MEDIA / "speech.mp3").read_bytes()
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{srv.url}/upload/chunked/session", json=session_body(
                "speech.mp3", len(data), CHUNK, language="en", model="large-v3",
                task_params={"task": "transcribe", "min_speakers": 1, "max_speakers": 2,
                             "batch_size": 4, "compute_type": "int8"})) as resp:
            sid = (await resp.json())["session_id"]
        ws = await http.ws_connect(f"{srv.url}/ws/tasks/{sid}")
        seen: list[dict] = []
        follow = asyncio.create_task(messages(ws, seen))
        for i, part in enumerate(chunks_of(data, CHUNK)):
            await send(http, srv.url, sid, i, part)
        async with http.post(f"{srv.url}/upload/chunked/{sid}/finalize") as resp:
            assert resp.status == 200
        await asyncio.wait_for(follow, 30)
    assert seen[-1]["stage"] == "complete"
    stages = [m["stage"] for m in seen if m["type"] == "progress"]
    distinct = [s for i, s in enumerate(stages) if i == 0 or stages[i - 1] != s]
    assert distinct[-4:] == ["transcribing", "aligning", "diarizing", "complete"]
    sub = double.submissions[0]
    assert sub["sha256"] == sha256(data) and sub["content_type"] == "audio/mpeg"
    assert sub["params"] == {"language": "en", "model": "large-v3", "task": "transcribe",
                             "min_speakers": "1", "max_speakers": "2", "batch_size": "4",
                             "compute_type": "int8"}


async def test_sigterm_closes_sockets_with_going_away(server_factory):
    srv = server_factory()
    async with aiohttp.ClientSession() as http:
        sid = await create(http, srv.url, SPEECH)
        ws = await http.ws_connect(f"{srv.url}/ws/tasks/{sid}")
        first = await asyncio.wait_for(ws.receive(), 5)
        assert orjson.loads(first.data)["type"] == "upload_progress"
        assert srv.proc is not None
        srv.proc.send_signal(15)
        msg = await asyncio.wait_for(ws.receive(), 10)
        assert msg.type == aiohttp.WSMsgType.CLOSE
        assert ws.close_code == 1001
    srv.proc.wait(20)
    assert srv.proc.returncode == 0
