"""Two ends of one session at once (abort + abort, abort + finalize), in one process and in
two: one wins, the other gets a clear 4xx, never a 500, and nothing is left behind."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from conftest import MEDIA, http_upload

SPEECH = (MEDIA / "speech.wav").read_bytes()
CHUNK = 64 * 1024
ROUNDS = 30


async def ready_session(http: aiohttp.ClientSession, url: str) -> str:
    return await http_upload(http, url, "speech.wav", SPEECH, CHUNK)


async def end(http: aiohttp.ClientSession, url: str, sid: str, how: str) -> tuple[int, str]:
    method, path = ("DELETE", "abort") if how == "abort" else ("POST", "finalize")
    async with http.request(method, f"{url}/upload/chunked/{sid}/{path}") as resp:
        doc = await resp.json()
        return resp.status, (doc.get("error") or {}).get("code", "")


@pytest.mark.parametrize("pair", [("abort", "abort"), ("abort", "finalize")])
@pytest.mark.parametrize("processes", [1, 2])
async def test_concurrent_ends_never_500_and_leave_nothing(server_factory, tmp_path, pair,
                                                           processes):
    servers = [server_factory()] if processes == 1 else [server_factory(), server_factory()]
    outcomes: list[tuple[str, int]] = []
    async with aiohttp.ClientSession() as http:
        for n in range(ROUNDS):
            sid = await ready_session(http, servers[0].url)
            urls = [servers[i % len(servers)].url for i in range(2)]
            got = await asyncio.gather(*(end(http, u, sid, how) for u, how in zip(urls, pair, strict=True)))
            outcomes += [(how, status) for how, (status, _) in zip(pair, got, strict=True)]
            statuses = sorted(status for status, _ in got)
            assert 500 not in statuses, (n, got)
            assert statuses[0] == 200, (n, got)  # exactly one wins...
            assert statuses[1] in (200, 409, 410), (n, got)  # ...the other is told why
    data = servers[0].data_dir
    entries = [p for p in (data / "tasks").iterdir() if not p.name.startswith(".")]
    # A task id is indexed only for a finalize that won: its session is there, with its task.
    assert all((data / "sessions" / p.read_text().strip()).is_dir() for p in entries)
    assert len(entries) == outcomes.count(("finalize", 200))
    assert [p for p in data.rglob("*") if ".tmp" in p.name] == []
