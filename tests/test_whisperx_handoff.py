"""The WhisperX hand-off against the faithful double (both real variants): the protocol bugs
D1-D8 found against the real service, the identifier in the open, acting as the user, and the
/ws/tasks relay for ids chunkd does not know."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import aiohttp
import orjson
import pytest
from aiohttp import web

from chunkd.core.tasks import retry_task
from chunkd.keys import STORE
from conftest import MEDIA, chunks_of, create_session, http_upload, put_chunk, session_body
from test_progress import CHUNK, SPEECH, chunkd_client, collect, stages
from whisperx_double import RESULT, WhisperXDouble

ORDER = ["queued", "transcribing", "aligning", "diarizing", "complete"]


async def whisperx_client(aiohttp_client, tmp_path, double: WhisperXDouble, url: str, **cfg):
    return await chunkd_client(aiohttp_client, tmp_path, handoff="whisperx", whisperx_url=url,
                               **cfg)


async def run_upload(client, name: str = "speech.wav", data: bytes = SPEECH,
                     headers: dict[str, str] | None = None, **session) -> tuple[str, list[dict]]:
    """Upload, finalize (with ``headers``), and return what a subscriber from the start saw."""
    sid = (await create_session(client, name, data, CHUNK, **session))["session_id"]
    ws = await client.ws_connect(f"/ws/tasks/{sid}")
    follow = asyncio.create_task(collect(ws))
    for i, part in enumerate(chunks_of(data, CHUNK)):
        assert (await put_chunk(client, sid, i, part)).status == 200
    resp = await client.post(f"/upload/chunked/{sid}/finalize", headers=headers or {})
    assert resp.status == 200, await resp.text()
    return sid, await asyncio.wait_for(follow, 30)


async def status_of(client, sid: str) -> dict:
    return await (await client.get(f"/upload/chunked/{sid}/status")).json()


async def submit_directly(url: str, headers: dict[str, str], name: str = "direct.wav",
                          **params: str) -> str:
    """What the fork's frontend does for a small file: POST it to the service itself."""
    async with aiohttp.ClientSession() as http:
        form = aiohttp.FormData()
        form.add_field("file", SPEECH, filename=name, content_type="audio/wav")
        async with http.post(f"{url}/speech-to-text", data=form, headers=headers,
                             params=params) as resp:
            assert resp.status == 200, await resp.text()
            return str((await resp.json())["identifier"])


async def ticket_for(url: str, headers: dict[str, str], identifier: str) -> str:
    """The fork's one-use WebSocket ticket for a task."""
    async with aiohttp.ClientSession() as http, http.post(
            f"{url}/api/ws/ticket", json={"task_id": identifier}, headers=headers) as resp:
        assert resp.status == 201, await resp.text()
        return str((await resp.json())["ticket"])


# -- D1: lists as repeated query keys --------------------------------------------------------

async def test_list_params_go_as_repeated_keys(aiohttp_client, double_url, tmp_path):
    double = WhisperXDouble()
    client = await whisperx_client(aiohttp_client, tmp_path, double, await double_url(double))
    _, msgs = await run_upload(client, task_params={"suppress_tokens": [-1, 5],
                                                    "suppress_numerals": True})
    assert msgs[-1]["stage"] == "complete", msgs[-1]
    params = double.submissions[0]["params"]
    assert params["suppress_tokens"] == ["-1", "5"]
    assert params["suppress_numerals"] == "true"


async def test_service_validation_errors_are_reported_readably(aiohttp_client, double_url, tmp_path):
    double = WhisperXDouble()
    client = await whisperx_client(aiohttp_client, tmp_path, double, await double_url(double))
    _, msgs = await run_upload(client, model="large-v9")
    final = msgs[-1]
    assert final["type"] == "error" and final["error_code"] == "validation_error"
    assert "model" in final["user_message"]


# -- D2: the service's own extension list ----------------------------------------------------

@pytest.mark.parametrize("name", ["speech.flac", "speech.webm", "talk.opus", "clip.m4v"])
async def test_whisperx_mode_refuses_what_the_service_refuses_before_the_upload(
        aiohttp_client, tmp_path, name):
    client = await chunkd_client(aiohttp_client, tmp_path, handoff="whisperx",
                                 whisperx_url="http://127.0.0.1:9")
    resp = await client.post("/upload/chunked/session", json=session_body(name, 10_000, CHUNK))
    assert resp.status == 422
    err = (await resp.json())["error"]
    assert err["code"] == "extension_not_allowed"
    assert "flac" not in err["allowed_extensions"] and "awb" in err["allowed_extensions"]


async def test_the_extension_list_stays_configurable(aiohttp_client, tmp_path):
    client = await chunkd_client(aiohttp_client, tmp_path, handoff="whisperx",
                                 whisperx_url="http://127.0.0.1:9",
                                 allowed_extensions=frozenset({"flac", "wav"}))
    resp = await client.post("/upload/chunked/session",
                             json=session_body("speech.flac", 10_000, CHUNK))
    assert resp.status == 201


# -- D3: a task the service lost ends -------------------------------------------------------

