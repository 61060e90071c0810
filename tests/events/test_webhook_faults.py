"""The event webhook under faults: a receiver that is down, slow, answers too late or
refuses forever, a relay killed with events in its outbox, and ``--workers`` (each worker
its own outbox; a former worker's outbox adopted). Real sockets on loopback, a real aiohttp
receiver, real relay processes where a crash or a worker is involved; nothing of ours is
mocked. At least once: after de-duplication by ``event_id`` every event arrives exactly
once, and a message's ``processed`` arrives before its ``delivered``."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families
from support.disk import Disk
from support.polling import eventually
from support.relay import http_get, relay_config, relay_doc, running, send
from support.relayproc import RelayProcess
from support.sink import Sink
from support.webhook import Receiver

from warmrelay.events.outbox import outbox_path

SECRET_ENV = "WARMRELAY_TEST_WEBHOOK_SECRET"
SECRET = "0123456789abcdef0123456789abcdef"

StartRelay = Callable[..., Awaitable[RelayProcess]]
Tmpfs = Callable[..., Disk]


# -- helpers -------------------------------------------------------------------------------


@dataclass
class Watched(Receiver):
    """A Receiver that also counts the POSTs that reached it, answered or not yet (the
    recorded ``posts`` only hold answered ones)."""

    arrived: int = 0

    async def _handle(self, request: web.Request) -> web.Response:
        async with self._changed:
            self.arrived += 1
            self._changed.notify_all()
        return await super()._handle(request)


@pytest.fixture
async def receiver() -> AsyncIterator[Watched]:
    r = await Watched().start()
    try:
        yield r
    finally:
        if r.gate is not None:
            r.gate.set()  # held answers would hold the receiver's shutdown
        await r.stop()


@pytest.fixture(autouse=True)
def _secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(SECRET_ENV, SECRET)  # relay processes inherit it


def events_doc(url: str, **over: Any) -> dict[str, Any]:
    """Fast retries and batches, so a fault test takes seconds."""
    hook = {
        "url": url,
        "secret_env": SECRET_ENV,
        "batch_ms": 20,
        "timeout_s": 5.0,
        "retry_first_s": 0.05,
        "retry_max_s": 0.2,
        **over,
    }
    return {"webhook": hook}


async def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    code, body = await http_get(port, "/metrics")
    assert code == 200
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(body.decode())
        for s in f.samples
    }


async def metric(port: int, name: str, **labels: str) -> float:
    """The sum of the samples of ``name`` whose labels include ``labels`` (0 if none)."""
    samples = await scrape(port)
    return sum(
        v
        for (n, ls), v in samples.items()
        if n == name and all(dict(ls).get(k) == w for k, w in labels.items())
    )


async def at_least(port: int, value: float, name: str, **labels: str) -> bool:
    return await metric(port, name, **labels) >= value


def unique(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """First arrival of each event_id, in arrival order."""
    seen: set[str] = set()
    out = []
    for e in events:
        if e["event_id"] not in seen:
            seen.add(e["event_id"])
            out.append(e)
    return out


def check_once_each(events: list[dict[str, Any]], rcpts: list[str]) -> None:
    """After de-duplication: processed and delivered for each recipient, exactly once,
    nothing else, processed first."""
    got = unique(events)
    pairs = [(e["email"], e["event"]) for e in got]
    expected = {(r, name) for r in rcpts for name in ("processed", "delivered")}
    assert sorted(pairs) == sorted(expected), pairs
    for rcpt in rcpts:
        assert pairs.index((rcpt, "processed")) < pairs.index((rcpt, "delivered")), rcpt
    # one id per (recipient, event): the id is what a consumer de-duplicates by
    ids: dict[tuple[str, str], set[str]] = {}
    for e in events:
        ids.setdefault((e["email"], e["event"]), set()).add(e["event_id"])
    assert all(len(v) == 1 for v in ids.values()), ids


def has_all(receiver: Receiver, rcpts: list[str]) -> Callable[[], bool]:
    want = {(r, n) for r in rcpts for n in ("processed", "delivered")}
    return lambda: want <= {(e["email"], e["event"]) for e in receiver.taken()}


def message(i: int) -> bytes:
    return f"Subject: m{i}\r\nX-Test-Id: {i}\r\n\r\nbody {i}\r\n".encode()


async def send_to(port: int, rcpt: str, i: int) -> None:
    """One session per message (with --workers: the kernel spreads them)."""
    async with aiosmtplib.SMTP(hostname="127.0.0.1", port=port) as client:
        await client.sendmail("app@sender.test", [rcpt], message(i))


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [
        r for r in caplog.records if r.name == "warmrelay.events" and r.levelno >= logging.WARNING
    ]


def rows_in(path: Path) -> int:
    """Events in an outbox file, read as another process would (read-only)."""
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return int(db.execute("SELECT count(*) FROM events").fetchone()[0])
    finally:
        db.close()


def leftovers(path: Path) -> list[str]:
    """The files of an SQLite database still there (it, its -wal, its -shm)."""
    return [s for s in ("", "-wal", "-shm") if Path(f"{path}{s}").exists()]


ACCEPTED = re.compile(r"^\[w(\d)\] .* (\S+): from=<")


def accepted_by(relay: RelayProcess) -> dict[str, int]:
    """{queue id: worker index} from the workers' acceptance lines."""
    found = {}
    for line in relay.log:
        m = ACCEPTED.search(line)
        if m:
            found[m.group(2)] = int(m.group(1))
    return found


