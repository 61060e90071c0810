"""Outbound: STARTTLS when the next hop offers it; connections reused per (source, next hop)."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path

import trustme
from support.relay import relay_config, running, send
from support.sink import Sink

MakeSink = Callable[..., Awaitable[Sink]]


async def test_starttls_is_used_when_offered(tmp_path: Path, make_sink: MakeSink) -> None:
    ca = trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("sink.test").configure_cert(server_ctx)
    sink = await make_sink(tls_context=server_ctx)
    async with running(relay_config(tmp_path, sink.port)) as relay:
        await send(relay, ["a@example.test"])
        (msg,) = await sink.wait_for(1)
    assert msg.tls


async def test_starttls_never_sends_in_clear(tmp_path: Path, make_sink: MakeSink) -> None:
    ca = trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("sink.test").configure_cert(server_ctx)
    sink = await make_sink(tls_context=server_ctx)
    config = relay_config(tmp_path, sink.port, delivery={"starttls": "never"})
    async with running(config) as relay:
        await send(relay, ["a@example.test"])
        (msg,) = await sink.wait_for(1)
    assert not msg.tls


async def test_connections_are_reused(tmp_path: Path, sink: Sink) -> None:
    config = relay_config(
        tmp_path,
        sink.port,
        ips=[{"address": "127.0.0.3", "helo": "mta2.example.test"}],
        delivery={"connections_per_destination": 2},
    )
    async with running(config) as relay:
        await asyncio.gather(*(send(relay, [f"u{i}@example.test"]) for i in range(40)))
        got = await sink.wait_for(40)
    connections = {m.peer_port for m in got}
    assert {m.peer for m in got} == {"127.0.0.3"}
    assert len(connections) <= 2  # 40 messages over at most 2 connections
