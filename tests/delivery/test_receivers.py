"""Reacting to receivers: throttling suspends a warming IP per provider; eligibility; pause."""

from __future__ import annotations

import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import trustme
from aiosmtpd.smtp import Envelope
from support.dnsserver import LoopbackDNS
from support.relay import http, http_get, mx_config, relay_config, running, send, status
from support.sink import Sink

MakeSink = Callable[..., Awaitable[Sink]]


def gmail_throttles_the_warming_ip(peer: str, envelope: Envelope) -> str | None:
    if peer == "127.0.0.2" and envelope.rcpt_tos[0].endswith("@brand.test"):
        return (
            "421-4.7.28 Gmail has detected an unusual rate of unsolicited mail\r\n"
            "421 4.7.28 originating from your IP. To protect our users, mail is limited."
        )
    return None


async def test_gmail_throttle_suspends_only_for_gmail(tmp_path: Path, make_sink: MakeSink) -> None:
    sink = await make_sink(host="127.0.0.20", data_reply=gmail_throttles_the_warming_ip)
    async with LoopbackDNS() as dns:
        dns.add_mx("brand.test", 10, "gmail-smtp-in.l.google.com")
        dns.add_a("gmail-smtp-in.l.google.com", "127.0.0.20")
        dns.add_mx("other.test", 10, "mx.other.test")
        dns.add_a("mx.other.test", "127.0.0.20")
        config = mx_config(tmp_path, sink.port, dns.port, sink.port)  # no retry but the re-route
        async with running(config) as relay:
            await send(relay, ["first@brand.test"])
            (gmail,) = await sink.wait_for(1)
            assert (gmail.peer, gmail.rcpts) == ("127.0.0.3", ["first@brand.test"])
            await send(relay, ["second@brand.test"])
            await send(relay, ["someone@other.test"])
            got = await sink.wait_for(3)
            by_rcpt = {m.rcpts[0]: m.peer for m in got}
            assert by_rcpt["second@brand.test"] == "127.0.0.3"  # gmail: still suspended
            assert by_rcpt["someone@other.test"] == "127.0.0.2"  # others: warming IP as usual
            warming = (await status(relay))["ips"][0]
            assert set(warming["suspended"]) == {"gmail"}
            assert "4.7.28" in warming["suspended"]["gmail"]["reason"]
            _, metrics = await http_get(relay.admin.port, "/metrics")
            assert b'warmrelay_throttled_total{ip="127.0.0.2",provider="gmail"} 1.0' in metrics
            assert b'warmrelay_suspended{ip="127.0.0.2",provider="gmail"} 1.0' in metrics


async def test_only_eligible_mail_uses_the_warming_ip(tmp_path: Path, sink: Sink) -> None:
    config = relay_config(
        tmp_path,
        sink.port,
        ips=[
            {
                "address": "127.0.0.2",
                "helo": "mta1.example.test",
                "warmup": {
                    "start": "2026-01-01",
                    "schedule": [5] * 3650,
                    "eligible": {"header": "X-Warmup: engaged"},
                },
            },
            {"address": "127.0.0.3", "helo": "mta2.example.test"},
        ],
    )
    async with running(config) as relay:
        for i in range(10):
            await send(relay, [f"plain{i}@example.test"])
            await send(relay, [f"engaged{i}@example.test"], subject="x\r\nX-Warmup: engaged")
        got = await sink.wait_for(20)
    plain = [m.peer for m in got if m.rcpts[0].startswith("plain")]
    engaged = [m.peer for m in got if m.rcpts[0].startswith("engaged")]
    assert set(plain) == {"127.0.0.3"}  # never from the warming IP
    assert engaged.count("127.0.0.2") == 5  # up to the cap
    assert engaged.count("127.0.0.3") == 5