async def send_to_both_workers(relay: RelayProcess, sink: Sink, prefix: str) -> list[str]:
    """Messages (one recipient each, a session each) until both workers accepted some: the
    kernel spreads the sessions, not the test. Their recipients; each one delivered."""
    rcpts: list[str] = []
    for _ in range(6):
        for _ in range(4):
            rcpt = f"{prefix}{len(rcpts)}@example.test"
            await send_to(relay.smtp_port, rcpt, len(rcpts))
            rcpts.append(rcpt)
        await sink.wait_for(len(rcpts))
        await eventually(lambda: len(accepted_by(relay)) == len(rcpts), what="accept lines")
        if set(accepted_by(relay).values()) == {0, 1}:
            return rcpts
    raise AssertionError(f"one worker took all {len(rcpts)} sessions")


async def stopped(relay: RelayProcess) -> None:
    if relay.proc is not None and relay.proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            await relay.kill()


# -- 1. a receiver down for a while, then back ---------------------------------------------


@pytest.mark.parametrize("fault", ["refused", "503"])
async def test_a_receiver_down_for_a_while_gets_every_event_once_back(
    tmp_path: Path, sink: Sink, receiver: Watched, fault: str
) -> None:
    port = receiver.port
    if fault == "refused":
        await receiver.stop()  # nothing listens there: connection refused
    else:
        receiver.answer = lambda: 503
    config = relay_config(tmp_path, sink.port, events=events_doc(receiver.url))
    rcpts = [f"u{i}@example.test" for i in range(4)]
    async with running(config) as relay:
        admin = relay.admin.port
        for rcpt in rcpts:
            await send(relay, [rcpt])
        await sink.wait_for(len(rcpts))  # the mail does not wait for the webhook
        result = "failed" if fault == "refused" else "rejected"
        await eventually(  # several POSTs failed (backoff retries), none was taken
            lambda: at_least(admin, 3, "warmrelay_webhook_posts_total", result=result),
            what=f"{result} POSTs",
        )
        assert await metric(admin, "warmrelay_webhook_posts_total", result="ok") == 0
        assert receiver.taken() == []
        if fault == "refused":
            await receiver.start(port)  # back, where it was
        else:
            receiver.answer = lambda: 200
        await receiver.wait_until(has_all(receiver, rcpts), timeout_s=15)
        await eventually(
            lambda: at_least(admin, 1, "warmrelay_webhook_posts_total", result="ok"),
            what="an ok POST",
        )
        await eventually(
            lambda: metric_is(admin, 0, "warmrelay_webhook_outbox_events"), what="empty outbox"
        )
    check_once_each(receiver.taken(), rcpts)


async def metric_is(port: int, value: float, name: str, **labels: str) -> bool:
    return await metric(port, name, **labels) == value


# -- 2. the answer never came in time: the same ids again ----------------------------------


