"""Helpers for the tests that drive chunkd's tus endpoint with the real clients.

* tus-js-client 4.3.1 under Node.js (``tests/tus_clients/upload.mjs``, installed by
  ``make tusclients``) runs as a subprocess: :class:`NodeUpload` starts it, reads the JSON lines
  it prints (every request it sent and the answer it got, its callbacks, and a final ``result``)
  and stops it by its PID;
* tuspy 1.1.0 (``tusclient``) is imported in-process;
* media files are a real recording from ``tests/media`` padded with random bytes (libmagic reads
  only the first MiB, so the padded file is still audio);
* :func:`follow_task` follows ``/ws/tasks/{id}`` with aiohttp to the task's final message.

When ``CHUNKD_REQUIRE_TUS_CLIENTS`` is set (CI), a missing node, ``node_modules`` or tuspy fails
the tests instead of skipping them. It is read at import, before the autouse fixture in
``conftest.py`` removes every ``CHUNKD_*`` variable.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import random
import shutil
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest

REQUIRE_TUS_CLIENTS = bool(os.environ.get("CHUNKD_REQUIRE_TUS_CLIENTS"))
MEDIA = Path(__file__).parent / "media"
TUS_CLIENTS = Path(__file__).parent / "tus_clients"
UPLOAD_SCRIPT = TUS_CLIENTS / "upload.mjs"
TUS_JS_VERSION = "4.3.1"
TUSPY_VERSION = "1.1.0"
TUS = {"Tus-Resumable": "1.0.0"}
MiB = 1024 * 1024


def unavailable(reason: str) -> None:
    """Skip, or fail when CI said the real clients must be there."""
    if REQUIRE_TUS_CLIENTS:
        pytest.fail(f"{reason} (CHUNKD_REQUIRE_TUS_CLIENTS is set)")
    pytest.skip(reason)


def node_binary() -> str:
    """The node executable, with tus-js-client 4.3.1 installed beside the scripts."""
    node = shutil.which("node")
    if node is None:
        unavailable("node is not installed (make tusclients installs it when run as root)")
    assert node is not None
    package = TUS_CLIENTS / "node_modules" / "tus-js-client" / "package.json"
    try:
        version = json.loads(package.read_text())["version"]
    except (OSError, ValueError, KeyError):
        unavailable(f"{package.parent} is missing: run `make tusclients`")
    if version != TUS_JS_VERSION:
        unavailable(f"tus-js-client {version} is installed, the tests need {TUS_JS_VERSION}: "
                    "run `make tusclients`")
    return node


def require_tuspy() -> None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        found = version("tuspy")
    except PackageNotFoundError:
        unavailable("tuspy is not installed (pip install -e '.[test]')")
        return
    if found != TUSPY_VERSION:
        unavailable(f"tuspy {found} is installed, the tests need {TUSPY_VERSION}")


# -- media -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Media:
    path: Path
    size: int
    sha256: str


def make_media(folder: Path, name: str, size: int, *, source: str = "speech.wav",
               seed: int = 0) -> Media:
    """A real recording from tests/media padded with random bytes to ``size``."""
    head = (MEDIA / source).read_bytes()[:size]
    data = head + random.Random(seed).randbytes(size - len(head))
    path = folder / name
    path.write_bytes(data)
    return Media(path, size, hashlib.sha256(data).hexdigest())


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(MiB), b""):
            h.update(block)
    return h.hexdigest()


def disk_bytes(root: Path) -> int:
    """What ``du`` counts under ``root``: allocated blocks, each inode once (hard links too)."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            with contextlib.suppress(FileNotFoundError):
                st = os.lstat(os.path.join(dirpath, name))
                if (st.st_dev, st.st_ino) not in seen:
                    seen.add((st.st_dev, st.st_ino))
                    total += st.st_blocks * 512
    return total


def upload_id(url: str) -> str:
    """The upload id: the last path part of an upload URL."""
    return url.rstrip("/").rsplit("/", 1)[-1]


# -- tus-js-client under node ------------------------------------------------------------------


