"""Faults in the peers: 451 then 250, 550 with a DSN, a dead next hop, an unplumbed source IP."""

from __future__ import annotations

import asyncio
import email
import email.policy
from collections.abc import Awaitable, Callable
from pathlib import Path

from aiosmtpd.smtp import Envelope
from support.relay import relay_config, running, send, status
from support.sink import Sink

MakeSink = Callable[..., Awaitable[Sink]]


async def test_451_then_250_is_delivered_on_retry(tmp_path: Path, make_sink: MakeSink) -> None:
    tries: list[str] = []

    def first_time_451(peer: str, envelope: Envelope) -> str | None:
        tries.append(peer)
        return "451 4.3.0 try again later" if len(tries) == 1 else None

    sink = await make_sink(data_reply=first_time_451)
    async with running(relay_config(tmp_path, sink.port)) as relay:
        await send(relay, ["u@example.test"])
        (msg,) = await sink.wait_for(1)
        assert len(tries) == 2
        assert msg.rcpts == ["u@example.test"]
        assert (await status(relay))["spool"]["messages"] == 0


async def test_550_bounces_and_the_sender_gets_a_dsn(tmp_path: Path, make_sink: MakeSink) -> None:
    def refuse(peer: str, rcpt: str) -> str | None:
        return "550 5.1.1 no such user" if rcpt.startswith("nobody@") else None

    sink = await make_sink(rcpt_reply=refuse)
    async with running(relay_config(tmp_path, sink.port)) as relay:
        await send(relay, ["nobody@example.test", "ok@example.test"], sender="app@sender.test")
        got = await sink.wait_for(2)
        dsn = next(m for m in got if m.mail_from == "")
        assert dsn.rcpts == ["app@sender.test"]
        parsed = email.message_from_bytes(dsn.data, policy=email.policy.default)
        assert parsed.get_content_type() == "multipart/report"
        report = parsed.get_payload()[1]
        assert report.get_content_type() == "message/delivery-status"
        fields = report.get_payload()[1]
        assert fields["Final-Recipient"] == "rfc822; nobody@example.test"
        assert fields["Status"] == "5.1.1"
        assert "550" in fields["Diagnostic-Code"]
        delivered = next(m for m in got if m.mail_from == "app@sender.test")
        assert delivered.rcpts == ["ok@example.test"]
        assert (await status(relay))["spool"]["messages"] == 0


async def test_no_dsn_for_a_bounce_from_the_null_sender(
    tmp_path: Path, make_sink: MakeSink
) -> None:
    sink = await make_sink(
        rcpt_reply=lambda peer, rcpt: "550 5.1.1 gone" if "example" in rcpt else None
    )
    async with running(relay_config(tmp_path, sink.port)) as relay:
        await send(relay, ["x@example.test"], sender="")
        await send(relay, ["y@example.test"], sender="app@sender.test")  # one DSN, to compare
        (dsn,) = await sink.wait_for(1)
        assert dsn.rcpts == ["app@sender.test"]
        assert b"y@example.test" in dsn.data
    assert len(relay.spool) == 0  # x bounced too, and made no DSN
    assert relay.metrics.dsn_sent._value.get() == 1
    assert len(sink.messages) == 1


async def test_dead_next_hop_keeps_mail_and_retries(tmp_path: Path, make_sink: MakeSink) -> None:
    """Connections are refused at first; the mail stays spooled and arrives once a sink is up."""
    attempts = asyncio.Event()
    count = 0

    async def slam(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal count
        count += 1
        writer.close()  # the next hop dies before its greeting
        if count >= 2:
            attempts.set()

    dead = await asyncio.start_server(slam, "127.0.0.1", 0)
    port = dead.sockets[0].getsockname()[1]
    async with dead, running(relay_config(tmp_path, port)) as relay:
        await send(relay, ["u@example.test"])
        await asyncio.wait_for(attempts.wait(), 30)  # tried, failed, retried
        st = await status(relay)
        assert st["spool"]["messages"] == 1
        assert st["ips"][0]["sent"] == 0  # no receiver took it: the reservation was released
        dead.close()
        await dead.wait_closed()
        sink = await make_sink(port=port)
        (msg,) = await sink.wait_for(1)
        assert msg.rcpts == ["u@example.test"]


async def test_unplumbed_source_ip_is_marked_down_never_used(tmp_path: Path, sink: Sink) -> None:
    config = relay_config(
        tmp_path,
        sink.port,
        ips=[
            {
                "address": "192.0.2.7",
                "helo": "cold.example.test",
                "warmup": {"start": "2026-01-01", "schedule": [100] * 3650},
            },
            {"address": "127.0.0.3", "helo": "mta2.example.test"},
        ],
    )
    async with running(config) as relay:
        for i in range(3):
            await send(relay, [f"u{i}@example.test"])
        await sink.wait_for(3)
        assert sink.by_peer() == {"127.0.0.3": 3}
        cold = (await status(relay))["ips"][0]
        assert (cold["up"], cold["sent"]) == (False, 0)


async def test_queue_lifetime_expires_with_a_dsn(tmp_path: Path, sink: Sink) -> None:
    """example.test never answers; after the queue lifetime the sender hears about it."""
    dead = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
    config = relay_config(
        tmp_path,
        sink.port,
        routes={
            "example.test": f"127.0.0.1:{dead.sockets[0].getsockname()[1]}",
            "*": f"127.0.0.1:{sink.port}",
        },
        delivery={"queue_lifetime_s": 1.0, "retry_first_s": 0.3},
    )
    async with dead, running(config) as relay:
        await send(relay, ["late@example.test"], sender="app@sender.test")
        (dsn,) = await sink.wait_for(1)
        assert dsn.rcpts == ["app@sender.test"]
        assert b"Status: 4.4.7" in dsn.data
        assert b"Action: failed" in dsn.data
        assert (await status(relay))["spool"]["messages"] == 0
