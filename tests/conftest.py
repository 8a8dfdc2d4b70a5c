"""Shared fixtures: a real chunkd app on 127.0.0.1 (pytest-aiohttp), real files, real processes."""

from __future__ import annotations

import asyncio
import hashlib
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from aiohttp.test_utils import TestServer

from chunkd.api import socket_body
from chunkd.api.middleware import JsonErrorAppRunner
from chunkd.app import make_app
from chunkd.config import Config, KiB

MEDIA = Path(__file__).parent / "media"
#: Read at import, before the autouse fixture below removes every CHUNKD_* variable: CI sets it
#: so that a missing browser fails the browser tests instead of skipping them.
REQUIRE_BROWSER = bool(os.environ.get("CHUNKD_REQUIRE_BROWSER"))


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No CHUNKD_* variable from the developer's shell may change what a test sees."""
    for name in list(os.environ):
        if name.startswith("CHUNKD_"):
            monkeypatch.delenv(name)


@pytest.fixture(autouse=True)
def _bodies_from_the_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every body with a byte still on the wire when its handler starts is read straight from
    the socket (production: only those with 1 MiB or more left), so the suite's small bodies
    check that path's answers too. Bodies aiohttp already holds whole, chunked or encoded
    bodies and ``socket_body=False`` still take aiohttp's stream."""
    monkeypatch.setattr(socket_body, "MIN_DIRECT_BYTES", 1)


@pytest.fixture
def config(tmp_path: Path) -> Config:
    return Config(min_chunk_size=1024, data_dir=tmp_path / "data", chunk_size=4 * KiB, sweep_interval=3600)


class ChunkdTestServer(TestServer):
    """pytest-aiohttp's real loopback server, with the runner ``chunkd serve`` uses."""

    async def _make_runner(self, **kwargs):
        return JsonErrorAppRunner(self.app, **kwargs)


@pytest.fixture
async def client(aiohttp_client, config: Config):
    return await aiohttp_client(ChunkdTestServer(make_app(config)))


@pytest.fixture
async def double_url(aiohttp_server):
    """Start a service double (anything with ``.app()``) on 127.0.0.1; return its base URL."""
    async def start(double) -> str:
        server = await aiohttp_server(double.app(), host="127.0.0.1")
        return str(server.make_url("")).rstrip("/")
    return start


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def session_body(filename: str, size: int, chunk_size: int, **extra: object) -> dict:
    return {
        "filename": filename,
        "total_size": size,
        "chunk_size": chunk_size,
        "total_chunks": math.ceil(size / chunk_size),
        **extra,
    }


def chunks_of(data: bytes, chunk_size: int) -> list[bytes]:
    return [data[i : i + chunk_size] for i in range(0, len(data), chunk_size)]


async def create_session(client, filename: str, data: bytes, chunk_size: int, **extra) -> dict:
    resp = await client.post(
        "/upload/chunked/session", json=session_body(filename, len(data), chunk_size, **extra)
    )
    assert resp.status == 201, await resp.text()
    return await resp.json()


async def put_chunk(client, sid: str, index: int, body: bytes, **headers: str):
    return await client.post(
        f"/upload/chunked/{sid}/chunk",
        params={"index": str(index)},
        data=body,
        headers={"Content-Type": "application/octet-stream", **headers},
    )


async def store_put(store, meta, index: int, data: bytes) -> bool:
    """Write and count one chunk straight through a store (no HTTP); False if counted before."""
    async with store.open_chunk(meta, index, hashed=False) as slot:
        if slot.counted is not None:
            return False
        await slot.writer.write(data)
        await slot.count(await slot.writer.commit())
    return True


async def upload_all(client, filename: str, data: bytes, chunk_size: int) -> str:
    """Create a session and send every chunk in order; return the session id."""
    sid = (await create_session(client, filename, data, chunk_size))["session_id"]
    for i, chunk in enumerate(chunks_of(data, chunk_size)):
        resp = await put_chunk(client, sid, i, chunk)
        assert resp.status == 200, await resp.text()
    return sid


async def http_upload(http, url: str, filename: str, data: bytes, chunk_size: int,
                      headers: dict[str, str] | None = None) -> str:
    """Create a session on a chunkd process at ``url`` and send every chunk; the session id."""
    async with http.post(f"{url}/upload/chunked/session", headers=headers or {},
                         json=session_body(filename, len(data), chunk_size)) as resp:
        assert resp.status == 201, await resp.text()
        sid = (await resp.json())["session_id"]
    for i, part in enumerate(chunks_of(data, chunk_size)):
        async with http.post(f"{url}/upload/chunked/{sid}/chunk", params={"index": i}, data=part,
                             headers={"Content-Type": "application/octet-stream",
                                      **(headers or {})}) as resp:
            assert resp.status == 200, await resp.text()
    return sid


async def raw_partial(client, sid: str, index: int, body: bytes, sent: int):
    """A chunk request whose body stops after ``sent`` of its bytes (the socket stays open)."""
    reader, writer = await asyncio.open_connection(client.host, client.port)
    writer.write(
        f"POST /upload/chunked/{sid}/chunk?index={index} HTTP/1.1\r\nHost: x\r\n"
        f"Content-Type: application/octet-stream\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        + body[:sent])
    await writer.drain()
    return reader, writer


async def status_line(reader) -> bytes:
    return (await asyncio.wait_for(reader.readline(), 10)).strip()


class ServerProcess:
    """``python -m chunkd serve`` as a real subprocess on 127.0.0.1 with a free port."""

    def __init__(self, data_dir: Path, *args: str, env: dict[str, str] | None = None,
                 prefix: tuple[str, ...] = ()) -> None:
        self.data_dir = data_dir
        self.args = args
        self.env = env or {}
        self.prefix = prefix  # e.g. ("prlimit", "--nofile=1024:1024")
        self.proc: subprocess.Popen[str] | None = None
        self.url = ""
        self.banner: list[str] = []

    def start(self, timeout: float = 20.0) -> ServerProcess:
        cmd = [*self.prefix, sys.executable, "-m", "chunkd", "serve", "--host", "127.0.0.1", "--port", "0",
               "--data-dir", str(self.data_dir), *self.args]
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            # the tests' sessions use small chunks (the default minimum is 1 MiB)
            env={"CHUNKD_MIN_CHUNK_SIZE": "1KiB", **os.environ, **self.env},
        )
        deadline = time.monotonic() + timeout
        assert self.proc.stdout is not None
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"chunkd exited: {self.banner}")
            self.banner.append(line.rstrip())
            if " listening on " in line:
                self.url = line.split(" listening on ")[1].strip()
                # keep reading the banner's other lines
                for _ in range(8):
                    self.banner.append(self.proc.stdout.readline().rstrip())
                return self
        raise RuntimeError("chunkd did not start in time")

    def kill9(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def terminate(self, timeout: float = 30.0) -> str:
        """SIGTERM, wait for exit, return the rest of its output."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGTERM)
        out, _ = self.proc.communicate(timeout=timeout)
        return out

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


@pytest.fixture
def server_factory(tmp_path: Path):
    started: list[ServerProcess] = []

    def start(*args: str, data_dir: Path | None = None, env: dict[str, str] | None = None,
              prefix: tuple[str, ...] = ()):
        srv = ServerProcess(data_dir or tmp_path / "data", *args, env=env, prefix=prefix).start()
        started.append(srv)
        return srv

    yield start
    for srv in started:
        srv.stop()
