"""Unfriendly receivers: throttles and blocks anywhere in the transaction, greylisting, TLS
failures, slow destinations, hang-ups after the dot — and what each costs the warming IP."""

from __future__ import annotations

import asyncio
import email
import email.policy
import logging
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import aiosmtplib
import pytest
import trustme
from aiosmtpd.smtp import Envelope
from support.dnsserver import LoopbackDNS
from support.relay import http_get, mx_config, relay_config, running, send
from support.sink import Sink

from warmrelay.app import Relay
from warmrelay.config import parse_config
from warmrelay.delivery.dispositions import retry_delay
from warmrelay.warmup.counters import MemoryCounters
from warmrelay.warmup.router import Hold, Router

WARMING, POOL = "127.0.0.2", "127.0.0.3"
MakeSink = Callable[..., Awaitable[Sink]]


async def warming_sent(relay: Relay) -> int:
    return await relay.router.sent(relay.config.ips[0], relay.clock())


def reply_late(sink: Sink, late: asyncio.Event, rcpts: list[str] | None = None) -> None:
    """The sink stores each message (of ``rcpts`` only, if given), then holds its reply to
    the final dot until ``late`` is set: a receiver that answers after our timeout."""
    original = sink.handle_DATA

    async def handle_DATA(server: Any, session: Any, envelope: Envelope) -> str:
        reply = await original(server, session, envelope)  # stored...
        if rcpts is None or envelope.rcpt_tos == rcpts:
            await late.wait()  # ...but the reply comes after our timeout
        return reply

    sink.handle_DATA = handle_DATA  # type: ignore[method-assign]


async def metrics(relay: Relay) -> str:
    _, body = await http_get(relay.admin.port, "/metrics")
    return body.decode()


@asynccontextmanager
async def gmail_hosted(
    tmp_path: Path, sink: Sink, **over: Any
) -> AsyncIterator[tuple[Relay, LoopbackDNS]]:
    """brand.test's MX is Google's (on loopback): the relay recognises the provider gmail."""
    async with LoopbackDNS() as dns:
        dns.add_mx("brand.test", 10, "gmail-smtp-in.l.google.com")
        dns.add_a("gmail-smtp-in.l.google.com", sink.host)
        dns.add_mx("sender.test", 10, "mx.sender.test")
        dns.add_a("mx.sender.test", sink.host)
        config = mx_config(tmp_path, sink.port, dns.port, sink.port, **over)
        async with running(config) as relay:
            yield relay, dns


async def test_421_at_the_first_rcpt_suspends_and_all_recipients_go_from_the_pool(
    tmp_path: Path, make_sink: MakeSink
) -> None:
    """aiosmtplib closes the connection after a 421; the next RCPT then fails with "not
    connected". Every recipient must still be seen as throttled, not as a generic failure."""

    def throttle_warming(peer: str, rcpt: str) -> str | None:
        if peer == WARMING:
            return "421 4.7.28 Gmail has detected an unusual rate of unsolicited mail"
        return None

    sink = await make_sink(host="127.0.0.20", rcpt_reply=throttle_warming)
    async with gmail_hosted(tmp_path, sink) as (relay, _):
        rcpts = ["a@brand.test", "b@brand.test", "c@brand.test"]
        await send(relay, rcpts)
        got = await sink.wait_for(1)
        assert [(m.peer, sorted(m.rcpts)) for m in got] == [(POOL, rcpts)]
        assert set(relay.router.control(WARMING).suspended) == {"gmail"}
        assert await warming_sent(relay) == 0  # nothing was handed over from the warming IP
        text = await metrics(relay)
        assert 'warmrelay_throttled_total{ip="127.0.0.2",provider="gmail"} 3.0' in text


async def test_throttle_at_the_greeting_is_recognised(
    tmp_path: Path, logs: LogWatch, make_sink: MakeSink
) -> None:
    """The receiver throttles before any command: a 421 greeting to the warming IP."""

    async def greet(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"421 4.7.0 [TSS04] Messages from 127.0.0.2 temporarily deferred\r\n")
        await writer.drain()
        writer.close()

    pool_sink = await make_sink(host="127.0.0.21")
    server = await asyncio.start_server(greet, "127.0.0.22", 0)
    throttling_port = server.sockets[0].getsockname()[1]
    async with server, LoopbackDNS() as dns:
        dns.add_mx("ymail.test", 10, "mta5.am0.yahoodns.net")
        dns.add_a("mta5.am0.yahoodns.net", "127.0.0.22")
        config = mx_config(tmp_path, pool_sink.port, dns.port, throttling_port)
        async with running(config) as relay:
            await send(relay, ["x@ymail.test", "y@ymail.test"])
            await logs.wait_for("yahoo throttles 127.0.0.2")
            assert set(relay.router.control(WARMING).suspended) == {"yahoo"}
            assert await warming_sent(relay) == 0


