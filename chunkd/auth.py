"""Who is asking: JWTs signed by the main app, and static API keys for scripts.

Off unless a credential source is configured (``--jwt-secret``/``--jwt-secret-file``,
``--api-keys-file``), so ``chunkd serve`` stays zero-config. When on, every request but
``/healthz`` carries ``Authorization: Bearer <token>`` (a WebSocket may use ``?access_token=``:
browsers cannot set headers there), and the token names a *subject*: the user. A session
belongs to the subject that created it.

- A JWT is checked with PyJWT: HS256 only (``alg: none`` and every other algorithm refused),
  a valid signature, ``sub`` and ``exp`` required, ``aud`` checked when ``--jwt-audience`` is set.
- An API key is one line ``<subject> <key>`` of the keys file, compared in constant time; its
  subject is ``key:<subject>``, so no JWT ``sub`` can own a script's sessions.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import jwt

from chunkd import errors as E
from chunkd.config import Config, ConfigError

#: The only signing algorithm accepted (a shared secret with the main app).
ALGORITHMS = ["HS256"]
#: A secret shorter than this is refused at start (RFC 7518: at least the hash's size).
MIN_SECRET_BYTES = 32
#: ``exp`` (and ``nbf``) are checked with this much slack for the main app's clock.
CLOCK_SKEW_SECONDS = 30
#: An API key's subject is ``key:<name>``: never the same as a JWT's ``sub`` (a user id).
API_KEY_SUBJECT_PREFIX = "key:"


@dataclass(frozen=True)
class Authenticator:
    """Turns a bearer token into its subject, or raises 401 (``missing_token``,
    ``invalid_token``, ``token_expired``)."""

    secret: bytes | None
    audience: str | None
    api_keys: tuple[tuple[str, bytes], ...]  # (subject, key)

    def subject(self, token: str | None) -> str:
        if not token:
            raise E.MISSING_TOKEN()
        try:
            raw = token.encode("ascii")  # a token is ASCII; anything else is no token of ours
        except UnicodeError:
            raise E.INVALID_TOKEN() from None
        by_key = self._api_key_subject(raw)
        if by_key is not None:
            return by_key
        if self.secret is None:
            raise E.INVALID_TOKEN()
        try:
            claims = jwt.decode(token, self.secret, algorithms=ALGORITHMS,
                                audience=self.audience, leeway=CLOCK_SKEW_SECONDS,
                                options={"require": ["sub", "exp"],
                                         "verify_aud": self.audience is not None})
        except jwt.ExpiredSignatureError:
            raise E.TOKEN_EXPIRED() from None
        except (jwt.PyJWTError, UnicodeError, ValueError):
            raise E.INVALID_TOKEN() from None
        sub = claims.get("sub")
        if not isinstance(sub, str) or not sub:
            raise E.INVALID_TOKEN()
        return sub

    def _api_key_subject(self, token: bytes) -> str | None:
        # Digests of equal length are compared (no length to time), every key (no early exit).
        digest = hashlib.sha256(token).digest()
        found = None
        for subject, key in self.api_keys:
            if hmac.compare_digest(digest, hashlib.sha256(key).digest()):
                found = API_KEY_SUBJECT_PREFIX + subject
        return found


def bearer_token(headers: Mapping[str, str], query: Mapping[str, str] | None = None) -> str | None:
    """The token of ``Authorization: Bearer``, else (a WebSocket) of ``?access_token=``."""
    auth = headers.get("Authorization", "")
    scheme, _, value = auth.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    if query is not None and query.get("access_token"):
        return query["access_token"]
    return None


def load_api_keys(path: Path) -> tuple[tuple[str, bytes], ...]:
    """``<subject> <key>`` per line; blank lines and ``#`` comments skipped."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"--api-keys-file {path}: {exc.strerror or exc}") from None
    keys = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) != 2 or len(parts[1]) < 16:
            raise ConfigError(f"--api-keys-file {path}, line {number}: expected '<subject> <key>' "
                              "with a key of at least 16 characters")
        keys.append((parts[0], parts[1].encode()))
    if not keys:
        raise ConfigError(f"--api-keys-file {path} has no keys")
    return tuple(keys)


def make_authenticator(config: Config) -> Authenticator | None:
    """The authenticator ``config`` asks for; None when auth is off (no credential source)."""
    secret = config.jwt_secret
    if config.jwt_secret_file is not None:
        try:
            secret = config.jwt_secret_file.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(f"--jwt-secret-file {config.jwt_secret_file}: "
                              f"{exc.strerror or exc}") from None
    keys = load_api_keys(config.api_keys_file) if config.api_keys_file is not None else ()
    if not secret and not keys:
        return None
    if secret and len(secret.encode()) < MIN_SECRET_BYTES:
        raise ConfigError(f"the JWT secret must be at least {MIN_SECRET_BYTES} bytes")
    return Authenticator(secret.encode() if secret else None, config.jwt_audience, keys)