async def test_a_lost_task_ends_with_a_clear_error_and_retry_resends(aiohttp_client, double_url,
                                                                      tmp_path):
    double = WhisperXDouble(variant="fork", token="t0k3n", lose_tasks=True, audio_seconds=0.1)
    client = await whisperx_client(aiohttp_client, tmp_path, double, await double_url(double),
                                   whisperx_token="t0k3n", whisperx_stall_timeout=1.0)
    sid, msgs = await run_upload(client)
    final = msgs[-1]
    assert final["type"] == "error" and final["error_code"] == "service_stalled"
    first = double.submissions[0]["identifier"]
    assert final["identifier"] == first and first in final["user_message"]
    assert "chunkd retry" in final["user_message"]

    double.lose_tasks = False  # the service is healthy again
    await retry_task(client.server.app[STORE], final["task_id"], ("submit",))
    ws = await client.ws_connect(f"/ws/tasks/{sid}")
    again = await asyncio.wait_for(collect(ws), 30)
    assert again[-1]["stage"] == "complete" and again[-1]["result"] == RESULT
    assert len(double.submissions) == 2 and again[-1]["identifier"] != first


@pytest.mark.parametrize("variant", ["upstream", "fork"])
async def test_a_long_healthy_task_is_not_taken_for_lost(aiohttp_client, double_url, tmp_path,
                                                         variant):
    """Upstream says only "processing" and the fork "transcribing 10" for the whole
    transcription: no change for a while is normal for a long recording, and so is waiting in
    line. The stall deadline grows with the audio's length, and a queued task never stalls."""
    hold = asyncio.Event()
    double = WhisperXDouble(variant=variant, token="t0k3n", hold=hold, audio_seconds=1.0,
                            queue_seconds=1.5 if variant == "upstream" else 0.0)
    client = await whisperx_client(aiohttp_client, tmp_path, double, await double_url(double),
                                   whisperx_token="t0k3n", whisperx_stall_timeout=0.5)
    asyncio.get_running_loop().call_later(2.5, hold.set)  # 1 s of audio: a 3 s limit
    _, msgs = await run_upload(client)
    assert msgs[-1]["type"] == "progress" and msgs[-1]["stage"] == "complete", msgs[-1]


async def test_following_has_an_overall_cap(aiohttp_client, double_url, tmp_path):
    hold = asyncio.Event()  # never set: the task keeps moving... nowhere
    double = WhisperXDouble(hold=hold)
    client = await whisperx_client(aiohttp_client, tmp_path, double, await double_url(double),
                                   whisperx_max_duration=1.0)
    _, msgs = await run_upload(client)
    assert msgs[-1]["type"] == "error" and msgs[-1]["error_code"] == "transcription_timeout"


async def test_polls_that_fail_for_a_while_do_not_fail_the_task(aiohttp_client, double_url,
                                                                tmp_path):
    """A service busy decoding someone's big file times polls out; that is no failure (the
    stall deadline decides), however many in a row."""
    double = WhisperXDouble()
    app = double.app()
    flaky = {"left": 8}

    @web.middleware
    async def failing_polls(request: web.Request, handler):
        if request.path.startswith("/task/") and flaky["left"] > 0:
            flaky["left"] -= 1
            if flaky["left"] % 2:  # a proxy's maintenance page, with a 200
                return web.Response(text="<html>maintenance</html>", content_type="text/html")
            return web.json_response({"error": {"message": "An internal error occurred",
                                                "code": "INTERNAL_ERROR"}}, status=500)
        return await handler(request)

    app.middlewares.append(failing_polls)
    client = await whisperx_client(aiohttp_client, tmp_path, double,
                                   await double_url(Serving(app)), handoff_retries=3)
    _, msgs = await run_upload(client)
    assert msgs[-1]["stage"] == "complete", msgs[-1]
    assert flaky["left"] == 0


class Serving:
    """Something ``double_url`` can start: an app built here."""

    def __init__(self, app: web.Application) -> None:
        self._app = app

    def app(self) -> web.Application:
        return self._app


# -- D4: 429 / Retry-After -------------------------------------------------------------------

async def test_retry_after_is_honoured_not_a_tight_resend_loop(aiohttp_client, double_url,
                                                               tmp_path):
    hold = asyncio.Event()  # ann's first task runs until this is set
    double = WhisperXDouble(variant="fork", concurrency_retry_after=1, hold=hold)
    user = double.add_user("ann", tier="free")  # one at a time
    url = await double_url(double)
    asyncio.get_running_loop().call_later(1.5, hold.set)
    await submit_directly(url, user.bearer(), model="tiny")  # it occupies ann's one slot
    client = await whisperx_client(aiohttp_client, tmp_path, double, url,
                                   whisperx_token=user.api_key, handoff_retries=5)
    _, msgs = await run_upload(client, model="tiny")
    assert msgs[-1]["stage"] == "complete", msgs[-1]
    refused = [a for a in double.answers if a == 429]
    assert 1 <= len(refused) <= 3  # waited Retry-After (1 s) each time, not 1-2-4-8 backoff
    assert any("busy" in m.get("message", "") for m in msgs if m["type"] == "progress")


