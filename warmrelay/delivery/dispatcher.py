"""Dispatcher: one SMTP transaction bound to the chosen source IP, with connection reuse.

Each transaction leaves from ``source_address=(ip, 0)`` greeting with that
IP's helo name; idle connections are kept per (source IP, next hop) for reuse
and closed by a reaper when unused. A bind failure (the address is not on
this host) is reported as such, never retried from another address.

The transaction runs command by command (not aiosmtplib's ``sendmail``), or with
PIPELINING (RFC 2920, ``pipeline``: MAIL, every RCPT and DATA in one write, the replies
read in order) when the receiver offers it, so that every recipient gets the reply that
really decided it, wherever it came:
a ``421`` at the second RCPT (after which aiosmtplib drops the connection)
gives that recipient and the ones after it the 421, not a generic "not
connected". Replies are returned raw; ``replies.ReplyRules`` classifies them.
Connection limits per (source IP, next hop) are the ready queues' job.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import errno
import logging
import os
import ssl
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from functools import partial

import aiosmtplib

from warmrelay.config import DeliveryConfig, IPConfig
from warmrelay.delivery.nexthop import NextHop
from warmrelay.delivery.pipeline import START_INPUT, Pipeline
from warmrelay.delivery.replies import Outcome, Reply, ReplyRules, Stage
from warmrelay.delivery.shaping import Lane

log = logging.getLogger("warmrelay.dispatcher")

REAP_EVERY_S = 5.0


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
    YES = "yes"  # a receiver answered a transaction (replies say what became of each)
    NO = "no"  # no next hop took a transaction
    BIND_FAILED = "bind_failed"  # the source address is not usable on this host


@dataclass(frozen=True)
class Transaction:
    """One envelope and its bytes. Several share a connection when each recipient needs a
    return path of its own (VERP: ``bounces``)."""

    mail_from: str
    rcpts: Sequence[str]
    data: bytes


@dataclass(frozen=True)
class DispatchResult:
    connected: Connected
    replies: tuple[Reply, ...]  # one per recipient, in order


def _is_bind_error(exc: BaseException) -> bool:
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, OSError) and cause.errno in (errno.EADDRNOTAVAIL, errno.EINVAL):
            return True
        cause = cause.__cause__ or cause.__context__
    return False


class _Stale(Exception):
    """A reused connection turned out dead before anything was sent: retry on a fresh one."""


class _Refused(Exception):
    """A next hop refused us before the transaction (greeting, EHLO, STARTTLS, AUTH)."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(reply.line)
        self.reply = reply


@dataclass
class _Conn:
    """An open connection of a lane: how many messages it carried, since when it is idle."""

    smtp: aiosmtplib.SMTP
    lane: Lane
    messages: int = 0
    since: float = 0.0  # idle since (monotonic), while it waits for reuse


