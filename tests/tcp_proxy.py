"""A TCP proxy on 127.0.0.1 for failure tests: drops connections and slows them down.

``drop_every=N`` resets every Nth connection after ``drop_after`` bytes from the client, as a
flaky network or proxy would; ``rate`` caps client→server bytes per second per connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct


class TcpProxy:
    def __init__(self, target_port: int, *, drop_every: int = 0, drop_after: int = 64 * 1024,
                 rate: float = 0.0) -> None:
        self.target_port = target_port
        self.drop_every = drop_every
        self.drop_after = drop_after
        self.rate = rate
        self.connections = 0
        self.dropped = 0
        self.port = 0
        self._server: asyncio.base_events.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> TcpProxy:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        drop = self.drop_every and self.connections % self.drop_every == 0
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        up = asyncio.create_task(self._pipe(reader, up_writer, self.drop_after if drop else None,
                                            self.rate))
        down = asyncio.create_task(self._pipe(up_reader, writer, None, 0.0))
        self._tasks |= {up, down}
        try:
            await asyncio.wait({up, down}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in (up, down):
                t.cancel()
            await asyncio.gather(up, down, return_exceptions=True)
            self._tasks -= {up, down}
            if drop:
                self.dropped += 1
                _reset(writer)
            for w in (writer, up_writer):
                with contextlib.suppress(Exception):
                    w.close()

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    limit: int | None, rate: float) -> None:
        sent = 0
        while True:
            data = await reader.read(64 * 1024)
            if not data:
                return
            if limit is not None and sent + len(data) >= limit:
                return  # drop the connection mid-stream
            writer.write(data)
            await writer.drain()
            sent += len(data)
            if rate:
                await asyncio.sleep(len(data) / rate)


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with RST, not FIN: what a dropped connection looks like to the client."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