async def test_a_post_answered_too_late_is_posted_again_with_the_same_ids(
    tmp_path: Path, sink: Sink, receiver: Watched
) -> None:
    receiver.gate = asyncio.Event()  # takes each POST, answers only once released
    config = relay_config(tmp_path, sink.port, events=events_doc(receiver.url, timeout_s=0.3))
    rcpts = ["a@example.test", "b@example.test"]
    async with running(config) as relay:
        admin = relay.admin.port
        for rcpt in rcpts:
            await send(relay, [rcpt])
        await sink.wait_for(len(rcpts))
        # the receiver got the batch at least twice, its answers never arrived in time
        await receiver.wait_until(lambda: receiver.arrived >= 3, timeout_s=15)
        await eventually(
            lambda: at_least(admin, 2, "warmrelay_webhook_posts_total", result="failed"),
            what="timed-out POSTs",
        )
        assert receiver.posts == []
        receiver.gate.set()  # the late answers go out (to nobody), the next is in time
        await receiver.wait_until(has_all(receiver, rcpts), timeout_s=15)
        await eventually(
            lambda: metric_is(admin, 0, "warmrelay_webhook_outbox_events"), what="empty outbox"
        )
        assert await metric(admin, "warmrelay_webhook_posts_total", result="ok") >= 1
    taken = receiver.taken()
    assert len(taken) > len(unique(taken)), "the receiver should have seen duplicates"
    batches = [{e["event_id"] for e in p.events} for p in receiver.posts]
    assert any(  # a batch posted again: the same events, the same ids
        earlier <= later for i, earlier in enumerate(batches) for later in batches[i + 1 :]
    ), batches
    check_once_each(taken, rcpts)


# -- 3. SIGKILL with events in the outbox --------------------------------------------------


async def test_events_in_the_outbox_survive_a_sigkill(
    tmp_path: Path, sink: Sink, receiver: Watched, relay_process: StartRelay
) -> None:
    receiver.answer = lambda: 500
    doc = relay_doc(tmp_path, sink.port, events=events_doc(receiver.url))
    first = await relay_process(doc, name="first")
    rcpts = [f"k{i}@example.test" for i in range(3)]
    try:
        for i, rcpt in enumerate(rcpts):
            await send_to(first.smtp_port, rcpt, i)
        await sink.wait_for(len(rcpts))
        await eventually(
            lambda: metric_is(first.admin_port, 2 * len(rcpts), "warmrelay_webhook_outbox_events"),
            what="every event in the outbox",
        )
        assert receiver.taken() == []
        await first.kill()  # SIGKILL: no goodbye, no flush
    finally:
        await stopped(first)
    receiver.answer = lambda: 200
    second = await relay_process(doc, name="second")
    try:
        await receiver.wait_until(has_all(receiver, rcpts), timeout_s=15)
        assert await second.terminate() == 0
    finally:
        await stopped(second)
    check_once_each(receiver.taken(), rcpts)


# -- 4. a slow receiver does not slow the mail ---------------------------------------------


async def test_a_slow_receiver_does_not_slow_delivery(
    tmp_path: Path, sink: Sink, receiver: Watched
) -> None:
    receiver.gate = asyncio.Event()  # never answers while the test sends
    config = relay_config(tmp_path, sink.port, events=events_doc(receiver.url, timeout_s=20))
    rcpts = [f"s{i}@example.test" for i in range(6)]
    async with running(config) as relay:
        await send(relay, [rcpts[0]])
        await receiver.wait_until(lambda: receiver.arrived >= 1, timeout_s=10)  # POST held
        for rcpt in rcpts[1:]:
            await send(relay, [rcpt])
        await sink.wait_for(len(rcpts), timeout_s=10)
        assert receiver.posts == []  # not one POST answered while all the mail went out
        assert await metric(relay.admin.port, "warmrelay_webhook_posts_total") == 0
        receiver.gate.set()
        await receiver.wait_until(has_all(receiver, rcpts), timeout_s=15)
    check_once_each(receiver.taken(), rcpts)


# -- 5. a receiver refusing forever: bounded outbox, counted losses, one line ----------------


