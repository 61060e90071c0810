"""Preflight: each source IP's and signing domain's DNS identity, asked of a real DNS server
on loopback (LoopbackDNS): PTR, helo, FCrDNS, blocklists, SPF through includes, DKIM, DMARC;
the command line (table, --json, exit code), GET /preflight, the metrics, and a listed
warming IP paused before any mail leaves from it.

The world served by the DNS fixture:

- 127.0.0.2: PTR mta1.example.test (its helo), which resolves back to it; listed on
  bl.test (127.0.0.2 with a TXT reason)
- 127.0.0.3: PTR host-3.isp.test (not its helo), which resolves to 127.0.0.9 (no FCrDNS)
- 127.0.0.4: no PTR at all
- zen.test answers 127.255.255.254 for everyone, as Spamhaus does through public resolvers
- example.test: SPF authorises nobody of ours itself but includes _spf.example.test, which
  authorises 127.0.0.2/31; DKIM s1 (RSA) published and equal, s2 (Ed25519) another key, s3
  not published; DMARC p=quarantine
- other.test: SPF includes a record that does not authorise us (~all); no DMARC record;
  its key file does not exist
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ipaddress
import json
import logging
import socket
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from dnslib import RCODE, DNSRecord
from prometheus_client.parser import text_string_to_metric_families
from support.cli import warmrelay, warmrelay_async
from support.dnsserver import LoopbackDNS
from support.relay import http, http_get, relay_config, relay_doc, running, send, status
from support.sink import Sink

from warmrelay.config import Config, parse_config
from warmrelay.mail.preflight import (
    DnsClient,
    Failed,
    Found,
    MacroContext,
    Missing,
    Outcome,
    Preflight,
    Report,
    SpfEvaluation,
    SpfResult,
    SpfSyntaxError,
    SpfVerdict,
    classify_dnsbl,
    classify_spf,
    expand_macros,
    parse_spf,
)

LISTED_REASON = "listed for spam, see https://bl.test/q?127.0.0.2"


def _write_pem(path: Path, key: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )


def rsa_key(path: Path) -> str:
    """Writes an RSA-2048 key file; returns its DKIM TXT value."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    _write_pem(path, key)
    der = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return f"v=DKIM1; k=rsa; p={base64.b64encode(der).decode()}"


def ed25519_key(path: Path | None = None) -> str:
    """Writes an Ed25519 key file (if ``path``); returns its DKIM TXT value."""
    key = ed25519.Ed25519PrivateKey.generate()
    if path is not None:
        _write_pem(path, key)
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return f"v=DKIM1; k=ed25519; p={base64.b64encode(raw).decode()}"


def populate(dns: LoopbackDNS, keys: Path) -> dict[str, Any]:
    """The world above; returns the dkim block of the configuration."""
    dns.add_ptr("127.0.0.2", "mta1.example.test")
    dns.add_a("mta1.example.test", "127.0.0.2")
    dns.add_ptr("127.0.0.3", "host-3.isp.test")
    dns.add_a("host-3.isp.test", "127.0.0.9")
    dns.add_a("2.0.0.127.bl.test", "127.0.0.2")
    dns.add_txt("2.0.0.127.bl.test", LISTED_REASON)
    for n in (2, 3, 4):
        dns.add_a(f"{n}.0.0.127.zen.test", "127.255.255.254")
    dns.add_txt("example.test", "v=spf1 ip4:192.0.2.1 include:_spf.example.test -all")
    dns.add_txt("_spf.example.test", "v=spf1 ip4:127.0.0.2/31 -all")
    dns.add_txt("other.test", "v=spf1 include:_spf.other.test ~all")
    dns.add_txt("_spf.other.test", "v=spf1 ip4:192.0.2.0/24 -all")
    dns.add_txt("_dmarc.example.test", "v=DMARC1; p=quarantine; rua=mailto:d@example.test")
    keys.mkdir(exist_ok=True)
    dns.add_txt("s1._domainkey.example.test", rsa_key(keys / "s1.pem"))
    ed25519_key(keys / "s2.pem")
    dns.add_txt("s2._domainkey.example.test", ed25519_key())  # someone else's key
    ed25519_key(keys / "s3.pem")  # never published
    return {
        "domains": {
            "example.test": {
                "keys": [
                    {"selector": "s1", "key_file": str(keys / "s1.pem")},
                    {
                        "selector": "s2",
                        "key_file": str(keys / "s2.pem"),
                        "algorithm": "ed25519-sha256",
                    },
                    {
                        "selector": "s3",
                        "key_file": str(keys / "s3.pem"),
                        "algorithm": "ed25519-sha256",
                    },
                ]
            },
            "other.test": {"keys": [{"selector": "s1", "key_file": str(keys / "absent.pem")}]},
        }
    }


THREE_IPS = [
    {"address": "127.0.0.2", "helo": "mta1.example.test"},
    {"address": "127.0.0.3", "helo": "mta2.example.test"},
    {"address": "127.0.0.4", "helo": "mta4.example.test"},
]


def doc_for(tmp_path: Path, dns: LoopbackDNS, sink_port: int = 9, **over: Any) -> dict[str, Any]:
    preflight = {
        "dnsbl_zones": ["bl.test", "zen.test"],
        "timeout_s": 2,
        **over.pop("preflight", {}),
    }
    return relay_doc(
        tmp_path,
        sink_port,
        dns={"nameservers": [f"127.0.0.1:{dns.port}"], "timeout_s": 2},
        preflight=preflight,
        **over,
    )


@pytest.fixture
async def dns() -> AsyncIterator[LoopbackDNS]:
    async with LoopbackDNS() as server:
        yield server


def results(report: Report) -> dict[tuple[str, str], tuple[Outcome, str]]:
    return {(c.subject, c.check): (c.outcome, c.reason) for c in report.checks}


# -- every check, in one run ---------------------------------------------------------------