class Dispatcher:
    def __init__(self, config: DeliveryConfig, rules: ReplyRules | None = None) -> None:
        self._config = config
        self._rules = rules or ReplyRules()
        # idle connections per (lane, next hop address, port), newest last
        self._idle: dict[tuple[Hashable, str, int], list[_Conn]] = {}
        self._open: dict[Hashable, int] = {}  # open connections per lane: active and idle
        self._lanes: dict[Hashable, Lane] = {}  # the latest limits of each lane seen
        self._closing: dict[Hashable, set[asyncio.Task[None]]] = {}  # QUITs under way
        self._reaper: asyncio.Task[None] | None = None
        # connections opened, closed, idle or busy: the relay's gauges (workers are not
        # scraped, so they are pushed)
        self.on_change: Callable[[], None] = lambda: None
        self.closing = False  # set at shutdown: start no new transaction

    def configure(self, config: DeliveryConfig, rules: ReplyRules | None = None) -> None:
        """A reloaded configuration: timeouts, TLS policy and reply rules apply to new
        connections."""
        self._config = config
        if rules is not None:
            self._rules = rules

    def endpoint(self, source: IPConfig) -> Endpoint:
        """Deliver from a source IP of ours, greeting with its helo."""
        return Endpoint(str(source.address), source.helo, self._config.starttls)

    @property
    def idle_connections(self) -> int:
        return sum(len(idle) for idle in self._idle.values())

    def connections(self) -> dict[tuple[str, str], dict[str, int]]:
        """Open connections per (source IP, provider): open, idle, and the limits (a
        provider no rule recognises adds up its next hops under "other")."""
        out: dict[tuple[str, str], dict[str, int]] = {}
        for key, n in self._open.items():
            lane = self._lanes[key]
            entry = out.setdefault(
                (lane.ip, lane.provider),
                {
                    "open": 0,
                    "idle": 0,
                    "max_connections": lane.max_connections,
                    "max_messages_per_connection": lane.max_messages,
                },
            )
            entry["open"] += n
        for (key, _, _), idle in self._idle.items():
            lane = self._lanes[key]
            if (lane.ip, lane.provider) in out:
                out[(lane.ip, lane.provider)]["idle"] += len(idle)
        return out

    async def send(
        self,
        endpoint: Endpoint,
        hops: Sequence[NextHop],
        mail_from: str,
        rcpts: Sequence[str],
        data: bytes,
    ) -> DispatchResult:
        """One transaction (see ``send_all``)."""
        return await self.send_all(endpoint, hops, [Transaction(mail_from, rcpts, data)])

    async def send_all(
        self,
        endpoint: Endpoint,
        hops: Sequence[NextHop],
        txs: Sequence[Transaction],
        lane: Lane | None = None,
        on_sent: Callable[[int], None] = lambda n: None,
    ) -> DispatchResult:
        """Try the next hops in order until one answers; there, run the transactions one
        after another on one connection. A hop that refuses us before the transaction is
        skipped, unless it blames our IP (throttle or block): the next MX of the same
        provider would only say the same to the same IP. Replies: one per recipient, in
        the order of ``txs``. ``lane``: the connection limits (per source IP and provider;
        default: per next hop, the ``delivery`` values). ``on_sent(n)``: a message goes out
        for n recipients the receiver accepted (before its reply: the moment it may be
        handed over, which a caller cancelled afterwards still has to count)."""
        lane = lane or self._default_lane(endpoint, hops)
        self._lanes[lane.key] = lane
        rcpts = [r for tx in txs for r in tx.rcpts]
        last = Reply(451, "4.4.1 No next hop answered", "", Stage.CONNECT)
        if self._reaper is None or self._reaper.done():
            self._reaper = asyncio.get_running_loop().create_task(self._reap())
        for hop in hops:
            if self.closing:
                last = Reply(421, "4.3.2 relay shutting down", "")
                break
            key = (lane.key, hop.address, hop.port)
            label = f"{hop.host}[{hop.address}]:{hop.port}"
            conn = self._reuse(key)
            if conn is not None:
                try:
                    replies = await self._transactions(conn.smtp, txs, label, True, on_sent)
                    return self._done(key, conn, replies)
                except _Stale:  # the receiver closed an idle connection: go fresh
                    self._close(conn)
            await self._make_room(lane)
            try:
                smtp = await self._connect(endpoint, hop, label)
            except _Refused as exc:
                last = exc.reply
                log.info("%s from %s: %s", label, endpoint.source or "default", last.line)
                if self._rules.classify(last) in (Outcome.THROTTLED, Outcome.BLOCKED):
                    break
                continue
            except (aiosmtplib.SMTPException, OSError) as exc:  # incl. ssl.SSLError
                if endpoint.source is not None and _is_bind_error(exc):
                    cannot = Reply(451, f"4.4.0 cannot bind {endpoint.source}", "")
                    return DispatchResult(Connected.BIND_FAILED, tuple(cannot for _ in rcpts))
                text = f"4.4.1 {label}: {_describe(exc)}"
                last = Reply(451, text, label, Stage.CONNECT)
                log.info("connect %s from %s failed: %s", label, endpoint.source or "default", exc)
                continue
            conn = _Conn(smtp, lane)
            self._open[lane.key] = self._open.get(lane.key, 0) + 1
            self.on_change()
            try:
                replies = await self._transactions(smtp, txs, label, False, on_sent)
            except _Stale as exc:  # fresh connection lost before anything was accepted
                self._close(conn)
                lost = Reply(451, f"4.4.2 {label}: {exc.__cause__ or exc}", label, Stage.MAIL)
                replies = tuple(lost for _ in rcpts)
            return self._done(key, conn, replies)
        return DispatchResult(Connected.NO, tuple(last for _ in rcpts))

    def _done(
        self, key: tuple[Hashable, str, int], conn: _Conn, replies: tuple[Reply, ...]
    ) -> DispatchResult:
        try:
            return self._put_back(key, conn, replies)
        finally:
            self.on_change()

    def _put_back(
        self, key: tuple[Hashable, str, int], conn: _Conn, replies: tuple[Reply, ...]
    ) -> DispatchResult:
        """The connection goes back to its idle list, unless it is gone, the relay stops,
        or it carried its lane's ``max_messages``: then QUIT, and the next send opens a
        fresh one."""
        conn.messages += 1
        if conn.smtp.is_connected and not self.closing:
            if conn.messages < conn.lane.max_messages:
                conn.since = time.monotonic()
                self._idle.setdefault(key, []).append(conn)
                return DispatchResult(Connected.YES, replies)
            self._quit_later(conn)
            return DispatchResult(Connected.YES, replies)
        self._close(conn)
        return DispatchResult(Connected.YES, replies)

    def _reuse(self, key: tuple[Hashable, str, int]) -> _Conn | None:
        idle = self._idle.get(key)
        now = time.monotonic()
        while idle:
            conn = idle.pop()
            if conn.smtp.is_connected and now - conn.since < conn.lane.idle_s:
                return conn
            self._close(conn)
        return None

    async def _make_room(self, lane: Lane) -> None:
        """Before a new connection: while the lane is at ``max_connections``, its idle ones
        (to another next hop) are closed and the ones saying QUIT are waited for, so the
        receiver never sees more connections from the IP than the limit."""
        while self._open.get(lane.key, 0) >= lane.max_connections:
            found = [(k, idle) for k, idle in self._idle.items() if k[0] == lane.key and idle]
            if found:
                _, idle = min(found, key=lambda kv: kv[1][0].since)
                self._quit_later(idle.pop(0))
            closing = self._closing.get(lane.key)
            if not closing:
                return  # all of them busy: the ready queue never lets that happen
            await asyncio.wait(closing, return_when=asyncio.FIRST_COMPLETED)

    def _close(self, conn: _Conn) -> None:
        conn.smtp.close()
        self._forget(conn)

    def _forget(self, conn: _Conn) -> None:
        n = self._open.get(conn.lane.key, 0) - 1
        if n > 0:
            self._open[conn.lane.key] = n
        else:
            self._open.pop(conn.lane.key, None)

    def _quit_later(self, conn: _Conn) -> None:
        """Close politely (QUIT) without making the send wait; it counts as open until the
        receiver answered (or the wait for it ended)."""
        closing = self._closing.setdefault(conn.lane.key, set())

        async def quit_it() -> None:
            try:
                await _quit(conn.smtp)
            finally:
                self._forget(conn)
                self.on_change()

        task = asyncio.get_running_loop().create_task(quit_it())
        closing.add(task)

        def done(t: asyncio.Task[None]) -> None:
            closing.discard(t)
            if not closing and self._closing.get(conn.lane.key) is closing:
                del self._closing[conn.lane.key]

        task.add_done_callback(done)

    def _default_lane(self, endpoint: Endpoint, hops: Sequence[NextHop]) -> Lane:
        c = self._config
        hop_key = tuple((h.address, h.port) for h in hops)
        source = endpoint.source or "*"
        return Lane(
            (source, hop_key),
            source,
            "other",
            c.connections_per_destination,
            c.max_messages_per_connection,
            c.idle_connection_s,
        )

    async def _reap(self) -> None:
        """Close connections idle for longer than their lane's ``idle_s`` (politely, with
        QUIT) and forget empty entries, so neither sockets nor the map grow without bound."""
        while True:
            await asyncio.sleep(min(REAP_EVERY_S, max(0.5, self._config.idle_connection_s)))
            now = time.monotonic()
            stale: list[_Conn] = []
            for key in list(self._idle):
                keep = []
                for conn in self._idle[key]:
                    if conn.smtp.is_connected and now - conn.since < conn.lane.idle_s:
                        keep.append(conn)
                    else:
                        stale.append(conn)
                self._idle[key] = keep
                if not keep:
                    del self._idle[key]
            for conn in stale:
                self._quit_later(conn)

    async def _connect(self, endpoint: Endpoint, hop: NextHop, label: str) -> aiosmtplib.SMTP:
        smtp = aiosmtplib.SMTP(
            hostname=hop.address,
            port=hop.port,
            local_hostname=endpoint.helo,
            source_address=(endpoint.source, 0) if endpoint.source else None,
            timeout=self._config.timeout_s,
            use_tls=endpoint.tls == "implicit",
            start_tls=False,  # done below, so a refusal is told apart from a failure
            # MX certificates rarely match the MX name (RFC 7672); a smarthost's must.
            validate_certs=endpoint.verify,
            cert_bundle=endpoint.ca_file,
        )
        try:
            await smtp.connect(timeout=self._config.connect_timeout_s)
            await _greet(smtp)
            wants_tls = endpoint.tls == "required" or (
                endpoint.tls == "opportunistic" and smtp.supports_extension("starttls")
            )
            if wants_tls and smtp.get_transport_info("sslcontext") is None:
                await smtp.starttls()
                await _greet(smtp)  # RFC 3207: ask again what the server offers
            if endpoint.username is not None:
                if endpoint.password is None:
                    raise _Refused(
                        Reply(
                            454,
                            "4.7.0 no password: the smarthost password variable is not set",
                            label,
                            Stage.CONNECT,
                        )
                    )
                await smtp.login(endpoint.username, endpoint.password)
        except aiosmtplib.SMTPAuthenticationError as exc:
            smtp.close()
            text = f"4.7.0 {label} refused our credentials: {exc.code} {exc.message}"
            raise _Refused(Reply(454, text, label, Stage.CONNECT)) from exc
        except aiosmtplib.SMTPResponseException as exc:  # 421/554 greeting, EHLO, STARTTLS
            smtp.close()
            raise _Refused(Reply(exc.code, exc.message, label, Stage.CONNECT)) from exc
        except BaseException:
            smtp.close()
            raise
        return smtp

    async def _transactions(
        self,
        smtp: aiosmtplib.SMTP,
        txs: Sequence[Transaction],
        label: str,
        reused: bool,
        on_sent: Callable[[int], None],
    ) -> tuple[Reply, ...]:
        """Each transaction in turn; ``_Stale`` only from the first on a reused connection.
        Once the receiver hung up, the ones left get a deferral (nothing of them sent)."""
        replies: list[Reply] = []
        for n, tx in enumerate(txs):
            if n and not smtp.is_connected:
                # a 421 that closed the connection speaks for the rest too (as within one
                # transaction: a throttle stays a throttle); else they were never tried
                last = replies[-1] if replies else None
                gone = (
                    Reply(last.code, last.text, label, last.stage)
                    if last is not None and last.code == 421
                    else Reply(451, f"4.4.2 {label}: connection closed before MAIL", label)
                )
                replies += [gone] * len(tx.rcpts)
                continue
            replies += await self._transaction(
                smtp, tx.mail_from, tx.rcpts, tx.data, label, reused and n == 0, on_sent
            )
        return tuple(replies)

    async def _transaction(
        self,
        smtp: aiosmtplib.SMTP,
        mail_from: str,
        rcpts: Sequence[str],
        data: bytes,
        label: str,
        reused: bool,
        on_sent: Callable[[int], None],
    ) -> tuple[Reply, ...]:
        """MAIL, each RCPT, DATA: a reply per recipient; pipelined (RFC 2920, one round
        trip) when the receiver offers it. Raises ``_Stale`` only when nothing reached the
        receiver yet (MAIL failed on a dead connection)."""
        tls = smtp.get_transport_info("sslcontext") is not None
        utf8 = not (mail_from + "".join(rcpts)).isascii()
        if utf8 and not smtp.supports_extension("smtputf8"):
            # RFC 6531 §3.2: no downgrade exists for non-ASCII addresses
            no = Reply(553, f"5.6.7 {label} does not support SMTPUTF8", label, Stage.MAIL)
            await _reset(smtp)
            return tuple(no for _ in rcpts)
        options = ["SMTPUTF8"] if utf8 else []
        if not data.isascii() and smtp.supports_extension("8bitmime"):
            options.append("BODY=8BITMIME")
        if smtp.supports_extension("size"):
            options.append(f"SIZE={len(data)}")
        encoding = "utf-8" if utf8 else "ascii"
        if self._config.pipelining and smtp.supports_extension("pipelining"):
            # RFC 2920: MAIL, each RCPT and DATA in one write, the replies read in order;
            # each becomes the Reply the lockstep code below would make of it.
            reset = True  # RSET after, unless a final dot ended the transaction
            answers: list[Reply] = []
            with Pipeline(smtp, self._config.timeout_s) as pipe:
                try:
                    pipe.send(mail_from, rcpts, options, encoding)
                    sender = await pipe.reply()
                except (aiosmtplib.SMTPException, OSError) as exc:
                    if reused:
                        raise _Stale from exc
                    text = f"4.4.2 {label}: lost at MAIL: {_describe(exc)}"
                    return tuple(Reply(451, text, label, Stage.MAIL) for _ in rcpts)
                if sender.code != 250:
                    if reused and sender.code == 421:
                        raise _Stale(sender.message)
                    refused = Reply(sender.code, sender.message, label, Stage.MAIL, tls=tls)
                    answers = [refused] * len(rcpts)
                    reset = not await pipe.finish()  # the RCPT and DATA replies are moot
                else:
                    ended: Reply | None = None  # the receiver went before DATA
                    for n in range(len(rcpts)):
                        try:
                            ok = await pipe.reply()
                        except (aiosmtplib.SMTPException, OSError) as exc:
                            text = f"4.4.2 {label}: lost at RCPT: {_describe(exc)}"
                            ended = Reply(451, text, label)
                            answers += [ended] * (len(rcpts) - n)
                            break
                        taken = ok.code in (250, 251)
                        answers.append(Reply(ok.code, ok.message, label, Stage.RCPT, taken, tls))
                        if ok.code == 421:  # the receiver closes; the rest get the same
                            ended = answers[-1]
                            answers += [ended] * (len(rcpts) - n - 1)
                            break
                    accepted = [i for i, r in enumerate(answers) if r.accepted]
                    if ended is not None:  # nothing handed over: the accepted get its reply
                        answers = [ended if r.accepted else r for r in answers]
                        reset = False
                    elif not accepted:  # RFC 2920 §3.1: DATA may still get 354; a lone dot
                        reset = not await pipe.finish()
                    else:
                        sent = partial(on_sent, len(accepted))
                        final, reset = await _hand_over(pipe, data, label, tls, sent)
                        for i in accepted:
                            answers[i] = final
            if reset:
                await _reset(smtp)
            return tuple(answers)
        try:
            await smtp.mail(mail_from, options=options, encoding=encoding)
        except aiosmtplib.SMTPResponseException as exc:
            if reused and exc.code == 421:  # most often: the idle connection timed out there
                raise _Stale from exc
            refused = Reply(exc.code, exc.message, label, Stage.MAIL, tls=tls)
            await _reset(smtp)
            return tuple(refused for _ in rcpts)
        except (aiosmtplib.SMTPException, OSError) as exc:
            if reused:
                raise _Stale from exc
            lost = Reply(451, f"4.4.2 {label}: lost at MAIL: {_describe(exc)}", label, Stage.MAIL)
            return tuple(lost for _ in rcpts)
        replies: list[Reply] = []
        ended = None  # the receiver went before DATA (as in the pipelined branch)
        for rcpt in rcpts:
            try:
                ok = await smtp.rcpt(rcpt, encoding=encoding)
                replies.append(Reply(ok.code, ok.message, label, Stage.RCPT, True, tls))
            except aiosmtplib.SMTPResponseException as exc:
                replies.append(Reply(exc.code, exc.message, label, Stage.RCPT, tls=tls))
                if not smtp.is_connected:  # 421: the receiver closes; the rest get the same
                    ended = replies[-1]
                    break
            except (aiosmtplib.SMTPException, OSError) as exc:
                ended = Reply(451, f"4.4.2 {label}: lost at RCPT: {_describe(exc)}", label)
                break
        if ended is not None:  # nothing handed over: the accepted and the rest get its reply
            replies += [ended] * (len(rcpts) - len(replies))
            return tuple(ended if r.accepted else r for r in replies)
        accepted = [i for i, r in enumerate(replies) if r.accepted]
        if not accepted:
            await _reset(smtp)
            return tuple(replies)
        try:
            with Pipeline(smtp, self._config.timeout_s) as pipe:
                pipe.data()
                sent = partial(on_sent, len(accepted))
                final, reset = await _hand_over(pipe, data, label, tls, sent)
        except (aiosmtplib.SMTPException, OSError) as exc:  # DATA could not even be written
            final, reset = _lost_at_data(label, tls, exc), False
        if reset:
            await _reset(smtp)
        for i in accepted:
            replies[i] = final
        return tuple(replies)

    async def close(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
        idle = [conn for entry in self._idle.values() for conn in entry]
        self._idle.clear()
        for conn in idle:
            self._forget(conn)
        closing = [t for tasks in self._closing.values() for t in tasks]
        await asyncio.gather(*(_quit(conn.smtp) for conn in idle), *closing)


async def _greet(smtp: aiosmtplib.SMTP) -> None:
    """EHLO, or HELO for a receiver that does not speak ESMTP."""
    try:
        await smtp.ehlo()
    except aiosmtplib.SMTPHeloError:
        if not smtp.is_connected:
            raise
        await smtp.helo()


def _describe(exc: BaseException) -> str:
    """What went wrong, in words that do not repeat the address (the reply names it once)."""
    if isinstance(exc, ssl.SSLError):
        return f"TLS failed: {exc.reason or exc}"
    if isinstance(exc, TimeoutError | aiosmtplib.SMTPTimeoutError):
        return "timed out"
    cause = exc.__cause__ if isinstance(exc, aiosmtplib.SMTPConnectError) else exc
    if isinstance(cause, OSError) and cause.errno is not None:
        return os.strerror(cause.errno).lower()  # "connection refused", "no route to host"
    return str(exc) or type(exc).__name__


async def _reset(smtp: aiosmtplib.SMTP) -> None:
    """RSET after a refused transaction, so the connection can carry the next one."""
    if smtp.is_connected:
        try:
            await smtp.rset()
        except (aiosmtplib.SMTPException, OSError):
            smtp.close()


async def _quit(smtp: aiosmtplib.SMTP) -> None:
    try:
        await asyncio.wait_for(smtp.quit(), 2)
    except (aiosmtplib.SMTPException, OSError, TimeoutError):
        smtp.close()


async def _hand_over(
    pipe: Pipeline, data: bytes, label: str, tls: bool, sent: Callable[[], None]
) -> tuple[Reply, bool]:
    """DATA's reply (owed on ``pipe``), then the message if it was 354: the reply for every
    recipient accepted at RCPT, and whether an RSET must follow. Lost before the message
    went out: certainly not delivered. Lost after it: maybe delivered, so it counts against
    the cap and waits for its retry (resending at once could deliver it twice)."""
    try:
        go = await pipe.reply()
    except (aiosmtplib.SMTPException, OSError) as exc:
        return _lost_at_data(label, tls, exc), False
    if go.code != START_INPUT:
        return Reply(go.code, go.message, label, Stage.DATA, True, tls), True
    sent()
    try:
        done = await pipe.body(data)
    except (aiosmtplib.SMTPException, OSError) as exc:
        text = f"4.4.2 {label}: lost during DATA, delivery uncertain: {_describe(exc)}"
        return Reply(451, text, label, Stage.DATA, True, tls, maybe_delivered=True), False
    return Reply(done.code, done.message, label, Stage.DATA, True, tls), False


def _lost_at_data(label: str, tls: bool, exc: BaseException) -> Reply:
    """The connection went before DATA's 354: the message never went out."""
    text = f"4.4.2 {label}: lost at DATA, not delivered: {_describe(exc)}"
    return Reply(451, text, label, Stage.DATA, True, tls)
