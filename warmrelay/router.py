"""Router: pure policy deciding which source IP carries which recipients.

For a delivery of n recipients it reserves what fits under each warming IP's
cap (atomically, through the counters), sends the rest to the warm pool
(smooth weighted round robin) or holds it until the next window, per the
overflow policy. Outcomes are types: a ``RoutePlan`` of ``Route`` parts
(send k recipients from this IP, for this reason) and ``Hold`` parts (not
now, retry at T). The only I/O is the counters.
"""

from __future__ import annotations

import enum
import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from warmrelay.config import Config, IPConfig
from warmrelay.counters import CounterKey, Counters, Limit
from warmrelay.schedule import (
    Caps,
    WarmupPlan,
    WarmupState,
    WarmupStatus,
    caps_at,
    next_window_start,
    warmup_status,
)


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
class Hold:
    """Not now: keep ``count`` recipients spooled and try again at ``retry_at``."""

    count: int
    retry_at: datetime
    why: str


@dataclass(frozen=True)
class RoutePlan:
    parts: tuple[Route | Hold, ...]

    @property
    def routes(self) -> list[Route]:
        return [p for p in self.parts if isinstance(p, Route)]

    @property
    def holds(self) -> list[Hold]:
        return [p for p in self.parts if isinstance(p, Hold)]


NO_POOL_RETRY = timedelta(minutes=1)


class Router:
    """Holds the little state policy needs: round-robin weights and IPs marked down."""

    def __init__(self, config: Config, counters: Counters) -> None:
        self._config = config
        self._zone = config.zone
        self._counters = counters
        self._rr_weights: dict[str, int] = {}
        self._rotation = itertools.count()
        self._down_until: dict[str, datetime] = {}
        self._plans: dict[str, WarmupPlan] = {
            str(ip.address): ip.warmup.plan() for ip in config.ips if ip.warmup is not None
        }

    @property
    def ips(self) -> Sequence[IPConfig]:
        return self._config.ips

    def status(self, ip: IPConfig, now: datetime) -> WarmupStatus:
        """Warmup status; an IP without a warmup block is always warm."""
        if ip.warmup is None:
            window = now.astimezone(self._zone).date().isoformat()
            return WarmupStatus(WarmupState.WARM, 0, None, window)
        return warmup_status(ip.warmup.schedule, ip.warmup.start, self._zone, now)

    def caps(self, ip: IPConfig, now: datetime, provider: str | None = None) -> Caps | None:
        """The caps in force for a warming IP (None for an IP without a warmup block)."""
        plan = self._plans.get(str(ip.address))
        return None if plan is None else caps_at(plan, self._zone, now, provider)

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

    def counter_key(self, ip: IPConfig, now: datetime) -> CounterKey:
        return CounterKey(str(ip.address), self.status(ip, now).window)

    async def sent(self, ip: IPConfig, now: datetime) -> int:
        """Recipients counted against ``ip`` in the current window."""
        return await self._counters.get(self.counter_key(ip, now))

    async def route(self, n: int, now: datetime, provider: str | None = None) -> RoutePlan:
        """Split a delivery of ``n`` recipients (to ``provider``) into routes and holds."""
        parts: list[Route | Hold] = []
        remaining = n
        warming = [ip for ip in self.ips if self.status(ip, now).state is WarmupState.WARMING]
        more_room_at = next_window_start(now, self._zone)
        if warming:
            start = next(self._rotation) % len(warming)
            for ip in warming[start:] + warming[:start]:
                if remaining == 0:
                    break
                address = str(ip.address)
                if self.is_down(address, now):
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
                granted = await self._counters.reserve(limits, remaining)
                if granted:
                    keys = tuple(lim.key for lim in limits)
                    parts.append(Route(ip, granted, RouteReason.WARMUP, keys))
                    remaining -= granted
        if remaining:
            parts.append(self._overflow(remaining, now, bool(warming), more_room_at))
        return RoutePlan(tuple(parts))

    async def release(self, route: Route, n: int) -> None:
        """Give back reservations for recipients whose connection never opened."""
        if route.reserved and n:
            await self._counters.release(route.reserved, n)

    def _overflow(
        self, n: int, now: datetime, warming_in_play: bool, more_room_at: datetime
    ) -> Route | Hold:
        if warming_in_play and self._config.overflow == "hold":
            return Hold(n, more_room_at, "warming IPs are at their cap")
        pool = [
            ip
            for ip in self.ips
            if self.status(ip, now).state is WarmupState.WARM
            and not self.is_down(str(ip.address), now)
        ]
        if not pool:
            if not any(self.status(ip, now).state is WarmupState.WARM for ip in self.ips):
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
