"""The browser module ``/static/chunkd.js`` in a real browser (Debian's chromium, headless,
driven by Playwright) against real ``chunkd serve`` processes: parallel chunks with WebCrypto
checksums, progress, the WebSocket, resume after a reload and after a browser restart, pause,
cancel and abort, a refused file, auth, CORS from another origin, and a server killed and
restarted mid-upload.

The page is chunkd's own origin (``/healthz``; the page at ``/`` is the upload page's) or, for
CORS, a page of another origin; the module is loaded with a dynamic ``import()``, and the files
are built in the page from bytes the test serves through Playwright's request interception.
"""

from __future__ import annotations

import asyncio
import random
import shutil
import socket
import time
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
from aiohttp import web

from conftest import MEDIA, REQUIRE_BROWSER, sha256

STATIC = Path(__file__).parent.parent / "chunkd" / "static"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
KiB = 1024
CHUNK = 64 * KiB

# Run in every page before its own scripts: how a test gets the module and its files.
HARNESS = """
window.T = {
  base: "",
  lm: 1700000000000,  // the files' lastModified
  chunkd() { return import(this.base + "/static/chunkd.js"); },
  async file(name, lastModified) {
    const blob = await (await fetch("/__test/file/" + name)).blob();
    return new File([blob], name, { lastModified });
  },
  err(e) {
    return { name: e?.name, status: e?.status, code: e?.code, message: String(e?.message ?? e),
             details: e?.details ?? null };
  },
};
"""


def _unavailable(reason: str) -> None:
    if REQUIRE_BROWSER:
        pytest.fail(f"{reason} (CHUNKD_REQUIRE_BROWSER is set)")
    pytest.skip(reason)


def chromium_path() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        _unavailable("chromium is not installed (make test installs it when run as root)")
    assert path is not None
    return path


def playwright_api() -> Any:
    try:
        from playwright.async_api import async_playwright
    except ImportError:
        _unavailable("playwright is not installed (pip install -e '.[test]')")
    return async_playwright


@pytest.fixture
async def pw():
    executable = chromium_path()
    async with playwright_api()() as playwright:
        yield playwright, executable


@pytest.fixture
async def browser(pw):
    playwright, executable = pw
    browser = await playwright.chromium.launch(executable_path=executable, args=FLAGS)
    yield browser
    await browser.close()


def media(size: int, name: str = "speech.wav") -> bytes:
    """A real recording padded to ``size`` bytes (random bytes: every chunk differs)."""
    data = (MEDIA / name).read_bytes()
    return data + random.Random(size).randbytes(size - len(data))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Requests:
    """The page's requests to chunkd's API and its WebSockets, and the most chunk POSTs in
    flight at once."""

    def __init__(self, page: Any) -> None:
        self.log: list[tuple[str, str, dict[str, str]]] = []
        self.in_flight = 0
        self.most_in_flight = 0
        page.on("request", self._start)
        page.on("requestfinished", self._end)
        page.on("requestfailed", self._end)
        page.on("websocket", lambda ws: self.log.append(("WS", ws.url, {})))

    @staticmethod
    def _is_chunk(request: Any) -> bool:
        return request.method == "POST" and "/chunk?index=" in request.url

    def _start(self, request: Any) -> None:
        if "/upload/chunked/" not in request.url:  # the page, the module, its files
            return
        self.log.append((request.method, request.url, dict(request.headers)))
        if self._is_chunk(request):
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)

    def _end(self, request: Any) -> None:
        if self._is_chunk(request):
            self.in_flight -= 1

    def chunks(self) -> list[tuple[int, dict[str, str]]]:
        return [(int(url.rsplit("index=", 1)[1]), headers)
                for method, url, headers in self.log if method == "POST" and "/chunk?" in url]

    def count(self, method: str, part: str) -> int:
        return sum(1 for m, url, _ in self.log if m == method and part in url)


async def open_context(browser: Any, files: dict[str, bytes], **options: Any) -> Any:
    context = await browser.new_context(**options)
    await prepare(context, files)
    return context


async def prepare(context: Any, files: dict[str, bytes]) -> None:
    async def serve(route: Any) -> None:
        name = route.request.url.rsplit("/", 1)[1]
        await route.fulfill(status=200, body=files[name], content_type="application/octet-stream")

    await context.route("**/__test/file/*", serve)
    await context.add_init_script(script=HARNESS)


