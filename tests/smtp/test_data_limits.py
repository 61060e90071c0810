"""What one SMTP session may make the relay hold: an endless DATA line is refused and dropped
as it arrives, so memory stays near the baseline (a relay process, its RSS read from /proc)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiosmtplib
from support.relay import relay_doc
from support.relayproc import RelayProcess
from support.sink import Sink

from warmrelay.smtp.listener import MAX_LINE_BYTES

SESSIONS = 5
LINE_BYTES = 40 * 1024 * 1024  # what one hostile session tries to send without a line end
CHUNK = b"x" * 65536


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


async def endless_line(port: int) -> tuple[bytes, int]:
    """Open a transaction, then send one line without an end: return the reply that came
    back (if any) and how many bytes of the line the relay took before it hung up."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    await reader.readline()
    for command in (b"EHLO hostile.test", b"MAIL FROM:<a@b.test>", b"RCPT TO:<c@d.test>"):
        writer.write(command + b"\r\n")
        while (line := await reader.readline())[3:4] == b"-":
            pass
        assert line[:1] == b"2", line
    writer.write(b"DATA\r\n")
    assert (await reader.readline())[:3] == b"354"
    sent = 0
    try:
        while sent < LINE_BYTES:
            writer.write(CHUNK)
            await writer.drain()
            sent += len(CHUNK)
    except ConnectionError:
        pass
    try:  # the reply, unless the close reset the connection first (unread bytes at our end)
        reply = await asyncio.wait_for(reader.readline(), 30)
    except ConnectionError:
        reply = b""
    writer.close()
    return reply, sent


async def test_an_endless_data_line_is_refused_and_memory_stays_bounded(
    tmp_path: Path, sink: Sink, relay_process: Callable[..., Awaitable[RelayProcess]]
) -> None:
    relay = await relay_process(relay_doc(tmp_path, sink.port))
    assert relay.proc is not None
    before = rss_kb(relay.proc.pid)
    sessions = asyncio.gather(*(endless_line(relay.smtp_port) for _ in range(SESSIONS)))
    results = await asyncio.wait_for(sessions, 120)  # a relay that stops answering fails
    after = rss_kb(relay.proc.pid)
    for reply, sent in results:
        assert reply in (b"", b"500 5.5.2 Line too long, closing connection\r\n"), reply
        assert sent < LINE_BYTES  # hung up long before the client was done
    hung_up = [line for line in relay.log if "without its end: hanging up" in line]
    assert len(hung_up) == SESSIONS
    assert after - before < 16 * 1024, (before, after)  # within a few MB, not 200 MB
    # and the relay still works for everyone else
    message = b"From: <a@b.test>\r\nSubject: ok\r\n\r\n" + b"y" * 900 + b"\r\n"
    await send_ok(relay.smtp_port, message)
    (got,) = await sink.wait_for(1)
    assert got.rcpts == ["ok@example.test"]
    await relay.terminate()  # a failed test's relay is killed by the fixture


async def send_ok(port: int, message: bytes) -> None:
    async with aiosmtplib.SMTP(hostname="127.0.0.1", port=port) as client:
        await client.sendmail("a@b.test", ["ok@example.test"], message)


def test_the_line_cap_leaves_room_for_real_mail() -> None:
    assert MAX_LINE_BYTES >= 64 * 1024  # far above RFC 5321's 1,000: only abuse hits it
