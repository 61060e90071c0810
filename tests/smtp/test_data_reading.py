"""How the listener reads the DATA phase, pinned byte for byte.

The listener reads DATA in bulk (``RelaySMTP._read_data``) instead of aiosmtpd's
line-by-line loop. These tests were written against aiosmtpd 1.4's ``SMTP.smtp_DATA``
and passed there; they pin what it did, so the bulk reader must do the same:
dot-unstuffing, where the terminator may fall between packets, pipelined commands after
it, the line-length and size limits and which one wins, bare CR and LF, a client that
vanishes mid-DATA, and large or 8-bit messages. Some of what they pin is a quirk rather
than a requirement (the 999-octet line, the size-versus-length order on a single line);
those tests say so.

Everything runs against an in-process relay over real loopback sockets, with a raw client
that decides which bytes go into which write. Between writes it waits until the relay has
read everything sent so far (the relay socket's receive queue is empty), so each write
reaches the relay as a read of its own.
"""

from __future__ import annotations

import asyncio
import fcntl
import re
import socket
import struct
import termios
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any

import pytest

# tests/ is on pytest's path; a bare `mypy <this file>` does not see it (MYPYPATH=tests does)
from support.polling import eventually
from support.relay import relay_config, running
from support.sink import Sink
from support.wire import read_reply

from warmrelay.app import Relay

REPLY_S = 5.0  # the longest any single reply or delivery may take before a test fails
POLL_S = 0.005  # for what no event announces (the spool drained, a session ended)
SIZE_LIMIT = 2000  # smtp.max_message_bytes for the size tests

OK_MAIL = b"250 2.1.0 Ok\r\n"
OK_RCPT = b"250 2.1.5 Ok\r\n"
GO_AHEAD = b"354 End data with <CR><LF>.<CR><LF>\r\n"
NOOP_OK = b"250 OK\r\n"
BYE = b"221 Bye\r\n"
LINE_TOO_LONG = b"500 5.5.2 Line too long\r\n"
TOO_BIG = b"552 5.3.4 Message size exceeds fixed maximum message size\r\n"
BARE_NEWLINE = b"554 5.6.11 Message contains bare CR or LF characters\r\n"
HAS_NUL = b"554 5.6.0 Message contains NUL characters\r\n"
QUEUED = re.compile(rb"250 2\.0\.0 Ok: queued as [0-9A-Z]+\r\n\Z")
# What the relay puts above the client's bytes: its Received: line, and Message-ID and
# Date when the header section parses and lacks them (our messages never carry them).
ADDED = re.compile(
    rb"Received: from client\.test \(\[127\.0\.0\.1\]\)\r\n"
    rb"\tby relay\.test \(warmrelay\) with ESMTP;\r\n"
    rb"\t[^\r\n]+ \+0000\r\n"
    rb"(?P<mid>Message-ID: <[0-9a-f]{32}@relay\.test>\r\n)?"
    rb"(?P<date>Date: [^\r\n]+ \+0000\r\n)?"
)
HEAD = b"From: <app@sender.test>\r\nSubject: reading\r\n\r\n"


def unread(fd: int) -> int:
    """Bytes in a socket's receive queue that its owner has not read yet (FIONREAD)."""
    raw = fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0")
    return int(struct.unpack("i", raw)[0])


