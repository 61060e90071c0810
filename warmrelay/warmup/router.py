"""Router: pure policy deciding which source IP carries which recipients.

For a delivery of n recipients it reserves what fits under each warming IP's
caps (atomically, through the counters), sends the rest to the warm pool
(smooth weighted round robin), a smarthost, or holds it, per the overflow
policy. Outcomes are types: a ``RoutePlan`` of ``Route`` parts (send k
recipients from this IP, for this reason), ``Smarthost`` parts and ``Hold``
parts (not now, retry at T). It also keeps the per-IP state that policy
depends on (pause, completion, results progression, throttling suspensions),
persisted through the counters' value store, which is its only I/O.

Mail that a warming IP does not take says why: each overflow part carries the
``Refusal`` of every warming IP that did not take it (an ``OverflowReason`` and
its numbers, e.g. ``127.0.0.2 cap 50/50``), shown in the delivery log line as
``reason=overflow(127.0.0.2 cap 50/50)``. The reasons are worked out by pure
functions (``unusable``, ``short_of``) from what routing already knows; the only
extra I/O is reading the counts of an IP with several caps when it ran short.
Each change of an IP's reason is logged once (INFO), not per recipient.
"""

from __future__ import annotations

import contextlib
import enum
import itertools
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import TypeVar

from warmrelay.config import Config, IPConfig
from warmrelay.errors import CounterError
from warmrelay.reputation.pairs import Pairs
from warmrelay.reputation.signals import PairCounts
from warmrelay.warmup.control import (
    COMPLETED,
    PAUSE,
    PROGRESS,
    STARTED,
    SUSPENDED,
    Completion,
    IPControl,
    Pause,
    Persisted,
    Progress,
    Record,
    Started,
    Suspension,
    advances,
    legacy_key,
    next_cooldown,
    suspension_record,
)
from warmrelay.warmup.counters import CounterKey, Counters, Limit
from warmrelay.warmup.counters.base import Change, update_value
from warmrelay.warmup.eligibility import Eligibility, Traffic
from warmrelay.warmup.plan import (
    Caps,
    WarmupPlan,
    WarmupState,
    WarmupStatus,
    caps_at,
    next_window_start,
    status_for_day,
)
from warmrelay.warmup.reservation import Ledger, Reservation

log = logging.getLogger("warmrelay.router")

T = TypeVar("T")


class RouteReason(enum.Enum):
    WARMUP = "warmup"  # sent from a warming IP, under its cap
    OVERFLOW = "overflow"  # a warming IP was full (or down), so a warm IP took it
    POOL = "pool"  # no warming IP in play: ordinary pool traffic


class OverflowReason(enum.Enum):
    """Why a warming IP did not take (all of) a delivery."""

    CAP = "cap"  # the day's cap is used up
    HOURLY_BUDGET = "hourly budget"  # sending_hours: the share of the cap released so far
    HOURLY_LIMIT = "hourly limit"  # a preset's published limit per clock hour
    PROVIDER_CAP = "provider cap"  # the cap for this mailbox provider
    OUTSIDE_HOURS = "outside sending hours"
    SUSPENDED = "suspended"  # the provider throttled the IP: cooldown
    BLOCKED = "blocked"  # the provider blamed the IP's reputation: cooldown
    PAUSED = "paused"  # by the operator (or preflight: listed on a blocklist)
    NOT_STARTED = "not started"  # warmup.start is still ahead
    IP_DOWN = "ip down"  # the address cannot be bound on this host
    NOT_ELIGIBLE = "not eligible"  # the warmup.eligible rules, or a DSN (null sender)
    REPUTATION = "reputation"  # progress: reputation paused the IP for this provider
    STORE_DOWN = "counters store down"  # no count, no send: never over a cap
    COMPLETED = "completed"  # declared warm by the operator: in the pool now
    WARM = "warmup done"  # past the schedule's last day: in the pool now


# Reasons that hold for one provider only; the others hold for the IP as a whole.
PER_PROVIDER = frozenset(
    {
        OverflowReason.PROVIDER_CAP,
        OverflowReason.SUSPENDED,
        OverflowReason.BLOCKED,
        OverflowReason.REPUTATION,
    }
)
# The IP is warm: it is part of the pool, so mail it does not take as a warming IP has
# not overflowed (logged once as a change, never shown on a delivery line)
JOINED_POOL = frozenset({OverflowReason.COMPLETED, OverflowReason.WARM})


