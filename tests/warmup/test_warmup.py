"""Warmup schedule: days, caps, time zones, presets pinned to the published tables."""

from __future__ import annotations

from datetime import UTC, date, datetime
from zoneinfo import ZoneInfo

import pytest

from warmrelay.warmup.plan import (
    PRESETS,
    Schedule,
    WarmupState,
    next_window_start,
    plan,
    warmup_status,
    window_key,
)

SCHED = Schedule("custom", (50, 100, 500))
START = date(2026, 11, 27)


def at(text: str, zone: str = "UTC") -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=ZoneInfo(zone))


@pytest.mark.parametrize(
    ("now", "state", "day", "cap"),
    [
        ("2026-11-26T23:59:59", WarmupState.NOT_STARTED, 0, 0),
        ("2026-11-27T00:00:00", WarmupState.WARMING, 1, 50),
        ("2026-11-28T12:00:00", WarmupState.WARMING, 2, 100),
        ("2026-11-29T23:59:59", WarmupState.WARMING, 3, 500),  # the last day
        ("2026-11-30T00:00:00", WarmupState.WARM, 4, None),  # warm: joins the pool
    ],
)
def test_day_and_cap(now: str, state: WarmupState, day: int, cap: int | None) -> None:
    st = warmup_status(SCHED, START, ZoneInfo("UTC"), at(now))
    assert (st.state, st.day, st.cap) == (state, day, cap)


def test_future_start_sends_nothing() -> None:
    st = warmup_status(SCHED, date(2027, 1, 1), ZoneInfo("UTC"), at("2026-11-28T12:00:00"))
    assert st.state is WarmupState.NOT_STARTED
    assert st.cap == 0


def test_day_boundary_in_local_time_zone() -> None:
    """23:59 and 00:01 in New York are different warmup days, though the same UTC date."""
    ny = ZoneInfo("America/New_York")
    before = at("2026-11-27T23:59:00", "America/New_York")
    after = at("2026-11-28T00:01:00", "America/New_York")
    assert before.astimezone(UTC).date() == after.astimezone(UTC).date()
    s1, s2 = (warmup_status(SCHED, START, ny, t) for t in (before, after))
    assert (s1.day, s1.cap, s2.day, s2.cap) == (1, 50, 2, 100)
    assert window_key(before, ny) != window_key(after, ny)
    assert next_window_start(before, ny) == at("2026-11-28T00:00:00", "America/New_York")


def test_next_window_across_dst_change() -> None:
    berlin = ZoneInfo("Europe/Berlin")
    nxt = next_window_start(at("2026-03-28T12:00:00", "Europe/Berlin"), berlin)
    assert nxt.astimezone(UTC) == datetime(2026, 3, 28, 23, 0, tzinfo=UTC)


def test_naive_now_is_refused() -> None:
    with pytest.raises(ValueError, match="aware"):
        warmup_status(SCHED, START, ZoneInfo("UTC"), datetime(2026, 11, 28))


@pytest.mark.parametrize(
    ("name", "days", "first", "middle_day", "middle", "last"),
    [
        ("sendgrid", 42, 20 * 24, 13, 1000 * 24, 19601056 * 24),
        ("sendgrid-manual", 17, 50, 9, 70000, 4000000),
        ("sparkpost", 29, 200, 15, 325000, 10000000),
        ("mailtrap", 21, 300, 11, 4100, 57000),
    ],
)
def test_presets_match_published_tables(
    name: str, days: int, first: int, middle_day: int, middle: int, last: int
) -> None:
    preset = PRESETS[name]
    assert preset.days == days
    assert preset.daily[0] == first
    assert preset.daily[middle_day - 1] == middle
    assert preset.daily[-1] == last


def test_sendgrid_keeps_published_hourly_limits() -> None:
    hourly = PRESETS["sendgrid"].hourly
    assert hourly is not None
    assert (hourly[0], hourly[12], hourly[-1]) == (20, 1000, 19601056)


def test_plan_marks_today_and_turns_warm() -> None:
    rows = plan(SCHED, START, date(2026, 11, 28), 4)
    assert [r.today for r in rows] == [True, False, False, False]
    assert [r.status.cap for r in rows] == [100, 500, None, None]
    assert rows[2].status.state is WarmupState.WARM