async def test_every_check_is_reported_with_its_reason(tmp_path: Path, dns: LoopbackDNS) -> None:
    dkim = populate(dns, tmp_path / "keys")
    config = parse_config(doc_for(tmp_path, dns, ips=THREE_IPS, dkim=dkim))
    report = await Preflight(config).run()
    got = results(report)
    P, F, U = Outcome.PASS, Outcome.FAIL, Outcome.UNKNOWN
    expected = {
        ("127.0.0.2", "bind"): P,
        ("127.0.0.2", "ptr"): P,
        ("127.0.0.2", "helo"): P,
        ("127.0.0.2", "fcrdns"): P,
        ("127.0.0.2", "dnsbl:bl.test"): F,
        ("127.0.0.2", "dnsbl:zen.test"): U,
        ("127.0.0.3", "bind"): P,
        ("127.0.0.3", "ptr"): P,
        ("127.0.0.3", "helo"): F,
        ("127.0.0.3", "fcrdns"): F,
        ("127.0.0.3", "dnsbl:bl.test"): P,
        ("127.0.0.3", "dnsbl:zen.test"): U,
        ("127.0.0.4", "bind"): P,
        ("127.0.0.4", "ptr"): F,
        ("127.0.0.4", "helo"): F,
        ("127.0.0.4", "fcrdns"): F,
        ("127.0.0.4", "dnsbl:bl.test"): P,
        ("127.0.0.4", "dnsbl:zen.test"): U,
        ("example.test", "spf:127.0.0.2"): P,
        ("example.test", "spf:127.0.0.3"): P,
        ("example.test", "spf:127.0.0.4"): F,
        ("example.test", "dkim:s1"): P,
        ("example.test", "dkim:s2"): F,
        ("example.test", "dkim:s3"): F,
        ("example.test", "dmarc"): P,
        ("other.test", "spf:127.0.0.2"): F,
        ("other.test", "spf:127.0.0.3"): F,
        ("other.test", "spf:127.0.0.4"): F,
        ("other.test", "dkim:s1"): F,
        ("other.test", "dmarc"): F,
    }
    assert {k: v[0] for k, v in got.items()} == expected
    assert [(c.subject, c.check) for c in report.checks] == list(expected)  # a stable order

    def reason(subject: str, check: str) -> str:
        return got[(subject, check)][1]

    assert reason("127.0.0.2", "dnsbl:bl.test") == f"listed (127.0.0.2): {LISTED_REASON}"
    assert "127.255.255.254" in reason("127.0.0.2", "dnsbl:zen.test")
    assert "own resolver" in reason("127.0.0.2", "dnsbl:zen.test")
    assert "host-3.isp.test" in reason("127.0.0.3", "helo")
    assert "mta2.example.test" in reason("127.0.0.3", "helo")
    assert "127.0.0.9" in reason("127.0.0.3", "fcrdns")
    assert "no PTR record at 4.0.0.127.in-addr.arpa" in reason("127.0.0.4", "ptr")
    # the pass came through the include; the fail names the term that decided it
    assert "'include:_spf.example.test' of example.test" in reason("example.test", "spf:127.0.0.2")
    assert "'ip4:127.0.0.2/31' of _spf.example.test" in reason("example.test", "spf:127.0.0.2")
    assert reason("example.test", "spf:127.0.0.4") == "fail: '-all' of example.test"
    assert reason("other.test", "spf:127.0.0.2") == "softfail: '~all' of other.test"
    assert "RSA-2048" in reason("example.test", "dkim:s1")
    assert "is not the public key of key_file" in reason("example.test", "dkim:s2")
    assert "no DKIM record at s3._domainkey.example.test" in reason("example.test", "dkim:s3")
    assert "cannot read key_file" in reason("other.test", "dkim:s1")
    assert "No such file" in reason("other.test", "dkim:s1")
    assert "p=quarantine" in reason("example.test", "dmarc")
    assert "no DMARC record at _dmarc.other.test" in reason("other.test", "dmarc")
    assert not report.ok


async def test_no_answer_is_unknown_never_a_failure(tmp_path: Path, dns: LoopbackDNS) -> None:
    """Timeouts and SERVFAIL say nothing about the IP or the domain: unknown."""
    dns.set_drop("2.0.0.127.slow.test")
    dns.set_servfail("2.0.0.127.broken.test")
    dns.set_drop("2.0.0.127.in-addr.arpa")
    keys = tmp_path / "keys"
    keys.mkdir()
    ed25519_key(keys / "k.pem")
    dns.set_drop("k._domainkey.slow-domain.test")
    dns.set_drop("slow-domain.test")
    dns.set_drop("_dmarc.slow-domain.test")
    config = parse_config(
        doc_for(
            tmp_path,
            dns,
            ips=THREE_IPS[:1],
            # long enough for the SERVFAIL to come back on a busy machine: only the dropped
            # questions are to time out
            preflight={"dnsbl_zones": ["slow.test", "broken.test"], "timeout_s": 2},
            dkim={
                "domains": {
                    "slow-domain.test": {
                        "keys": [
                            {
                                "selector": "k",
                                "key_file": str(keys / "k.pem"),
                                "algorithm": "ed25519-sha256",
                            }
                        ]
                    }
                }
            },
        )
    )
    report = await Preflight(config).run()
    got = results(report)
    assert got[("127.0.0.2", "bind")][0] is Outcome.PASS
    for check in (
        ("127.0.0.2", "dnsbl:slow.test"),
        ("127.0.0.2", "dnsbl:broken.test"),
        ("127.0.0.2", "ptr"),
        ("127.0.0.2", "helo"),
        ("127.0.0.2", "fcrdns"),
        ("slow-domain.test", "spf:127.0.0.2"),
        ("slow-domain.test", "dkim:k"),
        ("slow-domain.test", "dmarc"),
    ):
        assert got[check][0] is Outcome.UNKNOWN, (check, got[check])
    assert "timeout" in got[("127.0.0.2", "dnsbl:slow.test")][1]
    assert "SERVFAIL" in got[("127.0.0.2", "dnsbl:broken.test")][1]
    assert got[("slow-domain.test", "spf:127.0.0.2")][1].startswith("temperror")
    assert not report.failed  # unknown does not fail
    # but not one answer arrived: the run says so (the command exits 2), never "ok"
    assert not report.ok
    assert report.unchecked == (
        f"no DNS answers from 127.0.0.1:{dns.port} (every query failed: 5 timed out, "
        "1 answered SERVFAIL): nothing in DNS was checked"
    )


