"""Warmup plans: ramps, presets with targets, hourly smoothing with carry-over, provider caps."""

from __future__ import annotations

from collections import Counter
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from warmrelay.config import parse_config
from warmrelay.warmup.counters import MemoryCounters
from warmrelay.warmup.plan import PRESETS, SendingHours, extend_to_target, ramp
from warmrelay.warmup.providers import ProviderMap, ProviderRule
from warmrelay.warmup.router import Router, RouteReason

UTC = ZoneInfo("UTC")


def router_for(warmup: dict[str, Any], **over: Any) -> Router:
    doc: dict[str, Any] = {
        "ips": [
            {"address": "127.0.0.2", "helo": "a.example.test", "warmup": warmup},
            {"address": "127.0.0.3", "helo": "b.example.test"},
        ],
        **over,
    }
    return Router(parse_config(doc), MemoryCounters())


async def from_warming(router: Router, n: int, now: datetime, provider: str | None = None) -> int:
    plan = await router.route(n, now, provider)
    return sum(p.count for p in plan.routes if p.reason is RouteReason.WARMUP)


def test_generated_ramp() -> None:
    r = ramp(50, 1.4, 500)
    assert r.daily == (50, 70, 98, 137, 192, 269, 376, 500)


def test_sendgrid_manual_doubles_after_day_17_up_to_target() -> None:
    s = extend_to_target(PRESETS["sendgrid-manual"], 20_000_000)
    assert s.daily[16] == 4_000_000
    assert s.daily[17:] == (8_000_000, 16_000_000, 20_000_000)
    short = extend_to_target(PRESETS["sendgrid-manual"], 7_500)
    assert short.daily == (50, 100, 500, 1000, 5000, 7_500)


def test_mailtrap_publishes_hourly_limits() -> None:
    hourly = PRESETS["mailtrap"].hourly
    assert hourly is not None
    assert (hourly[0], hourly[10], hourly[-1]) == (60, 830, 11400)


def test_schedule_mapping_forms_in_config() -> None:
    router = router_for(
        {"start": "2026-11-01", "schedule": {"start": 50, "growth": 2.0, "target": 300}}
    )
    ip = router.ips[0]
    assert ip.warmup is not None and ip.warmup.schedule.daily == (50, 100, 200, 300)


def test_sending_hours_parse() -> None:
    hours = SendingHours.parse("08:00-20:00")
    assert (hours.slots, str(hours)) == (12, "08:00-20:00")
    assert SendingHours.parse("00:00-24:00").slots == 24
    for bad in ("20:00-08:00", "8-20", "08:00-25:00", "08:61-09:00"):
        with pytest.raises(ValueError):
            SendingHours.parse(bad)


async def test_burst_at_8_sends_a_twelfth_and_nothing_before() -> None:
    """Day cap 120 over 08:00-20:00: a burst of 500 at 08:00 sends 10 from the warming IP."""
    router = router_for({"start": "2026-11-28", "schedule": [120], "sending_hours": "08:00-20:00"})
    early = datetime(2026, 11, 28, 7, 59, tzinfo=UTC)
    assert await from_warming(router, 1, early) == 0
    at8 = datetime(2026, 11, 28, 8, 0, tzinfo=UTC)
    used = Counter()
    for _ in range(500):
        for part in (await router.route(1, at8)).routes:
            used[(part.address, part.reason)] += part.count
    assert used == {("127.0.0.2", RouteReason.WARMUP): 10, ("127.0.0.3", RouteReason.OVERFLOW): 490}
    assert await from_warming(router, 50, datetime(2026, 11, 28, 8, 59, tzinfo=UTC)) == 0
    assert await from_warming(router, 50, datetime(2026, 11, 28, 9, 0, tzinfo=UTC)) == 10


