"""Router: pure policy deciding which source IP carries which recipients.

For a delivery of n recipients it reserves what fits under each warming IP's
caps (atomically, through the counters), sends the rest to the warm pool
(smooth weighted round robin), a smarthost, or holds it, per the overflow
policy. Outcomes are types: a ``RoutePlan`` of ``Route`` parts (send k
recipients from this IP, for this reason), ``Smarthost`` parts and ``Hold``
parts (not now, retry at T). It also keeps the per-IP state that policy
depends on (pause, completion, results progression, throttling suspensions),
persisted through the counters' value store, which is its only I/O.
"""

from __future__ import annotations

import contextlib
import enum
import itertools
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import TypeVar

from warmrelay.config import Config, IPConfig
from warmrelay.control import (
    COMPLETED,
    PAUSE,
    PROGRESS,
    SUSPENDED,
    IPControl,
    Pause,
    Persisted,
    Progress,
    Record,
    Suspension,
    advances,
    legacy_key,
    next_cooldown,
    suspension_record,
)
from warmrelay.counters import CounterKey, Counters, Limit
from warmrelay.counters.base import Change, update_value
from warmrelay.eligibility import Eligibility, Traffic
from warmrelay.errors import CounterError
from warmrelay.reservation import Ledger, Reservation
from warmrelay.warmup import (
    Caps,
    WarmupPlan,
    WarmupState,
    WarmupStatus,
    caps_at,
    next_window_start,
    status_for_day,
)

log = logging.getLogger("warmrelay.router")

T = TypeVar("T")


class RouteReason(enum.Enum):
    WARMUP = "warmup"  # sent from a warming IP, under its cap
    OVERFLOW = "overflow"  # a warming IP was full (or down), so a warm IP took it
    POOL = "pool"  # no warming IP in play: ordinary pool traffic


@dataclass(frozen=True)
class Route:
    """Send ``count`` recipients from ``source``. From a warming IP the route owns the
    ``reservation`` of those recipients under its caps (see warmrelay.reservation)."""

    source: IPConfig
    count: int
    reason: RouteReason
    reservation: Reservation | None = None

    @property
    def address(self) -> str:
        return str(self.source.address)


@dataclass(frozen=True)
class Smarthost:
    """Relay ``count`` recipients through the configured smarthost (overflow)."""

    count: int
    reason: RouteReason = RouteReason.OVERFLOW


@dataclass(frozen=True)
class Hold:
    """Not now: keep ``count`` recipients spooled and try again at ``retry_at``."""

    count: int
    retry_at: datetime
    why: str


Part = Route | Smarthost | Hold


@dataclass(frozen=True)
class RoutePlan:
    parts: tuple[Part, ...]

    @property
    def routes(self) -> list[Route]:
        return [p for p in self.parts if isinstance(p, Route)]

    @property
    def holds(self) -> list[Hold]:
        return [p for p in self.parts if isinstance(p, Hold)]


NO_POOL_RETRY = timedelta(minutes=1)
STORE_RETRY = timedelta(seconds=30)  # held mail retried this soon while the store is down
CONTROL_RELOAD_S = 30.0  # re-read pause/progress state so a fleet converges


