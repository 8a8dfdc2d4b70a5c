"""chunkd's settings: one frozen dataclass, built from CLI flags, ``CHUNKD_*`` variables and defaults.

Order of precedence: a command-line flag wins over the environment, which wins over the default.
Every value is checked once, at start, by :meth:`Config.validate`; a bad value stops the server
with one clear line instead of failing later in the middle of an upload.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

#: Cloudflare refuses request bodies over 100 MB (decimal); a chunk must stay under it.
PROXY_BODY_LIMIT = 100_000_000

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080
DEFAULT_DATA_DIR = "./data"
DEFAULT_CHUNK_SIZE = 50 * MiB
DEFAULT_MAX_CHUNK_SIZE = 95 * MiB
DEFAULT_MAX_FILE_SIZE = 50 * GiB
DEFAULT_SESSION_TTL = 24 * 3600.0
DEFAULT_SWEEP_INTERVAL = 300.0
DEFAULT_SHUTDOWN_TIMEOUT = 30.0
#: Smallest chunk size the server may be configured to offer (a store may ask for more).
MIN_CHUNK_SIZE = 1 * KiB
#: Smallest chunk a session may use by default: each chunk costs a marker file (an inode and a
#: block), so 1 MiB keeps the bookkeeping under 0.4% of the bytes and under one inode per MiB.
DEFAULT_MIN_CHUNK_SIZE = 1 * MiB

DEFAULT_EXTENSIONS = (
    "mp3", "wav", "m4a", "aac", "ogg", "oga", "opus", "flac", "wma", "amr", "aiff", "aif",
    "webm", "mp4", "m4v", "mkv", "mov", "avi", "wmv", "mpeg", "mpg", "3gp", "ts", "mts",
)
#: What whisperX-FastAPI itself accepts (``ALLOWED_EXTENSIONS`` in its ``app/core/config.py``,
#: upstream and the fork): the default in whisperx mode, so a file the service would refuse is
#: refused at session creation, not after the whole upload.
WHISPERX_EXTENSIONS = (
    "mp3", "wav", "awb", "aac", "ogg", "oga", "m4a", "wma", "amr", "mp4", "mov", "avi", "wmv", "mkv",
)
#: How the WhisperX hand-off authenticates to the service (``--whisperx-credentials``).
CREDENTIAL_MODES = ("service", "user")


class ConfigError(ValueError):
    """A setting has a value chunkd cannot run with; the message names the setting."""


@dataclass(frozen=True)
class Config:
    """All of chunkd's settings. Sizes are bytes, durations seconds."""

    #: Folder holding every session and finished file (``--data-dir`` / ``CHUNKD_DATA_DIR``).
    data_dir: Path = Path(DEFAULT_DATA_DIR)
    #: Address to listen on; 127.0.0.1 by default so nothing is exposed by accident.
    host: str = DEFAULT_HOST
    #: TCP port; 0 picks a free one (the chosen port is printed at start).
    port: int = DEFAULT_PORT
    #: Chunk size offered to clients that do not ask for one (50 MiB).
    chunk_size: int = DEFAULT_CHUNK_SIZE
    #: Smallest chunk a session may use (1 MiB), unless the whole file is smaller.
    min_chunk_size: int = DEFAULT_MIN_CHUNK_SIZE
    #: Largest chunk accepted (95 MiB): must stay under Cloudflare's 100 MB body cap.
    max_chunk_size: int = DEFAULT_MAX_CHUNK_SIZE
    #: Largest file a session may declare (50 GiB).
    max_file_size: int = DEFAULT_MAX_FILE_SIZE
    #: How long a session lives after creation before the sweeper removes it (24 h).
    session_ttl: float = DEFAULT_SESSION_TTL
    #: How often the sweeper looks for expired sessions (5 min).
    sweep_interval: float = DEFAULT_SWEEP_INTERVAL
    #: File-name extensions (lower case, no dot) a session's filename may end with. Empty means
    #: the default for the hand-off: the service's own list in whisperx mode, else common
    #: audio/video.
    allowed_extensions: frozenset[str] = frozenset()
    #: Free space a new session must leave on the data dir's disk: the room in which every
    #: session's bookkeeping (chunk markers, claims, task records) is written, so a session
    #: that got its reservation can always finish.
    min_free_space: int = 64 * MiB
    #: A session that received no chunk for this long (and was not finalized) expires early.
    idle_session_ttl: float = 3600.0
    #: Most bytes all open sessions may reserve together (0: only the disk and min free space).
    max_reserved_bytes: int = 0
    #: Most bytes one client's open sessions may reserve (the subject with auth, else the address).
    max_reserved_bytes_per_subject: int = 200 * GiB
    #: Most open sessions one client may have.
    max_sessions_per_subject: int = 32
    #: Requests a second one client address may make on average (0: no limit)...
    rate_limit: float = 100.0
    #: ...and in one burst.
    rate_burst: int = 1000
    #: Peers whose CF-Connecting-IP / X-Forwarded-For is believed (CIDRs, e.g. Cloudflare's and
    #: the local proxy's); the client address is otherwise the TCP peer.
    trusted_proxies: tuple[str, ...] = ()
    #: fdatasync each chunk before counting it (on by default; off trades safety for speed).
    durable: bool = True
    #: Read large chunk and PATCH bodies straight from the socket into the writer's buffers, in
    #: one worker thread per body (off: through aiohttp's stream, one piece at a time).
    socket_body: bool = True
    #: Seconds SIGTERM waits for in-flight requests before cancelling them.
    shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT
    #: Chunk bodies read at once (each holds at most ~1.5 MiB of buffers); more get 503
    #: ``server_busy`` with ``Retry-After`` before their body is read: memory stays bounded.
    max_concurrent_chunks: int = 64
    #: Of those, most one client (subject, or address without auth) may hold at once.
    max_chunks_per_client: int = 16
    #: A chunk body must send this many bytes a second in every ``body_timeout`` window, or it
    #: is cut off with 408: a trickle cannot hold a slot for hours.
    min_body_rate: int = 8 * KiB
    #: Most connections open at once (also kept below the open-files limit): one beyond it
    #: gets 503 ``server_busy`` at once. Each holds a descriptor and some buffered bytes.
    max_connections: int = 1024
    #: Of those, most from one peer address (an IPv6 /64) that is not in ``trusted_proxies``
    #: (0: no cap): one client cannot hold them all by reconnecting.
    max_connections_per_address: int = 128
    #: A new connection must send its first request's headers within this long.
    header_timeout: float = 15.0
    #: An idle keep-alive connection is closed after this long.
    keepalive_timeout: float = 75.0
    #: A chunk body that sends nothing for this long is cut off with 408 (slow-loris guard).
    body_timeout: float = 60.0
    #: Where tus 1.0 is served (creation: ``POST <tus_path>``, uploads at ``<tus_path><id>``);
    #: the WhisperX fork's frontend uses ``/uploads/files/``. Empty: no tus.
    tus_path: str = "/files/"
    #: Browser origins allowed to call chunkd (CORS), e.g. ``http://localhost:5173``; ``*`` any.
    cors_origins: frozenset[str] = frozenset()
    #: Seconds between WebSocket heartbeats (well inside Cloudflare's 100 s idle cut-off).
    heartbeat_interval: float = 30.0
    #: Where finished files go: ``folder`` (completed/<task_id>/), ``whisperx`` or ``command``.
    handoff: str = "folder"
    #: Base URL of the WhisperX FastAPI service (``handoff=whisperx``).
    whisperx_url: str | None = None
    #: Bearer token sent to the WhisperX service, if it wants one.
    whisperx_token: str | None = None
    #: How long the service may take to answer the submission (it decodes the audio first).
    whisperx_timeout: float = 3600.0
    #: Seconds between two looks at the service's task.
    whisperx_poll_interval: float = 2.0
    #: A task whose status, stage and percentage stay the same this long (or that cannot be
    #: looked at for this long) has been lost by the service: it ends with ``service_stalled``.
    whisperx_stall_timeout: float = 1800.0
    #: Longest a task is followed after its submission (``transcription_timeout`` after that).
    whisperx_max_duration: float = 86400.0
    #: Longest the submission waits in total for a busy service (429/503, ``Retry-After``).
    whisperx_retry_window: float = 900.0
    #: ``service``: submit and follow with ``--whisperx-token``; ``user``: with the credential of
    #: the user who finalized (their ``Authorization`` header, or session cookie + CSRF token).
    whisperx_credentials: str = "service"
    #: Query parameters sent with every submission unless the session sets them, e.g.
    #: ``device=cpu&compute_type=int8`` for a CPU-only service.
    whisperx_defaults: tuple[tuple[str, str], ...] = ()
    #: Proxy ``/ws/tasks/{id}`` for ids chunkd does not know to the service's WebSocket.
    whisperx_ws_proxy: bool = True
    #: Program run with the file's path as its last argument (``handoff=command``).
    handoff_command: str | None = None
    #: Shared HS256 secret of the JWTs the main app signs (turns auth on). Never printed.
    jwt_secret: str | None = field(default=None, repr=False)
    #: The same, read from a file (first line), so it stays out of ``ps`` and the environment.
    jwt_secret_file: Path | None = None
    #: When set, a JWT's ``aud`` must be this.
    jwt_audience: str | None = None
    #: Static API keys for scripts: one ``<subject> <key>`` per line (turns auth on).
    api_keys_file: Path | None = None
    #: Tries of a hand-off step that can succeed later (service down, 5xx) before giving up.
    handoff_retries: int = 5
    #: First pause between those tries, doubled each time (with jitter).
    handoff_retry_delay: float = 1.0

    @property
    def auth_on(self) -> bool:
        """Is a credential source configured (then every request but /healthz needs a token)?"""
        return bool(self.jwt_secret or self.jwt_secret_file or self.api_keys_file)

    @property
    def completed_dir(self) -> Path:
        """Where the folder hand-off puts finished files (``<data_dir>/completed``)."""
        return self.data_dir / "completed"

    def __post_init__(self) -> None:
        if not self.allowed_extensions:  # the hand-off's default list
            default = WHISPERX_EXTENSIONS if self.handoff == "whisperx" else DEFAULT_EXTENSIONS
            object.__setattr__(self, "allowed_extensions", frozenset(default))

    def validate(self) -> Config:
        """Raise :class:`ConfigError` for the first bad value; return ``self`` otherwise."""
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port must be between 0 and 65535, got {self.port}")
        if not self.host:
            raise ConfigError("host must not be empty")
        if self.max_chunk_size >= PROXY_BODY_LIMIT:
            raise ConfigError(
                f"max chunk size {self.max_chunk_size} bytes must stay under Cloudflare's "
                f"{PROXY_BODY_LIMIT}-byte request limit"
            )
        if self.max_chunk_size < MIN_CHUNK_SIZE:
            raise ConfigError(f"max chunk size must be at least {MIN_CHUNK_SIZE} bytes")
        if not MIN_CHUNK_SIZE <= self.min_chunk_size <= self.max_chunk_size:
            raise ConfigError(
                f"min chunk size {self.min_chunk_size} must be between {MIN_CHUNK_SIZE} and the "
                f"max chunk size {self.max_chunk_size}"
            )
        if not self.min_chunk_size <= self.chunk_size <= self.max_chunk_size:
            raise ConfigError(
                f"chunk size {self.chunk_size} must be between the min chunk size "
                f"{self.min_chunk_size} and the max chunk size {self.max_chunk_size}"
            )
        if self.idle_session_ttl <= 0:
            raise ConfigError("idle session lifetime must be positive")
        if min(self.max_reserved_bytes, self.max_reserved_bytes_per_subject,
               self.max_sessions_per_subject, self.rate_burst) < 0 or self.rate_limit < 0:
            raise ConfigError("quotas and rate limits must not be negative")
        if self.rate_limit > 0 and self.rate_burst < 1:
            raise ConfigError("rate burst must be at least 1")
        if self.min_free_space < 0:
            raise ConfigError("min free space must not be negative")
        if self.max_file_size <= 0:
            raise ConfigError("max file size must be positive")
        if self.session_ttl <= 0:
            raise ConfigError("session lifetime must be positive")
        if self.sweep_interval <= 0:
            raise ConfigError("sweep interval must be positive")
        if self.max_concurrent_chunks < 1:
            raise ConfigError("max concurrent chunks must be at least 1")
        if self.max_chunks_per_client < 1:
            raise ConfigError("max chunks per client must be at least 1")
        if self.min_body_rate < 0:
            raise ConfigError("min body rate must not be negative")
        if self.max_connections < 16:
            raise ConfigError("max connections must be at least 16")
        if self.max_connections_per_address < 0:
            raise ConfigError("max connections per address must not be negative")
        if self.header_timeout <= 0 or self.keepalive_timeout <= 0:
            raise ConfigError("header and keep-alive timeouts must be positive")
        if self.body_timeout <= 0:
            raise ConfigError("body timeout must be positive")
        if not 0 < self.heartbeat_interval <= 90:
            raise ConfigError("heartbeat interval must be between 0 and 90 s (Cloudflare cuts at 100 s)")
        if self.tus_path:
            if not re.fullmatch(r"(/[A-Za-z0-9._~-]+)+/", self.tus_path):
                raise ConfigError(f"tus path must look like /files/ (slashes around plain path "
                                  f"parts), not {self.tus_path!r}")
            if self.tus_path.split("/")[1] in ("upload", "ws", "static", "healthz"):
                raise ConfigError(f"tus path {self.tus_path} would hide chunkd's own routes")
        if self.handoff not in ("folder", "whisperx", "command"):
            raise ConfigError(f"handoff must be folder, whisperx or command, not {self.handoff!r}")
        if self.handoff == "whisperx" and not re.match(r"https?://[^/]", self.whisperx_url or ""):
            raise ConfigError("--handoff whisperx needs --whisperx-url http(s)://host[:port]")
        if self.handoff == "command" and not (self.handoff_command or "").strip():
            raise ConfigError("--handoff command needs --handoff-command PROGRAM")
        if self.handoff_retries < 1:
            raise ConfigError("handoff retries must be at least 1")
        if min(self.whisperx_timeout, self.whisperx_poll_interval, self.whisperx_stall_timeout,
               self.whisperx_max_duration) <= 0 or self.whisperx_retry_window < 0:
            raise ConfigError("whisperx timeouts, intervals and durations must be positive")
        if self.whisperx_credentials not in CREDENTIAL_MODES:
            raise ConfigError(f"whisperx credentials must be service or user, not "
                              f"{self.whisperx_credentials!r}")
        if self.handoff_retry_delay < 0:
            raise ConfigError("handoff retry delay must not be negative")
        if self.shutdown_timeout < 0:
            raise ConfigError("shutdown timeout must not be negative")
        for ext in self.allowed_extensions:
            if not re.fullmatch(r"[a-z0-9]{1,10}", ext):
                raise ConfigError(f"bad extension {ext!r}: use lower-case letters and digits, no dot")
        if self.jwt_secret and self.jwt_secret_file is not None:
            raise ConfigError("give the JWT secret once: --jwt-secret or --jwt-secret-file")
        if self.jwt_audience is not None and not (self.jwt_secret or self.jwt_secret_file):
            raise ConfigError("--jwt-audience needs --jwt-secret or --jwt-secret-file")
        if self.data_dir.exists() and not self.data_dir.is_dir():
            raise ConfigError(f"data dir {self.data_dir} exists and is not a folder")
        return self


