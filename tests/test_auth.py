"""Auth and ownership: JWTs from the main app (HS256 only) and API keys; a session is its
creator's. Every endpoint and the WebSocket against every kind of bad credential."""

from __future__ import annotations

import asyncio
import base64
import time

import aiohttp
import jwt
import orjson
import pytest

from chunkd.app import make_app
from chunkd.auth import make_authenticator
from chunkd.config import Config, ConfigError, load_config
from conftest import ChunkdTestServer, chunks_of, session_body

SECRET = "s3cret-shared-with-the-main-app-0123456789-s3cret-shared-with-the-main"
AUDIENCE = "chunkd"
DATA = b"RIFF" + bytes(20_000)  # the body of chunks; never finalized here
CHUNK = 4096


def token(sub: str = "ann", *, ttl: float = 600, aud: str | None = AUDIENCE,
          key: str = SECRET, algorithm: str = "HS256", **claims: object) -> str:
    payload: dict[str, object] = {"sub": sub, "exp": int(time.time() + ttl), **claims}
    if aud is not None:
        payload["aud"] = aud
    return jwt.encode(payload, key, algorithm=algorithm)


def unsigned(sub: str = "ann") -> str:
    """``alg: none``: a token anyone can make."""
    def part(doc: dict) -> str:
        return base64.urlsafe_b64encode(orjson.dumps(doc)).rstrip(b"=").decode()
    return (f"{part({'alg': 'none', 'typ': 'JWT'})}."
            f"{part({'sub': sub, 'exp': int(time.time()) + 600, 'aud': AUDIENCE})}.")


def tampered(good: str) -> str:
    head, payload, sig = good.split(".")
    body = orjson.loads(base64.urlsafe_b64decode(payload + "=="))
    body["sub"] = "bob"  # the signature no longer matches
    forged = base64.urlsafe_b64encode(orjson.dumps(body)).rstrip(b"=").decode()
    return f"{head}.{forged}.{sig}"


ANN_KEY = "ann-script-key-0123456789abcdef"
BOB_KEY = "bob-script-key-0123456789abcdef"


@pytest.fixture
def auth_config(tmp_path) -> Config:
    keys = tmp_path / "keys"
    keys.write_text(f"# subject key\nann-script {ANN_KEY}\nbob {BOB_KEY}\n")
    return Config(min_chunk_size=1024, data_dir=tmp_path / "data", chunk_size=CHUNK, jwt_secret=SECRET,
                  jwt_audience=AUDIENCE, api_keys_file=keys)


@pytest.fixture
async def auth_client(aiohttp_client, auth_config):
    return await aiohttp_client(ChunkdTestServer(make_app(auth_config)))


def bearer(tok: str | None) -> dict[str, str]:
    return {} if tok is None else {"Authorization": f"Bearer {tok}"}


async def new_session(client, tok: str) -> str:
    resp = await client.post("/upload/chunked/session", headers=bearer(tok),
                             json=session_body("a.wav", len(DATA), CHUNK))
    assert resp.status == 201, await resp.text()
    return (await resp.json())["session_id"]


#: (credential, status, code) for a session that belongs to ann.
BAD = [
    ("none", 401, "missing_token"),
    ("expired", 401, "token_expired"),
    ("tampered", 401, "invalid_token"),
    ("alg-none", 401, "invalid_token"),
    ("wrong-audience", 401, "invalid_token"),
    ("hs512", 401, "invalid_token"),
    ("no-exp", 401, "invalid_token"),
    ("unknown-key", 401, "invalid_token"),
    ("other-subject", 403, "forbidden"),
    ("other-subjects-api-key", 403, "forbidden"),
]


def credential(kind: str) -> str | None:
    return {
        "none": None,
        "expired": token(ttl=-30),
        "tampered": tampered(token()),
        "alg-none": unsigned(),
        "wrong-audience": token(aud="another-service"),
        "hs512": token(algorithm="HS512"),
        "no-exp": jwt.encode({"sub": "ann", "aud": AUDIENCE}, SECRET, algorithm="HS256"),
        "unknown-key": "not-a-key-0123456789abcdef",
        "other-subject": token("bob"),
        "other-subjects-api-key": BOB_KEY,
    }[kind]


