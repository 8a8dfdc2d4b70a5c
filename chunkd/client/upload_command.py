"""``chunkd upload FILE --url URL``: upload with a progress bar; run it again to resume.

The session of an interrupted upload is remembered in a small state file under the user's cache
dir (``$XDG_CACHE_HOME/chunkd/uploads.json``), keyed by server, path, inode, size, mtime and
ctime: the same command on the same unchanged file resumes it, sending only the missing chunks;
a file changed in any way starts a new session.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
from pathlib import Path
from typing import Any

import orjson
from tqdm import tqdm

from chunkd.atomic import read_json, write_json_atomic
from chunkd.client.core import ChunkdClient, ChunkdClientError, Progress
from chunkd.client.sources import FileSource
from chunkd.config import ConfigError, parse_size


def state_path() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "chunkd" / "uploads.json"


class ResumeState:
    """url + file identity → session id, in one small JSON file (atomic replace)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def _load(self) -> dict[str, Any]:
        try:
            return read_json(self.path) or {}
        except (orjson.JSONDecodeError, OSError):
            return {}  # a damaged state file only costs a fresh upload

    def key(self, url: str, source: FileSource) -> str:
        """Server + this exact version of the file (path, device, inode, size, mtime, ctime)."""
        version = "|".join(str(v) for v in source.identity)
        return f"{url.rstrip('/')}|{source.path.resolve()}|{version}"

    def get(self, key: str) -> str | None:
        return self._load().get(key)

    def put(self, key: str, session_id: str | None) -> None:
        doc = self._load()
        if session_id is None:
            doc.pop(key, None)
        else:
            doc[key] = session_id
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.path, doc)


def add_parser(sub: Any) -> None:
    p = sub.add_parser("upload", help="upload a file to a chunkd server (resumable)",
                       description="Upload FILE in chunks. If interrupted, run the same command "
                       "again: it resumes where it stopped.")
    p.add_argument("file")
    p.add_argument("--url", required=True, help="the chunkd server, e.g. http://127.0.0.1:8080")
    p.add_argument("--language")
    p.add_argument("--model")
    p.add_argument("--task-params", help='JSON object for the hand-off, e.g. \'{"min_speakers": 2}\'')
    p.add_argument("--parallel", type=int, default=4, help="chunks in flight (default 4)")
    p.add_argument("--chunk-size", help="chunk size, e.g. 50MiB (default: the server's)")
    p.add_argument("--wait", action="store_true",
                   help="after the upload, follow the processing and print the result")
    p.add_argument("--token", default=os.environ.get("CHUNKD_TOKEN"),
                   help="chunkd's bearer token, for a server with auth on (default: $CHUNKD_TOKEN)")
    p.add_argument("--header", action="append", default=[], metavar="'NAME: VALUE'",
                   help="send this header with every request, e.g. 'Authorization: Bearer "
                   "whsk_...' for a server that acts as you towards the transcription service "
                   "(repeatable)")
    p.add_argument("--no-resume", action="store_true", help="start a new session")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    try:
        return asyncio.run(_run(args))
    except KeyboardInterrupt:
        print("\nchunkd upload: interrupted; run the same command again to resume",
              file=sys.stderr)
        return 130


def _fail(message: str) -> int:
    print(f"chunkd upload: error: {message}", file=sys.stderr)
    return 1


