"""Several transactions on one connection (a return path per recipient): each recipient
gets the reply that decided it, and a receiver that hangs up with 421 speaks for the
transactions it never saw."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from warmrelay.config import DeliveryConfig
from warmrelay.delivery.dispatcher import Connected, Dispatcher, Endpoint, Transaction
from warmrelay.delivery.nexthop import NextHop


class Scripted:
    """A receiver that takes the first transaction and answers 421 at the second RCPT,
    then closes (Gmail's 'unusual rate' on a warming IP)."""

    def __init__(self) -> None:
        self.server: asyncio.Server | None = None
        self.mails: list[str] = []

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 scripted ESMTP\r\n")
        rcpts = 0
        while line := await reader.readline():
            verb = line[:4].upper()
            if verb in (b"EHLO", b"HELO"):
                writer.write(b"250-scripted\r\n250 8BITMIME\r\n")
            elif verb == b"MAIL":
                self.mails.append(line.decode().strip())
                writer.write(b"250 2.1.0 ok\r\n")
            elif verb == b"RCPT":
                rcpts += 1
                if rcpts == 2:
                    writer.write(b"421 4.7.28 unusual rate of unsolicited mail\r\n")
                    await writer.drain()
                    writer.close()
                    return
                writer.write(b"250 2.1.5 ok\r\n")
            elif verb == b"DATA":
                writer.write(b"354 go\r\n")
                await writer.drain()
                while (await reader.readline()) != b".\r\n":
                    pass
                writer.write(b"250 2.0.0 taken\r\n")
            elif verb == b"QUIT":
                writer.write(b"221 bye\r\n")
                await writer.drain()
                writer.close()
                return
            else:
                writer.write(b"250 ok\r\n")
            await writer.drain()

    async def start(self) -> int:
        self.server = await asyncio.start_server(self.serve, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])


@pytest.fixture
async def receiver() -> AsyncIterator[tuple[Scripted, int]]:
    scripted = Scripted()
    port = await scripted.start()
    try:
        yield scripted, port
    finally:
        assert scripted.server is not None
        scripted.server.close()


async def test_a_421_that_closes_speaks_for_the_transactions_after_it(
    receiver: tuple[Scripted, int],
) -> None:
    scripted, port = receiver
    dispatcher = Dispatcher(DeliveryConfig(starttls="never"))
    hop = NextHop("mx.test", "127.0.0.1", port, None, 0)
    txs = [
        Transaction(f"b{i}@bounces.test", [f"r{i}@gmail.com"], b"Subject: x\r\n\r\nhi\r\n")
        for i in range(4)
    ]
    try:
        result = await dispatcher.send_all(Endpoint("127.0.0.2", "mta.test", "never"), [hop], txs)
    finally:
        await dispatcher.close()
    assert result.connected is Connected.YES
    codes = [r.code for r in result.replies]
    assert codes == [250, 421, 421, 421]
    assert all("4.7.28" in r.text for r in result.replies[1:])  # still a throttle
    assert [m.split(":", 1)[1] for m in scripted.mails] == [
        "<b0@bounces.test>",
        "<b1@bounces.test>",
    ]
