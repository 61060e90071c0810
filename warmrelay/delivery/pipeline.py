"""RFC 2920 PIPELINING on an aiosmtplib connection: MAIL, every RCPT and DATA in one
write, then the replies read back in order.

aiosmtplib sends a command and waits for its reply, and its protocol cannot read replies
that arrive together: ``SMTPProtocol.data_received`` parses one reply per chunk (a second
reply already in its buffer waits for bytes that never come) and drops whatever arrives
while a parsed reply has not been picked up yet. So for one pipelined transaction a small
reader stands in for aiosmtplib's protocol on the same transport
(``transport.set_protocol``) and hands the transport back once every reply owed is read.
The connection (TLS, EHLO extensions, reuse, closing) stays aiosmtplib's, and so do the
bytes we write: its address quoting (``quote_address``; plain addresses short-cut), its
check against control characters in commands, and its body encoding (line endings,
dot-stuffing), so a pipelined transaction sends exactly what the lockstep one would.

Writes never block (the transport buffers them) and the reader takes replies as they come,
so the deadlock RFC 2920 §3.1 warns about (a group larger than the TCP window while
nobody reads) cannot happen.
"""

from __future__ import annotations

import asyncio
import re
from collections import deque
from collections.abc import Sequence
from types import TracebackType

import aiosmtplib
from aiosmtplib.email import quote_address
from aiosmtplib.protocol import (
    COMMAND_INJECTION_REGEX,
    MAX_LINE_LENGTH,
    MAX_RESPONSE_LENGTH,
    PERIOD_REGEX,
    SMTPProtocol,
    normalize_message_line_endings,
)

START_INPUT = 354  # the reply to DATA that asks for the message


# local@domain, a dot-atom local part and a plain domain: what aiosmtplib's quote_address
# (email.utils.parseaddr, ~15 us) gives back unchanged inside <>; tests check it against it
_PLAIN_ADDRESS = re.compile(
    r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*"
    r"@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*"
)


def quoted(address: str) -> str:
    """``<address>`` as aiosmtplib's ``quote_address`` writes it; the usual plain address
    without running its parser (every MAIL and RCPT of every delivery)."""
    if _PLAIN_ADDRESS.fullmatch(address):
        return f"<{address}>"
    return quote_address(address)


def commands(mail_from: str, rcpts: Sequence[str], options: Sequence[str], encoding: str) -> bytes:
    """MAIL FROM, each RCPT TO and DATA, as aiosmtplib's ``mail``/``rcpt`` would write them.
    Raises ``ValueError`` (as aiosmtplib does) for an address with control characters."""
    mail = [b"MAIL", b"FROM:" + quoted(mail_from).encode(encoding)]
    mail += [option.encode("ascii") for option in options]
    lines = [mail] + [[b"RCPT", b"TO:" + quoted(r).encode(encoding)] for r in rcpts]
    for args in lines:
        if any(COMMAND_INJECTION_REGEX.search(arg) for arg in args):
            raise ValueError("Command arg contains a prohibited control character")
    return b"".join(b" ".join(args) + b"\r\n" for args in lines) + b"DATA\r\n"


def message(data: bytes) -> bytes:
    """The message as aiosmtplib's ``execute_data_command`` sends it after 354: CRLF line
    endings, leading dots doubled, the final dot. Spooled mail already has CRLF endings
    (the listener saw to that), so three counts in C usually spare the two regex passes."""
    crlf = data.count(b"\r\n")
    if data.count(b"\n") == crlf == data.count(b"\r") and data.endswith(b"\r\n"):
        stuffed = data.replace(b"\r\n.", b"\r\n..")
        return (b"." + stuffed if data[:1] == b"." else stuffed) + b".\r\n"
    return PERIOD_REGEX.sub(b"..", normalize_message_line_endings(data)) + b".\r\n"


def _parse(buffer: bytearray) -> aiosmtplib.SMTPResponse | None:
    """The first complete (possibly multi-line) reply in ``buffer``, removed from it; parsed
    as ``SMTPProtocol._read_response_from_buffer`` does (lines joined with newlines)."""
    offset = 0
    lines: list[bytes] = []
    while (end := buffer.find(b"\n", offset)) != -1:
        line = bytes(buffer[offset : end + 1])
        if len(line) > MAX_LINE_LENGTH:
            raise aiosmtplib.SMTPResponseException(-1, "Response too long")
        try:
            code = int(line[:3])
        except ValueError:
            text = line.decode("utf-8", errors="ignore")
            raise aiosmtplib.SMTPResponseException(
                -1, f"Malformed SMTP response line: {text}"
            ) from None
        offset = end + 1
        lines.append(line[4:].strip(b" \t\r\n"))
        if line[3:4] != b"-":
            del buffer[:offset]
            return aiosmtplib.SMTPResponse(
                code, b"\n".join(lines).decode("utf-8", "surrogateescape")
            )
    if len(buffer) > MAX_RESPONSE_LENGTH:
        raise aiosmtplib.SMTPResponseException(-1, "Response too long")
    return None


