"""progress: reputation end to end: pairs judged once per day across a fleet, feeds that
cannot be read, a live SNDS RED that pauses one provider within one fetch."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web
from support.cli import warmrelay
from support.redisserver import redis_running
from support.relay import relay_doc, running, send
from support.sink import Sink

from warmrelay.config import parse_config
from warmrelay.reputation.controller import Decision
from warmrelay.reputation.fetch import FeedRunner
from warmrelay.reputation.signals import FeedStore, PairCounts
from warmrelay.warmup.counters import Counters, SqliteCounters
from warmrelay.warmup.counters.redis import RedisCounters
from warmrelay.warmup.router import Router

WARMING = "127.0.0.2"
START = date(2026, 11, 20)
TODAY = datetime(2026, 12, 2, 9, 0, tzinfo=UTC)  # judges 11-20 .. 12-01
SNDS_ENV = "WARMRELAY_TEST_SNDS_URL"


def doc(tmp_path: Path, **reputation: Any) -> dict[str, Any]:
    return {
        "state": {"dir": str(tmp_path / "state")},
        "ips": [
            {
                "address": WARMING,
                "helo": "mta1.example.test",
                "warmup": {
                    "start": START.isoformat(),
                    "schedule": [10 * d for d in range(1, 31)],
                    "progress": "reputation",
                },
            },
            {"address": "127.0.0.3", "helo": "mta2.example.test"},
        ],
        "reputation": reputation,
    }


@pytest.fixture(params=["sqlite", "redis"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[list[Counters]]:
    """Two clients of one store, as two relays would have."""
    if request.param == "sqlite":
        clients: list[Counters] = [
            SqliteCounters(tmp_path / "state" / "counters.sqlite3") for _ in range(2)
        ]
        for c in clients:  # connect before racing (one process stands in for two)
            await c.set_value("warm-up", None)
        try:
            yield clients
        finally:
            for c in clients:
                await c.close()
        return
    async with redis_running(tmp_path / "redis") as server:
        clients = [RedisCounters(server.url) for _ in range(2)]
        try:
            yield clients
        finally:
            for c in clients:
                await c.close()


async def test_two_relays_on_one_store_judge_each_day_once(
    tmp_path: Path, store: list[Counters], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="warmrelay.reputation")
    config = parse_config(doc(tmp_path))
    counts = PairCounts(store[0], config.zone)
    feeds = FeedStore(store[0])
    last = date(2026, 12, 1)
    for p in ("gmail", "yahoo"):
        for what, n in (("tried", 1000), ("handed", 1000)):
            counts.note(WARMING, p, what, n, datetime(2026, 12, 1, 12, tzinfo=UTC))  # type: ignore[arg-type]
    counts.note(WARMING, "yahoo", "complaint", 4, datetime(2026, 12, 1, 12, tzinfo=UTC))
    await counts.flush()
    await feeds.put(WARMING, "gmail", last, {"spam_rate": 0.0024})
    routers = [Router(config, c) for c in store]
    decisions: list[tuple[str, str, Decision]] = []
    for r in routers:
        assert r.pairs is not None
        r.pairs.on_decision = lambda ip, p, d: decisions.append((ip, p, d))
    await asyncio.gather(*(r.refresh(TODAY) for r in routers))
    days = (last - START).days + 1
    pairs = routers[0].pairs
    assert pairs is not None
    for provider in pairs.providers:  # one decision per provider and day, fleet-wide
        assert len([d for _, p, d in decisions if p == provider]) == days, provider
    gmail = [d for _, p, d in decisions if p == "gmail"][-1]
    assert (gmail.on, gmail.label, gmail.reason) == (
        last,
        "back 2",
        "spam rate 0.24 % \u2265 0.2 %",
    )
    yahoo = [d for _, p, d in decisions if p == "yahoo"][-1]
    assert yahoo.action == "pause" and yahoo.reason == "complaint rate 0.4 % \u2265 0.3 %"
    # days nobody judged before: one summary line per pair, then the last days' own lines
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith(WARMING)]
    assert (
        f"{WARMING} gmail: 12 days judged at once (2026-11-20 to 2026-12-01): 11 advance, "
        "1 back 2" in said
    )
    assert len([m for m in said if m.startswith(f"{WARMING} gmail: ")]) == 1 + 3
    said = [r.getMessage() for r in caplog.records if "gmail: back" in r.getMessage()]
    assert said == [
        f"{WARMING} gmail: back 2 days (spam rate 0.24 % \u2265 0.2 % on 2026-12-01); "
        "signals: complaint_rate 0 %, deferral_rate 0 %, hard_bounce_rate 0 %, "
        "spam_rate 0.24 %, throttle_rate 0 %"
    ]
    for r in routers:  # both see the one stored state
        assert r.pairs is not None
        await r.pairs.load()
        ip = r.ips[0]
        assert r.pairs.state(WARMING, "gmail").day == days - 2  # 11 advances, then back 2
        assert r.pairs.state(WARMING, "yahoo").paused
        assert r.status(ip, TODAY).day == days + 1  # the furthest pair: 13
        gmail_caps = r.caps(ip, TODAY, "gmail")
        assert gmail_caps is not None
        assert [lim.cap for lim in gmail_caps.limits] == [130, 100]  # the IP's, gmail's (day 10)
        plan = await r.route(5, TODAY, "yahoo")
        assert plan.routes[0].address == "127.0.0.3"  # paused for yahoo: the pool takes it
        assert "reputation paused for yahoo" in plan.routes[0].log_reason


async def test_schedule_shows_each_providers_day_and_last_decision(tmp_path: Path) -> None:
    document = doc(tmp_path)
    path = tmp_path / "relay.yaml"
    path.write_text(yaml.safe_dump(document))
    config = parse_config(document)
    counters = SqliteCounters(config.state.dir / "counters.sqlite3")
    try:
        await FeedStore(counters).put(WARMING, "gmail", date(2026, 12, 1), {"spam_rate": 0.0024})
        await Router(config, counters).refresh(TODAY)
    finally:
        await counters.close()
    shown = warmrelay("schedule", "-c", str(path), "--days", "1")
    assert shown.returncode == 0, shown.stderr
    assert "progress: reputation: each provider has its own day" in shown.stdout
    line = next(x for x in shown.stdout.splitlines() if x.strip().startswith("gmail"))
    assert "day  10" in line and "last: 2026-12-01 back 2 (spam rate 0.24 % \u2265 0.2 %)" in line


async def test_a_feed_that_cannot_be_read_holds_after_two_days(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dead = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
    port = dead.sockets[0].getsockname()[1]
    document = doc(tmp_path, snds={"url_env": SNDS_ENV}, fetch_timeout_s=5)
    config = parse_config(document)
    counters = SqliteCounters(config.state.dir / "counters.sqlite3")
    router = Router(config, counters)
    monkeypatch.setenv(SNDS_ENV, f"http://127.0.0.1:{port}/data/?key=SECRETKEY")
    try:
        for n in range(10):  # read fine (a quiet IP: no line of it) until 11-29
            await FeedStore(counters).mark("snds", START + timedelta(days=n), "ok")
        for day in (date(2026, 11, 30), date(2026, 12, 1)):
            clock = datetime.combine(day + timedelta(days=1), datetime.min.time(), UTC)
            runner = FeedRunner(lambda: config, counters, lambda: router.pairs, lambda c=clock: c)
            await runner.fetch("snds")
            why = await runner.store.status("snds", day)
            assert why is not None and why != "ok" and "SECRETKEY" not in why
        await router.refresh(TODAY)
    finally:
        await counters.close()
        dead.close()
    assert router.pairs is not None
    ms = router.pairs.state(WARMING, "microsoft")
    assert ms.last is not None and ms.last.label == "hold"
    assert ms.last.reason.startswith("snds unknown for 2 days")
    assert router.pairs.state(WARMING, "gmail").last.label == "advance"  # type: ignore[union-attr]


def snds_line(ip: str, day: date, level: str) -> str:
    d = f"{day.month}/{day.day}/{day.year}"
    return f"{ip},{d} 12:00 AM,{d} 11:59 PM,120,120,120,{level},< 0.1%,,,0,mta1.example.test,,\r\n"


async def test_snds_red_moves_microsoft_mail_to_the_pool_within_one_fetch(
    tmp_path: Path, sink: Sink, monkeypatch: pytest.MonkeyPatch
) -> None:
    level = {"now": "GREEN"}
    today = datetime.now(UTC).date()

    async def data(request: web.Request) -> web.Response:
        return web.Response(text=snds_line(WARMING, today, level["now"]), content_type="text/csv")

    app = web.Application()
    app.router.add_get("/data/", data)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    monkeypatch.setenv(SNDS_ENV, f"http://127.0.0.1:{port}/data/?key=k")
    document = relay_doc(tmp_path, sink.port, cap=1000)
    document["ips"][0]["warmup"]["progress"] = "reputation"
    document["reputation"] = {"snds": {"url_env": SNDS_ENV}, "fetch_every_s": 1}
    try:
        async with running(parse_config(document)) as relay:
            await asyncio.wait_for(relay.feeds.fetched.wait(), 30)
            await send(relay, ["a@outlook.com"])
            await sink.wait_for(1)
            level["now"] = "RED"
            relay.feeds.fetched.clear()
            await asyncio.wait_for(relay.feeds.fetched.wait(), 30)
            await send(relay, ["b@outlook.com"])
            await send(relay, ["c@gmail.com"])
            await sink.wait_for(3)
            status = await relay.status()
    finally:
        await runner.cleanup()
    peers = {m.rcpts[0]: m.peer for m in sink.messages}
    assert peers == {"a@outlook.com": WARMING, "b@outlook.com": "127.0.0.3", "c@gmail.com": WARMING}
    pair = status["ips"][0]["pairs"]["microsoft"]
    assert pair["paused_since"] == today.isoformat()
    assert pair["last"]["reason"] == f"SNDS RED on {today.isoformat()}"
    assert status["ips"][0]["pairs"]["gmail"]["paused_since"] is None


async def test_notes_add_up_whatever_batch_they_land_in(store: list[Counters]) -> None:
    """Notes gather in memory and go to the store in batches (one operation per distinct
    amount): notes made while a batch is with the store, repeated keys, different amounts
    and days all end up counted exactly once."""
    counts = PairCounts(store[0], UTC)
    day1, day2 = datetime(2026, 12, 1, 12, tzinfo=UTC), datetime(2026, 12, 2, 12, tzinfo=UTC)
    expected: dict[tuple[str, date, str], int] = {}

    def note(provider: str, what: str, n: int, when: datetime) -> None:
        counts.note(WARMING, provider, what, n, when)  # type: ignore[arg-type]
        k = (provider, when.date(), what)
        expected[k] = expected.get(k, 0) + max(n, 0)

    for i in range(300):
        note("gmail" if i % 2 else "yahoo", "tried", 1 + i % 3, day1 if i % 5 else day2)
        note("gmail", "handed", 1, day1)
        note("gmail", "deferred", 0, day1)  # nothing to count
        if i % 50 == 0:
            await asyncio.sleep(0)  # let a batch leave; the next notes come while it is out
    await counts.flush()
    note("yahoo", "complaint", 2, day2)  # after a flush: a new writer
    await counts.flush()
    for (provider, day, what), n in expected.items():
        got = (await counts.day(WARMING, provider, day)).get(what, 0)
        assert got == n, (provider, day, what)
