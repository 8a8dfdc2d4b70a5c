"""A real browser (Debian's chromium, headless) uploads through chunkd from another origin:
fetch with checksums (crypto.subtle), CORS preflights, and progress over a WebSocket."""

from __future__ import annotations

import asyncio
import itertools
import os
import shutil
import signal
import subprocess
from pathlib import Path

import aiohttp
import orjson
import pytest
from aiohttp import web

from chunkd.app import make_app
from chunkd.config import Config
from conftest import MEDIA, REQUIRE_BROWSER, ChunkdTestServer, sha256

HERE = Path(__file__).parent
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--remote-debugging-port=0"]


def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        if REQUIRE_BROWSER:
            pytest.fail("chromium is required here (CHUNKD_REQUIRE_BROWSER is set)")
        pytest.skip("chromium is not installed (make test installs it when run as root)")
    return path


async def page_server(aiohttp_server):
    async def page(request: web.Request) -> web.FileResponse:
        return web.FileResponse(HERE / "browser" / "upload.html")

    async def media(request: web.Request) -> web.FileResponse:
        return web.FileResponse(MEDIA / "speech.wav")

    app = web.Application()
    app.router.add_get("/", page)
    app.router.add_get("/speech.wav", media)
    return await aiohttp_server(app, host="127.0.0.1")


async def evaluate_until(profile: Path, expression: str, timeout: float) -> object:
    """Poll ``expression`` through the DevTools protocol until it is not null."""
    port_file = profile / "DevToolsActivePort"
    async with aiohttp.ClientSession() as http:
        for _ in range(200):
            if port_file.exists() and port_file.read_text().strip():
                break
            await asyncio.sleep(0.05)
        port = int(port_file.read_text().split()[0])
        for _ in range(100):
            async with http.get(f"http://127.0.0.1:{port}/json/list") as resp:
                pages = [t for t in await resp.json() if t.get("type") == "page"]
            if pages:
                break
            await asyncio.sleep(0.05)
        ids = itertools.count(1)
        async with http.ws_connect(pages[0]["webSocketDebuggerUrl"], max_msg_size=0) as ws:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + timeout
            while loop.time() < deadline:
                call_id = next(ids)
                await ws.send_json({"id": call_id, "method": "Runtime.evaluate",
                                    "params": {"expression": expression, "returnByValue": True}})
                while True:
                    msg = orjson.loads((await ws.receive()).data)
                    if msg.get("id") == call_id:
                        break
                value = msg["result"]["result"].get("value")
                if value is not None:
                    return value
                await asyncio.sleep(0.1)
    raise AssertionError("the page did not finish in time")


async def test_browser_upload_with_live_progress(aiohttp_server, aiohttp_client, tmp_path):
    browser = chromium()
    pages = await page_server(aiohttp_server)
    page_origin = str(pages.make_url("")).rstrip("/")
    config = Config(min_chunk_size=1024, data_dir=tmp_path / "data", cors_origins=frozenset({page_origin}))
    api = await aiohttp_client(ChunkdTestServer(make_app(config)))
    api_url = str(api.make_url("")).rstrip("/")
    profile = tmp_path / "profile"
    proc = subprocess.Popen([browser, *FLAGS, f"--user-data-dir={profile}",
                             f"{page_origin}/?api={api_url}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        result = await evaluate_until(profile, "window.__result || null", timeout=60)
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
    assert "error" not in result, result
    assert result["finalize"]["status"] == "processing"
    assert result["closeCode"] == 1000
    assert result["frameKinds"] == ["string"]  # text frames: browsers get strings, not Blobs
    msgs = result["messages"]
    counts = [m["uploaded_chunks"] for m in msgs if m["type"] == "upload_progress"]
    assert counts == sorted(counts) and counts[-1] == result["session"]["total_chunks"]
    assert msgs[-1]["type"] == "progress" and msgs[-1]["stage"] == "complete"
    data = (MEDIA / "speech.wav").read_bytes()
    assert result["sha256"] == sha256(data)
    assert sha256((config.data_dir / result["finalize"]["location"]).read_bytes()) == sha256(data)
