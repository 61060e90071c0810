"""Scheduler: from spooled messages to sends, and back to the queue when they must wait.

A spooled message becomes one delivery per recipient domain. Routing
workers take due deliveries, resolve the next hop, ask the router which
source IPs carry which recipients at that moment, and put each part on the
ready queue of its (source IP, next hop) (see ``readyqueue``). A send's
replies are classified in one place (``replies``); then each recipient is
delivered, bounced, retried after a backoff (deferred queue: loop timers
between ``retry_first_s`` and ``retry_max_s``), or routed again at once
(throttled or blocked on a warming IP: the router now avoids it). What is
still undelivered after ``queue_lifetime_s`` expires. Dispositions are
written down by ``dispositions``.

Held mail (``overflow: hold``, a full window) waits in one heap ordered by
the time it may go and then by message age, under one timer: when a window
opens, everything due is released oldest first, and each released delivery
reserves only after the older ones did, so the new window's budget goes to
the mail that waited longest. (A timer per hold would fire in the order of
the delays computed at each hold: the younger ones first, when the wall clock
moved meanwhile.)
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

from warmrelay.config import Config
from warmrelay.delivery.dispatcher import Connected, Dispatcher, Endpoint
from warmrelay.delivery.dispositions import (
    Recorder,
    Verdicts,
    attempt_outcome,
    domain_of,
    retry_delay,
)
from warmrelay.delivery.nexthop import NextHop, NextHopResolver
from warmrelay.delivery.replies import Outcome, Reply, ReplyRules
from warmrelay.errors import NextHopError, SpoolError
from warmrelay.mail.suppression import SuppressionList
from warmrelay.operate.metrics import Metrics
from warmrelay.operate.queueview import (
    ActionResult,
    Attempt,
    MessageView,
    QueueState,
    RecipientView,
)
from warmrelay.queue.readyqueue import ReadyQueues
from warmrelay.queue.spool import Spool, SpooledMessage
from warmrelay.warmup.eligibility import Traffic, header_block
from warmrelay.warmup.providers import provider_map
from warmrelay.warmup.router import Hold, Route, Router, RouteReason, Smarthost

log = logging.getLogger("warmrelay.delivery")

Clock = Callable[[], datetime]

__all__ = ["Clock", "Delivery", "Scheduler", "domain_of", "utc_now"]


def utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass
class Delivery:
    """Some recipients of one message, all at one domain: one unit of work."""

    queue_id: str
    domain: str
    indices: tuple[int, ...]
    attempts: int = 0
    last: Reply | None = None
    # released held mail: route only after ``after`` (the next older one) routed; ``turn``
    # is set once this one did (or gave up)
    after: asyncio.Future[None] | None = field(default=None, repr=False, compare=False)
    turn: asyncio.Future[None] | None = field(default=None, repr=False, compare=False)


@dataclass
class _Message:
    message: SpooledMessage
    pending: set[int]
    attempts: int = 0
    # what the queue tools show and act on
    timers: dict[int, tuple[asyncio.TimerHandle, Delivery, float]] = field(default_factory=dict)
    on_hold: bool = False  # the operator's hold: deliveries park in ``parked`` until release
    parked: list[Delivery] = field(default_factory=list)
    history: dict[int, list[Attempt]] = field(default_factory=dict)  # per recipient, last few
    last_ip: str | None = None
    last_reply: str | None = None


HISTORY_MAX = 10  # attempts kept per recipient for `queue show`


@dataclass(frozen=True)
class Target:
    """What a queue action applies to: some queue ids, the recipients at one domain, or all."""

    queue_ids: tuple[str, ...] = ()
    domain: str | None = None
    everything: bool = False

    def messages(self, queued: Mapping[str, _Message]) -> list[str]:
        if self.everything:
            return list(queued)
        if self.domain is not None:
            d = self.domain.lower()
            return [
                q
                for q, m in queued.items()
                if any(domain_of(m.message.rcpt_tos[i]) == d for i in m.pending)
            ]
        return [q for q in self.queue_ids if q in queued]

    def recipients(self, state: _Message) -> list[int]:
        """The pending recipients it names in one message (a domain: only those there)."""
        if self.domain is None:
            return sorted(state.pending)
        d = self.domain.lower()
        return sorted(i for i in state.pending if domain_of(state.message.rcpt_tos[i]) == d)


@dataclass
class _Send:
    """A routed part of a delivery, waiting on its ready queue. From a warming IP it owns
    the reservation of its recipients: ``run`` settles it on every path, ``drop`` too."""

    scheduler: Scheduler
    delivery: Delivery
    part: Route | Smarthost
    chunk: tuple[int, ...]
    hops: Sequence[NextHop]
    provider: str

    async def run(self) -> None:
        await self.scheduler._send(self)

    async def drop(self) -> None:
        if isinstance(self.part, Route) and self.part.reservation is not None:
            await self.part.reservation.settle()


class Scheduler:
    def __init__(
        self,
        config: Config,
        spool: Spool,
        router: Router,
        resolver: NextHopResolver,
        dispatcher: Dispatcher,
        metrics: Metrics,
        clock: Clock = utc_now,
        suppression: SuppressionList | None = None,
    ) -> None:
        self._spool = spool
        self._dispatcher = dispatcher
        self._metrics = metrics
        self._clock = clock
        self.configure(config, router, resolver)
        self._messages: dict[str, _Message] = {}
        self._cache: dict[str, bytes] = {}  # bytes of fresh messages: no re-read from disk
        self._cache_bytes = 0
        self._due: asyncio.Queue[Delivery] = asyncio.Queue()
        self._queues = ReadyQueues(
            lambda: self._delivery.connections_per_destination,
            config.delivery.concurrency,
            self._check_room,
        )
        self._timers: set[asyncio.TimerHandle] = set()
        # held deliveries: (may go at, received at, tie-break, delivery), one timer for all
        self._held: list[tuple[float, float, int, Delivery]] = []
        self._held_seq = itertools.count()
        self._held_timer: asyncio.TimerHandle | None = None
        self._held_until = 0.0  # the timer releases what may go at or before this time
        self._workers: list[asyncio.Task[None]] = []
        self._stopping = False
        self._room = asyncio.Event()  # set while the backlog is short enough to take more
        self._room.set()
        self._recorder = Recorder(
            spool,
            metrics,
            lambda: self._config.smtp.hostname,
            self.accept,
            self._data,
            suppression,
            lambda: self._providers,
        )

    def configure(self, config: Config, router: Router, resolver: NextHopResolver) -> None:
        """Take a (re)loaded configuration: everything derived from it is rebuilt here.
        Messages, queues and timers are kept; ``delivery.concurrency`` needs a restart."""
        self._config = config
        self._delivery = config.delivery
        self._router = router
        self._resolver = resolver
        self._rules = ReplyRules(config.throttle.patterns, config.blocks.patterns)
        self._dispatcher.configure(config.delivery, self._rules)
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
        self._providers = provider_map(
            {name: (p.mx, p.domains) for name, p in config.providers.items()}
        )
        self._backlog_limit = config.delivery.concurrency

    # -- intake ---------------------------------------------------------------

    CACHE_MAX_BYTES = 64 * 1024 * 1024

    def accept(self, message: SpooledMessage, data: bytes) -> None:
        """A message the listener just spooled; keep its bytes while the cache has room."""
        if self._cache_bytes + len(data) <= self.CACHE_MAX_BYTES:
            self._cache[message.queue_id] = data
            self._cache_bytes += len(data)
        self.submit(message)

    def _data(self, queue_id: str) -> bytes:
        cached = self._cache.get(queue_id)
        return cached if cached is not None else self._spool.read_data(queue_id)

    def _forget(self, queue_id: str) -> None:
        self._spool.remove(queue_id)
        del self._messages[queue_id]
        data = self._cache.pop(queue_id, None)
        if data is not None:
            self._cache_bytes -= len(data)
        self._metrics.spool_messages.set(len(self._messages))

    def submit(
        self,
        message: SpooledMessage,
        done: Mapping[int, str] | None = None,
        attempts: int = 0,
        on_hold: bool = False,
    ) -> None:
        """Queue a spooled message's unfinished recipients, grouped by domain, as due now
        (parked instead while an operator holds it)."""
        pending = {i for i in range(len(message.rcpt_tos)) if not done or i not in done}
        if not pending:
            self._spool.remove(message.queue_id)
            return
        state = _Message(message, pending, attempts, on_hold=on_hold)
        self._messages[message.queue_id] = state
        by_domain: dict[str, list[int]] = {}
        for i in sorted(pending):
            by_domain.setdefault(domain_of(message.rcpt_tos[i]), []).append(i)
        for domain, indices in by_domain.items():
            delivery = Delivery(message.queue_id, domain, tuple(indices), attempts)
            (state.parked.append if on_hold else self._due.put_nowait)(delivery)
        self._metrics.spool_messages.set(len(self._messages))

    def _backlog(self) -> int:
        return self._due.qsize() + self._queues.pressure()

    async def admit(self, max_wait_s: float = 1.0) -> None:
        """Inflow control (as Postfix's in_flow_delay): while more sends wait than the relay
        can start, a new message waits up to ``max_wait_s`` before it is accepted, so intake
        cannot outrun delivery and time from 250 to delivery stays short. Only queues that
        are draining count: a stuck destination does not slow down everyone's intake."""
        if self._backlog() <= self._backlog_limit:
            return
        self._room.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._room.wait(), max_wait_s)

    def _check_room(self) -> None:
        if not self._room.is_set() and self._backlog() <= self._backlog_limit:
            self._room.set()

    @property
    def messages(self) -> int:
        return len(self._messages)

    @property
    def ready(self) -> int:
        return self._due.qsize() + self._queues.queued

    @property
    def deferred(self) -> int:
        return len(self._timers) + len(self._held)

    # -- lifecycle ------------------------------------------------------------

    def start(self) -> None:
        self._workers = [
            asyncio.create_task(self._work(), name=f"routing-{i}")
            for i in range(self._delivery.concurrency)
        ]

    async def stop(self, drain_timeout_s: float) -> None:
        """Take no new work; let sends in progress finish within the timeout. Whatever is
        cut short or never started gives its reservation back and stays spooled."""
        self._stopping = True
        for handle in self._timers:
            handle.cancel()
        self._timers.clear()
        if self._held_timer is not None:
            self._held_timer.cancel()
        self._held.clear()
        for task in self._workers:
            task.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        await self._queues.stop(drain_timeout_s)
        await self._router.ledger.settle_all()

    async def _work(self) -> None:
        while not self._stopping:
            delivery = await self._due.get()
            self._check_room()
            try:
                await self._attempt(delivery)
            except Exception:  # a bug must not kill the worker; the mail stays spooled
                log.exception("%s: delivery to %s failed", delivery.queue_id, delivery.domain)
                self._later(replace(delivery, after=None, turn=None), self._delivery.retry_first_s)
            finally:
                if delivery.turn is not None and not delivery.turn.done():
                    delivery.turn.set_result(None)  # the next younger held one may route

    def _later(self, delivery: Delivery, delay_s: float) -> None:
        if self._stopping:
            return
        loop = asyncio.get_running_loop()
        state = self._messages.get(delivery.queue_id)
        seq = next(self._held_seq)

        def fire() -> None:
            self._timers.discard(handle)
            if state is not None:
                state.timers.pop(seq, None)
            self._due.put_nowait(delivery)

        handle = loop.call_later(max(0.0, delay_s), fire)
        self._timers.add(handle)
        if state is not None:  # the queue tools show when, and flush cancels it
            state.timers[seq] = (handle, delivery, self._clock().timestamp() + max(0.0, delay_s))

    def _hold(self, delivery: Delivery, retry_at: datetime, now: datetime) -> None:
        """Keep a held delivery until ``retry_at``. The one timer fires at the earliest moment
        any hold computed for its time, and then releases everything due by that time."""
        if self._stopping:
            return
        state = self._messages[delivery.queue_id]
        at = retry_at.timestamp()
        entry = (at, state.message.received_at, next(self._held_seq), delivery)
        heapq.heappush(self._held, entry)
        loop = asyncio.get_running_loop()
        when = loop.time() + max(0.0, at - now.timestamp())
        if self._held_timer is None or when < self._held_timer.when():
            if self._held_timer is not None:
                self._held_timer.cancel()
            self._held_until = at
            self._held_timer = loop.call_at(when, self._release_held)

    def _release_held(self) -> None:
        """Due held deliveries go to the routing queue oldest message first, chained so that
        each reserves only after the next older one did."""
        self._held_timer = None
        due: list[tuple[float, float, int, Delivery]] = []
        while self._held and self._held[0][0] <= self._held_until:
            due.append(heapq.heappop(self._held))
        loop = asyncio.get_running_loop()
        after: asyncio.Future[None] | None = None
        for _, _, _, d in sorted(due, key=lambda e: (e[1], e[2])):
            turn: asyncio.Future[None] = loop.create_future()
            self._due.put_nowait(
                Delivery(d.queue_id, d.domain, d.indices, d.attempts, d.last, after, turn)
            )
            after = turn
        if self._held:  # the next time some held mail may go
            at = self._held[0][0]
            self._held_until = at
            delay = max(0.0, at - self._clock().timestamp())
            self._held_timer = loop.call_later(delay, self._release_held)

    # -- one attempt: resolve, route, queue -------------------------------------

    async def _attempt(self, d: Delivery) -> None:
        after = d.after
        state = self._messages.get(d.queue_id)
        if state is None:
            return
        msg = state.message
        indices = tuple(i for i in d.indices if i in state.pending)
        if not indices:
            return
        d = Delivery(d.queue_id, d.domain, indices, d.attempts, d.last)
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
        provider = self._providers.recognise(d.domain, [h.mx for h in hops if h.mx])
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
                held = Delivery(d.queue_id, d.domain, chunk, d.attempts, d.last)
                self._hold(held, part.retry_at, now)
                continue
            if isinstance(part, Smarthost):
                assert self._smarthost is not None
                key: tuple[str, tuple[tuple[str, int], ...]] = ("smarthost", ())
            else:
                key = (part.address, tuple((h.address, h.port) for h in hops))
            self._queues.put(key, _Send(self, d, part, chunk, hops, provider))

    def _headers(self, queue_id: str) -> dict[str, str]:
        """The headers eligibility rules look at (none are parsed if no rule needs them)."""
        if not self._header_names:
            return {}
        try:
            return header_block(self._data(queue_id), self._header_names)
        except SpoolError:
            return {}

    # -- one send: dispatch, classify, count, record ----------------------------

    async def _send(self, s: _Send) -> None:
        route = s.part if isinstance(s.part, Route) else None
        reservation = route.reservation if route is not None else None
        async with contextlib.AsyncExitStack() as stack:
            if reservation is not None:
                await stack.enter_async_context(reservation)  # settled however this ends
            await self._send_owned(s, route)

    async def _send_owned(self, s: _Send, route: Route | None) -> None:
        d, chunk = s.delivery, s.chunk
        state = self._messages.get(d.queue_id)
        if state is None:
            return
        msg = state.message
        # what the operator finished (delete, bounce) while it waited is not sent; its
        # share of the reservation goes back
        chunk = tuple(i for i in chunk if i in state.pending)
        if not chunk:
            return
        if state.on_hold:  # held while it waited for a connection: its reservation goes back
            state.parked.append(Delivery(d.queue_id, d.domain, chunk, d.attempts, d.last))
            return
        if route is not None:
            ip, endpoint, hops = route.address, self._dispatcher.endpoint(route.source), s.hops
        else:
            assert self._smarthost is not None
            ip, (endpoint, hops) = "smarthost", self._smarthost
        try:
            data = self._data(d.queue_id)
        except SpoolError as exc:
            log.error("%s: cannot read the spooled message: %s", d.queue_id, exc)
            self._later(
                Delivery(d.queue_id, d.domain, chunk, d.attempts, d.last),
                self._delivery.retry_first_s,
            )
            return
        rcpts = [msg.rcpt_tos[i] for i in chunk]
        started = asyncio.get_running_loop().time()
        result = await self._dispatcher.send(endpoint, hops, msg.mail_from, rcpts, data)
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
            self._due.put_nowait(Delivery(d.queue_id, d.domain, chunk, d.attempts))
            return
        self._metrics.count_routed(ip, s.part, len(chunk), now, self._config.zone)
        warming = route is not None and route.reason is RouteReason.WARMUP
        v = Verdicts()
        kept = 0
        throttled: list[tuple[int, Reply]] = []
        blocked: list[tuple[int, Reply]] = []
        for i, reply in zip(chunk, result.replies, strict=True):
            outcome = self._rules.classify(reply)
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
            # the counting rule: accepted at RCPT and handed over (or refused for good)
            if reply.accepted and outcome in (Outcome.DELIVERED, Outcome.BOUNCED):
                kept += 1
        connected = result.connected is Connected.YES
        self._metrics.attempt_seconds.labels(
            attempt_outcome(connected, v, len(throttled), len(blocked))
        ).observe(asyncio.get_running_loop().time() - started)
        if route is not None and route.reservation is not None:
            route.reservation.keep(kept)
            # settled before anything is recorded (a DSN, a reroute): the counts are right by
            # the time the next attempt routes; `async with` in _send stays the safety net
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
        state = self._messages.get(msg.queue_id)
        v, late = _split_late(v, state.pending if state is not None else set())
        if late is not None:
            self._recorder.record_late(msg, late, ip=ip, reason=reason, now=now)
        if state is None:
            return
        self._remember(state, v, ip, now)
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
        )
        if v.reroute:  # no backoff: routed afresh now, the router avoids what failed
            again = tuple(i for i, _ in v.reroute)
            self._due.put_nowait(
                Delivery(d.queue_id, d.domain, again, d.attempts, v.reroute[-1][1])
            )
        if v.retry:
            state.attempts = max(state.attempts, attempts)
            self._spool.record_attempt(d.queue_id, state.attempts)
            retry = Delivery(
                d.queue_id, d.domain, tuple(i for i, _ in v.retry), attempts, v.retry[-1][1]
            )
            self._later(retry, delay)
        if finished:
            self._forget(d.queue_id)

    def _remember(self, state: _Message, v: Verdicts, ip: str, now: datetime) -> None:
        """Each recipient's latest attempts, for `queue show` (memory only, a few each)."""
        at = now.timestamp()
        rows: list[tuple[int, str, Reply]] = [(i, "delivered", r) for i, r in v.delivered]
        rows += [(i, disposition, r) for i, r, disposition in v.failed]
        rows += [(i, "deferred", r) for i, r in (*v.retry, *v.reroute)]
        for i, disposition, reply in rows:
            attempts = state.history.setdefault(i, [])
            attempts.append(Attempt(at, ip, disposition, reply.line[:300]))
            del attempts[:-HISTORY_MAX]
            state.last_reply = reply.line[:300]
        if rows:
            state.last_ip = ip

    # -- the queue tools (admin API, `warmrelay queue ...`) --------------------------------

    def latest_reasons(self) -> dict[str, dict[str, object]]:
        """The latest deferral and bounce per provider (status page, /status)."""
        return self._recorder.latest_reasons()

    def views(self) -> list[MessageView]:
        """Every queued message as the queue tools show it, oldest first."""
        held: dict[str, float] = {}
        for at, _, _, delivery in self._held:
            held[delivery.queue_id] = min(at, held.get(delivery.queue_id, at))
        states = sorted(self._messages.values(), key=lambda m: m.message.received_at)
        return [self._view(m, held.get(m.message.queue_id)) for m in states]

    def view(self, queue_id: str) -> MessageView | None:
        state = self._messages.get(queue_id)
        if state is None:
            return None
        held = [at for at, _, _, d in self._held if d.queue_id == queue_id]
        return self._view(state, min(held, default=None))

    def _view(self, state: _Message, held_until: float | None) -> MessageView:
        msg = state.message
        next_retry = min((at for _, _, at in state.timers.values()), default=None)
        if state.on_hold:
            where = QueueState.ON_HOLD
        elif next_retry is not None:  # (some of it may also be held: the retry shows first)
            where = QueueState.DEFERRED
        elif held_until is not None:
            where = QueueState.HELD
        else:  # due, routing, on a ready queue, being sent
            where = QueueState.ACTIVE
        recipients = tuple(
            RecipientView(
                address,
                "pending" if i in state.pending else "done",
                tuple(state.history.get(i, ())),
            )
            for i, address in enumerate(msg.rcpt_tos)
        )
        return MessageView(
            msg.queue_id,
            msg.mail_from,
            msg.received_at,
            msg.size,
            where,
            recipients,
            state.attempts,
            next_retry,
            held_until,
            state.last_ip,
            state.last_reply,
        )

    def flush(self, target: Target) -> ActionResult:
        """Retry now what waits for a retry or a window (the router may hold it again);
        mail an operator holds stays held (counted in ``left_on_hold``)."""
        result = ActionResult()
        flushed = result.queue_ids
        for queue_id in target.messages(self._messages):
            state = self._messages[queue_id]
            if state.on_hold:
                result.left_on_hold += 1
                continue
            wanted = set(target.recipients(state))
            waiting = self._cancel_timers(state, wanted) + self._take_held(queue_id, wanted)
            for delivery in waiting:
                self._due.put_nowait(replace(delivery, after=None, turn=None))
            if waiting:
                flushed.append(queue_id)
        return result

    def _cancel_timers(self, state: _Message, wanted: set[int] | None = None) -> list[Delivery]:
        """The deliveries of a message waiting for a retry (for ``wanted`` recipients, or
        all), their timers cancelled."""
        taken = []
        for seq, (handle, delivery, _) in list(state.timers.items()):
            if wanted is None or wanted & set(delivery.indices):
                handle.cancel()
                self._timers.discard(handle)
                del state.timers[seq]
                taken.append(delivery)
        return taken

    def _take_held(self, queue_id: str, wanted: set[int]) -> list[Delivery]:
        """Held deliveries of a message (for ``wanted`` recipients) out of the heap."""
        taken = [
            e[3] for e in self._held if e[3].queue_id == queue_id and wanted & set(e[3].indices)
        ]
        if taken:
            ids = {id(d) for d in taken}
            self._held = [e for e in self._held if id(e[3]) not in ids]
            heapq.heapify(self._held)
        return taken

    def hold(self, target: Target) -> ActionResult:
        """The operator's hold: nothing of these messages is sent until ``release`` (kept
        across restarts). A send waiting for a connection parks instead; one already under
        way finishes."""
        result = ActionResult()
        changed = result.queue_ids
        for queue_id in target.messages(self._messages):
            state = self._messages[queue_id]
            if state.on_hold:
                continue
            state.on_hold = True
            state.parked += self._cancel_timers(state)
            state.parked += self._take_held(queue_id, set(state.pending))
            self._spool.record_hold(queue_id, True)
            changed.append(queue_id)
        return result

    def release(self, target: Target) -> ActionResult:
        """End the operator's hold: the parked deliveries are due now."""
        result = ActionResult()
        changed = result.queue_ids
        for queue_id in target.messages(self._messages):
            state = self._messages[queue_id]
            if not state.on_hold:
                continue
            state.on_hold = False
            for delivery in state.parked:
                self._due.put_nowait(replace(delivery, after=None, turn=None))
            state.parked.clear()
            self._spool.record_hold(queue_id, False)
            changed.append(queue_id)
        return result

    async def delete(self, target: Target, who: str) -> ActionResult:
        """Drop the named recipients without a DSN (the operator's decision, logged with
        who asked). A send waiting for a connection leaves them out; one already under
        way is only said and counted when it ends."""
        return await self._finish(target, who, None)

    async def bounce(self, target: Target, reason: str, who: str) -> ActionResult:
        """Fail the named recipients now with a DSN to the sender that gives ``reason``.
        A message whose DSN cannot be stored is left as it was (``failed``)."""
        return await self._finish(target, who, reason)

    async def _finish(self, target: Target, who: str, bounce_reason: str | None) -> ActionResult:
        result = ActionResult()
        now = self._clock()
        for queue_id in target.messages(self._messages):
            state = self._messages.get(queue_id)
            if state is None:  # finished while an earlier DSN was stored
                continue
            indices = target.recipients(state)
            if not indices:
                continue
            try:
                finished = await self._recorder.finish_by_operator(
                    state.message, state.pending, indices, who, bounce_reason, now
                )
            except SpoolError as exc:
                result.failed[queue_id] = f"cannot store the DSN ({exc}): nothing changed"
                continue
            wanted = set(indices)
            self._cancel_timers(state, wanted)
            self._take_held(queue_id, wanted)
            state.parked = [p for p in state.parked if not set(p.indices) <= wanted]
            if finished:
                self._forget(queue_id)
            result.queue_ids.append(queue_id)
        return result


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
