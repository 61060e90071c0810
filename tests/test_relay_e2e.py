"""End to end over real sockets: client -> relay -> sink, source IPs seen by the sink."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiosmtplib
import pytest
from support.relay import http_get, relay_config, running, send, status
from support.sink import Sink


async def test_cap_10_of_30_from_the_warming_ip(tmp_path: Path, sink: Sink) -> None:
    config = relay_config(tmp_path, sink.port)
    async with running(config) as relay:
        results = await asyncio.gather(*(send(relay, [f"user{i}@example.test"]) for i in range(30)))
        assert all(resp.startswith("2.0.0 Ok: queued as") for _, resp in results)
        await sink.wait_for(30)
        assert sink.by_peer() == {"127.0.0.2": 10, "127.0.0.3": 20}
        helos = {m.peer: m.helo for m in sink.messages}
        assert helos == {"127.0.0.2": "mta1.example.test", "127.0.0.3": "mta2.example.test"}
        st = await status(relay)
        warming = st["ips"][0]
        assert (warming["state"], warming["cap"], warming["sent"]) == ("warming", 10, 10)
        code, metrics = await http_get(relay.admin.port, "/metrics")
        assert code == 200
        text = metrics.decode()
        assert 'warmrelay_warmup_sent{ip="127.0.0.2"} 10.0' in text
        assert 'warmrelay_warmup_cap{ip="127.0.0.2"} 10.0' in text
        assert 'warmrelay_routed_total{ip="127.0.0.2",reason="warmup"} 10.0' in text
        assert 'warmrelay_routed_total{ip="127.0.0.3",reason="overflow"} 20.0' in text
        assert 'warmrelay_deliveries_total{ip="127.0.0.3",outcome="delivered"} 20.0' in text
        assert "warmrelay_received_total 30.0" in text
        assert "warmrelay_spool_messages 0.0" in text


async def test_message_bytes_forwarded_with_a_received_header(tmp_path: Path, sink: Sink) -> None:
    async with running(relay_config(tmp_path, sink.port)) as relay:
        await send(relay, ["a@example.test", "b@other.test"], body="body line\r\n.leading dot")
        got = await sink.wait_for(2)
    assert sorted(r for m in got for r in m.rcpts) == ["a@example.test", "b@other.test"]
    for m in got:
        assert m.data.startswith(b"Received: from ")
        assert b"by relay.test (warmrelay)" in m.data
        assert m.data.endswith(b"Subject: test\r\n\r\nbody line\r\n.leading dot\r\n")
        assert m.mail_from == "app@sender.test"


async def test_not_allowed_client_cannot_relay(tmp_path: Path, sink: Sink) -> None:
    config = relay_config(tmp_path, sink.port, smtp={"allow_networks": ["127.0.0.1/32"]})
    async with running(config) as relay:
        with pytest.raises(aiosmtplib.SMTPRecipientsRefused) as info:
            await send(relay, ["x@example.test"], source="127.0.0.9")
        refused = info.value.recipients[0]
        assert (refused.code, refused.message) == (550, "5.7.1 Relaying denied")
        await send(relay, ["ok@example.test"], source="127.0.0.1")
        await sink.wait_for(1)
    assert [m.rcpts for m in sink.messages] == [["ok@example.test"]]


async def test_protocol_errors_have_enhanced_codes(tmp_path: Path, sink: Sink) -> None:
    config = relay_config(
        tmp_path, sink.port, smtp={"max_recipients": 2, "max_message_bytes": 1000}
    )
    async with running(config) as relay:
        client = aiosmtplib.SMTP(hostname="127.0.0.1", port=relay.smtp_ports[0])
        await client.connect()
        ehlo = await client.ehlo()
        assert "PIPELINING" in ehlo.message and "SIZE 1000" in ehlo.message
        assert "8BITMIME" in ehlo.message and "SMTPUTF8" in ehlo.message
        await client.mail("a@sender.test")
        for rcpt in ("r1@example.test", "r2@example.test"):
            assert (await client.rcpt(rcpt)).code == 250
        with pytest.raises(aiosmtplib.SMTPRecipientRefused) as too_many:
            await client.rcpt("r3@example.test")
        assert (too_many.value.code, too_many.value.message[:5]) == (452, "4.5.3")
        with pytest.raises(aiosmtplib.SMTPRecipientRefused) as bad:
            await client.rcpt("not-an-address")
        assert (bad.value.code, bad.value.message[:5]) == (501, "5.1.3")
        with pytest.raises(aiosmtplib.SMTPDataError) as big:
            await client.data(b"Subject: x\r\n\r\n" + (b"y" * 70 + b"\r\n") * 30)
        assert (big.value.code, big.value.message[:5]) == (552, "5.3.4")
        await client.quit()
