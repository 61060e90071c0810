"""progress: results, pause and completion (router level, simulated clock), throttle patterns."""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from support.cli import warmrelay

from warmrelay.config import parse_config
from warmrelay.delivery.replies import Outcome, Reply, ReplyRules, Stage
from warmrelay.warmup.control import (
    COMPLETED,
    PAUSE,
    PROGRESS,
    Completion,
    Pause,
    Progress,
    next_cooldown,
)
from warmrelay.warmup.counters import MemoryCounters, SqliteCounters
from warmrelay.warmup.plan import WarmupState
from warmrelay.warmup.router import Router, RouteReason

UTC = ZoneInfo("UTC")
DAY1 = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)


def config(progress: str = "results", **warmup: Any) -> Any:
    return parse_config(
        {
            "ips": [
                {
                    "address": "127.0.0.2",
                    "helo": "a.example.test",
                    "warmup": {
                        "start": "2026-11-01",
                        "schedule": [100, 200, 400],
                        "progress": progress,
                        **warmup,
                    },
                },
                {"address": "127.0.0.3", "helo": "b.example.test"},
            ]
        }
    )


async def warming_sends(router: Router, n: int, now: datetime) -> int:
    plan = await router.route(n, now)
    return sum(p.count for p in plan.routes if p.reason is RouteReason.WARMUP)


async def test_results_progress_repeats_a_thin_day_and_advances_after_a_full_one() -> None:
    router = Router(config(), MemoryCounters())
    ip = router.ips[0]
    assert await warming_sends(router, 10, DAY1) == 10  # 10 % of day 1's cap
    day2 = DAY1 + timedelta(days=1)
    assert await warming_sends(router, 1, day2) == 1
    assert router.status(ip, day2).day == 1  # repeated: too little traffic
    assert await warming_sends(router, 500, day2) == 99  # day 1's cap again
    day3 = DAY1 + timedelta(days=2)
    await router.refresh(day3)
    st = router.status(ip, day3)
    assert (st.day, st.cap) == (2, 200)  # a full day: the next warmup day begins


async def test_heavy_throttling_repeats_the_day() -> None:
    router = Router(config(), MemoryCounters())
    ip = router.ips[0]
    assert await warming_sends(router, 100, DAY1) == 100
    await router.throttled(ip, "gmail", 10, DAY1, "421 4.7.28")  # 10 % throttled > 2 %
    await router.refresh(DAY1 + timedelta(days=1))
    assert router.status(ip, DAY1 + timedelta(days=1)).day == 1


async def test_progress_survives_a_restart(tmp_path: Path) -> None:
    first = SqliteCounters(tmp_path / "c.sqlite3")
    router = Router(config(), first)
    await warming_sends(router, 100, DAY1)
    await router.refresh(DAY1 + timedelta(days=1))
    await first.close()
    second = SqliteCounters(tmp_path / "c.sqlite3")
    again = Router(config(), second)
    later = DAY1 + timedelta(days=1, hours=3)
    await again.refresh(later)
    assert again.status(again.ips[0], later).day == 2
    await second.close()


async def test_calendar_pause_does_not_advance() -> None:
    router = Router(config("calendar"), MemoryCounters())
    ip = router.ips[0]
    await router.refresh(DAY1)
    await router.pause("127.0.0.2", DAY1)
    later = DAY1 + timedelta(days=5)
    assert router.status(ip, later).state is WarmupState.PAUSED
    assert await warming_sends(router, 5, later) == 0
    await router.resume("127.0.0.2", later)
    st = router.status(ip, later)
    assert (st.state, st.day) == (WarmupState.WARMING, 1)  # five paused days did not count
    await router.complete("127.0.0.2", later)
    assert router.status(ip, later).state is WarmupState.WARM


def test_control_records_round_trip_through_json() -> None:
    pause = Pause(days=2).paused(DAY1.date())
    assert PAUSE.loads(PAUSE.dumps(pause)) == pause
    done = Completion(True, DAY1.date())
    assert COMPLETED.loads(COMPLETED.dumps(done)) == done
    assert COMPLETED.loads("true") == Completion(True, None)  # as earlier versions stored it
    undone = done.undone(DAY1.date())
    assert COMPLETED.loads(COMPLETED.dumps(undone)) == undone and not undone.done
    progress = Progress(3, DAY1.date())
    assert PROGRESS.loads(PROGRESS.dumps(progress)) == progress


def test_cooldown_doubles_on_repeat_up_to_the_maximum() -> None:
    from warmrelay.warmup.control import Suspension

    first = next_cooldown(None, DAY1, 3600, 10000)
    s = Suspension(DAY1 + timedelta(seconds=first), first, "x")
    second = next_cooldown(s, s.until + timedelta(minutes=5), 3600, 10000)
    s2 = Suspension(DAY1 + timedelta(seconds=second), second, "x")
    third = next_cooldown(s2, s2.until, 3600, 10000)
    assert (first, second, third) == (3600, 7200, 10000)
    assert next_cooldown(s, s.until + timedelta(days=2), 3600, 10000) == 3600


@pytest.mark.parametrize(
    ("code", "text", "throttle"),
    [
        (421, "4.7.28 Gmail has detected an unusual rate of unsolicited mail", True),
        (451, "4.7.650 The mail server [1.2.3.4] has been temporarily rate limited", True),
        (451, "4.7.651 The mail server [1.2.3.4] has been temporarily rate limited", True),
        (421, "4.7.0 [TSS04] Messages from 1.2.3.4 temporarily deferred", True),
        (421, "4.7.0 [TSS05] Messages from 1.2.3.4 temporarily deferred", True),
        (421, "4.7.0 [HCM1] Messages from 1.2.3.4 temporarily deferred", True),
        (421, "4.7.0 Try again later, closing connection", False),
        (451, "4.3.0 mailbox busy", False),
        (550, "5.7.28 policy", False),
        (450, "4.2.1 slow down please", True),  # the pattern added in config below
    ],
)
def test_throttle_patterns(code: int, text: str, throttle: bool) -> None:
    rules = ReplyRules([r"^450 4\.2\.1 slow down"])
    outcome = rules.classify(Reply(code, text, "mx", Stage.RCPT))
    assert (outcome is Outcome.THROTTLED) is throttle


def test_ip_command_offline_writes_the_store(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        f"state: {{dir: {tmp_path / 'state'}}}\nadmin: {{listen: '127.0.0.1:1'}}\n"
        "ips:\n  - {address: 127.0.0.2, helo: a.example.test,"
        " warmup: {start: 2026-11-01, schedule: [10]}}\n"
        "  - {address: 127.0.0.3, helo: b.example.test}\n"
    )
    paused = warmrelay("ip", "pause", "127.0.0.2", "-c", str(cfg))
    assert paused.returncode == 0, paused.stderr
    assert "no relay running" in paused.stdout and "state paused" in paused.stdout
    unknown = warmrelay("ip", "pause", "10.1.1.1", "-c", str(cfg))
    assert unknown.returncode == 1