async def test_reputation_block_retries_from_the_pool_without_a_dsn(
    tmp_path: Path, make_sink: MakeSink
) -> None:
    def block_warming(peer: str, rcpt: str) -> str | None:
        if peer == WARMING:
            return (
                "550 5.7.1 Service unavailable; client [127.0.0.2] blocked using zen.spamhaus.org"
            )
        return None

    sink = await make_sink(host="127.0.0.23", rcpt_reply=block_warming)
    async with gmail_hosted(tmp_path, sink) as (relay, _):
        await send(relay, ["a@brand.test"], sender="app@sender.test")
        got = await sink.wait_for(1)
        assert [(m.peer, m.rcpts) for m in got] == [(POOL, ["a@brand.test"])]
        suspension = relay.router.control(WARMING).suspended["gmail"]
        assert "spamhaus" in suspension.reason
        assert suspension.cooldown_s >= relay.config.blocks.cooldown_s
        text = await metrics(relay)
        assert 'warmrelay_blocked_total{ip="127.0.0.2",provider="gmail"} 1.0' in text
        assert relay.metrics.dsn_sent._value.get() == 0
        assert await warming_sent(relay) == 0
    assert all(m.mail_from for m in sink.messages)  # no DSN ever went out


async def test_microsoft_block_after_the_dot_is_no_bounce(
    tmp_path: Path, make_sink: MakeSink
) -> None:
    def block(peer: str, envelope: Envelope) -> str | None:
        if peer == WARMING:
            return "550 5.7.606 Access denied, banned sending IP [127.0.0.2]"
        return None

    sink = await make_sink(host="127.0.0.24", data_reply=block)
    async with gmail_hosted(tmp_path, sink) as (relay, _):
        await send(relay, ["a@brand.test", "b@brand.test"], sender="app@sender.test")
        got = await sink.wait_for(1)
        assert [(m.peer, sorted(m.rcpts)) for m in got] == [
            (POOL, ["a@brand.test", "b@brand.test"])
        ]
        assert relay.metrics.dsn_sent._value.get() == 0
        assert await warming_sent(relay) == 0


async def test_greylisting_costs_the_cap_once(tmp_path: Path, make_sink: MakeSink) -> None:
    seen: set[str] = set()

    def greylist(peer: str, rcpt: str) -> str | None:
        if rcpt not in seen:
            seen.add(rcpt)
            return "451 4.7.1 Greylisted, please try again later"
        return None

    sink = await make_sink(rcpt_reply=greylist)
    config = relay_config(tmp_path, sink.port, cap=1000, delivery={"retry_first_s": 0.1})
    async with running(config) as relay:
        await send(relay, ["a@example.test", "b@example.test"])
        (msg,) = await sink.wait_for(1)
        assert msg.peer == WARMING
        assert await warming_sent(relay) == 2  # one each, not one per attempt


