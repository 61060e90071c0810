"""The bounce domain's checks (``bounces.domain``): its MX must point at this relay (the
reports come home only there), and its SPF must cover every sending IP (receivers check
SPF against the return path's domain, which is now ours)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from warmrelay.config import IPConfig
from warmrelay.mail.preflight.dns import DnsClient, Failed, Found, Missing
from warmrelay.mail.preflight.report import Check, Outcome, Skip
from warmrelay.mail.preflight.spf import spf_check


async def bounce_domain_checks(
    dns: DnsClient,
    domain: str,
    ips: Sequence[IPConfig],
    hostname: str,
    skip: Skip | None,
) -> list[Check]:
    if skip is not None:
        return [
            Check.skipped(domain, "mx", skip),
            *(Check.skipped(domain, f"spf:{ip.address}", skip) for ip in ips),
        ]
    parts = await asyncio.gather(
        mx_check(dns, domain, ips, hostname), *(spf_check(dns, domain, ip) for ip in ips)
    )
    return list(parts)


async def mx_check(dns: DnsClient, domain: str, ips: Sequence[IPConfig], hostname: str) -> Check:
    """Pass when an MX host of ``domain`` is ``smtp.hostname`` or resolves to one of our
    addresses (the sending IPs, or what smtp.hostname resolves to)."""
    found = await dns.query(domain, "MX")
    if isinstance(found, Failed):
        return Check(domain, "mx", Outcome.UNKNOWN, f"no answer for MX {domain}: {found.reason}")
    if isinstance(found, Missing):
        return Check(
            domain,
            "mx",
            Outcome.FAIL,
            f"{domain} has no MX record: reports cannot reach this relay (publish "
            f"'{domain}. MX 10 {hostname}.')",
        )
    hosts = [v.split()[-1].rstrip(".").lower() for v in found.values if v.split()]
    ours = {str(ip.address) for ip in ips}
    ours |= await _addresses(dns, hostname) or set()
    if hostname.lower() in hosts:
        return Check(domain, "mx", Outcome.PASS, f"MX {hostname}")
    unknown = False
    for host in hosts:
        addresses = await _addresses(dns, host)
        if addresses is None:
            unknown = True
            continue
        if addresses & ours:
            return Check(
                domain, "mx", Outcome.PASS, f"MX {host} ({', '.join(sorted(addresses & ours))})"
            )
    if unknown:
        return Check(
            domain, "mx", Outcome.UNKNOWN, f"MX {', '.join(hosts)}: an address lookup failed"
        )
    return Check(
        domain,
        "mx",
        Outcome.FAIL,
        f"MX {', '.join(hosts)} points elsewhere (not {hostname} nor our addresses): reports "
        "go to another server",
    )


async def _addresses(dns: DnsClient, host: str) -> set[str] | None:
    """A and AAAA of ``host`` (empty when it has none); None when a lookup failed."""
    out: set[str] = set()
    for rdtype in ("A", "AAAA"):
        answer = await dns.query(host, rdtype)
        if isinstance(answer, Found):
            out.update(answer.values)
        elif isinstance(answer, Failed):
            return None
    return out
