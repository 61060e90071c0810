"""Counters: exact caps under concurrency (tasks and OS processes), persistence, release."""

from __future__ import annotations

import asyncio
import random
import sqlite3
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from redis import asyncio as aioredis
from support.counter_worker import CAPS, DAY, H08, H09, KINDS, PROV_A, PROV_B
from support.redisserver import RedisServer

from warmrelay.warmup.counters import CounterKey, Counters, Limit, MemoryCounters, SqliteCounters
from warmrelay.warmup.counters.redis import RedisCounters

KEY = CounterKey("127.0.0.2", "2026-11-28")
WORKER = Path(__file__).resolve().parents[1] / "support" / "counter_worker.py"
WORKER_TIMEOUT_S = 60.0  # a worker process that hangs fails the test instead of the suite


@pytest.fixture(params=["memory", "sqlite", "redis"])
async def counters(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Counters]:
    server = RedisServer(tmp_path / "redis") if request.param == "redis" else None
    c: Counters | None = None
    try:
        if server is not None:
            await server.start()
            c = RedisCounters(server.url)
        elif request.param == "sqlite":
            c = SqliteCounters(tmp_path / "c.sqlite3")
        else:
            c = MemoryCounters()
        yield c
    finally:
        if c is not None:
            await c.close()
        if server is not None:
            await server.stop()


async def test_partial_grant_then_nothing(counters: Counters) -> None:
    assert await counters.reserve([Limit(KEY, 5)], 2) == 2
    assert await counters.reserve([Limit(KEY, 5)], 5) == 3  # 2 of 5 would not fit
    assert await counters.reserve([Limit(KEY, 5)], 1) == 0
    assert await counters.get(KEY) == 5


async def test_release_gives_room_back(counters: Counters) -> None:
    assert await counters.reserve([Limit(KEY, 3)], 3) == 3
    await counters.release([KEY], 2, "r1")
    assert await counters.get(KEY) == 1
    await counters.release([KEY], 2, "r1")  # the same release again: applied once
    assert await counters.get(KEY) == 1
    assert await counters.reserve([Limit(KEY, 3)], 5) == 2


async def test_every_limit_holds_and_all_keys_count(counters: Counters) -> None:
    hour = CounterKey("127.0.0.2", "2026-11-28", "h08")
    assert await counters.reserve([Limit(KEY, 100), Limit(hour, 4)], 10) == 4
    assert await counters.get(KEY) == 4
    assert await counters.get(hour) == 4


async def test_windows_are_separate(counters: Counters) -> None:
    other = CounterKey("127.0.0.2", "2026-11-29")
    assert await counters.reserve([Limit(KEY, 1)], 1) == 1
    assert await counters.reserve([Limit(other, 1)], 1) == 1


async def test_200_concurrent_tasks_cap_50(counters: Counters) -> None:
    grants = await asyncio.gather(*(counters.reserve([Limit(KEY, 50)], 1) for _ in range(200)))
    assert sum(grants) == 50
    assert await counters.get(KEY) == 50


async def test_sqlite_count_survives_restart(tmp_path: Path) -> None:
    first = SqliteCounters(tmp_path / "c.sqlite3")
    assert await first.reserve([Limit(KEY, 100)], 42) == 42
    await first.close()
    second = SqliteCounters(tmp_path / "c.sqlite3")
    assert await second.get(KEY) == 42
    assert await second.reserve([Limit(KEY, 100)], 100) == 58
    await second.close()


@pytest.mark.parametrize("backend", ["sqlite", "redis"])
async def test_two_processes_and_tasks_never_exceed_cap(tmp_path: Path, backend: str) -> None:
    """200 reservations: 2 OS processes x 70 tasks + 60 tasks here, one store, cap 50."""
    server = RedisServer(tmp_path / "redis") if backend == "redis" else None
    local: Counters | None = None
    procs: list[asyncio.subprocess.Process] = []
    try:
        if server is not None:
            await server.start()
            spec, local = server.url, RedisCounters(server.url)
        else:
            db = tmp_path / "shared.sqlite3"
            spec, local = f"sqlite:{db}", SqliteCounters(db)
        await local.get(KEY)
        for _ in range(2):
            procs.append(
                await asyncio.create_subprocess_exec(
                    sys.executable,
                    str(WORKER),
                    spec,
                    "70",
                    "50",
                    stdin=asyncio.subprocess.PIPE,
                    stdout=asyncio.subprocess.PIPE,
                )
            )
        for p in procs:
            assert p.stdout is not None
            assert (await asyncio.wait_for(p.stdout.readline(), WORKER_TIMEOUT_S)).strip() == (
                b"ready"
            )
        for p in procs:
            assert p.stdin is not None
            p.stdin.write(b"go\n")
            await p.stdin.drain()
        here = asyncio.gather(*(local.reserve([Limit(KEY, 50)], 1) for _ in range(60)))
        outs = await asyncio.wait_for(
            asyncio.gather(*(p.communicate() for p in procs)), WORKER_TIMEOUT_S
        )
        granted_here = sum(await here)
        granted_there = [int(out.strip()) for out, _ in outs]
        assert all(p.returncode == 0 for p in procs)
        assert granted_here + sum(granted_there) == 50
        assert await local.get(KEY) == 50
    finally:
        for p in procs:
            if p.returncode is None:
                p.kill()
                await p.wait()
        if local is not None:
            await local.close()
        if server is not None:
            await server.stop()