async def test_retry_after_within_the_window_outlasts_the_retry_count(aiohttp_client,
                                                                     double_url, tmp_path):
    """The service said when to come back: that is bounded by the window, not by the tries."""
    hold = asyncio.Event()
    double = WhisperXDouble(variant="fork", concurrency_retry_after=1, hold=hold)
    user = double.add_user("ann", tier="pro")
    url = await double_url(double)
    for n in range(3):  # three of ann's own fill her 3 slots
        await submit_directly(url, user.bearer(), f"{n}.wav")
    client = await whisperx_client(aiohttp_client, tmp_path, double, url,
                                   whisperx_token=user.api_key, handoff_retries=2)
    asyncio.get_running_loop().call_later(3.2, hold.set)
    _, msgs = await run_upload(client)
    assert msgs[-1]["stage"] == "complete", msgs[-1]
    assert double.answers.count(429) >= 3  # more waits than --handoff-retries


@pytest.mark.parametrize("status", [500, 502, 504])
async def test_an_answer_that_may_follow_acceptance_is_not_resent(aiohttp_client, double_url,
                                                                   tmp_path, status):
    """A 500, or a gateway's 502/504, may come after the service took the file: sending it
    again could make a second task, so it is reported (chunkd retry sends it again)."""
    double = WhisperXDouble()
    app = double.app()
    posts = []

    @web.middleware
    async def gateway(request: web.Request, handler):
        if request.method == "POST":
            posts.append(await request.read())
            return web.json_response({"detail": "upstream timed out"}, status=status)
        return await handler(request)

    app.middlewares.append(gateway)
    client = await whisperx_client(aiohttp_client, tmp_path, double,
                                   await double_url(Serving(app)), handoff_retries=5)
    _, msgs = await run_upload(client)
    assert msgs[-1]["type"] == "error" and msgs[-1]["error_code"] == f"http_{status}"
    assert len(posts) == 1


async def test_a_long_retry_after_ends_at_once_with_service_busy(aiohttp_client, double_url,
                                                                  tmp_path):
    double = WhisperXDouble(variant="fork", concurrency_retry_after=3600, hold=asyncio.Event())
    user = double.add_user("ann", tier="free")
    url = await double_url(double)
    await submit_directly(url, user.bearer(), model="tiny")
    client = await whisperx_client(aiohttp_client, tmp_path, double, url,
                                   whisperx_token=user.api_key, handoff_retries=5)
    posts_before = double.posts
    _, msgs = await run_upload(client, model="tiny")
    final = msgs[-1]
    assert final["type"] == "error" and final["error_code"] == "service_busy"
    assert "3600" in final["user_message"]
    assert double.posts - posts_before == 1  # the file went out once, not five times


# -- D5: stages never go backwards -----------------------------------------------------------

async def test_stages_never_go_backwards_on_the_fork(aiohttp_client, double_url, tmp_path):
    double = WhisperXDouble(variant="fork", token="t0k3n", complete_window=0.6,
                            step_seconds=0.15)
    client = await whisperx_client(aiohttp_client, tmp_path, double, await double_url(double),
                                   whisperx_token="t0k3n")
    _, msgs = await run_upload(client)
    seen = stages(msgs)
    assert seen == sorted(seen, key=ORDER.index), seen
    assert {"aligning", "diarizing"} <= set(seen)
    pcts = [(ORDER.index(m["stage"]), m["percentage"]) for m in msgs if m["type"] == "progress"]
    assert pcts == sorted(pcts)
    # progress_stage is null until the worker starts: that is no stage, not "transcribing 0"
    assert (ORDER.index("transcribing"), 0) not in pcts
    assert double.tasks[double.submissions[0]["identifier"]].progress_looks > 0


# -- D6: errors for people -------------------------------------------------------------------

@pytest.mark.parametrize("raw, code", [
    ("CUDA out of memory. Tried to allocate 2.00 GiB", "transcription_out_of_memory"),
    ("RuntimeError: ffmpeg exited with 1", "transcription_failed"),
])
async def test_a_failed_task_speaks_to_people(aiohttp_client, double_url, tmp_path, raw, code):
    double = WhisperXDouble(fail_task=raw)
    client = await whisperx_client(aiohttp_client, tmp_path, double, await double_url(double))
    sid, msgs = await run_upload(client)
    final = msgs[-1]
    assert final["type"] == "error" and final["error_code"] == code
    assert raw in final["technical_detail"]
    assert raw not in final["user_message"] and "Error" not in final["user_message"]
    doc = await status_of(client, sid)
    assert doc["status"] == "failed" and doc["error"]["code"] == code


# -- D7: language and defaults ---------------------------------------------------------------

