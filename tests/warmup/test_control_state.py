"""Per-IP control state shared by processes: one record per fact, compare-and-set, and a
failing SQLite store made visible (real SQLite files, a real redis-server, real processes)."""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiosmtplib
import pytest
from aiosmtpd.smtp import Envelope
from support.cli import warmrelay_async
from support.polling import eventually
from support.redisserver import RedisServer, free_port
from support.relay import http_get, relay_config, relay_doc, running, send, status
from support.relayproc import RelayProcess
from support.sink import Sink

from warmrelay.config import Config, parse_config
from warmrelay.warmup.control import PAUSE, PROGRESS, Persisted, Progress, legacy_key
from warmrelay.warmup.counters import CounterKey, Counters, Limit, MemoryCounters, SqliteCounters
from warmrelay.warmup.counters.base import update_value
from warmrelay.warmup.counters.redis import RedisCounters
from warmrelay.warmup.plan import WarmupState
from warmrelay.warmup.router import Router, RouteReason

DAY1 = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)
DAY2 = DAY1 + timedelta(days=1)
WARMING = "127.0.0.2"
WORKER_TIMEOUT_S = 60.0  # a worker process that hangs fails the test instead of the suite


def results_config() -> Config:
    return parse_config(
        {
            "ips": [
                {
                    "address": WARMING,
                    "helo": "a.example.test",
                    "warmup": {
                        "start": "2026-11-01",
                        "schedule": [100, 200, 400],
                        "progress": "results",
                    },
                },
                {"address": "127.0.0.3", "helo": "b.example.test"},
            ]
        }
    )


async def connect_writer(counters: Counters) -> None:
    """Two SQLite clients in one process share the writers' lock (POSIX record locks belong
    to the process), so their first writes (the schema, the pruning) can race as two
    processes' never do ("database is locked"). Each client opens its write connection here,
    before any race; the delete of an absent key writes nothing."""
    await counters.set_value("test:connected", None)


class SharedStore:
    """Opens any number of independent clients (as separate processes would) on one store."""

    def __init__(self, kind: str, tmp_path: Path) -> None:
        self.kind, self.tmp_path = kind, tmp_path
        self.server: RedisServer | None = None
        self.clients: list[Counters] = []

    async def start(self) -> SharedStore:
        if self.kind == "redis":
            # set before it starts: stop() stops it even if it never got ready
            self.server = RedisServer(self.tmp_path / "redis")
            await self.server.start()
        return self

    @property
    def spec(self) -> str:
        return self.server.url if self.server else f"sqlite:{self.tmp_path / 'c.sqlite3'}"

    async def client(self) -> Counters:
        c: Counters = (
            RedisCounters(self.server.url)
            if self.server
            else SqliteCounters(self.tmp_path / "c.sqlite3")
        )
        self.clients.append(c)
        if self.server is None:
            await connect_writer(c)
        return c

    async def stop(self) -> None:
        for c in self.clients:
            await c.close()
        if self.server is not None:
            await self.server.stop()


