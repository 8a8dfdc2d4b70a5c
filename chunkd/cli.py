"""The ``chunkd`` command: ``chunkd serve [flags]``."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import logging
import resource
import signal
import sys
from concurrent.futures import ThreadPoolExecutor

from aiohttp import web

from chunkd import __version__, bench
from chunkd.api.middleware import JsonErrorAppRunner
from chunkd.app import make_app
from chunkd.client import upload_command
from chunkd.config import Config, ConfigError, env_name, load_config
from chunkd.core.tasks import retry_task
from chunkd.errors import ChunkdError
from chunkd.handoff import ONCE_CLAIMS
from chunkd.handoff.whisperx import check_service_url
from chunkd.keys import DRAIN
from chunkd.model.task import Task
from chunkd.store import FileSystemStore

_HELP = {
    "data_dir": "folder for sessions and finished files (default ./data)",
    "host": "address to listen on (default 127.0.0.1)",
    "port": "TCP port, 0 for any free one (default 8080)",
    "chunk_size": "chunk size offered to clients, e.g. 50MiB (default 50MiB)",
    "min_chunk_size": "smallest chunk a session may use, unless the file is smaller (default 1MiB)",
    "max_chunk_size": "largest chunk accepted; under Cloudflare's 100 MB (default 95MiB)",
    "max_file_size": "largest file a session may declare (default 50GiB)",
    "session_ttl": "session lifetime, e.g. 24h (default 24h)",
    "sweep_interval": "how often expired sessions are removed, e.g. 5m (default 5m)",
    "allowed_extensions": "comma-separated file extensions allowed (default: the WhisperX "
    "service's own list in whisperx mode, else common audio/video)",
    "durable": "fdatasync each chunk before counting it: on|off (default on)",
    "socket_body": "read large bodies straight from the socket in a worker thread: on|off "
                   "(default on; off: through aiohttp's stream)",
    "min_free_space": "free space a new session must leave on the disk (default 64MiB)",
    "idle_session_ttl": "a session with no chunk for this long expires early (default 1h)",
    "max_reserved_bytes": "most bytes all open sessions may reserve (default 0: the disk)",
    "max_reserved_bytes_per_subject": "most bytes one client's open sessions may reserve "
    "(default 200GiB)",
    "max_sessions_per_subject": "most open sessions of one client (default 32)",
    "rate_limit": "requests a second per client address, on average (default 100; 0: off)",
    "rate_burst": "requests per client address in one burst (default 1000)",
    "trusted_proxies": "comma-separated CIDRs whose CF-Connecting-IP/X-Forwarded-For is "
    "believed (default none)",
    "shutdown_timeout": "on SIGTERM, how long in-flight requests may finish (default 30s)",
    "heartbeat_interval": "seconds between WebSocket heartbeats (default 30s)",
    "body_timeout": "cut off a chunk body that sends nothing for this long (default 60s)",
    "header_timeout": "a new connection must send its request headers within (default 15s)",
    "max_concurrent_chunks": "chunk bodies read at once; more get 503 (default 64)",
    "max_chunks_per_client": "of those, most one client may hold (default 16)",
    "min_body_rate": "a chunk body slower than this many bytes/s in any --body-timeout window "
    "is cut off (default 8KiB; 0 off)",
    "max_connections": "open connections at most, kept below the open-files limit; more get "
    "503 (default 1024)",
    "max_connections_per_address": "of those, most from one address that is not a trusted "
    "proxy (default 128; 0 no cap)",
    "keepalive_timeout": "close an idle keep-alive connection after (default 75s)",
    "tus_path": "where tus 1.0 is served, e.g. /uploads/files/ for the WhisperX fork's frontend; off: no tus (default /files/)",
    "cors_origins": "comma-separated browser origins allowed to call chunkd, or * (default none)",
    "handoff": "where finished files go: folder | whisperx | command (default folder)",
    "whisperx_url": "WhisperX FastAPI base URL, e.g. http://127.0.0.1:8000",
    "whisperx_token": "bearer token for the WhisperX service",
    "whisperx_timeout": "how long the service may take to accept a file (default 1h)",
    "whisperx_poll_interval": "how often the service's task is polled (default 2s)",
    "whisperx_stall_timeout": "a task with no progress for this long is lost: service_stalled "
    "(default 30m)",
    "whisperx_max_duration": "longest a task is followed after its submission (default 24h)",
    "whisperx_retry_window": "longest total wait for a busy service (429/503 Retry-After) "
    "(default 15m)",
    "whisperx_credentials": "service: use --whisperx-token; user: the finalizing user's own "
    "Authorization or session cookie + X-CSRF-Token (default service)",
    "whisperx_defaults": "query parameters for every submission unless the session sets them, "
    "e.g. device=cpu&compute_type=int8",
    "whisperx_ws_proxy": "proxy /ws/tasks/{id} for ids chunkd does not know to the service: "
    "on|off (default on)",
    "handoff_command": "program run with the file path as last argument (command hand-off)",
    "jwt_secret": "HS256 secret of the main app's JWTs; turns auth on (prefer the file)",
    "jwt_secret_file": "file holding the JWT secret (first line); turns auth on",
    "jwt_audience": "required aud claim of the JWTs (default: not checked)",
    "api_keys_file": "API keys for scripts, one '<subject> <key>' per line; turns auth on",
    "handoff_retries": "tries for a hand-off step that can succeed later (default 5)",
    "handoff_retry_delay": "first pause between those tries, doubled each time (default 1s)",
}


#: aiohttp stops reading a request body above 2x this and resumes below it: small, so a request
#: whose body is not (yet) being read holds little. A chunk body that got a slot raises it
#: (``chunkd.api.body.BODY_READ_SIZE``).
READ_BUFSIZE = 64 * 1024


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:g} {unit}" if unit == "B" else f"{n:.4g} {unit}"
        n /= 1024
    raise AssertionError


def _duration(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:g}{unit}"
    return f"{seconds:g}s"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="chunkd", description="Chunked, resumable upload server.")
    parser.add_argument("--version", action="version", version=f"chunkd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser(
        "serve",
        help="run the upload server",
        description="Run the upload server. Every flag also reads CHUNKD_<NAME>; a flag wins.",
    )
    for f in dataclasses.fields(Config):
        flag = "--" + f.name.replace("_", "-")
        serve.add_argument(flag, dest=f.name, metavar="VALUE",
                           help=f"{_HELP[f.name]} [{env_name(f.name)}]")
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    retry = sub.add_parser(
        "retry",
        help="hand a failed task off again",
        description="Queue a failed task again; a running chunkd on the same data dir picks it "
        "up within seconds (or at its next start).",
    )
    retry.add_argument("task_id")
    retry.add_argument("--data-dir", dest="data_dir", metavar="DIR",
                       help=f"{_HELP['data_dir']} [{env_name('data_dir')}]")
    upload_command.add_parser(sub)
    bench.add_parser(sub)
    return parser


#: Descriptors kept free of connections: data files, markers, leases, libmagic, WebSocket relays.
RESERVED_FDS = 128


def raise_fd_limit() -> int:
    """Raise the soft open-files limit to the hard one (each connection holds a descriptor, and
    the usual soft 1024 is what idle sockets would exhaust first); the resulting soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def connection_cap(configured: int, soft: int) -> int:
    """``--max-connections``, lowered so that connections never take the last descriptors of
    the ``soft`` open-files limit."""
    if soft == resource.RLIM_INFINITY:
        return configured
    return max(16, min(configured, soft - RESERVED_FDS))