@dataclass(repr=False)
class NodeUpload:
    """``node upload.mjs <options>`` as a subprocess; its JSON lines in ``events``."""

    options: dict[str, Any]
    events: list[dict[str, Any]] = field(default_factory=list)
    proc: asyncio.subprocess.Process | None = None
    stderr: bytes = b""
    _changed: asyncio.Event = field(default_factory=asyncio.Event)
    _reader: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        return f"NodeUpload(pid={self.proc.pid if self.proc else None}, {len(self.events)} events)"

    async def start(self) -> NodeUpload:
        self.proc = await asyncio.create_subprocess_exec(
            node_binary(), str(UPLOAD_SCRIPT), json.dumps(self.options), cwd=TUS_CLIENTS,
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE)
        self._reader = asyncio.create_task(self._read())
        return self

    async def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        async for line in self.proc.stdout:
            text = line.decode(errors="replace").strip()
            if not text:
                continue
            try:
                self.events.append(json.loads(text))
            except ValueError:
                self.events.append({"event": "stdout", "text": text})
            self._changed.set()
        self._changed.set()

    async def wait_for(self, event: str, timeout: float = 30.0, **match: Any) -> dict[str, Any]:
        """The first event of this kind (with these fields, or a callable per field)."""
        async def find() -> dict[str, Any]:
            while True:
                for e in self.events:
                    if e.get("event") == event and all(
                            (v(e.get(k)) if callable(v) else e.get(k) == v)
                            for k, v in match.items()):
                        return e
                if self._reader is not None and self._reader.done():
                    raise AssertionError(f"node exited before a {event!r} event {match}: "
                                         f"{self.transcript()}")
                self._changed.clear()
                await self._changed.wait()
        try:
            return await asyncio.wait_for(find(), timeout)
        except TimeoutError:
            raise AssertionError(f"no {event!r} event {match} within {timeout} s: "
                                 f"{self.transcript()}") from None

    async def result(self, timeout: float = 45.0) -> dict[str, Any]:
        """The final ``result`` line, once the process has exited."""
        res = await self.wait_for("result", timeout)
        assert self.proc is not None
        try:
            await asyncio.wait_for(self.proc.wait(), 10)
            if self.proc.stderr is not None:
                self.stderr = await self.proc.stderr.read()
        except TimeoutError:
            self.stop()
        return res

    def stop(self) -> None:
        """SIGKILL by PID if it still runs."""
        if self.proc is not None and self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGKILL)

    async def close(self) -> None:
        self.stop()
        if self.proc is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.proc.wait(), 10)
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader

    async def __aenter__(self) -> NodeUpload:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- reading the log --

    def of(self, event: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("event") == event]

    def requests(self, method: str | None = None) -> list[dict[str, Any]]:
        return [e for e in self.of("request") if method is None or e["method"] == method]

    def transcript(self, limit: int = 6000) -> str:
        lines = [json.dumps(e) for e in self.events if e.get("event") != "progress"]
        text = "\n".join(lines)
        if self.stderr:
            text += "\nstderr: " + self.stderr.decode(errors="replace")
        return text[-limit:]


async def run_node(options: dict[str, Any], timeout: float = 45.0) -> tuple[dict[str, Any],
                                                                              NodeUpload]:
    """Run one upload to its end; return its result and the log."""
    async with NodeUpload(options) as node:
        res = await node.result(timeout)
    return res, node


# -- the server's side, as a client sees it ----------------------------------------------------


async def tus_request(method: str, url: str, headers: dict[str, str] | None = None,
                      data: bytes | None = None) -> tuple[int, dict[str, str], bytes]:
    async with aiohttp.ClientSession() as http:
        async with http.request(method, url, headers={**TUS, **(headers or {})},
                                data=data) as resp:
            return resp.status, dict(resp.headers), await resp.read()


async def follow_task(base_url: str, task: str, timeout: float = 30.0
                      ) -> tuple[list[dict[str, Any]], int | None]:
    """Every message of ``/ws/tasks/{task}`` until the server closes it, and the close code
    the server's close frame carried (1006 if the connection ended without one).

    The code is read from the close frame itself (``autoclose=False``): chunkd drops the TCP
    connection right after its close frame without waiting for the client's reply, so a client
    that reads late fails to send that reply and aiohttp then reports 1006 instead of the code
    it received.
    """
    messages: list[dict[str, Any]] = []
    ws_url = base_url.replace("http://", "ws://", 1) + f"/ws/tasks/{task}"
    async with aiohttp.ClientSession() as http:
        async with http.ws_connect(ws_url, heartbeat=None, autoclose=False) as ws:
            async def pump() -> int | None:
                while True:
                    msg = await ws.receive()
                    if msg.type == aiohttp.WSMsgType.TEXT:
                        messages.append(json.loads(msg.data))
                    elif msg.type == aiohttp.WSMsgType.CLOSE:
                        return int(msg.data)
                    elif msg.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
                        return ws.close_code
            try:
                code = await asyncio.wait_for(pump(), timeout)
            except TimeoutError:
                raise AssertionError(f"/ws/tasks/{task} still open after {timeout} s: "
                                     f"{messages[-5:]}") from None
            with contextlib.suppress(Exception):
                await ws.close()
            return messages, code


def completed_file(data_dir: Path, final: dict[str, Any]) -> Path:
    """The handed-off file named by a final ``complete`` message (folder hand-off)."""
    assert final.get("type") == "progress" and final.get("stage") == "complete", final
    location = final.get("location")
    assert isinstance(location, str) and location.startswith("completed/"), final
    path = (data_dir / location).resolve()
    assert path.is_relative_to(data_dir.resolve()), location
    return path


async def wait_disk_at_most(root: Path, limit: int, timeout: float = 5.0) -> int:
    """Poll ``disk_bytes(root)`` until it is at most ``limit`` (or time is up); the last value."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    used = disk_bytes(root)
    while used > limit and loop.time() < deadline:
        await asyncio.sleep(0.2)
        used = disk_bytes(root)
    return used
