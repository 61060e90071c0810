"""A recording SMTP sink on loopback: the receiver of most tests. It records the peer
address of each message (so a test can assert which source IP carried it), and can be told
to refuse (``rcpt_reply``, ``data_reply``), to slow down, or to hold DATA at a gate."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiosmtpd.smtp import SMTP, AuthResult, Envelope, Session


@dataclass
class Received:
    peer: str  # source address the message came from
    peer_port: int  # tells connections apart (reuse)
    tls: bool  # the message came over TLS
    helo: str
    mail_from: str
    rcpts: list[str]
    data: bytes
    mail_options: list[str] = field(default_factory=list)


ReplyFn = Callable[[str, str], "str | None"]


@dataclass
class Sink:
    """An SMTP receiver that records the peer address of each message.

    ``rcpt_reply(peer, rcpt)`` and ``data_reply(peer, envelope)`` may return a
    reply line to refuse (fault injection); ``delay_s`` slows DATA down.
    """

    host: str = "127.0.0.1"
    rcpt_reply: Callable[[str, str], str | None] | None = None
    data_reply: Callable[[str, Envelope], str | None] | None = None
    delay_s: float = 0.0
    data_gate: asyncio.Event | None = None  # when given, DATA waits until it is set
    in_data: int = 0  # transactions that reached DATA (waiting at the gate or done)
    smtputf8: bool = True  # offer SMTPUTF8 (a receiver without it must get no UTF-8 address)
    tls_context: ssl.SSLContext | None = None
    credentials: tuple[str, str] | None = None  # require AUTH (after STARTTLS) with these
    logins: list[tuple[str, bool]] = field(default_factory=list)  # (user, accepted)
    ehlos: int = 0  # greetings seen: connection attempts that got that far
    quits: int = 0  # QUIT commands seen: connections closed politely
    messages: list[Received] = field(default_factory=list)
    # connections per peer address open now (from the greeting to QUIT or the hang-up),
    # and the most that were open at once: what a receiver sees of a sender's shaping
    open_now: dict[str, int] = field(default_factory=dict)
    open_max: dict[str, int] = field(default_factory=dict)
    port: int = 0
    _server: asyncio.Server | None = None
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        peer = str(session.peer[0])
        reply = self.rcpt_reply(peer, address) if self.rcpt_reply else None
        if reply:
            return reply
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        peer = str(session.peer[0])
        self.in_data += 1
        self._changed.set()
        if self.data_gate is not None:
            await self.data_gate.wait()
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        reply = self.data_reply(peer, envelope) if self.data_reply else None
        if reply:
            return reply
        self.messages.append(
            Received(
                peer,
                int(session.peer[1]),
                session.ssl is not None,
                session.host_name or "",
                (envelope.mail_from or "").strip("<>"),
                list(envelope.rcpt_tos),
                envelope.original_content or b"",
                list(envelope.mail_options),
            )
        )
        self._changed.set()
        return "250 2.0.0 stored"

    def _authenticate(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, data: Any
    ) -> AuthResult:
        assert self.credentials is not None
        user, password = data.login.decode(), data.password.decode()
        ok = (user, password) == self.credentials
        self.logins.append((user, ok))
        self._changed.set()
        return AuthResult(success=ok, handled=False)

    async def handle_EHLO(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        session.host_name = hostname
        self.ehlos += 1
        self._changed.set()
        return responses

    def opened(self, peer: str) -> None:
        self.open_now[peer] = self.open_now.get(peer, 0) + 1
        self.open_max[peer] = max(self.open_max.get(peer, 0), self.open_now[peer])

    def ended(self, peer: str) -> None:
        self.open_now[peer] = self.open_now.get(peer, 0) - 1

    async def handle_QUIT(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        if isinstance(server, _Counted):
            server.end()
        self.quits += 1
        self._changed.set()
        return "221 Bye"

    async def start(self) -> Sink:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _Counted(
                self,
                hostname="sink.test",
                enable_SMTPUTF8=self.smtputf8,
                tls_context=self.tls_context,
                require_starttls=self.credentials is not None,
                auth_required=self.credentials is not None,
                auth_require_tls=True,
                authenticator=self._authenticate if self.credentials else None,
            ),
            self.host,
            self.port,
        )
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()

    async def wait_until(self, done: Callable[[], bool], timeout_s: float = 30.0) -> None:
        """Wait (event-driven: woken by each message, login or greeting) until done()."""

        async def until() -> None:
            while not done():
                self._changed.clear()
                await self._changed.wait()

        await asyncio.wait_for(until(), timeout_s)

    async def wait_for(self, n: int, timeout_s: float = 30.0) -> list[Received]:
        """Wait until at least n messages arrived."""
        await self.wait_until(lambda: len(self.messages) >= n, timeout_s)
        return self.messages

    async def wait_for_ids(
        self, wanted: set[int], ids_of: Callable[[Sink], list[int]], timeout_s: float = 30.0
    ) -> None:
        """Wait until every wanted id has arrived."""
        await self.wait_until(lambda: wanted <= set(ids_of(self)), timeout_s)

    def by_peer(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for m in self.messages:
            out[m.peer] = out.get(m.peer, 0) + len(m.rcpts)
        return out


MakeSink = Callable[..., Awaitable["Sink"]]  # the make_sink fixture


class _Counted(SMTP):
    """aiosmtpd's SMTP, telling the sink when a connection begins and ends (at QUIT, or
    at the hang-up, whichever comes first)."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        peer = transport.get_extra_info("peername")
        self._peer = str(peer[0]) if isinstance(peer, tuple) else ""
        self._ended = False
        sink = self.event_handler
        assert isinstance(sink, Sink)
        sink.opened(self._peer)

    def end(self) -> None:
        if not getattr(self, "_ended", True):
            self._ended = True
            sink = self.event_handler
            assert isinstance(sink, Sink)
            sink.ended(self._peer)

    def connection_lost(self, exc: Exception | None) -> None:
        self.end()
        super().connection_lost(exc)
