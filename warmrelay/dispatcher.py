"""Dispatcher: SMTP delivery bound to the chosen source IP, with connection reuse.

Each transaction leaves from ``source_address=(ip, 0)`` greeting with that
IP's helo name; connections are kept per (source IP, next hop) for reuse.
A bind failure (the address is not on this host) is reported as such, never
retried from another address. Replies are classified per recipient.
"""

from __future__ import annotations

import asyncio
import enum
import errno
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import aiosmtplib

from warmrelay.config import DeliveryConfig, IPConfig
from warmrelay.nexthop import NextHop

log = logging.getLogger("warmrelay.dispatcher")


class Outcome(enum.Enum):
    DELIVERED = "delivered"
    DEFERRED = "deferred"
    BOUNCED = "bounced"


@dataclass(frozen=True)
class Reply:
    """A recipient's result: outcome plus the reply that decided it."""

    outcome: Outcome
    code: int
    text: str
    hop: str  # "host[address]:port", or "" if no receiver was reached

    @property
    def status(self) -> str:
        """The enhanced status code from the reply text, or one derived from the code."""
        first = self.text.split(" ", 1)[0]
        parts = first.split(".")
        if len(parts) == 3 and all(p.isdigit() for p in parts):
            return first
        return {Outcome.BOUNCED: "5.0.0", Outcome.DEFERRED: "4.0.0"}.get(self.outcome, "2.0.0")


@dataclass(frozen=True)
class Endpoint:
    """How to connect: from which address, greeting as whom, with what TLS and credentials."""

    source: str | None  # local address to bind; None = the host's choice (smarthost)
    helo: str
    tls: str  # opportunistic | never | required | implicit
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    verify: bool = False
    ca_file: str | None = None


class Connected(enum.Enum):
    YES = "yes"  # a receiver got the recipients: they count against the cap
    NO = "no"  # no next hop answered: release the reservation, retry later
    BIND_FAILED = "bind_failed"  # the source address is not usable on this host


@dataclass(frozen=True)
class DispatchResult:
    connected: Connected
    replies: tuple[Reply, ...]  # one per recipient, in order


def classify(code: int) -> Outcome:
    if 200 <= code < 300:
        return Outcome.DELIVERED
    if 500 <= code < 600:
        return Outcome.BOUNCED
    return Outcome.DEFERRED


def _is_bind_error(exc: BaseException) -> bool:
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, OSError) and cause.errno in (errno.EADDRNOTAVAIL, errno.EINVAL):
            return True
        cause = cause.__cause__ or cause.__context__
    return False


class _Lost(Exception):
    """The connection broke mid-transaction (internal: retried once on a fresh connection)."""


@dataclass
class _Pool:
    """Idle connections and a cap on open ones, for one (source IP, next hop)."""

    limit: asyncio.Semaphore
    idle: list[tuple[aiosmtplib.SMTP, float]] = field(default_factory=list)


