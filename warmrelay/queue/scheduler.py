"""Scheduler: moves due deliveries to the delivery stage and waiting ones to the
deferred queue. That is its one job.

A spooled message becomes one delivery per recipient domain (``submit``). Routing
workers take due deliveries and hand each to the delivery stage (``run``: resolve,
route, put on a ready queue, send, record); what must wait comes back here: a retry
after a backoff (``later``: loop timers), a hold until a window opens (``hold``), or
at once (``due``: rerouted). The ready queues per (source IP, next hop) are owned here
(``queue_send``) so a stop can drain them.

Held mail (``overflow: hold``, a full window) waits in one heap ordered by the time it
may go and then by message age, under one timer: when a window opens, everything due
is released oldest first, and each released delivery reserves only after the older
ones did, so the new window's budget goes to the mail that waited longest. (A timer
per hold would fire in the order of the delays computed at each hold: the younger ones
first, when the wall clock moved meanwhile.)

What the operator's queue tools need (``operate.actions``) is offered as a narrow
interface: ``message``/``queued`` to read, ``cancel`` to take a message's waiting
deliveries out of the timers and the held heap, ``due`` to send them now. The delivery
stage gets ``data``, ``message``, ``queue_send``, ``due``, ``later``, ``hold`` and
``forget`` (``delivery.attempt.Queue``).
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
from collections.abc import Awaitable, Callable, Hashable, Mapping
from datetime import UTC, datetime

from warmrelay.config import DeliveryConfig
from warmrelay.queue.messages import Delivery, QueuedMessage, domain_of
from warmrelay.queue.readyqueue import Job, ReadyQueues
from warmrelay.queue.spool import Spool, SpooledMessage

log = logging.getLogger("warmrelay.delivery")

Clock = Callable[[], datetime]
Run = Callable[[Delivery], Awaitable[None]]

CACHE_MAX_BYTES = 64 * 1024 * 1024  # bytes of fresh messages kept: no re-read from disk


def utc_now() -> datetime:
    return datetime.now(UTC)


class Scheduler:
    def __init__(
        self,
        spool: Spool,
        settings: Callable[[], DeliveryConfig],
        clock: Clock = utc_now,
        on_count: Callable[[int], None] = lambda n: None,
    ) -> None:
        self._spool = spool
        self._settings = settings  # follows reloads (delivery.concurrency needs a restart)
        self._clock = clock
        self._concurrency = settings().concurrency
        self._on_count = on_count  # the number of queued messages changed (a gauge)
        self._messages: dict[str, QueuedMessage] = {}
        self._cache: dict[str, bytes] = {}
        self._cache_bytes = 0
        self._due: asyncio.Queue[Delivery] = asyncio.Queue()
        self._queues = ReadyQueues(
            lambda: settings().connections_per_destination, self._concurrency, self._check_room
        )
        self._timers: set[asyncio.TimerHandle] = set()
        # held deliveries: (may go at, received at, tie-break, delivery), one timer for all
        self._held: list[tuple[float, float, int, Delivery]] = []
        self._seq = itertools.count()
        self._held_timer: asyncio.TimerHandle | None = None
        self._held_until = 0.0  # the timer releases what may go at or before this time
        self._workers: list[asyncio.Task[None]] = []
        self._stopping = False
        self._room = asyncio.Event()  # set while the backlog is short enough to take more
        self._room.set()

    # -- intake ---------------------------------------------------------------

    def accept(self, message: SpooledMessage, data: bytes) -> None:
        """A message just spooled (by the listener, or a DSN): queue it, keeping its bytes
        while the cache has room."""
        if self._cache_bytes + len(data) <= CACHE_MAX_BYTES:
            self._cache[message.queue_id] = data
            self._cache_bytes += len(data)
        self.submit(message)

    def data(self, queue_id: str) -> bytes:
        """A queued message's bytes (``SpoolError`` if the spool cannot read them)."""
        cached = self._cache.get(queue_id)
        return cached if cached is not None else self._spool.read_data(queue_id)

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
        state = QueuedMessage(message, pending, attempts, on_hold=on_hold)
        self._messages[message.queue_id] = state
        by_domain: dict[str, list[int]] = {}
        for i in sorted(pending):
            by_domain.setdefault(domain_of(message.rcpt_tos[i]), []).append(i)
        for domain, indices in by_domain.items():
            delivery = Delivery(message.queue_id, domain, tuple(indices), attempts)
            (state.parked.append if on_hold else self._due.put_nowait)(delivery)
        self._on_count(len(self._messages))

    def forget(self, queue_id: str) -> None:
        """A finished message: off the spool, out of the queue and the cache."""
        self._spool.remove(queue_id)
        del self._messages[queue_id]
        data = self._cache.pop(queue_id, None)
        if data is not None:
            self._cache_bytes -= len(data)
        self._on_count(len(self._messages))

    def _backlog(self) -> int:
        return self._due.qsize() + self._queues.pressure()

    async def admit(self, max_wait_s: float = 1.0) -> None:
        """Inflow control (as Postfix's in_flow_delay): while more sends wait than the relay
        can start, a new message waits up to ``max_wait_s`` before it is accepted, so intake
        cannot outrun delivery and time from 250 to delivery stays short. Only queues that
        are draining count: a stuck destination does not slow down everyone's intake."""
        if self._backlog() <= self._concurrency:
            return
        self._room.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._room.wait(), max_wait_s)

    def _check_room(self) -> None:
        if not self._room.is_set() and self._backlog() <= self._concurrency:
            self._room.set()

    # -- what is queued -------------------------------------------------------

    def message(self, queue_id: str) -> QueuedMessage | None:
        return self._messages.get(queue_id)

    @property
    def queued(self) -> Mapping[str, QueuedMessage]:
        """Every queued message by queue id (read only: change them through the queue)."""
        return self._messages

    def held_until(self) -> dict[str, float]:
        """Per message, the earliest time a window lets some of its held mail go."""
        held: dict[str, float] = {}
        for at, _, _, delivery in self._held:
            held[delivery.queue_id] = min(at, held.get(delivery.queue_id, at))
        return held

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

    def start(self, run: Run) -> None:
        """Routing workers hand each due delivery to ``run`` (the delivery stage)."""
        self._workers = [
            asyncio.create_task(self._work(run), name=f"routing-{i}")
            for i in range(self._concurrency)
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

    async def _work(self, run: Run) -> None:
        while not self._stopping:
            delivery = await self._due.get()
            self._check_room()
            try:
                await run(delivery)
            except Exception:  # a bug must not kill the worker; the mail stays spooled
                log.exception("%s: delivery to %s failed", delivery.queue_id, delivery.domain)
                self.later(delivery.again(), self._settings().retry_first_s)
            finally:
                if delivery.turn is not None and not delivery.turn.done():
                    delivery.turn.set_result(None)  # the next younger held one may route

    # -- where a delivery goes next -------------------------------------------

    def due(self, delivery: Delivery) -> None:
        """Route it now (again)."""
        self._due.put_nowait(delivery)

    def queue_send(self, key: Hashable, send: Job, limit: int | None = None) -> None:
        """A routed part waits on the ready queue of its lane (``limit``: its connections)."""
        self._queues.put(key, send, limit)

    def later(self, delivery: Delivery, delay_s: float) -> None:
        """Route it again after ``delay_s`` (the deferred queue)."""
        if self._stopping:
            return
        loop = asyncio.get_running_loop()
        state = self._messages.get(delivery.queue_id)
        seq = next(self._seq)

        def fire() -> None:
            self._timers.discard(handle)
            if state is not None:
                state.timers.pop(seq, None)
            self._due.put_nowait(delivery)

        handle = loop.call_later(max(0.0, delay_s), fire)
        self._timers.add(handle)
        if state is not None:  # the queue tools show when, and flush cancels it
            state.timers[seq] = (handle, delivery, self._clock().timestamp() + max(0.0, delay_s))

    def hold(self, delivery: Delivery, retry_at: datetime, now: datetime) -> None:
        """Keep a held delivery until ``retry_at``. The one timer fires at the earliest moment
        any hold computed for its time, and then releases everything due by that time."""
        if self._stopping:
            return
        state = self._messages[delivery.queue_id]
        at = retry_at.timestamp()
        entry = (at, state.message.received_at, next(self._seq), delivery)
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

    def cancel(self, queue_id: str, recipients: set[int] | None = None) -> list[Delivery]:
        """The deliveries of a message that wait for a retry or a window (those holding any
        of ``recipients``, or all), out of the timers and the held heap: the operator's
        actions decide what becomes of them."""
        state = self._messages.get(queue_id)
        if state is None:
            return []
        taken = []
        for seq, (handle, delivery, _) in list(state.timers.items()):
            if recipients is None or recipients & set(delivery.indices):
                handle.cancel()
                self._timers.discard(handle)
                del state.timers[seq]
                taken.append(delivery)
        held = [
            e[3]
            for e in self._held
            if e[3].queue_id == queue_id and (recipients is None or recipients & set(e[3].indices))
        ]
        if held:
            ids = {id(d) for d in held}
            self._held = [e for e in self._held if id(e[3]) not in ids]
            heapq.heapify(self._held)
        return taken + held