@dataclass(frozen=True)
class Refusal:
    """A warming IP that did not take a delivery, and why: ``127.0.0.2 cap 50/50``."""

    address: str
    reason: OverflowReason
    detail: str = ""
    provider: str | None = None  # for PER_PROVIDER reasons

    @property
    def text(self) -> str:
        """The reason without the address: ``cap 50/50``."""
        return self.reason.value + (f" {self.detail}" if self.detail else "")

    def __str__(self) -> str:
        return f"{self.address} {self.text}"


def explain(reason: RouteReason, refusals: Sequence[Refusal]) -> str:
    """The ``reason=`` of a delivery log line: ``overflow(127.0.0.2 cap 50/50)``."""
    if not refusals:
        return reason.value
    return f"{reason.value}({', '.join(str(r) for r in refusals)})"


@dataclass(frozen=True)
class Route:
    """Send ``count`` recipients from ``source``. From a warming IP the route owns the
    ``reservation`` of those recipients under its caps (see warmrelay.reservation).
    Overflow and pool routes carry the ``refusals`` of the warming IPs that did not
    take them."""

    source: IPConfig
    count: int
    reason: RouteReason
    reservation: Reservation | None = None
    refusals: tuple[Refusal, ...] = ()

    @property
    def address(self) -> str:
        return self.source.text

    @property
    def log_reason(self) -> str:
        return explain(self.reason, self.refusals)


@dataclass(frozen=True)
class Smarthost:
    """Relay ``count`` recipients through the configured smarthost (overflow)."""

    count: int
    reason: RouteReason = RouteReason.OVERFLOW
    refusals: tuple[Refusal, ...] = ()

    @property
    def log_reason(self) -> str:
        return explain(self.reason, self.refusals)


@dataclass(frozen=True)
class Hold:
    """Not now: keep ``count`` recipients spooled and try again at ``retry_at``."""

    count: int
    retry_at: datetime
    why: str
    refusals: tuple[Refusal, ...] = ()


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


