"""Faults in the disk: a full or read-only spool, a counters store that cannot write.

The faults are real: a small tmpfs mounted over ``state.dir/spool`` (or under the counters
database), filled to get ENOSPC or remounted read-only to get EROFS. Mounting needs root;
without it these tests skip, except under CI=true where they must run.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import socket
import subprocess
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest
import yaml
from support.cli import warmrelay_async
from support.disk import Disk
from support.polling import eventually
from support.relay import http_get, relay_config, relay_doc, running, send
from support.sink import Sink

from warmrelay.app import Relay
from warmrelay.config import parse_config
from warmrelay.errors import CounterError, SpoolError
from warmrelay.queue.spool import Spool
from warmrelay.warmup.counters import CounterKey, Limit, SqliteCounters
from warmrelay.warmup.reservation import Ledger, Reservation

MakeSink = Callable[..., Awaitable[Sink]]
Tmpfs = Callable[..., Disk]


@pytest.fixture
def spool_disk(tmp_path: Path, tmpfs: Tmpfs) -> Disk:
    """The relay's spool (state.dir/spool) on its own small tmpfs; counters stay on disk."""
    return tmpfs(tmp_path / "state" / "spool", "2m")


def delivered_to(sink: Sink) -> dict[str, int]:
    """How often each recipient received the original (not a DSN)."""
    out: dict[str, int] = {}
    for m in sink.messages:
        if m.mail_from:
            for r in m.rcpts:
                out[r] = out.get(r, 0) + 1
    return out


def dsns(sink: Sink) -> list[Any]:
    return [m for m in sink.messages if m.mail_from == ""]


def errors(caplog: pytest.LogCaptureFixture, *loggers: str) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno >= logging.ERROR and r.name.startswith(loggers)
    ]


def spool_files(relay: Relay) -> list[str]:
    return sorted(os.listdir(relay.spool.queue))


async def metric(relay: Relay, name: str) -> str:
    _, body = await http_get(relay.admin.port, "/metrics")
    lines = [line for line in body.decode().splitlines() if line.startswith(name + " ")]
    assert len(lines) == 1, (name, lines)
    return lines[0].split()[1]


# -- 1. progress that cannot be written down is not a reason to send again -------------------


async def test_disk_full_mid_delivery_sends_each_recipient_once(
    tmp_path: Path, spool_disk: Disk, make_sink: MakeSink, caplog: pytest.LogCaptureFixture
) -> None:
    """Recipients finish at different times (three domains; 250/452/550 in one transaction)
    while the spool cannot record anything. Each is delivered once; what was delivered is
    written when the disk has room again, so a restart sends nothing either."""
    caplog.set_level(logging.INFO, logger="warmrelay")
    rcpt_tries: dict[str, int] = {}

    def receiver(peer: str, rcpt: str) -> str | None:
        if not rcpt_tries:
            spool_disk.fill()  # the fault begins with the first delivery attempt
        n = rcpt_tries[rcpt] = rcpt_tries.get(rcpt, 0) + 1
        if rcpt == "later@two.test" and n <= 2:
            return "451 4.3.0 greylisted, try again"
        if rcpt == "b@three.test" and n == 1:
            return "452 4.2.2 mailbox full for now"
        if rcpt == "c@three.test":
            return "550 5.1.1 no such user"
        return None

    sink = await make_sink(rcpt_reply=receiver)
    config = relay_config(tmp_path, sink.port)
    rcpts = ["ok@one.test", "later@two.test", "a@three.test", "b@three.test", "c@three.test"]
    async with running(config) as relay:
        await send(relay, rcpts, sender="app@sender.test")
        want = {"ok@one.test", "later@two.test", "a@three.test", "b@three.test"}
        await sink.wait_until(lambda: want <= set(delivered_to(sink)))
        assert dsns(sink) == []  # no room for the DSN yet: the disk is still full
        assert rcpt_tries["c@three.test"] >= 1
        spool_disk.free()
        await sink.wait_until(lambda: len(dsns(sink)) >= 1)
        await eventually(lambda: spool_files(relay) == [], what="the spool forgets it")
    async with running(config) as again:  # a restart: nothing left to deliver
        assert len(again.spool) == 0 and again.scheduler.messages == 0
    assert delivered_to(sink) == dict.fromkeys(sorted(want), 1)
    (dsn,) = dsns(sink)
    assert dsn.rcpts == ["app@sender.test"] and b"c@three.test" in dsn.data
    found = errors(caplog, "warmrelay")
    assert len(found) == 1 and "not writable" in found[0], found  # one line per transition