async def test_a_receiver_refusing_forever_bounds_the_outbox_and_counts_the_rest(
    tmp_path: Path, sink: Sink, receiver: Watched, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="warmrelay.events")
    receiver.answer = lambda: 500
    ahead = [timedelta(0)]

    def clock() -> datetime:
        return datetime.now(UTC) + ahead[0]

    bound = 10
    config = relay_config(tmp_path, sink.port, events=events_doc(receiver.url, max_events=bound))
    rcpts = [f"f{i}@example.test" for i in range(8)]  # 16 events for a bound of 10
    outbox_file = outbox_path(tmp_path / "state", 0)
    async with running(config, clock=clock) as relay:
        admin = relay.admin.port
        sizes = []
        for rcpt in rcpts:
            await send(relay, [rcpt])
            sizes.append(await metric(admin, "warmrelay_webhook_outbox_events"))
        await sink.wait_for(len(rcpts))  # every message delivered all the same
        await eventually(
            lambda: metric_is(admin, bound, "warmrelay_webhook_outbox_events"), what="a full outbox"
        )
        await eventually(  # many retries
            lambda: at_least(admin, 5, "warmrelay_webhook_posts_total", result="rejected"),
            what="retries",
        )
        sizes.append(await metric(admin, "warmrelay_webhook_outbox_events"))
        assert max(sizes) <= bound
        assert rows_in(outbox_file) == bound
        emitted = await metric(admin, "warmrelay_events_total")
        assert emitted == 2 * len(rcpts)
        lost = await metric(admin, "warmrelay_events_lost_total", reason="outbox_full")
        assert lost == emitted - bound
        age = await metric(admin, "warmrelay_webhook_oldest_event_age_seconds")
        assert 0 <= age < 600
        ahead[0] = timedelta(hours=1)  # the relay's clock: an hour later
        await eventually(
            lambda: at_least(admin, 3600, "warmrelay_webhook_oldest_event_age_seconds"),
            what="the oldest event's age grows",
        )
        assert await metric(admin, "warmrelay_webhook_oldest_event_age_seconds") < 3600 + 600
        assert receiver.taken() == []
        assert await metric(admin, "warmrelay_webhook_outbox_events") == bound
    lines = warnings_of(caplog)
    refusing = [r for r in lines if r.levelno == logging.WARNING and receiver.url in r.getMessage()]
    full = [r for r in lines if "outbox_full" in r.getMessage()]
    assert len(refusing) == 1, [r.getMessage() for r in lines]  # one line per episode
    assert "HTTP 500" in refusing[0].getMessage()
    assert len(full) == 1 and full[0].levelno == logging.ERROR, [r.getMessage() for r in lines]
    assert len(lines) == 2, [r.getMessage() for r in lines]


# -- 6. max_age_s: expired events are dropped, counted, logged without the URL's secrets -----


async def test_events_older_than_max_age_are_dropped_and_logged_without_the_token(
    tmp_path: Path, sink: Sink, receiver: Watched, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="warmrelay")
    receiver.answer = lambda: 500
    ahead = [timedelta(0)]

    def clock() -> datetime:
        return datetime.now(UTC) + ahead[0]

    token, password = "tok3n-9f8e7d6c5b4a", "pa55-1a2b3c4d"
    url = f"http://hook:{password}@127.0.0.1:{receiver.port}/hook?token={token}"
    config = relay_config(tmp_path, sink.port, events=events_doc(url, max_age_s=60))
    async with running(config, clock=clock) as relay:
        admin = relay.admin.port
        await send(relay, ["old@example.test"])
        await sink.wait_for(1)
        await eventually(
            lambda: metric_is(admin, 2, "warmrelay_webhook_outbox_events"), what="2 waiting"
        )
        assert await metric(admin, "warmrelay_events_lost_total", reason="expired") == 0
        ahead[0] = timedelta(seconds=120)  # older than max_age_s now
        await eventually(
            lambda: at_least(admin, 2, "warmrelay_events_lost_total", reason="expired"),
            what="expired events counted",
        )
        await eventually(
            lambda: metric_is(admin, 0, "warmrelay_webhook_outbox_events"), what="empty outbox"
        )
        assert await metric(admin, "warmrelay_events_lost_total", reason="expired") == 2
        receiver.answer = lambda: 200  # later events still go out; the expired ones never
        await send(relay, ["new@example.test"])
        await receiver.wait_until(has_all(receiver, ["new@example.test"]), timeout_s=15)
    assert {e["email"] for e in receiver.taken()} == {"new@example.test"}
    # the url's password reached the receiver as Basic auth: the URL was used as written
    assert all("Authorization" in p.headers for p in receiver.posts)
    errors = [r for r in warnings_of(caplog) if r.levelno == logging.ERROR]
    expired = [r for r in errors if "max_age_s" in r.getMessage()]
    assert len(expired) == 1, [r.getMessage() for r in errors]
    assert f"http://127.0.0.1:{receiver.port}/hook " in expired[0].getMessage()
    for record in caplog.records:
        text = record.getMessage() + (record.exc_text or "")
        assert token not in text and password not in text, text