async def test_auto_language_is_the_services_default_and_defaults_apply(aiohttp_client,
                                                                       double_url, tmp_path):
    double = WhisperXDouble()
    client = await whisperx_client(
        aiohttp_client, tmp_path, double, await double_url(double),
        whisperx_defaults=(("device", "cpu"), ("compute_type", "int8"), ("batch_size", "4"),
                           ("suppress_tokens", "-1"), ("suppress_tokens", "50")))
    _, msgs = await run_upload(client, language="auto", task_params={"batch_size": 2})
    assert msgs[-1]["stage"] == "complete", msgs[-1]
    params = double.submissions[0]["params"]
    assert "language" not in params  # "auto" is no language code; the service picks its default
    assert params["device"] == "cpu" and params["compute_type"] == "int8"
    assert params["batch_size"] == "2"  # the session's own value wins
    assert params["suppress_tokens"] == ["-1", "50"]  # a repeated default stays a list


# -- the identifier in the open --------------------------------------------------------------

async def test_the_service_identifier_is_in_progress_status_and_final(aiohttp_client, double_url,
                                                                     tmp_path):
    double = WhisperXDouble(variant="fork", token="t0k3n")
    client = await whisperx_client(aiohttp_client, tmp_path, double, await double_url(double),
                                   whisperx_token="t0k3n")
    sid, msgs = await run_upload(client)
    identifier = double.submissions[0]["identifier"]
    progress = [m for m in msgs if m["type"] == "progress"]
    assert progress[-1]["identifier"] == identifier
    assert any(m.get("identifier") == identifier for m in progress if m["stage"] != "complete")
    assert (await status_of(client, sid))["task"]["identifier"] == identifier


# -- D8: a service URL behind Cloudflare -----------------------------------------------------

def _serve(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "chunkd", "serve", "--port", "0", *args],
                          capture_output=True, text=True, timeout=30)


async def test_a_service_url_behind_cloudflare_is_refused_at_start(aiohttp_server, tmp_path):
    async def page(request: web.Request) -> web.Response:
        return web.Response(status=403, headers={"Server": "cloudflare",
                                                 "CF-RAY": "8c0ffee0c0ffee00-FRA"})
    app = web.Application()
    app.router.add_get("/", page)
    proxy = await aiohttp_server(app, host="127.0.0.1")
    url = str(proxy.make_url("")).rstrip("/")
    done = await asyncio.to_thread(_serve, "--data-dir", str(tmp_path / "d"), "--handoff",
                                   "whisperx", "--whisperx-url", url)
    assert done.returncode == 2
    assert "Cloudflare" in done.stderr and "internal origin" in done.stderr


async def test_an_unreachable_service_is_only_a_warning(server_factory, unused_tcp_port):
    srv = server_factory("--handoff", "whisperx",
                         "--whisperx-url", f"http://127.0.0.1:{unused_tcp_port}")
    assert any("warning: cannot reach the WhisperX service" in line for line in srv.banner)


# -- acting as the user ----------------------------------------------------------------------

async def test_each_user_submits_as_themselves(aiohttp_client, double_url, tmp_path):
    double = WhisperXDouble(variant="fork")
    ann, bob = double.add_user("ann"), double.add_user("bob")
    url = await double_url(double)
    client = await whisperx_client(aiohttp_client, tmp_path, double, url,
                                   whisperx_credentials="user")
    (_, ann_msgs), (_, bob_msgs) = await asyncio.gather(
        run_upload(client, "ann.wav", headers=ann.bearer()),
        run_upload(client, "bob.wav", headers=bob.cookie()))
    for msgs in (ann_msgs, bob_msgs):
        assert msgs[-1]["stage"] == "complete", msgs[-1]
    owners = {s["filename"]: s["user"] for s in double.submissions}
    assert owners == {"ann.wav": "ann", "bob.wav": "bob"}
    async with aiohttp.ClientSession() as http:
        ann_task = ann_msgs[-1]["identifier"]
        async with http.get(f"{url}/task/{ann_task}", headers=bob.bearer()) as resp:
            assert resp.status == 404  # bob cannot read ann's task
        async with http.get(f"{url}/task/{ann_task}", headers=ann.bearer()) as resp:
            assert resp.status == 200 and (await resp.json())["result"] == RESULT


@pytest.mark.parametrize("headers", [
    {},
    {"Cookie": "__cf_bm=abc; theme=dark"},  # the origin's other cookies are no credential
    {"Cookie": "session=s3ss10n; csrf_token=t0k"},  # a cookie without X-CSRF-Token cannot POST
    {"Authorization": "Basic dXNlcjpwYXNz"},
], ids=["none", "other-cookies", "no-csrf", "basic"])
async def test_user_mode_finalize_needs_a_credential(aiohttp_client, double_url, tmp_path,
                                                     headers):
    double = WhisperXDouble(variant="fork")
    client = await whisperx_client(aiohttp_client, tmp_path, double, await double_url(double),
                                   whisperx_credentials="user")
    sid = (await create_session(client, "speech.wav", SPEECH, CHUNK))["session_id"]
    for i, part in enumerate(chunks_of(SPEECH, CHUNK)):
        await put_chunk(client, sid, i, part)
    resp = await client.post(f"/upload/chunked/{sid}/finalize", headers=headers)
    assert resp.status == 401
    assert (await resp.json())["error"]["code"] == "credential_required"
    assert (await status_of(client, sid))["status"] == "complete"  # nothing lost: ask again
    assert double.posts == 0