class _Reader(asyncio.Protocol):
    """Stands in for aiosmtplib's protocol while replies are owed: queues every reply that
    arrives (however they are split into chunks) and passes the connection's end and flow
    control on to aiosmtplib's protocol, so its state stays right."""

    def __init__(self, inner: SMTPProtocol, timeout_s: float) -> None:
        self.inner = inner
        self.timeout_s = timeout_s  # for each reply, as aiosmtplib's per-command timeout
        self.wanted = 0  # replies owed and not yet queued; anything more is unsolicited
        self._buffer = bytearray()
        self._replies: deque[aiosmtplib.SMTPResponse] = deque()
        self._failure: aiosmtplib.SMTPException | None = None
        self._arrived = asyncio.Event()

    def data_received(self, data: bytes) -> None:
        if self._failure is not None or self.wanted <= 0:
            return  # unsolicited, dropped as aiosmtplib drops it
        self._buffer.extend(data)
        try:
            while self.wanted > 0 and (reply := _parse(self._buffer)) is not None:
                self._replies.append(reply)
                self.wanted -= 1
        except aiosmtplib.SMTPResponseException as exc:
            self._failure = exc
        if self.wanted <= 0:
            self._buffer.clear()
        self._arrived.set()

    def eof_received(self) -> bool | None:
        self._fail(aiosmtplib.SMTPServerDisconnected("Unexpected EOF received"))
        return self.inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        lost = aiosmtplib.SMTPServerDisconnected("Connection lost")
        lost.__cause__ = exc
        self._fail(lost)
        self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()

    def _fail(self, exc: aiosmtplib.SMTPException) -> None:
        if self._failure is None:
            self._failure = exc
        self._arrived.set()

    async def next(self) -> aiosmtplib.SMTPResponse:
        """The next reply; replies that came before a hang-up are still returned first. One
        already here needs no timer (the pipelined RCPT and DATA replies mostly are)."""
        if self._replies:
            return self._replies.popleft()
        try:
            async with asyncio.timeout(self.timeout_s):
                while not self._replies:
                    if self._failure is not None:
                        raise self._failure
                    self._arrived.clear()
                    await self._arrived.wait()
        except TimeoutError:
            raise aiosmtplib.SMTPReadTimeoutError("Timed out waiting for server response") from None
        return self._replies.popleft()


class Pipeline:
    """One pipelined transaction on a connected ``aiosmtplib.SMTP``, used as a context
    manager: on entry the reader takes the transport over; on exit aiosmtplib gets it back,
    or, if replies are still owed (an error or a cancellation in between), the connection
    is closed, since it is out of step.

    Like aiosmtplib, a 421 reply, a lost connection, a timeout or a malformed reply closes
    the connection; after that every read raises ``SMTPServerDisconnected``. Nothing else
    may use the connection meanwhile (aiosmtplib's command lock is not taken: the
    dispatcher runs one transaction at a time on a connection)."""

    def __init__(self, smtp: aiosmtplib.SMTP, timeout: float) -> None:
        if smtp.protocol is None:
            raise aiosmtplib.SMTPServerDisconnected("Server not connected")
        self._smtp = smtp
        self._reader = _Reader(smtp.protocol, timeout)
        self._owed = 0
        self._data_next = False  # the next reply owed answers DATA
        self._data_open = False  # DATA got 354: the message (or a lone dot) must follow
        self._closed = False

    def __enter__(self) -> Pipeline:
        transport = self._reader.inner.transport
        if transport is not None:
            transport.set_protocol(self._reader)
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        transport = self._reader.inner.transport
        if self._owed or self._data_open:
            self._close()
        elif transport is not None and not self._closed:
            transport.set_protocol(self._reader.inner)

    def send(
        self, mail_from: str, rcpts: Sequence[str], options: Sequence[str], encoding: str
    ) -> None:
        """Write MAIL, the RCPTs and DATA at once (RFC 2920: DATA ends a group)."""
        self._write(commands(mail_from, rcpts, options, encoding), len(rcpts) + 2)
        self._data_next = True

    def data(self) -> None:
        """Write DATA alone (the lockstep path: MAIL and RCPT went through aiosmtplib), so
        that both paths tell a connection lost before the message from one lost after it."""
        self._write(b"DATA\r\n", 1)
        self._data_next = True

    async def reply(self) -> aiosmtplib.SMTPResponse:
        """The next reply owed, in the order the commands went."""
        if self._owed <= 0:
            raise RuntimeError("no reply is owed")
        if self._closed:
            raise aiosmtplib.SMTPServerDisconnected("Connection lost")
        try:
            response = await self._reader.next()
        except aiosmtplib.SMTPResponseException as exc:  # malformed: out of step from here
            self._close()
            return aiosmtplib.SMTPResponse(exc.code, exc.message)
        except aiosmtplib.SMTPException:
            self._close()
            raise
        self._owed -= 1
        if self._data_next and self._owed == 0:
            self._data_next = False
            self._data_open = response.code == START_INPUT
        if response.code == 421:  # the receiver is closing (aiosmtplib closes too)
            self._close()
        return response

    async def body(self, data: bytes) -> aiosmtplib.SMTPResponse:
        """After DATA's 354: the message and its final dot; returns the reply to it."""
        if not self._data_open:
            raise RuntimeError("DATA was not answered 354")
        self._data_open = False
        self._write(message(data), 1)
        return await self.reply()

    async def finish(self) -> bool:
        """Read the replies still owed, ignoring them (the caller has what decides), and
        end a DATA that got 354 anyway with a lone dot: RFC 2920 §3.1, "if the DATA command
        was accepted the SMTP client should send a single dot" (RSET there would be read as
        message text). True if the transaction was ended that way (no RSET needed)."""
        dotted = False
        try:
            while self._owed:
                await self.reply()
            if self._data_open:
                self._data_open = False
                self._write(b".\r\n", 1)
                dotted = True
                await self.reply()
        except (aiosmtplib.SMTPException, OSError):
            pass  # the connection is closed: nothing left to keep in step
        return dotted

    def _write(self, data: bytes, replies: int) -> None:
        if self._closed:
            raise aiosmtplib.SMTPServerDisconnected("Connection lost")
        self._owed += replies
        self._reader.wanted += replies
        self._reader.inner.write(data)

    def _close(self) -> None:
        self._closed = True
        self._smtp.close()