async def test_not_on_this_host_fails_and_non_public_names_are_not_asked_without_nameservers(
    tmp_path: Path,
) -> None:
    """192.0.2.7 cannot be bound here: fail. Without dns.nameservers nothing is asked about
    a non-public address or a .test domain (public DNS knows nothing of them); the key file
    is still checked."""
    config = parse_config(
        relay_doc(
            tmp_path,
            9,
            ips=[{"address": "192.0.2.7", "helo": "mta.example.test"}],
            dkim={
                "domains": {
                    "example.test": {"keys": [{"selector": "s", "key_file": "/nonexistent"}]}
                }
            },
        )
    )
    got = results(await Preflight(config).run())
    outcome, reason = got[("192.0.2.7", "bind")]
    assert outcome is Outcome.FAIL
    assert "cannot be bound on this host" in reason
    for check in ("ptr", "helo", "fcrdns", "dnsbl:zen.spamhaus.org", "dnsbl:bl.spamcop.net"):
        assert got[("192.0.2.7", check)] == (
            Outcome.UNKNOWN,
            "192.0.2.7 is not a public address: not looked up in public DNS "
            "(set dns.nameservers to ask your own)",
        )
    assert got[("example.test", "spf:192.0.2.7")][0] is Outcome.UNKNOWN
    assert got[("example.test", "dmarc")][0] is Outcome.UNKNOWN
    assert got[("example.test", "dkim:s")][0] is Outcome.FAIL


async def test_dmarc_of_a_subdomain_falls_back_to_the_organizational_domain(
    tmp_path: Path, dns: LoopbackDNS
) -> None:
    dns.add_txt("_dmarc.example.test", "v=DMARC1; p=reject; sp=none")
    dns.add_txt("_dmarc.two.test", "v=DMARC1; p=none")
    dns.add_txt("_dmarc.two.test", "v=DMARC1; p=reject")
    keys = tmp_path / "keys"
    keys.mkdir()
    ed25519_key(keys / "k.pem")
    key = {"selector": "k", "key_file": str(keys / "k.pem"), "algorithm": "ed25519-sha256"}
    config = parse_config(
        doc_for(
            tmp_path,
            dns,
            ips=THREE_IPS[:1],
            dkim={"domains": {"news.example.test": {"keys": [key]}, "two.test": {"keys": [key]}}},
        )
    )
    got = results(await Preflight(config).run())
    outcome, reason = got[("news.example.test", "dmarc")]
    assert outcome is Outcome.PASS
    assert "_dmarc.example.test: p=reject sp=none" in reason
    assert "none applies here" in reason
    assert got[("two.test", "dmarc")] == (
        Outcome.FAIL,
        "2 DMARC records at _dmarc.two.test: receivers ignore them all",
    )


# -- SPF evaluation ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("domain", "ip", "expected"),
    [
        ("example.test", "127.0.0.2", SpfResult.PASS),  # through include:
        ("example.test", "127.0.0.4", SpfResult.FAIL),
        ("a.spf.test", "127.0.0.2", SpfResult.PASS),  # a:mail.spf.test/30
        ("a.spf.test", "127.0.0.4", SpfResult.SOFTFAIL),
        ("mx.spf.test", "127.0.0.2", SpfResult.PASS),
        ("mx.spf.test", "127.0.0.3", SpfResult.FAIL),
        ("redirect.spf.test", "127.0.0.3", SpfResult.PASS),
        ("redirect.spf.test", "127.0.0.4", SpfResult.FAIL),
        ("exists.spf.test", "127.0.0.2", SpfResult.PASS),  # exists:%{i}._ip.spf.test
        ("exists.spf.test", "127.0.0.4", SpfResult.FAIL),
        ("neutral.spf.test", "127.0.0.2", SpfResult.NEUTRAL),
        ("nothing.spf.test", "127.0.0.2", SpfResult.NEUTRAL),  # no term matches
        ("none.spf.test", "127.0.0.2", SpfResult.NONE),
        ("loop.spf.test", "127.0.0.2", SpfResult.PERMERROR),  # > 10 lookups
        ("eleven.spf.test", "127.0.0.2", SpfResult.PERMERROR),  # > 10 lookups
        ("ten.spf.test", "127.0.0.2", SpfResult.PASS),  # exactly 10 is fine
        ("two.spf.test", "127.0.0.2", SpfResult.PERMERROR),
        ("syntax.spf.test", "127.0.0.2", SpfResult.PERMERROR),
        ("dangling.spf.test", "127.0.0.2", SpfResult.PERMERROR),  # include of no record
        ("voids.spf.test", "127.0.0.2", SpfResult.PERMERROR),  # 3 void lookups
        ("slow.spf.test", "127.0.0.2", SpfResult.TEMPERROR),
    ],
)
async def test_spf_evaluation(
    tmp_path: Path, dns: LoopbackDNS, domain: str, ip: str, expected: SpfResult
) -> None:
    populate(dns, tmp_path / "keys")
    dns.add_txt("a.spf.test", "v=spf1 a:mail.spf.test/30 ~all")
    dns.add_a("mail.spf.test", "127.0.0.1")
    dns.add_txt("mx.spf.test", "v=spf1 mx -all")
    dns.add_mx("mx.spf.test", 10, "mx1.spf.test")
    dns.add_a("mx1.spf.test", "127.0.0.2")
    dns.add_txt("redirect.spf.test", "v=spf1 redirect=_spf.example.test")
    dns.add_txt("exists.spf.test", "v=spf1 exists:%{i}._ip.spf.test -all")
    dns.add_a("127.0.0.2._ip.spf.test", "127.0.0.2")
    dns.add_txt("neutral.spf.test", "v=spf1 ?all")
    dns.add_txt("nothing.spf.test", "v=spf1 ip4:192.0.2.9")
    dns.add_txt("none.spf.test", "google-site-verification=abc")
    dns.add_txt("loop.spf.test", "v=spf1 include:loop.spf.test -all")
    for n in range(11):
        dns.add_txt(f"c{n}.spf.test", f"v=spf1 include:c{n + 1}.spf.test")
    dns.add_txt("c11.spf.test", "v=spf1 +all")
    dns.add_txt("eleven.spf.test", "v=spf1 redirect=c0.spf.test")  # 1 + 11 includes
    dns.add_txt("ten.spf.test", "v=spf1 redirect=c2.spf.test")  # 1 + 9 includes
    dns.add_txt("two.spf.test", "v=spf1 +all")
    dns.add_txt("two.spf.test", "v=spf1 -all")
    dns.add_txt("syntax.spf.test", "v=spf1 ipv4:127.0.0.2 -all")
    dns.add_txt("dangling.spf.test", "v=spf1 include:nowhere.spf.test -all")
    dns.add_txt("voids.spf.test", "v=spf1 a:v1.spf.test a:v2.spf.test a:v3.spf.test +all")
    dns.add_txt("slow.spf.test", "v=spf1 include:dropped.spf.test -all")
    dns.set_drop("dropped.spf.test")
    client = DnsClient([dns.address], timeout_s=2)  # only slow.spf.test waits it out
    try:
        address = ipaddress.ip_address(ip)
        verdict = await SpfEvaluation(client, address, f"postmaster@{domain}", "h.test").check(
            domain
        )
    finally:
        await client.close()
    assert verdict.result is expected, verdict


