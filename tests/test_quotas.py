"""Quotas and limits: sessions and reserved bytes per client and in total, idle sessions expiring
early, a request rate limit per address (behind trusted proxies: the real client's)."""

from __future__ import annotations

import os
import time

import pytest

from chunkd.app import make_app
from chunkd.config import Config, ConfigError, load_config
from chunkd.core.sweeper import sweep
from chunkd.keys import STORE
from conftest import MEDIA, ChunkdTestServer, session_body, upload_all

CHUNK = 4096


async def app_client(aiohttp_client, tmp_path, **cfg):
    config = Config(min_chunk_size=1024, data_dir=tmp_path / "data", chunk_size=CHUNK, sweep_interval=3600, **cfg)
    return await aiohttp_client(ChunkdTestServer(make_app(config)))


async def create(client, size: int = 10_000, **headers: str):
    return await client.post("/upload/chunked/session", headers=headers,
                             json=session_body("a.wav", size, CHUNK))


async def error(resp) -> str:
    return (await resp.json())["error"]["code"]


async def test_sessions_per_client(aiohttp_client, tmp_path):
    client = await app_client(aiohttp_client, tmp_path, max_sessions_per_subject=2)
    first = (await (await create(client)).json())["session_id"]
    assert (await create(client)).status == 201
    third = await create(client)
    assert third.status == 429 and await error(third) == "session_quota"
    # another client (behind no trusted proxy, a forged header changes nothing)...
    forged = await create(client, **{"X-Forwarded-For": "203.0.113.9"})
    assert forged.status == 429
    # ...but ending one frees a place
    assert (await client.delete(f"/upload/chunked/{first}/abort")).status == 200
    assert (await create(client)).status == 201


async def test_reserved_bytes_per_client_and_in_total(aiohttp_client, tmp_path):
    client = await app_client(aiohttp_client, tmp_path, max_reserved_bytes_per_subject=50_000,
                              max_reserved_bytes=0)
    assert (await create(client, 40_000)).status == 201
    over = await create(client, 20_000)
    assert over.status == 429 and await error(over) == "storage_quota"
    assert (await create(client, 10_000)).status == 201  # exactly up to the quota

    total = await app_client(aiohttp_client, tmp_path / "t", max_reserved_bytes=30_000)
    assert (await create(total, 20_000)).status == 201
    full = await create(total, 20_000)
    assert full.status == 507 and await error(full) == "insufficient_storage"


async def test_behind_a_trusted_proxy_each_client_counts_alone(aiohttp_client, tmp_path):
    client = await app_client(aiohttp_client, tmp_path, max_sessions_per_subject=1,
                              trusted_proxies=("127.0.0.0/8",))
    assert (await create(client, **{"CF-Connecting-IP": "198.51.100.1"})).status == 201
    assert (await create(client, **{"CF-Connecting-IP": "198.51.100.2"})).status == 201
    again = await create(client, **{"CF-Connecting-IP": "198.51.100.1"})
    assert again.status == 429
    # X-Forwarded-For: the nearest address that is not a trusted proxy
    xff = {"X-Forwarded-For": "198.51.100.7, 127.0.0.5"}
    assert (await create(client, **xff)).status == 201
    assert (await create(client, **xff)).status == 429