def _when(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def unusable(
    address: str,
    status: WarmupStatus,
    control: IPControl,
    start: date | None,
    admitted: bool,
    schedule_days: int,
) -> Refusal | None:
    """Why an IP with a warmup block is not a warming IP for this delivery at all (None:
    it is one). Pure: from the status and stored state routing already has."""
    if status.state is WarmupState.PAUSED:
        return Refusal(address, OverflowReason.PAUSED, f"since {control.paused_since}")
    if status.state is WarmupState.NOT_STARTED:
        return Refusal(address, OverflowReason.NOT_STARTED, f"(day 1: {start})")
    if status.state is WarmupState.WARM:
        if control.completed:
            on = control.completion.on
            return Refusal(address, OverflowReason.COMPLETED, f"on {on}" if on else "")
        return Refusal(address, OverflowReason.WARM, f"after {schedule_days} days")
    if not admitted:
        return Refusal(address, OverflowReason.NOT_ELIGIBLE)
    return None


def held_back(
    address: str,
    provider: str | None,
    down_until: datetime | None,
    suspension: Suspension | None,
) -> Refusal | None:
    """A warming IP that may not send now: down on this host, or suspended by a provider."""
    if down_until is not None:
        return Refusal(address, OverflowReason.IP_DOWN, f"until {_when(down_until)}")
    if suspension is not None:
        who = provider or "this provider"
        if suspension.blocked:
            detail = f"by {who} until {_when(suspension.until)}"
            return Refusal(address, OverflowReason.BLOCKED, detail, provider)
        detail = f"for {who} until {_when(suspension.until)}"
        return Refusal(address, OverflowReason.SUSPENDED, detail, provider)
    return None


def short_of(
    address: str, caps: Caps, counts: Sequence[int] | None, provider: str | None
) -> Refusal:
    """Which cap a warming IP ran short of (``counts``: the counts under ``caps.limits``
    after the reservation; None when they could not be read). Pure."""
    if caps.outside_hours:
        return Refusal(address, OverflowReason.OUTSIDE_HOURS)
    limits = caps.limits
    known = counts is not None
    used = list(counts) if counts is not None else [lim.cap for lim in limits]
    # the limit with the least room left; on a tie, the smallest cap
    i = min(range(len(limits)), key=lambda k: (limits[k].cap - used[k], limits[k].cap))
    lim = limits[i]
    numbers = f"{used[i] if known else '?'}/{lim.cap}"
    if lim.scope.startswith("provider:"):
        name = lim.scope.removeprefix("provider:")
        return Refusal(address, OverflowReason.PROVIDER_CAP, f"{name} {numbers}", provider)
    if lim.scope == "hour":
        return Refusal(address, OverflowReason.HOURLY_LIMIT, f"{numbers} this hour")
    if caps.released < 1.0:
        detail = f"{numbers} released of {caps.status.cap}"
        return Refusal(address, OverflowReason.HOURLY_BUDGET, detail)
    return Refusal(address, OverflowReason.CAP, numbers)


NO_POOL_RETRY = timedelta(minutes=1)
STORE_RETRY = timedelta(seconds=30)  # held mail retried this soon while the store is down
CONTROL_RELOAD_S = 30.0  # re-read pause/progress state so a fleet converges


class Router:
    """Policy state: round-robin weights, IPs marked down, and each IP's control state."""

    def __init__(
        self, config: Config, counters: Counters, signals: PairCounts | None = None
    ) -> None:
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
                self._plans[ip.text] = ip.warmup.plan()
                rules = ip.warmup.eligibility()
                if rules is not None:
                    self._eligible[ip.text] = rules
        self._control: dict[str, IPControl] = {ip.text: IPControl() for ip in config.ips}
        self._pending: list[tuple[str, Change]] = []  # changes the store failed to take, in order
        self._loaded_at = float("-inf")
        # the reason each IP (per provider for PER_PROVIDER ones) last did not take mail:
        # a change is logged once, not per recipient
        self._overflowing: dict[tuple[str, str], OverflowReason] = {}
        # progress: reputation: each (IP, provider) pair's day, judged by the controller
        reputation = any(ip.warmup and ip.warmup.progress == "reputation" for ip in config.ips)
        self.pairs: Pairs | None = Pairs(config, counters, signals) if reputation else None

    @property
    def ips(self) -> Sequence[IPConfig]:
        return self._config.ips

    def control(self, address: str) -> IPControl:
        return self._control[address]

    # -- status ------------------------------------------------------------------

    def start(self, ip: IPConfig) -> date | None:
        """Day 1 of a warming IP: ``warmup.start``, else the stored day of its first use
        (None: not used yet, or no warmup block)."""
        if ip.warmup is None:
            return None
        return self._control[ip.text].start(ip.warmup.start)

    def status(self, ip: IPConfig, now: datetime) -> WarmupStatus:
        """Where the IP stands: warmup day and cap, or warm, paused, not started. An IP
        whose start is its first use is on day 1 until it is used (it may be today)."""
        today = now.astimezone(self._zone).date()
        c = self._control[ip.text]
        start = self.start(ip)
        if c.paused_since is not None:
            day = c.day if c.day is not None else 0
            if ip.warmup is not None and ip.warmup.progress == "calendar":
                day = c.calendar_day(start, today) if start is not None else 0
            return WarmupStatus(WarmupState.PAUSED, day, 0, today.isoformat())
        if ip.warmup is None or c.completed:
            return WarmupStatus(WarmupState.WARM, 0, None, today.isoformat())
        if ip.warmup.progress == "results" and c.day is not None:
            day = c.day
        elif ip.warmup.progress == "reputation" and self.pairs is not None and start is not None:
            day = self.pairs.ip_day(ip) if today >= start else c.calendar_day(start, today)
        elif start is None:
            day = 1
        else:
            day = c.calendar_day(start, today)
        return status_for_day(ip.warmup.schedule, day, today)

    def caps(self, ip: IPConfig, now: datetime, provider: str | None = None) -> Caps | None:
        """The caps in force for a warming IP (None for an IP without a warmup block)."""
        plan = self._plans.get(ip.text)
        if plan is None:
            return None
        status = self.status(ip, now)
        if self.pairs is not None and ip.warmup is not None and ip.warmup.progress == "reputation":
            pair = self.pairs.label(provider)
            day = self.pairs.state(ip.text, pair).day
            return caps_at(plan, self._zone, now, provider, status, day, pair)
        return caps_at(plan, self._zone, now, provider, status)

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
        return CounterKey(ip.text, self.status(ip, now).window, scope)

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
        self._overflowing = dict(old._overflowing)  # a reload is not a change of reason
        for address, control in old._control.items():
            if address in self._control:  # shown until the next reload re-reads the store
                self._control[address] = control
        if self.pairs is not None and old.pairs is not None:
            self.pairs.carry_over(old.pairs)

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
                if self.pairs is not None:
                    await self.pairs.load()
                self._loaded_at = time.monotonic()
            today = now.astimezone(self._zone).date()
            for ip in self.ips:
                if ip.warmup is not None and ip.warmup.progress == "results":
                    await self._advance(ip, today)
            if self.pairs is not None:
                await self.pairs.refresh(now, self.start)
        except CounterError:
            pass  # the store is down: keep the state we have; warming IPs pause anyway

    async def load_control(self) -> None:
        """Read every IP's records now, writing nothing (``check-config``, ``schedule``);
        raises CounterError when the store cannot be read."""
        for address in self._control:
            self._control[address] = await self._load(address, migrate=False)
        if self.pairs is not None:
            await self.pairs.load()

    async def _load(self, address: str, *, migrate: bool = True) -> IPControl:
        """Every record of one IP (the blob of an earlier version is migrated first, or
        with ``migrate`` false only read)."""
        get = self._counters.get_value
        legacy = await get(legacy_key(address))
        if legacy is not None and not migrate:
            return IPControl.from_legacy(legacy)
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
            completion=COMPLETED.loads(await get(COMPLETED.key(address))),
            progress=PROGRESS.loads(await get(PROGRESS.key(address))),
            suspended=suspended,
            started=STARTED.loads(await get(STARTED.key(address))),
        )

    async def _migrate(self, address: str, text: str) -> None:
        """Earlier versions kept one JSON blob per IP: copy each fact into its own record
        where that record is still absent (never over a newer fact: records are never
        deleted, so absent means never set), then drop the blob."""
        old = IPControl.from_legacy(text)
        facts = [
            (PAUSE.key(address), PAUSE.dumps(old.pause) if old.pause != Pause() else None),
            (COMPLETED.key(address), COMPLETED.dumps(old.completion)),
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
        address = ip.text
        known = self._control[address]
        start = known.start(ip.warmup.start)
        if known.completed or start is None or today < start:
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
        address, schedule = ip.text, ip.warmup.schedule
        start = self.start(ip)
        assert start is not None  # _advance judges only IPs that have begun
        day, on = (progress.day, progress.on) if progress else (1, start)
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
        return await self._change_pause(address, lambda p: p.paused(today))

    async def resume(self, address: str, now: datetime) -> Persisted:
        """End the IP's pause, and with ``progress: reputation`` every pause the controller
        made for one of its providers (the operator's word ends both)."""
        today = now.astimezone(self._zone).date()
        outcome = await self._change_pause(address, lambda p: p.resumed(today))
        if self.pairs is not None:
            try:
                await self.pairs.resume(address, "the operator", now)
            except CounterError:
                return Persisted.PENDING
        return outcome

    async def complete(self, address: str, now: datetime) -> Persisted:
        today = now.astimezone(self._zone).date()
        return await self._change_completion(address, lambda c: c.completed(today))

    async def uncomplete(self, address: str, now: datetime) -> Persisted:
        """Undo ``complete``: the IP warms again at the day its progression says (stored as
        ``done: false``; records are never deleted)."""
        today = now.astimezone(self._zone).date()
        return await self._change_completion(address, lambda c: c.undone(today))

    async def _change_pause(self, address: str, change: Callable[[Pause], Pause]) -> Persisted:
        control = self._control[address]
        control.pause, outcome = await self._write(PAUSE, address, change, control.pause)
        return outcome

    async def _change_completion(
        self, address: str, change: Callable[[Completion], Completion]
    ) -> Persisted:
        control = self._control[address]
        control.completion, outcome = await self._write(
            COMPLETED, address, change, control.completion
        )
        return outcome

    async def _first_use(self, ip: IPConfig, now: datetime) -> None:
        """A warming IP without ``warmup.start`` routes mail for the first time: today is
        its day 1, stored once for every process and relay on the store (the first
        writer wins; everyone reads back what is stored)."""
        address = ip.text
        c = self._control[address]
        mine = Started(now.astimezone(self._zone).date(), c.pause.days)
        wrote = False

        def start(stored: Started | None) -> Started:
            nonlocal wrote
            wrote = stored is None  # (the last try decides: a retry may find it written)
            return stored if stored is not None else mine

        stored, _ = await self._write(STARTED, address, start, c.started)
        c.started = stored
        if wrote:  # said once, by the one process whose write stored it
            log.info(
                "%s: warmup day 1 is %s, its first use (no warmup.start configured)",
                address,
                mine.on,
                extra={"ip": address},
            )

    async def throttled(
        self,
        ip: IPConfig,
        provider: str | None,
        n: int,
        now: datetime,
        reason: str,
        *,
        cooldown: tuple[float, float] | None = None,
        blocked: bool | None = None,
    ) -> Suspension:
        """A provider said this IP sends too much: suspend it there for a cooldown that
        doubles on repeats (from the stored previous suspension, whichever process wrote
        it). Throttles while it is suspended there (the sends already under way when it
        began) change nothing; a block during a throttle's suspension replaces it.
        ``cooldown`` (base_s, max_s) replaces the configured one (reputation blocks);
        ``blocked`` (by default: a cooldown was given) records it as a block."""
        address, key = ip.text, provider or ""
        base_s, max_s = cooldown or self._config.throttle.cooldown(provider)
        is_block = cooldown is not None if blocked is None else blocked

        def suspend(previous: Suspension | None) -> Suspension | None:
            if (
                previous is not None and now < previous.until and (previous.blocked or not is_block)
            ):  # sends that were under way when it began: one episode, one cooldown
                return previous
            seconds = next_cooldown(previous, now, base_s, max_s)
            return Suspension(now + timedelta(seconds=seconds), seconds, reason, is_block)

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
        statuses = [self.status(ip, now) for ip in self.ips]  # once per delivery
        refusals: list[Refusal] = []  # why warming IPs did not take (all of) it
        warming: list[IPConfig] = []
        for ip, st in zip(self.ips, statuses, strict=True):
            if ip.warmup is None:
                continue
            address = ip.text
            why = unusable(
                address,
                st,
                self._control[address],
                self.start(ip),
                self._admits(ip, traffic),
                ip.warmup.schedule.days,
            )
            if why is None:
                warming.append(ip)
            else:
                self._note(why)
                if why.reason not in JOINED_POOL:
                    refusals.append(why)
        more_room_at = next_window_start(now, self._zone)
        if warming:
            start = next(self._rotation) % len(warming)
            for ip in warming[start:] + warming[:start]:
                if remaining == 0:
                    break
                address = ip.text
                down_until = self._down_until.get(address) if self.is_down(address, now) else None
                suspension = self.suspension(address, provider, now)
                stopped = held_back(address, provider, down_until, suspension)
                if stopped is None and self.pairs is not None:
                    stopped = self._pair_paused(ip, provider)
                if stopped is not None:
                    # held mail comes back when the IP may send again, not at midnight
                    if down_until is not None:
                        more_room_at = min(more_room_at, down_until)
                    if suspension is not None:
                        more_room_at = min(more_room_at, suspension.until)
                    refusals.append(self._note(stopped))
                    continue
                caps = self.caps(ip, now, provider)
                assert caps is not None
                more_room_at = min(more_room_at, caps.next_change)
                if caps.closed:  # a cap of 0 now: shown as used up, nothing asked of the store
                    full = [lim.cap for lim in caps.limits]
                    refusals.append(self._note(short_of(address, caps, full, provider)))
                    continue
                limits = [
                    Limit(CounterKey(address, lim.window, lim.scope), lim.cap)
                    for lim in caps.limits
                ]
                try:
                    granted = await self._counters.reserve(limits, remaining)
                except CounterError:  # no count, no send: never over a cap
                    more_room_at = min(more_room_at, now + STORE_RETRY)
                    refusals.append(self._note(Refusal(address, OverflowReason.STORE_DOWN)))
                    continue
                if granted:
                    keys = tuple(lim.key for lim in limits)
                    held = Reservation(self._counters, keys, granted, self.ledger)
                    parts.append(Route(ip, granted, RouteReason.WARMUP, held))
                    remaining -= granted
                    self._taking(address, provider)
                    if ip.warmup is not None and self.start(ip) is None:
                        await self._first_use(ip, now)
                if remaining:
                    counts = await self._counts_after(limits)
                    refusals.append(self._note(short_of(address, caps, counts, provider)))
        if remaining:
            states = [st.state for st in statuses]
            parts.append(
                self._overflow(remaining, now, bool(warming), more_room_at, states, refusals)
            )
        return RoutePlan(tuple(parts))

    def _pair_paused(self, ip: IPConfig, provider: str | None) -> Refusal | None:
        """``progress: reputation``: the controller paused this IP for this provider."""
        assert self.pairs is not None
        if ip.warmup is None or ip.warmup.progress != "reputation":
            return None
        pair = self.pairs.label(provider)
        st = self.pairs.state(ip.text, pair)
        if not st.paused:
            return None
        why = f" ({st.last.reason})" if st.last is not None else ""
        detail = f"paused for {pair} since {st.paused_since}{why}"
        return Refusal(ip.text, OverflowReason.REPUTATION, detail, provider)

    async def _counts_after(self, limits: Sequence[Limit]) -> list[int] | None:
        """The counts under ``limits`` once a reservation ran short of them. With one limit
        no I/O: a short grant filled it to its cap. None when the store cannot say."""
        if len(limits) == 1:
            return [limits[0].cap]
        try:
            return [await self._counters.get(lim.key) for lim in limits]
        except CounterError:
            return None

    def _note(self, refusal: Refusal) -> Refusal:
        """Log, once per change, that an IP stopped taking warmup mail and why."""
        if refusal.reason is OverflowReason.NOT_ELIGIBLE:  # a matter of the message
            return refusal
        scope = (refusal.provider or "") if refusal.reason in PER_PROVIDER else ""
        key = (refusal.address, scope)
        if self._overflowing.get(key) is refusal.reason:
            return refusal
        self._overflowing[key] = refusal.reason
        args: tuple[object, ...]
        if refusal.reason in JOINED_POOL:
            message = "%s is warm (%s): it takes pool traffic now"
            args = (refusal.address, refusal.text)
        else:
            where = {
                "pool": "the warm pool",
                "hold": "nowhere: it is held until there is room",
                "smarthost": "the smarthost",
            }[self._config.overflow]
            what = f"mail to {refusal.provider or 'this provider'}" if scope else "mail"
            message = "%s stops taking warmup %s (%s); it goes to %s"
            args = (refusal.address, what, refusal.text, where)
        log.info(
            message,
            *args,
            extra={"ip": refusal.address, "overflow": refusal.reason.value, "provider": scope},
        )
        return refusal

    def overflow_reasons(self, address: str) -> dict[str, str]:
        """Why ``address`` last did not take warmup mail, as logged: by provider ("" for the
        IP as a whole); empty while it takes mail (for /status)."""
        return {
            scope: reason.value
            for (ip, scope), reason in self._overflowing.items()
            if ip == address
        }

    def _taking(self, address: str, provider: str | None) -> None:
        """A warming IP took mail (for ``provider``): what stopped it is over."""
        for scope in dict.fromkeys(("", provider or "")):
            was = self._overflowing.pop((address, scope), None)
            if was is not None:
                log.info(
                    "%s takes warmup mail%s again (was: %s)",
                    address,
                    f" to {scope}" if scope else "",
                    was.value,
                    extra={"ip": address, "provider": scope},
                )

    def _admits(self, ip: IPConfig, traffic: Traffic | None) -> bool:
        """Eligibility rules; and never a DSN (null sender): bounces from a cold IP hurt it."""
        if traffic is not None and not traffic.sender:
            return False
        rules = self._eligible.get(ip.text)
        return rules is None or (traffic is not None and rules.admits(traffic))

    def _overflow(
        self,
        n: int,
        now: datetime,
        warming_in_play: bool,
        more_room_at: datetime,
        states: Sequence[WarmupState],
        refusals: Sequence[Refusal] = (),
    ) -> Part:
        policy = self._config.overflow
        why = tuple(refusals)
        if warming_in_play and policy == "hold":
            text = ", ".join(str(r) for r in why) or "warming IPs are at their cap"
            return Hold(n, more_room_at, text, why)
        if warming_in_play and policy == "smarthost":
            return Smarthost(n, RouteReason.OVERFLOW, why)
        warm = [ip for ip, st in zip(self.ips, states, strict=True) if st is WarmupState.WARM]
        pool = [ip for ip in warm if not self.is_down(ip.text, now)]
        if not pool:
            if policy == "smarthost":
                return Smarthost(n, RouteReason.POOL, why)
            if not warm:
                return Hold(n, next_window_start(now, self._zone), "no IP may send yet", why)
            return Hold(n, now + NO_POOL_RETRY, "every pool IP is down", why)
        reason = RouteReason.OVERFLOW if warming_in_play else RouteReason.POOL
        return Route(self._pick_weighted(pool), n, reason, refusals=why)

    def _pick_weighted(self, pool: Sequence[IPConfig]) -> IPConfig:
        """Smooth weighted round robin (as nginx): even spread, exact long-run ratios."""
        total = 0
        best: IPConfig | None = None
        for ip in pool:
            key = ip.text
            self._rr_weights[key] = self._rr_weights.get(key, 0) + ip.weight
            total += ip.weight
            if best is None or self._rr_weights[key] > self._rr_weights[str(best.address)]:
                best = ip
        assert best is not None
        self._rr_weights[str(best.address)] -= total
        return best