async def _run(args: argparse.Namespace) -> int:
    if not args.url.startswith(("http://", "https://")):
        return _fail(f"--url must start with http:// or https:// (got {args.url!r})")
    try:
        source = FileSource(args.file)
    except OSError as exc:
        return _fail(f"cannot read {args.file}: {exc.strerror or exc}")
    if source.size == 0:
        return _fail(f"{args.file} is empty")
    try:
        chunk_size = parse_size(args.chunk_size) if args.chunk_size is not None else None
        if chunk_size is not None and chunk_size <= 0:
            raise ConfigError("--chunk-size must be positive")
        task_params = orjson.loads(args.task_params) if args.task_params else None
    except (ConfigError, orjson.JSONDecodeError) as exc:
        return _fail(str(exc))
    if task_params is not None and not isinstance(task_params, dict):
        return _fail("--task-params must be a JSON object")
    if args.parallel < 1:
        return _fail("--parallel must be at least 1")
    headers = {}
    for text in args.header:
        name, colon, value = text.partition(":")
        if not colon or not name.strip() or not value.strip():
            return _fail(f"--header must look like 'Name: value' (got {text!r})")
        headers[name.strip()] = value.strip()

    state = ResumeState(state_path())
    key = state.key(args.url, source)
    session_id = None if args.no_resume else state.get(key)
    bar = tqdm(total=source.size, unit="B", unit_scale=True, unit_divisor=1024,
               desc=source.name, disable=args.quiet, dynamic_ncols=True)

    def on_progress(p: Progress) -> None:
        bar.n = p.done_bytes
        bar.set_postfix_str(f"{p.done_chunks}/{p.total_chunks} chunks", refresh=False)
        bar.refresh()

    async with ChunkdClient(args.url, parallel=args.parallel, chunk_size=chunk_size,
                            headers=headers, token=args.token or None) as client:
        try:
            try:
                result = await client.upload(
                    source, session_id=session_id, language=args.language, model=args.model,
                    task_params=task_params, on_progress=on_progress,
                    on_session=lambda sid: state.put(key, sid),
                )
            except ChunkdClientError as exc:
                if session_id is None or exc.status not in (404, 410):
                    raise
                # The remembered session is gone (expired, aborted, swept): start afresh.
                state.put(key, None)
                bar.n = 0
                result = await client.upload(
                    source, language=args.language, model=args.model, task_params=task_params,
                    on_progress=on_progress, on_session=lambda sid: state.put(key, sid),
                )
        except ChunkdClientError as exc:
            bar.close()
            if exc.code == "file_changed":
                state.put(key, None)  # that session holds another version of the file
            return _fail(exc.message)
        except OSError as exc:
            bar.close()
            return _fail(f"cannot read {args.file}: {exc.strerror or exc}")
        bar.n = source.size
        bar.close()
        state.put(key, None)
        resumed = " (resumed)" if session_id and result.session_id == session_id else ""
        print(f"uploaded {source.name}{resumed}: {result.sent_bytes} bytes sent in "
              f"{result.elapsed:.1f} s; session {result.session_id}, task {result.task_id}")
        if not args.wait:
            return 0
        return await _follow(client, result.task_id or result.session_id, args.quiet)


async def _follow(client: ChunkdClient, task_id: str, quiet: bool) -> int:
    bar = tqdm(total=100, unit="%", desc="processing", disable=quiet, dynamic_ncols=True,
               bar_format="{desc}: {percentage:3.0f}%|{bar}| {postfix}")

    def on_message(msg: dict[str, Any]) -> None:
        if msg.get("type") == "progress":
            bar.n = int(msg.get("percentage") or 0)
            bar.set_postfix_str(msg.get("stage", ""), refresh=False)
            bar.refresh()

    try:
        final = await client.follow(task_id, on_message)
    except ChunkdClientError as exc:
        bar.close()
        return _fail(exc.message)
    finally:
        with contextlib.suppress(Exception):
            bar.close()
    if final is None:
        return _fail("the progress stream ended without a result")
    if final.get("identifier"):  # the service's own id: its transcript and history live there
        print(f"service task {final['identifier']}")
    if final.get("type") == "error":
        return _fail(f"{final.get('user_message')} ({final.get('error_code')})")
    result = final.get("result")
    if isinstance(result, dict) and isinstance(result.get("segments"), list):
        for seg in result["segments"]:
            speaker = f"{seg.get('speaker')}: " if seg.get("speaker") else ""
            print(f"[{seg.get('start', 0):7.2f} - {seg.get('end', 0):7.2f}] {speaker}"
                  f"{str(seg.get('text', '')).strip()}")
    elif result is not None:
        print(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode())
    elif final.get("location"):
        print(f"saved to {final['location']}")
    return 0