# -- 7. --workers: one outbox per worker; a former worker's outbox adopted --------------------


async def test_workers_post_every_event_exactly_once(
    tmp_path: Path, sink: Sink, receiver: Watched, relay_process: StartRelay
) -> None:
    doc = relay_doc(tmp_path, sink.port, events=events_doc(receiver.url))
    relay = await relay_process(doc, "--workers", "2")
    try:
        rcpts = await send_to_both_workers(relay, sink, "w")
        await receiver.wait_until(has_all(receiver, rcpts), timeout_s=20)
        await eventually(  # both workers removed what they posted: nothing more will come
            lambda: metric_is(relay.admin_port, 0, "warmrelay_webhook_outbox_events"),
            what="empty outboxes",
        )
        assert await relay.terminate() == 0
    finally:
        await stopped(relay)
    taken = receiver.taken()
    assert len(taken) == len(unique(taken)) == 2 * len(rcpts)  # no duplicate, none lost
    assert all(p.status == 200 for p in receiver.posts)
    check_once_each(taken, rcpts)


async def test_a_former_workers_outbox_is_adopted(
    tmp_path: Path, sink: Sink, receiver: Watched, relay_process: StartRelay
) -> None:
    receiver.answer = lambda: 500
    doc = relay_doc(tmp_path, sink.port, events=events_doc(receiver.url))
    state = tmp_path / "state"
    workers = await relay_process(doc, "--workers", "2", name="workers")
    try:
        rcpts = await send_to_both_workers(workers, sink, "o")
        by_worker = accepted_by(workers)
        await eventually(
            lambda: metric_is(
                workers.admin_port, 2 * len(rcpts), "warmrelay_webhook_outbox_events"
            ),
            what="every event waiting in the outboxes",
        )
        assert await workers.terminate() == 0
    finally:
        await stopped(workers)
    former = outbox_path(state, 1)
    assert rows_in(outbox_path(state, 0)) > 0 and rows_in(former) > 0
    assert receiver.taken() == []

    receiver.answer = lambda: 200
    single = await relay_process(doc, name="single")  # no --workers: worker 1 is gone
    try:
        await receiver.wait_until(has_all(receiver, rcpts), timeout_s=20)
        assert any("adopted from a former worker" in line for line in single.log)
        assert await single.terminate() == 0
    finally:
        await stopped(single)
    assert leftovers(former) == []
    taken = receiver.taken()
    former_ids = {q for q, w in by_worker.items() if w == 1}
    assert former_ids <= {e["queue_id"] for e in taken}  # worker 1's messages, every event
    check_once_each(taken, rcpts)


# -- an outbox that cannot be opened: a reason, not a traceback ------------------------------


async def test_an_outbox_on_a_read_only_disk_refuses_to_start_with_a_reason(
    tmp_path: Path, sink: Sink, receiver: Watched, tmpfs: Tmpfs
) -> None:
    events_dir = tmp_path / "state" / "events"
    tmpfs(events_dir, "1m", read_only=True)  # state.dir is fine, its events/ is not
    doc = relay_doc(tmp_path, sink.port, events=events_doc(receiver.url))
    relay = RelayProcess(doc, tmp_path)
    try:
        with pytest.raises(RuntimeError, match="relay exited"):
            await relay.start()
        assert relay.proc is not None
        assert await relay.proc.wait() == 1
    finally:
        await stopped(relay)
    assert not any("Traceback" in line for line in relay.log), "".join(relay.log)
    refusal = [line for line in relay.log if "cannot start" in line]
    assert len(refusal) == 1, "".join(relay.log)
    assert "events" in refusal[0]
