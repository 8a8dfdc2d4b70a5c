"""SCRATCH (not for commit): run test_tus_browser's tests against a tiny in-process tus stub."""
from __future__ import annotations

import asyncio
import base64
import json
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest
from aiohttp import WSMsgType, web

from test_tus_browser import (  # noqa: F401
    browser, bundle, site,
    test_the_whisperx_forks_frontend_uploads_with_credentials_csrf_and_its_task_id as test_fork,
    test_uppy_uploads_a_file_to_the_default_tus_path as test_uppy,
    test_uppy_cancel_terminates_the_upload_on_the_server as test_cancel,
)

EXPOSE = "Location, Upload-Offset, Upload-Length, Tus-Resumable"


def stub_app(data_dir: Path, tus_path: str, origins: set[str]) -> web.Application:
    uploads: dict[str, dict] = {}
    done_events: dict[str, asyncio.Event] = {}

    @web.middleware
    async def cors(request, handler):
        origin = request.headers.get("Origin")
        if request.method == "OPTIONS":
            resp = web.Response(status=204)
            if origin in origins:
                resp.headers.update({
                    "Access-Control-Allow-Origin": origin, "Access-Control-Allow-Credentials": "true",
                    "Access-Control-Allow-Methods": "GET, POST, HEAD, PATCH, DELETE, OPTIONS",
                    "Access-Control-Allow-Headers": "Tus-Resumable, Upload-Length, Upload-Metadata, Upload-Offset, Content-Type, X-CSRF-Token, X-Request-ID"})
            return resp
        resp = await handler(request)
        if origin in origins:
            resp.headers.update({"Access-Control-Allow-Origin": origin,
                                 "Access-Control-Allow-Credentials": "true",
                                 "Access-Control-Expose-Headers": EXPOSE})
        return resp

    async def create(request):
        meta = {}
        for part in request.headers.get("Upload-Metadata", "").split(","):
            if part.strip():
                k, _, v = part.strip().partition(" ")
                meta[k] = base64.b64decode(v).decode()
        uid = uuid.uuid4().hex
        task = uid
        uploads[uid] = {"length": int(request.headers["Upload-Length"]), "offset": 0, "meta": meta,
                        "task": task, "data": bytearray()}
        done_events[task] = asyncio.Event()
        uploads[task] = uploads[uid]
        return web.Response(status=201, headers={"Location": tus_path + uid, "Tus-Resumable": "1.0.0"})

    async def patch(request):
        u = uploads.get(request.match_info["id"])
        if u is None:
            return web.Response(status=404)
        body = await request.read()
        u["data"] += body
        u["offset"] += len(body)
        if u["offset"] == u["length"]:
            d = data_dir / "completed" / u["task"]
            d.mkdir(parents=True, exist_ok=True)
            (d / u["meta"].get("filename", "upload.bin")).write_bytes(u["data"])
            done_events[u["task"]].set()
        return web.Response(status=204, headers={"Upload-Offset": str(u["offset"])})

    async def head(request):
        u = uploads.get(request.match_info["id"])
        if u is None:
            return web.Response(status=404)
        return web.Response(headers={"Upload-Offset": str(u["offset"]), "Upload-Length": str(u["length"]),
                                     "Cache-Control": "no-store"})

    async def delete(request):
        u = uploads.pop(request.match_info["id"], None)
        return web.Response(status=204 if u else 404)

    async def ws(request):
        w = web.WebSocketResponse()
        await w.prepare(request)
        tid = request.match_info["id"]
        u = uploads.get(tid)
        if u is None:
            await w.close(code=4404)
            return w
        await w.send_str(json.dumps({"type": "upload_progress", "uploaded_bytes": u["offset"]}))
        await done_events[tid].wait()
        await w.send_str(json.dumps({"type": "progress", "stage": "complete", "task_id": tid}))
        await w.close()
        return w

    app = web.Application(middlewares=[cors], client_max_size=200 * 1024 * 1024)
    app.router.add_post(tus_path, create)
    app.router.add_route("PATCH", tus_path + "{id}", patch)
    app.router.add_route("HEAD", tus_path + "{id}", head)
    app.router.add_delete(tus_path + "{id}", delete)
    app.router.add_get("/ws/tasks/{id}", ws)
    return app


@pytest.fixture
def server_factory(tmp_path):
    import threading
    loops = []

    def start(*args):
        opts = dict(zip(args[::2], args[1::2]))
        data_dir = tmp_path / "stubdata"
        app = stub_app(data_dir, opts.get("--tus-path", "/files/"), {opts.get("--cors-origins")})
        loop = asyncio.new_event_loop()
        ready = threading.Event()
        box = {}

        def run():
            asyncio.set_event_loop(loop)
            runner = web.AppRunner(app)
            loop.run_until_complete(runner.setup())
            site = web.TCPSite(runner, "127.0.0.1", 0)
            loop.run_until_complete(site.start())
            box["port"] = site._server.sockets[0].getsockname()[1]
            ready.set()
            loop.run_forever()
        threading.Thread(target=run, daemon=True).start()
        ready.wait(10)
        loops.append(loop)
        return SimpleNamespace(url=f"http://127.0.0.1:{box['port']}", data_dir=data_dir)
    yield start
    for loop in loops:
        loop.call_soon_threadsafe(loop.stop)
