"""Counters: exact caps under concurrency (tasks and OS processes), persistence, release."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from redisserver import RedisServer

from warmrelay.counters import CounterKey, Counters, Limit, MemoryCounters, SqliteCounters
from warmrelay.counters.redis import RedisCounters

KEY = CounterKey("127.0.0.2", "2026-11-28")
WORKER = Path(__file__).with_name("counter_worker.py")


@pytest.fixture(params=["memory", "sqlite", "redis"])
async def counters(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Counters]:
    server = None
    if request.param == "redis":
        server = await RedisServer(tmp_path / "redis").start()
        c: Counters = RedisCounters(server.url)
    elif request.param == "sqlite":
        c = SqliteCounters(tmp_path / "c.sqlite3")
    else:
        c = MemoryCounters()
    yield c
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
    await counters.release([KEY], 2)
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
    server = None
    if backend == "redis":
        server = await RedisServer(tmp_path / "redis").start()
        spec, local = server.url, RedisCounters(server.url)
    else:
        db = tmp_path / "shared.sqlite3"
        spec, local = f"sqlite:{db}", SqliteCounters(db)
    await local.get(KEY)
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            str(WORKER),
            spec,
            "70",
            "50",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        for _ in range(2)
    ]
    for p in procs:
        assert p.stdout is not None
        assert (await p.stdout.readline()).strip() == b"ready"
    for p in procs:
        assert p.stdin is not None
        p.stdin.write(b"go\n")
        await p.stdin.drain()
    here = asyncio.gather(*(local.reserve([Limit(KEY, 50)], 1) for _ in range(60)))
    outs = await asyncio.gather(*(p.communicate() for p in procs))
    granted_here = sum(await here)
    granted_there = [int(out.strip()) for out, _ in outs]
    assert all(p.returncode == 0 for p in procs)
    assert granted_here + sum(granted_there) == 50
    assert await local.get(KEY) == 50
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
