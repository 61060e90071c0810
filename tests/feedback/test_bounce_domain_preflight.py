"""Preflight of the bounce domain (issue 20): its MX must point at this relay and its SPF
cover every sending IP, asked of a real DNS server on loopback."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from support.dnsserver import LoopbackDNS

from warmrelay.config import parse_config
from warmrelay.mail.preflight import Outcome, Preflight

BOUNCES = "bounces.example.com"


@pytest.fixture
async def dns() -> AsyncIterator[LoopbackDNS]:
    async with LoopbackDNS() as server:
        yield server


def config(dns: LoopbackDNS) -> object:
    return parse_config(
        {
            "smtp": {"hostname": "relay.example.com"},
            "dns": {"nameservers": [f"{dns.address[0]}:{dns.address[1]}"], "timeout_s": 2},
            "ips": [
                {"address": "192.0.2.10", "helo": "mta1.example.com"},
                {"address": "192.0.2.11", "helo": "mta2.example.com"},
            ],
            "bounces": {"domain": BOUNCES, "secret_env": "UNUSED_HERE"},
        }
    )


async def checks(dns: LoopbackDNS) -> dict[str, tuple[Outcome, str]]:
    report = await Preflight(config(dns), bind=lambda ip: None).run()  # type: ignore[arg-type]
    return {c.check: (c.outcome, c.reason) for c in report.checks if c.subject == BOUNCES}


async def test_mx_at_us_and_spf_covering_every_ip_pass(dns: LoopbackDNS) -> None:
    dns.add_mx(BOUNCES, 10, "relay.example.com")
    dns.add_a("relay.example.com", "192.0.2.10")
    dns.add_txt(BOUNCES, "v=spf1 ip4:192.0.2.0/24 -all")
    found = await checks(dns)
    assert found["mx"][0] is Outcome.PASS, found
    assert found["spf:192.0.2.10"][0] is Outcome.PASS and found["spf:192.0.2.11"][0] is Outcome.PASS


async def test_mx_by_address_passes_and_elsewhere_or_missing_fails(dns: LoopbackDNS) -> None:
    dns.add_mx(BOUNCES, 10, "in.example.com")
    dns.add_a("in.example.com", "192.0.2.11")  # one of our sending IPs
    assert (await checks(dns))["mx"][0] is Outcome.PASS
    other = LoopbackDNS()
    async with other:
        other.add_mx(BOUNCES, 10, "mx.elsewhere.example")
        other.add_a("mx.elsewhere.example", "198.51.100.7")
        other.add_txt(BOUNCES, "v=spf1 ip4:192.0.2.10 -all")
        found = await checks(other)
    assert found["mx"][0] is Outcome.FAIL and "points elsewhere" in found["mx"][1]
    assert found["spf:192.0.2.11"][0] is Outcome.FAIL  # not covered
    empty = LoopbackDNS()
    async with empty:
        found = await checks(empty)
    assert found["mx"][0] is Outcome.FAIL and "no MX record" in found["mx"][1]