async def test_unused_hours_carry_forward_within_the_day_only() -> None:
    router = router_for(
        {"start": "2026-11-28", "schedule": [120, 120], "sending_hours": "08:00-20:00"}
    )
    # nothing sent 08:00-10:59: at 11:00 (slot 3 of 12) 4/12 of the day's cap is open
    assert await from_warming(router, 100, datetime(2026, 11, 28, 11, 0, tzinfo=UTC)) == 40
    # the last hour may use everything left of the day...
    assert await from_warming(router, 500, datetime(2026, 11, 28, 19, 30, tzinfo=UTC)) == 80
    # ...but nothing carries over to the next day (day 2 starts at its first twelfth)
    assert await from_warming(router, 500, datetime(2026, 11, 29, 8, 0, tzinfo=UTC)) == 10
    assert await from_warming(router, 500, datetime(2026, 11, 29, 20, 0, tzinfo=UTC)) == 0


async def test_preset_hourly_limit_holds() -> None:
    router = router_for({"start": "2026-11-28", "schedule": "sendgrid"})
    at = datetime(2026, 11, 28, 10, 5, tzinfo=UTC)
    assert await from_warming(router, 1000, at) == 20  # day 1: 20 an hour
    assert await from_warming(router, 1000, at.replace(minute=59)) == 0
    assert await from_warming(router, 1000, at.replace(hour=11)) == 20


async def test_hold_waits_for_the_next_hour_when_smoothing() -> None:
    router = router_for(
        {"start": "2026-11-28", "schedule": [120], "sending_hours": "08:00-20:00"},
        overflow="hold",
    )
    plan = await router.route(15, datetime(2026, 11, 28, 8, 20, tzinfo=UTC))
    (hold,) = plan.holds
    assert hold.count == 5
    assert hold.retry_at == datetime(2026, 11, 28, 9, 0, tzinfo=UTC)


async def test_provider_share_caps_only_that_provider() -> None:
    router = router_for(
        {"start": "2026-11-28", "schedule": [100], "providers": {"gmail": {"share": 0.3}}}
    )
    now = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)
    assert await from_warming(router, 50, now, "gmail") == 30
    assert await from_warming(router, 50, now, "gmail") == 0
    assert await from_warming(router, 200, now, "example.org") == 70


async def test_provider_with_its_own_schedule() -> None:
    router = router_for(
        {
            "start": "2026-11-28",
            "schedule": [100, 200],
            "providers": {"microsoft": {"schedule": [5, 10]}},
        }
    )
    now = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)
    assert await from_warming(router, 50, now, "microsoft") == 10


def test_provider_cap_config_errors() -> None:
    from warmrelay.errors import ConfigError

    with pytest.raises(ConfigError) as info:
        router_for(
            {
                "start": "2026-11-28",
                "schedule": [100],
                "providers": {"gmial": {"share": 0.3}, "gmail": {"share": 0.2, "schedule": [1]}},
            }
        )
    found = [str(p) for p in info.value.problems]
    assert any(p.startswith("ips[0].warmup.providers.gmail: give either share") for p in found)
    assert any(p.startswith("ips[0].warmup.providers.gmial: unknown provider") for p in found)


def test_provider_recognition_by_mx_and_domain() -> None:
    providers = ProviderMap([ProviderRule("corp", ("mx.corp.test",), ("corp.test",))])
    assert providers.recognise("example.com", ["aspmx.l.google.com"]) == "gmail"
    assert providers.recognise("shop.test", ["shop-test.mail.protection.outlook.com"]) == (
        "microsoft"
    )
    assert providers.recognise("y.test", ["mta5.am0.yahoodns.net."]) == "yahoo"
    assert providers.recognise("me.test", ["mx01.mail.icloud.com"]) == "apple"
    assert providers.recognise("Corp.Test", []) == "corp"
    assert providers.recognise("other.test", ["in1.mx.corp.test"]) == "corp"
    assert providers.recognise("plain.test", ["mx.plain.test"]) == "plain.test"
    assert providers.recognise("notgoogle.test", ["google.com.evil.test"]) == "notgoogle.test"
