"""The newcomer path: the example configuration warms its IP whenever it is run. A warmup
without a start begins on the IP's first use, a day stored once in the state store for every
process and relay; check-config and schedule show the stored state; `ip uncomplete`."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from support.cli import warmrelay, warmrelay_async
from support.redisserver import RedisServer, free_port
from support.relay import running, send
from support.sink import Sink

from warmrelay.config import Config, load_config, parse_config
from warmrelay.errors import ConfigError
from warmrelay.warmup.control import STARTED, Started
from warmrelay.warmup.counters import Counters, SqliteCounters
from warmrelay.warmup.counters.redis import RedisCounters
from warmrelay.warmup.plan import WarmupState
from warmrelay.warmup.router import Router, RouteReason

EXAMPLE = Path(__file__).resolve().parents[2] / "config.example.yaml"
WARMING = "127.0.0.2"
TODAY = datetime.now(UTC).date()  # for parameters (collection time); tests take their own


def example_doc(tmp_path: Path, sink_port: int) -> dict[str, Any]:
    """config.example.yaml as shipped, with its ports, state and next hop moved for a test."""
    doc: dict[str, Any] = yaml.safe_load(EXAMPLE.read_text())
    doc["smtp"]["listen"] = ["127.0.0.1:0"]
    doc["admin"]["listen"] = "127.0.0.1:0"
    doc["state"]["dir"] = str(tmp_path / "var")
    doc["routes"] = {"*": f"127.0.0.1:{sink_port}"}
    return doc


@pytest.mark.parametrize(
    "moment",
    [
        datetime.combine(TODAY, time(4, 42), UTC),  # before any "business hours"
        # another day, late: the file has no date to be past (the clock may not leave the
        # queue lifetime: the spool stamps mail with the real time)
        datetime.combine(TODAY + timedelta(days=3), time(23, 59), UTC),
    ],
)
async def test_the_example_warms_its_ip_whenever_it_is_run(
    tmp_path: Path, sink: Sink, moment: datetime
) -> None:
    config = parse_config(example_doc(tmp_path, sink.port))
    async with running(config, clock=lambda: moment) as relay:
        await send(relay, ["first@example.test"])
        (got,) = await sink.wait_for(1)
        assert got.peer == WARMING  # the warming IP carries it, not the pool
        stored = await relay.counters.get_value(STARTED.key(WARMING))
    assert Started.loads(stored) == Started(moment.date(), 0)


def first_use_config(**warmup: Any) -> Config:
    return parse_config(
        {
            "ips": [
                {
                    "address": WARMING,
                    "helo": "a.example.test",
                    "warmup": {"schedule": [2, 4, 8], **warmup},
                },
                {"address": "127.0.0.3", "helo": "b.example.test"},
            ]
        }
    )


@pytest.fixture(params=["sqlite", "redis"])
async def shared(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[list[Counters]]:
    """Two independent clients of one store, as two processes (or relays) would have."""
    server = RedisServer(tmp_path / "redis") if request.param == "redis" else None
    clients: list[Counters] = []
    try:
        if server is not None:
            await server.start()
            clients += [RedisCounters(server.url) for _ in range(2)]
        else:
            clients += [SqliteCounters(tmp_path / "c.sqlite3") for _ in range(2)]
            # both in this process share the writers' lock (POSIX record locks belong to the
            # process): their first writes (schema, pruning) would race as two processes'
            # never do. Each opens its write connection before the test (deleting an absent
            # key writes nothing).
            for c in clients:
                await c.set_value("test:connected", None)
        yield clients
    finally:
        for c in clients:
            await c.close()
        if server is not None:
            await server.stop()


async def test_first_use_is_day_one_for_every_process_and_after_a_restart(
    shared: list[Counters], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="warmrelay")
    day1 = datetime(2026, 11, 27, 9, 0, tzinfo=UTC)
    one, two = Router(first_use_config(), shared[0]), Router(first_use_config(), shared[1])
    ip = one.ips[0]
    assert one.start(ip) is None
    assert one.status(ip, day1).day == 1  # not used yet: would be day 1 today
    plans = await asyncio.gather(one.route(1, day1), two.route(1, day1))  # both at once
    assert [p.parts[0].reason for p in plans] == [RouteReason.WARMUP] * 2
    assert one.start(ip) == two.start(ip) == date(2026, 11, 27)
    said = [r.getMessage() for r in caplog.records if "its first use" in r.getMessage()]
    assert len(said) == 1, said  # by the writer only
    restarted = Router(first_use_config(), shared[1])
    await restarted.refresh(day1 + timedelta(days=1))
    assert restarted.status(ip, day1 + timedelta(days=1)).day == 2
    st = restarted.status(ip, day1 + timedelta(days=3))
    assert (st.state, st.day) == (WarmupState.WARM, 4)  # 3 days, then warm


async def test_days_paused_before_the_first_use_do_not_count(shared: list[Counters]) -> None:
    router = Router(first_use_config(), shared[0])
    ip = router.ips[0]
    d = datetime(2026, 11, 20, 9, 0, tzinfo=UTC)
    await router.pause(WARMING, d)
    assert router.status(ip, d).state is WarmupState.PAUSED
    await router.resume(WARMING, d + timedelta(days=3))
    use = d + timedelta(days=5)
    plan = await router.route(5, use)
    assert [p.count for p in plan.routes if p.reason is RouteReason.WARMUP] == [2]  # day 1's cap
    assert router.start(ip) == use.date()
    assert router.status(ip, use + timedelta(days=1)).day == 2
    await router.pause(WARMING, use + timedelta(days=1))  # a pause after the start counts
    await router.resume(WARMING, use + timedelta(days=3))
    assert router.status(ip, use + timedelta(days=3)).day == 2


async def test_results_progress_begins_at_the_first_use(shared: list[Counters]) -> None:
    router = Router(first_use_config(progress="results"), shared[0])
    ip = router.ips[0]
    day1 = datetime(2026, 11, 27, 9, 0, tzinfo=UTC)
    plan = await router.route(3, day1)
    for route in plan.routes:
        if route.reservation is not None:
            route.reservation.keep(route.count)
            await route.reservation.settle()
    await router.refresh(day1 + timedelta(days=1))
    assert router.status(ip, day1 + timedelta(days=1)).day == 2  # day 1 used its cap


@pytest.mark.parametrize("start", [20261127, 1764201600, 2026.5, True])
def test_a_number_as_start_is_refused_with_its_key_path(start: object) -> None:
    doc = {
        "ips": [
            {
                "address": WARMING,
                "helo": "a.example.test",
                "warmup": {"start": start, "schedule": [1]},
            },
            {"address": "127.0.0.3", "helo": "b.example.test"},
        ]
    }
    with pytest.raises(ConfigError) as info:
        parse_config(doc)
    (problem,) = info.value.problems
    assert problem.path == "ips[0].warmup.start"
    assert problem.message.startswith("must be a date written YYYY-MM-DD (e.g. 2026-11-27), not ")


def test_check_config_refuses_a_number_as_start(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(
        "ips:\n"
        "  - {address: 127.0.0.2, helo: a.example.test,"
        " warmup: {start: 20261127, schedule: [50]}}\n"
        "  - {address: 127.0.0.3, helo: b.example.test}\n"
    )
    result = warmrelay("check-config", "-c", str(path))
    assert result.returncode == 1
    assert "  ips[0].warmup.start: must be a date written YYYY-MM-DD" in result.stderr
    assert "not a number (20261127)" in result.stderr


def write_config(tmp_path: Path, warmup: dict[str, Any]) -> Path:
    path = tmp_path / "relay.yaml"
    doc = {
        "admin": {"listen": f"127.0.0.1:{free_port()}"},  # nobody there: the offline path
        "state": {"dir": str(tmp_path / "var")},
        "ips": [
            {"address": WARMING, "helo": "a.example.test", "warmup": warmup},
            {"address": "127.0.0.3", "helo": "b.example.test"},
        ],
    }
    path.write_text(yaml.safe_dump(doc))
    return path


def ip_row(stdout: str) -> str:
    (row,) = [line for line in stdout.splitlines() if line.startswith(WARMING + " ")]
    return " ".join(row.split())


async def test_check_config_and_schedule_show_what_the_store_says(tmp_path: Path) -> None:
    today = datetime.now(UTC).date()  # when the test runs, not when it was collected
    path = write_config(tmp_path, {"schedule": [10, 20, 30]})
    before = warmrelay("check-config", "-c", str(path))
    assert before.returncode == 0, before.stderr
    assert ip_row(before.stdout).endswith("warming (starts on first use) 1/3 10")
    assert "state: nothing stored yet" in before.stdout
    assert not (tmp_path / "var").exists()  # reading created nothing
    schedule = warmrelay("schedule", "-c", str(path)).stdout
    assert f"{WARMING} (a.example.test): schedule custom, starts on first use, 3 days" in schedule

    now = datetime.now(UTC)
    counters = SqliteCounters(tmp_path / "var" / "counters.sqlite3")
    router = Router(load_config(path), counters)  # what a relay on this state.dir writes
    await router.route(1, now)
    await router.throttled(router.ips[0], "gmail", 1, now, "421-4.7.28 slow down")
    await counters.close()

    after = warmrelay("check-config", "-c", str(path))
    assert ip_row(after.stdout).endswith("warming 1/3 10")
    assert f"  {WARMING}: day 1 was {today}, its first use (no warmup.start)" in after.stdout
    assert f"  {WARMING}: suspended for gmail until " in after.stdout
    assert "(421-4.7.28 slow down)" in after.stdout
    schedule = warmrelay("schedule", "-c", str(path)).stdout
    assert f"schedule custom, started {today} (first use), 3 days" in schedule
    assert f"> {today}      1" in schedule

    for action, role in (
        ("pause", f"paused since {today} 1/3 0"),
        ("resume", "warming 1/3 10"),
        ("complete", f"warm (completed on {today}) - -"),
    ):
        done = warmrelay("ip", action, WARMING, "-c", str(path))
        assert done.returncode == 0, done.stderr
        assert "(no relay running)" in done.stdout
        assert ip_row(warmrelay("check-config", "-c", str(path)).stdout).endswith(role)
    schedule = warmrelay("schedule", "-c", str(path)).stdout
    assert f"declared complete on {today}: warm, in the pool" in schedule
    undone = warmrelay("ip", "uncomplete", WARMING, "-c", str(path))
    assert undone.returncode == 0, undone.stderr
    assert undone.stdout.rstrip().endswith("state warming")
    assert ip_row(warmrelay("check-config", "-c", str(path)).stdout).endswith("warming 1/3 10")


def test_warnings_for_a_warmup_that_is_over_or_not_begun(tmp_path: Path) -> None:
    today = datetime.now(UTC).date()  # when the test runs, not when it was collected
    over = write_config(tmp_path, {"start": str(today - timedelta(days=30)), "schedule": [5] * 30})
    result = warmrelay("check-config", "-c", str(over))
    assert result.returncode == 0
    assert (
        f"  ips[0].warmup: day 31 of 30: {WARMING} is warm now and joins the pool" in result.stderr
    )
    schedule = warmrelay("schedule", "-c", str(over))
    assert "  day 31 of 30: warm now, joins the pool" in schedule.stdout
    ahead = write_config(tmp_path, {"start": str(today + timedelta(days=3)), "schedule": [5]})
    result = warmrelay("check-config", "-c", str(ahead))
    assert result.returncode == 0
    assert f"  ips[0].warmup.start: {today + timedelta(days=3)} is 3 day(s) ahead" in result.stderr
    assert "warning: ips[0].warmup.start:" in warmrelay("schedule", "-c", str(ahead)).stderr


async def test_uncomplete_through_the_running_relay(tmp_path: Path, sink: Sink) -> None:
    today = datetime.now(UTC).date()  # when the test runs, not when it was collected
    path = write_config(tmp_path, {"start": str(today), "schedule": [5, 5]})
    doc = yaml.safe_load(path.read_text())
    doc["smtp"] = {"listen": ["127.0.0.1:0"]}
    doc["routes"] = {"*": f"127.0.0.1:{sink.port}"}
    path.write_text(yaml.safe_dump(doc))
    async with running(load_config(path)) as relay:
        done = await warmrelay_async("ip", "complete", WARMING, "-c", str(path))
        assert (done.returncode, done.stdout.strip()) == (
            0,
            f"{WARMING}: complete done by the running relay; state warm",
        ), done.stderr
        await send(relay, ["pool@example.test"])
        await sink.wait_for(1)
        ip = relay.config.ips[0]
        assert await relay.router.sent(ip, datetime.now(UTC)) == 0  # pool traffic: not counted
        undone = await warmrelay_async("ip", "uncomplete", WARMING, "-c", str(path))
        assert undone.returncode == 0, undone.stderr
        assert undone.stdout.strip() == (
            f"{WARMING}: uncomplete done by the running relay; state warming"
        )
        await send(relay, ["warming@example.test"])
        await sink.wait_for(2)
        assert await relay.router.sent(ip, datetime.now(UTC)) == 1  # under its cap again
    assert sink.messages[1].peer == WARMING


def test_check_config_says_when_the_store_cannot_be_read(tmp_path: Path) -> None:
    path = write_config(tmp_path, {"schedule": [10]})
    doc = yaml.safe_load(path.read_text())
    port = free_port()  # nobody listens there
    doc["state"]["counters"] = f"redis://:hunter2@127.0.0.1:{port}/0"
    path.write_text(yaml.safe_dump(doc))
    result = warmrelay("check-config", "-c", str(path))
    assert result.returncode == 0  # the file is valid; only the state is unknown
    (line,) = [x for x in result.stdout.splitlines() if x.startswith("state: ")]
    assert line.startswith(f"state: cannot read redis://:***@127.0.0.1:{port}/0 (")
    assert "hunter2" not in result.stdout + result.stderr
    assert ip_row(result.stdout).endswith("warming (starts on first use) 1/1 10")