ENDPOINTS = ["chunk", "status", "finalize", "abort"]


async def call(client, endpoint: str, sid: str, tok: str | None):
    headers = bearer(tok)
    if endpoint == "chunk":
        return await client.post(f"/upload/chunked/{sid}/chunk", params={"index": "0"},
                                 data=DATA[:CHUNK], headers={
                                     **headers, "Content-Type": "application/octet-stream"})
    if endpoint == "status":
        return await client.get(f"/upload/chunked/{sid}/status", headers=headers)
    if endpoint == "finalize":
        return await client.post(f"/upload/chunked/{sid}/finalize", headers=headers)
    return await client.delete(f"/upload/chunked/{sid}/abort", headers=headers)


@pytest.mark.parametrize("endpoint", ENDPOINTS)
@pytest.mark.parametrize("kind, status, code", BAD, ids=[b[0] for b in BAD])
async def test_every_endpoint_refuses_every_bad_credential(auth_client, endpoint, kind, status,
                                                           code):
    sid = await new_session(auth_client, token("ann"))
    resp = await call(auth_client, endpoint, sid, credential(kind))
    assert resp.status == status, await resp.text()
    assert (await resp.json())["error"]["code"] == code
    if status == 401:
        assert resp.headers["WWW-Authenticate"].startswith('Bearer realm="chunkd"')
    state = await auth_client.get(f"/upload/chunked/{sid}/status", headers=bearer(token()))
    assert state.status == 200  # the owner still has it, untouched
    assert (await state.json())["received_chunks"] == 0


@pytest.mark.parametrize("kind, status, code", [b for b in BAD if b[1] == 401],
                         ids=[b[0] for b in BAD if b[1] == 401])
async def test_creating_a_session_needs_a_valid_credential(auth_client, kind, status, code):
    resp = await auth_client.post("/upload/chunked/session", headers=bearer(credential(kind)),
                                  json=session_body("a.wav", len(DATA), CHUNK))
    assert resp.status == status and (await resp.json())["error"]["code"] == code


async def test_unknown_sessions_say_401_before_404(auth_client):
    resp = await auth_client.get("/upload/chunked/00000000-0000-4000-8000-000000000000/status")
    assert resp.status == 401


async def test_the_owner_uploads_with_fresh_tokens_and_api_keys(auth_client):
    """A long upload outlives a short token: each request may bring a new one for the subject."""
    sid = await new_session(auth_client, token("ann", ttl=60))
    for i, part in enumerate(chunks_of(DATA, CHUNK)):
        fresh = token("ann", ttl=60 + i, jti=str(i))
        resp = await auth_client.post(f"/upload/chunked/{sid}/chunk", params={"index": str(i)},
                                      data=part, headers={**bearer(fresh),
                                                          "Content-Type": "application/octet-stream"})
        assert resp.status == 200, await resp.text()
    script_sid = await new_session(auth_client, ANN_KEY)  # an API key is its own subject
    assert (await call(auth_client, "status", script_sid, ANN_KEY)).status == 200
    assert (await call(auth_client, "status", script_sid, token("ann"))).status == 403
    assert (await call(auth_client, "abort", sid, token("ann"))).status == 200


async def test_healthz_stays_open(auth_client):
    assert (await auth_client.get("/healthz")).status == 200


@pytest.mark.parametrize("kind, status", [("none", 401), ("expired", 401), ("alg-none", 401),
                                          ("other-subject", 403)])
async def test_the_websocket_refuses_before_the_handshake(auth_client, kind, status):
    sid = await new_session(auth_client, token("ann"))
    tok = credential(kind)
    query = f"?access_token={tok}" if tok else ""
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await auth_client.ws_connect(f"/ws/tasks/{sid}{query}")
    assert refused.value.status == status