# -- parsing -------------------------------------------------------------------------------------

_SIZE_UNITS = {
    "": 1, "b": 1,
    "k": KiB, "kb": 1000, "kib": KiB,
    "m": MiB, "mb": 1000**2, "mib": MiB,
    "g": GiB, "gb": 1000**3, "gib": GiB,
    "t": 1024 * GiB, "tb": 1000**4, "tib": 1024 * GiB,
}
_DURATION_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_size(text: str) -> int:
    """``"50MiB"`` → 52428800. Bare numbers are bytes; KB/MB/GB are decimal, K/M/G and KiB/... binary."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _SIZE_UNITS:
        raise ConfigError(f"not a size: {text!r} (try 52428800, 50MiB or 95M)")
    return int(float(m.group(1)) * _SIZE_UNITS[m.group(2).lower()])


def parse_duration(text: str) -> float:
    """``"24h"`` → 86400.0. Bare numbers are seconds."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _DURATION_UNITS:
        raise ConfigError(f"not a duration: {text!r} (try 86400, 24h or 30m)")
    return float(m.group(1)) * _DURATION_UNITS[m.group(2).lower()]


def parse_bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"not a boolean: {text!r} (use on/off)")


def parse_extensions(text: str) -> frozenset[str]:
    found = frozenset(e.strip().lower().lstrip(".") for e in text.split(",") if e.strip())
    if not found:
        raise ConfigError("allowed extensions must not be empty")
    return found


