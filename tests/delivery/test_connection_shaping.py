"""Connections shaped per (source IP, provider): at most max_connections open at once, at
most max_messages_per_connection messages each (then QUIT and a fresh one), as the
receiver sees it. The defaults per provider, a provider's override, a warming IP's
tighter values."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path
from typing import Any

import aiosmtplib
from prometheus_client.parser import text_string_to_metric_families
from support.polling import eventually
from support.relay import http_get, relay_doc, running, status
from support.sink import Sink

from warmrelay.config import parse_config
from warmrelay.delivery.shaping import lane

POOL = "127.0.0.3"
WARMING = "127.0.0.2"


def pool_only(tmp_path: Path, sink: Sink, **over: Any) -> dict[str, Any]:
    doc = relay_doc(tmp_path, sink.port, **over)
    doc["ips"] = [{"address": POOL, "helo": "mta2.example.test"}]
    doc["delivery"] |= {"concurrency": 256}
    doc["smtp"] |= {"max_connections_per_client": 1000}
    return doc


async def blast(port: int, n: int, domain: str) -> None:
    """``n`` messages, one recipient each, over 20 client connections at once."""

    async def client(k: int) -> None:
        smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=port)
        async with smtp:
            for i in range(k, n, 20):
                message = f"From: <a@sender.test>\r\nSubject: {i}\r\n\r\nbody {i}\r\n"
                await smtp.sendmail("a@sender.test", [f"r{i}@{domain}"], message.encode())

    await asyncio.gather(*(client(k) for k in range(20)))


def per_connection(sink: Sink, peer: str) -> Counter[int]:
    return Counter(m.peer_port for m in sink.messages if m.peer == peer)


async def test_200_messages_to_gmail_never_exceed_its_connections(
    tmp_path: Path, sink: Sink
) -> None:
    """gmail's defaults: 5 connections, 50 messages each."""
    async with running(parse_config(pool_only(tmp_path, sink))) as relay:
        await blast(relay.smtp_ports[0], 200, "gmail.com")
        await sink.wait_for(200)
        lanes = (await status(relay))["connections"]
        _, body = await http_get(relay.admin.port, "/metrics")
    gauges = {
        s.labels["state"]: s.value
        for f in text_string_to_metric_families(body.decode())
        if f.name == "warmrelay_connections"
        for s in f.samples
        if s.labels["ip"] == POOL and s.labels["provider"] == "gmail"
    }
    assert set(gauges) == {"active", "idle"} and sum(gauges.values()) <= 5
    assert sink.open_max[POOL] <= 5, sink.open_max
    carried = per_connection(sink, POOL)
    assert sum(carried.values()) == 200
    assert max(carried.values()) <= 50, carried
    assert len(carried) >= 4  # 200 messages at 50 a connection: at least 4 connections
    gmail = next(c for c in lanes if c["provider"] == "gmail")
    assert gmail["ip"] == POOL
    assert gmail["max_connections"] == 5 and gmail["max_messages_per_connection"] == 50
    assert gmail["open"] <= 5


async def test_a_providers_own_values_and_a_warming_ips_tighter_ones(
    tmp_path: Path, sink: Sink
) -> None:
    doc = pool_only(tmp_path, sink, providers={"gmail": {"connections": {
        "max_connections": 3, "max_messages_per_connection": 7}}})  # fmt: skip
    async with running(parse_config(doc)) as relay:
        await blast(relay.smtp_ports[0], 60, "gmail.com")
        await sink.wait_for(60)
    assert sink.open_max[POOL] <= 3
    assert max(per_connection(sink, POOL).values()) <= 7
    assert sink.quits >= 60 // 7  # a full connection says QUIT, then a fresh one opens

    config = parse_config(
        relay_doc(
            tmp_path,
            sink.port,
            ips=[
                {
                    "address": WARMING,
                    "helo": "mta1.example.test",
                    "warmup": {
                        "start": "2026-01-01",
                        "schedule": [1000] * 3650,
                        "connections": {"max_connections": 1, "max_messages_per_connection": 2},
                    },
                },
                {"address": POOL, "helo": "mta2.example.test"},
            ],
        )
    )
    gmail_warm = lane(config, config.ips[0], "gmail", (), warming=True)
    assert (gmail_warm.max_connections, gmail_warm.max_messages) == (1, 2)
    gmail_pool = lane(config, config.ips[1], "gmail", (), warming=False)
    assert (gmail_pool.max_connections, gmail_pool.max_messages) == (5, 50)
    sink.messages.clear()
    sink.open_max.clear()
    async with running(config) as relay:
        await blast(relay.smtp_ports[0], 20, "gmail.com")
        await sink.wait_for(20)
    assert sink.by_peer() == {WARMING: 20}  # all under the warming IP's cap
    assert sink.open_max[WARMING] == 1
    assert max(per_connection(sink, WARMING).values()) <= 2


def test_defaults_per_provider_and_the_rest_per_next_hop(tmp_path: Path) -> None:
    config = parse_config(relay_doc(tmp_path, 9))
    pool = config.ips[1]
    expected = {"gmail": (5, 50), "microsoft": (5, 50), "yahoo": (16, 20), "apple": (10, 5)}
    for provider, limits in expected.items():
        shaped = lane(config, pool, provider, (("10.0.0.1", 25),), warming=False)
        assert (shaped.max_connections, shaped.max_messages) == limits, provider
        assert shaped.key == (str(pool.address), provider)
    other = lane(config, pool, "other", (("10.0.0.1", 25),), warming=False)
    assert (other.max_connections, other.max_messages) == (16, 100)
    assert other.key == (str(pool.address), (("10.0.0.1", 25),))  # per next hop, as before


def connection_gauges(body: bytes, ip: str) -> dict[str, float]:
    return {
        s.labels["state"]: s.value
        for f in text_string_to_metric_families(body.decode())
        if f.name == "warmrelay_connections"
        for s in f.samples
        if s.labels["ip"] == ip
    }


async def test_connection_gauges_follow_without_a_scrape(tmp_path: Path, sink: Sink) -> None:
    """A worker's gauges are read from its metrics file, never asked before a scrape: they
    follow the connections by themselves (within CONNECTION_GAUGES_S), both ways."""
    sink.data_gate = asyncio.Event()
    async with running(parse_config(pool_only(tmp_path, sink))) as relay:
        sending = asyncio.create_task(blast(relay.smtp_ports[0], 20, "example.net"))

        def busy() -> bool:
            return connection_gauges(relay.metrics.render(), POOL).get("active", 0) >= 1

        await eventually(busy, what="an active connection in the gauges, unscraped")
        sink.data_gate.set()
        await sending
        await sink.wait_for(20)

        def settled() -> bool:
            gauges = connection_gauges(relay.metrics.render(), POOL)
            return gauges.get("active") == 0 and gauges.get("idle", 0) >= 1

        await eventually(settled, what="all connections idle in the gauges, unscraped")
