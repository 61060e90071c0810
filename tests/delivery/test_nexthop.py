"""Next-hop resolution against a real DNS server on loopback."""

from __future__ import annotations

import random
import time
from collections.abc import AsyncIterator

import pytest
from support.dnsserver import LoopbackDNS

from warmrelay.delivery.nexthop import NextHop, NextHopResolver
from warmrelay.errors import NextHopError

SINK_PORT = 2600


@pytest.fixture
async def dns_server() -> AsyncIterator[LoopbackDNS]:
    async with LoopbackDNS() as server:
        yield server


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make_resolver(
    server: LoopbackDNS,
    routes: dict[str, tuple[str, int]] | None = None,
    **kwargs: object,
) -> NextHopResolver:
    return NextHopResolver(
        routes=routes or {},
        nameservers=[server.address],
        mx_port=SINK_PORT,
        timeout_s=5.0,  # the server is on loopback: only a stalled machine takes long
        **kwargs,  # type: ignore[arg-type]
    )


async def test_mx_preference_orders_hosts_and_fails_over(dns_server: LoopbackDNS) -> None:
    dns_server.add_mx("example.test", 20, "mx2.example.test")  # listed first, still second
    dns_server.add_mx("example.test", 10, "mx1.example.test")
    dns_server.add_a("mx1.example.test", "127.0.0.11")
    dns_server.add_aaaa("mx1.example.test", "::1")
    dns_server.add_a("mx2.example.test", "127.0.0.12")

    hops = await make_resolver(dns_server).resolve("Example.TEST.")

    assert hops == [
        NextHop("mx1.example.test", "127.0.0.11", SINK_PORT, "mx1.example.test", 10),
        NextHop("mx1.example.test", "::1", SINK_PORT, "mx1.example.test", 10),
        NextHop("mx2.example.test", "127.0.0.12", SINK_PORT, "mx2.example.test", 20),
    ]


async def test_equal_preference_is_shuffled_but_hosts_stay_together(
    dns_server: LoopbackDNS,
) -> None:
    for i in range(1, 5):
        dns_server.add_mx("example.test", 10, f"mx{i}.example.test")
        dns_server.add_a(f"mx{i}.example.test", f"127.0.1.{i}")
        dns_server.add_a(f"mx{i}.example.test", f"127.0.2.{i}")
    dns_server.add_mx("example.test", 5, "first.example.test")
    dns_server.add_a("first.example.test", "127.0.0.5")
    resolver = make_resolver(dns_server, rng=random.Random(1))

    orders = set()
    for _ in range(20):
        hops = await resolver.resolve("example.test")
        assert hops[0].host == "first.example.test"
        hosts = [h.host for h in hops[1::2]]
        assert [h.host for h in hops[2::2]] == hosts  # a host's addresses are adjacent
        assert [h.address for h in hops[1:3]] == [
            f"127.0.1.{hosts[0][2]}",
            f"127.0.2.{hosts[0][2]}",
        ]
        orders.add(tuple(hosts))
    assert len(orders) > 1


async def test_mx_host_without_address_is_skipped(dns_server: LoopbackDNS) -> None:
    dns_server.add_mx("example.test", 10, "dead.example.test")  # NXDOMAIN
    dns_server.add_mx("example.test", 15, "noaddr.example.test")  # NODATA
    dns_server.add_mx("noaddr.example.test", 10, "x.example.test")
    dns_server.add_mx("example.test", 20, "alive.example.test")
    dns_server.add_a("alive.example.test", "127.0.0.12")

    hops = await make_resolver(dns_server).resolve("example.test")

    assert [(h.host, h.address) for h in hops] == [("alive.example.test", "127.0.0.12")]


async def test_no_mx_host_resolves_is_temporary(dns_server: LoopbackDNS) -> None:
    dns_server.add_mx("example.test", 10, "dead.example.test")
    dns_server.add_mx("example.test", 20, "broken.example.test")
    dns_server.set_servfail("broken.example.test")

    with pytest.raises(NextHopError) as info:
        await make_resolver(dns_server).resolve("example.test")
    assert not info.value.permanent


async def test_implicit_mx_uses_domain_addresses(dns_server: LoopbackDNS) -> None:
    dns_server.add_a("example.test", "127.0.0.13")

    hops = await make_resolver(dns_server).resolve("example.test")

    assert hops == [NextHop("example.test", "127.0.0.13", SINK_PORT, "example.test", 0)]


async def test_no_mx_and_no_address_is_permanent(dns_server: LoopbackDNS) -> None:
    dns_server.add_txt("example.test", "v=spf1 -all")  # exists, but no MX, A or AAAA

    with pytest.raises(NextHopError) as info:
        await make_resolver(dns_server).resolve("example.test")
    assert info.value.permanent


async def test_null_mx_is_permanent(dns_server: LoopbackDNS) -> None:
    dns_server.add_mx("example.test", 0, ".")
    dns_server.add_a("example.test", "127.0.0.13")  # must not be used as implicit MX

    with pytest.raises(NextHopError, match="null MX: domain accepts no mail") as info:
        await make_resolver(dns_server).resolve("example.test")
    assert info.value.permanent


