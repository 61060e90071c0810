"""Listener: the SMTP side facing applications (aiosmtpd protocol, our policy).

Access policy and limits live in ``RelayHandler``; the protocol is aiosmtpd's.
On DATA the message goes to the spool and the client hears ``250`` only once
the spool holds it durably; delivery never runs inside an SMTP session.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Any, AnyStr

from aiosmtpd.smtp import SMTP, Envelope, Session

from warmrelay.config import Config, IPNetwork
from warmrelay.errors import SpoolError
from warmrelay.metrics import Metrics
from warmrelay.spool import Spool, SpooledMessage

log = logging.getLogger("warmrelay.listener")

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
_DOMAIN = re.compile(
    r"^(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z0-9-]{1,63}$"
    r"|^\[(?:IPv6:)?[0-9A-Fa-f:.]+\]$"
)


class RelaySMTP(SMTP):
    """aiosmtpd's protocol with enhanced status codes on its built-in replies."""

    def __init__(self, handler: RelayHandler, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self._metrics = handler.metrics

    async def push(self, status: AnyStr) -> None:
        text = status.decode("utf-8", "replace") if isinstance(status, bytes) else str(status)
        text = _ENHANCED.get(text, text)
        if text[:1] in ("4", "5"):
            self._metrics.rejected.labels(text[:3]).inc()
        await super().push(text)


def valid_mailbox(address: str) -> bool:
    """local@domain with a plausible domain (RFC 5321 syntax, simplified; UTF-8 allowed)."""
    local, at, domain = address.rpartition("@")
    if not at or not local or len(address) > 254:
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
    ) -> None:
        self.config = config
        self.spool = spool
        self.submit = submit
        self.metrics = metrics
        self._allowed: Sequence[IPNetwork] = config.smtp.allow_networks

    def may_relay(self, peer: str) -> bool:
        try:
            addr = ipaddress.ip_address(peer)
        except ValueError:
            return False
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
        return any(addr in net for net in self._allowed)

    async def handle_EHLO(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        session.host_name = hostname
        return [*responses[:-1], "250-PIPELINING", "250-ENHANCEDSTATUSCODES", responses[-1]]

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
        if not self.may_relay(peer):
            log.warning("relaying denied for %s to <%s>", peer, address)
            return "550 5.7.1 Relaying denied"
        if not valid_mailbox(address):
            return "501 5.1.3 Bad recipient address syntax"
        if len(envelope.rcpt_tos) >= self.config.smtp.max_recipients:
            return "452 4.5.3 Too many recipients"
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 2.1.5 Ok"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        content: bytes = envelope.original_content or b""
        peer = _peer_ip(session)
        received_at = time.time()
        trace = self._received_header(session, peer, envelope, received_at)
        data = trace + content
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
        self, session: Session, peer: str, envelope: Envelope, now: float
    ) -> bytes:
        helo = (session.host_name or "unknown").replace("\r", "").replace("\n", "")[:255]
        proto = "ESMTP" if session.extended_smtp else "SMTP"
        if envelope.smtp_utf8:
            proto = "UTF8SMTP"
        date = format_datetime(datetime.fromtimestamp(now, UTC))
        header = (
            f"Received: from {helo} ([{peer}])\r\n"
            f"\tby {self.config.smtp.hostname} (warmrelay) with {proto};\r\n"
            f"\t{date}\r\n"
        )
        return header.encode("utf-8", "surrogateescape")


def _peer_ip(session: Session) -> str:
    peer = session.peer
    return str(peer[0]) if isinstance(peer, tuple) else str(peer or "")


def make_protocol(handler: RelayHandler, config: Config) -> Callable[[], RelaySMTP]:
    """A protocol factory for ``loop.create_server``."""

    def factory() -> RelaySMTP:
        return RelaySMTP(
            handler,
            hostname=config.smtp.hostname,
            data_size_limit=config.smtp.max_message_bytes,
            enable_SMTPUTF8=True,
            decode_data=False,
            timeout=config.smtp.timeout_s,
            ident="warmrelay ESMTP",
        )

    return factory