def test_spf_classification() -> None:
    """Only pass passes; temperror (no answer now) is unknown; every other result fails."""
    assert classify_spf(SpfVerdict(SpfResult.PASS, "x"))[0] is Outcome.PASS
    assert classify_spf(SpfVerdict(SpfResult.TEMPERROR, "x"))[0] is Outcome.UNKNOWN
    for result in (
        SpfResult.FAIL,
        SpfResult.SOFTFAIL,
        SpfResult.NEUTRAL,
        SpfResult.NONE,
        SpfResult.PERMERROR,
    ):
        assert classify_spf(SpfVerdict(result, "x")) == (Outcome.FAIL, f"{result.value}: x")


@pytest.mark.parametrize(
    "record",
    [
        "v=spf1 ipv4:127.0.0.1",
        "v=spf1 ip4:127.0.0.1/33",
        "v=spf1 ip4:::1",
        "v=spf1 ip6:127.0.0.1",
        "v=spf1 include:",
        "v=spf1 all:x",
        "v=spf1 a:",
        "v=spf1 redirect=a.test redirect=b.test",
        "v=spf1 exists:%{q}.test",
        "v=spf10 -all",
    ],
)
def test_spf_syntax_errors(record: str) -> None:
    with pytest.raises(SpfSyntaxError):
        parse_spf(record)


def test_spf_parse() -> None:
    record = parse_spf("v=spf1 a/24 mx:mx.test//64 -ip4:192.0.2.0/24 ~all unknown=x exp=e.test")
    assert [(m.name, m.qualifier, m.target, m.cidr4, m.cidr6) for m in record.mechanisms] == [
        ("a", SpfResult.PASS, None, 24, None),
        ("mx", SpfResult.PASS, "mx.test", None, 64),
        ("ip4", SpfResult.FAIL, "192.0.2.0", 24, None),
        ("all", SpfResult.SOFTFAIL, None, None, None),
    ]
    assert record.redirect is None


@pytest.mark.parametrize(
    ("spec", "expanded"),
    [  # RFC 7208 7.4
        ("%{s}", "strong-bad@email.example.com"),
        ("%{o}", "email.example.com"),
        ("%{d}", "email.example.com"),
        ("%{d4}", "email.example.com"),
        ("%{d3}", "email.example.com"),
        ("%{d2}", "example.com"),
        ("%{d1}", "com"),
        ("%{dr}", "com.example.email"),
        ("%{d2r}", "example.email"),
        ("%{l}", "strong-bad"),
        ("%{l-}", "strong.bad"),
        ("%{lr}", "strong-bad"),
        ("%{lr-}", "bad.strong"),
        ("%{l1r-}", "strong"),
        ("%{ir}.%{v}._spf.%{d2}", "3.2.0.192.in-addr._spf.example.com"),
        ("%{lr-}.lp._spf.%{d2}", "bad.strong.lp._spf.example.com"),
        ("%{lr-}.lp.%{ir}.%{v}._spf.%{d2}", "bad.strong.lp.3.2.0.192.in-addr._spf.example.com"),
        ("%{ir}.%{v}.%{l1r-}.lp._spf.%{d2}", "3.2.0.192.in-addr.strong.lp._spf.example.com"),
        ("%{d2}.trusted-domains.example.net", "example.com.trusted-domains.example.net"),
        ("a%%b%_c%-d", "a%b c%20d"),
    ],
)
def test_spf_macros(spec: str, expanded: str) -> None:
    ctx = MacroContext(
        ipaddress.ip_address("192.0.2.3"),
        "strong-bad@email.example.com",
        "email.example.com",
        "h.example.com",
    )
    assert expand_macros(spec, ctx) == expanded