def describe(config: Config, url: str) -> str:
    return "\n".join([
        f"chunkd {__version__} listening on {url}",
        f"  storing in   {config.data_dir.resolve()}",
        f"  chunks       {_human(config.chunk_size)} offered, {_human(config.min_chunk_size)} min, "
        f"{_human(config.max_chunk_size)} max",
        f"  files        {_human(config.max_file_size)} max, "
        f"extensions: {', '.join(sorted(config.allowed_extensions))}",
        "  tus 1.0      "
        + (f"{url.rstrip('/')}{config.tus_path} (PATCH bodies up to "
           f"{_human(config.max_chunk_size)})" if config.tus_path else "off"),
        f"  sessions     expire after {_duration(config.session_ttl)}, swept every "
        f"{_duration(config.sweep_interval)}",
        f"  durability   {'fdatasync every chunk' if config.durable else 'off (no fsync)'}",
        f"  hand-off     {_handoff_line(config)}",
        f"  auth         {_auth_line(config)}",
    ])


def _auth_line(config: Config) -> str:
    if not config.auth_on:
        return "off: anyone who reaches chunkd may upload (set --jwt-secret-file or --api-keys-file)"
    parts = []
    if config.jwt_secret or config.jwt_secret_file:
        aud = (f", audience {config.jwt_audience}" if config.jwt_audience else
               ", audience not checked: give chunkd a secret of its own or set --jwt-audience")
        parts.append(f"JWT (HS256{aud})")
    if config.api_keys_file:
        parts.append(f"API keys from {config.api_keys_file}")
    return "bearer tokens: " + " and ".join(parts)