def test_only_the_services_cookies_are_forwarded():
    from chunkd.handoff.whisperx import user_credential

    got = user_credential({"Cookie": "__cf_bm=cf; session=jwt.x.y; theme=dark; csrf_token=c5",
                           "X-CSRF-Token": "c5"})
    assert got is not None and dict(got.headers) == {"Cookie": "session=jwt.x.y; csrf_token=c5",
                                                     "X-CSRF-Token": "c5"}
    assert "jwt" not in repr(got)
    bearer = user_credential({"Authorization": "Bearer whsk_1", "Cookie": "session=s"})
    assert bearer is not None and dict(bearer.headers) == {"Authorization": "Bearer whsk_1"}


async def test_user_mode_a_failed_task_is_sent_again_by_finalizing_again(aiohttp_client,
                                                                          double_url, tmp_path):
    """`chunkd retry` has no user credential; the user's own new finalize brings one."""
    double = WhisperXDouble(variant="fork", fail_task="CUDA out of memory")
    ann = double.add_user("ann")
    client = await whisperx_client(aiohttp_client, tmp_path, double, await double_url(double),
                                   whisperx_credentials="user")
    sid, msgs = await run_upload(client, headers=ann.bearer())
    assert msgs[-1]["error_code"] == "transcription_out_of_memory"
    task_id = msgs[-1]["task_id"]

    await retry_task(client.server.app[STORE], task_id, ("submit",))  # the operator's retry
    ws = await client.ws_connect(f"/ws/tasks/{sid}")
    again = await asyncio.wait_for(collect(ws), 30)
    assert again[-1]["error_code"] == "credential_lost"
    assert "finalize the session again" in again[-1]["user_message"]

    double.fail_task = None
    resp = await client.post(f"/upload/chunked/{sid}/finalize", headers=ann.bearer())
    assert resp.status == 200 and (await resp.json())["task_id"] == task_id
    ws = await client.ws_connect(f"/ws/tasks/{sid}")
    third = await asyncio.wait_for(collect(ws), 30)
    assert third[-1]["stage"] == "complete" and third[-1]["result"] == RESULT
    assert (await status_of(client, sid))["task"]["attempt"] == 3
    assert [s["user"] for s in double.submissions] == ["ann", "ann"]


async def test_a_wrong_csrf_token_is_the_services_refusal(aiohttp_client, double_url, tmp_path):
    double = WhisperXDouble(variant="fork")
    ann = double.add_user("ann")
    client = await whisperx_client(aiohttp_client, tmp_path, double, await double_url(double),
                                   whisperx_credentials="user")
    _, msgs = await run_upload(client, headers=ann.cookie(csrf="forged"))
    final = msgs[-1]
    assert final["type"] == "error" and "CSRF" in final["user_message"], final
    assert double.submissions == []


async def upload_over_http(http: aiohttp.ClientSession, url: str, headers: dict[str, str]
                           ) -> str:
    """Upload SPEECH to a chunkd process and finalize it with ``headers``; the session id."""
    sid = await http_upload(http, url, "speech.wav", SPEECH, CHUNK)
    async with http.post(f"{url}/upload/chunked/{sid}/finalize", headers=headers) as resp:
        assert resp.status == 200
    return sid


async def test_credentials_never_reach_the_disk_or_the_log(server_factory, aiohttp_server,
                                                           tmp_path):
    double = WhisperXDouble(variant="fork")
    ann = double.add_user("ann")
    service = await aiohttp_server(double.app(), host="127.0.0.1")
    url = str(service.make_url("")).rstrip("/")
    srv = server_factory("--handoff", "whisperx", "--whisperx-url", url,
                         "--whisperx-credentials", "user", "--whisperx-poll-interval", "0.05",
                         "--log-level", "debug")
    async with aiohttp.ClientSession() as http:
        sid = await upload_over_http(http, srv.url, ann.cookie())
        ws = await http.ws_connect(f"{srv.url}/ws/tasks/{sid}")
        msgs = await asyncio.wait_for(collect(ws), 30)
    assert msgs[-1]["stage"] == "complete"
    log = srv.terminate()
    secrets = [ann.session, ann.csrf, ann.api_key]
    for path in srv.data_dir.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert not any(s.encode() in data for s in secrets), path
    assert not any(s in log for s in secrets)
    assert double.submissions[0]["user"] == "ann"