async def open_page(context: Any, url: str, base: str = "") -> tuple[Any, Requests]:
    page = await context.new_page()
    requests = Requests(page)
    page.on("pageerror", lambda exc: print("pageerror:", exc))
    await page.goto(url)
    await page.evaluate("(base) => { T.base = base; }", base)
    return page, requests


async def slow_network(context: Any, page: Any, latency_ms: float) -> None:
    """Each request takes at least ``latency_ms``: uploads last long enough to interrupt."""
    cdp = await context.new_cdp_session(page)
    await cdp.send("Network.enable")
    await cdp.send("Network.emulateNetworkConditions", {
        "offline": False, "latency": latency_ms, "downloadThroughput": -1,
        "uploadThroughput": -1})


async def server_status(url: str, sid: str, token: str | None = None) -> tuple[int, dict]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with aiohttp.ClientSession() as http, http.get(
            f"{url}/upload/chunked/{sid}/status", headers=headers) as resp:
        return resp.status, await resp.json()


STORED = """() => Object.keys(localStorage).filter((k) => k.startsWith("chunkd:upload:"))
                     .map((k) => JSON.parse(localStorage.getItem(k)))"""


def completed(data_dir: Path, location: str) -> str:
    return sha256((data_dir / location).read_bytes())


# -- a whole upload ---------------------------------------------------------------------------