def _handoff_line(config: Config) -> str:
    if config.handoff == "whisperx":
        who = ("as the finalizing user" if config.whisperx_credentials == "user"
               else "with the service token" if config.whisperx_token else "without a credential")
        return f"whisperx at {config.whisperx_url}, {who}"
    if config.handoff == "command":
        return f"command: {config.handoff_command}"
    return f"folder {config.completed_dir.resolve()}"


async def serve(config: Config) -> None:
    loop = asyncio.get_running_loop()
    # Chunk writes, fsyncs and libmagic run in threads; give parallel uploads enough of them.
    loop.set_default_executor(ThreadPoolExecutor(max_workers=32, thread_name_prefix="chunkd-io"))
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if config.handoff == "whisperx" and config.whisperx_url:
        for line in await check_service_url(config.whisperx_url, config.max_file_size):
            print(f"chunkd: warning: {line}", file=sys.stderr, flush=True)
    app = make_app(config)
    files = raise_fd_limit()
    runner = JsonErrorAppRunner(app, access_log=None, shutdown_timeout=0.5,
                                header_timeout=config.header_timeout,
                                max_connections=connection_cap(config.max_connections, files),
                                max_per_address=config.max_connections_per_address,
                                trusted_proxies=config.trusted_proxies,
                                keepalive_timeout=config.keepalive_timeout,
                                read_bufsize=READ_BUFSIZE)
    await runner.setup()
    site = web.TCPSite(runner, config.host, config.port)
    await site.start()
    addresses = runner.addresses  # the bound (host, port, ...) of each listening socket
    port = addresses[0][1] if addresses else config.port
    host = f"[{config.host}]" if ":" in config.host else config.host
    print(describe(config, f"http://{host}:{port}"), flush=True)
    try:
        await stop.wait()
        await site.stop()  # no new connections
        drain = app[DRAIN]
        print(f"chunkd: shutting down, {drain.active} request(s) in flight", flush=True)
        if not await drain.wait(config.shutdown_timeout):
            print(f"chunkd: cancelling {drain.active} unfinished request(s)", flush=True)
            await drain.cancel()
    finally:
        await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        flags = {f.name: getattr(args, f.name) for f in dataclasses.fields(Config)}
        try:
            config = load_config(flags)
            config.data_dir.mkdir(parents=True, exist_ok=True)
        except (ConfigError, OSError) as exc:
            print(f"chunkd: error: {exc}", file=sys.stderr)
            return 2
        logging.basicConfig(
            level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
        )
        import uvloop

        try:
            with contextlib.suppress(KeyboardInterrupt):
                uvloop.run(serve(config))
        except ConfigError as exc:  # found at start, e.g. a service URL behind Cloudflare
            print(f"chunkd: error: {exc}", file=sys.stderr)
            return 2
        except OSError as exc:  # e.g. the port is taken
            print(f"chunkd: error: cannot listen on {config.host}:{config.port}: "
                  f"{exc.strerror or exc}", file=sys.stderr)
            return 1
        return 0
    if args.command == "retry":
        return _retry(args)
    if args.command == "upload":
        return upload_command.run(args)
    if args.command == "bench":
        return bench.run(args)
    return 2


async def _retry_task(store: FileSystemStore, task_id: str) -> Task:
    sid = await store.resolve(task_id)
    task = (await store.state(sid)).task
    once = ONCE_CLAIMS.get(task.handoff, ()) if task is not None else ()
    return await retry_task(store, task_id, once)


def _retry(args: argparse.Namespace) -> int:
    try:
        config = load_config({"data_dir": args.data_dir})
        if not FileSystemStore.is_data_dir(config.data_dir):
            raise ConfigError(f"{config.data_dir} is not a chunkd data dir")
        store = FileSystemStore(config.data_dir)
        task = asyncio.run(_retry_task(store, args.task_id))
    except (ConfigError, ChunkdError, OSError) as exc:
        print(f"chunkd: error: {getattr(exc, 'message', exc)}", file=sys.stderr)
        return 1
    print(f"task {task.task_id} queued again (attempt {task.attempt}); a running chunkd on "
          f"{config.data_dir} takes it within seconds")
    return 0


if __name__ == "__main__":
    sys.exit(main())