class Client:
    """A raw SMTP client: each ``send`` is one write, read by the relay before the next."""

    def __init__(
        self, relay: Relay, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.relay, self.reader, self.writer = relay, reader, writer
        self._relay_fd = -1

    @classmethod
    async def open(cls, relay: Relay) -> Client:
        """Connected, greeted, and past EHLO."""
        reader, writer = await asyncio.open_connection("127.0.0.1", relay.smtp_ports[0])
        writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        client = cls(relay, reader, writer)
        assert await client.reply() == b"220 relay.test warmrelay ESMTP\r\n"
        ehlo = await client.command(b"EHLO client.test")
        assert ehlo.endswith(b"250 HELP\r\n") and b"250-PIPELINING\r\n" in ehlo, ehlo
        return client

    def relay_fd(self) -> int:
        """The relay's end of this connection (its session knows our port as its peer)."""
        if self._relay_fd < 0:
            port = self.writer.get_extra_info("sockname")[1]
            assert self.relay.handler is not None
            for session in self.relay.handler.sessions:
                transport: Any = session.transport
                if transport is not None and transport.get_extra_info("peername")[1] == port:
                    self._relay_fd = int(transport.get_extra_info("socket").fileno())
            assert self._relay_fd >= 0, "no relay session for this client"
        return self._relay_fd

    async def reply(self) -> bytes:
        """One reply (all its lines); b"" once the relay has closed the connection."""
        return await read_reply(self.reader, REPLY_S)

    async def replies(self, n: int) -> list[bytes]:
        return [await self.reply() for _ in range(n)]

    async def send(self, data: bytes) -> None:
        """One write; returns once the relay has taken every byte out of its socket."""
        fd = self.relay_fd()
        self.writer.write(data)
        await self.writer.drain()
        # a turn of the loop (which the relay shares with us) per check
        await eventually(lambda: unread(fd) == 0, REPLY_S, "the relay read our write", 0)
        await asyncio.sleep(0)  # and one for its session to take up what it read

    async def send_apart(self, chunks: Iterable[bytes]) -> None:
        for chunk in chunks:
            await self.send(chunk)

    async def command(self, line: bytes) -> bytes:
        self.writer.write(line + b"\r\n")
        await self.writer.drain()
        return await self.reply()

    async def begin(self, rcpt: str) -> None:
        """MAIL, RCPT and DATA in one write (PIPELINING), up to the 354."""
        await self.send(envelope(rcpt))
        assert await self.replies(3) == [OK_MAIL, OK_RCPT, GO_AHEAD]

    async def transaction(self, rcpt: str, *chunks: bytes) -> bytes:
        """A whole transaction, the DATA bytes in the writes given: the final reply."""
        await self.begin(rcpt)
        await self.send_apart(chunks)
        return await self.reply()

    async def quit(self) -> None:
        assert await self.command(b"QUIT") == BYE
        assert await self.reply() == b""
        self.writer.close()


def envelope(rcpt: str) -> bytes:
    return f"MAIL FROM:<app@sender.test>\r\nRCPT TO:<{rcpt}>\r\nDATA\r\n".encode()


def split_bytes(data: bytes) -> list[bytes]:
    return [data[i : i + 1] for i in range(len(data))]


def filler(total: int, width: int = 78) -> bytes:
    """Lines of "y" (no dots), each at most ``width`` + CRLF, exactly ``total`` bytes."""
    assert total == 0 or total >= 3
    lines: list[bytes] = []
    while total:
        size = min(width + 2, total)
        if 0 < total - size < 3:  # leave room for a last line of at least "y\r\n"
            size -= 3
        lines.append(b"y" * (size - 2) + b"\r\n")
        total -= size
    return b"".join(lines)


async def delivered(sink: Sink, rcpt: str) -> bytes:
    """The bytes the sink received for ``rcpt``, below what the relay added on top."""
    await sink.wait_until(lambda: any(rcpt in m.rcpts for m in sink.messages), REPLY_S)
    (message,) = [m for m in sink.messages if rcpt in m.rcpts]
    added = ADDED.match(message.data)
    assert added is not None, message.data[:300]
    data: bytes = message.data[added.end() :]
    return data


async def settled(relay: Relay, sink: Sink, count: int) -> None:
    """Exactly ``count`` messages were delivered, and nothing else is on its way."""
    await sink.wait_for(count, REPLY_S)
    await eventually(lambda: len(relay.spool) == 0, REPLY_S, "the spool drained", POLL_S)
    assert len(sink.messages) == count, [m.rcpts for m in sink.messages]


@pytest.fixture
async def relay(tmp_path: Path, sink: Sink) -> AsyncIterator[Relay]:
    async with running(relay_config(tmp_path, sink.port)) as started:
        yield started


@pytest.fixture
async def small_relay(tmp_path: Path, sink: Sink) -> AsyncIterator[Relay]:
    """smtp.max_message_bytes = SIZE_LIMIT."""
    config = relay_config(tmp_path, sink.port, smtp={"max_message_bytes": SIZE_LIMIT})
    async with running(config) as started:
        yield started


# 1. dot-unstuffing: the DATA bytes as sent (without the final ".\r\n") -> as delivered


UNSTUFFING = {
    "stuffed-word": (HEAD + b"..foo\r\n", HEAD + b".foo\r\n"),
    "stuffed-lone-dot": (HEAD + b"a\r\n..\r\nb\r\n", HEAD + b"a\r\n.\r\nb\r\n"),
    "three-dots": (HEAD + b"...\r\n", HEAD + b"..\r\n"),
    "four-dots": (HEAD + b"....\r\n", HEAD + b"...\r\n"),
    "dot-space": (HEAD + b". \r\n", HEAD + b" \r\n"),
    # a client that forgot to stuff still loses its leading dot
    "unstuffed-word": (HEAD + b".foo\r\n", HEAD + b"foo\r\n"),
    "dots-inside-and-after": (HEAD + b"x..\r\nx.y\r\n", HEAD + b"x..\r\nx.y\r\n"),
    "space-then-dot": (HEAD + b" .\r\n", HEAD + b" .\r\n"),
    "first-body-line": (HEAD + b"..first\r\nsecond\r\n", HEAD + b".first\r\nsecond\r\n"),
    "first-data-line-stuffed": (
        b"..X-Dot: 1\r\nSubject: s\r\n\r\nbody\r\n",
        b".X-Dot: 1\r\nSubject: s\r\n\r\nbody\r\n",
    ),
    "first-data-line-unstuffed": (b".Subject: s\r\n\r\nb\r\n", b"Subject: s\r\n\r\nb\r\n"),
    "only-a-stuffed-dot": (b"..\r\n", b".\r\n"),
    "blank-line-only": (b"\r\n", b"\r\n"),
    "many-dot-lines": (
        HEAD + b"..\r\n...\r\n..\r\n\r\n..a\r\n",
        HEAD + b".\r\n..\r\n.\r\n\r\n.a\r\n",
    ),
}


@pytest.mark.parametrize(("sent", "expected"), UNSTUFFING.values(), ids=UNSTUFFING.keys())
async def test_one_leading_dot_is_removed_per_line(
    relay: Relay, sink: Sink, sent: bytes, expected: bytes
) -> None:
    client = await Client.open(relay)
    assert QUEUED.match(await client.transaction("to@example.test", sent + b".\r\n"))
    await client.quit()
    assert await delivered(sink, "to@example.test") == expected
    await settled(relay, sink, 1)


# 2. the terminator (and the rest) split across writes

SMALL = HEAD + b"..dot\r\nend\r\n"
SMALL_DELIVERED = HEAD + b".dot\r\nend\r\n"


@pytest.mark.parametrize("apart", ["terminator", "whole-message"])
async def test_one_byte_per_write(relay: Relay, sink: Sink, apart: str) -> None:
    """The body then CRLF.CRLF a byte at a time (the body's last line left open), or the
    whole DATA a byte at a time."""
    client = await Client.open(relay)
    await client.begin("to@example.test")
    body = SMALL[:-2]  # "end" without its CRLF: the terminator's CRLF ends it
    if apart == "terminator":
        await client.send(body)
        await client.send_apart(split_bytes(b"\r\n.\r\n"))
    else:
        await client.send_apart(split_bytes(body + b"\r\n.\r\n"))
    assert QUEUED.match(await client.reply())
    await client.quit()
    assert await delivered(sink, "to@example.test") == SMALL_DELIVERED
    await settled(relay, sink, 1)


async def test_every_split_into_two_writes(relay: Relay, sink: Sink) -> None:
    """The DATA bytes cut at every offset (inside the stuffed line, inside each CRLF,
    inside the final CRLF.CRLF), one transaction each in one session."""
    wire = SMALL + b".\r\n"
    cuts = range(1, len(wire))
    client = await Client.open(relay)
    for cut in cuts:
        reply = await client.transaction(f"cut{cut}@example.test", wire[:cut], wire[cut:])
        assert QUEUED.match(reply), (cut, reply)
    await client.quit()
    for cut in cuts:
        assert await delivered(sink, f"cut{cut}@example.test") == SMALL_DELIVERED, cut
    await settled(relay, sink, len(cuts))


# 3. a dot that does not start a line ends nothing

NOT_AT_LINE_START = {
    "line-ends-with-dot": [b"Hello.\r\n"],
    "dot-then-crlf-apart": [b"Hello.", b"\r\n"],
    "dot-crlf-after-text": [b"a", b".\r\n"],
    "dot-cr-then-lf": [b"a.\r", b"\n"],
    "space-dot": [b"x\r\n", b" .\r\n"],
}


@pytest.mark.parametrize("chunks", NOT_AT_LINE_START.values(), ids=NOT_AT_LINE_START.keys())
async def test_a_dot_not_at_line_start_is_no_terminator(
    relay: Relay, sink: Sink, chunks: list[bytes]
) -> None:
    """Had any of these ended DATA, "end" would come back as an unknown command."""
    client = await Client.open(relay)
    await client.begin("to@example.test")
    await client.send_apart([HEAD, *chunks, b"end\r\n", b".\r\n", b"NOOP\r\n"])
    reply, noop = await client.replies(2)
    assert QUEUED.match(reply), reply
    assert noop == NOOP_OK
    await client.quit()
    assert await delivered(sink, "to@example.test") == HEAD + b"".join(chunks) + b"end\r\n"
    await settled(relay, sink, 1)


# 4. an empty message


async def test_an_empty_message_is_accepted(relay: Relay, sink: Sink) -> None:
    """DATA, then at once ".\r\n": 250, and what goes on is only what the relay adds
    (Received:, and Message-ID and Date, as an empty header section lacks them)."""
    client = await Client.open(relay)
    assert QUEUED.match(await client.transaction("to@example.test", b".\r\n"))
    await client.quit()
    await sink.wait_for(1, REPLY_S)
    added = ADDED.fullmatch(sink.messages[0].data)
    assert added is not None and added["mid"] and added["date"], sink.messages[0].data
    await settled(relay, sink, 1)


# 5. pipelining: the next commands in the same write as the terminator


async def test_next_transaction_in_the_terminators_write(relay: Relay, sink: Sink) -> None:
    client = await Client.open(relay)
    await client.begin("first@example.test")
    await client.send(HEAD + b"one\r\n.\r\n" + envelope("second@example.test"))
    first, mail, rcpt, data = await client.replies(4)
    assert QUEUED.match(first), first
    assert [mail, rcpt, data] == [OK_MAIL, OK_RCPT, GO_AHEAD]
    await client.send(HEAD + b"two\r\n.\r\n")
    assert QUEUED.match(await client.reply())
    await client.quit()
    assert await delivered(sink, "first@example.test") == HEAD + b"one\r\n"
    assert await delivered(sink, "second@example.test") == HEAD + b"two\r\n"
    await settled(relay, sink, 2)


async def test_terminator_and_quit_in_one_write(relay: Relay, sink: Sink) -> None:
    client = await Client.open(relay)
    await client.begin("to@example.test")
    await client.send(HEAD + b"body\r\n.\r\nQUIT\r\n")
    queued, bye, closed = await client.replies(3)
    assert QUEUED.match(queued), queued
    assert (bye, closed) == (BYE, b"")
    client.writer.close()
    assert await delivered(sink, "to@example.test") == HEAD + b"body\r\n"
    await settled(relay, sink, 1)


async def test_a_whole_session_in_one_write(relay: Relay, sink: Sink) -> None:
    """A client that does not wait for the 354 (RFC 2920 forbids it, the relay copes):
    the body is already buffered when DATA is answered."""
    client = await Client.open(relay)
    await client.send(
        envelope("first@example.test")
        + HEAD
        + b"one\r\n.\r\n"
        + envelope("second@example.test")
        + HEAD
        + b"..two\r\n.\r\nQUIT\r\n"
    )
    got = await client.replies(9)
    assert got[:3] == [OK_MAIL, OK_RCPT, GO_AHEAD]
    assert QUEUED.match(got[3]), got
    assert got[4:6] == [OK_MAIL, OK_RCPT]
    assert got[6] == GO_AHEAD
    assert QUEUED.match(got[7]), got
    assert got[8] == BYE
    assert await client.reply() == b""
    client.writer.close()
    assert await delivered(sink, "first@example.test") == HEAD + b"one\r\n"
    assert await delivered(sink, "second@example.test") == HEAD + b".two\r\n"
    await settled(relay, sink, 2)


# 6. line length: aiosmtpd's limit is 1001 octets per line with its CRLF (RFC 5321's 1000
# plus a transparency dot), checked on the line as sent, before unstuffing


async def judged_then_next(relay: Relay, sink: Sink, rcpt: str, data: bytes) -> bytes:
    """Send ``data`` to ``rcpt`` and return the reply to its dot; then check that the
    session goes on either way: a next message in it is queued and delivered."""
    client = await Client.open(relay)
    await client.begin(rcpt)
    await client.send(data)
    await client.send(b".\r\n")
    reply = await client.reply()
    assert QUEUED.match(await client.transaction("next@example.test", HEAD + b"next\r\n.\r\n"))
    await client.quit()
    assert await delivered(sink, "next@example.test") == HEAD + b"next\r\n"
    return reply


@pytest.mark.parametrize(
    ("line", "accepted"),
    [
        (b"x" * 998, True),
        # 1001 octets with CRLF: over RFC 5321's 1000, accepted (aiosmtpd's allowance for a
        # transparency dot applies to every line, stuffed or not)
        (b"x" * 999, True),
        (b"x" * 1000, False),  # read whole, refused after
        (b"x" * 1001, False),
        (b"x" * 1002, False),  # too long for aiosmtpd's stream reader: read in pieces
        (b"x" * 5000, False),
        (b"x" * 70000, False),
        (b"." + b"x" * 998, True),  # 1001 with CRLF, its dot the transparency dot
        (b"." + b"x" * 999, False),
        (b"x" * 600 + b"\n" + b"x" * 600, False),  # a bare LF does not end a line
    ],
    ids=lambda v: str(v) if isinstance(v, bool) else f"{len(v)}-{v[:1].decode()}",
)
async def test_line_length_limit(relay: Relay, sink: Sink, line: bytes, accepted: bool) -> None:
    reply = await judged_then_next(
        relay, sink, "long@example.test", HEAD + b"before\r\n" + line + b"\r\nafter\r\n"
    )
    if accepted:
        assert QUEUED.match(reply), reply
        expected = HEAD + b"before\r\n" + line.removeprefix(b".") + b"\r\nafter\r\n"
        assert await delivered(sink, "long@example.test") == expected
        await settled(relay, sink, 2)
    else:
        assert reply == LINE_TOO_LONG
        await settled(relay, sink, 1)


async def test_the_tail_of_a_long_line_is_no_terminator(relay: Relay, sink: Sink) -> None:
    """A too-long line is read in pieces; a piece that is exactly ".\r\n" (its last
    octets, arriving in a write of their own) is the end of that line, not of DATA."""
    client = await Client.open(relay)
    await client.begin("long@example.test")
    await client.send_apart([HEAD, b"x" * 1500 + b".", b"\r\n", b"after\r\n", b".\r\n"])
    await client.send(b"NOOP\r\n")
    assert await client.replies(2) == [LINE_TOO_LONG, NOOP_OK]
    await client.quit()
    await eventually(lambda: len(relay.spool) == 0, REPLY_S, "the spool drained", POLL_S)
    assert sink.messages == []


# 7. the size limit: the octets of the lines as sent (CRLF and transparency dots included,
# the final ".\r\n" not), refused only after the terminator


@pytest.mark.parametrize(
    ("data", "accepted"),
    [
        (HEAD + filler(SIZE_LIMIT - len(HEAD)), True),
        (HEAD + filler(SIZE_LIMIT - len(HEAD) + 1), False),
        # 20 stuffed lines: 20 octets fewer delivered, yet counted as sent
        (HEAD + b"..y\r\n" * 20 + filler(SIZE_LIMIT - len(HEAD) - 100), True),
        (HEAD + b"..y\r\n" * 20 + filler(SIZE_LIMIT - len(HEAD) - 99), False),
    ],
    ids=["at-limit", "one-over", "stuffed-at-limit", "stuffed-one-over"],
)
async def test_size_limit(small_relay: Relay, sink: Sink, data: bytes, accepted: bool) -> None:
    reply = await judged_then_next(small_relay, sink, "big@example.test", data)
    if accepted:
        assert QUEUED.match(reply), reply
        expected = data.replace(b"\r\n..", b"\r\n.")
        assert await delivered(sink, "big@example.test") == expected
        await settled(small_relay, sink, 2)
    else:
        assert reply == TOO_BIG
        await settled(small_relay, sink, 1)


async def test_size_limit_is_advertised(small_relay: Relay) -> None:
    client = await Client.open(small_relay)
    assert b"250-SIZE 2000\r\n" in await client.command(b"EHLO client.test")
    await client.quit()


@pytest.mark.parametrize(
    ("data", "reply"),
    [
        # the condition met first wins
        (HEAD + b"x" * 1200 + b"\r\n" + filler(SIZE_LIMIT), LINE_TOO_LONG),
        (HEAD + filler(SIZE_LIMIT) + b"x" * 1200 + b"\r\n", TOO_BIG),
        # one line meeting both: the order is aiosmtpd's. A line aiosmtpd reads whole (up to
        # 1001 octets before its CRLF) is counted first (552); a longer one is too long for
        # its stream reader before it is counted (500). A quirk, pinned for the rewrite.
        (HEAD + filler(SIZE_LIMIT - len(HEAD) - 500) + b"x" * 1000 + b"\r\n", TOO_BIG),
        (HEAD + filler(SIZE_LIMIT - len(HEAD) - 500) + b"x" * 1001 + b"\r\n", TOO_BIG),
        (HEAD + filler(SIZE_LIMIT - len(HEAD) - 500) + b"x" * 1002 + b"\r\n", LINE_TOO_LONG),
    ],
    ids=["long-then-big", "big-then-long", "one-line-1000", "one-line-1001", "one-line-1002"],
)
async def test_the_first_limit_met_wins(
    small_relay: Relay, sink: Sink, data: bytes, reply: bytes
) -> None:
    client = await Client.open(small_relay)
    await client.begin("big@example.test")
    await client.send(data)
    await client.send(b".\r\n")
    assert await client.reply() == reply
    assert QUEUED.match(await client.transaction("next@example.test", HEAD + b"next\r\n.\r\n"))
    await client.quit()
    assert await delivered(sink, "next@example.test") == HEAD + b"next\r\n"
    await settled(small_relay, sink, 1)


# 8. bare CR and LF: lines end only at CRLF; the relay then makes each bare one a CRLF
# (smtp.bare_newlines: normalize, the default) or refuses the message (reject)

BARE = {
    "lf": (b"a\nb\r\n", b"a\r\nb\r\n"),
    "cr": (b"a\rb\r\n", b"a\r\nb\r\n"),
    "cr-before-crlf": (b"a\r\r\n", b"a\r\n\r\n"),
    "lf-before-crlf": (b"a\n\r\n", b"a\r\n\r\n"),
    "lf-dot-lf": (b"before\n.\nafter\r\n", b"before\r\n.\r\nafter\r\n"),
    "lf-dot-crlf": (b"before\n.\r\nafter\r\n", b"before\r\n.\r\nafter\r\n"),
    "cr-dot-crlf": (b"before\r.\r\nafter\r\n", b"before\r\n.\r\nafter\r\n"),
    # the dot starts a CRLF line, so it is unstuffed before the LF becomes a CRLF
    "crlf-dot-lf": (b"before\r\n.\nafter\r\n", b"before\r\n\r\nafter\r\n"),
    "crlf-dot-cr": (b"before\r\n.\rafter\r\n", b"before\r\n\r\nafter\r\n"),
    "in-header": (b"From: <app@sender.test>\nSubject: x\r\n\r\nb\r\n", None),
}


@pytest.mark.parametrize(("sent", "expected"), BARE.values(), ids=BARE.keys())
async def test_bare_newlines_are_normalized(
    relay: Relay, sink: Sink, sent: bytes, expected: bytes | None
) -> None:
    data = sent if expected is None else HEAD + sent
    client = await Client.open(relay)
    assert QUEUED.match(await client.transaction("to@example.test", data + b".\r\n"))
    await client.quit()
    if expected is None:
        expected = b"From: <app@sender.test>\r\nSubject: x\r\n\r\nb\r\n"
    else:
        expected = HEAD + expected
    assert await delivered(sink, "to@example.test") == expected
    await settled(relay, sink, 1)


@pytest.mark.parametrize("sent", [s for s, _ in BARE.values()], ids=BARE.keys())
async def test_bare_newlines_are_refused_in_reject_mode(
    tmp_path: Path, sink: Sink, sent: bytes
) -> None:
    config = relay_config(tmp_path, sink.port, smtp={"bare_newlines": "reject"})
    async with running(config) as relay:
        client = await Client.open(relay)
        assert await client.transaction("bare@example.test", HEAD + sent + b".\r\n") == (
            BARE_NEWLINE
        )
        reply = await client.transaction("next@example.test", HEAD + b"next\r\n.\r\n")
        assert QUEUED.match(reply)
        await client.quit()
        assert await delivered(sink, "next@example.test") == HEAD + b"next\r\n"
        await settled(relay, sink, 1)


LF_DOT = b"before\r\n.\r\nafter\r\n"  # as delivered: the dot line kept (the relay stuffs it)


@pytest.mark.parametrize(
    ("chunks", "expected"),
    [
        ([b"before\n.\n", b"after\r\n"], LF_DOT),
        ([b"before\n", b".\n", b"after\r\n"], LF_DOT),
        ([b"before\n.", b"\nafter\r\n"], LF_DOT),
        ([b"before\n.\r\n", b"after\r\n"], LF_DOT),
        ([b"before\r\n.\n", b"after\r\n"], b"before\r\n\r\nafter\r\n"),
    ],
    ids=["lf-dot-lf", "lf-dot-lf-apart", "lf-dot-then-lf", "lf-dot-crlf", "crlf-dot-lf"],
)
async def test_only_crlf_dot_crlf_ends_data(
    relay: Relay, sink: Sink, chunks: list[bytes], expected: bytes
) -> None:
    """A dot between bare line ends, each in its own write, ends nothing: the relay waits
    for a real CRLF.CRLF (had it ended, "after" would be answered as a command)."""
    client = await Client.open(relay)
    await client.begin("to@example.test")
    await client.send_apart([HEAD, *chunks, b".\r\n", b"NOOP\r\n"])
    reply, noop = await client.replies(2)
    assert QUEUED.match(reply), reply
    assert noop == NOOP_OK
    await client.quit()
    assert await delivered(sink, "to@example.test") == HEAD + expected
    await settled(relay, sink, 1)


# 9. a client gone in the middle of DATA

CUTS = {
    "at-354": b"",
    "mid-line": HEAD + b"half a li",
    "after-a-line": HEAD + b"a line\r\n",
    "after-crlf-dot": HEAD + b"a line\r\n.",
    "after-crlf-dot-cr": HEAD + b"a line\r\n.\r",
}


@pytest.mark.parametrize("how", ["fin", "half-close", "reset"])
@pytest.mark.parametrize("sent", CUTS.values(), ids=CUTS.keys())
async def test_a_client_gone_mid_data_leaves_nothing(
    relay: Relay, sink: Sink, sent: bytes, how: str
) -> None:
    client = await Client.open(relay)
    await client.begin("gone@example.test")
    if sent:
        await client.send(sent)
    if how == "fin":
        client.writer.close()
    elif how == "half-close":  # we still listen: the relay answers nothing, and closes
        client.writer.write_eof()
        assert await client.reply() == b""
        client.writer.close()
    else:
        sock = client.writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.writer.transport.abort()
    assert relay.handler is not None
    handler = relay.handler
    await eventually(lambda: not handler.sessions, REPLY_S, "the session ended", POLL_S)
    assert len(relay.spool) == 0
    assert [p for d in (relay.spool.incoming, relay.spool.queue) for p in d.iterdir()] == []
    # the relay serves the next client
    other = await Client.open(relay)
    assert QUEUED.match(await other.transaction("next@example.test", HEAD + b"next\r\n.\r\n"))
    await other.quit()
    assert await delivered(sink, "next@example.test") == HEAD + b"next\r\n"
    await settled(relay, sink, 1)


# 10. a large message


def large_body() -> tuple[bytes, bytes]:
    """~200 KB of 1000-octet lines (998 + CRLF) as sent, and as delivered: every 7th line
    starts with a dot (stuffed on the wire), every 50th is empty."""
    sent: list[bytes] = []
    kept: list[bytes] = []
    for i in range(200):
        text = bytes(33 + (i + j) % 94 for j in range(998))
        if i % 50 == 49:
            text = b""
        elif i % 7 == 0:
            text = b"." + text[1:]
        kept.append(text + b"\r\n")
        sent.append((b"." if text.startswith(b".") else b"") + text + b"\r\n")
    return HEAD + b"".join(sent), HEAD + b"".join(kept)


@pytest.mark.parametrize("chunk", [0, 4093], ids=["one-write", "4093-octet-writes"])
async def test_a_large_message_arrives_intact(relay: Relay, sink: Sink, chunk: int) -> None:
    sent, expected = large_body()
    assert len(expected) > 190_000
    wire = sent + b".\r\n"
    client = await Client.open(relay)
    await client.begin("large@example.test")
    if chunk:
        await client.send_apart(wire[i : i + chunk] for i in range(0, len(wire), chunk))
    else:
        await client.send(wire)
    assert QUEUED.match(await client.reply())
    await client.quit()
    assert await delivered(sink, "large@example.test") == expected
    await settled(relay, sink, 1)


# 11. 8-bit content


async def test_eight_bit_and_control_octets_pass_unchanged(relay: Relay, sink: Sink) -> None:
    every = bytes(b for b in range(1, 256) if b not in b"\r\n")
    data = (
        b"From: <app@sender.test>\r\nSubject: Gr\xc3\xbc\xc3\x9fe \xe2\x9c\x89\r\n\r\n"
        + "naïve café, 日本語, emoji 🙂\r\n".encode()
        + every
        + b"\r\n"
        + b"\xff\xfe\x80\x81 not UTF-8\r\n"
        + b"..\xc3\xa9 stuffed\r\n"
    )
    client = await Client.open(relay)
    assert QUEUED.match(await client.transaction("to@example.test", data + b".\r\n"))
    await client.quit()
    assert await delivered(sink, "to@example.test") == data.replace(b"\r\n..", b"\r\n.")
    await settled(relay, sink, 1)


async def test_a_nul_octet_is_refused(relay: Relay, sink: Sink) -> None:
    client = await Client.open(relay)
    assert await client.transaction("nul@example.test", HEAD + b"a\0b\r\n.\r\n") == HAS_NUL
    assert QUEUED.match(await client.transaction("next@example.test", HEAD + b"next\r\n.\r\n"))
    await client.quit()
    assert await delivered(sink, "next@example.test") == HEAD + b"next\r\n"
    await settled(relay, sink, 1)