# -- 2. an expired message whose DSN cannot be stored --------------------------------------


async def test_expired_message_with_the_disk_full_backs_off_and_bounces_once(
    tmp_path: Path, spool_disk: Disk, sink: Sink, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="warmrelay")
    dead = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
    config = relay_config(
        tmp_path,
        sink.port,
        routes={
            "example.test": f"127.0.0.1:{dead.sockets[0].getsockname()[1]}",
            "*": f"127.0.0.1:{sink.port}",
        },
        delivery={"queue_lifetime_s": 1.0, "retry_first_s": 0.2, "retry_max_s": 1.0},
    )
    async with dead, running(config) as relay:
        _, reply = await send(relay, ["late@example.test"], sender="app@sender.test")
        queue_id = reply.rsplit(" ", 1)[1]
        spool_disk.fill()
        fault_s = 4.0
        await asyncio.sleep(1.0 + fault_s)  # the lifetime, then the fault lasts a while
        lines = [r.getMessage() for r in caplog.records if queue_id in r.getMessage()]
        expiries = [m for m in lines if " expired " in m]
        assert 1 <= len(expiries) <= fault_s + 2, expiries  # backoff: ~1 per retry_max_s
        assert len(lines) <= 4 * (fault_s + 2), lines
        assert dsns(sink) == [] and relay.metrics.dsn_sent._value.get() == 0
        spool_disk.free()
        await sink.wait_until(lambda: len(dsns(sink)) >= 1)
        await eventually(lambda: spool_files(relay) == [], what="the spool is empty")
        assert relay.metrics.dsn_sent._value.get() == 1
    (dsn,) = sink.messages
    assert dsn.rcpts == ["app@sender.test"] and b"Status: 4.4.7" in dsn.data
    found = errors(caplog, "warmrelay")
    assert len(found) == 1 and "not writable" in found[0], found


# -- 3. read-only during delivery, then a restart ------------------------------------------


async def test_read_only_spool_during_delivery_then_restart_sends_nothing_twice(
    tmp_path: Path, spool_disk: Disk, make_sink: MakeSink, caplog: pytest.LogCaptureFixture
) -> None:
    go = asyncio.Event()

    def receiver(peer: str, rcpt: str) -> str | None:
        return None if go.is_set() else "451 4.3.0 not yet"

    sink = await make_sink(rcpt_reply=receiver)
    config = relay_config(tmp_path, sink.port)
    rcpts = [[f"m{i}@one.test", f"m{i}@two.test"] for i in range(4)]  # partial progress too
    async with running(config) as relay:
        for pair in rcpts:
            await send(relay, pair)
        await spool_disk.read_only()
        go.set()  # deliveries succeed now, while the spool cannot record or remove
        everyone = {r for pair in rcpts for r in pair}
        await sink.wait_until(lambda: everyone <= set(delivered_to(sink)))
        await eventually(lambda: relay.scheduler.messages == 0, what="all finished")
        assert len(spool_files(relay)) >= 4  # still on disk: only memory knows
        await spool_disk.writable()
        await eventually(lambda: spool_files(relay) == [], what="written once writable")
    async with running(config) as again:
        assert len(again.spool) == 0 and again.scheduler.messages == 0
    assert delivered_to(sink) == dict.fromkeys(sorted(everyone), 1)
    found = errors(caplog, "warmrelay.spool", "warmrelay.delivery")
    assert len(found) == 1 and "not writable" in found[0], found


