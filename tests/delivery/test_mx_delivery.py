"""Delivery through MX records served by a real DNS server on loopback."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path

from support.dnsserver import LoopbackDNS
from support.relay import relay_config, running, send, status
from support.sink import Sink


async def test_mx_failover_implicit_mx_and_null_mx(
    tmp_path: Path, make_sink: Callable[..., Awaitable[Sink]]
) -> None:
    sink = await make_sink(host="127.0.0.20")
    async with LoopbackDNS() as dns:
        # example.test: the preferred MX (127.0.0.21) refuses connections; the backup takes it
        dns.add_mx("example.test", 20, "backup.example.test")
        dns.add_mx("example.test", 10, "primary.example.test")
        dns.add_a("primary.example.test", "127.0.0.21")
        dns.add_a("backup.example.test", "127.0.0.20")
        dns.add_a("implicit.test", "127.0.0.20")  # no MX: the domain's A record is its MX
        dns.add_mx("nullmx.test", 0, ".")  # RFC 7505: accepts no mail
        dns.add_mx("sender.test", 10, "mx.sender.test")
        dns.add_a("mx.sender.test", "127.0.0.20")
        config = relay_config(
            tmp_path,
            sink.port,
            routes={},
            dns={"nameservers": [f"127.0.0.1:{dns.port}"], "timeout_s": 5},
            delivery={"mx_port": sink.port},
        )
        async with running(config) as relay:
            await send(relay, ["a@example.test"])
            await send(relay, ["b@implicit.test"])
            await send(relay, ["c@nullmx.test"], sender="app@sender.test")
            got = await sink.wait_for(3)
            assert sorted(r for m in got for r in m.rcpts) == [
                "a@example.test",
                "app@sender.test",
                "b@implicit.test",
            ]
            dsn = next(m for m in got if m.mail_from == "")
            assert b"Status: 5.1.10" in dsn.data
            assert b"c@nullmx.test" in dsn.data
            assert (await status(relay))["spool"]["messages"] == 0
        assert dns.query_count("primary.example.test") >= 1
