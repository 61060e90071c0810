"""Warmup schedule: pure functions of (schedule, start date, time zone, now).

No I/O and no clock of its own: callers pass ``now`` so the relay, the
``schedule`` command and tests (with an injected clock) all see one rule.
Day 1 is the start date in the configured time zone; before it the IP sends
nothing; after the last day it is warm and joins the pool.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta
from zoneinfo import ZoneInfo


@dataclass(frozen=True)
class Schedule:
    """Daily caps in recipients, one per warmup day; ``hourly`` where a source publishes it."""

    name: str
    daily: tuple[int, ...]
    hourly: tuple[int, ...] | None = None
    source: str = ""

    @property
    def days(self) -> int:
        return len(self.daily)


def _hourly_preset(name: str, hourly: tuple[int, ...], source: str) -> Schedule:
    return Schedule(name, tuple(24 * h for h in hourly), hourly, source)


# The published tables, see ../shared/schedules/ and the README's "Warmup presets".
_SENDGRID_HOURLY = (
    20, 28, 39, 55, 77, 108, 151,
    211, 295, 413, 579, 810, 1000, 1587,
    2222, 3111, 4356, 6098, 8583, 11953, 16734,
    23427, 32798, 45917, 64284, 89998, 125997, 176395,
    246953, 345735, 484029, 677640, 948696, 1328175, 1859444,
    2603222, 3644511, 5102316, 7143242, 10000539, 14000754, 19601056,
)  # fmt: skip
_SENDGRID_MANUAL = (
    50, 100, 500, 1000, 5000, 10000, 20000, 40000, 70000,
    100000, 150000, 250000, 400000, 600000, 1000000, 2000000, 4000000,
)  # fmt: skip
_SPARKPOST = (
    200, 500, 1000, 2000, 5000, 10000, 20000, 40000,
    50000, 75000, 100000, 150000, 200000, 250000, 325000,
    400000, 500000, 600000, 750000, 1000000, 1250000, 1750000,
    2000000, 3000000, 4250000, 5000000, 6000000, 7500000, 10000000,
)  # fmt: skip
_MAILTRAP = (
    300, 390, 510, 660, 860, 1100, 1400, 1900, 2400, 3200, 4100,
    5400, 7000, 9100, 11800, 15400, 20000, 26000, 33700, 43900, 57000,
)  # fmt: skip

_MAILTRAP_HOURLY = (
    60, 80, 100, 130, 170, 220, 290, 380, 490, 640, 830,
    1100, 1400, 1800, 2400, 3100, 4000, 5200, 6700, 8800, 11400,
)  # fmt: skip

PRESETS: dict[str, Schedule] = {
    "sendgrid": _hourly_preset(
        "sendgrid", _SENDGRID_HOURLY, "SendGrid automated IP warmup (hourly limit x 24)"
    ),
    "sendgrid-manual": Schedule(
        "sendgrid-manual", _SENDGRID_MANUAL, None, "SendGrid IPWarmupSchedule.pdf (daily)"
    ),
    "sparkpost": Schedule("sparkpost", _SPARKPOST, None, "SparkPost Auto IP Warmup stages"),
    "mailtrap": Schedule(
        "mailtrap", _MAILTRAP, _MAILTRAP_HOURLY, "Mailtrap IP warmup (daily and max per hour)"
    ),
}

MAX_DAYS = 3650  # a generated ramp longer than ten years is a mistake


def ramp(start: int, growth: float, target: int, name: str = "ramp") -> Schedule:
    """Daily caps start, start*growth, ... until the target (the last day's cap), then warm."""
    if start < 1 or growth <= 1.0 or target < start:
        raise ValueError("a ramp needs start >= 1, growth > 1 and target >= start")
    caps: list[int] = []
    value = float(start)
    while value < target and len(caps) < MAX_DAYS:
        caps.append(round(value))
        value *= growth
    caps.append(target)
    return Schedule(name, tuple(caps), None, f"generated: start {start}, x{growth}/day")


def extend_to_target(base: Schedule, target: int) -> Schedule:
    """A daily schedule that doubles after its last day until ``target`` (SendGrid manual)."""
    caps: list[int] = []
    for cap in base.daily:
        if cap >= target:
            break
        caps.append(cap)
    value = base.daily[-1] * 2 if len(caps) == base.days else target
    while value < target and len(caps) < MAX_DAYS:
        caps.append(value)
        value *= 2
    caps.append(target)
    return Schedule(base.name, tuple(caps), None, base.source + f", doubling up to {target}")


class WarmupState(enum.Enum):
    NOT_STARTED = "not_started"
    WARMING = "warming"
    WARM = "warm"
    PAUSED = "paused"  # by the operator: sends nothing, does not advance


@dataclass(frozen=True)
class WarmupStatus:
    """Where an IP stands in its warmup at one instant."""

    state: WarmupState
    day: int  # warmup day (1 = start date); <= 0 before the start
    cap: int | None  # recipients allowed in this window; None = no cap (warm)
    window: str  # counter window key: the local date, ISO format


def local_date(now: datetime, zone: ZoneInfo) -> date:
    """The calendar date of ``now`` in the configured zone (a window's identity)."""
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    return now.astimezone(zone).date()


def window_key(now: datetime, zone: ZoneInfo) -> str:
    return local_date(now, zone).isoformat()


def next_window_start(now: datetime, zone: ZoneInfo) -> datetime:
    """The next local midnight, as an aware datetime (DST-safe via zoneinfo)."""
    tomorrow = local_date(now, zone) + timedelta(days=1)
    return datetime.combine(tomorrow, time(0), tzinfo=zone)


def status_on(schedule: Schedule, start: date, day_date: date) -> WarmupStatus:
    """Calendar progression: the warmup day is the number of days since the start date."""
    return status_for_day(schedule, (day_date - start).days + 1, day_date)


def status_for_day(schedule: Schedule, day: int, day_date: date) -> WarmupStatus:
    if day < 1:
        return WarmupStatus(WarmupState.NOT_STARTED, day, 0, day_date.isoformat())
    if day > schedule.days:
        return WarmupStatus(WarmupState.WARM, day, None, day_date.isoformat())
    return WarmupStatus(WarmupState.WARMING, day, schedule.daily[day - 1], day_date.isoformat())


def warmup_status(schedule: Schedule, start: date, zone: ZoneInfo, now: datetime) -> WarmupStatus:
    return status_on(schedule, start, local_date(now, zone))


@dataclass(frozen=True)
class SendingHours:
    """Local time of day when a warming IP may send; its cap is spread evenly over it.

    Minutes since local midnight, ``start`` < ``end`` <= 1440 ("24:00").
    """

    start_min: int
    end_min: int

    @classmethod
    def parse(cls, text: str) -> SendingHours:
        """'08:00-20:00' -> SendingHours(480, 1200)."""

        def minutes(part: str) -> int:
            hh, sep, mm = part.strip().partition(":")
            if not sep or not hh.isdigit() or not mm.isdigit() or int(mm) > 59:
                raise ValueError(f"{part.strip()!r} is not HH:MM")
            value = int(hh) * 60 + int(mm)
            if value > 1440:
                raise ValueError(f"{part.strip()!r} is past 24:00")
            return value

        first, sep, second = text.partition("-")
        if not sep:
            raise ValueError(f"{text!r} is not a range like '08:00-20:00'")
        start, end = minutes(first), minutes(second)
        if start >= end:
            raise ValueError(f"{text!r}: the end must be after the start (same day)")
        return cls(start, end)

    @property
    def slots(self) -> int:
        return math.ceil((self.end_min - self.start_min) / 60)

    def slot(self, local: datetime) -> int | None:
        """0-based hour slot of ``local`` in the window, None outside it."""
        minute = local.hour * 60 + local.minute
        if not self.start_min <= minute < self.end_min:
            return None
        return (minute - self.start_min) // 60

    def __str__(self) -> str:
        return (
            f"{self.start_min // 60:02d}:{self.start_min % 60:02d}-"
            f"{self.end_min // 60:02d}:{self.end_min % 60:02d}"
        )


@dataclass(frozen=True)
class ProviderCap:
    """A warming IP's cap for one mailbox provider: a share of the day's cap, or its own."""

    share: float | None = None
    schedule: Schedule | None = None

    def daily_cap(self, day: int, ip_cap: int) -> int:
        if self.schedule is not None:
            if day > self.schedule.days:
                return ip_cap
            return min(ip_cap, self.schedule.daily[day - 1])
        assert self.share is not None
        return math.floor(ip_cap * self.share)


@dataclass(frozen=True)
class WarmupPlan:
    """Everything that decides a warming IP's caps: pure data, no clock."""

    schedule: Schedule
    start: date | None  # None: the day the relay first routes mail from the IP (stored)
    sending_hours: SendingHours | None = None
    providers: Mapping[str, ProviderCap] = field(default_factory=dict)


@dataclass(frozen=True)
class CapLimit:
    """One cap in force now: counted under (window, scope)."""

    window: str
    scope: str
    cap: int


@dataclass(frozen=True)
class Caps:
    """The caps in force for a warming IP at one instant, and when they next grow."""

    status: WarmupStatus
    limits: tuple[CapLimit, ...]
    next_change: datetime  # when more budget may appear (next hour or next day)
    released: float = 1.0  # share of the day's cap released so far (sending_hours smoothing)
    outside_hours: bool = False  # sending_hours say not now: the IP sends nothing

    @property
    def closed(self) -> bool:
        return any(lim.cap <= 0 for lim in self.limits)


def pair_cap(plan: WarmupPlan, provider: str | None, day: int) -> int | None:
    """``progress: reputation``: a provider's day cap at its own warmup ``day`` (the
    schedule's cap of that day, narrowed by its configured share or schedule); None past
    the schedule's end (warm for that provider)."""
    if day > plan.schedule.days:
        return None
    day_cap = plan.schedule.daily[day - 1]
    own = plan.providers.get(provider) if provider else None
    return own.daily_cap(day, day_cap) if own else day_cap


def caps_at(
    plan: WarmupPlan,
    zone: ZoneInfo,
    now: datetime,
    provider: str | None,
    status: WarmupStatus | None = None,
    provider_day: int | None = None,
    pair: str | None = None,
) -> Caps:
    """The caps a warming IP must respect at ``now`` for mail to ``provider``.

    - the day's cap; with ``sending_hours`` it is released hour by hour: by the
      end of slot k (of H) at most floor(cap * (k+1) / H) may have been sent
      today. An hour's unused budget thus carries into the later hours of the
      same day, never into the next day (the day counter starts at 0).
    - a published hourly limit (sendgrid, mailtrap presets) per clock hour;
    - a per-provider cap, smoothed the same way as the day's cap.

    ``provider_day`` (``progress: reputation``): the provider's own warmup day, which sets
    its cap (its configured share or schedule at that day, else the schedule's cap of that
    day) under the counter scope of ``pair`` (its provider, or "other"); past the
    schedule's end the provider is warm and has no cap of its own.
    """
    local = now.astimezone(zone)
    if status is None:  # without a start (first use), today would be day 1
        status = status_on(plan.schedule, plan.start or local.date(), local.date())
    next_day = next_window_start(now, zone)
    next_hour = (local.replace(minute=0, second=0, microsecond=0) + timedelta(hours=1)).astimezone(
        zone
    )
    if status.state is not WarmupState.WARMING:
        return Caps(status, (), next_day)
    assert status.cap is not None
    fraction = 1.0
    hourly = plan.schedule.hourly is not None
    if plan.sending_hours is not None:
        slot = plan.sending_hours.slot(local)
        if slot is None:
            closed = (CapLimit(status.window, "all", 0),)
            return Caps(status, closed, next_hour, 0.0, outside_hours=True)
        fraction = (slot + 1) / plan.sending_hours.slots
    limits = [CapLimit(status.window, "all", math.floor(status.cap * fraction))]
    if plan.schedule.hourly is not None:
        hour = f"{status.window}T{local.hour:02d}"
        limits.append(CapLimit(hour, "hour", plan.schedule.hourly[status.day - 1]))
    provider_cap = plan.providers.get(provider) if provider else None
    if provider_day is not None:
        pcap = pair_cap(plan, provider, provider_day)
        if pcap is not None:
            scope = f"provider:{pair or provider}"
            limits.append(CapLimit(status.window, scope, math.floor(pcap * fraction)))
    elif provider_cap is not None:
        pcap = provider_cap.daily_cap(status.day, status.cap)
        limits.append(CapLimit(status.window, f"provider:{provider}", math.floor(pcap * fraction)))
    smoothed = hourly or plan.sending_hours is not None
    return Caps(status, tuple(limits), next_hour if smoothed else next_day, fraction)


@dataclass(frozen=True)
class PlanRow:
    date: date
    status: WarmupStatus
    today: bool


def plan(schedule: Schedule, start: date, today: date, days: int) -> list[PlanRow]:
    """The schedule from ``today`` on, ``days`` rows, for the ``schedule`` command."""
    return [
        PlanRow(d, status_on(schedule, start, d), d == today)
        for d in (today + timedelta(days=i) for i in range(days))
    ]