async def test_a_read_only_spool_refuses_to_start(tmp_path: Path, spool_disk: Disk) -> None:
    """A restart while still read-only: nothing it delivers could be written down, so every
    later start would deliver it again. It exits with the reason instead."""
    doc = relay_doc(tmp_path, 9)
    async with running(parse_config(doc)):
        pass  # lays out the spool
    await spool_disk.read_only()
    path = tmp_path / "relay.yaml"
    path.write_text(yaml.safe_dump(doc))
    # bounded: a relay that started after all is killed at the timeout, failing the test
    served = await warmrelay_async("serve", "-c", str(path))
    assert served.returncode == 1, served.stderr
    assert "Read-only file system" in served.stderr


async def test_a_stop_while_read_only_names_what_will_be_delivered_again(
    spool_disk: Disk, caplog: pytest.LogCaptureFixture
) -> None:
    spool = Spool(spool_disk.path)
    await spool.open()
    try:
        partly = await spool.store("a@example.test", ["b@one.test", "c@two.test"], b"x")
        finished = await spool.store("a@example.test", ["d@one.test"], b"y")
        await spool_disk.read_only()
        spool.mark_done(partly.queue_id, [0], "delivered")  # neither raises
        spool.remove(finished.queue_id)
        await eventually(lambda: spool.unrecorded == 2 and not spool.writable)
    finally:
        await spool.close()
    (line,) = errors(caplog, "warmrelay.spool")[1:]  # after the one about the transition
    assert f"{partly.queue_id}(done 0)" in line and f"{finished.queue_id}(finished)" in line


async def test_a_record_torn_by_the_full_disk_does_not_swallow_its_retry(
    spool_disk: Disk,
) -> None:
    """The disk fills up in the middle of a ``done`` line: the written part stays in the
    file. The record written after recovery must still read back."""
    spool = Spool(spool_disk.path)
    await spool.open()
    rcpts = [f"r{i}@example.test" for i in range(300)]
    try:
        msg = await spool.store("a@example.test", rcpts, b"x")
        state = spool.queue / f"{msg.queue_id}.state"
        spool.record_attempt(msg.queue_id, 1)
        while state.stat().st_size < 4096 - 20:  # the page is all but full
            spool.record_attempt(msg.queue_id, 1)
        spool_disk.fill()
        spool.mark_done(msg.queue_id, range(300), "delivered")  # ~1.2 KB: torn at the page
        assert 4096 - 20 < state.stat().st_size <= 4096
        spool_disk.free()
        await eventually(lambda: spool.unrecorded == 0 and spool.writable)
    finally:
        await spool.close()
    again = Spool(spool_disk.path)
    (recovered,) = await again.open()
    await again.close()
    assert recovered.done == dict.fromkeys(range(300), "delivered")


async def test_a_message_too_big_for_the_free_space_is_not_a_disk_fault(
    spool_disk: Disk, caplog: pytest.LogCaptureFixture
) -> None:
    """The probe tells them apart: the spool still takes smaller mail, health stays ok."""
    spool = Spool(spool_disk.path)
    await spool.open()
    try:
        with pytest.raises(SpoolError) as info:
            await spool.store("a@example.test", ["b@example.test"], b"x" * 3_000_000)
        assert info.value.errno == errno.ENOSPC
        assert spool.writable and errors(caplog, "warmrelay") == []
        await spool.store("a@example.test", ["b@example.test"], b"small")
    finally:
        await spool.close()


# -- 4. health and metrics while the spool cannot store --------------------------------------


