"""Listener: the SMTP side facing applications (aiosmtpd protocol, our policy).

Access policy and limits live in ``RelayHandler``; the protocol is aiosmtpd's.
On DATA the message goes to the spool and the client hears ``250`` only once
the spool holds it durably; delivery never runs inside an SMTP session.
"""

from __future__ import annotations

import asyncio
import inspect
import ipaddress
import logging
import re
import ssl
import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Any, AnyStr

import aiosmtpd.smtp
from aiosmtpd.proxy_protocol import ProxyData
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

from warmrelay.auth import Authenticator, AuthGuard
from warmrelay.config import Config, IPNetwork, ListenerConfig
from warmrelay.errors import SpoolError
from warmrelay.metrics import Metrics
from warmrelay.spool import Spool, SpooledMessage

log = logging.getLogger("warmrelay.listener")

PROXY_TIMEOUT_S = 10.0  # a load balancer sends its PROXY header at once

# aiosmtpd answers some errors itself, without enhanced status codes (RFC 3463).
_ENHANCED = {
    "552 Error: message size exceeds fixed maximum message size": (
        "552 5.3.4 Message size exceeds fixed maximum message size"
    ),
    "552 Error: Too much mail data": "552 5.3.4 Message size exceeds fixed maximum message size",
    "553 5.1.3 Error: malformed address": "501 5.1.3 Bad address syntax",
    "503 Error: need MAIL command": "503 5.5.1 Error: need MAIL command",
    "503 Error: need RCPT command": "503 5.5.1 Error: need RCPT command",
    "503 Error: nested MAIL command": "503 5.5.1 Error: nested MAIL command",
    "500 Line too long (see RFC5321 4.5.3.1.6)": "500 5.5.2 Line too long",
}
# <local@domain> with an unquoted dot-atom local part and a plain domain, then parameters
_SIMPLE_PATH = re.compile(
    r"\s*<(([A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*)"
    r"@[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?)>(.*)\Z",
    re.DOTALL,
)
_BARE_NEWLINE = re.compile(rb"\r(?!\n)|(?<!\r)\n")
_DOMAIN = re.compile(
    r"^(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z0-9-]{1,63}$"
    r"|^\[(?:IPv6:)?[0-9A-Fa-f:.]+\]$"
)


class _AuthMembers:
    """Stands in for ``inspect`` inside aiosmtpd.smtp.

    aiosmtpd's SMTP.__init__ runs inspect.getmembers() over the protocol and the
    handler on every connection only to find their auth_* methods: about 5 % of
    the relay's CPU at one connection per message. Listing auth_* names once per
    class and binding them per instance gives aiosmtpd the same answer.
    """

    def __init__(self) -> None:
        self._names: dict[type, list[str]] = {}

    def getmembers(self, obj: object) -> list[tuple[str, Any]]:
        cls = type(obj)
        names = self._names.get(cls)
        if names is None:
            names = self._names[cls] = [n for n in dir(cls) if n.startswith("auth_")]
        return [(n, getattr(obj, n)) for n in names]

    def __getattr__(self, name: str) -> Any:
        return getattr(inspect, name)


setattr(aiosmtpd.smtp, "inspect", _AuthMembers())  # noqa: B010 - patching a module global


class ConnectionLimits:
    """Open sessions, in total and per client address (shared by all listeners)."""

    def __init__(self, total: int, per_client: int) -> None:
        self.total, self.per_client = total, per_client
        self.open = 0
        self._by_client: dict[str, int] = {}

    def acquire(self, client: str, *, exempt: bool = False) -> bool:
        """``exempt`` skips the per-client cap (as Postfix exempts $mynetworks): an
        application host in allow_networks may open many sessions at once."""
        if self.open >= self.total:
            return False
        if not exempt and self._by_client.get(client, 0) >= self.per_client:
            return False
        self.open += 1
        self._by_client[client] = self._by_client.get(client, 0) + 1
        return True

    def release(self, client: str) -> None:
        self.open -= 1
        left = self._by_client.get(client, 1) - 1
        if left:
            self._by_client[client] = left
        else:
            self._by_client.pop(client, None)