def test_spf_macros_ipv6() -> None:
    ctx = MacroContext(
        ipaddress.ip_address("2001:db8::cb01"), "a@email.example.com", "email.example.com", "h"
    )
    assert expand_macros("%{ir}.%{v}._spf.%{d2}", ctx) == (
        "1.0.b.c.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.ip6._spf.example.com"
    )


# -- blocklist answers ----------------------------------------------------------------------


def test_blocklist_answers() -> None:
    """NXDOMAIN: not listed; 127.0.0.2 and above: listed (with the TXT reason); 127.255.255.x:
    the list refused to answer (unknown, never "listed"); no answer or an odd one: unknown."""
    assert classify_dnsbl(Missing(nxdomain=True)) == (Outcome.PASS, "not listed")
    assert classify_dnsbl(Found(("127.0.0.2", "127.0.0.4")), Found(("spam", "exploit"))) == (
        Outcome.FAIL,
        "listed (127.0.0.2, 127.0.0.4): spam; exploit",
    )
    assert classify_dnsbl(Found(("127.0.0.3",)), Missing(nxdomain=False)) == (
        Outcome.FAIL,
        "listed (127.0.0.3): no TXT reason given",
    )
    for code in ("127.255.255.252", "127.255.255.254", "127.255.255.255"):
        outcome, reason = classify_dnsbl(Found((code,)))
        assert outcome is Outcome.UNKNOWN
        assert code in reason
    assert classify_dnsbl(Failed("timeout"))[0] is Outcome.UNKNOWN
    outcome, reason = classify_dnsbl(Found(("192.0.2.80",)))  # a resolver's "search page"
    assert outcome is Outcome.UNKNOWN
    assert "answered 192.0.2.80: not a listing" in reason


# -- the command line -------------------------------------------------------------------------


def write(tmp_path: Path, doc: dict[str, Any]) -> str:
    path = tmp_path / "relay.yaml"
    path.write_text(yaml.safe_dump(doc))
    return str(path)


async def test_cli_json_and_exit_1_when_a_check_fails(tmp_path: Path, dns: LoopbackDNS) -> None:
    dkim = populate(dns, tmp_path / "keys")
    cfg = write(tmp_path, doc_for(tmp_path, dns, ips=THREE_IPS, dkim=dkim))
    run = await warmrelay_async("preflight", "-c", cfg, "--json")  # this loop serves DNS
    assert run.returncode == 1
    data = json.loads(run.stdout)
    assert set(data) == {"ok", "started", "finished", "counts", "checks", "paused", "dns"}
    assert data["dns"]["answered"] > 0
    assert data["dns"]["error"] is None
    assert data["ok"] is False
    assert data["counts"] == {"pass": 13, "fail": 14, "unknown": 3}
    assert data["paused"] == []  # the command changes nothing
    assert data["checks"][4] == {
        "subject": "127.0.0.2",
        "check": "dnsbl:bl.test",
        "result": "fail",
        "reason": f"listed (127.0.0.2): {LISTED_REASON}",
    }
    assert all(set(c) == {"subject", "check", "result", "reason"} for c in data["checks"])

    run = await warmrelay_async("preflight", "-c", cfg)
    assert run.returncode == 1
    lines = run.stdout.splitlines()
    assert lines[0].split() == ["SUBJECT", "CHECK", "RESULT", "REASON"]
    row = next(line for line in lines if "127.0.0.3" in line and " helo " in line)
    assert row.split()[:3] == ["127.0.0.3", "helo", "fail"]
    assert lines[-1].startswith("14 failed, 3 unknown, 13 passed: each failure hurts delivery")


async def test_cli_exit_0_when_nothing_fails(tmp_path: Path, dns: LoopbackDNS) -> None:
    """Unknown (the refusing zen.test) does not fail the run."""
    dkim = populate(dns, tmp_path / "keys")
    dkim["domains"] = {"example.test": {"keys": dkim["domains"]["example.test"]["keys"][:1]}}
    doc = doc_for(
        tmp_path,
        dns,
        ips=THREE_IPS[:1],
        dkim=dkim,
        preflight={"dnsbl_zones": ["zen.test", "clean.test"]},
    )
    run = await warmrelay_async("preflight", "-c", write(tmp_path, doc))
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.splitlines()[-1].startswith("0 failed, 1 unknown, 8 passed")


# -- in the relay -----------------------------------------------------------------------------


async def gauges(relay: Any, name: str = "warmrelay_preflight_ok") -> dict[tuple[str, str], float]:
    _, body = await http_get(relay.admin.port, "/metrics")
    return {
        (s.labels["subject"], s.labels["check"]): s.value
        for family in text_string_to_metric_families(body.decode())
        if family.name == name
        for s in family.samples
    }


def relay_with(tmp_path: Path, dns: LoopbackDNS, sink: Sink, **preflight: Any) -> Config:
    populate(dns, tmp_path / "keys")
    return relay_config(
        tmp_path,
        sink.port,
        dns={"nameservers": [f"127.0.0.1:{dns.port}"], "timeout_s": 2},
        preflight={"dnsbl_zones": ["bl.test", "zen.test"], "timeout_s": 2, **preflight},
    )


