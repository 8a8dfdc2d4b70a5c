"""Who may do what: the request's subject (when auth is on) and each session's owner.

With auth off (no credential source configured) everyone may do everything and sessions have
no owner. With it on, a request without a valid token is refused with 401 before anything else
is looked at, and a session can only be touched by the subject that created it (403).
"""

from __future__ import annotations

import functools
import ipaddress

from aiohttp import web

from chunkd import errors as E
from chunkd.auth import bearer_token
from chunkd.keys import AUTH, CONFIG, STORE
from chunkd.model.session import SessionMeta


def subject_of(request: web.Request, *, websocket: bool = False) -> str | None:
    """The authenticated subject, or None when auth is off. A WebSocket may carry its token as
    ``?access_token=`` (browsers cannot set headers on one)."""
    auth = request.app.get(AUTH)
    if auth is None:
        return None
    # Verified once per request (the rate limit, the owner check and the quota client all ask).
    cached = request.get(_SUBJECT)
    if cached is not None and cached[0] == websocket:
        return cached[1]
    subject = auth.subject(bearer_token(request.headers, request.query if websocket else None))
    request[_SUBJECT] = (websocket, subject)
    return subject


#: Where a request keeps its verified subject (with the ``websocket`` flag it was read with).
_SUBJECT = web.RequestKey("chunkd_subject", tuple[bool, str])


def known_subject(request: web.Request) -> str | None:
    """The subject of the request's credential if it has a valid one, else None (no refusal
    here: the handler refuses, with the right code)."""
    if request.app.get(AUTH) is None:
        return None
    try:
        return subject_of(request, websocket=request.path.startswith("/ws/"))
    except E.ChunkdError:
        return None


@functools.lru_cache(maxsize=8)
def _networks(cidrs: tuple[str, ...]) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    return tuple(ipaddress.ip_network(c, strict=False) for c in cidrs)


def trusted(address: str, cidrs: tuple[str, ...]) -> bool:
    """Is ``address`` inside one of ``cidrs``?"""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in net for net in _networks(cidrs))


def client_address(request: web.Request) -> str:
    """The client's address: the TCP peer, unless the peer is a trusted proxy
    (``--trusted-proxies``): then ``CF-Connecting-IP``, else the nearest untrusted address of
    ``X-Forwarded-For``. Headers from anyone else are ignored (they are trivially forged)."""
    peer = request.remote or "unknown"
    cidrs = request.app[CONFIG].trusted_proxies
    if not cidrs or not trusted(peer, cidrs):
        return address_key(peer) or peer  # an IPv6 peer counts as its /64 too
    cf = address_key(request.headers.get("CF-Connecting-IP", ""))
    if cf is not None:
        return cf
    hops = [h.strip() for h in request.headers.get("X-Forwarded-For", "").split(",") if h.strip()]
    for hop in reversed(hops):
        if not trusted(hop, cidrs):
            return address_key(hop) or peer  # not an address: the proxy itself is the client
    return peer


def address_key(text: str) -> str | None:
    """A client key from a forwarded address: the address, an IPv6 one as its /64 (one
    client holds a whole /64); None if it is no address at all."""
    try:
        ip = ipaddress.ip_address(text.strip())
    except ValueError:
        return None
    if ip.version == 6:
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)


def quota_client(request: web.Request, subject: str | None) -> str:
    """Who a new session counts against: the subject with auth, else the client's address."""
    return subject if subject is not None else f"address:{client_address(request)}"


def check_owner(meta: SessionMeta, subject: str | None) -> None:
    """403 unless auth is off or ``subject`` created the session."""
    if subject is not None and meta.owner != subject:
        raise E.FORBIDDEN()


async def owned_session(request: web.Request, session_id: str, protocol: str = "chunked"
                        ) -> SessionMeta:
    """The session's metadata for this request: 401 without a valid token (before the session
    is looked up), 404/410 as the store says (404 too for a session of the other
    ``protocol``), 403 if it is another subject's."""
    subject = subject_of(request)
    meta = await request.app[STORE].get(session_id)
    if meta.protocol != protocol:  # a tus upload is no chunk-API session, nor the reverse
        raise E.SESSION_NOT_FOUND()
    check_owner(meta, subject)
    return meta