@pytest.mark.parametrize("fault", ["full", "read-only"])
async def test_health_says_the_spool_is_not_writable_and_recovers(
    tmp_path: Path, spool_disk: Disk, sink: Sink, caplog: pytest.LogCaptureFixture, fault: str
) -> None:
    async with running(relay_config(tmp_path, sink.port)) as relay:
        port = relay.admin.port
        assert await http_get(port, "/healthz") == (200, b"ok\n")
        if fault == "full":
            spool_disk.fill()
        else:
            await spool_disk.read_only()
        for i in range(5):
            with pytest.raises(aiosmtplib.SMTPResponseException) as info:
                await send(relay, [f"u{i}@example.test"])
            assert info.value.code == 451
        code, body = await http_get(port, "/healthz")
        assert code == 200 and body.startswith(b"degraded: spool not writable"), body
        assert await metric(relay, "warmrelay_spool_writable") == "0.0"
        assert len(errors(caplog, "warmrelay.spool")) == 1  # not one per refused message
        if fault == "full":
            spool_disk.free()
        else:
            await spool_disk.writable()

        async def healthy() -> bool:
            return await http_get(port, "/healthz") == (200, b"ok\n")

        await eventually(healthy, what="/healthz ok again")
        assert await metric(relay, "warmrelay_spool_writable") == "1.0"
        await send(relay, ["back@example.test"])
        (msg,) = await sink.wait_for(1)
        assert msg.rcpts == ["back@example.test"]


# -- 5. a release the counters store refuses is retried --------------------------------------


@pytest.fixture
def counters_disk(tmp_path: Path, tmpfs: Tmpfs) -> Disk:
    return tmpfs(tmp_path / "db", "1m")


async def test_failed_release_is_retried_when_the_store_answers(
    counters_disk: Disk, caplog: pytest.LogCaptureFixture
) -> None:
    counters = SqliteCounters(counters_disk.path / "counters.sqlite3")
    key = CounterKey("127.0.0.2", "2026-11-28")
    ledger = Ledger()
    try:
        reservations = []
        for _ in range(3):
            assert await counters.reserve([Limit(key, 100)], 3) == 3
            reservations.append(Reservation(counters, [key], 3, ledger))
        counters_disk.fill()
        for r in reservations:  # each attempt ended with one recipient handed over
            async with r:
                r.keep(1)
        assert any("disk is full" in m for m in errors(caplog, "warmrelay.counters"))
        counters_disk.free()

        async def released() -> bool:
            try:
                return await counters.get(key) == 3
            except CounterError:
                return False

        await eventually(released, what="the count is back to what was kept")
        assert ledger.unreleased == 0
    finally:
        await ledger.settle_all()
        await counters.close()
    failed = errors(caplog, "warmrelay.router")
    assert len(failed) == 1, failed  # once per failure episode, not once per reservation


async def test_greylisted_on_a_full_counters_disk_costs_the_cap_nothing(
    tmp_path: Path, make_sink: MakeSink, tmpfs: Tmpfs, caplog: pytest.LogCaptureFixture
) -> None:
    """The counters database (state.dir) fills up between reserve and release: the
    greylisted recipient's reservation is given back once the disk has room."""
    tries: list[str] = []

    def greylist(peer: str, rcpt: str) -> str | None:
        tries.append(peer)
        if len(tries) == 1:
            state_disk.fill()
            return "451 4.7.1 greylisted"
        return None

    sink = await make_sink(rcpt_reply=greylist)
    state_disk = tmpfs(tmp_path / "state", "1m")
    tmpfs(tmp_path / "state" / "spool", "2m")  # the spool on a disk of its own, with room
    async with running(relay_config(tmp_path, sink.port)) as relay:
        warming = relay.config.ips[0]
        await send(relay, ["u@example.test"])
        await sink.wait_for(1)  # the retry left from the pool: the store is failing
        assert tries[0] == "127.0.0.2"
        assert relay.router.ledger.unreleased == 1
        assert await metric(relay, "warmrelay_reservations_unreleased") == "1.0"
        state_disk.free()

        async def given_back() -> bool:
            try:
                return await relay.router.sent(warming, relay.clock()) == 0
            except CounterError:
                return False

        await eventually(given_back, what="the reservation is given back")
        assert await metric(relay, "warmrelay_reservations_unreleased") == "0.0"
    assert len(errors(caplog, "warmrelay.router")) == 1


# -- 6. held mail: the oldest first when the window opens ------------------------------------