async def test_parallel_chunked_upload_with_checksums_progress_and_websocket(browser,
                                                                            server_factory):
    srv = server_factory()
    data = media(2 * 1024 * 1024 + 12345)  # 33 chunks of 64 KiB, the last one short
    context = await open_context(browser, {"talk.wav": data})
    page, requests = await open_page(context, srv.url + "/healthz")
    await slow_network(context, page, 40)  # so that three chunks really are in flight together
    result = await page.evaluate("""async () => {
      const m = await T.chunkd();
      const file = await T.file("talk.wav", T.lm);
      const progress = [], live = [], late = [];
      let follow;
      const res = await m.uploadChunked({
        file, chunkSize: 65536, parallel: 3, language: "en", model: "small",
        taskParams: { min_speakers: 2 },
        onProgress: (p) => progress.push(p),
        onSessionCreated: (sid) => { follow = m.followTask(sid, { onMessage: (x) => live.push(x) }); },
      });
      const final = await follow;
      const lateFinal = await m.followTask(res.taskId, { onMessage: (x) => late.push(x) });
      return { res, progress, live, final, late, lateFinal, secure: isSecureContext,
               stored: Object.keys(localStorage).length };
    }""")
    await context.close()
    res = result["res"]
    total = -(-len(data) // CHUNK)
    # the file the hand-off got is the source, byte for byte
    assert res["taskId"] and res["sessionId"] and res["location"].startswith("completed/")
    assert completed(srv.data_dir, res["location"]) == sha256(data)
    # limits first, then the session, then every chunk once, 3 at a time, each with its checksum
    assert requests.log[0][0] == "GET" and requests.log[0][1].endswith("/upload/chunked/limits")
    assert requests.log[1][0] == "POST" and requests.log[1][1].endswith("/upload/chunked/session")
    chunks = requests.chunks()
    assert sorted(i for i, _ in chunks) == list(range(total))
    for i, headers in chunks:
        part = data[i * CHUNK:(i + 1) * CHUNK]
        assert headers.get("x-chunk-checksum") == f"sha256={sha256(part)}", i
    assert requests.most_in_flight == 3
    assert result["secure"] is True
    # progress: chunk by chunk to 100 %, with a speed
    progress = result["progress"]
    assert [p["uploadedChunks"] for p in progress] == list(range(total + 1))
    assert progress[-1]["percentage"] == 100 and progress[-1]["uploadedBytes"] == len(data)
    assert all(p["totalChunks"] == total and p["totalBytes"] == len(data) for p in progress)
    assert progress[-2]["percentage"] < 100 and max(p["currentSpeed"] for p in progress) > 0
    # the WebSocket, live from the session's creation, and joined late by task id
    live = result["live"]
    counts = [m["uploaded_chunks"] for m in live if m["type"] == "upload_progress"]
    assert counts and counts == sorted(counts) and counts[-1] == total
    assert result["final"]["type"] == "progress" and result["final"]["stage"] == "complete"
    assert result["final"]["location"] == res["location"]
    assert result["lateFinal"]["stage"] == "complete" and result["late"][-1] == result["lateFinal"]
    # success forgets the remembered session
    assert result["stored"] == 0
    _, st = await server_status(srv.url, res["sessionId"])
    assert st["task_id"] == res["taskId"] and st["task"]["location"] == res["location"]


async def test_chunk_size_rules_and_choose_upload(browser, server_factory):
    """The chunk size comes from /upload/chunked/limits (clamped, grown to at most max_chunks);
    chooseUpload's threshold; without WebCrypto the chunks go without a checksum; the types
    are served at /static/chunkd.d.ts."""
    srv = server_factory("--chunk-size", "96KiB", "--max-chunk-size", "128KiB")
    data = media(300 * KiB)
    context = await open_context(browser, {"a.wav": data, "b.wav": data})
    page, requests = await open_page(context, srv.url + "/healthz")
    result = await page.evaluate("""async () => {
      const m = await T.chunkd();
      const limits = await m.fetchLimits();
      const file = await T.file("a.wav", 1);
      const small = { size: 79 * 1024 * 1024 }, big = { size: 100_000_000 };
      const out = {
        limits,
        defaultSize: m.pickChunkSize(file.size, limits),
        tooSmall: m.pickChunkSize(file.size, limits, 10),
        tooBig: m.pickChunkSize(file.size, limits, 10 * 1024 * 1024),
        tiny: m.pickChunkSize(500, limits, 4096),
        many: m.pickChunkSize(10_000_000, { ...limits, max_chunks: 100 }, 1024),
        choose: [m.chooseUpload(small), m.chooseUpload(big),
                 m.chooseUpload(small, { threshold: 80 * 1024 * 1024 }),
                 m.chooseUpload({ size: 80 * 1024 * 1024 }, { threshold: 80 * 1024 * 1024 })],
      };
      const types = await fetch("/static/chunkd.d.ts");
      out.types = [types.status, await types.text()];
      out.res = await m.uploadChunked({ file });  // the server's chunk_size
      Object.defineProperty(crypto, "subtle", { get: () => undefined });
      out.noSubtle = await m.uploadChunked({ file: await T.file("b.wav", 1), chunkSize: 100000 });
      return out;
    }""")
    await context.close()
    limits = result["limits"]
    assert limits["chunk_size"] == 96 * KiB and limits["max_chunk_size"] == 128 * KiB
    assert limits["min_chunk_size"] == KiB and limits["max_chunks"] == 10_000
    assert result["defaultSize"] == 96 * KiB
    assert result["tooSmall"] == KiB and result["tooBig"] == 128 * KiB
    assert result["tiny"] == 500  # the whole file, smaller than min_chunk_size
    assert result["many"] == 100_000  # grown so that 10 MB is 100 chunks
    assert result["choose"] == ["single", "chunked", "single", "chunked"]
    assert result["types"][0] == 200  # the types are served beside the module
    assert "export function uploadChunked(options: UploadOptions)" in result["types"][1]
    assert completed(srv.data_dir, result["res"]["location"]) == sha256(data)
    assert completed(srv.data_dir, result["noSubtle"]["location"]) == sha256(data)
    chunks = requests.chunks()
    assert len(chunks) == 4 + 4  # 300 KiB: 4 chunks of 96 KiB, then 4 of 100000 bytes
    assert all("x-chunk-checksum" in h for _, h in chunks[:4])
    assert not any("x-chunk-checksum" in h for _, h in chunks[4:])


# -- resume -----------------------------------------------------------------------------------

async def test_resume_after_a_page_reload_sends_only_missing_chunks(browser, server_factory):
    srv = server_factory()
    data = media(2 * 1024 * 1024)  # 32 chunks
    total = len(data) // CHUNK
    context = await open_context(browser, {"talk.wav": data})
    page, requests = await open_page(context, srv.url + "/healthz")
    await slow_network(context, page, 40)
    async with page.expect_navigation():  # the page reloads itself after a few chunks
        await page.evaluate("""() => {
          T.chunkd().then(async (m) => m.uploadChunked({
            file: await T.file("talk.wav", T.lm), chunkSize: 65536, parallel: 3,
            onProgress: (p) => {
              if (p.uploadedChunks >= 5 && !window.__reloading) {
                window.__reloading = true;
                location.reload();
              }
            },
          }));
        }""")
    stored = await page.evaluate(STORED)
    assert len(stored) == 1
    sid = stored[0]["sessionId"]
    status, st = await server_status(srv.url, sid)
    assert status == 200 and 5 <= st["received_chunks"] < total
    first_run = len(requests.chunks())
    requests.log.clear()
    await page.evaluate("(base) => { T.base = base; }", "")
    result = await page.evaluate("""async () => {
      const m = await T.chunkd();
      return m.uploadChunked({ file: await T.file("talk.wav", T.lm), chunkSize: 65536,
                               parallel: 3 });
    }""")
    assert result["sessionId"] == sid and result["resumed"] is True
    second_run = len(requests.chunks())
    # the second run asked /status and sent only what was missing: no new session
    assert requests.count("POST", "/upload/chunked/session") == 0
    assert requests.count("GET", f"/upload/chunked/{sid}/status") >= 1
    assert 0 < second_run <= len(st["missing_chunks"]) < total
    assert first_run + second_run < 2 * total
    assert completed(srv.data_dir, result["location"]) == sha256(data)
    assert await page.evaluate(STORED) == []
    await context.close()


async def test_resume_after_a_browser_restart(pw, server_factory, tmp_path):
    """The remembered session survives the browser itself (a persistent profile, closed and
    opened again); a changed file (another lastModified) is a new upload."""
    playwright, executable = pw
    srv = server_factory()
    data = media(1024 * 1024)  # 16 chunks
    profile = tmp_path / "profile"

    async def launch():
        context = await playwright.chromium.launch_persistent_context(
            str(profile), executable_path=executable, args=FLAGS)
        await prepare(context, {"talk.wav": data})
        return context

    context = await launch()
    page, _ = await open_page(context, srv.url + "/healthz")
    sid = await page.evaluate("""async () => {
      const m = await T.chunkd();
      let reached;
      const atFour = new Promise((resolve) => { reached = resolve; });
      const upload = m.createUpload({ file: await T.file("talk.wav", T.lm), chunkSize: 65536,
        parallel: 1, onProgress: (p) => { if (p.uploadedChunks >= 4) reached(); } });
      upload.start();
      await atFour;
      await upload.pause({ abortInFlight: false });
      return upload.sessionId;
    }""")
    await context.close()  # the whole browser: its profile is written to disk
    _, st = await server_status(srv.url, sid)
    assert 4 <= st["received_chunks"] < 16

    context = await launch()
    page, requests = await open_page(context, srv.url + "/healthz")
    result = await page.evaluate("""async () => {
      const m = await T.chunkd();
      const res = await m.uploadChunked({ file: await T.file("talk.wav", T.lm), chunkSize: 65536 });
      const other = await m.uploadChunked({ file: await T.file("talk.wav", T.lm + 1),
                                            chunkSize: 65536, finalize: false });
      return { res, other };
    }""")
    await context.close()
    res = result["res"]
    assert res["sessionId"] == sid and res["resumed"] is True
    assert res["sentChunks"] == len(st["missing_chunks"]) < 16
    assert completed(srv.data_dir, res["location"]) == sha256(data)
    # the same name and size, modified since: a new session, every chunk
    assert result["other"]["sessionId"] != sid and result["other"]["resumed"] is False
    assert result["other"]["sentChunks"] == 16 and result["other"]["taskId"] is None
    assert len(requests.chunks()) == len(st["missing_chunks"]) + 16


# -- pause, cancel, abort ---------------------------------------------------------------------

async def test_pause_and_resume_keep_the_session(browser, server_factory):
    srv = server_factory()
    data = media(1024 * 1024)
    total = len(data) // CHUNK
    context = await open_context(browser, {"talk.wav": data})
    page, requests = await open_page(context, srv.url + "/healthz")
    await slow_network(context, page, 30)
    result = await page.evaluate("""async () => {
      const m = await T.chunkd();
      const states = [];
      let reached;
      const atThree = new Promise((resolve) => { reached = resolve; });
      const upload = m.createUpload({
        file: await T.file("talk.wav", T.lm), chunkSize: 65536, parallel: 2,
        onStateChange: (s) => states.push(s),
        onProgress: (p) => { if (p.uploadedChunks >= 3) reached(); },
      });
      const promise = upload.start();
      await atThree;
      // a pause taken back at once, while chunks are in flight, settles: it never hangs
      const quick = upload.pause({ abortInFlight: false });
      upload.resume();
      const settled = await Promise.race([quick.then(() => true),
        new Promise((r) => setTimeout(() => r(false), 5000))]);
      await upload.pause();
      const sid = upload.sessionId, pausedState = upload.state;
      await new Promise((r) => setTimeout(r, 150));  // aborted chunks settle on the server
      const before = await (await fetch(`/upload/chunked/${sid}/status`)).json();
      await new Promise((r) => setTimeout(r, 500));
      const after = await (await fetch(`/upload/chunked/${sid}/status`)).json();
      const stored = Object.keys(localStorage).length;
      upload.resume();
      const res = await promise;
      return { sid, res, states, pausedState, stored, settled, during: [before, after] };
    }""")
    await context.close()
    res = result["res"]
    before, after = result["during"]
    assert result["pausedState"] == "paused" and result["stored"] == 1
    assert result["settled"], "pause() then resume(): the pause's promise never settled"
    # nothing moved while paused, and the session stayed
    assert before["received_chunks"] == after["received_chunks"] < total
    assert after["status"] == "uploading"
    # resumed: the same session to the end, never a second one
    assert res["sessionId"] == result["sid"] and res["taskId"]
    assert result["states"][:4] == ["starting", "uploading", "paused", "uploading"]
    assert result["states"][-2:] == ["finalizing", "done"]
    assert requests.count("POST", "/upload/chunked/session") == 1
    assert completed(srv.data_dir, res["location"]) == sha256(data)
    # at most the two chunks in flight at the pause were sent twice
    assert total <= len(requests.chunks()) <= total + 2


async def test_abort_signal_and_cancel_delete_the_session(browser, server_factory):
    srv = server_factory()
    data = media(1024 * 1024)
    context = await open_context(browser, {"a.wav": data, "b.wav": data})
    page, requests = await open_page(context, srv.url + "/healthz")
    await slow_network(context, page, 30)
    result = await page.evaluate("""async () => {
      const m = await T.chunkd();
      const out = {};
      // an AbortSignal mid-upload
      const ac = new AbortController();
      let sid = null;
      try {
        await m.uploadChunked({
          file: await T.file("a.wav", 1), chunkSize: 65536, signal: ac.signal,
          onSessionCreated: (id) => { sid = id; },
          onProgress: (p) => { if (p.uploadedChunks >= 3) ac.abort(); },
        });
        out.signal = "resolved";
      } catch (e) { out.signal = T.err(e); }
      out.signalSid = sid;
      out.signalStored = Object.keys(localStorage).length;
      // cancel() while paused
      let reached;
      const atTwo = new Promise((resolve) => { reached = resolve; });
      const upload = m.createUpload({ file: await T.file("b.wav", 1), chunkSize: 65536,
        onProgress: (p) => { if (p.uploadedChunks >= 2) reached(); } });
      const promise = upload.start();
      await atTwo;
      await upload.pause();
      await upload.cancel();
      try { await promise; out.cancel = "resolved"; } catch (e) { out.cancel = T.err(e); }
      out.cancelSid = upload.sessionId;
      out.cancelState = upload.state;
      out.cancelStored = Object.keys(localStorage).length;
      // an already aborted signal: nothing is sent at all
      try { await m.uploadChunked({ file: await T.file("a.wav", 2), signal: AbortSignal.abort() }); }
      catch (e) { out.early = T.err(e); }
      return out;
    }""")
    await context.close()
    for key in ("signal", "cancel", "early"):
        assert result[key]["name"] == "AbortError" and result[key]["code"] == "aborted", key
    for key in ("signalSid", "cancelSid"):
        status, st = await server_status(srv.url, result[key])
        assert status == 410 and st["error"]["code"] == "session_aborted", key
    assert result["signalStored"] == 0 and result["cancelStored"] == 0
    assert result["cancelState"] == "cancelled"
    assert requests.count("DELETE", "/abort") == 2
    # the abort stopped the chunks: none was started after the DELETE
    first = next(i for i, (m, url, _) in enumerate(requests.log) if m == "DELETE")
    signal_sid = result["signalSid"]
    assert not any(signal_sid in url and "/chunk?" in url for _, url, _ in requests.log[first:])
    # ... and it came at once: at most the chunks in flight when it fired, not the other 10
    sent = [url for m, url, _ in requests.log if signal_sid in url and "/chunk?" in url]
    assert 3 <= len(sent) <= 3 + 3
    assert requests.count("POST", "/upload/chunked/session") == 2  # the early one sent nothing

    # a remembered session that is gone (410 aborted, 404 unknown) is forgotten: a new one
    context = await open_context(browser, {"a.wav": data})
    page, requests = await open_page(context, srv.url + "/healthz")
    again = await page.evaluate("""async (gone) => {
      const m = await T.chunkd();
      const out = [];
      for (const sessionId of gone) {
        const file = await T.file("a.wav", 1);
        localStorage.setItem(m.resumeKey(file), JSON.stringify({ sessionId }));
        out.push(await m.uploadChunked({ file, chunkSize: 65536 }));
      }
      return out;
    }""", [result["signalSid"], "00000000-0000-4000-8000-000000000000"])
    await context.close()
    for res in again:
        assert res["resumed"] is False and res["sessionId"] != result["signalSid"]
        assert completed(srv.data_dir, res["location"]) == sha256(data)
    assert requests.count("GET", f"/upload/chunked/{result['signalSid']}/status") == 1
    assert requests.count("POST", "/upload/chunked/session") == 2


# -- refusals ---------------------------------------------------------------------------------

async def test_refusals_fail_at_once_with_the_servers_code(browser, server_factory):
    srv = server_factory()
    exe = (MEDIA / "elf-renamed.wav").read_bytes()
    context = await open_context(browser, {"voice.wav": exe, "notes.txt": b"x" * 2000})
    page, requests = await open_page(context, srv.url + "/healthz")
    result = await page.evaluate("""async () => {
      const m = await T.chunkd();
      const out = { retries: [] };
      const onRetry = (r) => out.retries.push(r.error.code);
      let sid;
      try {
        await m.uploadChunked({ file: await T.file("voice.wav", 5), onRetry,
                                onSessionCreated: (id) => { sid = id; } });
      } catch (e) { out.exe = T.err(e); out.isChunkdError = e instanceof m.ChunkdError; }
      out.stored = Object.keys(localStorage).length;
      try { await m.followTask(sid); } catch (e) { out.follow = T.err(e); }
      try { await m.uploadChunked({ file: await T.file("notes.txt", 5), onRetry }); }
      catch (e) { out.ext = T.err(e); }
      try { await m.followTask("00000000-0000-4000-8000-000000000000"); }
      catch (e) { out.unknown = T.err(e); }
      return out;
    }""")
    await context.close()
    exe_err = result["exe"]
    assert result["isChunkdError"] and exe_err["name"] == "ChunkdError"
    assert exe_err["status"] == 415 and exe_err["code"] == "unsupported_content"
    assert "executable" in exe_err["details"]["detected_type"]
    assert exe_err["details"]["detected_type"] in exe_err["message"]
    assert result["stored"] == 0  # a refused file's session is dead: forgotten
    assert result["follow"]["code"] == "unsupported_content"
    assert "executable" in result["follow"]["details"]["technical_detail"]
    assert result["ext"]["status"] == 422 and result["ext"]["code"] == "extension_not_allowed"
    assert result["unknown"]["status"] == 404 and result["unknown"]["code"] == "session_not_found"
    assert result["retries"] == []  # what cannot pass is not tried again
    assert requests.count("POST", "/finalize") == 1


async def test_rate_limited_requests_wait_for_retry_after(browser, server_factory):
    """429 rate_limited comes with Retry-After (whole seconds): the module waits that long,
    not its own (here tiny) backoff, and the upload goes through."""
    srv = server_factory("--rate-limit", "10", "--rate-burst", "8")
    # 40 chunks: at 10 requests a second (after a burst of 8) they would need at least 3.2 s,
    # far longer than they take here, even on a loaded CI machine (at 20/s and a burst of 15,
    # 1.5 s, a slow run once met no 429), so some are refused
    data = media(40 * 8 * KiB)
    context = await open_context(browser, {"talk.wav": data})
    page, _ = await open_page(context, srv.url + "/healthz")
    result = await page.evaluate("""async () => {
      const m = await T.chunkd();
      const retries = [];
      const t0 = performance.now();
      const res = await m.uploadChunked({ file: await T.file("talk.wav", T.lm), chunkSize: 8192,
        parallel: 3, retries: 5, retryDelay: 5, maxRetryDelay: 20,
        onRetry: (r) => retries.push({ code: r.error.code, delay: r.delay,
                                       retryAfter: r.error.retryAfter }) });
      return { res, retries, elapsed: performance.now() - t0 };
    }""")
    await context.close()
    limited = [r for r in result["retries"] if r["code"] == "rate_limited"]
    assert limited, result["retries"]
    assert all(r["retryAfter"] >= 1 and r["delay"] >= 1000 * r["retryAfter"] for r in limited)
    assert result["elapsed"] >= 1000
    assert completed(srv.data_dir, result["res"]["location"]) == sha256(data)


# -- auth -------------------------------------------------------------------------------------

SECRET = "a-secret-shared-with-the-main-app-0123456789-and-long-enough"


def mint(sub: str = "ann", key: str = SECRET) -> str:
    return jwt.encode({"sub": sub, "exp": int(time.time()) + 600, "n": random.random()}, key,
                      algorithm="HS256")


async def test_auth_with_a_token_string_a_token_function_and_a_wrong_token(
        browser, server_factory, tmp_path):
    secret = tmp_path / "jwt-secret"
    secret.write_text(SECRET)
    srv = server_factory("--jwt-secret-file", str(secret))
    data = media(400 * KiB)
    good = mint()
    fresh = [mint() for _ in range(40)]
    context = await open_context(browser, {"a.wav": data, "b.wav": data, "c.wav": data})
    page, requests = await open_page(context, srv.url + "/healthz")
    result = await page.evaluate("""async ([good, fresh, wrong, bob]) => {
      const m = await T.chunkd();
      const out = {};
      out.limits = await m.fetchLimits();
      const a = await m.uploadChunked({ file: await T.file("a.wav", 1), chunkSize: 65536,
                                        token: good });
      out.a = a;
      out.aFinal = await m.followTask(a.taskId, { token: good });
      let calls = 0;
      const b = await m.uploadChunked({ file: await T.file("b.wav", 1), chunkSize: 65536,
        token: async () => { await new Promise((r) => setTimeout(r, 1));
                             return fresh[calls++ % fresh.length]; } });
      out.b = b; out.calls = calls;
      out.bFinal = await m.followTask(b.sessionId, { token: () => fresh[0] });
      try { await m.uploadChunked({ file: await T.file("c.wav", 1), token: wrong }); }
      catch (e) { out.wrong = T.err(e); }
      try { await m.uploadChunked({ file: await T.file("c.wav", 1) }); }
      catch (e) { out.none = T.err(e); }
      try { await m.followTask(a.taskId, { token: wrong }); }
      catch (e) { out.wrongWs = T.err(e); }
      try { await m.followTask(a.taskId, { token: bob }); }
      catch (e) { out.otherUser = T.err(e); }
      return out;
    }""", [good, fresh, mint(key="x" * 40), mint("bob")])
    await context.close()
    assert result["limits"]["auth"] is True
    a, b = result["a"], result["b"]
    assert completed(srv.data_dir, a["location"]) == sha256(data)
    assert completed(srv.data_dir, b["location"]) == sha256(data)
    assert result["aFinal"]["stage"] == "complete" and result["bFinal"]["stage"] == "complete"
    # the function is asked for every request: each request carried the next fresh token
    b_requests = [h.get("authorization") for m, url, h in requests.log
                  if b["sessionId"] in url and m == "POST"]
    assert len(b_requests) == 7 + 1  # 7 chunks and the finalize
    assert len(set(b_requests)) == len(b_requests)
    assert set(b_requests) <= {f"Bearer {t}" for t in fresh}
    assert result["calls"] >= 2 + len(b_requests)  # limits and session too
    assert result["wrong"]["status"] == 401 and result["wrong"]["code"] == "invalid_token"
    assert result["none"]["status"] == 401 and result["none"]["code"] == "missing_token"
    assert result["wrongWs"]["status"] == 401 and result["wrongWs"]["code"] == "invalid_token"
    assert result["otherUser"]["status"] == 403 and result["otherUser"]["code"] == "forbidden"
    # the WebSocket carried the token as ?access_token=
    ws_urls = [url for m, url, _ in requests.log if m == "WS"]
    assert any(f"access_token={good}" in url for url in ws_urls)


# -- another origin ---------------------------------------------------------------------------

async def test_module_from_another_origin_with_cors(browser, server_factory, aiohttp_server):
    module = (STATIC / "chunkd.js").read_bytes()

    async def page_handler(request: web.Request) -> web.Response:
        return web.Response(text="<!doctype html><title>app</title><p>app", content_type="text/html")

    async def module_copy(request: web.Request) -> web.Response:
        return web.Response(body=module, content_type="text/javascript")

    app = web.Application()
    app.router.add_get("/", page_handler)
    app.router.add_get("/static/chunkd.js", module_copy)
    allowed = await aiohttp_server(app, host="127.0.0.1")
    other = await aiohttp_server(app, host="127.0.0.1")
    origin = str(allowed.make_url("")).rstrip("/")
    srv = server_factory("--cors-origins", origin)
    data = media(500 * KiB)
    context = await open_context(browser, {"talk.wav": data})
    page, requests = await open_page(context, origin + "/", base=srv.url)
    result = await page.evaluate("""async (api) => {
      const m = await T.chunkd();  // the module itself from chunkd's origin
      const messages = [];
      let follow;
      const res = await m.uploadChunked({ file: await T.file("talk.wav", 1), baseUrl: api,
        chunkSize: 65536, onSessionCreated: (sid) => {
          follow = m.followTask(sid, { baseUrl: api, onMessage: (x) => messages.push(x) }); } });
      const final = await follow;
      const ac = new AbortController();
      let aborted;
      try {
        await m.uploadChunked({ file: await T.file("talk.wav", 2), baseUrl: api, chunkSize: 65536,
          signal: ac.signal, onProgress: (p) => { if (p.uploadedChunks >= 1) ac.abort(); } });
      } catch (e) { aborted = T.err(e); }
      return { res, final, messages, aborted, origin: location.origin };
    }""", srv.url)
    assert result["origin"] == origin != srv.url
    res = result["res"]
    assert completed(srv.data_dir, res["location"]) == sha256(data)
    assert result["final"]["stage"] == "complete"
    assert any(m["type"] == "upload_progress" for m in result["messages"])
    assert result["aborted"]["name"] == "AbortError"
    assert requests.count("DELETE", "/abort") == 1
    # a page of an origin chunkd does not list gets nothing (the same module, served there)
    refused_page, _ = await open_page(context, str(other.make_url("")), base="")
    refused = await refused_page.evaluate("""async (api) => {
      const m = await T.chunkd();
      try { await m.fetchLimits({ baseUrl: api }); return "allowed"; }
      catch (e) { return T.err(e); }
    }""", srv.url)
    await context.close()
    assert refused["status"] == 0 and refused["code"] == "network_error"


# -- a server killed and restarted --------------------------------------------------------------

async def test_upload_survives_a_server_kill_and_restart(browser, server_factory):
    port = free_port()
    srv = server_factory("--port", str(port))
    data = media(2 * 1024 * 1024)  # 32 chunks
    total = len(data) // CHUNK
    context = await open_context(browser, {"talk.wav": data})
    page, requests = await open_page(context, srv.url + "/healthz")
    await slow_network(context, page, 60)
    await page.evaluate("""() => {
      window.__retries = []; window.__messages = []; window.__uploaded = 0;
      T.chunkd().then(async (m) => {
        let follow;
        const res = await m.uploadChunked({
          file: await T.file("talk.wav", 1), chunkSize: 65536, parallel: 2,
          retries: 20, retryDelay: 200, maxRetryDelay: 1000,
          onRetry: (r) => window.__retries.push(r.error.code),
          onProgress: (p) => { window.__uploaded = p.uploadedChunks; },
          onSessionCreated: (sid) => {
            follow = m.followTask(sid, { retryDelay: 200, maxRetryDelay: 1000, reconnects: 30,
              onMessage: (x) => window.__messages.push(x) });
          },
        });
        window.__final = await follow;
        window.__result = res;
      }).catch((e) => { window.__result = { error: T.err(e) }; });
    }""")
    await page.wait_for_function("window.__uploaded >= 6", polling=20, timeout=20_000)
    srv.kill9()
    killed_at = await page.evaluate("window.__uploaded")
    await asyncio.sleep(1.0)
    await asyncio.to_thread(server_factory, "--port", str(port))
    await page.wait_for_function("window.__result !== undefined", polling=50, timeout=40_000)
    result = await page.evaluate("""() => ({ result: window.__result, final: window.__final,
                                              retries: window.__retries,
                                              messages: window.__messages })""")
    await context.close()
    res = result["result"]
    assert "error" not in res, res
    assert killed_at < total
    assert "network_error" in result["retries"]
    assert completed(srv.data_dir, res["location"]) == sha256(data)
    assert requests.count("POST", "/upload/chunked/session") == 1  # the same session throughout
    # the WebSocket dropped with the server and came back: a fresh snapshot, then the end
    assert result["final"]["stage"] == "complete"
    ws_opens = [url for m, url, _ in requests.log if m == "WS"]
    assert len(ws_opens) >= 2