class RelaySMTP(SMTP):
    """aiosmtpd's protocol plus our limits: enhanced status codes, connection caps,
    a budget of refused commands, a deadline for DATA, and AUTH checked off the loop."""

    def __init__(
        self, handler: RelayHandler, listener: ListenerConfig, tls: str, **kwargs: Any
    ) -> None:
        super().__init__(handler, authenticator=self._capture, **kwargs)
        self.relay = handler
        self.listener = listener
        self.tls_mode = tls
        self._metrics = handler.metrics
        self._client = ""
        self._admitted = False
        self._bad = 0
        self._implicit_tls = False

    @property
    def encrypted(self) -> bool:
        return self._implicit_tls or (self.session is not None and self.session.ssl is not None)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self.transport is None:  # a new connection, not the STARTTLS upgrade
            peer = transport.get_extra_info("peername")
            self._client = str(peer[0]) if peer else ""
            self._implicit_tls = transport.get_extra_info("sslcontext") is not None
            exempt = self.listener.proxy_protocol is False and self.relay.may_relay(self._client)
            if not self.relay.limits.acquire(self._client, exempt=exempt):
                self._metrics.rejected.labels("421").inc()
                log.warning("too many connections: refusing %s", self._client)
                if isinstance(transport, asyncio.WriteTransport):
                    transport.write(b"421 4.7.0 Too many connections, try again later\r\n")
                transport.close()
                return
            self._admitted = True
            self._metrics.smtp_sessions.inc()
        super().connection_made(transport)

    def connection_lost(self, error: Exception | None) -> None:
        if not self._admitted:
            return
        self._admitted = False
        self.relay.limits.release(self._client)
        self._metrics.smtp_sessions.dec()
        super().connection_lost(error)

    async def push(self, status: AnyStr) -> None:
        text = status.decode("utf-8", "replace") if isinstance(status, bytes) else str(status)
        text = _ENHANCED.get(text, text)
        if text[:1] in ("4", "5"):
            self._metrics.rejected.labels(text[:3]).inc()
        await super().push(text)
        if text[:1] == "5":
            self._bad += 1
            if self._bad == self.relay.config.smtp.max_bad_commands:
                log.warning("%s: too many refused commands, hanging up", self._client)
                await super().push("421 4.7.0 Too many errors, closing connection")
                if self.transport is not None:
                    self.transport.close()

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        """The common "<local@domain> PARAMS" is split here; anything else (quoted local
        parts, source routes, comments, UTF-8) goes to aiosmtpd's stdlib-email parser,
        which cost ~10 % of the loop thread for every MAIL and RCPT."""
        m = _SIMPLE_PATH.match(arg)
        if m is None or len(m.group(2)) > 64:
            return super()._getaddr(arg)
        return m.group(1), m.group(3).lstrip(" \t")

    async def smtp_DATA(self, arg: str) -> None:
        try:
            await asyncio.wait_for(super().smtp_DATA(arg), self.relay.config.smtp.data_timeout_s)
        except TimeoutError:
            log.warning("%s: DATA took too long, hanging up", self._client)
            await super().push("421 4.4.2 DATA timeout, closing connection")
            if self.transport is not None:
                self.transport.close()

    # AUTH: aiosmtpd parses PLAIN/LOGIN and calls a synchronous authenticator; ours only
    # captures the credentials, then the real (slow, threaded) check runs here.

    def _capture(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, data: Any
    ) -> AuthResult:
        return AuthResult(success=True, auth_data=data)

    async def auth_PLAIN(self, _: Any, args: list[str]) -> AuthResult:
        if not await self._auth_allowed():
            return AuthResult(success=False, handled=True)
        return await self._verify(await super().auth_PLAIN(_, args))

    async def auth_LOGIN(self, _: Any, args: list[str]) -> AuthResult:
        if not await self._auth_allowed():
            return AuthResult(success=False, handled=True)
        return await self._verify(await super().auth_LOGIN(_, args))

    async def _auth_allowed(self) -> bool:
        if self.relay.guard.locked(self._client):
            await super().push("421 4.7.0 Too many failed authentications, try again later")
            if self.transport is not None:
                self.transport.close()
            return False
        return True

    async def _verify(self, parsed: AuthResult) -> AuthResult:
        if not parsed.success or not isinstance(parsed.auth_data, LoginPassword):
            return parsed  # aiosmtpd already answered (bad base64, cancelled)
        user = parsed.auth_data.login.decode("utf-8", "replace")
        password = parsed.auth_data.password.decode("utf-8", "replace")
        if await self.relay.auth.verify(user, password):
            self.relay.guard.succeeded(self._client)
            log.info("%s: authenticated as %s", self._client, user)
            return AuthResult(success=True, auth_data=parsed.auth_data)
        delay = self.relay.guard.failed(self._client)
        log.warning("%s: authentication failed for user %r", self._client, user[:64])
        await asyncio.sleep(delay)  # tarpit: each failure makes guessing slower
        return AuthResult(
            success=False, handled=False, message="535 5.7.8 Authentication credentials invalid"
        )


