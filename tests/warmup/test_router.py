"""Router: warmup split, overflow to the weighted pool, hold, down IPs, windows."""

from __future__ import annotations

from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from warmrelay.config import Config, parse_config
from warmrelay.warmup.counters import MemoryCounters, SqliteCounters
from warmrelay.warmup.router import Hold, Route, Router, RouteReason


def make_config(**over: Any) -> Config:
    doc: dict[str, Any] = {
        "timezone": "UTC",
        "ips": [
            {
                "address": "127.0.0.2",
                "helo": "mta1.example.test",
                "warmup": {"start": "2026-11-27", "schedule": [3, 5]},
            },
            {"address": "127.0.0.3", "helo": "mta2.example.test"},
        ],
    }
    doc.update(over)
    return parse_config(doc)


NOW = datetime(2026, 11, 27, 12, 0, tzinfo=ZoneInfo("UTC"))


def summary(parts: tuple[Route | Hold, ...]) -> list[tuple[str, int, str]]:
    return [
        (p.address, p.count, p.reason.value) if isinstance(p, Route) else ("hold", p.count, "")
        for p in parts
    ]


async def test_splits_two_of_five_to_the_warming_ip() -> None:
    router = Router(make_config(), MemoryCounters())
    assert summary((await router.route(1, NOW)).parts) == [("127.0.0.2", 1, "warmup")]
    plan = await router.route(5, NOW)
    assert summary(plan.parts) == [("127.0.0.2", 2, "warmup"), ("127.0.0.3", 3, "overflow")]
    assert summary((await router.route(4, NOW)).parts) == [("127.0.0.3", 4, "overflow")]


async def test_release_returns_budget() -> None:
    router = Router(make_config(), MemoryCounters())
    plan = await router.route(3, NOW)
    (route,) = plan.routes
    assert route.reservation is not None
    await route.reservation.settle()  # nothing kept: all 3 go back
    assert await router.sent(route.source, NOW) == 0
    assert summary((await router.route(3, NOW)).parts) == [("127.0.0.2", 3, "warmup")]


async def test_hold_until_next_window() -> None:
    router = Router(make_config(overflow="hold"), MemoryCounters())
    plan = await router.route(5, NOW)
    assert summary(plan.parts) == [("127.0.0.2", 3, "warmup"), ("hold", 2, "")]
    (hold,) = plan.holds
    assert hold.retry_at == datetime(2026, 11, 28, 0, 0, tzinfo=ZoneInfo("UTC"))


async def test_weighted_pool_round_robin() -> None:
    cfg = make_config(
        ips=[
            {"address": "127.0.0.3", "helo": "a.example.test", "weight": 3},
            {"address": "127.0.0.4", "helo": "b.example.test", "weight": 1},
        ]
    )
    router = Router(cfg, MemoryCounters())
    picks = Counter()
    for _ in range(40):
        (route,) = (await router.route(1, NOW)).routes
        assert route.reason is RouteReason.POOL
        picks[route.address] += 1
    assert picks == {"127.0.0.3": 30, "127.0.0.4": 10}


async def test_before_start_the_warming_ip_sends_nothing() -> None:
    router = Router(make_config(), MemoryCounters())
    early = datetime(2026, 11, 1, tzinfo=ZoneInfo("UTC"))
    assert summary((await router.route(2, early)).parts) == [("127.0.0.3", 2, "pool")]


async def test_after_last_day_the_ip_joins_the_pool() -> None:
    router = Router(make_config(), MemoryCounters())
    later = datetime(2026, 12, 5, tzinfo=ZoneInfo("UTC"))
    used = {(await router.route(1, later)).routes[0].address for _ in range(4)}
    assert used == {"127.0.0.2", "127.0.0.3"}


async def test_down_ip_is_skipped_until_its_time() -> None:
    router = Router(make_config(), MemoryCounters())
    router.mark_down("127.0.0.2", NOW.replace(hour=13))
    assert summary((await router.route(1, NOW)).parts) == [("127.0.0.3", 1, "overflow")]
    assert summary((await router.route(1, NOW.replace(hour=13))).parts) == [
        ("127.0.0.2", 1, "warmup")
    ]


async def test_every_pool_ip_down_holds_briefly() -> None:
    router = Router(make_config(), MemoryCounters())
    router.mark_down("127.0.0.3", NOW.replace(hour=13))
    await router.route(3, NOW)
    (hold,) = (await router.route(1, NOW)).holds
    assert hold.why == "every pool IP is down"
    assert NOW < hold.retry_at < NOW.replace(hour=13)


async def test_local_midnight_starts_a_new_window(tmp_path: Path) -> None:
    """Reservations at 23:59 and 00:01 Tokyo time count in different windows (SQLite)."""
    tokyo = ZoneInfo("Asia/Tokyo")
    counters = SqliteCounters(tmp_path / "c.sqlite3")
    router = Router(make_config(timezone="Asia/Tokyo"), counters)
    before = datetime(2026, 11, 27, 23, 59, tzinfo=tokyo)
    after = datetime(2026, 11, 28, 0, 1, tzinfo=tokyo)
    assert summary((await router.route(4, before)).parts) == [
        ("127.0.0.2", 3, "warmup"),
        ("127.0.0.3", 1, "overflow"),
    ]
    assert summary((await router.route(6, after)).parts) == [
        ("127.0.0.2", 5, "warmup"),
        ("127.0.0.3", 1, "overflow"),
    ]
    ip = make_config().ips[0]
    assert (await router.sent(ip, before), await router.sent(ip, after)) == (3, 5)
    await counters.close()


async def test_restart_keeps_todays_count(tmp_path: Path) -> None:
    db = tmp_path / "c.sqlite3"
    first = SqliteCounters(db)
    assert summary((await Router(make_config(), first).route(2, NOW)).parts) == [
        ("127.0.0.2", 2, "warmup")
    ]
    await first.close()
    second = SqliteCounters(db)
    plan = await Router(make_config(), second).route(2, NOW)
    assert summary(plan.parts) == [("127.0.0.2", 1, "warmup"), ("127.0.0.3", 1, "overflow")]
    await second.close()