@pytest.fixture(params=["sqlite", "redis"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[SharedStore]:
    s = SharedStore(request.param, tmp_path)
    try:
        yield await s.start()
    finally:
        await s.stop()


@pytest.fixture(params=["memory", "sqlite", "redis"])
async def counters(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Counters]:
    if request.param == "memory":
        yield MemoryCounters()
        return
    s = SharedStore(request.param, tmp_path)
    try:
        await s.start()
        yield await s.client()
    finally:
        await s.stop()


class DamagedHeader:
    """A real fault an open SQLite connection cannot read past: the file's header is
    overwritten on disk, then another process on the host commits (so every other
    connection must re-read the file). Experiment showed that a damaged file alone is
    invisible to a connection that has its pages cached (WAL); this is not."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.header = b""
        self.other: sqlite3.Connection | None = None

    def inject(self) -> None:
        other = self.other = sqlite3.connect(self.path, isolation_level=None)
        busy, _, _ = other.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        assert busy == 0  # every page is in the file now, none in the WAL
        other.execute("SELECT * FROM state").fetchall()  # its cache is warm: it writes below
        other.execute("SELECT key FROM state WHERE key = 'test:fault'").fetchall()
        with open(self.path, "r+b") as f:
            self.header = f.read(100)
            f.seek(0)
            f.write(b"\xa5" * 100)
        other.execute("INSERT OR REPLACE INTO state(key, value) VALUES('test:fault', 'x')")

    def repair(self) -> None:
        with open(self.path, "r+b") as f:
            f.write(self.header)
        assert self.other is not None
        self.other.close()


# -- compare-and-set, on every backend ------------------------------------------------


async def test_compare_and_set(counters: Counters) -> None:
    assert await counters.compare_and_set("k", None, "1")  # absent -> created
    assert not await counters.compare_and_set("k", None, "2")  # no longer absent
    assert not await counters.compare_and_set("k", "0", "2")  # not what it is
    assert await counters.get_value("k") == "1"
    assert await counters.compare_and_set("k", "1", "2")
    assert await counters.get_value("k") == "2"
    assert await counters.compare_and_set("k", "2", None)  # deleted
    assert await counters.get_value("k") is None
    assert await counters.compare_and_set("k", None, None)  # absent stays absent


CAS_WORKER = """
import asyncio, json, sys
from pathlib import Path
from warmrelay.warmup.counters import SqliteCounters, open_counters
from warmrelay.warmup.counters.base import update_value

async def bump(text):
    return json.dumps((json.loads(text) if text else 0) + 1)

async def main(spec, n):
    if spec.startswith("sqlite:"):
        c = SqliteCounters(Path(spec.removeprefix("sqlite:")))
    else:
        c = open_counters(spec, Path("."))
    await c.get_value("test:n")
    print("ready", flush=True)
    sys.stdin.readline()
    for _ in range(n):
        await update_value(c, "test:n", bump)
    await c.close()

asyncio.run(main(sys.argv[1], int(sys.argv[2])))
"""


async def test_read_modify_write_loses_nothing_across_processes(store: SharedStore) -> None:
    """Two OS processes and three tasks here change one record 60 times each at once."""
    local = await store.client()

    async def bump(text: str | None) -> str | None:
        return json.dumps((json.loads(text) if text else 0) + 1)

    procs: list[asyncio.subprocess.Process] = []
    try:
        for _ in range(2):
            procs.append(
                await asyncio.create_subprocess_exec(
                    sys.executable,
                    "-c",
                    CAS_WORKER,
                    store.spec,
                    "60",
                    stdin=asyncio.subprocess.PIPE,
                    stdout=asyncio.subprocess.PIPE,
                )
            )
        for p in procs:
            assert p.stdout is not None
            ready = await asyncio.wait_for(p.stdout.readline(), WORKER_TIMEOUT_S)
            assert ready.strip() == b"ready"

        async def here() -> None:
            for _ in range(60):
                await update_value(local, "test:n", bump)

        outs = [p.communicate(b"go\n") for p in procs]
        await asyncio.wait_for(asyncio.gather(*outs, here(), here(), here()), WORKER_TIMEOUT_S)
        assert [p.returncode for p in procs] == [0, 0]
        assert await local.get_value("test:n") == "300"
    finally:
        for p in procs:
            if p.returncode is None:
                p.kill()
                await p.wait()


# -- the fleet bug: facts changed by different processes all survive ------------------


async def test_pause_throttle_and_day_advance_from_two_processes_all_survive(
    store: SharedStore,
) -> None:
    """The interleaving that lost facts with one blob per IP: each router writes from a
    stale view of the others' facts."""
    a = Router(results_config(), await store.client())
    b = Router(results_config(), await store.client())
    ip = a.ips[0]
    plan = await a.route(100, DAY1)  # day 1's cap used in full: day 2 begins tomorrow
    assert sum(p.count for p in plan.routes if p.reason is RouteReason.WARMUP) == 100
    await b.refresh(DAY1)
    await b.refresh(DAY2)  # b judges day 1 and advances
    assert b.status(ip, DAY2).day == 2
    assert await a.pause(WARMING, DAY2) is Persisted.STORED  # a still believes day 1
    gmail = await b.throttled(ip, "gmail", 1, DAY2, "421 4.7.28")  # b believes "running"
    yahoo = await a.throttled(ip, "yahoo", 1, DAY2, "421 4.7.0 [TSS04]")  # a: no gmail

    fresh = Router(results_config(), await store.client())
    await fresh.refresh(DAY2)
    c = fresh.control(WARMING)
    assert c.paused_since == DAY2.date()
    assert (c.day, c.day_date) == (2, DAY2.date())
    assert c.suspended == {"gmail": gmail, "yahoo": yahoo}
    st = fresh.status(ip, DAY2)
    assert (st.state, st.day) == (WarmupState.PAUSED, 2)
    a.reload_soon()
    await a.refresh(DAY2)  # the stale one converges
    assert a.control(WARMING) == c


async def test_two_processes_judging_the_same_day_advance_it_once(store: SharedStore) -> None:
    routers = [Router(results_config(), await store.client()) for _ in range(3)]
    await routers[0].route(100, DAY1)
    for day in (DAY2, DAY2 + timedelta(days=1)):  # day 2 used nothing: it repeats
        await asyncio.gather(*(r.refresh(day) for r in routers))
    fresh = Router(results_config(), await store.client())
    day3 = DAY2 + timedelta(days=1)
    await fresh.refresh(day3)
    assert fresh.control(WARMING).progress == Progress(2, day3.date())
    assert {r.status(r.ips[0], day3).day for r in routers} == {2}


async def test_the_throttle_cooldown_can_be_given(store: SharedStore) -> None:
    router = Router(results_config(), await store.client())
    ip = router.ips[0]
    s = await router.throttled(ip, "gmail", 1, DAY1, "550 5.7.1 blocked", cooldown=(7200, 86400))
    assert (s.cooldown_s, s.until) == (7200, DAY1 + timedelta(hours=2))
    again = await router.throttled(ip, "gmail", 1, s.until, "550 5.7.1", cooldown=(7200, 86400))
    assert again.cooldown_s == 14400  # a repeat doubles it, from the stored suspension
    usual = await router.throttled(ip, "yahoo", 1, DAY1, "421 4.7.0 [TSS04]")
    assert usual.cooldown_s == 3600  # the configured default


async def test_throttles_of_sends_already_under_way_do_not_double_the_cooldown(
    store: SharedStore,
) -> None:
    """12 sends in flight when Gmail starts throttling all get 421 within a second: one
    episode, one cooldown (each of them doubling it took 1 h to 24 h at once)."""
    router = Router(results_config(), await store.client())
    ip = router.ips[0]
    moments = [DAY1 + timedelta(milliseconds=80 * i) for i in range(12)]
    got = [await router.throttled(ip, "gmail", 1, at, "421 4.7.28 rate") for at in moments]
    assert {s.cooldown_s for s in got} == {3600}
    assert {s.until for s in got} == {DAY1 + timedelta(hours=1)}
    block = await router.throttled(ip, "gmail", 1, moments[-1], "550 5.7.1", cooldown=(7200, 86400))
    assert block.blocked and block.cooldown_s >= 7200  # a block is news: it replaces it
    later = await router.throttled(ip, "gmail", 1, block.until, "421 4.7.28 rate")
    assert later.cooldown_s >= 7200  # a repeat after the episode still doubles


async def test_the_single_blob_of_earlier_versions_is_migrated_once(tmp_path: Path) -> None:
    counters = SqliteCounters(tmp_path / "c.sqlite3")
    blob = {
        "paused_since": "2026-11-02",
        "paused_days": 1,
        "completed": False,
        "day": 2,
        "day_date": "2026-11-02",
        "suspended": {
            "gmail": {"until": "2026-11-02T13:00:00+00:00", "cooldown_s": 3600, "reason": "x"}
        },
    }
    await counters.set_value(legacy_key(WARMING), json.dumps(blob))
    first = Router(results_config(), counters)
    await first.refresh(DAY2)
    c = first.control(WARMING)
    assert (c.paused_since, c.paused_days, c.day) == (DAY2.date(), 1, 2)
    assert set(c.suspended) == {"gmail"}
    assert await counters.get_value(legacy_key(WARMING)) is None
    await first.resume(WARMING, DAY2)
    # an earlier-version process still running writes its blob again: nothing newer is undone
    await counters.set_value(legacy_key(WARMING), json.dumps(blob))
    second = Router(results_config(), counters)
    await second.refresh(DAY2)
    assert second.control(WARMING).paused_since is None
    assert second.control(WARMING).suspended == c.suspended
    assert PROGRESS.loads(await counters.get_value(PROGRESS.key(WARMING))) == Progress(
        2, DAY2.date()
    )
    await counters.close()


# -- a failing SQLite store ---------------------------------------------------------


async def test_a_change_made_while_sqlite_fails_is_stored_when_it_answers(tmp_path: Path) -> None:
    path = tmp_path / "c.sqlite3"
    counters = SqliteCounters(path)
    router = Router(results_config(), counters)
    await router.refresh(DAY1)
    fault = DamagedHeader(path)
    fault.inject()
    assert await router.pause(WARMING, DAY1) is Persisted.PENDING
    assert counters.healthy is False
    assert router.status(router.ips[0], DAY1).state is WarmupState.PAUSED  # in force here
    fault.repair()
    reader = SqliteCounters(path)

    async def stored() -> bool:
        await router.refresh(DAY1)  # writes what is pending once the store answers
        return PAUSE.loads(await reader.get_value(PAUSE.key(WARMING))).since == DAY1.date()

    await eventually(stored, timeout_s=20, what="the pending pause stored")
    assert counters.healthy is True
    await counters.close()
    await reader.close()


async def test_sqlite_failure_is_visible_and_mail_still_flows(
    tmp_path: Path, sink: Sink, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "warmrelay.counters")
    config = relay_config(tmp_path, sink.port, cap=1000)
    async with running(config) as relay:
        await send(relay, ["before@example.test"])
        (before,) = await sink.wait_for(1)
        assert before.peer == WARMING
        fault = DamagedHeader(config.state.dir / "counters.sqlite3")
        fault.inject()

        code, body = await http_get(relay.admin.port, "/status")
        assert code == 200
        page = json.loads(body)
        assert page["counters"]["up"] is False
        assert page["ips"][0]["sent"] is None  # unknown while the store fails
        code, health = await http_get(relay.admin.port, "/healthz")
        assert (code, health.startswith(b"degraded: counters store unreachable")) == (200, True)
        code, metrics = await http_get(relay.admin.port, "/metrics")
        assert code == 200 and b"warmrelay_counters_up 0.0" in metrics
        for i in range(3):
            await send(relay, [f"down{i}@example.test"])  # accepted, and delivered...
        got = await sink.wait_for(4)
        assert {m.peer for m in got[1:]} == {"127.0.0.3"}  # ...via the pool

        fault.repair()

        async def up() -> bool:
            return bool((await status(relay))["counters"]["up"])

        await eventually(up, timeout_s=20, what="counters up again")  # it recovers by itself
        await send(relay, ["after@example.test"])
        after = (await sink.wait_for(5))[-1]
        assert after.peer == WARMING
        _, health = await http_get(relay.admin.port, "/healthz")
        assert health == b"ok\n"
        assert (await status(relay))["ips"][0]["sent"] == 2  # before + after
    logged = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "warmrelay.counters"]
    assert [level for level, _ in logged] == [logging.ERROR, logging.WARNING]  # once each
    assert "failing" in logged[0][1] and "answering again" in logged[1][1]


# -- end to end: serve --workers 2, a throttle in a worker, `warmrelay ip pause` -----------


def throttles_brand(peer: str, envelope: Envelope) -> str | None:
    if peer == WARMING and envelope.rcpt_tos[0].endswith("@brand.test"):
        return "421 4.7.28 unusual rate of unsolicited mail from your IP"
    return None


async def test_workers_keep_a_throttle_the_progress_day_and_an_operator_pause(
    tmp_path: Path,
    make_sink: Callable[..., Awaitable[Sink]],
    relay_process: Callable[..., Awaitable[RelayProcess]],
) -> None:
    sink = await make_sink(data_reply=throttles_brand)
    today = datetime.now(UTC).date()
    yesterday = today - timedelta(days=1)
    doc = relay_doc(
        tmp_path,
        sink.port,
        admin={"listen": f"127.0.0.1:{free_port()}"},  # the ip command must find it
        ips=[
            {
                "address": WARMING,
                "helo": "mta1.example.test",
                "warmup": {"start": "2026-01-01", "schedule": [10] * 3650, "progress": "results"},
            },
            {"address": "127.0.0.3", "helo": "mta2.example.test"},
        ],
    )
    db = tmp_path / "state" / "counters.sqlite3"
    seed = SqliteCounters(db)  # an earlier version's state: on day 5 yesterday, cap used
    blob = {"day": 5, "day_date": yesterday.isoformat(), "suspended": {}}
    await seed.set_value(legacy_key(WARMING), json.dumps(blob))
    await seed.reserve([Limit(CounterKey(WARMING, yesterday.isoformat()), 10)], 10)
    await seed.close()

    relay = await relay_process(doc, "--workers", "2")  # killed at the end if still running
    await send_to(relay.smtp_port, "someone@brand.test")
    (rerouted,) = await sink.wait_for(1)
    assert rerouted.peer == "127.0.0.3"  # throttled from the warming IP in a worker

    command = await warmrelay_async("ip", "pause", WARMING, "-c", str(relay.config_path))
    assert command.returncode == 0, command.stderr
    assert "done by the running relay" in command.stdout

    code, body = await http_get(relay.admin_port, "/status")
    assert code == 200
    warming = json.loads(body)["ips"][0]
    assert warming["state"] == "paused"
    assert warming["paused_since"] == today.isoformat()
    assert warming["warmup_day"] == 6  # judged once by three processes: 5 -> 6
    assert set(warming["suspended"]) == {"brand.test"}
    assert "4.7.28" in warming["suspended"]["brand.test"]["reason"]
    assert await asyncio.wait_for(relay.terminate(), 60) == 0  # drains and stops

    reader = SqliteCounters(db)
    try:
        fresh = Router(parse_config(doc), reader)
        await fresh.refresh(datetime.now(UTC))
        c = fresh.control(WARMING)
        assert (c.paused_since, c.day, set(c.suspended)) == (today, 6, {"brand.test"})
        assert await reader.get_value(legacy_key(WARMING)) is None
    finally:
        await reader.close()


async def send_to(port: int, rcpt: str) -> None:
    message = f"From: <app@sender.test>\r\nTo: <{rcpt}>\r\nSubject: t\r\n\r\nhi\r\n"
    async with aiosmtplib.SMTP(hostname="127.0.0.1", port=port) as client:
        await client.sendmail("app@sender.test", [rcpt], message.encode())
