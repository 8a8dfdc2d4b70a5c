#!/usr/bin/env python3
"""The limit row of benchmarks/core.py: about the least a chunk receiver can do. Not chunkd.

Written for the benchmark only (chunkd never uses it): a thread per connection on blocking
sockets, speaking just the HTTP/1.1 that ``chunkd.client.ChunkdClient`` sends in core.py's
uploads (keep-alive, ``Content-Length`` bodies, ``Expect: 100-continue``) on the routes core.py's
bare aiohttp sink fakes, with the same JSON answers: the session POST, the chunk POSTs, the status
GET, the abort DELETE. A chunk's body is ``recv_into`` one reusable 1 MiB buffer per connection
(``MSG_WAITALL``: whole MiBs) and ``pwrite`` at ``index * chunk_size`` into the session's one
file in ``--data-dir``; ``--durable on`` adds an ``fdatasync`` before the chunk's 200. No other
checks, no markers, no fsync of folders: the disk's and the socket's part of the work, no more.

    python benchmarks/limit_receiver.py --data-dir DIR --durable on|off [--port 0]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import socket
import threading
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

BUF = 1024 * 1024
REASONS = {100: "Continue", 200: "OK", 201: "Created", 404: "Not Found"}


class Receiver:
    def __init__(self, data_dir: Path, durable: bool) -> None:
        self.data_dir, self.durable = data_dir, durable
        self.sessions: dict[str, dict[str, int]] = {}
        self.lock, self.made = threading.Lock(), itertools.count()

    def serve(self, conn: socket.socket) -> None:
        """One connection, request after request, until the client closes it."""
        view, pending = memoryview(bytearray(BUF)), b""
        with conn:
            while True:
                while b"\r\n\r\n" not in pending:
                    more = conn.recv(65536)
                    if not more:
                        return
                    pending += more
                head, pending = pending.split(b"\r\n\r\n", 1)
                request, *lines = head.decode("latin-1").split("\r\n")
                method, target, _ = request.split(" ", 2)
                headers = {k.strip().lower(): v.strip().lower()
                           for k, v in (line.split(":", 1) for line in lines)}
                if headers.get("expect") == "100-continue":
                    conn.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
                length = int(headers.get("content-length", "0"))
                body, pending = pending[:length], pending[length:]
                url = urlsplit(target)
                parts = url.path.strip("/").split("/")  # upload, chunked, <sid> | session[, what]
                s = self.sessions.get(parts[2]) if len(parts) == 4 else None
                doc: dict[str, Any] = {"error": {"code": "not_found", "message": target}}
                status = 404
                if (method, parts[2:]) == ("POST", ["session"]):
                    while len(body) < length:
                        more = conn.recv(length - len(body))
                        if not more:
                            return
                        body += more
                    status, doc = self.create(json.loads(body))
                elif s is not None and (method, parts[3]) == ("POST", "chunk"):
                    index = int(parse_qs(url.query)["index"][0])
                    self.chunk(conn, s, body, index * s["chunk_size"], length, view)
                    status, doc = 200, {"ok": True}
                elif s is not None and (method, parts[3]) == ("GET", "status"):
                    doc = {"received_chunks": s["chunks"], "received_bytes": s["bytes"]}
                    status = 200
                elif s is not None and (method, parts[3]) == ("DELETE", "abort"):
                    with self.lock:
                        os.close(self.sessions.pop(parts[2])["fd"])
                    os.unlink(self.data_dir / f"{parts[2]}.data")
                    status, doc = 200, {"status": "aborted"}
                out = json.dumps(doc).encode()
                conn.sendall(f"HTTP/1.1 {status} {REASONS[status]}\r\nContent-Type: "
                             f"application/json\r\nContent-Length: {len(out)}\r\n\r\n".encode()
                             + out)
                if status == 404 or headers.get("connection") == "close":
                    return  # (a refused request's body is not read: the connection ends)

    def create(self, doc: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        with self.lock:
            sid = f"00000000-0000-4000-8000-{next(self.made):012d}"
            fd = os.open(self.data_dir / f"{sid}.data", os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            self.sessions[sid] = {"fd": fd, "chunk_size": doc["chunk_size"], "chunks": 0,
                                  "bytes": 0}
        return 201, {"session_id": sid, "chunk_size": doc["chunk_size"],
                     "total_chunks": doc["total_chunks"]}

    def chunk(self, conn: socket.socket, s: dict[str, int], head: bytes, offset: int,
              length: int, view: memoryview) -> None:
        """The body: what came with the headers, then whole MiBs straight into ``view``."""
        fd, done = s["fd"], len(head)
        write_all(fd, memoryview(head), offset)
        while done < length:
            n = conn.recv_into(view, min(BUF, length - done), socket.MSG_WAITALL)
            if n == 0:
                raise ConnectionError(f"body cut at {done} of {length} bytes")
            write_all(fd, view[:n], offset + done)
            done += n
        if self.durable:
            os.fdatasync(fd)
        with self.lock:
            s["chunks"] += 1
            s["bytes"] += length


def write_all(fd: int, view: memoryview, offset: int) -> None:
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", type=Path, required=True)
    p.add_argument("--durable", choices=("on", "off"), required=True)
    p.add_argument("--port", type=int, default=0)
    args = p.parse_args()
    receiver = Receiver(args.data_dir, args.durable == "on")
    server = socket.create_server(("127.0.0.1", args.port), backlog=128)
    print(f"limit-receiver listening on http://127.0.0.1:{server.getsockname()[1]}", flush=True)
    while True:  # until SIGTERM (its default action ends the process)
        conn, _ = server.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        threading.Thread(target=receiver.serve, args=(conn,), daemon=True).start()


if __name__ == "__main__":
    main()