async def test_pause_survives_a_restart_and_resume(tmp_path: Path, sink: Sink) -> None:
    config = relay_config(tmp_path, sink.port)
    async with running(config) as relay:
        code, body = await http(relay.admin.port, "POST", "/ips/127.0.0.2/pause")
        assert code == 200 and b'"state": "paused"' in body
        assert (await http(relay.admin.port, "POST", "/ips/10.9.9.9/pause"))[0] == 404
    async with running(config) as relay:
        assert (await status(relay))["ips"][0]["state"] == "paused"
        await send(relay, ["a@example.test"])
        (msg,) = await sink.wait_for(1)
        assert msg.peer == "127.0.0.3"  # paused: sends nothing
        await http(relay.admin.port, "POST", "/ips/127.0.0.2/resume")
        await send(relay, ["b@example.test"])
        got = await sink.wait_for(2)
        assert got[1].peer == "127.0.0.2"
        await http(relay.admin.port, "POST", "/ips/127.0.0.2/complete")
        warming = (await status(relay))["ips"][0]
        assert (warming["state"], warming["cap"]) == ("warm", None)


@pytest.fixture
def smarthost_tls(tmp_path: Path) -> tuple[ssl.SSLContext, Path]:
    ca = trustme.CA()
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "smarthost.test").configure_cert(ctx)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    return ctx, ca_file


@pytest.mark.parametrize("password", ["s3cret", "wrong"])
async def test_smarthost_overflow_with_starttls_and_auth(
    tmp_path: Path,
    sink: Sink,
    smarthost_tls: tuple[ssl.SSLContext, Path],
    password: str,
    monkeypatch: pytest.MonkeyPatch,
    make_sink: MakeSink,
) -> None:
    ctx, ca_file = smarthost_tls
    smarthost = await make_sink(tls_context=ctx, credentials=("relay", "s3cret"))
    monkeypatch.setenv("TEST_SMARTHOST_PASSWORD", password)
    config = relay_config(
        tmp_path,
        sink.port,
        cap=2,
        overflow="smarthost",
        ips=[
            {
                "address": "127.0.0.2",
                "helo": "mta1.example.test",
                "warmup": {"start": "2026-01-01", "schedule": [2] * 3650},
            }
        ],
        smarthost={
            "host": f"127.0.0.1:{smarthost.port}",
            "username": "relay",
            "password_env": "TEST_SMARTHOST_PASSWORD",
            "ca_file": str(ca_file),
        },
    )
    async with running(config) as relay:
        for i in range(5):
            await send(relay, [f"u{i}@example.test"])
        assert {m.peer for m in await sink.wait_for(2)} == {"127.0.0.2"}
        if password == "s3cret":
            got = await smarthost.wait_for(3)
            assert all(m.tls for m in got)
            assert smarthost.logins[0] == ("relay", True)
        else:
            # each overflow delivery is tried, refused and tried again: deferred, not dropped
            await smarthost.wait_until(lambda: len(smarthost.logins) >= 6)
            assert not any(ok for _, ok in smarthost.logins)
            st = await status(relay)
            assert st["spool"]["messages"] == 3
            assert smarthost.messages == []
            assert len(sink.messages) == 2  # and no DSN went to the sender


async def test_smarthost_without_starttls_is_refused(
    tmp_path: Path, sink: Sink, make_sink: MakeSink
) -> None:
    plain = await make_sink()  # offers no STARTTLS
    config = relay_config(
        tmp_path,
        sink.port,
        overflow="smarthost",
        ips=[
            {
                "address": "127.0.0.2",
                "helo": "mta1.example.test",
                "warmup": {"start": "2026-01-01", "schedule": [1] * 3650},
            }
        ],
        smarthost={"host": f"127.0.0.1:{plain.port}"},
    )
    async with running(config) as relay:
        await send(relay, ["a@example.test"])
        await send(relay, ["b@example.test"])
        await sink.wait_for(1)  # one from the warming IP
        await plain.wait_until(lambda: plain.ehlos >= 2)  # tried, refused (no TLS), tried again
        st = await status(relay)
        assert st["spool"]["messages"] == 1
    assert plain.messages == []