class Dispatcher:
    def __init__(self, config: DeliveryConfig) -> None:
        self._config = config
        self._pools: dict[tuple[str, str, int], _Pool] = {}
        self.closing = False  # set at shutdown: start no new transaction

    def _pool(self, key: tuple[str, str, int]) -> _Pool:
        pool = self._pools.get(key)
        if pool is None:
            pool = _Pool(asyncio.Semaphore(self._config.connections_per_destination))
            self._pools[key] = pool
        return pool

    def configure(self, config: DeliveryConfig) -> None:
        """A reloaded configuration: timeouts and TLS policy apply to new connections."""
        self._config = config

    def endpoint(self, source: IPConfig) -> Endpoint:
        """Deliver from a source IP of ours, greeting with its helo."""
        return Endpoint(str(source.address), source.helo, self._config.starttls)

    async def send(
        self,
        endpoint: Endpoint,
        hops: Sequence[NextHop],
        mail_from: str,
        rcpts: Sequence[str],
        data: bytes,
    ) -> DispatchResult:
        """Try the next hops in order until one takes the transaction."""
        last = Reply(Outcome.DEFERRED, 451, "4.4.1 No next hop answered", "")
        for hop in hops:
            key = (endpoint.source or "*", hop.address, hop.port)
            label = f"{hop.host}[{hop.address}]:{hop.port}"
            pool = self._pool(key)
            async with pool.limit:
                if self.closing:
                    shutdown = Reply(Outcome.DEFERRED, 421, "4.3.2 relay shutting down", "")
                    return DispatchResult(Connected.NO, tuple(shutdown for _ in rcpts))
                try:
                    smtp = self._reuse(pool)
                    if smtp is not None:
                        try:
                            replies, reusable = await self._transaction(
                                smtp, mail_from, rcpts, data, label
                            )
                            return self._done(pool, smtp, replies, reusable)
                        except _Lost:  # the receiver closed an idle connection: go fresh
                            smtp.close()
                    smtp = await self._connect(endpoint, hop)
                except aiosmtplib.SMTPException as exc:
                    if endpoint.source is not None and _is_bind_error(exc):
                        cannot = Reply(
                            Outcome.DEFERRED, 451, f"4.4.0 cannot bind {endpoint.source}", ""
                        )
                        return DispatchResult(Connected.BIND_FAILED, tuple(cannot for _ in rcpts))
                    if isinstance(exc, aiosmtplib.SMTPAuthenticationError):
                        text = f"4.7.0 {label} refused our credentials: {exc.code} {exc.message}"
                        last = Reply(Outcome.DEFERRED, 454, text, label)
                    elif isinstance(exc, aiosmtplib.SMTPResponseException):  # e.g. 421 greeting
                        last = Reply(Outcome.DEFERRED, exc.code, exc.message, label)
                    else:
                        last = Reply(Outcome.DEFERRED, 451, f"4.4.1 {label}: {exc}", label)
                    log.info(
                        "connect %s from %s failed: %s", label, endpoint.source or "default", exc
                    )
                    continue
                try:
                    replies, reusable = await self._transaction(smtp, mail_from, rcpts, data, label)
                except _Lost as exc:
                    smtp.close()
                    lost = Reply(Outcome.DEFERRED, 451, f"4.4.2 {label}: {exc.__cause__}", label)
                    replies, reusable = tuple(lost for _ in rcpts), False
                return self._done(pool, smtp, replies, reusable)
        return DispatchResult(Connected.NO, tuple(last for _ in rcpts))

    def _done(
        self, pool: _Pool, smtp: aiosmtplib.SMTP, replies: tuple[Reply, ...], reusable: bool
    ) -> DispatchResult:
        if reusable and smtp.is_connected:
            pool.idle.append((smtp, time.monotonic()))
        else:
            smtp.close()
        return DispatchResult(Connected.YES, replies)

    def _reuse(self, pool: _Pool) -> aiosmtplib.SMTP | None:
        now = time.monotonic()
        while pool.idle:
            smtp, since = pool.idle.pop()
            if smtp.is_connected and now - since < self._config.idle_connection_s:
                return smtp
            smtp.close()
        return None

    async def _connect(self, endpoint: Endpoint, hop: NextHop) -> aiosmtplib.SMTP:
        smtp = aiosmtplib.SMTP(
            hostname=hop.address,
            port=hop.port,
            local_hostname=endpoint.helo,
            source_address=(endpoint.source, 0) if endpoint.source else None,
            timeout=self._config.timeout_s,
            use_tls=endpoint.tls == "implicit",
            start_tls={"opportunistic": None, "required": True}.get(endpoint.tls, False),
            # MX certificates rarely match the MX name (RFC 7672); a smarthost's must.
            validate_certs=endpoint.verify,
            cert_bundle=endpoint.ca_file,
        )
        await smtp.connect(timeout=self._config.connect_timeout_s)
        if endpoint.username is not None:
            if endpoint.password is None:
                smtp.close()
                raise aiosmtplib.SMTPAuthenticationError(
                    530, "no password: the smarthost password variable is not set"
                )
            try:
                await smtp.login(endpoint.username, endpoint.password)
            except aiosmtplib.SMTPException:
                smtp.close()
                raise
        return smtp

    async def _transaction(
        self, smtp: aiosmtplib.SMTP, mail_from: str, rcpts: Sequence[str], data: bytes, label: str
    ) -> tuple[tuple[Reply, ...], bool]:
        """One MAIL/RCPT/DATA; returns a reply per recipient and whether to keep the connection."""
        options = ["SMTPUTF8"] if not (mail_from + "".join(rcpts)).isascii() else []
        if not data.isascii() and smtp.supports_extension("8bitmime"):
            options.append("BODY=8BITMIME")
        try:
            refused, response = await smtp.sendmail(
                mail_from, list(rcpts), data, mail_options=options
            )
        except aiosmtplib.SMTPRecipientsRefused as exc:
            by_rcpt = {r.recipient: r for r in exc.recipients}
            return tuple(
                Reply(classify(by_rcpt[r].code), by_rcpt[r].code, by_rcpt[r].message, label)
                if r in by_rcpt
                else Reply(Outcome.DEFERRED, 451, "4.3.0 no reply", label)
                for r in rcpts
            ), True
        except aiosmtplib.SMTPResponseException as exc:  # MAIL or DATA refused
            reply = Reply(classify(exc.code), exc.code, exc.message, label)
            return tuple(reply for _ in rcpts), exc.code < 400 or exc.code >= 500
        except (aiosmtplib.SMTPException, OSError) as exc:  # connection lost, timeout
            raise _Lost from exc
        ok = Reply(Outcome.DELIVERED, 250, response, label)
        return tuple(
            Reply(classify(refused[r].code), refused[r].code, refused[r].message, label)
            if r in refused
            else ok
            for r in rcpts
        ), True

    async def close(self) -> None:
        for pool in self._pools.values():
            for smtp, _ in pool.idle:
                try:
                    await asyncio.wait_for(smtp.quit(), 2)
                except (aiosmtplib.SMTPException, OSError, TimeoutError):
                    smtp.close()
            pool.idle.clear()
