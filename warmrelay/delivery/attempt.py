"""One attempt of one delivery, from the next hop to its dispositions.

The scheduler hands a due delivery to ``Attempts.run``: expiry, the next hop (MX lookup
or route), the provider, the router's plan (which source IP carries which recipients, or
a hold until a window opens); each routed part waits on the ready queue of its (source
IP, next hop) and is sent by ``Attempts.send``: the transaction from that IP, each
reply through the one classifier, the reservation kept or given back, a throttling or
blocking provider suspending the IP, and the dispositions written down. What must wait
goes back to the queue (``Queue.later``, ``hold``, ``due``): the scheduler's job.

An operator's action and a send race: recipients finished by ``queue delete|bounce``
while a send waited are left out of it; those finished while it was under way are only
said and counted when it ends (``Recorder.record_late``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

from warmrelay.config import Config
from warmrelay.delivery.dispatcher import Connected, Dispatcher, Endpoint, Transaction
from warmrelay.delivery.dispositions import Recorder, Verdicts, attempt_outcome, retry_delay
from warmrelay.delivery.nexthop import NextHop, NextHopResolver
from warmrelay.delivery.replies import Outcome, Reply, ReplyRules
from warmrelay.delivery.shaping import Lane, lane
from warmrelay.errors import NextHopError, SpoolError
from warmrelay.feedback.outbound import Marks
from warmrelay.operate.metrics import Metrics
from warmrelay.queue.messages import Delivery, QueuedMessage
from warmrelay.queue.readyqueue import Job
from warmrelay.queue.scheduler import Clock
from warmrelay.queue.spool import SpooledMessage
from warmrelay.reputation.signals import PairCounts, Tallied
from warmrelay.warmup.eligibility import Traffic, header_block
from warmrelay.warmup.providers import ProviderMap, provider_map
from warmrelay.warmup.router import Hold, Route, Router, RouteReason, Smarthost

log = logging.getLogger("warmrelay.delivery")


class Queue(Protocol):
    """What the delivery stage needs of the queue (``queue.scheduler.Scheduler``)."""

    def message(self, queue_id: str) -> QueuedMessage | None: ...

    def data(self, queue_id: str) -> bytes: ...

    def queue_send(self, key: Hashable, send: Job, limit: int | None = None) -> None: ...

    def due(self, delivery: Delivery) -> None: ...

    def later(self, delivery: Delivery, delay_s: float) -> None: ...

    def hold(self, delivery: Delivery, retry_at: datetime, now: datetime) -> None: ...

    def forget(self, queue_id: str) -> None: ...


@dataclass
class _Send:
    """A routed part of a delivery, waiting on its ready queue. From a warming IP it owns
    the reservation of its recipients: ``run`` settles it on every path, ``drop`` too."""

    attempts: Attempts
    delivery: Delivery
    part: Route | Smarthost
    chunk: tuple[int, ...]
    hops: Sequence[NextHop]
    provider: str
    lane: Lane  # its connections' limits (per source IP and provider)

    async def run(self) -> None:
        await self.attempts.send(self)

    async def drop(self) -> None:
        if isinstance(self.part, Route) and self.part.reservation is not None:
            await self.part.reservation.settle()


class Attempts:
    def __init__(
        self,
        queue: Queue,
        dispatcher: Dispatcher,
        recorder: Recorder,
        metrics: Metrics,
        clock: Clock,
    ) -> None:
        self._queue = queue
        self._dispatcher = dispatcher
        self._recorder = recorder
        self._metrics = metrics
        self._clock = clock
        self.providers = ProviderMap()
        self.marks: Marks | None = None  # what each delivery carries for reports (bounces)
        self.counts: PairCounts | None = None  # signals per IP, provider and day

    def configure(self, config: Config, router: Router, resolver: NextHopResolver) -> None:
        """Take a (re)loaded configuration: everything derived from it is rebuilt here."""
        self._config = config
        self._delivery = config.delivery
        self._router = router
        self._resolver = resolver
        self.rules = ReplyRules(config.throttle.patterns, config.blocks.patterns)
        self._dispatcher.configure(config.delivery, self.rules)
        self._header_names = {
            ip.warmup.eligible.header[0]
            for ip in config.ips
            if ip.warmup is not None
            and ip.warmup.eligible is not None
            and ip.warmup.eligible.header is not None
        }
        self._smarthost: tuple[Endpoint, list[NextHop]] | None = None
        if config.smarthost is not None:
            sh = config.smarthost
            host, port = sh.host
            self._smarthost = (
                Endpoint(
                    None,
                    sh.helo or config.smtp.hostname,
                    sh.starttls,
                    sh.username,
                    sh.password(),
                    sh.verify,
                    str(sh.ca_file) if sh.ca_file else None,
                ),
                [NextHop(host, host, port, None, 0)],
            )
        self.providers = provider_map(
            {name: (p.mx, p.domains) for name, p in config.providers.items()}
        )

    # -- resolve, route, queue ------------------------------------------------

    async def run(self, d: Delivery) -> None:
        after = d.after
        state = self._queue.message(d.queue_id)
        if state is None:
            return
        msg = state.message
        indices = tuple(i for i in d.indices if i in state.pending)
        if not indices:
            return
        d = d.again(indices)
        if state.on_hold:  # the operator holds it: wait for `queue release`
            state.parked.append(d)
            return
        now = self._clock()
        if now.timestamp() >= msg.received_at + self._delivery.queue_lifetime_s:
            last = d.last or Reply(451, "4.4.7 queue lifetime exceeded", "")
            expired = Verdicts(failed=[(i, last, "expired") for i in indices])
            await self._record(msg, d, expired, now)
            return
        try:
            hops = await self._resolver.resolve(d.domain)
        except NextHopError as exc:
            if exc.permanent:  # RFC 7505: 556 for a null MX, else 550
                code = 556 if exc.status == "5.1.10" else 550
                reply = Reply(code, f"{exc.status} {d.domain}: {exc}", "")
                verdicts = Verdicts(failed=[(i, reply, "bounced") for i in indices])
            else:
                reply = Reply(451, f"{exc.status} {d.domain}: {exc}", "")
                verdicts = Verdicts(retry=[(i, reply) for i in indices])
            await self._record(msg, d, verdicts, now)
            return
        provider = self.providers.recognise(d.domain, [h.mx for h in hops if h.mx])
        traffic = Traffic(msg.mail_from, d.domain, self._headers(d.queue_id))
        if after is not None:  # released held mail: the older ones reserve first
            await after
            now = self._clock()
        plan = await self._router.route(len(indices), now, provider, traffic)
        pos = 0
        for part in plan.parts:
            chunk = indices[pos : pos + part.count]
            pos += part.count
            if isinstance(part, Hold):
                self._metrics.held.inc(len(chunk))
                log.info(
                    "%s: held %d recipient(s) at %s until %s: %s",
                    d.queue_id,
                    len(chunk),
                    d.domain,
                    part.retry_at.isoformat(),
                    part.why,
                )
                self._queue.hold(d.again(chunk), part.retry_at, now)
                continue
            label = provider if provider in self.providers.names else "other"
            if isinstance(part, Smarthost):
                assert self._smarthost is not None
                shaped = lane(self._config, None, "other", (), warming=False)
            else:
                hop_key = tuple((h.address, h.port) for h in hops)
                warming = part.reason is RouteReason.WARMUP
                shaped = lane(self._config, part.source, label, hop_key, warming)
            send = _Send(self, d, part, chunk, hops, provider, shaped)
            self._queue.queue_send(shaped.key, send, shaped.max_connections)

    def _headers(self, queue_id: str) -> dict[str, str]:
        """The headers eligibility rules look at (none are parsed if no rule needs them)."""
        if not self._header_names:
            return {}
        try:
            return header_block(self._queue.data(queue_id), self._header_names)
        except SpoolError:
            return {}

    # -- one send: dispatch, classify, count, record ----------------------------

    async def send(self, s: _Send) -> None:
        route = s.part if isinstance(s.part, Route) else None
        reservation = route.reservation if route is not None else None
        async with contextlib.AsyncExitStack() as stack:
            if reservation is not None:
                await stack.enter_async_context(reservation)  # settled however this ends
            await self._send_owned(s, route)

    async def _send_owned(self, s: _Send, route: Route | None) -> None:
        d = s.delivery
        state = self._queue.message(d.queue_id)
        if state is None:
            return
        msg = state.message
        # what the operator finished (delete, bounce) while it waited is not sent; its
        # share of the reservation goes back
        chunk = tuple(i for i in s.chunk if i in state.pending)
        if not chunk:
            return
        if state.on_hold:  # held while it waited for a connection: its reservation goes back
            state.parked.append(d.again(chunk))
            return
        if route is not None:
            ip, endpoint, hops = route.address, self._dispatcher.endpoint(route.source), s.hops
        else:
            assert self._smarthost is not None
            ip, (endpoint, hops) = "smarthost", self._smarthost
        try:
            data = self._queue.data(d.queue_id)
        except SpoolError as exc:
            log.error("%s: cannot read the spooled message: %s", d.queue_id, exc)
            self._queue.later(d.again(chunk), self._delivery.retry_first_s)
            return
        label = s.provider if s.provider in self.providers.names else "other"
        if self.marks is not None:  # bounces: a return path per recipient, Feedback-ID
            txs = self.marks.transactions(msg, chunk, ip, label, data)
        else:
            txs = [Transaction(msg.mail_from, [msg.rcpt_tos[i] for i in chunk], data)]
        started = asyncio.get_running_loop().time()
        sent = 0  # recipients accepted when a message went out (maybe handed over)

        def on_sent(n: int) -> None:
            nonlocal sent
            sent += n

        try:
            result = await self._dispatcher.send_all(endpoint, hops, txs, s.lane, on_sent)
        except asyncio.CancelledError:  # cut short (shutdown, operator): the operator wins, but
            if route is not None and route.reservation is not None:  # what may have gone out
                route.reservation.keep(sent)  # stays counted: unknown is not "not sent"
            raise
        now = self._clock()
        if result.connected is Connected.BIND_FAILED:
            until = datetime.fromtimestamp(now.timestamp() + self._delivery.ip_down_s, UTC)
            self._router.mark_down(ip, until)
            self._metrics.ip_up.labels(ip).set(0)
            log.error(
                "%s: cannot bind source address %s (not on this host?): marked down until %s; "
                "%d recipient(s) rerouted",
                d.queue_id,
                ip,
                until.isoformat(),
                len(chunk),
            )
            self._queue.due(Delivery(d.queue_id, d.domain, chunk, d.attempts))
            return
        self._metrics.count_routed(ip, s.part, len(chunk), now, self._config.zone)
        warming = route is not None and route.reason is RouteReason.WARMUP
        v, kept, throttled, blocked = self._classify(chunk, result.replies, warming)
        if self.counts is not None:  # signals per (IP, provider, day): rates, the controller
            self._count(ip, label, v, throttled, blocked, now)
        connected = result.connected is Connected.YES
        self._metrics.attempt_seconds.labels(
            attempt_outcome(connected, v, len(throttled), len(blocked))
        ).observe(asyncio.get_running_loop().time() - started)
        if route is not None and route.reservation is not None:
            route.reservation.keep(kept)
            # settled before anything is recorded (a DSN, a reroute): the counts are right by
            # the time the next attempt routes; `async with` in send stays the safety net
            await route.reservation.settle()
        if throttled and route is not None:
            await self._suspend(d.queue_id, route, s.provider, throttled, now, blocked=False)
            v.reroute += throttled
        if blocked:
            self._metrics.blocked.labels(ip, s.provider).inc(len(blocked))
            if warming and route is not None:
                await self._suspend(d.queue_id, route, s.provider, blocked, now, blocked=True)
                v.reroute += blocked
            else:  # a pool IP or the smarthost: not the recipient's fault, never a bounce
                log.error(
                    "%s: %s refuses mail from %s as a matter of reputation (%s); "
                    "%d recipient(s) retried later",
                    d.queue_id,
                    s.provider,
                    ip,
                    blocked[0][1].line[:200],
                    len(blocked),
                )
                v.retry += blocked
        await self._record(msg, d, v, now, ip=ip, reason=s.part.log_reason, provider=s.provider)

    def _count(
        self,
        ip: str,
        provider: str,
        v: Verdicts,
        throttled: Sequence[tuple[int, Reply]],
        blocked: Sequence[tuple[int, Reply]],
        now: datetime,
    ) -> None:
        assert self.counts is not None
        note = self.counts.note
        hard = sum(1 for _, r, _ in v.failed if r.code >= 500)
        deferred = len(v.retry) + len(v.reroute) - len(throttled) - len(blocked)
        tried = len(v.delivered) + len(v.failed) + len(v.retry) + len(v.reroute)
        counted: tuple[tuple[Tallied, int], ...] = (
            ("tried", tried),
            ("handed", len(v.delivered)),
            ("deferred", max(0, deferred)),
            ("throttled", len(throttled)),
            ("blocked", len(blocked)),
            ("rcpt_hard", hard),
        )
        for what, n in counted:
            note(ip, provider, what, n, now)

    def _classify(
        self, chunk: Sequence[int], replies: Sequence[Reply], warming: bool
    ) -> tuple[Verdicts, int, list[tuple[int, Reply]], list[tuple[int, Reply]]]:
        """Each recipient's reply through the one classifier: the verdicts, how many count
        against the cap (accepted at RCPT and handed over, maybe handed over, or refused for
        good), and the recipients whose provider throttled or blocked the IP."""
        v = Verdicts()
        kept = 0
        throttled: list[tuple[int, Reply]] = []
        blocked: list[tuple[int, Reply]] = []
        for i, reply in zip(chunk, replies, strict=True):
            outcome = self.rules.classify(reply)
            if outcome is Outcome.DELIVERED:
                v.delivered.append((i, reply))
            elif outcome is Outcome.BOUNCED:
                v.failed.append((i, reply, "bounced"))
            elif outcome is Outcome.THROTTLED and warming:
                throttled.append((i, reply))
            elif outcome is Outcome.BLOCKED:
                blocked.append((i, reply))
            else:
                v.retry.append((i, reply))
            if reply.accepted and (
                outcome in (Outcome.DELIVERED, Outcome.BOUNCED) or reply.maybe_delivered
            ):
                kept += 1
        return v, kept, throttled, blocked

    async def _suspend(
        self,
        queue_id: str,
        route: Route,
        provider: str,
        recipients: Sequence[tuple[int, Reply]],
        now: datetime,
        *,
        blocked: bool,
    ) -> None:
        """A provider throttles or blocks a warming IP: suspend the IP for that provider."""
        text = recipients[0][1].line[:200]
        cooldown = (
            (self._config.blocks.cooldown_s, self._config.blocks.cooldown_max_s)
            if blocked
            else None
        )
        s = await self._router.throttled(
            route.source, provider, len(recipients), now, text, cooldown=cooldown
        )
        if not blocked:
            self._metrics.throttled.labels(route.address, provider).inc(len(recipients))
        (log.error if blocked else log.warning)(
            "%s: %s %s %s (%s): suspended for %s until %s (cooldown %.0fs); "
            "%d recipient(s) retried now from the pool",
            queue_id,
            provider,
            "BLOCKS" if blocked else "throttles",
            route.address,
            text,
            provider,
            s.until.isoformat(),
            s.cooldown_s,
            len(recipients),
        )

    # -- dispositions ---------------------------------------------------------

    async def _record(
        self,
        msg: SpooledMessage,
        d: Delivery,
        v: Verdicts,
        now: datetime,
        *,
        ip: str = "none",
        reason: str = "",
        provider: str = "",
    ) -> None:
        """Write down an attempt's verdicts and queue what is retried. Recipients that the
        operator finished while the attempt was under way are only said and counted: the
        operator's word stands."""
        state = self._queue.message(msg.queue_id)
        v, late = _split_late(v, state.pending if state is not None else set())
        if late is not None:
            self._recorder.record_late(msg, late, ip=ip, reason=reason, now=now)
        if state is None:
            return
        state.remember(_history_rows(v), ip, now.timestamp())
        attempts = d.attempts + 1  # of the recipients retried after a backoff, if any
        expires_in = msg.received_at + self._delivery.queue_lifetime_s - now.timestamp()
        delay = retry_delay(
            attempts, self._delivery.retry_first_s, self._delivery.retry_max_s, expires_in
        )
        finished = await self._recorder.record(
            msg,
            state.pending,
            v,
            ip=ip,
            reason=reason,
            now=now,
            provider=provider,
            retry_in_s=delay,
            attempt=attempts,
            tries=state.tries,
        )
        if v.reroute:  # no backoff: routed afresh now, the router avoids what failed
            again = tuple(i for i, _ in v.reroute)
            self._queue.due(Delivery(d.queue_id, d.domain, again, d.attempts, v.reroute[-1][1]))
        if v.retry:
            state.attempts = max(state.attempts, attempts)
            self._recorder.attempted(d.queue_id, state.attempts)
            retry = Delivery(
                d.queue_id, d.domain, tuple(i for i, _ in v.retry), attempts, v.retry[-1][1]
            )
            self._queue.later(retry, delay)
        if finished:
            self._queue.forget(d.queue_id)


def _history_rows(v: Verdicts) -> list[tuple[int, str, Reply]]:
    rows: list[tuple[int, str, Reply]] = [(i, "delivered", r) for i, r in v.delivered]
    rows += [(i, disposition, r) for i, r, disposition in v.failed]
    rows += [(i, "deferred", r) for i, r in (*v.retry, *v.reroute)]
    return rows


def _split_late(v: Verdicts, pending: set[int]) -> tuple[Verdicts, Verdicts | None]:
    """``v`` split into the recipients still pending and those finished meanwhile by the
    operator (None when there are none)."""
    every = [i for i, *_ in (*v.delivered, *v.failed, *v.retry, *v.reroute)]
    if all(i in pending for i in every):
        return v, None

    def split(rows: list[Any]) -> tuple[list[Any], list[Any]]:
        return [r for r in rows if r[0] in pending], [r for r in rows if r[0] not in pending]

    d, d_late = split(v.delivered)
    f, f_late = split(v.failed)
    r, r_late = split(v.retry)
    x, x_late = split(v.reroute)
    return Verdicts(d, f, r, x), Verdicts(d_late, f_late, r_late, x_late)
