"""Why mail overflowed: every overflow part names each warming IP that did not take it and
why (an OverflowReason with its numbers), the delivery log line shows it, and a change of
reason is logged once per IP, not per recipient."""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from support.redisserver import free_port
from support.relay import relay_config, running, send
from support.sink import Sink

from warmrelay.config import Config, parse_config
from warmrelay.warmup.counters import MemoryCounters, SqliteCounters
from warmrelay.warmup.counters.redis import RedisCounters
from warmrelay.warmup.eligibility import Traffic
from warmrelay.warmup.router import (
    Hold,
    OverflowReason,
    Refusal,
    Route,
    RoutePlan,
    Router,
    RouteReason,
    Smarthost,
)

NOW = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)
WARMING = "127.0.0.2"


def config(warmup: dict[str, Any] | None = None, **over: Any) -> Config:
    doc: dict[str, Any] = {
        "ips": [
            {
                "address": WARMING,
                "helo": "a.example.test",
                "warmup": {"start": "2026-11-27", "schedule": [3, 5], **(warmup or {})},
            },
            {"address": "127.0.0.3", "helo": "b.example.test"},
        ]
    }
    doc.update(over)
    return parse_config(doc)


def overflow(plan: RoutePlan) -> Route | Smarthost | Hold:
    (part,) = [p for p in plan.parts if not (isinstance(p, Route) and p.reservation)]
    return part


def why(plan: RoutePlan) -> list[tuple[OverflowReason, str]]:
    return [(r.reason, r.detail) for r in overflow(plan).refusals]


async def test_the_day_cap_names_its_numbers_on_the_overflow_route() -> None:
    router = Router(config(), MemoryCounters())
    plan = await router.route(5, NOW)
    warmup, rest = plan.parts
    assert isinstance(warmup, Route) and warmup.log_reason == "warmup"
    assert isinstance(rest, Route) and rest.reason is RouteReason.OVERFLOW
    assert rest.refusals == (Refusal(WARMING, OverflowReason.CAP, "3/3"),)
    assert rest.log_reason == "overflow(127.0.0.2 cap 3/3)"


async def test_a_provider_cap_is_told_from_the_day_cap(tmp_path: Path) -> None:
    counters = SqliteCounters(tmp_path / "c.sqlite3")  # several caps: their counts are read
    router = Router(config({"providers": {"gmail": {"share": 0.34}}}), counters)
    plan = await router.route(3, NOW, "gmail")
    assert why(plan) == [(OverflowReason.PROVIDER_CAP, "gmail 1/1")]
    assert overflow(plan).refusals[0].provider == "gmail"
    plan = await router.route(3, NOW, "yahoo")  # 2 left of the day's 3
    assert why(plan) == [(OverflowReason.CAP, "3/3")]
    await counters.close()


async def test_sending_hours_outside_and_the_budget_released_so_far() -> None:
    router = Router(config({"sending_hours": "08:00-12:00", "schedule": [8]}), MemoryCounters())
    early = datetime(2026, 11, 27, 4, 42, tzinfo=UTC)
    assert why(await router.route(1, early)) == [(OverflowReason.OUTSIDE_HOURS, "")]
    nine = datetime(2026, 11, 27, 9, 0, tzinfo=UTC)  # 2 of 4 hours: 4 of 8 released
    plan = await router.route(6, nine)
    assert plan.parts[0].count == 4
    assert why(plan) == [(OverflowReason.HOURLY_BUDGET, "4/4 released of 8")]


async def test_a_published_hourly_limit() -> None:
    router = Router(config({"schedule": "sendgrid"}), MemoryCounters())  # day 1: 20 an hour
    plan = await router.route(25, NOW)
    assert plan.parts[0].count == 20
    assert why(plan) == [(OverflowReason.HOURLY_LIMIT, "20/20 this hour")]


async def test_paused_not_started_and_not_eligible_go_to_the_pool_saying_why() -> None:
    router = Router(config(), MemoryCounters())
    await router.pause(WARMING, NOW)
    plan = await router.route(1, NOW)
    assert overflow(plan).reason is RouteReason.POOL
    assert why(plan) == [(OverflowReason.PAUSED, "since 2026-11-27")]
    assert overflow(plan).log_reason == "pool(127.0.0.2 paused since 2026-11-27)"

    ahead = Router(config({"start": "2026-12-01"}), MemoryCounters())
    assert why(await ahead.route(1, NOW)) == [(OverflowReason.NOT_STARTED, "(day 1: 2026-12-01)")]

    rules = Router(config({"eligible": {"header": "X-Warmup: engaged"}}), MemoryCounters())
    plan = await rules.route(1, NOW, None, Traffic("a@s.test", "x.test", {}))
    assert why(plan) == [(OverflowReason.NOT_ELIGIBLE, "")]
    dsn = await Router(config(), MemoryCounters()).route(1, NOW, None, Traffic("", "x.test", {}))
    assert why(dsn) == [(OverflowReason.NOT_ELIGIBLE, "")]


async def test_a_warm_ip_is_pool_traffic_without_a_reason() -> None:
    router = Router(config(), MemoryCounters())
    await router.complete(WARMING, NOW)
    plan = await router.route(4, NOW)
    assert [(p.count, p.log_reason) for p in plan.parts if isinstance(p, Route)] == [(4, "pool")]
    done = Router(config(), MemoryCounters())
    later = NOW + timedelta(days=2)  # past the 2-day schedule
    assert [p.log_reason for p in (await done.route(1, later)).routes] == ["pool"]