Server = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def refuse_tls_handshake() -> Server:
    """A next hop that offers STARTTLS, says 220, then answers the handshake with junk."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 broken.test ESMTP\r\n")
        while line := await reader.readline():
            verb = line[:4].upper()
            if verb in (b"EHLO", b"HELO"):
                writer.write(b"250-broken.test\r\n250 STARTTLS\r\n")
            elif verb == b"STAR":
                writer.write(b"220 go ahead\r\n")
                await writer.drain()
                await reader.read(1)  # the ClientHello
                writer.write(b"this is not a TLS record\r\n" * 4)
                await writer.drain()
                break
            else:
                writer.write(b"502 5.5.1 no\r\n")
            await writer.drain()
        writer.close()

    return serve


async def test_tls_failure_moves_to_the_next_mx_and_counts_once(
    tmp_path: Path, make_sink: MakeSink
) -> None:
    broken = await asyncio.start_server(refuse_tls_handshake(), "127.0.0.25", 0)
    port = broken.sockets[0].getsockname()[1]
    sink = await make_sink(host="127.0.0.26", port=port)  # same port, other address
    async with broken, LoopbackDNS() as dns:
        dns.add_mx("two-mx.test", 10, "mx1.two-mx.test")
        dns.add_a("mx1.two-mx.test", "127.0.0.25")
        dns.add_mx("two-mx.test", 20, "mx2.two-mx.test")
        dns.add_a("mx2.two-mx.test", "127.0.0.26")
        config = mx_config(tmp_path, sink.port, dns.port, port)
        async with running(config) as relay:
            await send(relay, ["a@two-mx.test"])
            (msg,) = await sink.wait_for(1)
            assert msg.peer == WARMING
            assert await warming_sent(relay) == 1


async def test_tls_failure_on_the_only_mx_defers_and_gives_the_count_back(
    tmp_path: Path, logs: LogWatch
) -> None:
    broken = await asyncio.start_server(refuse_tls_handshake(), "127.0.0.27", 0)
    port = broken.sockets[0].getsockname()[1]
    config = relay_config(
        tmp_path,
        port,
        cap=1000,
        routes={"*": f"127.0.0.27:{port}"},
        delivery={"retry_first_s": 3600},
    )
    async with broken, running(config) as relay:
        await send(relay, ["a@example.test"])
        line = await logs.wait_for("to=<a@example.test>")
        assert " deferred (451 4.4.1 " in line and "TLS failed" in line
        assert relay.scheduler.deferred == 1
        assert await warming_sent(relay) == 0
        assert len(relay.spool) == 1  # waiting for its retry in an hour, not spinning
        text = await metrics(relay)
        assert 'warmrelay_deliveries_total{ip="127.0.0.2",outcome="deferred"} 1.0' in text


async def test_a_dsn_leaves_from_a_pool_ip(tmp_path: Path, make_sink: MakeSink) -> None:
    sink = await make_sink(
        rcpt_reply=lambda peer, rcpt: "550 5.1.1 no such user" if rcpt.startswith("gone") else None
    )
    async with running(relay_config(tmp_path, sink.port, cap=1000)) as relay:
        await send(relay, ["gone@example.test"], sender="app@sender.test")
        (dsn,) = await sink.wait_for(1)
        assert dsn.mail_from == ""
        assert dsn.peer == POOL
        assert await warming_sent(relay) == 0  # refused at RCPT: not handed over, not counted


async def test_a_slow_destination_does_not_stall_the_others(
    tmp_path: Path, make_sink: MakeSink
) -> None:
    """Head of line: 20 messages to a destination that holds each one at DATA (until the
    test lets go), with 4 sends at once and 2 connections per destination; a message to
    another domain goes out at once."""
    held = asyncio.Event()
    slow = await make_sink(host="127.0.0.28", data_gate=held)
    fast = await make_sink(host="127.0.0.29")
    config = relay_config(
        tmp_path,
        slow.port,
        cap=1000,
        routes={"slow.test": f"127.0.0.28:{slow.port}", "fast.test": f"127.0.0.29:{fast.port}"},
        delivery={"concurrency": 4, "connections_per_destination": 2},
    )
    async with running(config) as relay:
        try:
            for i in range(20):
                await send(relay, [f"u{i}@slow.test"])
            await slow.wait_until(lambda: slow.in_data >= 2)  # both its connections are busy
            await send(relay, ["v@fast.test"])
            # with the head-of-line block it would wait for slow sends that never finish
            (msg,) = await fast.wait_for(1, timeout_s=15)
            assert msg.rcpts == ["v@fast.test"]
            assert len(slow.messages) < 20
        finally:
            held.set()  # the slow destination answers: the relay can stop


async def test_8bitmime_is_declared_on_a_fresh_starttls_connection(
    tmp_path: Path, make_sink: MakeSink
) -> None:
    ca = trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("sink.test").configure_cert(server_ctx)
    sink = await make_sink(tls_context=server_ctx)
    async with running(relay_config(tmp_path, sink.port)) as relay:
        await send(relay, ["a@example.test"], body="Grüße aus Köln")
        (msg,) = await sink.wait_for(1)
    assert msg.tls
    assert "BODY=8BITMIME" in [o.upper() for o in msg.mail_options]


async def test_utf8_address_to_a_receiver_without_smtputf8_bounces_at_once(
    tmp_path: Path, make_sink: MakeSink
) -> None:
    sink = await make_sink(smtputf8=False)
    config = relay_config(tmp_path, sink.port, delivery={"retry_first_s": 3600})
    async with running(config) as relay:
        message = b"From: <app@sender.test>\r\nSubject: x\r\n\r\nhi\r\n"
        async with aiosmtplib.SMTP(hostname="127.0.0.1", port=relay.smtp_ports[0]) as client:
            await client.sendmail(
                "app@sender.test", ["jörg@example.test"], message, mail_options=["SMTPUTF8"]
            )
        (dsn,) = await sink.wait_for(1)
    parsed = email.message_from_bytes(dsn.data, policy=email.policy.default)
    report = parsed.get_payload()[1].get_payload()[1]
    assert report["Status"] == "5.6.7"
    assert dsn.rcpts == ["app@sender.test"]


async def test_a_timeout_after_the_dot_is_deferred_not_resent(
    tmp_path: Path, logs: LogWatch, make_sink: MakeSink
) -> None:
    """The receiver stores the message but answers the final dot later than our timeout:
    resending at once (on a fresh connection) would deliver it twice."""
    sink = await make_sink()  # no connection yet: the hook below is the one sessions use
    late = asyncio.Event()  # set once the relay has given up on the reply
    reply_late(sink, late, ["slow@example.test"])
    config = relay_config(
        tmp_path,
        sink.port,
        ips=[{"address": POOL, "helo": "mta2.example.test"}],
        # every command's timeout: room for a busy machine on the first message's replies
        delivery={"timeout_s": 3.0, "retry_first_s": 3600, "connections_per_destination": 1},
    )
    async with running(config) as relay:
        try:
            await send(relay, ["first@example.test"])
            await sink.wait_for(1)
            await send(relay, ["slow@example.test"])  # on the reused connection
            line = await logs.wait_for("to=<slow@example.test>")
            assert " deferred (451 4.4.2 " in line and "uncertain" in line
            assert sink.ehlos == 1  # no second connection was opened to resend it
            assert [m.rcpts for m in sink.messages] == [
                ["first@example.test"],
                ["slow@example.test"],
            ]
            assert relay.scheduler.deferred == 1  # it waits for its retry, as a deferral
        finally:
            late.set()


async def test_a_message_maybe_delivered_counts_against_the_warming_cap(
    tmp_path: Path, logs: LogWatch, make_sink: MakeSink
) -> None:
    """The receiver took the message and answers the dot after our timeout: it may have
    it, so the warming IP's count keeps it (given back, the cap could be passed by every
    such message). It waits for its retry, which counts again: over, never under."""
    sink = await make_sink()
    late = asyncio.Event()
    reply_late(sink, late)
    config = relay_config(
        tmp_path,
        sink.port,
        cap=1000,
        delivery={"timeout_s": 1.0, "retry_first_s": 3600, "retry_max_s": 3600},
    )
    async with running(config) as relay:
        try:
            await send(relay, ["slow@example.test"])
            line = await logs.wait_for("to=<slow@example.test>")
            assert " deferred (451 4.4.2 " in line and "delivery uncertain" in line
            assert [m.peer for m in sink.messages] == [WARMING]
            assert await warming_sent(relay) == 1
            assert relay.scheduler.deferred == 1
        finally:
            late.set()


@pytest.mark.parametrize("pipelining", [True, False])
async def test_a_421_before_data_gives_the_accepted_recipients_count_back(
    tmp_path: Path, logs: LogWatch, make_sink: MakeSink, pipelining: bool
) -> None:
    """RCPT accepted, then 421 for the next RCPT: the message never went out, so nothing
    counts against the warming IP, and the accepted recipient hears the 421 (not "delivery
    uncertain")."""

    def rcpt(peer: str, address: str) -> str | None:
        return "421 4.7.0 too many errors, closing" if address.startswith("second") else None

    sink = await make_sink(rcpt_reply=rcpt)
    config = relay_config(
        tmp_path,
        sink.port,
        cap=1000,
        delivery={"retry_first_s": 3600, "retry_max_s": 3600, "pipelining": pipelining},
    )
    async with running(config) as relay:
        await send(relay, ["first@example.test", "second@example.test"])
        first = await logs.wait_for("to=<first@example.test>")
        second = await logs.wait_for("to=<second@example.test>")
        for line in (first, second):
            assert " deferred (421 4.7.0 too many errors" in line, line
        assert sink.messages == []
        assert await warming_sent(relay) == 0
        assert relay.scheduler.deferred == 1


async def test_idle_connections_are_closed_and_forgotten(tmp_path: Path, sink: Sink) -> None:
    config = relay_config(tmp_path, sink.port, delivery={"idle_connection_s": 0.3})
    async with running(config) as relay:
        await send(relay, ["a@example.test"])
        await sink.wait_for(1)
        await sink.wait_until(lambda: sink.quits == 1, timeout_s=5)  # the reaper said QUIT
        assert relay.dispatcher.idle_connections == 0
        assert not relay.dispatcher._idle


@pytest.mark.parametrize(("held_at", "counted"), [("RCPT", 0), ("DATA", 1)])
async def test_cut_short_at_the_drain_timeout_counts_only_what_may_have_gone_out(
    tmp_path: Path, make_sink: MakeSink, held_at: str, counted: int
) -> None:
    """A shutdown cuts a send short while the receiver holds its reply: to RCPT (nothing
    went out: the reservation goes back) or to the final dot (the receiver has the
    message and may deliver it: it stays counted; the next start sends it again)."""
    started = asyncio.Event()
    never = asyncio.Event()  # the receiver holds its reply past the drain timeout
    sink = await make_sink()
    if held_at == "RCPT":
        original_rcpt = sink.handle_RCPT

        async def handle_RCPT(*args: Any) -> str:
            started.set()
            await never.wait()
            return await original_rcpt(*args)

        sink.handle_RCPT = handle_RCPT  # type: ignore[method-assign]
    else:

        def accept(peer: str, rcpt: str) -> str | None:
            started.set()
            return None

        sink.data_gate, sink.rcpt_reply = never, accept
    config = relay_config(tmp_path, sink.port, cap=1000, delivery={"drain_timeout_s": 0.2})
    try:
        async with running(config) as relay:
            await send(relay, ["a@example.test"])
            await asyncio.wait_for(started.wait(), 30)
            if held_at == "DATA":
                await sink.wait_until(lambda: sink.in_data == 1, timeout_s=30)
            assert await warming_sent(relay) == 1
        again = Relay(config)  # a fresh process reading the same SQLite counters
        try:
            assert await again.router.sent(config.ips[0], again.clock()) == counted
        finally:
            await again.counters.close()
    finally:
        never.set()  # lets the held handler finish


async def test_held_mail_comes_back_when_the_suspension_ends() -> None:
    config = parse_config(
        {
            "ips": [
                {
                    "address": WARMING,
                    "helo": "mta1.example.test",
                    "warmup": {"start": "2026-01-01", "schedule": [100] * 400},
                }
            ],
            "overflow": "hold",
        }
    )
    router = Router(config, MemoryCounters())
    now = datetime(2026, 11, 27, 9, 0, tzinfo=ZoneInfo("UTC"))
    s = await router.throttled(config.ips[0], "gmail", 1, now, "421 4.7.28")
    plan = await router.route(1, now, "gmail")
    (hold,) = plan.parts
    assert isinstance(hold, Hold)
    assert hold.retry_at == s.until < now + timedelta(hours=2)  # not midnight


def test_backoff_does_not_overflow_after_many_attempts() -> None:
    assert retry_delay(5000, 300, 3600, 10.0) == 10.0
    assert retry_delay(5000, 300, 3600, -5.0) == 3600  # expired: keep backing off, no spin
    assert retry_delay(1, 300, 3600, 1e9) == 300


class LogWatch(logging.Handler):
    """The relay's log lines as they are written, with an event to wait on."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []
        self._changed = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())
        self._changed.set()

    async def wait_for(self, text: str, timeout_s: float = 30.0) -> str:
        async def until() -> str:
            while True:
                for line in self.lines:
                    if text in line:
                        return line
                self._changed.clear()
                await self._changed.wait()

        return await asyncio.wait_for(until(), timeout_s)


@pytest.fixture
def logs() -> Iterator[LogWatch]:
    watch = LogWatch()
    logger = logging.getLogger("warmrelay")
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(watch)
    yield watch
    logger.removeHandler(watch)
    logger.setLevel(level)