async def test_after_a_restart_user_mode_reports_the_identifier_honestly(
        server_factory, aiohttp_server):
    hold = asyncio.Event()
    double = WhisperXDouble(variant="fork", hold=hold)
    ann = double.add_user("ann")
    service = await aiohttp_server(double.app(), host="127.0.0.1")
    url = str(service.make_url("")).rstrip("/")
    args = ("--handoff", "whisperx", "--whisperx-url", url, "--whisperx-credentials", "user",
            "--whisperx-poll-interval", "0.05")
    first = server_factory(*args)
    async with aiohttp.ClientSession() as http:
        sid = await upload_over_http(http, first.url, ann.bearer())
        for _ in range(200):
            if double.tasks and next(iter(double.tasks.values())).looks >= 2:
                break
            await asyncio.sleep(0.05)
        first.kill9()
        second = server_factory(*args)
        ws = await http.ws_connect(f"{second.url}/ws/tasks/{sid}")
        msgs = await asyncio.wait_for(collect(ws), 30)
    final = msgs[-1]
    identifier = double.submissions[0]["identifier"]
    assert final["type"] == "error" and final["error_code"] == "not_followable"
    assert final["identifier"] == identifier and identifier in final["user_message"]
    assert double.posts == 1  # never submitted again, never as someone else


# -- one route prefix: /ws/tasks/* for the service's own tasks -------------------------------

async def test_unknown_ids_are_relayed_to_the_services_socket(aiohttp_client, double_url,
                                                              tmp_path):
    double = WhisperXDouble(variant="fork", step_seconds=0.1)
    ann = double.add_user("ann")
    url = await double_url(double)
    client = await whisperx_client(aiohttp_client, tmp_path, double, url)
    identifier = await submit_directly(url, ann.bearer())
    good = await ticket_for(url, ann.bearer(), identifier)
    ws = await client.ws_connect(f"/ws/tasks/{identifier}?ticket={good}")
    got: list[dict] = []
    while not any(m.get("stage") == "complete" for m in got):
        msg = await asyncio.wait_for(ws.receive(), 10)
        assert msg.type == aiohttp.WSMsgType.TEXT, msg
        got.append(orjson.loads(msg.data))
    await ws.send_str('{"type": "ping"}')
    while orjson.loads((await asyncio.wait_for(ws.receive(), 10)).data)["type"] != "pong":
        pass
    await ws.close()
    assert {m["task_id"] for m in got if m["type"] == "progress"} == {identifier}

    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:  # the ticket is used up
        await client.ws_connect(f"/ws/tasks/{identifier}?ticket={good}")
    assert refused.value.status == 403


async def test_the_frontend_follows_a_chunkd_task_on_the_service(aiohttp_client, double_url,
                                                                 tmp_path):
    """F2-F5 together, as the fork's frontend does it: the task chunkd handed off as the user is
    the user's on the service, so with the identifier chunkd reports the browser gets a ticket,
    follows the service's own socket through chunkd's /ws/tasks, and reads the transcript."""
    hold = asyncio.Event()
    double = WhisperXDouble(variant="fork", hold=hold)
    ann = double.add_user("ann")
    url = await double_url(double)
    client = await whisperx_client(aiohttp_client, tmp_path, double, url,
                                   whisperx_credentials="user")
    sid = (await create_session(client, "speech.wav", SPEECH, CHUNK))["session_id"]
    for i, part in enumerate(chunks_of(SPEECH, CHUNK)):
        await put_chunk(client, sid, i, part)
    assert (await client.post(f"/upload/chunked/{sid}/finalize", headers=ann.cookie())).status == 200
    for _ in range(200):
        identifier = (await status_of(client, sid)).get("task", {}).get("identifier")
        if identifier:
            break
        await asyncio.sleep(0.05)
    assert identifier
    async with aiohttp.ClientSession() as http:
        ticket = await ticket_for(url, ann.cookie(), identifier)
        ws = await client.ws_connect(f"/ws/tasks/{identifier}?ticket={ticket}",
                                     headers={"Cookie": ann.cookie()["Cookie"]})
        hold.set()
        got: list[dict] = []
        while not any(m.get("stage") == "complete" for m in got):
            msg = await asyncio.wait_for(ws.receive(), 10)
            assert msg.type == aiohttp.WSMsgType.TEXT, msg
            got.append(orjson.loads(msg.data))
        await ws.close()
        async with http.get(f"{url}/task/{identifier}", headers=ann.bearer()) as resp:
            doc = await resp.json()
    assert doc["status"] == "completed" and doc["result"] == RESULT
    assert {m["task_id"] for m in got if m["type"] == "progress"} == {identifier}


