"""Shared counters under contention: coalesced batches stay exact across OS processes, and a
batch the store fails fails every request in it (nothing granted), then the store recovers."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import sqlite3
import sys
import time
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from typing import TypeVar

import pytest
from support.counter_worker import CAPS, DAY, H08, H09, KINDS, PROV_A, PROV_B
from support.polling import eventually
from support.redisserver import RedisServer

from warmrelay.errors import CounterError
from warmrelay.warmup.counters import CounterKey, Counters, Limit, SqliteCounters
from warmrelay.warmup.counters.redis import RedisCounters

WORKER = Path(__file__).resolve().parents[1] / "support" / "counter_worker.py"
KEY = CounterKey("127.0.0.2", "2026-11-28")
PROCESS_TIMEOUT_S = 60.0  # a helper process that hangs fails the test instead of the suite
T = TypeVar("T")


@contextlib.asynccontextmanager
async def shared_store(tmp_path: Path, backend: str) -> AsyncIterator[tuple[str, Counters]]:
    """(the spec a worker process opens, this process's own client of the same store)"""
    if backend == "redis":
        server = RedisServer(tmp_path / "redis")
        try:
            await server.start()
            local: Counters = RedisCounters(server.url)
            try:
                yield server.url, local
            finally:
                await local.close()
        finally:
            await server.stop()
    else:
        db = tmp_path / "shared.sqlite3"
        local = SqliteCounters(db)
        try:
            yield f"sqlite:{db}", local
        finally:
            await local.close()


@contextlib.asynccontextmanager
async def workers() -> AsyncIterator[list[asyncio.subprocess.Process]]:
    """The worker processes a test starts; any still running at the end is killed."""
    procs: list[asyncio.subprocess.Process] = []
    try:
        yield procs
    finally:
        for p in procs:
            if p.returncode is None:
                p.kill()
                await p.wait()


async def start_worker(procs: list[asyncio.subprocess.Process], *args: str) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(WORKER),
        *args,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    procs.append(proc)
    assert proc.stdout is not None
    assert (await bounded(proc.stdout.readline())).strip() == b"ready"


async def tell(procs: list[asyncio.subprocess.Process], word: bytes) -> None:
    for p in procs:
        assert p.stdin is not None
        p.stdin.write(word + b"\n")
        await p.stdin.drain()


async def bounded(step: Awaitable[T]) -> T:
    """A read from or a wait for a helper process, bounded in time."""
    return await asyncio.wait_for(step, PROCESS_TIMEOUT_S)


@pytest.mark.parametrize("ops", [0, 25], ids=["fill", "churn-then-fill"])
@pytest.mark.parametrize("backend", ["sqlite", "redis"])
async def test_processes_never_exceed_day_hour_or_provider_caps(
    tmp_path: Path, backend: str, ops: int
) -> None:
    """3 OS processes x 45 tasks, each task of one kind (day + hour + provider limits),
    reserving 1..4 and releasing part of what it holds (``ops`` steps), then everyone
    reserves until nothing more is granted. Meanwhile this process watches every count."""
    async with shared_store(tmp_path, backend) as (spec, local), workers() as procs:
        for seed in range(3):
            await start_worker(procs, spec, "mix", "45", str(ops), str(seed))
        await tell(procs, b"go")
        churned = asyncio.ensure_future(
            bounded(asyncio.gather(*(p.stdout.readline() for p in procs if p.stdout)))
        )
        watched = 0
        while not churned.done() or not watched:
            for key, cap in CAPS.items():  # a grant over a cap would show here
                assert await local.get(key) <= cap, key
            watched += 1
        assert [line.strip() for line in await churned] == [b"churned"] * 3
        await tell(procs, b"fill")
        outs = [
            json.loads(out)
            for out, _ in await bounded(asyncio.gather(*(p.communicate() for p in procs)))
        ]
        assert [p.returncode for p in procs] == [0, 0, 0]
        assert [o["errors"] for o in outs] == [0, 0, 0]
        if ops:
            assert sum(o["zeros"] for o in outs) > 0  # the churn ran into the caps
        held = {kind: sum(o["held"][kind] for o in outs) for kind in KINDS}
        counts = {key: await local.get(key) for key in CAPS}
    # every key counts exactly what the tasks hold: all keys of a grant moved together
    assert counts[DAY] == held["A"] + held["B"] + held["C"]
    assert counts[H08] == held["A"] + held["B"]
    assert counts[H09] == held["C"]
    assert counts[PROV_A] == held["A"]
    assert counts[PROV_B] == held["B"] + held["C"]
    assert all(counts[key] <= cap for key, cap in CAPS.items()), counts
    # and a kind was refused only because one of its caps is reached exactly
    for kind, keys in KINDS.items():
        assert any(counts[key] == CAPS[key] for key in keys), (kind, counts)


@pytest.mark.parametrize("backend", ["sqlite", "redis"])
async def test_four_processes_of_100_tasks_grant_the_small_cap_exactly(
    tmp_path: Path, backend: str
) -> None:
    async with shared_store(tmp_path, backend) as (spec, local), workers() as procs:
        for _ in range(4):
            await start_worker(procs, spec, "100", "150")
        await tell(procs, b"go")
        outs = await bounded(asyncio.gather(*(p.communicate() for p in procs)))
        assert [p.returncode for p in procs] == [0] * 4
        assert sum(int(out) for out, _ in outs) == 150
        assert await local.get(KEY) == 150


# -- a batch the store fails ---------------------------------------------------------------


@contextlib.asynccontextmanager
async def lock_holder(path: Path) -> AsyncIterator[asyncio.subprocess.Process]:
    """Another process holding the writers' lock of the database at ``path`` until it reads a
    line (or is killed); killed at the end if still running."""
    holder = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        "import sys\n"
        "from pathlib import Path\n"
        "from warmrelay.warmup.counters.sqlite import WriterLock\n"
        f"with WriterLock(Path({str(path) + '.lock'!r})).held():\n"
        "    print('held', flush=True)\n"
        "    sys.stdin.readline()\n",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert holder.stdout is not None
        assert await bounded(holder.stdout.readline()) == b"held\n"
        yield holder
    finally:
        if holder.returncode is None:
            holder.kill()
            await holder.wait()


def waits_for_lock(lock: Path) -> bool:
    """This process has a blocked request for a lock on the file ``lock``: the kernel lists
    it in /proc/locks with "->" (an observation, where a sleep would only hope)."""
    inode, pid = str(os.stat(lock).st_ino), str(os.getpid())
    for line in Path("/proc/locks").read_text().splitlines():
        fields = line.split()
        if fields[1:2] == ["->"] and fields[5] == pid and fields[6].rsplit(":", 1)[1] == inode:
            return True
    return False


async def batch(counters: Counters, limits: list[Limit], size: int) -> list[int | BaseException]:
    """``size`` concurrent single reservations: one batch."""
    return await asyncio.gather(
        *(counters.reserve(limits, 1) for _ in range(size)), return_exceptions=True
    )


def all_failed(results: list[int | BaseException]) -> bool:
    return all(isinstance(r, CounterError) for r in results)


async def recovered(counters: Counters, limits: list[Limit], size: int) -> list[int]:
    """The grants of the first batch that the store answers again (after the back-off)."""
    answered: list[int] = []

    async def check() -> bool:
        results = await batch(counters, limits, size)
        if all_failed(results):
            return False
        assert all(isinstance(r, int) for r in results), results  # never half a batch
        answered.extend(r for r in results if isinstance(r, int))
        return True

    await eventually(check)
    return answered


def counter_errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "warmrelay.counters" and r.levelno >= logging.ERROR
    ]