@pytest.mark.parametrize("how", ["query", "header"])
async def test_the_owner_follows_the_websocket(auth_client, how):
    sid = await new_session(auth_client, token("ann"))
    tok = token("ann")
    if how == "query":
        ws = await auth_client.ws_connect(f"/ws/tasks/{sid}?access_token={tok}")
    else:
        ws = await auth_client.ws_connect(f"/ws/tasks/{sid}", headers=bearer(tok))
    msg = orjson.loads((await ws.receive()).data)
    assert msg["type"] == "upload_progress" and msg["session_id"] == sid
    await ws.close()


def test_auth_settings_are_checked_at_start(tmp_path):
    with pytest.raises(ConfigError, match="32 bytes"):
        make_authenticator(Config(min_chunk_size=1024, data_dir=tmp_path, jwt_secret="short"))
    (tmp_path / "s").write_text(SECRET)
    with pytest.raises(ConfigError, match="once"):
        load_config({"jwt_secret": SECRET, "jwt_secret_file": str(tmp_path / "s"),
                     "data_dir": str(tmp_path)}, env={})
    with pytest.raises(ConfigError, match="audience"):
        load_config({"jwt_audience": "x", "data_dir": str(tmp_path)}, env={})
    (tmp_path / "k").write_text("only-a-subject\n")
    with pytest.raises(ConfigError, match="line 1"):
        make_authenticator(Config(min_chunk_size=1024, data_dir=tmp_path, api_keys_file=tmp_path / "k"))
    assert make_authenticator(Config(min_chunk_size=1024, data_dir=tmp_path)) is None  # off by default
    from_file = make_authenticator(Config(min_chunk_size=1024, data_dir=tmp_path, jwt_secret_file=tmp_path / "s"))
    assert from_file is not None and from_file.subject(token(aud=None)) == "ann"


async def test_ownership_holds_across_a_restart_and_no_token_is_logged(server_factory, tmp_path):
    secret = tmp_path / "jwt.secret"
    secret.write_text(SECRET + "\n")
    args = ("--jwt-secret-file", str(secret), "--log-level", "debug", "--chunk-size", "4KiB")
    first = server_factory(*args)
    assert "bearer tokens: JWT (HS256, audience not checked" in "\n".join(first.banner)
    ann, bob = token("ann", aud=None), token("bob", aud=None)
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{first.url}/upload/chunked/session", headers=bearer(ann),
                             json=session_body("a.wav", len(DATA), CHUNK)) as resp:
            assert resp.status == 201
            sid = (await resp.json())["session_id"]
        first.kill9()
        second = server_factory(*args)
        async with http.get(f"{second.url}/upload/chunked/{sid}/status",
                            headers=bearer(bob)) as resp:
            assert resp.status == 403
        async with http.get(f"{second.url}/upload/chunked/{sid}/status",
                            headers=bearer(ann)) as resp:
            assert resp.status == 200
        async with http.ws_connect(f"{second.url}/ws/tasks/{sid}?access_token={ann}") as ws:
            assert orjson.loads((await ws.receive()).data)["session_id"] == sid
        with pytest.raises(aiohttp.WSServerHandshakeError):
            await http.ws_connect(f"{second.url}/ws/tasks/{sid}?access_token={bob}")
    log = second.terminate()
    assert ann not in log and bob not in log and SECRET not in log
    assert SECRET not in "\n".join(second.banner)


async def test_a_token_that_is_not_ascii_is_invalid_not_a_500(auth_client):
    reader, writer = await asyncio.open_connection(auth_client.host, auth_client.port)
    writer.write(b"GET /upload/chunked/00000000-0000-4000-8000-000000000000/status HTTP/1.1\r\n"
                 b"Host: x\r\nAuthorization: Bearer \xff\xfe\xfd\r\nConnection: close\r\n\r\n")
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    assert answer.startswith(b"HTTP/1.1 401") and b'"invalid_token"' in answer


async def test_an_api_keys_subject_is_no_jwt_subject(auth_client):
    """A user whose id happens to be a script's name does not own the script's sessions."""
    script_sid = await new_session(auth_client, ANN_KEY)
    resp = await call(auth_client, "status", script_sid, token("ann-script"))
    assert resp.status == 403