async def test_the_relay_copies_close_codes_both_ways(aiohttp_client, double_url, tmp_path):
    """Whichever side closes, the other side gets the same code and reason."""
    seen: dict[str, object] = {}

    async def socket(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        seen["query"], seen["cookie"] = request.query_string, request.headers.get("Cookie")
        seen["auth"], seen["origin"] = (request.headers.get("Authorization"),
                                        request.headers.get("Origin"))
        seen["forwarded"] = request.headers.get("X-Forwarded-For")
        if request.match_info["id"] == "server-closes":
            await ws.send_str('{"type": "progress", "stage": "transcribing"}')
            await ws.close(code=4001, message=b"the service is done with you")
        else:
            async for msg in ws:
                await ws.send_str(msg.data)  # echo until the client closes
            seen["client_code"] = ws.close_code
        return ws

    app = web.Application()
    app.router.add_get("/ws/tasks/{id}", socket)
    client = await chunkd_client(aiohttp_client, tmp_path, handoff="whisperx",
                                 whisperx_url=await double_url(Serving(app)))
    ws = await client.ws_connect("/ws/tasks/server-closes?ticket=abc",
                                 headers={"Cookie": "session=s1", "Authorization": "Bearer k",
                                          "Origin": "https://app.example"})
    assert orjson.loads((await ws.receive()).data)["stage"] == "transcribing"
    msg = await asyncio.wait_for(ws.receive(), 5)
    assert msg.type == aiohttp.WSMsgType.CLOSE
    assert ws.close_code == 4001 and msg.extra == "the service is done with you"
    assert seen["query"] == "ticket=abc" and seen["cookie"] == "session=s1"
    assert seen["auth"] == "Bearer k" and seen["origin"] == "https://app.example"
    assert seen["forwarded"] == "127.0.0.1"

    ws = await client.ws_connect("/ws/tasks/echo")
    await ws.send_str("hello")
    assert (await asyncio.wait_for(ws.receive(), 5)).data == "hello"
    await ws.close(code=4002)
    for _ in range(100):
        if "client_code" in seen:
            break
        await asyncio.sleep(0.02)
    assert seen["client_code"] == 4002


async def test_the_relay_only_relays_handshakes_for_plain_ids(aiohttp_client, double_url,
                                                              tmp_path):
    double = WhisperXDouble(variant="fork")
    ann = double.add_user("ann")
    url = await double_url(double)
    client = await whisperx_client(aiohttp_client, tmp_path, double, url)
    identifier = await submit_directly(url, ann.bearer())
    ticket = await ticket_for(url, ann.bearer(), identifier)
    plain = await client.get(f"/ws/tasks/{identifier}?ticket={ticket}")  # no Upgrade
    assert plain.status == 400 and (await plain.json())["error"]["code"] == "bad_request"
    ws = await client.ws_connect(f"/ws/tasks/{identifier}?ticket={ticket}")  # still unused
    assert orjson.loads((await asyncio.wait_for(ws.receive(), 5)).data)["task_id"] == identifier
    await ws.close()
    for odd in ("..", "a.b", "%2E%2E", "x%2Fy", "%2E%2E%2Fapi"):  # never relayed: chunkd's 4404
        head, frame = await raw_ws(client, f"/ws/tasks/{odd}")
        assert head.startswith(b"HTTP/1.1 101"), (odd, head)
        assert frame[0] == 0x88 and int.from_bytes(frame[2:4], "big") == 4404, (odd, frame)


async def raw_handshake(client, path: str):
    """A WebSocket handshake for exactly ``path`` (no client-side normalisation of ``..``) on a
    raw connection; the reader, the writer and the answer's head."""
    reader, writer = await asyncio.open_connection(client.host, client.port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                 "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                 "Sec-WebSocket-Version: 13\r\n\r\n".encode())
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    return reader, writer, head


async def raw_ws(client, path: str) -> tuple[bytes, bytes]:
    """The answer's head and the first frame's first bytes."""
    reader, writer, head = await raw_handshake(client, path)
    frame = await asyncio.wait_for(reader.read(64), 5)
    writer.close()
    return head, frame


def recording_service(closed: list[int | None], first: str = "{}") -> web.Application:
    """A service socket at /ws/tasks/{id} that sends ``first``, then records the close code it
    gets."""
    async def socket(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await ws.send_str(first)
        async for _ in ws:
            pass
        closed.append(ws.close_code)
        return ws

    app = web.Application()
    app.router.add_get("/ws/tasks/{id}", socket)
    return app


async def test_a_dropped_browser_is_a_1011_for_the_service(aiohttp_client, double_url, tmp_path):
    closed: list[int | None] = []
    client = await chunkd_client(aiohttp_client, tmp_path, handoff="whisperx",
                                 whisperx_url=await double_url(Serving(recording_service(closed))))
    reader, writer, head = await raw_handshake(client, "/ws/tasks/t1")
    assert head.startswith(b"HTTP/1.1 101")
    await asyncio.wait_for(reader.readuntil(b"{}"), 5)  # the service's first frame came through
    writer.transport.abort()  # the browser vanishes: no close frame
    for _ in range(100):
        if closed:
            break
        await asyncio.sleep(0.05)
    assert closed == [1011]


async def test_known_ids_stay_chunkds_and_unknown_ones_close_4404_without_relay(
        aiohttp_client, tmp_path):
    client = await chunkd_client(aiohttp_client, tmp_path, handoff="whisperx",
                                 whisperx_url="http://127.0.0.1:9", whisperx_ws_proxy=False)
    ws = await client.ws_connect("/ws/tasks/00000000-0000-4000-8000-000000000000")
    await asyncio.wait_for(ws.receive(), 5)
    assert ws.close_code == 4404


async def test_a_relay_to_an_unreachable_service_is_a_502(aiohttp_client, tmp_path,
                                                          unused_tcp_port):
    client = await chunkd_client(aiohttp_client, tmp_path, handoff="whisperx",
                                 whisperx_url=f"http://127.0.0.1:{unused_tcp_port}")
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await client.ws_connect("/ws/tasks/00000000-0000-4000-8000-000000000000")
    assert refused.value.status == 502


# -- end to end: chunkd upload --wait as a user of the fork ----------------------------------

async def test_chunkd_upload_wait_as_a_user_of_the_fork(server_factory, aiohttp_server, tmp_path):
    double = WhisperXDouble(variant="fork")
    ann = double.add_user("ann")
    service = await aiohttp_server(double.app(), host="127.0.0.1")
    url = str(service.make_url("")).rstrip("/")
    srv = server_factory("--handoff", "whisperx", "--whisperx-url", url,
                         "--whisperx-credentials", "user", "--whisperx-poll-interval", "0.05")
    media = tmp_path / "speech.mp3"
    media.write_bytes((MEDIA / "speech.mp3").read_bytes())
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "chunkd", "upload", str(media), "--url", srv.url, "--wait",
        "--quiet", "--language", "en", "--header", f"Authorization: Bearer {ann.api_key}",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={"XDG_CACHE_HOME": str(tmp_path / "cache"), "PATH": "/usr/bin:/bin"})
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    text = out.decode()
    assert proc.returncode == 0, err.decode()
    identifier = double.submissions[0]["identifier"]
    assert f"service task {identifier}" in text
    assert "The quick brown fox" in text  # the transcript
    assert double.tasks[identifier].owner == "ann"
    assert ann.api_key not in text + err.decode()


async def test_sigterm_closes_relayed_sockets_on_both_sides(server_factory, aiohttp_server):
    closed: list[int | None] = []
    app = recording_service(closed, '{"type": "heartbeat"}')
    service = await aiohttp_server(app, host="127.0.0.1")
    srv = server_factory("--handoff", "whisperx",
                         "--whisperx-url", str(service.make_url("")).rstrip("/"))
    async with aiohttp.ClientSession() as http:
        ws = await http.ws_connect(f"{srv.url}/ws/tasks/a-service-task")
        assert orjson.loads((await asyncio.wait_for(ws.receive(), 5)).data)["type"] == "heartbeat"
        assert srv.proc is not None
        srv.proc.send_signal(15)
        msg = await asyncio.wait_for(ws.receive(), 15)
        assert msg.type == aiohttp.WSMsgType.CLOSE and ws.close_code == 1001
    for _ in range(100):
        if closed:
            break
        await asyncio.sleep(0.05)
    assert closed == [1001]
    srv.proc.wait(20)
    assert srv.proc.returncode == 0


async def test_with_chunkds_own_auth_the_users_key_has_its_own_header(aiohttp_client, double_url,
                                                                      tmp_path):
    """Authorization carries chunkd's token then; the service key is X-WhisperX-Authorization."""
    import time

    import jwt

    secret = "a-secret-shared-with-the-main-app-of-enough-length"
    double = WhisperXDouble(variant="fork")
    ann = double.add_user("ann")
    client = await whisperx_client(aiohttp_client, tmp_path, double, await double_url(double),
                                   whisperx_credentials="user", jwt_secret=secret)
    mine = {"Authorization": "Bearer " + jwt.encode(
        {"sub": "ann", "exp": int(time.time()) + 600}, secret, algorithm="HS256")}
    sid = (await (await client.post("/upload/chunked/session", headers=mine, json=session_body(
        "speech.wav", len(SPEECH), CHUNK))).json())["session_id"]
    for i, part in enumerate(chunks_of(SPEECH, CHUNK)):
        assert (await put_chunk(client, sid, i, part, **mine)).status == 200
    refused = await client.post(f"/upload/chunked/{sid}/finalize", headers=mine)
    assert (await refused.json())["error"]["code"] == "credential_required"  # chunkd's is not it
    resp = await client.post(f"/upload/chunked/{sid}/finalize", headers={
        **mine, "X-WhisperX-Authorization": ann.bearer()["Authorization"]})
    assert resp.status == 200, await resp.text()
    for _ in range(200):
        if double.submissions:
            break
        await asyncio.sleep(0.05)
    assert double.submissions[0]["user"] == "ann"


async def test_the_relay_never_forwards_chunkds_own_token(aiohttp_client, double_url, tmp_path):
    seen: list[str | None] = []

    async def socket(request: web.Request) -> web.WebSocketResponse:
        seen.append(request.headers.get("Authorization"))
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await ws.close()
        return ws

    app = web.Application()
    app.router.add_get("/ws/tasks/{id}", socket)
    client = await chunkd_client(aiohttp_client, tmp_path, handoff="whisperx",
                                 whisperx_url=await double_url(Serving(app)),
                                 jwt_secret="a-secret-shared-with-the-main-app-of-enough-length")
    for headers in ({"Authorization": "Bearer chunkds-own-token"},
                    {"Authorization": "Bearer chunkds-own-token",
                     "X-WhisperX-Authorization": "Bearer whsk_users_key"}):
        ws = await client.ws_connect("/ws/tasks/a-service-task", headers=headers)
        await ws.receive()
        await ws.close()
    assert seen == [None, "Bearer whsk_users_key"]