async def test_values_persist_and_delete(tmp_path: Path) -> None:
    first = SqliteCounters(tmp_path / "c.sqlite3")
    await first.set_value("ip:127.0.0.2:paused", "2026-11-28")
    await first.set_value("gone", "x")
    await first.set_value("gone", None)
    await first.close()
    second = SqliteCounters(tmp_path / "c.sqlite3")
    assert await second.get_value("ip:127.0.0.2:paused") == "2026-11-28"
    assert await second.get_value("gone") is None
    await second.close()


# -- coalescing: what waits together goes to the store together, and stays exact ------------


async def test_one_batch_of_mixed_reservations_stays_under_every_cap(counters: Counters) -> None:
    """240 reservations at once (one batch for the coalescing backends) over day, hour and
    provider limits: each is evaluated against the counts the ones before it left."""
    rng = random.Random(14)
    asks = [(sorted(KINDS)[i % 3], rng.randint(1, 4)) for i in range(240)]
    grants = await asyncio.gather(
        *(counters.reserve([Limit(k, CAPS[k]) for k in KINDS[kind]], n) for kind, n in asks)
    )
    held = {kind: 0 for kind in KINDS}
    for (kind, _), granted in zip(asks, grants, strict=True):
        held[kind] += granted
    counts = {key: await counters.get(key) for key in CAPS}
    assert counts[DAY] == sum(held.values())
    assert counts[H08] == held["A"] + held["B"]
    assert counts[H09] == held["C"]
    assert counts[PROV_A] == held["A"]
    assert counts[PROV_B] == held["B"] + held["C"]
    assert all(counts[key] <= cap for key, cap in CAPS.items()), counts
    short = [(kind, n, g) for (kind, n), g in zip(asks, grants, strict=True) if g < n]
    assert short  # 600 asked for: the caps were reached
    for kind, _, _ in short:  # granted less only where a cap is now reached exactly
        assert any(counts[key] == CAPS[key] for key in KINDS[kind]), (kind, counts)


async def test_cancelled_reservations_leave_no_count_behind(counters: Counters) -> None:
    """Callers cancelled while their batch is with the store get their grant given back;
    callers cancelled while still waiting for a batch are left out of it."""
    limits = [Limit(KEY, 10**6)]
    first = [asyncio.ensure_future(counters.reserve(limits, 1)) for _ in range(50)]
    await asyncio.sleep(0)  # they queue up
    later = [asyncio.ensure_future(counters.reserve(limits, 1)) for _ in range(50)]
    await asyncio.sleep(0)  # the first 50 are with the store, the later 50 wait
    for task in first[::2] + later[::2]:
        task.cancel()
    results = await asyncio.gather(*first, *later, return_exceptions=True)
    granted = sum(r for r in results if isinstance(r, int))
    assert granted == (100 if isinstance(counters, MemoryCounters) else 50)
    assert await counters.get(KEY) == granted


def wal_frames(path: Path) -> int:
    """Frames in the database's write-ahead log: one or more per committed transaction."""
    with sqlite3.connect(path) as db:
        return int(db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()[1])


async def test_sqlite_reservations_waiting_together_share_one_transaction(tmp_path: Path) -> None:
    path = tmp_path / "c.sqlite3"
    counters = SqliteCounters(path)
    limits = [Limit(k, CAPS[k] * 10) for k in KINDS["A"]]
    try:
        assert await counters.reserve(limits, 1) == 1
        with sqlite3.connect(path) as db:
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # the log starts again from 0
        grants = await asyncio.gather(*(counters.reserve(limits, 1) for _ in range(200)))
        assert grants == [1] * 200
        assert wal_frames(path) <= 4  # one transaction; one each would write 200+ frames
        assert await counters.get(PROV_A) == 201
    finally:
        await counters.close()


async def test_redis_reservations_waiting_together_share_one_script_run(
    redis_server: RedisServer,
) -> None:
    counters = RedisCounters(redis_server.url)
    probe = aioredis.Redis.from_url(redis_server.url)
    limits = [Limit(k, CAPS[k] * 10) for k in KINDS["A"]]

    async def script_runs() -> int:
        stats = await probe.info("commandstats")
        return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))

    try:
        assert await counters.reserve(limits, 1) == 1  # the script is loaded
        before = await script_runs()
        grants = await asyncio.gather(*(counters.reserve(limits, 1) for _ in range(200)))
        assert grants == [1] * 200
        assert await script_runs() - before == 1  # one round trip, not 200
        assert await counters.get(PROV_A) == 201
    finally:
        await probe.aclose()
        await counters.close()


async def test_one_batch_over_several_ips_keeps_each_ips_caps(counters: Counters) -> None:
    """Reservations for three warming IPs at once (Redis: one script per IP, run together):
    every caller gets the grant of its own IP's caps."""
    ips = ["127.0.0.2", "127.0.0.3", "127.0.0.4"]
    caps = {ip: 10 * (i + 1) for i, ip in enumerate(ips)}

    async def reserve(ip: str) -> tuple[str, int]:
        day = CounterKey(ip, "2026-11-28")
        hour = CounterKey(ip, "2026-11-28", "h08")
        return ip, await counters.reserve([Limit(day, 1000), Limit(hour, caps[ip])], 3)

    results = await asyncio.gather(*(reserve(ips[i % 3]) for i in range(60)))
    for ip in ips:
        grants = [g for who, g in results if who == ip]
        assert sum(grants) == caps[ip]  # 20 asks of 3 each: every cap is reached exactly
        assert await counters.get(CounterKey(ip, "2026-11-28", "h08")) == caps[ip]
        assert await counters.get(CounterKey(ip, "2026-11-28")) == caps[ip]