def parse_query(text: str) -> tuple[tuple[str, str], ...]:
    """``device=cpu&compute_type=int8`` → (("device", "cpu"), ("compute_type", "int8"))."""
    try:
        pairs = parse_qsl(text, keep_blank_values=True, strict_parsing=bool(text.strip()))
    except ValueError:
        raise ConfigError(f"not a query string: {text!r} (try device=cpu&compute_type=int8)"
                          ) from None
    return tuple(pairs)


def parse_float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ConfigError(f"not a number: {text!r}") from None


def parse_networks(text: str) -> tuple[str, ...]:
    """``173.245.48.0/20, 10.0.0.1`` → the networks, checked."""
    found = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        try:
            found.append(str(ipaddress.ip_network(part, strict=False)))
        except ValueError:
            raise ConfigError(f"not an address or network: {part!r}") from None
    return tuple(found)


def parse_int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"not an integer: {text!r}") from None


#: field name → parser for its text form (CLI flag value or environment variable).
PARSERS: dict[str, Any] = {
    "data_dir": Path,
    "host": str,
    "port": parse_int,
    "chunk_size": parse_size,
    "min_chunk_size": parse_size,
    "max_chunk_size": parse_size,
    "max_file_size": parse_size,
    "session_ttl": parse_duration,
    "sweep_interval": parse_duration,
    "allowed_extensions": parse_extensions,
    "durable": parse_bool,
    "socket_body": parse_bool,
    "min_free_space": parse_size,
    "idle_session_ttl": parse_duration,
    "max_reserved_bytes": parse_size,
    "max_reserved_bytes_per_subject": parse_size,
    "max_sessions_per_subject": parse_int,
    "rate_limit": parse_float,
    "rate_burst": parse_int,
    "trusted_proxies": parse_networks,
    "shutdown_timeout": parse_duration,
    "heartbeat_interval": parse_duration,
    "body_timeout": parse_duration,
    "header_timeout": parse_duration,
    "max_concurrent_chunks": parse_int,
    "max_chunks_per_client": parse_int,
    "min_body_rate": parse_size,
    "max_connections": parse_int,
    "max_connections_per_address": parse_int,
    "keepalive_timeout": parse_duration,
    "tus_path": lambda text: "" if text.strip().lower() in ("", "off", "none") else (
        "/" + text.strip().strip("/") + "/"),
    "cors_origins": lambda text: frozenset(o.strip() for o in text.split(",") if o.strip()),
    "handoff": str,
    "whisperx_url": str,
    "whisperx_token": str,
    "whisperx_timeout": parse_duration,
    "whisperx_poll_interval": parse_duration,
    "whisperx_stall_timeout": parse_duration,
    "whisperx_max_duration": parse_duration,
    "whisperx_retry_window": parse_duration,
    "whisperx_credentials": str,
    "whisperx_defaults": parse_query,
    "whisperx_ws_proxy": parse_bool,
    "handoff_command": str,
    "jwt_secret": str,
    "jwt_secret_file": Path,
    "jwt_audience": str,
    "api_keys_file": Path,
    "handoff_retries": parse_int,
    "handoff_retry_delay": parse_duration,
}


def env_name(field_name: str) -> str:
    return "CHUNKD_" + field_name.upper()


def load_config(flags: Mapping[str, str | None], env: Mapping[str, str] | None = None) -> Config:
    """Build a validated :class:`Config` from flag texts (``None`` = not given) and the environment."""
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    for f in dataclasses.fields(Config):
        text = flags.get(f.name)
        source = "--" + f.name.replace("_", "-")
        if text is None:
            text = env.get(env_name(f.name))
            source = env_name(f.name)
        if text is None:
            continue
        try:
            values[f.name] = PARSERS[f.name](text)
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from None
    return Config(**values).validate()
