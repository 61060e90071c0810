"""Per-provider caps end to end: providers recognised from MX answers of a loopback DNS server."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path

from support.dnsserver import LoopbackDNS
from support.relay import relay_config, running, send, status
from support.sink import Sink


async def test_gmail_share_of_30_percent(
    tmp_path: Path, make_sink: Callable[..., Awaitable[Sink]]
) -> None:
    """Cap 100, gmail 30%: of 200 gmail and 200 other recipients, 30 gmail and 70 others
    leave from the warming IP; the rest from the pool."""
    sink = await make_sink(host="127.0.0.20")
    async with LoopbackDNS() as dns:
        dns.add_mx("brand.test", 10, "aspmx.l.google.com")  # a domain hosted at Google
        dns.add_a("aspmx.l.google.com", "127.0.0.20")
        dns.add_mx("other.test", 10, "mx.other.test")
        dns.add_a("mx.other.test", "127.0.0.20")
        config = relay_config(
            tmp_path,
            sink.port,
            routes={},
            ips=[
                {
                    "address": "127.0.0.2",
                    "helo": "mta1.example.test",
                    "warmup": {
                        "start": "2026-01-01",
                        "schedule": [100] * 3650,
                        "providers": {"gmail": {"share": 0.3}},
                    },
                },
                {"address": "127.0.0.3", "helo": "mta2.example.test"},
            ],
            dns={"nameservers": [f"127.0.0.1:{dns.port}"]},
            delivery={"mx_port": sink.port},
        )
        async with running(config) as relay:
            rcpts = [f"g{i}@brand.test" for i in range(200)]
            rcpts += [f"o{i}@other.test" for i in range(200)]
            order = [r for pair in zip(rcpts[:200], rcpts[200:], strict=True) for r in pair]
            for batch in range(0, 400, 20):
                await asyncio.gather(*(send(relay, [r]) for r in order[batch : batch + 20]))
            got = await sink.wait_for(400)
            st = await status(relay)
            assert st["ips"][0]["providers"] == {"gmail": {"cap": 30, "cap_now": 30, "sent": 30}}
            assert st["ips"][0]["sent"] == 100
    by = {(m.peer, m.rcpts[0].split("@")[1]) for m in got}
    counts = {key: sum(1 for m in got if (m.peer, m.rcpts[0].split("@")[1]) == key) for key in by}
    assert counts[("127.0.0.2", "brand.test")] == 30
    assert counts[("127.0.0.2", "other.test")] == 70
    assert counts[("127.0.0.3", "brand.test")] == 170
    assert counts[("127.0.0.3", "other.test")] == 130