def _epoch(text: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


async def test_an_idle_session_expires_early(aiohttp_client, tmp_path):
    client = await app_client(aiohttp_client, tmp_path, idle_session_ttl=600)
    store = client.server.app[STORE]
    created = await (await create(client)).json()
    idle = created["session_id"]
    # the reply says when it expires: the idle deadline, not the 24 h lifetime
    assert abs(_epoch(created["expires_at"]) - (time.time() + 600)) < 5
    active = (await (await create(client)).json())["session_id"]
    data = tmp_path / "data" / "sessions" / idle / "data"
    old = time.time() - 1000
    os.utime(data, (old, old))  # no chunk for over 16 minutes
    # past its idle deadline: expired at once (not only at the next sweep), chunks too
    gone = await client.get(f"/upload/chunked/{idle}/status")
    assert gone.status == 410 and await error(gone) == "session_expired"
    late = await client.post(f"/upload/chunked/{idle}/chunk?index=0", data=b"x" * CHUNK,
                             headers={"Content-Type": "application/octet-stream"})
    assert late.status == 410
    status = await (await client.get(f"/upload/chunked/{active}/status")).json()
    assert abs(_epoch(status["expires_at"]) - (time.time() + 600)) < 5
    removed = await sweep(store, time.time(), idle_ttl=600)
    assert removed == [idle]
    assert (await client.get(f"/upload/chunked/{idle}/status")).status == 410
    assert (await client.get(f"/upload/chunked/{active}/status")).status == 200


async def test_the_request_rate_is_limited_per_address(aiohttp_client, tmp_path):
    client = await app_client(aiohttp_client, tmp_path, rate_limit=1, rate_burst=5)
    answers = [(await client.get("/upload/chunked/00000000-0000-4000-8000-000000000000/status"))
               for _ in range(8)]
    statuses = [r.status for r in answers]
    assert statuses[:5] == [404] * 5 and 429 in statuses[5:]
    limited = next(r for r in answers if r.status == 429)
    assert await error(limited) == "rate_limited"
    assert int(limited.headers["Retry-After"]) >= 1
    assert (await client.get("/healthz")).status == 200  # health checks are never limited


def test_limit_settings_are_checked(tmp_path):
    with pytest.raises(ConfigError, match="network"):
        load_config({"trusted_proxies": "not-an-ip", "data_dir": str(tmp_path)}, env={})
    with pytest.raises(ConfigError, match="negative"):
        load_config({"max_sessions_per_subject": "-1", "data_dir": str(tmp_path)}, env={})
    c = load_config({"max_reserved_bytes_per_subject": "1GiB", "idle_session_ttl": "30m",
                     "rate_limit": "2.5", "data_dir": str(tmp_path)}, env={})
    assert (c.max_reserved_bytes_per_subject, c.idle_session_ttl, c.rate_limit) == (
        1 << 30, 1800.0, 2.5)


async def test_concurrent_creates_cannot_overshoot_the_quota(aiohttp_client, tmp_path):
    import asyncio

    client = await app_client(aiohttp_client, tmp_path, max_sessions_per_subject=2)
    answers = await asyncio.gather(*(create(client) for _ in range(30)))
    assert sorted(r.status for r in answers) == [201, 201] + [429] * 28


@pytest.mark.parametrize("headers", [
    [{"CF-Connecting-IP": f"junk{i}"} for i in range(3)],  # not addresses: not believed
    [{"CF-Connecting-IP": f"2001:db8:1:2::{i}"} for i in range(1, 4)],  # one /64: one client
])
async def test_forwarded_addresses_cannot_mint_new_clients(aiohttp_client, tmp_path, headers):
    client = await app_client(aiohttp_client, tmp_path, max_sessions_per_subject=1,
                              trusted_proxies=("127.0.0.0/8",))
    statuses = [(await create(client, **h)).status for h in headers]
    assert statuses == [201, 429, 429]


async def test_a_slow_or_big_session_request_is_cut_off(aiohttp_client, tmp_path):
    import asyncio

    client = await app_client(aiohttp_client, tmp_path, body_timeout=0.5)
    big = await client.post("/upload/chunked/session", data=b"{" + b" " * 70_000 + b"}",
                            headers={"Content-Type": "application/json"})
    assert big.status == 413
    reader, writer = await asyncio.open_connection(client.host, client.port)
    writer.write(b"POST /upload/chunked/session HTTP/1.1\r\nHost: x\r\n"
                 b"Content-Type: application/json\r\nContent-Length: 500\r\n\r\n{\"file")
    await writer.drain()
    line = await asyncio.wait_for(reader.readline(), 5)
    writer.close()
    assert b"408" in line


async def test_a_finalized_session_still_handing_off_counts_in_the_total(aiohttp_client, tmp_path):
    import asyncio
    import sys

    wav = (MEDIA / "speech.wav").read_bytes()
    script = tmp_path / "slow.py"
    script.write_text("import time\ntime.sleep(3)\n")
    client = await app_client(aiohttp_client, tmp_path, max_reserved_bytes=len(wav) + 50_000,
                              handoff="command", handoff_command=f"{sys.executable} {script}")
    sid = await upload_all(client, "speech.wav", wav, CHUNK)
    assert (await client.post(f"/upload/chunked/{sid}/finalize")).status == 200
    # its bytes are still on disk while the hand-off runs: they count against the total
    over = await create(client, 60_000)
    assert over.status == 507 and await error(over) == "insufficient_storage"
    for _ in range(100):  # once the hand-off is over, the room is free again (within the
        if (await create(client, 60_000)).status == 201:  # second a scan is reused)
            break
        await asyncio.sleep(0.1)
    else:
        raise AssertionError("the finished hand-off's bytes still count")
    status = await (await client.get(f"/upload/chunked/{sid}/status")).json()
    assert status["status"] == "completed"