class Router:
    """Policy state: round-robin weights, IPs marked down, and each IP's control state."""

    def __init__(self, config: Config, counters: Counters) -> None:
        self._config = config
        self._zone = config.zone
        self._counters = counters
        self._rr_weights: dict[str, int] = {}
        self._rotation = itertools.count()
        self.ledger = Ledger()  # open reservations, settled at shutdown
        self._down_until: dict[str, datetime] = {}
        self._plans: dict[str, WarmupPlan] = {}
        self._eligible: dict[str, Eligibility] = {}
        for ip in config.ips:
            if ip.warmup is not None:
                self._plans[str(ip.address)] = ip.warmup.plan()
                rules = ip.warmup.eligibility()
                if rules is not None:
                    self._eligible[str(ip.address)] = rules
        self._control: dict[str, IPControl] = {str(ip.address): IPControl() for ip in config.ips}
        self._pending: list[tuple[str, Change]] = []  # changes the store failed to take, in order
        self._loaded_at = float("-inf")

    @property
    def ips(self) -> Sequence[IPConfig]:
        return self._config.ips

    def control(self, address: str) -> IPControl:
        return self._control[address]

    # -- status ------------------------------------------------------------------

    def status(self, ip: IPConfig, now: datetime) -> WarmupStatus:
        """Where the IP stands: warmup day and cap, or warm, paused, not started."""
        today = now.astimezone(self._zone).date()
        c = self._control[str(ip.address)]
        if c.paused_since is not None:
            day = c.day if c.day is not None else 0
            if ip.warmup is not None and ip.warmup.progress == "calendar":
                day = c.calendar_day(ip.warmup.start, today)
            return WarmupStatus(WarmupState.PAUSED, day, 0, today.isoformat())
        if ip.warmup is None or c.completed:
            return WarmupStatus(WarmupState.WARM, 0, None, today.isoformat())
        if ip.warmup.progress == "results" and c.day is not None:
            day = c.day
        else:
            day = c.calendar_day(ip.warmup.start, today)
        return status_for_day(ip.warmup.schedule, day, today)

    def caps(self, ip: IPConfig, now: datetime, provider: str | None = None) -> Caps | None:
        """The caps in force for a warming IP (None for an IP without a warmup block)."""
        plan = self._plans.get(str(ip.address))
        if plan is None:
            return None
        return caps_at(plan, self._zone, now, provider, self.status(ip, now))

    def mark_down(self, address: str, until: datetime) -> None:
        """Stop routing to an IP that cannot be used (e.g. not bound on this host)."""
        self._down_until[address] = until

    def is_down(self, address: str, now: datetime) -> bool:
        until = self._down_until.get(address)
        if until is None:
            return False
        if now >= until:
            del self._down_until[address]
            return False
        return True

    def suspension(self, address: str, provider: str | None, now: datetime) -> Suspension | None:
        s = self._control[address].suspended.get(provider or "")
        return s if s is not None and now < s.until else None

    def counter_key(self, ip: IPConfig, now: datetime, scope: str = "all") -> CounterKey:
        return CounterKey(str(ip.address), self.status(ip, now).window, scope)

    async def sent(self, ip: IPConfig, now: datetime) -> int:
        """Recipients counted against ``ip`` in the current window."""
        return await self._counters.get(self.counter_key(ip, now))

    # -- state kept in the store ---------------------------------------------------

    def carry_over(self, old: Router) -> None:
        """After a configuration reload: keep what the old router learned at run time."""
        self._down_until = dict(old._down_until)
        self.ledger = old.ledger
        self._rr_weights = dict(old._rr_weights)
        self._pending = old._pending  # still to be written, in order
        for address, control in old._control.items():
            if address in self._control:  # shown until the next reload re-reads the store
                self._control[address] = control

    def reload_soon(self) -> None:
        """Re-read control state at the next routing (a supervisor changed it: SIGUSR1)."""
        self._loaded_at = float("-inf")

    async def refresh(self, now: datetime) -> None:
        """Write changes the store failed to take, re-read every IP's records now and then
        (each CONTROL_RELOAD_S, at once after ``reload_soon``), advance ``progress:
        results`` IPs. Other processes change records too: this is how a fleet converges."""
        try:
            await self._write_pending()
            if time.monotonic() - self._loaded_at >= CONTROL_RELOAD_S:
                for address in self._control:
                    self._control[address] = await self._load(address)
                self._loaded_at = time.monotonic()
            today = now.astimezone(self._zone).date()
            for ip in self.ips:
                if ip.warmup is not None and ip.warmup.progress == "results":
                    await self._advance(ip, today)
        except CounterError:
            pass  # the store is down: keep the state we have; warming IPs pause anyway

    async def _load(self, address: str) -> IPControl:
        """Every record of one IP (the blob of an earlier version is migrated first)."""
        get = self._counters.get_value
        legacy = await get(legacy_key(address))
        if legacy is not None:
            await self._migrate(address, legacy)
        suspended: dict[str, Suspension] = {}
        for provider in sorted(SUSPENDED.loads(await get(SUSPENDED.key(address)))):
            record = suspension_record(provider)
            found = record.loads(await get(record.key(address)))
            if found is not None:  # listed before it was written (a crash in between)
                suspended[provider] = found
        return IPControl(
            pause=PAUSE.loads(await get(PAUSE.key(address))),
            completed=COMPLETED.loads(await get(COMPLETED.key(address))),
            progress=PROGRESS.loads(await get(PROGRESS.key(address))),
            suspended=suspended,
        )

    async def _migrate(self, address: str, text: str) -> None:
        """Earlier versions kept one JSON blob per IP: copy each fact into its own record
        where that record is still absent (never over a newer fact: records are never
        deleted, so absent means never set), then drop the blob."""
        old = IPControl.from_legacy(text)
        facts = [
            (PAUSE.key(address), PAUSE.dumps(old.pause) if old.pause != Pause() else None),
            (COMPLETED.key(address), COMPLETED.dumps(old.completed)),
            (PROGRESS.key(address), PROGRESS.dumps(old.progress)),
        ]
        if old.suspended:
            names = frozenset(old.suspended)

            async def listed(current: str | None) -> str | None:
                return SUSPENDED.dumps(SUSPENDED.loads(current) | names)

            await update_value(self._counters, SUSPENDED.key(address), listed)
        for provider, suspension in old.suspended.items():
            facts.append((suspension_record(provider).key(address), suspension.dumps()))
        for key, value in facts:
            if value is not None:
                await self._counters.compare_and_set(key, None, value)
        if await self._counters.compare_and_set(legacy_key(address), text, None):
            log.info("state of %s moved to one record per fact", address)

    async def _advance(self, ip: IPConfig, today: date) -> None:
        """Judge each finished day: the next warmup day begins only after a day that used
        its cap (>= progress_min_use) with little throttling; other days repeat. The
        judgement is a compare-and-set of the progress record, so processes judging the
        same day at once advance it once, and it never goes back."""
        assert ip.warmup is not None
        address = str(ip.address)
        known = self._control[address]
        if known.completed or today < ip.warmup.start:
            return
        if known.progress is not None and known.progress.on >= today:
            return  # judged today already: no I/O on the routing path

        async def judge(text: str | None) -> str | None:
            return PROGRESS.dumps(await self._judged(ip, PROGRESS.loads(text), today))

        stored = await update_value(self._counters, PROGRESS.key(address), judge)
        self._control[address].progress = PROGRESS.loads(stored)

    async def _judged(self, ip: IPConfig, progress: Progress | None, today: date) -> Progress:
        """The progress after judging every finished day since ``progress``."""
        assert ip.warmup is not None
        address, schedule = str(ip.address), ip.warmup.schedule
        day, on = (progress.day, progress.on) if progress else (1, ip.warmup.start)
        while on < today and day <= schedule.days:
            window = on.isoformat()
            sent = await self._counters.get(CounterKey(address, window))
            throttled = await self._counters.get(CounterKey(address, window, "throttled"))
            if advances(
                sent,
                throttled,
                schedule.daily[day - 1],
                ip.warmup.progress_min_use,
                ip.warmup.progress_max_throttle,
            ):
                day += 1
            on += timedelta(days=1)
        return Progress(day, max(on, today))  # warm: nothing left to judge

    async def _write(
        self, record: Record[T], address: str, change: Callable[[T], T], known: T
    ) -> tuple[T, Persisted]:
        """Change one record by compare-and-set (``change`` maps the stored value to the new
        one). While the store fails, the change applies to ``known`` (this process's
        view) and waits in order in ``_pending``, written by the next refresh."""
        key = record.key(address)

        async def text_change(text: str | None) -> str | None:
            return record.dumps(change(record.loads(text)))

        try:
            await self._write_pending()  # keep the order: earlier changes first
            stored = await update_value(self._counters, key, text_change)
        except CounterError as exc:
            log.error("cannot store %s now (%s); in force here, stored when it answers", key, exc)
            self._pending.append((key, text_change))
            return change(known), Persisted.PENDING
        return record.loads(stored), Persisted.STORED

    async def _write_pending(self) -> None:
        while self._pending:
            key, change = self._pending[0]
            await update_value(self._counters, key, change)
            self._pending.pop(0)

    async def pause(self, address: str, now: datetime) -> Persisted:
        today = now.astimezone(self._zone).date()
        known = self._control[address].pause
        pause, outcome = await self._write(PAUSE, address, lambda p: p.paused(today), known)
        self._control[address].pause = pause
        return outcome

    async def resume(self, address: str, now: datetime) -> Persisted:
        today = now.astimezone(self._zone).date()
        known = self._control[address].pause
        pause, outcome = await self._write(PAUSE, address, lambda p: p.resumed(today), known)
        self._control[address].pause = pause
        return outcome

    async def complete(self, address: str, now: datetime) -> Persisted:
        known = self._control[address].completed
        done, outcome = await self._write(COMPLETED, address, lambda _: True, known)
        self._control[address].completed = done
        return outcome

    async def throttled(
        self,
        ip: IPConfig,
        provider: str | None,
        n: int,
        now: datetime,
        reason: str,
        *,
        cooldown: tuple[float, float] | None = None,
    ) -> Suspension:
        """A provider said this IP sends too much: suspend it there for a cooldown that
        doubles on repeats (from the stored previous suspension, whichever process wrote
        it). ``cooldown`` (base_s, max_s) replaces the configured one (reputation blocks)."""
        address, key = str(ip.address), provider or ""
        base_s, max_s = cooldown or self._config.throttle.cooldown(provider)

        def suspend(previous: Suspension | None) -> Suspension | None:
            seconds = next_cooldown(previous, now, base_s, max_s)
            return Suspension(now + timedelta(seconds=seconds), seconds, reason)

        throttle_key = self.counter_key(ip, now, "throttled")
        with contextlib.suppress(CounterError):  # progress may miss it; the suspension holds
            await self._counters.reserve([Limit(throttle_key, 2**62)], n)
        known = self._control[address].suspended
        await self._write(SUSPENDED, address, lambda names: names | {key}, frozenset(known))
        record = suspension_record(key)
        stored, _ = await self._write(record, address, suspend, known.get(key))
        assert stored is not None  # suspend() never returns None
        self._control[address].suspended[key] = stored
        return stored

    # -- routing -----------------------------------------------------------------

    async def route(
        self, n: int, now: datetime, provider: str | None = None, traffic: Traffic | None = None
    ) -> RoutePlan:
        """Split a delivery of ``n`` recipients (to ``provider``) into parts."""
        await self.refresh(now)
        parts: list[Part] = []
        remaining = n
        states = [self.status(ip, now).state for ip in self.ips]  # once per delivery
        warming = [
            ip
            for ip, state in zip(self.ips, states, strict=True)
            if state is WarmupState.WARMING and self._admits(ip, traffic)
        ]
        more_room_at = next_window_start(now, self._zone)
        if warming:
            start = next(self._rotation) % len(warming)
            for ip in warming[start:] + warming[:start]:
                if remaining == 0:
                    break
                address = str(ip.address)
                down_until = self._down_until.get(address) if self.is_down(address, now) else None
                suspension = self.suspension(address, provider, now)
                if down_until is not None or suspension is not None:
                    # held mail comes back when the IP may send again, not at midnight
                    if down_until is not None:
                        more_room_at = min(more_room_at, down_until)
                    if suspension is not None:
                        more_room_at = min(more_room_at, suspension.until)
                    continue
                caps = self.caps(ip, now, provider)
                assert caps is not None
                more_room_at = min(more_room_at, caps.next_change)
                if caps.closed:
                    continue
                limits = [
                    Limit(CounterKey(address, lim.window, lim.scope), lim.cap)
                    for lim in caps.limits
                ]
                try:
                    granted = await self._counters.reserve(limits, remaining)
                except CounterError:  # no count, no send: never over a cap
                    more_room_at = min(more_room_at, now + STORE_RETRY)
                    continue
                if granted:
                    keys = tuple(lim.key for lim in limits)
                    held = Reservation(self._counters, keys, granted, self.ledger)
                    parts.append(Route(ip, granted, RouteReason.WARMUP, held))
                    remaining -= granted
        if remaining:
            parts.append(self._overflow(remaining, now, bool(warming), more_room_at, states))
        return RoutePlan(tuple(parts))

    def _admits(self, ip: IPConfig, traffic: Traffic | None) -> bool:
        """Eligibility rules; and never a DSN (null sender): bounces from a cold IP hurt it."""
        if traffic is not None and not traffic.sender:
            return False
        rules = self._eligible.get(str(ip.address))
        return rules is None or (traffic is not None and rules.admits(traffic))

    def _overflow(
        self,
        n: int,
        now: datetime,
        warming_in_play: bool,
        more_room_at: datetime,
        states: Sequence[WarmupState],
    ) -> Part:
        policy = self._config.overflow
        if warming_in_play and policy == "hold":
            return Hold(n, more_room_at, "warming IPs are at their cap")
        if warming_in_play and policy == "smarthost":
            return Smarthost(n)
        warm = [ip for ip, st in zip(self.ips, states, strict=True) if st is WarmupState.WARM]
        pool = [ip for ip in warm if not self.is_down(str(ip.address), now)]
        if not pool:
            if policy == "smarthost":
                return Smarthost(n, RouteReason.POOL)
            if not warm:
                return Hold(n, next_window_start(now, self._zone), "no IP may send yet")
            return Hold(n, now + NO_POOL_RETRY, "every pool IP is down")
        reason = RouteReason.OVERFLOW if warming_in_play else RouteReason.POOL
        return Route(self._pick_weighted(pool), n, reason)

    def _pick_weighted(self, pool: Sequence[IPConfig]) -> IPConfig:
        """Smooth weighted round robin (as nginx): even spread, exact long-run ratios."""
        total = 0
        best: IPConfig | None = None
        for ip in pool:
            key = str(ip.address)
            self._rr_weights[key] = self._rr_weights.get(key, 0) + ip.weight
            total += ip.weight
            if best is None or self._rr_weights[key] > self._rr_weights[str(best.address)]:
                best = ip
        assert best is not None
        self._rr_weights[str(best.address)] -= total
        return best
