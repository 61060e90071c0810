"""Scheduler: ready and deferred queues, retries, expiry, dispositions, DSNs.

A spooled message becomes one delivery per recipient domain. Workers take
deliveries from the ready queue, ask the router for source IPs at that
moment, hand the parts to the dispatcher and record each recipient's
disposition. Deferred recipients wait on loop timers (exponential backoff
between ``retry_first_s`` and ``retry_max_s``) and are routed afresh; what is
still undelivered after ``queue_lifetime_s`` expires. Bounced and expired
recipients produce a DSN to the sender, stored in the spool before the
original's recipients are marked done.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

from warmrelay.config import Config
from warmrelay.dispatcher import Connected, Dispatcher, Endpoint, Outcome, Reply
from warmrelay.dsn import FailedRecipient, build_dsn
from warmrelay.eligibility import Traffic, header_block
from warmrelay.errors import NextHopError, SpoolError, WarmrelayError
from warmrelay.metrics import Metrics
from warmrelay.nexthop import NextHop, NextHopResolver
from warmrelay.providers import provider_map
from warmrelay.router import Hold, Route, Router, RouteReason, Smarthost
from warmrelay.spool import Spool, SpooledMessage
from warmrelay.throttle import ThrottleRules

log = logging.getLogger("warmrelay.delivery")

Clock = Callable[[], datetime]


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


@dataclass
class _Message:
    message: SpooledMessage
    pending: set[int]
    attempts: int = 0


@dataclass
class _Outcomes:
    """Recipients of one delivery, sorted by what happens to them next."""

    done: list[tuple[int, Reply, str]] = field(default_factory=list)  # delivered
    failed: list[tuple[int, Reply, str]] = field(default_factory=list)  # bounced/expired
    retry: list[tuple[int, Reply]] = field(default_factory=list)  # deferred: backoff
    reroute: list[tuple[int, Reply]] = field(default_factory=list)  # deferred: again now


def domain_of(address: str) -> str:
    return address.rpartition("@")[2].lower()


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
    ) -> None:
        self._spool = spool
        self._dispatcher = dispatcher
        self._metrics = metrics
        self._clock = clock
        self.configure(config, router, resolver)
        self._messages: dict[str, _Message] = {}
        self._cache: dict[str, bytes] = {}  # bytes of fresh messages: no re-read from disk
        self._cache_bytes = 0
        self._ready: asyncio.Queue[Delivery] = asyncio.Queue()
        self._timers: set[asyncio.TimerHandle] = set()
        self._workers: list[asyncio.Task[None]] = []
        self._busy = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._stopping = False
        self._room = asyncio.Event()  # set while the ready queue is short enough to take more
        self._room.set()

    def configure(self, config: Config, router: Router, resolver: NextHopResolver) -> None:
        """Take a (re)loaded configuration: everything derived from it is rebuilt here.
        Messages, queues and timers are kept; ``delivery.concurrency`` needs a restart."""
        self._config = config
        self._delivery = config.delivery
        self._router = router
        self._resolver = resolver
        self._throttle = ThrottleRules(config.throttle.patterns)
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
        self, message: SpooledMessage, done: Mapping[int, str] | None = None, attempts: int = 0
    ) -> None:
        """Queue a spooled message's unfinished recipients, grouped by domain, as ready now."""
        pending = {i for i in range(len(message.rcpt_tos)) if not done or i not in done}
        if not pending:
            self._spool.remove(message.queue_id)
            return
        self._messages[message.queue_id] = _Message(message, pending, attempts)
        by_domain: dict[str, list[int]] = {}
        for i in sorted(pending):
            by_domain.setdefault(domain_of(message.rcpt_tos[i]), []).append(i)
        for domain, indices in by_domain.items():
            self._ready.put_nowait(Delivery(message.queue_id, domain, tuple(indices), attempts))
        self._metrics.spool_messages.set(len(self._messages))

    async def admit(self, max_wait_s: float = 1.0) -> None:
        """Inflow control (as Postfix's in_flow_delay): while more deliveries wait than the
        workers can start, a new message waits up to ``max_wait_s`` before it is accepted,
        so intake cannot outrun delivery and time from 250 to delivery stays short."""
        if self._ready.qsize() <= self._backlog_limit:
            return
        self._room.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._room.wait(), max_wait_s)

    @property
    def messages(self) -> int:
        return len(self._messages)

    @property
    def ready(self) -> int:
        return self._ready.qsize()

    @property
    def deferred(self) -> int:
        return len(self._timers)

    # -- lifecycle ------------------------------------------------------------

    def start(self) -> None:
        self._workers = [
            asyncio.create_task(self._work(), name=f"delivery-{i}")
            for i in range(self._delivery.concurrency)
        ]

    async def stop(self, drain_timeout_s: float) -> None:
        """Take no new work; let deliveries in progress finish within the timeout."""
        self._stopping = True
        for handle in self._timers:
            handle.cancel()
        self._timers.clear()
        try:
            await asyncio.wait_for(self._idle.wait(), drain_timeout_s)
        except TimeoutError:
            log.warning("drain timeout: %d deliveries cut short (they stay spooled)", self._busy)
        for task in self._workers:
            task.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)

    async def _work(self) -> None:
        while not self._stopping:
            delivery = await self._ready.get()
            if self._stopping:
                return
            if not self._room.is_set() and self._ready.qsize() <= self._backlog_limit:
                self._room.set()
            self._busy += 1
            self._idle.clear()
            try:
                await self._deliver(delivery)
            except Exception:  # a bug must not kill the worker; the mail stays spooled
                log.exception("%s: delivery to %s failed", delivery.queue_id, delivery.domain)
                self._later(delivery, self._delivery.retry_first_s)
            finally:
                self._busy -= 1
                if self._busy == 0:
                    self._idle.set()

    def _later(self, delivery: Delivery, delay_s: float) -> None:
        if self._stopping:
            return
        loop = asyncio.get_running_loop()

        def fire() -> None:
            self._timers.discard(handle)
            self._ready.put_nowait(delivery)

        handle = loop.call_later(max(0.0, delay_s), fire)
        self._timers.add(handle)

    # -- one delivery ---------------------------------------------------------

    async def _deliver(self, d: Delivery) -> None:
        state = self._messages.get(d.queue_id)
        if state is None:
            return
        msg = state.message
        indices = [i for i in d.indices if i in state.pending]
        if not indices:
            return
        now = self._clock()
        expires_at = msg.received_at + self._delivery.queue_lifetime_s
        out = _Outcomes()
        if now.timestamp() >= expires_at:
            last = d.last or Reply(Outcome.DEFERRED, 451, "4.4.7 queue lifetime exceeded", "")
            out.failed = [(i, last, "expired") for i in indices]
            await self._record(d, out, ip="none", reason="", now=now)
            return
        try:
            hops = await self._resolver.resolve(d.domain)
        except NextHopError as exc:
            if exc.permanent:  # RFC 7505: 556 for a null MX, else 550
                code = 556 if exc.status == "5.1.10" else 550
                reply = Reply(Outcome.BOUNCED, code, f"{exc.status} {d.domain}: {exc}", "")
                out.failed = [(i, reply, "bounced") for i in indices]
            else:
                reply = Reply(Outcome.DEFERRED, 451, f"{exc.status} {d.domain}: {exc}", "")
                out.retry = [(i, reply) for i in indices]
            await self._record(d, out, ip="none", reason="", now=now)
            return
        provider = self._providers.recognise(d.domain, [h.mx for h in hops if h.mx])
        traffic = Traffic(msg.mail_from, d.domain, self._headers(d.queue_id))
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
                held = Delivery(d.queue_id, d.domain, tuple(chunk), d.attempts, d.last)
                self._later(held, (part.retry_at - now).total_seconds())
            else:
                await self._send_part(d, part, chunk, hops, now, provider)

    def _headers(self, queue_id: str) -> dict[str, str]:
        """The headers eligibility rules look at (none are parsed if no rule needs them)."""
        if not self._header_names:
            return {}
        try:
            return header_block(self._data(queue_id), self._header_names)
        except SpoolError:
            return {}

    async def _send_part(
        self,
        d: Delivery,
        part: Route | Smarthost,
        chunk: Sequence[int],
        hops: Sequence[NextHop],
        now: datetime,
        provider: str,
    ) -> None:
        msg = self._messages[d.queue_id].message
        route = part if isinstance(part, Route) else None
        if route is not None:
            ip, endpoint = route.address, self._dispatcher.endpoint(route.source)
        else:
            assert self._smarthost is not None
            ip, (endpoint, hops) = "smarthost", self._smarthost
        try:
            data = self._data(d.queue_id)
        except SpoolError as exc:
            if route is not None:
                await self._router.release(route, len(chunk))
            log.error("%s: cannot read the spooled message: %s", d.queue_id, exc)
            self._later(
                Delivery(d.queue_id, d.domain, tuple(chunk), d.attempts, d.last),
                self._delivery.retry_first_s,
            )
            return
        rcpts = [msg.rcpt_tos[i] for i in chunk]
        result = await self._dispatcher.send(endpoint, hops, msg.mail_from, rcpts, data)
        if route is not None and result.connected is not Connected.YES:
            await self._router.release(route, len(chunk))
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
            self._ready.put_nowait(Delivery(d.queue_id, d.domain, tuple(chunk), d.attempts))
            return
        self._metrics.routed.labels(ip, part.reason.value).inc(len(chunk))
        out = _Outcomes()
        for i, reply in zip(chunk, result.replies, strict=True):
            if reply.outcome is Outcome.DELIVERED:
                out.done.append((i, reply, "delivered"))
            elif reply.outcome is Outcome.BOUNCED:
                out.failed.append((i, reply, "bounced"))
            elif (
                route is not None
                and route.reason is RouteReason.WARMUP
                and self._throttle.matches(reply.code, reply.text)
            ):
                out.reroute.append((i, reply))  # the router now avoids this IP for them
            else:
                out.retry.append((i, reply))
        if out.reroute and route is not None:
            await self._suspend(d.queue_id, route, provider, out.reroute, now)
        await self._record(d, out, ip=ip, reason=part.reason.value, now=now)

    async def _suspend(
        self,
        queue_id: str,
        route: Route,
        provider: str,
        throttled: Sequence[tuple[int, Reply]],
        now: datetime,
    ) -> None:
        """A provider throttles a warming IP: suspend the IP for that provider."""
        reply = throttled[0][1]
        text = f"{reply.code} {reply.text}".replace("\n", " ")[:200]
        s = await self._router.throttled(route.source, provider, len(throttled), now, text)
        self._metrics.throttled.labels(route.address, provider).inc(len(throttled))
        log.warning(
            "%s: %s throttles %s (%s): suspended for %s until %s (cooldown %.0fs); "
            "%d recipient(s) retried now from the pool",
            queue_id,
            provider,
            route.address,
            text,
            provider,
            s.until.isoformat(),
            s.cooldown_s,
            len(throttled),
        )

    # -- dispositions ---------------------------------------------------------

    async def _record(
        self, d: Delivery, out: _Outcomes, *, ip: str, reason: str, now: datetime
    ) -> None:
        state = self._messages[d.queue_id]
        msg = state.message
        for i, reply, disposition in (*out.done, *out.failed):
            self._log(d.queue_id, msg.rcpt_tos[i], ip, reason, disposition, reply, msg, now)
        for i, reply in (*out.retry, *out.reroute):
            self._log(d.queue_id, msg.rcpt_tos[i], ip, reason, "deferred", reply, msg, now)
        if out.failed and not await self._notify(state, out.failed, now):
            out.retry += [(i, reply) for i, reply, _ in out.failed]  # DSN not stored: try later
            out.failed = []
        finals = [*out.done, *out.failed]
        finishing = state.pending.issubset(i for i, _, _ in finals)
        for disposition in {disp for _, _, disp in finals}:
            idx = [i for i, _, disp in finals if disp == disposition]
            if not finishing:  # a finished message is removed below: nothing to record
                self._spool.mark_done(d.queue_id, idx, disposition)
            state.pending.difference_update(idx)
            self._metrics.deliveries.labels(ip, disposition).inc(len(idx))
        if out.reroute:  # no backoff: routed afresh now, the router avoids what failed
            self._metrics.deliveries.labels(ip, "deferred").inc(len(out.reroute))
            again = tuple(i for i, _ in out.reroute)
            self._ready.put_nowait(
                Delivery(d.queue_id, d.domain, again, d.attempts, out.reroute[-1][1])
            )
        if out.retry:
            self._metrics.deliveries.labels(ip, "deferred").inc(len(out.retry))
            attempts = d.attempts + 1
            state.attempts = max(state.attempts, attempts)
            self._spool.record_attempt(d.queue_id, state.attempts)
            delay = min(
                self._delivery.retry_first_s * 2 ** (attempts - 1), self._delivery.retry_max_s
            )
            expires_in = msg.received_at + self._delivery.queue_lifetime_s - now.timestamp()
            retry = Delivery(
                d.queue_id, d.domain, tuple(i for i, _ in out.retry), attempts, out.retry[-1][1]
            )
            self._later(retry, min(delay, max(0.0, expires_in)))
        if not state.pending:
            self._forget(d.queue_id)

    def _log(
        self,
        qid: str,
        rcpt: str,
        ip: str,
        reason: str,
        disposition: str,
        reply: Reply,
        msg: SpooledMessage,
        now: datetime,
    ) -> None:
        log.info(
            "%s: to=<%s> domain=%s ip=%s reason=%s relay=%s delay=%.2fs %s (%d %s)",
            qid,
            rcpt,
            domain_of(rcpt),
            ip,
            reason or "-",
            reply.hop or "none",
            max(0.0, now.timestamp() - msg.received_at),
            disposition,
            reply.code,
            reply.text.replace("\n", " ")[:300],
        )

    async def _notify(
        self, state: _Message, failed: Iterable[tuple[int, Reply, str]], now: datetime
    ) -> bool:
        """Store a DSN to the sender for failed recipients; False if the spool refused it."""
        msg = state.message
        if not msg.mail_from:  # never bounce a bounce (RFC 5321 §4.5.5)
            return True
        recipients = [
            FailedRecipient(
                address=msg.rcpt_tos[i],
                status="4.4.7" if disp == "expired" else reply.status,
                diagnostic=f"{reply.code} {reply.text}" if reply.hop else reply.text,
                remote_mta=reply.hop.split("[", 1)[0] if reply.hop else None,
                last_attempt=now,
            )
            for i, reply, disp in failed
        ]
        try:
            original = self._data(msg.queue_id)
            dsn = build_dsn(
                reporting_mta=self._config.smtp.hostname,
                queue_id=msg.queue_id,
                sender=msg.mail_from,
                recipients=recipients,
                original=original,
                arrival=datetime.fromtimestamp(msg.received_at, UTC),
                now=now,
            )
            bounce = await self._spool.store("", [msg.mail_from], dsn, received_at=now.timestamp())
        except (WarmrelayError, ValueError) as exc:
            log.error("%s: cannot queue the DSN to <%s>: %s", msg.queue_id, msg.mail_from, exc)
            return False
        self._metrics.dsn_sent.inc()
        log.info("%s: sender non-delivery notification: %s", msg.queue_id, bounce.queue_id)
        self.accept(bounce, dsn)
        return True