async def test_sqlite_batch_fails_whole_while_another_writer_holds_the_database(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "c.sqlite3"
    counters = SqliteCounters(path, busy_timeout_s=0.3)
    limits = [Limit(KEY, 50)]
    try:
        assert await counters.reserve(limits, 5) == 5
        with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as blocker:
            blocker.execute("BEGIN IMMEDIATE")  # e.g. the sqlite3 shell
            assert all_failed(await batch(counters, limits, 40))
            assert counters.healthy is False
            blocker.execute("ROLLBACK")
        assert sum(await recovered(counters, limits, 40)) == 40
        assert counters.healthy is True
        assert await counters.get(KEY) == 45
    finally:
        await counters.close()
    assert len(counter_errors(caplog)) == 1  # once per failure episode


async def test_sqlite_batch_abandoned_behind_a_stuck_lock_holder_never_commits(
    tmp_path: Path,
) -> None:
    """Another relay process holds the writers' lock and is stuck (stopped, not dead): the
    batch fails after the busy timeout, and when the lock frees it must not commit after
    all (its callers were told it failed)."""
    path = tmp_path / "c.sqlite3"
    counters = SqliteCounters(path, busy_timeout_s=0.3)
    limits = [Limit(KEY, 1000)]
    try:
        assert await counters.reserve(limits, 2) == 2
        async with lock_holder(path) as holder:
            started = time.monotonic()
            assert all_failed(await batch(counters, limits, 40))
            assert time.monotonic() - started < 5  # the busy timeout, not forever
            assert counters.healthy is False
            await bounded(holder.communicate(b"\n"))  # the lock frees: the abandoned batch gets it
            assert holder.returncode == 0
        assert sum(await recovered(counters, limits, 40)) == 40
        assert await counters.get(KEY) == 42  # 2 + 40, not + the 40 that failed
    finally:
        await counters.close()


async def test_sqlite_lock_of_a_killed_process_frees_at_once(tmp_path: Path) -> None:
    """kill -9 of a relay process holding the writers' lock: the kernel drops it, the next
    batch goes at once (not after the busy timeout of 30 s) and nothing is lost."""
    path = tmp_path / "c.sqlite3"
    counters = SqliteCounters(path)  # the default 30 s busy timeout
    limits = [Limit(KEY, 1000)]
    try:
        assert await counters.reserve(limits, 2) == 2
        async with lock_holder(path) as holder:
            waiting = asyncio.ensure_future(batch(counters, limits, 40))
            lock = Path(f"{path}.lock")
            await eventually(
                lambda: waits_for_lock(lock), what="the batch queued behind the holder"
            )
            assert not waiting.done()  # it does wait for the lock
            started = time.monotonic()
            holder.kill()
            await holder.wait()
        assert await bounded(waiting) == [1] * 40
        assert time.monotonic() - started < 5
        assert await counters.get(KEY) == 42
    finally:
        await counters.close()


async def test_sqlite_batch_on_a_garbage_file_fails_whole_then_works_once_restored(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    backup = tmp_path / "backup.sqlite3"
    good = SqliteCounters(backup)
    assert await good.reserve([Limit(KEY, 20)], 7) == 7
    await good.close()
    path = tmp_path / "c.sqlite3"
    path.write_bytes(b"this is not a database\n" * 200)
    counters = SqliteCounters(path)
    limits = [Limit(KEY, 20)]
    try:
        assert all_failed(await batch(counters, limits, 30))
        assert counters.healthy is False
        assert len(counter_errors(caplog)) == 1
        assert "not a database" in counter_errors(caplog)[0]
        shutil.copyfile(backup, path)  # the operator restores the file
        assert sum(await recovered(counters, limits, 30)) == 13  # 7 + 13 = the cap of 20
        assert await counters.get(KEY) == 20
    finally:
        await counters.close()


async def test_redis_batch_fails_whole_while_the_server_is_down(redis_server: RedisServer) -> None:
    counters = RedisCounters(redis_server.url)
    limits = [Limit(KEY, 20), Limit(CounterKey("127.0.0.2", "2026-11-28", "h08"), 25)]
    try:
        assert await counters.reserve(limits, 3) == 3
        await redis_server.stop()
        assert all_failed(await batch(counters, limits, 30))
        assert counters.healthy is False
        await redis_server.start()  # same port, counts kept (appendonly)
        assert sum(await recovered(counters, limits, 30)) == 17
        assert await counters.get(KEY) == 20
    finally:
        await counters.close()
