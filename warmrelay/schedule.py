"""Warmup schedule: pure functions of (schedule, start date, time zone, now).

No I/O and no clock of its own: callers pass ``now`` so the relay, the
``schedule`` command and tests (with an injected clock) all see one rule.
Day 1 is the start date in the configured time zone; before it the IP sends
nothing; after the last day it is warm and joins the pool.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
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

PRESETS: dict[str, Schedule] = {
    "sendgrid": _hourly_preset(
        "sendgrid", _SENDGRID_HOURLY, "SendGrid automated IP warmup (hourly limit x 24)"
    ),
    "sendgrid-manual": Schedule(
        "sendgrid-manual", _SENDGRID_MANUAL, None, "SendGrid IPWarmupSchedule.pdf (daily)"
    ),
    "sparkpost": Schedule("sparkpost", _SPARKPOST, None, "SparkPost Auto IP Warmup stages"),
    "mailtrap": Schedule("mailtrap", _MAILTRAP, None, "Mailtrap IP warmup (daily)"),
}


class WarmupState(enum.Enum):
    NOT_STARTED = "not_started"
    WARMING = "warming"
    WARM = "warm"


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
    day = (day_date - start).days + 1
    if day < 1:
        return WarmupStatus(WarmupState.NOT_STARTED, day, 0, day_date.isoformat())
    if day > schedule.days:
        return WarmupStatus(WarmupState.WARM, day, None, day_date.isoformat())
    return WarmupStatus(WarmupState.WARMING, day, schedule.daily[day - 1], day_date.isoformat())


def warmup_status(schedule: Schedule, start: date, zone: ZoneInfo, now: datetime) -> WarmupStatus:
    return status_on(schedule, start, local_date(now, zone))


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
