"""The events' fields, as an application reads them (issue 22): a SendGrid Event Webhook
consumer applied to our signed POSTs, the exact fields of each event type, the custom
arguments of ``X-Warmrelay-Args``, ``events.file``, and no events for our own mail.

Everything runs on loopback: a relay in the test's loop, a recording SMTP sink, a real
HTTP receiver for the webhook, reports sent to the bounce domain as a receiver's MTA
would send them."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import aiosmtplib
import pytest
from support.polling import eventually
from support.relay import relay_doc, running
from support.sink import Received, Sink
from support.webhook import Receiver

from warmrelay.app import Relay
from warmrelay.config import parse_config
from warmrelay.events.webhook import SIGNATURE_HEADER, sign, verify

WEBHOOK_ENV = "WARMRELAY_TEST_EVENTS_SECRET"
WEBHOOK_SECRET = "fedcba9876543210fedcba9876543210"
BOUNCE_ENV = "WARMRELAY_TEST_EVENTS_BOUNCE_SECRET"
BOUNCES = "bounces.relay.test"
OUTSIDER = "127.0.0.66"  # a receiver's MTA somewhere (not in allow_networks)
ARGS = "X-Warmrelay-Args"
SENDER = "app@sender.test"
BLOCK_DIAGNOSTIC = (
    "smtp; 550 5.7.1 [BL21] Connections will not be accepted from 127.0.0.2, "
    "because the ip is in Spamhaus's list"
)
# every field an event of ours may carry (SendGrid's names, then ours)
FIELDS = {
    "email", "timestamp", "event", "smtp-id", "event_id", "reason", "status", "response",
    "attempt", "ip", "type", "tls", "queue_id", "provider", "warming", "async",
}  # fmt: skip


# -- a SendGrid Event Webhook consumer ------------------------------------------------------


def strict_json(body: bytes) -> Any:
    """JSON as other languages read it (RFC 8259): no NaN or Infinity."""

    def refuse(constant: str) -> Any:
        raise ValueError(f"not JSON: {constant}")

    return json.loads(body, parse_constant=refuse)


@dataclass
class Consumer:
    """Written as an application consumes SendGrid's Event Webhook: it reads the fields
    SendGrid guarantees by subscript (a missing one is a KeyError), the optional ones with
    .get, and drops an event it saw before (SendGrid's sg_event_id; ours: event_id)."""

    seen: set[str] = field(default_factory=set)
    rows: list[dict[str, Any]] = field(default_factory=list)
    duplicates: int = 0

    def take(self, body: bytes) -> None:
        for e in strict_json(body):
            if e["event_id"] in self.seen:
                self.duplicates += 1
                continue
            self.seen.add(e["event_id"])
            kind = e["event"]
            row: dict[str, Any] = {
                "email": e["email"],
                "event": kind,
                "at": int(e["timestamp"]),
                "smtp_id": e.get("smtp-id"),
                "ip": e.get("ip"),
                "tls": bool(e.get("tls", 0)),
            }
            assert isinstance(e["timestamp"], int)
            if kind in ("delivered", "deferred"):
                row["response"] = e["response"]
            if kind == "deferred":
                row["attempt"] = int(e["attempt"])
            if kind == "bounce":
                row |= {"reason": e["reason"], "status": e["status"], "type": e["type"]}
                assert e["type"] in ("bounce", "blocked")
            if kind == "dropped":
                row["reason"] = e["reason"]
            if kind not in ("processed", "delivered", "deferred", "bounce", "dropped"):
                assert kind == "spamreport", kind
            self.rows.append(row)


def consume(receiver: Receiver) -> Consumer:
    """Every POST the receiver got, through the consumer (signature checked first); one
    answered 500 was read too (a consumer that stored the events, then failed to answer):
    its events come again and are read once."""
    consumer = Consumer()
    for post in receiver.posts:
        header = post.headers[SIGNATURE_HEADER]
        assert verify(WEBHOOK_SECRET.encode(), header, post.body, time.time())
        consumer.take(post.body)
    return consumer


def events_of(receiver: Receiver) -> list[dict[str, Any]]:
    """The events taken, each once (the consumer's de-duplication), in order."""
    events: list[dict[str, Any]] = []
    seen: set[str] = set()
    for e in receiver.taken():
        if e["event_id"] not in seen:
            seen.add(e["event_id"])
            events.append(e)
    return events


def named(
    events: list[dict[str, Any]], name: str, email: str | None = None
) -> list[dict[str, Any]]:
    return [e for e in events if e["event"] == name and (email is None or e["email"] == email)]


async def until_events(
    receiver: Receiver, done: Callable[[list[dict[str, Any]]], bool], timeout_s: float = 15.0
) -> list[dict[str, Any]]:
    await receiver.wait_until(lambda: done(events_of(receiver)), timeout_s)
    return events_of(receiver)


def has(name: str, email: str, n: int = 1) -> Callable[[list[dict[str, Any]]], bool]:
    return lambda events: len(named(events, name, email)) >= n


# -- the relay, the client, the receiver's MTA ------------------------------------------------


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    r = await Receiver().start()
    try:
        yield r
    finally:
        await r.stop()


@pytest.fixture(autouse=True)
def secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(WEBHOOK_ENV, WEBHOOK_SECRET)
    monkeypatch.setenv(BOUNCE_ENV, "0123456789abcdef0123456789abcdef")


def config(
    tmp_path: Path,
    sink: Sink,
    receiver: Receiver | None,
    *,
    bounces: bool = False,
    file: Path | None = None,
    delivery: dict[str, Any] | None = None,
    **webhook: Any,
) -> Any:
    events: dict[str, Any] = {}
    if receiver is not None:
        events["webhook"] = {
            "url": receiver.url,
            "secret_env": WEBHOOK_ENV,
            "batch_ms": 20,
            "retry_first_s": 0.05,
            "retry_max_s": 0.2,
            **webhook,
        }
    if file is not None:
        events["file"] = str(file)
    over: dict[str, Any] = {"events": events}
    if delivery is not None:
        over["delivery"] = delivery
    doc = relay_doc(tmp_path, sink.port, **over)
    if bounces:
        doc["smtp"]["allow_networks"] = ["127.0.0.1/32"]
        doc["bounces"] = {"domain": BOUNCES, "secret_env": BOUNCE_ENV, "sender_id": "acme"}
    return parse_config(doc)


@dataclass
class Answer:
    code: int
    text: str

    @property
    def queue_id(self) -> str:
        assert self.code == 250, (self.code, self.text)
        return self.text.rsplit(" ", 1)[1]


async def submit(
    relay: Relay,
    rcpts: list[str],
    *,
    args: str | None = None,
    message_id: str | None = None,
    sender: str = SENDER,
) -> Answer:
    """An application's message; ``args``: the raw value of X-Warmrelay-Args (it may be
    folded over several lines). The answer to DATA (or to the first refused RCPT)."""
    head = f"From: <{sender}>\r\nTo: <{rcpts[0]}>\r\nSubject: events\r\n"
    if message_id is not None:
        head += f"Message-ID: {message_id}\r\n"
    if args is not None:
        head += f"{ARGS}: {args}\r\n"
    data = (head + "\r\nhello\r\n").encode()
    client = aiosmtplib.SMTP(
        hostname="127.0.0.1", port=relay.smtp_ports[0], source_address=("127.0.0.1", 0)
    )
    async with client:
        await client.mail(sender)
        try:
            for rcpt in rcpts:
                await client.rcpt(rcpt)
            done = await client.data(data)
        except aiosmtplib.SMTPResponseException as exc:
            return Answer(exc.code, exc.message)
        return Answer(done.code, done.message)


async def report(relay: Relay, rcpt: str, data: bytes) -> tuple[int, str]:
    """What a receiver's MTA does with a bounce or a complaint: MAIL FROM:<>, one RCPT."""
    client = aiosmtplib.SMTP(
        hostname="127.0.0.1", port=relay.smtp_ports[0], source_address=(OUTSIDER, 0)
    )
    async with client:
        await client.mail("")
        await client.rcpt(rcpt)
        answer = await client.data(data)
        return answer.code, answer.message


def dsn(original: Received, rcpt: str, status: str, diagnostic: str) -> bytes:
    """A receiver's RFC 3464 bounce of ``original`` for ``rcpt``, quoting its headers."""
    head = original.data.split(b"\r\n\r\n", 1)[0]
    return (
        b"From: MAILER-DAEMON@mx.gmail.test\r\nTo: " + original.mail_from.encode() + b"\r\n"
        b"Subject: Delivery Status Notification (Failure)\r\nMIME-Version: 1.0\r\n"
        b'Content-Type: multipart/report; report-type=delivery-status; boundary="b1"\r\n\r\n'
        b"--b1\r\nContent-Type: text/plain\r\n\r\nYour message was not delivered.\r\n"
        b"--b1\r\nContent-Type: message/delivery-status\r\n\r\n"
        b"Reporting-MTA: dns; mx.gmail.test\r\n\r\n"
        b"Final-Recipient: rfc822; " + rcpt.encode() + b"\r\nAction: failed\r\n"
        b"Status: " + status.encode() + b"\r\n"
        b"Diagnostic-Code: " + diagnostic.encode() + b"\r\n\r\n"
        b"--b1\r\nContent-Type: text/rfc822-headers\r\n\r\n" + head + b"\r\n--b1--\r\n"
    )


def arf(original: Received) -> bytes:
    """A complaint loop's RFC 5965 report, the recipient redacted (Yahoo's CFL)."""
    body = original.data
    for rcpt in original.rcpts:
        body = body.replace(rcpt.encode(), b"redacted@redacted")
    return (
        b"From: feedback@yahoo.test\r\nTo: fbl@" + BOUNCES.encode() + b"\r\n"
        b"Subject: complaint\r\nMIME-Version: 1.0\r\n"
        b'Content-Type: multipart/report; report-type=feedback-report; boundary="f1"\r\n\r\n'
        b"--f1\r\nContent-Type: text/plain\r\n\r\nThis is an abuse report.\r\n"
        b"--f1\r\nContent-Type: message/feedback-report\r\n\r\n"
        b"Feedback-Type: abuse\r\nUser-Agent: YahooCFL/1.0\r\nVersion: 1\r\n"
        b"Original-Rcpt-To: redacted@redacted\r\nSource-IP: 127.0.0.2\r\n\r\n"
        b"--f1\r\nContent-Type: message/rfc822\r\n\r\n" + body + b"\r\n--f1--\r\n"
    )


def to(sink: Sink, rcpt: str) -> Received:
    """The one message the sink received for ``rcpt``."""
    (found,) = [m for m in sink.messages if rcpt in m.rcpts]
    return found


async def settled(relay: Relay) -> None:
    """Nothing queued and every event posted."""
    await eventually(lambda: relay.scheduler.messages == 0, what="the queue empty")
    await eventually(
        lambda: relay.events.outbox is None or relay.events.outbox.count == 0,
        what="the outbox empty",
    )


async def queue_api(relay: Relay, action: str, body: dict[str, Any]) -> tuple[int, Any]:
    """The admin API `warmrelay queue` speaks to."""
    url = f"http://127.0.0.1:{relay.admin.port}/queue/{action}"
    async with aiohttp.ClientSession() as session, session.post(url, json=body) as response:
        return response.status, await response.json()


class RefuseOnce:
    """The sink's RCPT answer: ``reply`` for ``rcpt`` the first ``times`` times."""

    def __init__(self, rcpt: str, reply: str, times: int = 1) -> None:
        self.rcpt, self.reply, self.left = rcpt, reply, times

    def __call__(self, peer: str, rcpt: str) -> str | None:
        if rcpt.strip("<>") == self.rcpt and self.left:
            self.left -= 1
            return self.reply
        return None


# -- 1. a SendGrid consumer reads every event type ----------------------------------------


async def test_a_sendgrid_consumer_reads_every_event_type_and_drops_duplicates(
    tmp_path: Path, sink: Sink, receiver: Receiver
) -> None:
    """processed, delivered, deferred, bounce (in-band and async), dropped, spamreport,
    each read with the fields SendGrid guarantees; a batch posted again after a 500 (the
    same event_ids) is read once."""
    answers = iter([500])
    receiver.answer = lambda: next(answers, 200)
    refusals = {
        "later@gmail.com": "451 4.3.0 try again later",
        "gone@gmail.com": "550 5.1.1 no such user",
    }
    deferred = RefuseOnce("later@gmail.com", refusals["later@gmail.com"])
    sink.rcpt_reply = lambda peer, rcpt: (
        refusals["gone@gmail.com"] if rcpt == "gone@gmail.com" else deferred(peer, rcpt)
    )
    async with running(config(tmp_path, sink, receiver, bounces=True)) as relay:
        rcpts = ["kept@gmail.com", "later@gmail.com", "gone@gmail.com", "fan@yahoo.com"]
        assert (await submit(relay, rcpts, message_id="<all.1@sender.test>")).code == 250
        await sink.wait_until(lambda: len([m for m in sink.messages if m.mail_from]) == 3)
        await eventually(lambda: relay.suppression.check("gone@gmail.com") is not None)
        refused = await submit(relay, ["gone@gmail.com"])
        assert refused.code == 550 and "suppressed" in refused.text
        kept, fan = to(sink, "kept@gmail.com"), to(sink, "fan@yahoo.com")
        code, text = await report(
            relay, kept.mail_from, dsn(kept, "kept@gmail.com", "5.7.1", BLOCK_DIAGNOSTIC)
        )
        assert code == 250, text
        code, text = await report(relay, f"fbl@{BOUNCES}", arf(fan))
        assert code == 250, text
        await until_events(receiver, has("spamreport", "fan@yahoo.com"))
        await settled(relay)
    assert [p.status for p in receiver.posts][:2] == [500, 200]
    first = strict_json(receiver.posts[0].body)
    assert strict_json(receiver.posts[1].body)[: len(first)] == first  # the same events again
    consumer = consume(receiver)
    assert consumer.duplicates >= len(first)
    got = {(r["event"], r["email"]) for r in consumer.rows}
    assert got >= {
        ("processed", "kept@gmail.com"),
        ("delivered", "kept@gmail.com"),
        ("deferred", "later@gmail.com"),
        ("delivered", "later@gmail.com"),
        ("bounce", "gone@gmail.com"),
        ("dropped", "gone@gmail.com"),
        ("bounce", "kept@gmail.com"),  # async: the receiver bounced it after the handover
        ("spamreport", "fan@yahoo.com"),
    }
    assert len(consumer.rows) == len(consumer.seen)
    bounces = [r for r in consumer.rows if r["event"] == "bounce"]
    assert sorted(r["type"] for r in bounces) == ["blocked", "bounce"]


# -- 2. each event type's fields ------------------------------------------------------------


async def test_processed_and_delivered_fields(
    tmp_path: Path, sink: Sink, receiver: Receiver
) -> None:
    async with running(config(tmp_path, sink, receiver)) as relay:
        answer = await submit(relay, ["ann@gmail.com"], message_id="<m1.fields@sender.test>")
        qid = answer.queue_id
        await sink.wait_for(1)
        events = await until_events(receiver, has("delivered", "ann@gmail.com"))
    processed, delivered = events
    assert processed == {
        "email": "ann@gmail.com",
        "timestamp": processed["timestamp"],
        "event": "processed",
        "event_id": processed["event_id"],
        "smtp-id": "<m1.fields@sender.test>",
        "queue_id": qid,
    }
    assert delivered == {
        "email": "ann@gmail.com",
        "timestamp": delivered["timestamp"],
        "event": "delivered",
        "event_id": delivered["event_id"],
        "smtp-id": "<m1.fields@sender.test>",
        "queue_id": qid,
        "ip": "127.0.0.2",
        "provider": "gmail",
        "warming": True,
        "tls": 0,
        "response": delivered["response"],
    }
    assert delivered["response"].startswith("250")
    for e in events:
        assert isinstance(e["timestamp"], int) and abs(e["timestamp"] - time.time()) < 60
        assert len(e["event_id"]) == 32 and int(e["event_id"], 16) >= 0
    assert processed["event_id"] != delivered["event_id"]
    assert consume(receiver).rows[1]["response"].startswith("250")


async def test_deferred_twice_then_delivered_counts_attempts(
    tmp_path: Path, sink: Sink, receiver: Receiver
) -> None:
    sink.rcpt_reply = RefuseOnce("slow@gmail.com", "451 4.3.0 greylisted, come back", times=2)
    async with running(config(tmp_path, sink, receiver)) as relay:
        qid = (await submit(relay, ["slow@gmail.com"], message_id="<m2@sender.test>")).queue_id
        events = await until_events(receiver, has("delivered", "slow@gmail.com"))
    assert [e["event"] for e in events] == ["processed", "deferred", "deferred", "delivered"]
    first, second = events[1], events[2]
    for n, e in enumerate((first, second), start=1):
        assert e["attempt"] == str(n)
        assert e["response"] == "451 4.3.0 greylisted, come back"
        assert (e["ip"], e["provider"], e["warming"], e["tls"]) == ("127.0.0.2", "gmail", True, 0)
        assert (e["queue_id"], e["smtp-id"]) == (qid, "<m2@sender.test>")
        assert "reason" not in e and "status" not in e and "async" not in e
    assert len({e["event_id"] for e in events}) == 4
    assert [r.get("attempt") for r in consume(receiver).rows] == [None, 1, 2, None]


async def test_a_deferral_after_a_reroute_has_its_own_event_id(
    tmp_path: Path, make_sink: Callable[..., Any], receiver: Receiver
) -> None:
    """Yahoo blocks the warming IP (a deferral: routed again at once from the pool), then
    the pool IP is greylisted (another deferral), then delivered. Two deferrals, two
    events: a consumer that drops repeated event_ids must not lose the second."""
    refused: list[str] = []

    def answer(peer: str, rcpt: str) -> str | None:
        if peer == "127.0.0.2":
            refused.append(peer)
            return BLOCK_DIAGNOSTIC.removeprefix("smtp; ")
        if peer == "127.0.0.3" and "127.0.0.3" not in refused:
            refused.append(peer)
            return "451 4.3.0 greylisted"
        return None

    sink = await make_sink(rcpt_reply=answer)
    async with running(config(tmp_path, sink, receiver)) as relay:
        await submit(relay, ["yan@yahoo.com"])
        await sink.wait_for(1)
        await settled(relay)
    assert refused == ["127.0.0.2", "127.0.0.3"]
    deferred = named(
        [e for p in receiver.posts if p.status == 200 for e in p.events], "deferred"
    )  # every event taken, duplicates kept: both deferrals were posted
    assert [e["ip"] for e in deferred] == ["127.0.0.2", "127.0.0.3"]
    assert deferred[0]["event_id"] != deferred[1]["event_id"], deferred  # not a duplicate
    assert int(deferred[0]["attempt"]) < int(deferred[1]["attempt"]), deferred


async def test_an_in_band_bounce(tmp_path: Path, sink: Sink, receiver: Receiver) -> None:
    sink.rcpt_reply = RefuseOnce("nobody@gmail.com", "550 5.1.1 The account does not exist")
    async with running(config(tmp_path, sink, receiver)) as relay:
        qid = (await submit(relay, ["nobody@gmail.com"], message_id="<m3@sender.test>")).queue_id
        events = await until_events(receiver, has("bounce", "nobody@gmail.com"))
    bounce = named(events, "bounce")[0]
    assert bounce == {
        "email": "nobody@gmail.com",
        "timestamp": bounce["timestamp"],
        "event": "bounce",
        "event_id": bounce["event_id"],
        "smtp-id": "<m3@sender.test>",
        "queue_id": qid,
        "ip": "127.0.0.2",
        "provider": "gmail",
        "warming": True,
        "tls": 0,
        "reason": "550 5.1.1 The account does not exist",
        "status": "5.1.1",
        "type": "bounce",
        "async": False,
    }


async def test_a_suppressed_recipient_is_dropped_at_rcpt(
    tmp_path: Path, sink: Sink, receiver: Receiver
) -> None:
    sink.rcpt_reply = RefuseOnce("dead@gmail.com", "550 5.1.1 no such user")
    async with running(config(tmp_path, sink, receiver)) as relay:
        await submit(relay, ["dead@gmail.com"])
        await until_events(receiver, has("bounce", "dead@gmail.com"))
        await eventually(lambda: relay.suppression.check("dead@gmail.com") is not None)
        again = await submit(relay, ["dead@gmail.com"], args='{"user_id": "7"}')
        assert again.code == 550 and again.text.startswith("5.1.1"), again
        events = await until_events(receiver, has("dropped", "dead@gmail.com"))
    (dropped,) = named(events, "dropped")
    assert set(dropped) == {"email", "timestamp", "event", "event_id", "reason"}
    assert dropped["email"] == "dead@gmail.com"
    assert "suppressed" in dropped["reason"] and "5.1.1" in dropped["reason"]
    assert len({e["event_id"] for e in events}) == len(events)


async def test_an_expired_recipient_is_dropped(
    tmp_path: Path, sink: Sink, receiver: Receiver
) -> None:
    sink.rcpt_reply = lambda peer, rcpt: "451 4.3.0 never" if rcpt == "late@gmail.com" else None
    delivery = {"retry_first_s": 0.1, "retry_max_s": 0.2, "queue_lifetime_s": 0.5}
    async with running(config(tmp_path, sink, receiver, delivery=delivery)) as relay:
        qid = (await submit(relay, ["late@gmail.com"], message_id="<m4@sender.test>")).queue_id
        events = await until_events(receiver, has("dropped", "late@gmail.com"))
        await settled(relay)
    dropped = named(events, "dropped")[0]
    assert dropped == {
        "email": "late@gmail.com",
        "timestamp": dropped["timestamp"],
        "event": "dropped",
        "event_id": dropped["event_id"],
        "smtp-id": "<m4@sender.test>",
        "queue_id": qid,
        "provider": "gmail",
        "reason": "expired: 451 4.3.0 never",
        "status": "4.4.7",
    }
    deferrals = named(events, "deferred")
    assert deferrals and [e["attempt"] for e in deferrals] == [
        str(n) for n in range(1, len(deferrals) + 1)
    ]
    assert named(events, "delivered") == []  # the DSN to the sender has no events


async def test_a_recipient_deleted_by_the_operator_is_dropped(
    tmp_path: Path, sink: Sink, receiver: Receiver
) -> None:
    sink.rcpt_reply = lambda peer, rcpt: "451 4.3.0 not now"
    slow = {"retry_first_s": 600, "retry_max_s": 3600}
    async with running(config(tmp_path, sink, receiver, delivery=slow)) as relay:
        qid = (await submit(relay, ["del@gmail.com"], args='{"user_id": "9"}')).queue_id
        await until_events(receiver, has("deferred", "del@gmail.com"))
        code, result = await queue_api(relay, "delete", {"queue_ids": [qid]})
        assert code == 200 and result["queue_ids"] == [qid], result
        events = await until_events(receiver, has("dropped", "del@gmail.com"))
        await settled(relay)
    assert [e["event"] for e in events] == ["processed", "deferred", "dropped"]
    dropped = events[-1]
    assert dropped == {
        "email": "del@gmail.com",
        "timestamp": dropped["timestamp"],
        "event": "dropped",
        "event_id": dropped["event_id"],
        "smtp-id": dropped["smtp-id"],  # the one the relay added (the client sent none)
        "queue_id": qid,
        "reason": "deleted by the operator",
        "user_id": "9",
    }
    assert dropped["smtp-id"] == events[0]["smtp-id"] and dropped["smtp-id"].startswith("<")
    assert [m for m in sink.messages] == []  # no DSN for a deletion


async def test_async_bounce_and_spamreport_carry_the_custom_args(
    tmp_path: Path, sink: Sink, receiver: Receiver
) -> None:
    async with running(config(tmp_path, sink, receiver, bounces=True)) as relay:
        args = '{"user_id": "42", "campaign": "spring", "n": 3, "vip": true}'
        qid = (
            await submit(
                relay, ["bo@gmail.com", "co@yahoo.com"], args=args, message_id="<m5@sender.test>"
            )
        ).queue_id
        await sink.wait_for(2)
        await until_events(receiver, lambda ev: len(named(ev, "delivered")) == 2)
        bo, co = to(sink, "bo@gmail.com"), to(sink, "co@yahoo.com")
        code, text = await report(
            relay, bo.mail_from, dsn(bo, "bo@gmail.com", "5.7.1", BLOCK_DIAGNOSTIC)
        )
        assert code == 250, text
        code, text = await report(relay, f"fbl@{BOUNCES}", arf(co))
        assert code == 250, text
        events = await until_events(receiver, has("spamreport", "co@yahoo.com"))
    custom = {"user_id": "42", "campaign": "spring", "n": 3, "vip": True}
    (bounce,) = named(events, "bounce")
    assert bounce == {
        "email": "bo@gmail.com",
        "timestamp": bounce["timestamp"],
        "event": "bounce",
        "event_id": bounce["event_id"],
        "smtp-id": "<m5@sender.test>",
        "queue_id": qid,
        "ip": "127.0.0.2",
        "provider": "gmail",
        "status": "5.7.1",
        "reason": BLOCK_DIAGNOSTIC.removeprefix("smtp; "),
        "type": "blocked",
        "async": True,
        **custom,
    }
    (complaint,) = named(events, "spamreport")
    assert complaint == {
        "email": "co@yahoo.com",
        "timestamp": complaint["timestamp"],
        "event": "spamreport",
        "event_id": complaint["event_id"],
        "smtp-id": "<m5@sender.test>",
        "queue_id": qid,
        "ip": "127.0.0.2",
        "provider": "yahoo",
        "type": "abuse",
        "async": True,
        **custom,
    }
    for e in events:  # processed, delivered and the async ones: all the message's events
        assert {k: e.get(k) for k in custom} == custom, e
    assert len({e["event_id"] for e in events}) == len(events) == 6


async def test_an_async_bounce_names_the_message_without_custom_args(
    tmp_path: Path, sink: Sink, receiver: Receiver
) -> None:
    """SendGrid's bounce carries the smtp-id the consumer matches its messages by: an
    async bounce does too, whether or not the message had custom arguments."""
    async with running(config(tmp_path, sink, receiver, bounces=True)) as relay:
        await submit(relay, ["plain@gmail.com"], message_id="<m6@sender.test>")
        (original,) = await sink.wait_for(1)
        bounced = dsn(original, "plain@gmail.com", "5.1.1", "smtp; 550 5.1.1 user unknown")
        assert (await report(relay, original.mail_from, bounced))[0] == 250
        events = await until_events(receiver, has("bounce", "plain@gmail.com"))
    (bounce,) = named(events, "bounce")
    assert (bounce["type"], bounce["status"], bounce["async"]) == ("bounce", "5.1.1", True)
    assert bounce["smtp-id"] == "<m6@sender.test>", bounce


# -- 3. custom arguments ----------------------------------------------------------------------


async def test_custom_args_leave_the_message_and_come_back_in_every_event(
    tmp_path: Path, sink: Sink, receiver: Receiver
) -> None:
    folded = '{"user_id": "42",\r\n\t"tenant": "acme"}'  # a folded header is one value
    async with running(config(tmp_path, sink, receiver)) as relay:
        with_args = await submit(relay, ["x@gmail.com", "y@gmail.com"], args=folded)
        without = await submit(relay, ["z@gmail.com"])
        await sink.wait_for(2)
        events = await until_events(receiver, lambda ev: len(named(ev, "delivered")) == 3)
    for m in sink.messages:
        assert b"x-warmrelay-args" not in m.data.lower()
        assert b"acme" not in m.data  # no trace of the value either (nor a folded line)
    mine = [e for e in events if e["queue_id"] == with_args.queue_id]
    assert sorted((e["event"], e["email"]) for e in mine) == [
        ("delivered", "x@gmail.com"), ("delivered", "y@gmail.com"),
        ("processed", "x@gmail.com"), ("processed", "y@gmail.com"),
    ]  # fmt: skip
    for e in mine:
        assert (e["user_id"], e["tenant"]) == ("42", "acme")
        assert set(e) - FIELDS == {"user_id", "tenant"}
    plain = [e for e in events if e["queue_id"] == without.queue_id]
    assert len(plain) == 2 and all(set(e) <= FIELDS for e in plain)


def long_args() -> str:
    """A flat object over 10,000 bytes, folded so no line is over SMTP's 1000."""
    items = [f'"k{n}": "{"v" * 80}"' for n in range(120)]
    return "{" + ",\r\n ".join(items) + "}"


@pytest.mark.parametrize(
    ("args", "why"),
    [
        ('{"user_id": 42', "not JSON"),
        ('["user_id", "42"]', "not a JSON object"),
        ('{"user": {"id": 42}}', "'user': only strings, numbers, true/false and null"),
        ('{"email": "someone@else.test"}', "'email' is a field of the event itself"),
        ('{"score": NaN}', ""),  # not JSON (RFC 8259): a strict consumer refuses the batch
        ('{"score": Infinity}', ""),
        (long_args(), "longer than 10000 bytes"),
    ],
    ids=["invalid-json", "array", "nested", "reserved", "nan", "infinity", "too-long"],
)
async def test_bad_custom_args_are_refused_at_data_without_an_event(
    tmp_path: Path, sink: Sink, receiver: Receiver, args: str, why: str
) -> None:
    async with running(config(tmp_path, sink, receiver)) as relay:
        refused = await submit(relay, ["bad@gmail.com"], args=args)
        after = await submit(relay, ["good@gmail.com"])
        events = await until_events(receiver, has("delivered", "good@gmail.com"))
        await settled(relay)
    assert refused.code == 554 and refused.text.startswith(f"5.6.0 {ARGS}: "), refused
    assert why in refused.text
    assert after.code == 250
    assert [e["email"] for e in events] == ["good@gmail.com", "good@gmail.com"]
    assert [m.rcpts for m in sink.messages] == [["good@gmail.com"]]
    consume(receiver)  # strict JSON throughout


# -- 4. events.file ---------------------------------------------------------------------------


def lines(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [strict_json(line.encode()) for line in path.read_text().splitlines()]


async def test_the_file_holds_the_same_events_as_the_webhook(
    tmp_path: Path, sink: Sink, receiver: Receiver
) -> None:
    path = tmp_path / "events.jsonl"
    sink.rcpt_reply = RefuseOnce("f2@gmail.com", "550 5.1.1 unknown")
    async with running(config(tmp_path, sink, receiver, file=path)) as relay:
        await submit(relay, ["f1@gmail.com", "f2@gmail.com"], args='{"user_id": "5"}')
        await until_events(receiver, lambda ev: len(ev) == 4)
        await settled(relay)
    written = lines(path)
    assert written == events_of(receiver)  # same events, same ids, same order
    assert {e["event"] for e in written} == {"processed", "delivered", "bounce"}
    assert all(e["user_id"] == "5" for e in written)


async def test_the_file_alone_without_a_webhook(tmp_path: Path, sink: Sink) -> None:
    path = tmp_path / "events.jsonl"
    async with running(config(tmp_path, sink, None, file=path)) as relay:
        assert relay.events.outbox is None and relay.events.webhook is None
        qid = (await submit(relay, ["solo@gmail.com"], message_id="<m7@sender.test>")).queue_id
        await eventually(lambda: len(lines(path)) == 2, what="two events in the file")
    processed, delivered = lines(path)
    assert (processed["event"], delivered["event"]) == ("processed", "delivered")
    for e in (processed, delivered):
        assert (e["email"], e["queue_id"], e["smtp-id"]) == (
            "solo@gmail.com",
            qid,
            "<m7@sender.test>",
        )
    assert delivered["ip"] == "127.0.0.2" and delivered["response"].startswith("250")
    assert not (tmp_path / "state" / "events").exists()  # no outbox without a webhook


# -- 5. signatures ----------------------------------------------------------------------------


async def test_every_post_is_signed_and_tampering_or_replay_fails(
    tmp_path: Path, sink: Sink, receiver: Receiver
) -> None:
    async with running(config(tmp_path, sink, receiver, batch_max=1)) as relay:
        await submit(relay, ["s1@gmail.com", "s2@gmail.com"])
        await until_events(receiver, lambda ev: len(ev) == 4)
        await settled(relay)
    secret = WEBHOOK_SECRET.encode()
    assert len(receiver.posts) == 4  # batch_max 1: one event a POST
    for post in receiver.posts:
        header, body = post.headers[SIGNATURE_HEADER], post.body
        assert post.headers["Content-Type"] == "application/json"
        fields = dict(part.split("=", 1) for part in header.split(","))
        t = int(fields["t"])
        assert abs(t - time.time()) < 60 and len(fields["v1"]) == 64
        assert verify(secret, header, body, time.time())
        assert not verify(secret, header, body.replace(b"@gmail.com", b"@gmail.con", 1), t)
        assert not verify(secret, header, body + b" ", t)
        assert not verify(b"another secret of sixteen bytes", header, body, t)
        assert not verify(secret, header, body, t + 3600)  # replayed an hour later
        old = sign(secret, t - 3600, body)  # a genuine signature, an hour old
        assert not verify(secret, old, body, t)
        assert not verify(secret, header.replace(f"t={t}", f"t={t + 1}"), body, t)
        assert not verify(secret, f"t={t}", body, t)  # no v1
        assert not verify(secret, "", body, t)


def test_verify_refuses_a_forged_header_with_foreign_characters() -> None:
    """A consumer hands verify what the client sent: a header it cannot read is a
    forgery (False), not an exception (a 500, and a retry storm from a sender)."""
    body = b'[{"email":"a@b.test"}]'
    now = int(time.time())
    assert verify(WEBHOOK_SECRET.encode(), f"t={now},v1=" + "é" * 64, body, now) is False


# -- 6. only the application's mail has events ---------------------------------------------


async def test_our_own_dsn_has_no_events(tmp_path: Path, sink: Sink, receiver: Receiver) -> None:
    sink.rcpt_reply = RefuseOnce("lost@gmail.com", "550 5.1.1 no such user")
    async with running(config(tmp_path, sink, receiver)) as relay:
        await submit(relay, ["lost@gmail.com"], args='{"user_id": "1"}')
        (notice,) = await sink.wait_for(1)  # the DSN to the sender
        assert notice.rcpts == [SENDER] and notice.mail_from == ""
        await settled(relay)
    events = events_of(receiver)
    assert [(e["event"], e["email"]) for e in events] == [
        ("processed", "lost@gmail.com"),
        ("bounce", "lost@gmail.com"),
    ]