async def test_a_listed_warming_ip_is_paused_before_any_mail_leaves_from_it(
    tmp_path: Path, dns: LoopbackDNS, sink: Sink, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    config = relay_with(tmp_path, dns, sink)
    async with running(config) as relay:
        today = datetime.now(UTC).date()
        assert relay.router.control("127.0.0.2").paused_since == today
        ips = {ip["address"]: ip for ip in (await status(relay))["ips"]}
        assert ips["127.0.0.2"]["state"] == "paused"
        for n in range(4):
            await send(relay, [f"r{n}@example.test"])
        await sink.wait_for(4)
        assert sink.by_peer() == {"127.0.0.3": 4}  # nothing from the listed IP

        code, body = await http_get(relay.admin.port, "/preflight")
        assert code == 200
        page = json.loads(body)
        assert page["paused"] == ["127.0.0.2"]
        assert page["ok"] is False
        checks = {(c["subject"], c["check"]): c for c in page["checks"]}
        assert checks[("127.0.0.2", "dnsbl:bl.test")]["result"] == "fail"
        assert checks[("127.0.0.2", "dnsbl:zen.test")]["result"] == "unknown"
        assert checks[("127.0.0.2", "fcrdns")]["result"] == "pass"

        metrics = await gauges(relay)
        unknown = await gauges(relay, "warmrelay_preflight_unknown")
        assert metrics[("127.0.0.2", "dnsbl:bl.test")] == 0
        assert ("127.0.0.2", "dnsbl:zen.test") not in metrics  # unknown: no ok series
        assert unknown[("127.0.0.2", "dnsbl:zen.test")] == 1
        assert unknown[("127.0.0.2", "dnsbl:bl.test")] == 0
        assert metrics[("127.0.0.2", "ptr")] == 1
        assert metrics[("127.0.0.3", "helo")] == 0
        assert len(unknown) == len(page["checks"])
        assert len(metrics) == sum(c["result"] != "unknown" for c in page["checks"])
    warned = [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING and "paused" in r.getMessage()
    ]
    assert len(warned) == 1
    assert "127.0.0.2" in warned[0]
    assert f"bl.test: listed (127.0.0.2): {LISTED_REASON}" in warned[0]

    # the pause is stored: a relay started later on the same state (preflight off) keeps it
    quiet = relay_config(tmp_path, sink.port, preflight={"on_start": False})
    async with running(quiet) as relay:
        ips = {ip["address"]: ip for ip in (await status(relay))["ips"]}
        assert ips["127.0.0.2"]["state"] == "paused"


async def test_a_listing_while_warming_pauses_the_ip_at_the_next_run(
    tmp_path: Path, dns: LoopbackDNS, sink: Sink
) -> None:
    """A blocklist that lists the IP after the start is a critical signal: the relay runs
    preflight again every ``every_s`` and pauses the IP then, not at the next restart."""
    config = relay_with(tmp_path, dns, sink, dnsbl_zones=["later.test"], every_s=0.2)
    async with running(config) as relay:
        assert relay.router.control("127.0.0.2").paused_since is None
        await send(relay, ["before@example.test"])
        await sink.wait_for(1)
        assert sink.by_peer() == {"127.0.0.2": 1}
        relay.preflight.ran.clear()
        await asyncio.wait_for(relay.preflight.ran.wait(), 10)  # a rerun: still clean
        assert relay.router.control("127.0.0.2").paused_since is None
        dns.add_a("2.0.0.127.later.test", "127.0.0.2")  # now listed
        dns.add_txt("2.0.0.127.later.test", LISTED_REASON)
        relay.preflight.ran.clear()
        await asyncio.wait_for(relay.preflight.ran.wait(), 10)
        assert relay.router.control("127.0.0.2").paused_since is not None
        assert relay.preflight.latest is not None
        assert relay.preflight.latest.paused == ("127.0.0.2",)
        await send(relay, ["after@example.test"])
        await sink.wait_for(2)
        assert sink.by_peer() == {"127.0.0.2": 1, "127.0.0.3": 1}


async def test_pause_listed_off_warns_and_leaves_the_ip_warming(
    tmp_path: Path, dns: LoopbackDNS, sink: Sink, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    config = relay_with(tmp_path, dns, sink, pause_listed=False)
    async with running(config) as relay:
        assert relay.router.control("127.0.0.2").paused_since is None
        await send(relay, ["a@example.test"])
        await sink.wait_for(1)
        assert sink.by_peer() == {"127.0.0.2": 1}
    assert any(
        "NOT paused" in r.getMessage() and "bl.test" in r.getMessage() for r in caplog.records
    )


async def test_get_preflight_runs_on_request_when_there_are_no_results(
    tmp_path: Path, dns: LoopbackDNS, sink: Sink, monkeypatch: pytest.MonkeyPatch
) -> None:
    """on_start off: nothing asked at start; GET /preflight runs it (private, as /status)."""
    monkeypatch.setenv("WARMRELAY_PREFLIGHT_TEST_TOKEN", "a-long-random-test-token")
    config = relay_with(tmp_path, dns, sink, on_start=False)
    config = config.model_copy(
        update={
            "admin": config.admin.model_copy(update={"token_env": "WARMRELAY_PREFLIGHT_TEST_TOKEN"})
        }
    )
    async with running(config) as relay:
        assert dns.query_count() == 0
        assert relay.router.control("127.0.0.2").paused_since is None
        code, _ = await http_get(relay.admin.port, "/preflight")
        assert code == 401
        code, body = await http(relay.admin.port, "GET", "/preflight", "a-long-random-test-token")
        assert code == 200
        page = json.loads(body)
        assert page["paused"] == ["127.0.0.2"]  # a run on request pauses a listed IP too
        assert {c["check"] for c in page["checks"] if c["subject"] == "127.0.0.3"} == {
            "bind",
            "ptr",
            "helo",
            "fcrdns",
            "dnsbl:bl.test",
            "dnsbl:zen.test",
        }
        assert (await gauges(relay))[("127.0.0.3", "fcrdns")] == 0


async def test_readiness_waits_for_the_blocklists_only(
    tmp_path: Path, dns: LoopbackDNS, sink: Sink
) -> None:
    """A slow DNS answer elsewhere (here the PTR lookups) does not hold the relay back: it
    accepts mail while the run goes on, and GET /preflight waits for the run's end."""
    dns.set_drop("2.0.0.127.in-addr.arpa")
    dns.set_drop("3.0.0.127.in-addr.arpa")
    # the PTR questions time out after 6 s: the relay's start and one message take far less,
    # even on a busy machine
    config = relay_with(tmp_path, dns, sink, timeout_s=6, dnsbl_zones=["zen.test"])
    async with running(config) as relay:
        await send(relay, ["a@example.test"])
        assert relay.preflight.latest is None  # still waiting for the PTR answers
        code, body = await http_get(relay.admin.port, "/preflight")
        assert code == 200
        checks = {(c["subject"], c["check"]): c["result"] for c in json.loads(body)["checks"]}
        assert checks[("127.0.0.2", "ptr")] == "unknown"
        assert checks[("127.0.0.2", "dnsbl:zen.test")] == "unknown"
        assert relay.router.control("127.0.0.2").paused_since is None


# -- answers that are not listings (RFC 5782 2.1, issue 18) ----------------------------------


@pytest.mark.parametrize(
    ("answer", "says"),
    [
        (("127.0.0.1",), "zen.spamhaus.org answered 127.0.0.1: not a listing"),
        (("127.0.0.0",), "zen.spamhaus.org answered 127.0.0.0: not a listing"),
        (
            ("127.255.255.252",),
            "zen.spamhaus.org answered 127.255.255.252: typing error in the zone name",
        ),
        (
            ("127.255.255.254",),
            "zen.spamhaus.org answered 127.255.255.254: query refused (public resolver?)",
        ),
        (
            ("127.255.255.255",),
            "zen.spamhaus.org answered 127.255.255.255: excessive number of queries",
        ),
        (("127.255.255.7",), "zen.spamhaus.org answered 127.255.255.7: an error code"),
        (("192.0.2.80",), "zen.spamhaus.org answered 192.0.2.80: not a listing"),
        (("::1",), "zen.spamhaus.org answered ::1: not a listing"),
        # a listing beside an error code is no listing either
        (
            ("127.0.0.2", "127.255.255.254"),
            "zen.spamhaus.org answered 127.255.255.254: query refused",
        ),
        (("127.0.0.2", "127.0.0.1"), "zen.spamhaus.org answered 127.0.0.1: not a listing"),
    ],
)
def test_an_answer_that_is_not_a_listing_is_unknown(answer: tuple[str, ...], says: str) -> None:
    """127.0.0.1 is never a listing, 127.255.255.0/24 are error codes, anything outside
    127.0.0.0/8 is no listing: unknown, never fail (nor pass), with the zone and the code;
    even when the list gives a TXT "reason"."""
    outcome, reason = classify_dnsbl(Found(answer), Found(("listed",)), zone="zen.spamhaus.org")
    assert outcome is Outcome.UNKNOWN, reason
    assert reason.startswith(says), reason


@pytest.mark.parametrize(
    "code", ["127.0.0.2", "127.0.0.11", "127.0.1.2", "127.1.0.3", "127.254.0.1"]
)
def test_listing_codes_are_127_0_0_2_and_above(code: str) -> None:
    """Every 127.0.0.0/8 answer from 127.0.0.2 on, outside the error block, is a listing
    (Spamhaus DBL and others list as 127.0.1.x and above)."""
    assert classify_dnsbl(Found((code,)), Found(("spam",)), zone="bl.test") == (
        Outcome.FAIL,
        f"listed ({code}): spam",
    )


async def test_an_answer_that_is_not_a_listing_never_pauses_a_warming_ip(
    tmp_path: Path, dns: LoopbackDNS, sink: Sink, caplog: pytest.LogCaptureFixture
) -> None:
    """odd.test answers 127.0.0.1 (with a TXT reason), zen.test 127.255.255.254: the warming
    IP keeps warming and nothing says it is listed."""
    caplog.set_level(logging.INFO)
    dns.add_a("2.0.0.127.odd.test", "127.0.0.1")
    dns.add_txt("2.0.0.127.odd.test", "query refused")
    config = relay_with(tmp_path, dns, sink, dnsbl_zones=["odd.test", "zen.test"])
    async with running(config) as relay:
        assert relay.router.control("127.0.0.2").paused_since is None
        await send(relay, ["a@example.test"])
        await sink.wait_for(1)
        assert sink.by_peer() == {"127.0.0.2": 1}
        code, body = await http_get(relay.admin.port, "/preflight")
        assert code == 200
        page = json.loads(body)
        assert page["paused"] == []
        checks = {(c["subject"], c["check"]): c for c in page["checks"]}
        odd, zen = checks[("127.0.0.2", "dnsbl:odd.test")], checks[("127.0.0.2", "dnsbl:zen.test")]
        assert odd["result"] == zen["result"] == "unknown"
        assert odd["reason"].startswith("odd.test answered 127.0.0.1: not a listing")
        assert zen["reason"].startswith(
            "zen.test answered 127.255.255.254: query refused (public resolver?)"
        )
    assert not [
        r for r in caplog.records if r.levelno >= logging.WARNING and "listed" in r.getMessage()
    ]


# -- no DNS answer at all: a dead resolver (issue 18) ------------------------------------------


class OneRcodeDNS(LoopbackDNS):
    """A resolver that is up but useless: every question gets the same error (REFUSED,
    SERVFAIL), as from a resolver that does not serve us or has lost its upstream."""

    def __init__(self, rcode: int) -> None:
        super().__init__()
        self.rcode = rcode

    def answer(self, data: bytes, *, udp: bool) -> bytes | None:
        reply = DNSRecord.parse(data).reply()
        reply.header.rcode = self.rcode
        wire: bytes = reply.pack()
        return wire


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A loopback UDP port that is bound (no ICMP "port unreachable") but never answers:
    every query times out."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        yield int(sock.getsockname()[1])


def dead_doc(tmp_path: Path, port: int, timeout_s: float = 0.3, **over: Any) -> dict[str, Any]:
    """The test relay (127.0.0.2, 127.0.0.3) asking only a resolver at ``port``, each lookup
    given ``timeout_s``: short, as waiting for a silent resolver is all it does."""
    return relay_doc(
        tmp_path,
        9,
        dns={"nameservers": [f"127.0.0.1:{port}"]},
        preflight={"dnsbl_zones": ["bl.test", "zen.test"], "timeout_s": timeout_s},
        **over,
    )


def no_answers(port: int, why: str) -> str:
    return f"preflight: no DNS answers from 127.0.0.1:{port} ({why}): nothing in DNS was checked"


@pytest.mark.parametrize("kind", ["silent", "REFUSED", "SERVFAIL"])
async def test_cli_says_so_in_one_line_and_exits_2_when_no_dns_answer_arrived(
    tmp_path: Path, silent_port: int, kind: str
) -> None:
    """Today's green "0 failed" (exit 0) would send an operator warming with nothing checked;
    the contract's exit 2 is "could not check", with --json too."""
    async with contextlib.AsyncExitStack() as stack:
        server = None
        if kind != "silent":
            server = await stack.enter_async_context(OneRcodeDNS(getattr(RCODE, kind)))
        port = silent_port if server is None else server.port
        # a refusing server answers at once: a long timeout keeps a busy machine's late
        # reply from counting as "timed out"
        cfg = write(tmp_path, dead_doc(tmp_path, port, 0.3 if server is None else 5))
        why = "every query timed out" if server is None else f"every query was answered {kind}"

        run = await warmrelay_async("preflight", "-c", cfg)  # this loop serves DNS
        assert run.returncode == 2, run.stdout + run.stderr
        lines = run.stdout.splitlines()
        assert lines[-1] == no_answers(port, why)
        assert "no answer" not in run.stdout  # one line says it, not one row per check
        assert "0 failed" not in run.stdout
        assert [line.split()[:3] for line in lines[1:3]] == [
            ["127.0.0.2", "bind", "pass"],  # what was checked without DNS is still shown
            ["127.0.0.3", "bind", "pass"],
        ]

        run = await warmrelay_async("preflight", "-c", cfg, "--json")
        assert run.returncode == 2, run.stdout + run.stderr
        data = json.loads(run.stdout)
        assert data["ok"] is False
        assert data["counts"]["fail"] == 0
        assert data["dns"]["servers"] == [f"127.0.0.1:{port}"]
        assert data["dns"]["queries"] > 0
        assert data["dns"]["answered"] == 0
        assert data["dns"]["error"] == no_answers(port, why).removeprefix("preflight: ")
        assert run.stderr.strip() == no_answers(port, why)


def test_cli_exit_1_still_wins_when_a_check_failed_without_dns(
    tmp_path: Path, silent_port: int
) -> None:
    """A key file that cannot be read is a problem found (exit 1) whatever DNS does; the line
    about DNS is still there."""
    doc = dead_doc(
        tmp_path,
        silent_port,
        dkim={
            "domains": {"example.test": {"keys": [{"selector": "s", "key_file": "/nonexistent"}]}}
        },
    )
    run = warmrelay("preflight", "-c", write(tmp_path, doc))
    assert run.returncode == 1, run.stdout + run.stderr
    assert no_answers(silent_port, "every query timed out") in run.stdout.splitlines()
    row = next(line for line in run.stdout.splitlines() if "dkim:s" in line)
    assert row.split()[:3] == ["example.test", "dkim:s", "fail"]
    assert run.stdout.splitlines()[-1].startswith("1 failed")


async def test_start_up_says_in_one_line_that_no_dns_answer_arrived(
    tmp_path: Path, sink: Sink, silent_port: int, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="warmrelay.preflight")
    doc = dead_doc(tmp_path, silent_port, routes={"*": f"127.0.0.1:{sink.port}"})
    async with running(parse_config(doc)) as relay:
        report = await relay.preflight.report()
        assert not report.ok
    lines = [r.getMessage() for r in caplog.records if r.name == "warmrelay.preflight"]
    warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert no_answers(silent_port, "every query timed out") in warned
    assert not [line for line in lines if "no answer" in line], lines


# -- non-public addresses: one note, not one line per check (issue 18) ----------------------


async def test_start_up_sums_up_the_non_public_addresses_in_one_line(
    tmp_path: Path, sink: Sink, caplog: pytest.LogCaptureFixture
) -> None:
    """As with config.example.yaml (loopback IPs, no dns.nameservers): one line for both IPs
    instead of six per IP."""
    caplog.set_level(logging.INFO, logger="warmrelay.preflight")
    async with running(relay_config(tmp_path, sink.port)) as relay:
        await relay.preflight.report()
    lines = [r.getMessage() for r in caplog.records if r.name == "warmrelay.preflight"]
    assert (
        "preflight: 127.0.0.2, 127.0.0.3 are not public addresses: PTR, helo, FCrDNS and DNSBL "
        "checks skipped (public DNS knows nothing of them; set dns.nameservers to ask your own)"
    ) in lines
    assert not [line for line in lines if "not a public address" in line], lines


def test_cli_collapses_the_skipped_checks_into_one_note_each(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.mkdir()
    ed25519_key(keys / "k.pem")
    key = {"selector": "k", "key_file": str(keys / "k.pem"), "algorithm": "ed25519-sha256"}
    doc = relay_doc(tmp_path, 9, dkim={"domains": {"example.test": {"keys": [key]}}})
    run = warmrelay("preflight", "-c", write(tmp_path, doc))
    assert run.returncode == 0, run.stdout + run.stderr
    assert "not looked up in public DNS" not in run.stdout  # no row per skipped check
    lines = run.stdout.splitlines()
    assert (
        "127.0.0.2, 127.0.0.3 are not public addresses: PTR, helo, FCrDNS and DNSBL checks "
        "skipped (public DNS knows nothing of them; set dns.nameservers to ask your own)"
    ) in lines
    assert (
        "example.test is under a special-use top-level domain: SPF, DKIM and DMARC checks "
        "skipped (public DNS knows nothing of it; set dns.nameservers to ask your own)"
    ) in lines
    assert [line.split()[:3] for line in lines[1:3]] == [
        ["127.0.0.2", "bind", "pass"],
        ["127.0.0.3", "bind", "pass"],
    ]