def valid_mailbox(address: str) -> bool:
    """local@domain with a plausible domain (RFC 5321 syntax, simplified; UTF-8 allowed)."""
    local, at, domain = address.rpartition("@")
    if not at or not local or len(address) > 254:
        return False
    try:
        address.encode("utf-8")  # undecodable bytes arrive as lone surrogates
    except UnicodeEncodeError:
        return False
    try:
        ascii_domain = domain.encode("idna").decode("ascii") if not domain.isascii() else domain
    except UnicodeError:
        return False
    return bool(_DOMAIN.match(ascii_domain))


class RelayHandler:
    """aiosmtpd handler: who may relay, what fits, and the durable hand-off to the spool."""

    def __init__(
        self,
        config: Config,
        spool: Spool,
        submit: Callable[[SpooledMessage, bytes], None],
        metrics: Metrics,
        admit: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.spool = spool
        self.submit = submit
        self.metrics = metrics
        self.admit = admit
        self.configure(config)
        self.limits = ConnectionLimits(
            config.smtp.max_connections, config.smtp.max_connections_per_client
        )
        self.guard = AuthGuard(
            config.smtp.max_auth_failures, config.smtp.auth_lockout_s, config.smtp.auth_tarpit_s
        )

    def configure(self, config: Config) -> None:
        """Take a (re)loaded configuration: relay networks, users, limits, names."""
        self.config = config
        self._allowed: Sequence[IPNetwork] = config.smtp.allow_networks
        self.auth = Authenticator(config.smtp.users)

    def may_relay(self, peer: str) -> bool:
        try:
            addr = ipaddress.ip_address(peer)
        except ValueError:
            return False
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
        return any(addr in net for net in self._allowed)

    async def handle_PROXY(
        self, server: SMTP, session: Session, envelope: Envelope, proxy: ProxyData
    ) -> bool:
        """A well-formed PROXY header (v1 or v2): the real client is its source address."""
        if proxy.src_addr is None:  # PROXY "LOCAL"/UNKNOWN: the balancer's own health check
            return proxy.valid
        log.debug("PROXY: client %s via %s", proxy.src_addr, session.peer)
        return proxy.valid

    async def handle_EHLO(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        session.host_name = hostname
        offered = [r for r in responses[:-1] if not r.startswith("250-AUTH") or self.auth.enabled]
        return [*offered, "250-PIPELINING", "250-ENHANCEDSTATUSCODES", responses[-1]]

    async def handle_MAIL(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        mail_options: list[str],
    ) -> str:
        # The null reverse-path stays "<>" in the envelope (aiosmtpd needs it truthy).
        if address != "<>" and not valid_mailbox(address):
            return "501 5.1.7 Bad sender address syntax"
        if not address.isascii() and "SMTPUTF8" not in (o.upper() for o in mail_options):
            return "553 5.6.7 Non-ASCII address needs MAIL FROM ... SMTPUTF8"
        user = _user(session)
        if user is not None and not self.auth.may_send_as(user, "" if address == "<>" else address):
            log.warning("user %s may not send as <%s>", user, address)
            return "553 5.7.1 Sender address not allowed for this user"
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 Ok"

    async def handle_RCPT(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        peer = _peer_ip(session)
        listener: ListenerConfig | None = getattr(server, "listener", None)
        by_network = self.may_relay(peer) and not (listener and listener.require_auth)
        if not (session.authenticated or by_network):
            log.warning("relaying denied for %s to <%s>", peer, address)
            if listener is not None and listener.require_auth:
                return "530 5.7.0 Authentication required"
            return "550 5.7.1 Relaying denied"
        if not valid_mailbox(address):
            return "501 5.1.3 Bad recipient address syntax"
        if not address.isascii() and not envelope.smtp_utf8:
            return "553 5.6.7 Non-ASCII address needs MAIL FROM ... SMTPUTF8"
        if len(envelope.rcpt_tos) >= self.config.smtp.max_recipients:
            return "452 4.5.3 Too many recipients"
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 2.1.5 Ok"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        content: bytes = envelope.original_content or b""
        peer = _peer_ip(session)
        if b"\0" in content:
            return "554 5.6.0 Message contains NUL characters"
        if _has_bare_newline(content):
            # A lone CR or LF lets "<LF>.<LF>" end a message early at a receiver that
            # takes it for a line end (SMTP smuggling): refuse, or make every one CRLF.
            if self.config.smtp.bare_newlines == "reject":
                return "554 5.6.11 Message contains bare CR or LF characters"
            content = _BARE_NEWLINE.sub(b"\r\n", content)
        received_at = time.time()
        encrypted = bool(getattr(server, "encrypted", False))
        trace = self._received_header(session, peer, envelope, received_at, encrypted)
        data = trace + content
        if self.admit is not None:
            await self.admit()
        try:
            message = await self.spool.store(
                "" if envelope.mail_from == "<>" else envelope.mail_from or "",
                envelope.rcpt_tos,
                data,
                meta={"client": peer, "helo": session.host_name or ""},
                received_at=received_at,
            )
        except SpoolError as exc:
            self.metrics.spool_errors.inc()
            log.error("spool cannot store a message from %s: %s", peer, exc)
            return "451 4.3.0 Cannot queue the message now, try again later"
        self.metrics.received.inc()
        log.info(
            "%s: from=<%s> nrcpt=%d size=%d client=%s",
            message.queue_id,
            message.mail_from,
            len(message.rcpt_tos),
            message.size,
            peer,
        )
        self.submit(message, data)
        return f"250 2.0.0 Ok: queued as {message.queue_id}"

    def _received_header(
        self, session: Session, peer: str, envelope: Envelope, now: float, encrypted: bool
    ) -> bytes:
        helo = (session.host_name or "unknown").replace("\r", "").replace("\n", "")[:255]
        # RFC 3848 protocol names: ESMTP, +S with TLS, +A when authenticated
        proto = ("UTF8SMTP" if envelope.smtp_utf8 else "ESMTP") if session.extended_smtp else "SMTP"
        proto += ("S" if encrypted else "") + ("A" if session.authenticated else "")
        date = format_datetime(datetime.fromtimestamp(now, UTC))
        header = (
            f"Received: from {helo} ([{peer}])\r\n"
            f"\tby {self.config.smtp.hostname} (warmrelay) with {proto};\r\n"
            f"\t{date}\r\n"
        )
        return header.encode("utf-8", "surrogateescape")


def _has_bare_newline(content: bytes) -> bool:
    """A CR or LF not part of a CRLF pair. Counting in C is ~10x faster than the regex on
    clean mail; the regex only confirms when the counts disagree."""
    pairs = content.count(b"\r\n")
    if content.count(b"\n") == pairs and content.count(b"\r") == pairs:
        return False
    return _BARE_NEWLINE.search(content) is not None


def _peer_ip(session: Session) -> str:
    """The client's address: from the PROXY header behind a load balancer, else the socket."""
    proxy = session.proxy_data
    if proxy is not None and proxy.src_addr is not None:
        src = proxy.src_addr
        return src.decode() if isinstance(src, bytes) else str(src)
    peer = session.peer
    return str(peer[0]) if isinstance(peer, tuple) else str(peer or "")


def _user(session: Session) -> str | None:
    if not session.authenticated or session.login_data is None:
        return None
    login = session.login_data
    return login.decode("utf-8", "replace") if isinstance(login, bytes) else str(login)


def make_protocol(
    handler: RelayHandler,
    config: Config,
    listener: ListenerConfig,
    tls_context: ssl.SSLContext | None,
) -> Callable[[], RelaySMTP]:
    """A protocol factory for ``loop.create_server`` for one listener."""
    tls = config.smtp.listener_tls(listener)
    in_clear_ok = listener.auth_without_tls or tls == "implicit"

    def factory() -> RelaySMTP:
        return RelaySMTP(
            handler,
            listener,
            tls,
            hostname=handler.config.smtp.hostname,  # the handler's: follows reloads
            data_size_limit=handler.config.smtp.max_message_bytes,
            enable_SMTPUTF8=True,
            decode_data=False,
            timeout=handler.config.smtp.timeout_s,
            ident="warmrelay ESMTP",
            tls_context=tls_context if tls == "starttls" else None,
            auth_required=listener.require_auth,
            auth_require_tls=not in_clear_ok,
            proxy_protocol_timeout=PROXY_TIMEOUT_S if listener.proxy_protocol else None,
        )

    return factory
