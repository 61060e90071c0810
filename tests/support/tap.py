"""A recording TCP forwarder on loopback: put between a client and a real server (Postfix)
to see how the client groups its writes. For each chunk the client sent it records how
many complete replies the server had sent back by then, so a pipelined group (MAIL, the
RCPTs and DATA in one chunk, before any of their replies) is told apart from lockstep."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Chunk:
    data: bytes  # one read from the client
    replies_before: int  # complete reply lines ("CODE " or the last of "CODE-") sent by then

    def lines(self) -> list[bytes]:
        return [line for line in self.data.split(b"\r\n") if line]


@dataclass
class Tap:
    upstream_port: int
    upstream_host: str = "127.0.0.1"
    connections: list[list[Chunk]] = field(default_factory=list)
    port: int = 0
    _server: asyncio.Server | None = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        chunks: list[Chunk] = []
        self.connections.append(chunks)
        replies = 0
        up_reader, up_writer = await asyncio.open_connection(self.upstream_host, self.upstream_port)

        async def down() -> None:  # server -> client, counting complete replies
            nonlocal replies
            partial = b""
            while data := await up_reader.read(65536):
                partial += data
                *complete, partial = partial.split(b"\r\n")
                replies += sum(1 for line in complete if line[3:4] != b"-")
                writer.write(data)
                await writer.drain()
            writer.close()

        async def up() -> None:  # client -> server, recording each chunk
            while data := await reader.read(65536):
                chunks.append(Chunk(data, replies))
                up_writer.write(data)
                await up_writer.drain()
            up_writer.close()

        try:
            await asyncio.gather(down(), up())
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()
            up_writer.close()

    async def start(self) -> Tap:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()

    def groups(self) -> list[list[bytes]]:
        """Command lines of every client chunk that carried a MAIL FROM."""
        return [
            c.lines()
            for chunks in self.connections
            for c in chunks
            if any(line.upper().startswith(b"MAIL FROM:") for line in c.lines())
        ]


@contextlib.asynccontextmanager
async def tapped(upstream_port: int) -> AsyncIterator[Tap]:
    tap = await Tap(upstream_port).start()
    try:
        yield tap
    finally:
        await tap.stop()
