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
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta

from warmrelay.config import Config, IPConfig
from warmrelay.control import IPControl, Suspension, advances, next_cooldown
from warmrelay.counters import CounterKey, Counters, Limit
from warmrelay.eligibility import Eligibility, Traffic
from warmrelay.errors import CounterError
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


class RouteReason(enum.Enum):
    WARMUP = "warmup"  # sent from a warming IP, under its cap
    OVERFLOW = "overflow"  # a warming IP was full (or down), so a warm IP took it
    POOL = "pool"  # no warming IP in play: ordinary pool traffic


@dataclass(frozen=True)
class Route:
    """Send ``count`` recipients from ``source``; ``reserved`` is released if it never connects."""

    source: IPConfig
    count: int
    reason: RouteReason
    reserved: tuple[CounterKey, ...] = ()

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
        self._rr_weights = dict(old._rr_weights)

    def reload_soon(self) -> None:
        """Re-read control state at the next routing (a supervisor changed it: SIGUSR1)."""
        self._loaded_at = float("-inf")

    async def refresh(self, now: datetime) -> None:
        """Reload control state now and then, and advance ``progress: results`` IPs."""
        try:
            if time.monotonic() - self._loaded_at >= CONTROL_RELOAD_S:
                for address in self._control:
                    text = await self._counters.get_value(f"ip:{address}")
                    self._control[address] = IPControl.loads(text)
                self._loaded_at = time.monotonic()
            today = now.astimezone(self._zone).date()
            for ip in self.ips:
                if ip.warmup is not None and ip.warmup.progress == "results":
                    await self._advance(ip, today)
        except CounterError:
            pass  # the store is down: keep the state we have; warming IPs pause anyway

    async def _advance(self, ip: IPConfig, today: date) -> None:
        """Judge each finished day: the next warmup day begins only after a day that used
        its cap (>= progress_min_use) with little throttling; other days repeat."""
        assert ip.warmup is not None
        address, c = str(ip.address), self._control[str(ip.address)]
        if c.completed or today < ip.warmup.start:
            return
        changed = False
        if c.day is None or c.day_date is None:
            c.day, c.day_date, changed = 1, ip.warmup.start, True
        schedule = ip.warmup.schedule
        while c.day_date < today and c.day <= schedule.days:
            window = c.day_date.isoformat()
            sent = await self._counters.get(CounterKey(address, window))
            throttled = await self._counters.get(CounterKey(address, window, "throttled"))
            if advances(
                sent,
                throttled,
                schedule.daily[c.day - 1],
                ip.warmup.progress_min_use,
                ip.warmup.progress_max_throttle,
            ):
                c.day += 1
            c.day_date += timedelta(days=1)
            changed = True
        if c.day_date < today:  # warm: nothing left to judge
            c.day_date, changed = today, True
        if changed:
            await self._save(address)

    async def _save(self, address: str) -> None:
        try:
            await self._counters.set_value(f"ip:{address}", self._control[address].dumps())
        except CounterError as exc:  # kept in memory; written again with the next change
            log.error("cannot persist the state of %s: %s", address, exc)

    async def pause(self, address: str, now: datetime) -> None:
        self._control[address].pause(now.astimezone(self._zone).date())
        await self._save(address)

    async def resume(self, address: str, now: datetime) -> None:
        self._control[address].resume(now.astimezone(self._zone).date())
        await self._save(address)

    async def complete(self, address: str, now: datetime) -> None:
        self._control[address].completed = True
        await self._save(address)

    async def throttled(
        self, ip: IPConfig, provider: str | None, n: int, now: datetime, reason: str
    ) -> Suspension:
        """A provider said this IP sends too much: suspend it there for a (growing) cooldown."""
        address, key = str(ip.address), provider or ""
        c = self._control[address]
        base_s, max_s = self._config.throttle.cooldown(provider)
        cooldown = next_cooldown(c.suspended.get(key), now, base_s, max_s)
        c.suspended[key] = Suspension(now + timedelta(seconds=cooldown), cooldown, reason)
        throttle_key = self.counter_key(ip, now, "throttled")
        with contextlib.suppress(CounterError):  # progress may miss it; the suspension holds
            await self._counters.reserve([Limit(throttle_key, 2**62)], n)
        await self._save(address)
        return c.suspended[key]

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
                if self.is_down(address, now) or self.suspension(address, provider, now):
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
                    parts.append(Route(ip, granted, RouteReason.WARMUP, keys))
                    remaining -= granted
        if remaining:
            parts.append(self._overflow(remaining, now, bool(warming), more_room_at, states))
        return RoutePlan(tuple(parts))

    def _admits(self, ip: IPConfig, traffic: Traffic | None) -> bool:
        rules = self._eligible.get(str(ip.address))
        return rules is None or (traffic is not None and rules.admits(traffic))

    async def release(self, route: Route, n: int) -> None:
        """Give back reservations for recipients whose connection never opened."""
        if route.reserved and n:
            try:
                await self._counters.release(route.reserved, n)
            except CounterError as exc:  # the count stays high: safe, never over the cap
                log.error("cannot release %d reserved for %s: %s", n, route.address, exc)

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
