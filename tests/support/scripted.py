"""A scripted SMTP receiver on loopback, for transaction-level tests: a raw asyncio server
(not aiosmtpd) so that it can offer PIPELINING, answer exactly what a test scripts (354 to
a DATA with no valid recipient, a 421 in the middle of a group, a hang-up instead of a
reply) and record what it received: every byte, and for each command which read brought
it and how many replies had been written by then. Pipelined commands arrive in one read,
before any of their replies; lockstep ones each after the previous reply."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

EXTENSIONS = ("PIPELINING", "8BITMIME", "SIZE 10240000", "SMTPUTF8")
SILENT = ""  # a scripted reply that never comes: the connection stays open, unanswered


@dataclass(frozen=True)
class Script:
    """The replies of every transaction. A reply of ``None`` hangs up instead of answering,
    ``SILENT`` never answers; a 421 is answered, then the connection is closed (as real
    receivers do)."""

    mail: str | None = "250 2.1.0 Ok"
    later_mail: str | None = "250 2.1.0 Ok"  # MAIL after the first transaction of a connection
    rcpt: Sequence[str | None] = ()  # per RCPT TO, in order; past the end: 250
    by_address: Mapping[str, str | None] = field(default_factory=dict)  # RCPT, before rcpt
    data: str | None = "354 End data with <CR><LF>.<CR><LF>"
    end: str | None = "250 2.0.0 Ok: queued as 4XyZ"  # the reply after the final dot
    extensions: Sequence[str] = EXTENSIONS  # EHLO keywords offered


@dataclass(frozen=True)
class Command:
    line: bytes  # without its CRLF
    read: int  # which read on the connection brought it (1: the first)
    replies_before: int  # replies written (greeting included) when that read returned


@dataclass
class Session:
    """One connection as the receiver saw it."""

    raw: bytearray = field(default_factory=bytearray)  # every byte received, in order
    commands: list[Command] = field(default_factory=list)
    messages: list[bytes] = field(default_factory=list)  # as sent: dot-stuffed, no final dot
    message_reads: list[int] = field(default_factory=list)  # the read that ended each
    replies: int = 0  # replies written (a multi-line one counts once)
    closed: asyncio.Event = field(default_factory=asyncio.Event)

    def verbs(self) -> list[str]:
        return [c.line.split(b" ", 1)[0].split(b":", 1)[0].decode().upper() for c in self.commands]

    def group(self, verb: str = "MAIL", nth: int = 0) -> list[Command]:
        """The commands that came in the same read as the ``nth`` ``verb``."""
        found = [c for c in self.commands if c.line.upper().startswith(verb.encode())]
        return [c for c in self.commands if c.read == found[nth].read]


@dataclass
class Scripted:
    """The receiver; ``one_write_per_reply`` writes each reply on its own (default: the
    replies to one read go out in one write, as Postfix flushes them)."""

    script: Script = field(default_factory=Script)
    one_write_per_reply: bool = False
    sessions: list[Session] = field(default_factory=list)
    port: int = 0
    _server: asyncio.Server | None = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        session = Session()
        self.sessions.append(session)
        pending: list[bytes] = []

        def answer(reply: str) -> None:
            pending.append(reply.encode() + b"\r\n")
            session.replies += 1
            if self.one_write_per_reply:
                flush()

        def flush() -> None:
            if pending:
                writer.write(b"".join(pending))
                pending.clear()

        try:
            answer("220 scripted.test ESMTP")
            flush()
            buffer = bytearray()
            reads = 0
            body: bytearray | None = None  # inside DATA: the message so far
            rcpts = 0
            while data := await reader.read(65536):
                reads += 1
                before = session.replies
                session.raw += data
                buffer += data
                while (end := buffer.find(b"\r\n")) != -1:
                    line = bytes(buffer[:end])
                    del buffer[: end + 2]
                    if body is not None:
                        if line != b".":
                            body += line + b"\r\n"
                            continue
                        session.messages.append(bytes(body))
                        session.message_reads.append(reads)
                        body = None
                        reply = self.script.end
                    else:
                        session.commands.append(Command(line, reads, before))
                        verb = line.split(b" ", 1)[0].split(b":", 1)[0].upper()
                        if verb == b"EHLO":
                            keywords = ["scripted.test", *self.script.extensions]
                            reply = "\r\n".join(
                                f"250{' ' if n == len(keywords) - 1 else '-'}{keyword}"
                                for n, keyword in enumerate(keywords)
                            )
                        elif verb == b"MAIL":
                            rcpts = 0
                            later = "MAIL" in session.verbs()[:-1]
                            reply = self.script.later_mail if later else self.script.mail
                        elif verb == b"RCPT":
                            address = line.split(b"<", 1)[-1].split(b">", 1)[0].decode()
                            script = self.script.rcpt
                            reply = script[rcpts] if rcpts < len(script) else "250 2.1.5 Ok"
                            reply = self.script.by_address.get(address, reply)
                            rcpts += 1
                        elif verb == b"DATA":
                            reply = self.script.data
                            if reply is not None and reply.startswith("354"):
                                body = bytearray()
                        elif verb == b"QUIT":
                            answer("221 2.0.0 Bye")
                            return
                        else:  # HELO, RSET, NOOP
                            reply = "250 2.0.0 Ok"
                    if reply is None or reply.startswith("421"):
                        if reply is not None:
                            answer(reply)
                        # hang up; what else came in this read arrived all the same
                        for rest in bytes(buffer).split(b"\r\n")[:-1]:
                            session.commands.append(Command(rest, reads, before))
                        return
                    if reply != SILENT:
                        answer(reply)
                flush()
                await writer.drain()
        finally:
            flush()
            writer.close()
            session.closed.set()

    async def start(self) -> Scripted:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()

    async def session(self, n: int = 0, timeout_s: float = 10.0) -> Session:
        """Session ``n`` once its connection is closed (by QUIT, a 421 or a hang-up)."""
        session = self.sessions[n]
        await asyncio.wait_for(session.closed.wait(), timeout_s)
        return session


@asynccontextmanager
async def scripted(
    script: Script | None = None, *, one_write_per_reply: bool = False
) -> AsyncIterator[Scripted]:
    """A started receiver, stopped at the end."""
    receiver = await Scripted(script or Script(), one_write_per_reply).start()
    try:
        yield receiver
    finally:
        await receiver.stop()
