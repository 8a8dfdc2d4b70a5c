"""chunkd's tus server in a real browser (Debian's chromium, headless, driven by Playwright) with
the real clients from npm (``make tusclients``): tus-js-client 4.3.1 configured as the
logingrupa/whisperX-FastAPI fork's frontend configures it, and Uppy (``@uppy/core`` +
``@uppy/tus``).

The page comes from a small aiohttp server of its own on 127.0.0.1: another port, so another
origin than chunkd's, and every tus request is a real cross-origin one (preflighted for the tus
headers, PATCH and DELETE; with credentials and exposed headers for the fork's client). Its
script is bundled from ``tests/tus_clients/browser/`` with esbuild when the tests start; nothing
built is kept. The files are built in the page from bytes fetched from the page server.

CI sets ``CHUNKD_REQUIRE_TUS_CLIENTS`` and ``CHUNKD_REQUIRE_BROWSER``: then a missing
``node_modules`` or chromium fails these tests instead of skipping them.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import os
import random
import secrets
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from conftest import MEDIA, REQUIRE_BROWSER

#: Read at import, before the autouse fixture of conftest.py removes every CHUNKD_* variable.
REQUIRE_TUS_CLIENTS = bool(os.environ.get("CHUNKD_REQUIRE_TUS_CLIENTS"))
CLIENTS = Path(__file__).parent / "tus_clients"
SOURCES = CLIENTS / "browser"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
KiB = 1024
MiB = 1024 * KiB
FORK_TUS_PATH = "/uploads/files/"  # the fork's TUS_ENDPOINT
FORK_CHUNK = 50 * MiB  # the fork's TUS_CHUNK_SIZE
WAIT = 60.0  # seconds for one upload in the page, at most


def _unavailable(reason: str, required: bool, variable: str) -> None:
    if required:
        pytest.fail(f"{reason} ({variable} is set)")
    pytest.skip(reason)


# -- the bundle, the browser, the page's server -----------------------------------------------

@pytest.fixture(scope="session")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """tus-js-client, Uppy and ``browser/fork.js`` as one script (``window.TusTest``)."""
    modules = CLIENTS / "node_modules"
    esbuild = modules / ".bin" / "esbuild"
    missing = [name for name in ("tus-js-client", "@uppy/core", "@uppy/tus", ".bin/esbuild")
               if not (modules / name).exists()]
    if missing:
        _unavailable(f"the tus clients are not installed ({', '.join(missing)}): make tusclients",
                     REQUIRE_TUS_CLIENTS, "CHUNKD_REQUIRE_TUS_CLIENTS")
    out = tmp_path_factory.mktemp("tus-bundle") / "bundle.js"
    done = subprocess.run(
        [str(esbuild), str(SOURCES / "entry.js"), "--bundle", "--format=iife",
         "--target=es2020", f"--outfile={out}", "--log-level=warning"],
        cwd=CLIENTS, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"esbuild failed: {done.stderr}"
    return out.read_bytes()


@pytest.fixture
async def browser(bundle: bytes):
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        _unavailable("chromium is not installed (make test installs it when run as root)",
                     REQUIRE_BROWSER, "CHUNKD_REQUIRE_BROWSER")
    try:
        from playwright.async_api import async_playwright
    except ImportError:
        _unavailable("playwright is not installed (pip install -e '.[test]')",
                     REQUIRE_BROWSER, "CHUNKD_REQUIRE_BROWSER")
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(executable_path=path, args=FLAGS)
        try:
            yield launched
        finally:
            await launched.close()


class PageSite:
    """The app's own origin: a page that loads the bundle and sets the ``csrf_token`` cookie
    (as the fork's backend does), and the test's files under ``/media/``."""

    def __init__(self, bundle: bytes) -> None:
        self.bundle = bundle
        self.csrf = secrets.token_urlsafe(24)
        self.files: dict[str, Path] = {}
        self.origin = ""

    def app(self) -> web.Application:
        async def index(request: web.Request) -> web.Response:
            resp = web.Response(
                text='<!doctype html><meta charset="utf-8"><title>app</title>'
                     '<script src="/bundle.js"></script><p>app</p>',
                content_type="text/html")
            resp.set_cookie("csrf_token", self.csrf, path="/", samesite="Lax")
            return resp

        async def script(request: web.Request) -> web.Response:
            return web.Response(body=self.bundle, content_type="text/javascript")

        async def media(request: web.Request) -> web.StreamResponse:
            path = self.files.get(request.match_info["name"])
            if path is None:
                raise web.HTTPNotFound()
            return web.FileResponse(path)

        app = web.Application()
        app.router.add_get("/", index)
        app.router.add_get("/bundle.js", script)
        app.router.add_get("/media/{name}", media)
        return app


@pytest.fixture
async def site(aiohttp_server, bundle: bytes) -> PageSite:
    page_site = PageSite(bundle)
    server = await aiohttp_server(page_site.app(), host="127.0.0.1")
    page_site.origin = str(server.make_url("")).rstrip("/")
    return page_site


class Traffic:
    """The page's requests to chunkd in the order the browser started them, as it sent them
    (headers with the cookie), with their answers (status, headers) once they come; a request
    that got no answer keeps ``status`` None and has its ``failure``."""

    def __init__(self, page: Any, api: str) -> None:
        self.api = api
        self.log: list[dict[str, Any]] = []
        self._entries: dict[int, dict[str, Any]] = {}
        page.on("request", self._started)
        page.on("response", self._answered)
        page.on("requestfailed", self._failed)

    def _started(self, request: Any) -> None:
        if request.url.startswith(self.api) and request.method != "OPTIONS":
            entry = {"method": request.method, "url": request.url, "status": None}
            self._entries[id(request)] = entry
            self.log.append(entry)

    async def _answered(self, response: Any) -> None:
        entry = self._entries.get(id(response.request))
        if entry is not None:
            entry["sent"] = await response.request.all_headers()
            entry["headers"] = await response.all_headers()
            entry["status"] = response.status

    def _failed(self, request: Any) -> None:
        entry = self._entries.get(id(request))
        if entry is not None:
            entry["failure"] = request.failure

    def of(self, method: str) -> list[dict[str, Any]]:
        return [e for e in self.log if e["method"] == method]

    async def settled(self, method: str, timeout: float = 15.0) -> dict[str, Any]:
        """The first ``method`` request, once answered or failed."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for entry in self.of(method):
                if entry["status"] is not None or "failure" in entry:
                    return entry
            await asyncio.sleep(0.05)
        raise AssertionError(f"no answered {method} within {timeout} s: {self.summary()}")

    def summary(self) -> list[tuple[str, str, Any]]:
        return [(e["method"], e["url"], e["status"] or e.get("failure")) for e in self.log]


async def open_page(browser: Any, site: PageSite, api: str) -> tuple[Any, Any, Traffic]:
    context = await browser.new_context()
    page = await context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    traffic = Traffic(page, api)
    await page.goto(site.origin + "/")
    await page.wait_for_function("() => window.TusTest !== undefined")
    assert await page.evaluate("() => location.origin") == site.origin != api
    assert await page.evaluate("() => TusTest.fork.isTusSupported()")
    return context, page, traffic


def recording(directory: Path, name: str, size: int) -> tuple[Path, str]:
    """A real recording padded to ``size`` bytes with random ones; its path and sha256."""
    head = (MEDIA / "speech.wav").read_bytes()
    data = head + random.Random(size).randbytes(size - len(head))
    path = directory / name
    path.write_bytes(data)
    return path, hashlib.sha256(data).hexdigest()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(4 * MiB):
            digest.update(block)
    return digest.hexdigest()


def handed_off(data_dir: Path, task_id: str = "*") -> list[Path]:
    """The files the folder hand-off put under ``completed/<task_id>/`` (not its JSON)."""
    return sorted(p for p in (data_dir / "completed").glob(f"{task_id}/*")
                  if p.is_file() and p.suffix != ".json")


async def wait_handed_off(data_dir: Path, task_id: str = "*", timeout: float = 15.0
                          ) -> list[Path]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if found := handed_off(data_dir, task_id):
            return found
        await asyncio.sleep(0.1)
    return []


async def head(url: str) -> int:
    async with aiohttp.ClientSession() as http, http.head(
            url, headers={"Tus-Resumable": "1.0.0"}) as resp:
        return resp.status


# In the page: follow /ws/tasks/<id> until the server closes it (or ``ms`` pass).
FOLLOW = """() => {
  window.follow = (api, id, ms = 30000) => new Promise((resolve) => {
    const messages = [];
    const ws = new WebSocket(api.replace(/^http/, "ws") + "/ws/tasks/" + id);
    const timer = setTimeout(() => { ws.close(); resolve({ messages, code: "timeout" }); }, ms);
    ws.onmessage = (e) => messages.push(JSON.parse(e.data));
    ws.onclose = (e) => { clearTimeout(timer); resolve({ messages, code: e.code }); };
  });
}"""


# -- the WhisperX fork's frontend --------------------------------------------------------------

async def test_the_whisperx_forks_frontend_uploads_with_credentials_csrf_and_its_task_id(
        browser, site, server_factory, tmp_path):
    # 110 MiB: over the fork's 80 MiB threshold, so it goes to tus, in 3 PATCHes of <= 50 MiB
    size = 110 * MiB
    site.files["meeting.wav"], source = recording(tmp_path, "meeting.wav", size)
    srv = server_factory("--tus-path", FORK_TUS_PATH, "--cors-origins", site.origin)
    context, page, traffic = await open_page(browser, site, srv.url)
    await page.evaluate(FOLLOW)
    result = await asyncio.wait_for(page.evaluate("""async (api) => {
      const { fork } = TusTest;
      const blob = await (await fetch("/media/meeting.wav")).blob();
      const file = new File([blob], "meeting.wav", { type: "audio/wav", lastModified: 1 });
      if (file.size < fork.SIZE_THRESHOLD) return { routed: "single" };
      const metadata = fork.forkMetadata(file);  // no language picked: "auto"
      const sent = [];
      let early = null;
      const outcome = await new Promise((resolve) => {
        const upload = fork.createForkUpload(file, metadata, {
          onProgress: (bytesSent, bytesTotal) => sent.push([bytesSent, bytesTotal]),
          onSuccess: (url) => resolve({ ok: true, url }),
          onError: (e) => resolve({ ok: false, error: String(e) }),
        }, api, {
          // the test's own: a watcher from the moment the upload exists
          onUploadUrlAvailable: () => { early = follow(api, metadata.taskId); },
        });
        fork.startForkUpload(upload);
      });
      // as the fork's UI: once tus reports success, follow the task it named
      const late = outcome.ok ? await follow(api, metadata.taskId) : null;
      return { routed: "tus", ...outcome, metadata, late, early: early && await early,
               last: sent[sent.length - 1], size: file.size,
               remembered: Object.keys(localStorage).filter((k) => k.startsWith("tus::")) };
    }""", srv.url), WAIT)
    await context.close()

    assert result["routed"] == "tus"
    assert result["ok"], f"tus-js-client failed: {result['error']}; {traffic.summary()}"
    task_id = result["metadata"]["taskId"]
    assert result["metadata"] == {"filename": "meeting.wav", "filetype": "audio/wav",
                                  "language": "auto", "taskId": task_id}
    assert result["url"].startswith(srv.url + FORK_TUS_PATH)
    assert result["last"] == [size, size]
    assert result["remembered"] == []  # removeFingerprintOnSuccess: nothing left to resume

    # one creation, then the file in 50 MiB PATCHes, each answered 204 with the new offset
    posts, patches = traffic.of("POST"), traffic.of("PATCH")
    assert [e["status"] for e in posts] == [201], traffic.summary()
    assert [e["status"] for e in patches] == [204] * math.ceil(size / FORK_CHUNK), \
        traffic.summary()
    assert [int(e["headers"]["upload-offset"]) for e in patches] == [
        min(size, (i + 1) * FORK_CHUNK) for i in range(len(patches))]
    assert all(e["url"] == result["url"] for e in patches)
    # every request carried the cookie (withCredentials) and its value as X-CSRF-Token, and
    # chunkd answered for this origin with credentials (else the browser hides the answer)
    for entry in posts + patches:
        sent = entry["sent"]
        assert sent.get("x-csrf-token") == site.csrf, entry["method"]
        assert f"csrf_token={site.csrf}" in sent.get("cookie", ""), entry["method"]
        assert entry["headers"].get("access-control-allow-origin") == site.origin
        assert entry["headers"].get("access-control-allow-credentials") == "true"

    # the WebSocket of the task the client named: upload progress, then "complete"
    late = result["late"]
    assert late["messages"], late
    assert late["messages"][-1]["type"] == "progress", late["messages"]
    assert late["messages"][-1]["stage"] == "complete", late["messages"]
    # ... and followed from the moment the upload existed: the bytes as they arrived
    early = result["early"]
    assert early is not None and early["messages"], early
    assert early["messages"][-1]["stage"] == "complete", early["messages"]
    arrived = [m["uploaded_bytes"] for m in early["messages"] if m["type"] == "upload_progress"]
    assert arrived == sorted(arrived) and arrived[-1] == size, early["messages"]
    assert any(0 < n < size for n in arrived), early["messages"]
    # handed off once, under the client's task id, byte for byte, with the fork's metadata
    files = handed_off(srv.data_dir, task_id)
    assert len(files) == 1 and files == handed_off(srv.data_dir), files
    assert file_sha256(files[0]) == source
    record = json.loads((files[0].parent / "session.json").read_text())
    assert (record["filename"], record["language"], record["task_id"]) == (
        "meeting.wav", "auto", task_id)


# -- Uppy ---------------------------------------------------------------------------------------

UPPY = """() => {
  window.makeUppy = (api, chunkSize) => {
    const uppy = new TusTest.Uppy({ autoProceed: false });
    uppy.use(TusTest.Tus, { endpoint: api + "/files/", chunkSize, retryDelays: [100, 500, 1000] });
    return uppy;
  };
  window.mediaBlob = async (name) => (await fetch("/media/" + name)).blob();
}"""


async def test_uppy_uploads_a_file_to_the_default_tus_path(browser, site, server_factory,
                                                          tmp_path):
    size = 5 * MiB + 12345  # 3 PATCHes of 2 MiB, the last one short
    site.files["talk.wav"], source = recording(tmp_path, "talk.wav", size)
    srv = server_factory("--cors-origins", site.origin)  # tus at its default path, /files/
    context, page, traffic = await open_page(browser, site, srv.url)
    await page.evaluate(UPPY)
    result = await asyncio.wait_for(page.evaluate("""async (api) => {
      const uppy = makeUppy(api, 2 * 1024 * 1024);
      let bytes = 0;
      uppy.on("upload-progress", (file, p) => { bytes = p.bytesUploaded; });
      uppy.addFile({ name: "talk.wav", type: "audio/wav", data: await mediaBlob("talk.wav") });
      const res = await uppy.upload();
      return {
        successful: res.successful.map((f) => ({ name: f.name, url: f.uploadURL,
                                                 complete: f.progress.uploadComplete })),
        failed: res.failed.map((f) => ({ name: f.name, error: String(f.error) })),
        bytes,
      };
    }""", srv.url), WAIT)
    await context.close()

    assert result["failed"] == [], f"{result['failed']}; {traffic.summary()}"
    [done] = result["successful"]
    assert done["name"] == "talk.wav" and done["complete"] is True
    assert done["url"].startswith(srv.url + "/files/")
    assert result["bytes"] == size
    assert [e["status"] for e in traffic.of("POST")] == [201]
    assert [e["status"] for e in traffic.of("PATCH")] == [204] * 3, traffic.summary()
    # the hand-off may end after the last PATCH was answered: it never waits for it
    files = await wait_handed_off(srv.data_dir)
    assert len(files) == 1, files
    assert file_sha256(files[0]) == source


@pytest.mark.parametrize("chunk_size, upload_rate", [
    (256 * KiB, None),   # cancelled right after the first progress event
    (4 * MiB, 4 * MiB),  # a slower link: cancelled in the middle of a PATCH
], ids=["small-chunks", "mid-patch"])
async def test_uppy_cancel_terminates_the_upload_on_the_server(
        browser, site, server_factory, tmp_path, chunk_size, upload_rate):
    size = 16 * MiB  # 64 or 4 PATCHes: far from done when the first progress comes
    site.files["long.wav"], _ = recording(tmp_path, "long.wav", size)
    srv = server_factory("--cors-origins", site.origin)
    context, page, traffic = await open_page(browser, site, srv.url)
    if upload_rate is not None:
        cdp = await context.new_cdp_session(page)
        await cdp.send("Network.enable")
        await cdp.send("Network.emulateNetworkConditions", {
            "offline": False, "latency": 0, "downloadThroughput": -1,
            "uploadThroughput": upload_rate})
    await page.evaluate(UPPY)
    result = await asyncio.wait_for(page.evaluate("""async ([api, chunkSize]) => {
      const uppy = makeUppy(api, chunkSize);
      const errors = [];
      uppy.on("upload-error", (file, error) => errors.push(String(error)));
      const id = uppy.addFile({ name: "long.wav", type: "audio/wav",
                                data: await mediaBlob("long.wav") });
      const cancelled = new Promise((resolve) => {
        uppy.on("upload-progress", (file, p) => {
          if (p.bytesUploaded > 0 && uppy.getFile(id)) {
            const url = uppy.getFile(id).tus?.uploadUrl ?? null;
            uppy.cancelAll();  // what the Dashboard's "Cancel" does
            resolve({ url, at: p.bytesUploaded });
          }
        });
      });
      uppy.upload();
      const out = await cancelled;
      await new Promise((r) => setTimeout(r, 1500));  // DELETE, and any retry of it
      return { ...out, errors, files: uppy.getFiles().length };
    }""", [srv.url, chunk_size]), WAIT)
    delete = await traffic.settled("DELETE")
    await context.close()

    assert 0 < result["at"] < size
    assert result["files"] == 0 and result["errors"] == []
    [created] = traffic.of("POST")
    assert created["status"] == 201
    url = result["url"]
    assert url and url.startswith(srv.url + "/files/")
    if upload_rate is not None:  # the PATCH in flight was dropped by the client
        assert traffic.of("PATCH")[-1]["status"] is None, traffic.summary()
    # terminated with exactly one DELETE on the upload's URL, answered 204 (tus-js-client
    # would retry anything else and report an error)
    assert delete["url"] == url and delete["status"] == 204, traffic.summary()
    assert len(traffic.of("DELETE")) == 1, traffic.summary()
    # no PATCH was started after the DELETE
    assert traffic.log[-1] is delete, traffic.summary()
    # the upload is gone on chunkd, and nothing was handed off
    assert await head(url) in (404, 410)
    await asyncio.sleep(0.5)
    assert handed_off(srv.data_dir) == []
