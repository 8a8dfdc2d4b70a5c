"""Who may do what: the request's subject (when auth is on) and each session's owner.

With auth off (no credential source configured) everyone may do everything and sessions have
no owner. With it on, a request without a valid token is refused with 401 before anything else
is looked at, and a session can only be touched by the subject that created it (403).
"""

from __future__ import annotations

from aiohttp import web

from chunkd import errors as E
from chunkd.auth import bearer_token
from chunkd.keys import AUTH
from chunkd.model.session import SessionMeta


def subject_of(request: web.Request, *, websocket: bool = False) -> str | None:
    """The authenticated subject, or None when auth is off. A WebSocket may carry its token as
    ``?access_token=`` (browsers cannot set headers on one)."""
    auth = request.app.get(AUTH)
    if auth is None:
        return None
    return auth.subject(bearer_token(request.headers, request.query if websocket else None))


def check_owner(meta: SessionMeta, subject: str | None) -> None:
    """403 unless auth is off or ``subject`` created the session."""
    if subject is not None and meta.owner != subject:
        raise E.FORBIDDEN()