async def test_nxdomain_is_permanent(dns_server: LoopbackDNS) -> None:
    with pytest.raises(NextHopError, match="no such domain") as info:
        await make_resolver(dns_server).resolve("nowhere.test")
    assert info.value.permanent


async def test_servfail_is_temporary(dns_server: LoopbackDNS) -> None:
    dns_server.set_servfail("example.test")

    with pytest.raises(NextHopError) as info:
        await make_resolver(dns_server).resolve("example.test")
    assert not info.value.permanent


async def test_dropped_query_times_out_as_temporary(dns_server: LoopbackDNS) -> None:
    dns_server.set_drop("example.test")
    resolver = NextHopResolver(routes={}, nameservers=[dns_server.address], timeout_s=0.5)

    started = time.monotonic()
    with pytest.raises(NextHopError) as info:
        await resolver.resolve("example.test")
    assert not info.value.permanent
    assert time.monotonic() - started < 3.0  # its 0.5 s with room to spare, not the 5 s default


async def test_unreachable_nameserver_is_temporary(dns_server: LoopbackDNS) -> None:
    port = dns_server.port
    await dns_server.stop()  # nothing listens there now: ICMP port unreachable or timeout
    resolver = NextHopResolver(routes={}, nameservers=[("127.0.0.1", port)], timeout_s=0.5)

    with pytest.raises(NextHopError) as info:
        await resolver.resolve("example.test")
    assert not info.value.permanent


async def test_truncated_answer_falls_back_to_tcp(dns_server: LoopbackDNS) -> None:
    dns_server.add_mx("example.test", 10, "big.example.test")
    addresses = [f"127.0.3.{i}" for i in range(1, 61)]  # > 512 bytes over UDP
    for address in addresses:
        dns_server.add_a("big.example.test", address)

    hops = await make_resolver(dns_server).resolve("example.test")

    assert sorted(h.address for h in hops) == sorted(addresses)


async def test_exact_route_beats_wildcard_and_dns(dns_server: LoopbackDNS) -> None:
    dns_server.add_mx("example.test", 10, "mx1.example.test")
    dns_server.add_a("mx1.example.test", "127.0.0.11")
    routes = {"example.test": ("127.0.0.20", 2601), "*": ("127.0.0.21", 2602)}
    resolver = make_resolver(dns_server, routes)

    assert await resolver.resolve("EXAMPLE.test") == [
        NextHop("127.0.0.20", "127.0.0.20", 2601, None, 0)
    ]
    assert await resolver.resolve("other.test") == [
        NextHop("127.0.0.21", "127.0.0.21", 2602, None, 0)
    ]
    assert dns_server.query_count() == 0


async def test_route_host_name_resolves_through_dns(dns_server: LoopbackDNS) -> None:
    dns_server.add_a("smarthost.test", "127.0.0.30")
    dns_server.add_aaaa("smarthost.test", "::1")
    resolver = make_resolver(dns_server, {"*": ("smarthost.test", 587)})

    assert await resolver.resolve("example.test") == [
        NextHop("smarthost.test", "127.0.0.30", 587, None, 0),
        NextHop("smarthost.test", "::1", 587, None, 0),
    ]


async def test_route_host_that_does_not_resolve_is_temporary(dns_server: LoopbackDNS) -> None:
    resolver = make_resolver(dns_server, {"*": ("missing.test", 587)})

    with pytest.raises(NextHopError) as info:
        await resolver.resolve("example.test")
    assert not info.value.permanent


async def test_cache_honours_ttl(dns_server: LoopbackDNS) -> None:
    dns_server.add_mx("example.test", 10, "mx1.example.test", ttl=300)
    dns_server.add_a("mx1.example.test", "127.0.0.11", ttl=60)  # smallest TTL wins
    clock = FakeClock()
    resolver = make_resolver(dns_server, clock=clock)

    first = await resolver.resolve("example.test")
    queries = dns_server.query_count()
    assert queries == 3  # MX, A, AAAA

    clock.now += 59
    assert await resolver.resolve("Example.Test") == first
    assert dns_server.query_count() == queries

    clock.now += 2
    assert await resolver.resolve("example.test") == first
    assert dns_server.query_count() == 2 * queries


async def test_cache_is_bounded_and_skips_failures(dns_server: LoopbackDNS) -> None:
    for name in ("a.test", "b.test"):
        dns_server.add_a(name, "127.0.0.40")
    resolver = make_resolver(dns_server, cache_max_entries=1)

    await resolver.resolve("a.test")
    await resolver.resolve("b.test")  # evicts a.test
    before = dns_server.query_count("a.test")
    await resolver.resolve("a.test")
    assert dns_server.query_count("a.test") > before

    for _ in range(2):
        with pytest.raises(NextHopError):
            await resolver.resolve("nowhere.test")
    assert dns_server.query_count("nowhere.test") == 2  # negative answers are not cached


async def test_internationalised_domain_is_looked_up_as_a_label(dns_server: LoopbackDNS) -> None:
    dns_server.add_a("xn--bcher-kva.test", "127.0.0.50")

    hops = await make_resolver(dns_server).resolve("BÜCHER.test")

    assert hops == [NextHop("xn--bcher-kva.test", "127.0.0.50", SINK_PORT, "xn--bcher-kva.test", 0)]