async def test_suspended_blocked_and_down() -> None:
    router = Router(config({"schedule": [50]}), MemoryCounters())
    ip = router.ips[0]
    await router.throttled(ip, "gmail", 1, NOW, "421-4.7.28 too much")
    await router.throttled(ip, "yahoo", 1, NOW, "553 5.7.1 [BL21]", cooldown=(3600, 7200))
    assert why(await router.route(1, NOW, "gmail")) == [
        (OverflowReason.SUSPENDED, "for gmail until 2026-11-27T13:00:00Z")
    ]
    assert why(await router.route(1, NOW, "yahoo")) == [
        (OverflowReason.BLOCKED, "by yahoo until 2026-11-27T13:00:00Z")
    ]
    router.mark_down(WARMING, NOW + timedelta(minutes=5))
    assert why(await router.route(1, NOW)) == [
        (OverflowReason.IP_DOWN, "until 2026-11-27T12:05:00Z")
    ]


async def test_a_store_that_does_not_answer() -> None:
    counters = RedisCounters(f"redis://127.0.0.1:{free_port()}/0")  # nobody listens there
    router = Router(config(), counters)
    plan = await router.route(2, NOW)
    assert why(plan) == [(OverflowReason.STORE_DOWN, "")]
    assert overflow(plan).log_reason == "overflow(127.0.0.2 counters store down)"
    await counters.close()


async def test_hold_and_smarthost_carry_the_reasons_too() -> None:
    held = Router(config(overflow="hold"), MemoryCounters())
    plan = await held.route(5, NOW)
    hold = overflow(plan)
    assert isinstance(hold, Hold) and hold.why == "127.0.0.2 cap 3/3"
    doc: dict[str, Any] = {"overflow": "smarthost", "smarthost": {"host": "127.0.0.1:2599"}}
    relayed = Router(config(**doc), MemoryCounters())
    part = overflow(await relayed.route(5, NOW))
    assert isinstance(part, Smarthost) and part.log_reason == "overflow(127.0.0.2 cap 3/3)"


async def test_a_change_of_reason_is_logged_once_per_ip(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="warmrelay.router")
    router = Router(config({"providers": {"gmail": {"share": 0.34}}}), MemoryCounters())
    for _ in range(5):
        await router.route(4, NOW)  # the day's cap: 3, then nothing
    for _ in range(3):
        await router.route(1, NOW, "gmail")
    assert router.overflow_reasons(WARMING) == {"": "cap"}
    await router.route(1, NOW + timedelta(days=1))  # day 2: room again
    assert router.overflow_reasons(WARMING) == {}
    lines = [r.getMessage() for r in caplog.records if r.name == "warmrelay.router"]
    assert lines == [
        "127.0.0.2 stops taking warmup mail (cap 3/3); it goes to the warm pool",
        "127.0.0.2 takes warmup mail again (was: cap)",
    ]
    # JSON logs get the fields
    first = next(r for r in caplog.records if r.name == "warmrelay.router")
    assert (first.ip, first.overflow) == (WARMING, "cap")  # type: ignore[attr-defined]
    caplog.clear()
    for _ in range(3):
        await router.route(1, NOW + timedelta(days=1), "gmail")  # 1 of gmail's 1, then full
    assert router.overflow_reasons(WARMING) == {"gmail": "provider cap"}
    lines = [r.getMessage() for r in caplog.records if r.name == "warmrelay.router"]
    assert lines == [
        "127.0.0.2 stops taking warmup mail to gmail (provider cap gmail 1/1); "
        "it goes to the warm pool"
    ]


class LogWatch(logging.Handler):
    """Records of one logger, and an event for each (waiting on a line, not a sleep)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[logging.LogRecord] = []
        self.changed = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        self.changed.set()

    async def wait_for(self, n: int, timeout_s: float = 30.0) -> list[str]:
        async def until() -> None:
            while len(self.records) < n:
                self.changed.clear()
                await self.changed.wait()

        await asyncio.wait_for(until(), timeout_s)
        return [r.getMessage() for r in self.records]


async def test_the_delivery_line_says_why_mail_overflowed(tmp_path: Path, sink: Sink) -> None:
    watch = LogWatch()
    delivery = logging.getLogger("warmrelay.delivery")
    delivery.addHandler(watch)
    level = delivery.level
    delivery.setLevel(logging.INFO)
    try:
        async with running(relay_config(tmp_path, sink.port, cap=1)) as relay:
            await send(relay, ["a@example.test", "b@example.test", "c@example.test"])
            lines = await watch.wait_for(3)
    finally:
        delivery.removeHandler(watch)
        delivery.setLevel(level)
    reasons = sorted(line.split(" reason=")[1].split(" relay=")[0] for line in lines)
    assert reasons == ["overflow(127.0.0.2 cap 1/1)"] * 2 + ["warmup"]
    assert {r.reason for r in watch.records} == set(reasons)  # type: ignore[attr-defined]
    assert sink.by_peer() == {"127.0.0.2": 1, "127.0.0.3": 2}