async def test_held_mail_is_released_oldest_first(tmp_path: Path, sink: Sink) -> None:
    """Holds made at different moments for the same window: the loop timers of the younger
    ones may fire first (their delay was computed later, e.g. after the wall clock moved).
    The new window's budget still goes to the oldest held message."""
    now = [datetime(2026, 3, 1, 23, 59, 57, tzinfo=UTC)]
    doc = relay_doc(tmp_path, sink.port, cap=1, overflow="hold")
    doc["ips"] = doc["ips"][:1]  # the warming IP alone: what does not fit waits
    async with running(parse_config(doc), clock=lambda: now[0]) as relay:
        await send(relay, ["first@example.test"], subject="m0")  # takes the day's one slot
        await sink.wait_for(1)
        await send(relay, ["old@example.test"], subject="m1")  # held until midnight: 3 s
        await eventually(lambda: relay.scheduler.deferred == 1, what="m1 held")
        now[0] += timedelta(seconds=2.5)
        await send(relay, ["new@example.test"], subject="m2")  # held until midnight: 0.5 s
        await eventually(lambda: relay.scheduler.deferred == 2, what="m2 held")
        now[0] += timedelta(seconds=1)  # the next day, one slot
        await sink.wait_for(2)
        assert sink.messages[1].rcpts == ["old@example.test"]
        await eventually(lambda: relay.scheduler.deferred == 1, what="m2 held again")
        assert len(sink.messages) == 2


# -- 8. an operator's bounce whose DSN cannot be stored changes nothing ---------------------


async def test_an_operator_bounce_that_cannot_store_its_dsn_changes_nothing(
    tmp_path: Path, spool_disk: Disk, make_sink: MakeSink, caplog: pytest.LogCaptureFixture
) -> None:
    """`queue bounce` on a full spool: exit 1 with one line, the message stays as it was
    (same retry, nothing suppressed, no invented delivery); delivered normally later."""
    caplog.set_level(logging.INFO, logger="warmrelay")
    accept = asyncio.Event()

    def receiver(peer: str, rcpt: str) -> str | None:
        return None if accept.is_set() else "451 4.7.1 not yet"

    sink = await make_sink(rcpt_reply=receiver)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        admin_port = s.getsockname()[1]
    document = relay_doc(
        tmp_path,
        sink.port,
        admin={"listen": f"127.0.0.1:{admin_port}"},
        delivery={"retry_first_s": 600, "retry_max_s": 3600, "drain_timeout_s": 5},
    )
    path = tmp_path / "relay.yaml"
    path.write_text(yaml.safe_dump(document))

    async def queue(*args: str) -> subprocess.CompletedProcess[str]:
        return await warmrelay_async("queue", *args, "-c", str(path))

    async with running(parse_config(document)) as relay:
        _, reply = await send(relay, ["keep@one.test"], sender="app@sender.test")
        queue_id = reply.rsplit(" ", 1)[1]
        before: dict[str, Any] = {}

        async def deferred() -> bool:
            before.update(json.loads((await queue("show", queue_id, "--json")).stdout))
            return before.get("state") == "deferred"

        await eventually(deferred, what="deferred after the first 451")
        spool_disk.fill()
        bounced = await queue("bounce", queue_id, "--reason", "customer left")
        assert bounced.returncode == 1
        (line,) = bounced.stderr.strip().splitlines()  # one line
        assert line.startswith(f"queue bounce: {queue_id}: cannot store the DSN"), line
        assert line.endswith(": nothing changed"), line
        after = json.loads((await queue("show", queue_id, "--json")).stdout)
        assert after["state"] == "deferred" and after["next_retry"] == before["next_retry"]
        assert [r["status"] for r in after["recipients"]] == ["pending"]
        listed = await warmrelay_async("suppression", "list", "--json", "-c", str(path))
        assert json.loads(listed.stdout)["entries"] == []
        spool_disk.free()
        accept.set()
        flushed = await queue("flush", queue_id)
        assert flushed.returncode == 0, flushed.stderr
        await sink.wait_until(lambda: relay.scheduler.messages == 0)
    assert delivered_to(sink) == {"keep@one.test": 1} and dsns(sink) == []
    lines = [r.getMessage() for r in caplog.records]
    assert not [m for m in lines if "bounced" in m and queue_id in m], lines
    assert not [m for m in lines if "invalid domain" in m]
