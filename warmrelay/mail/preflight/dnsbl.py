"""DNS blocklists: is an IP listed on a ``preflight.dnsbl_zones`` zone (RFC 5782)?

A new IP may arrive listed (a previous tenant). What makes this a module of its own is
reading the answers right: a listing pauses a warming IP, so only a real listing code may
count as "listed", and an error code or a resolver's rewritten NXDOMAIN must not count as
"not listed" either: both are unknown, with the zone and the code.
"""

from __future__ import annotations

import ipaddress

from warmrelay.config import IPAddress
from warmrelay.mail.preflight.dns import DnsClient, Failed, Found, Lookup, Missing
from warmrelay.mail.preflight.report import Check, Outcome, Skip

# RFC 5782 2.1: a listing is an A record in 127.0.0.0/8 from 127.0.0.2 on (127.0.0.1 is
# never one: some lists answer it to a refused query). 127.255.255.0/24 are error codes;
# Spamhaus answers these three instead of a listing when it will not answer the query
# (https://www.spamhaus.org/faqs/domain-blocklist/#291). None of them says anything about
# the IP: unknown, never "listed" (a listing pauses a warming IP), never "not listed".
_ERROR_CODES = {
    "127.255.255.252": "typing error in the zone name (check preflight.dnsbl_zones)",
    "127.255.255.254": "query refused (public resolver?); ask through your own resolver "
    "(dns.nameservers), not a public one",
    "127.255.255.255": "excessive number of queries; ask through your own resolver "
    "(dns.nameservers), not a shared public one",
}
_LOOPBACK = ipaddress.ip_network("127.0.0.0/8")
_ERRORS = ipaddress.ip_network("127.255.255.0/24")
_NOT_LISTINGS = {ipaddress.IPv4Address("127.0.0.0"), ipaddress.IPv4Address("127.0.0.1")}


def dnsbl_name(ip: IPAddress, zone: str) -> str:
    """The name to ask: the address reversed (octets, or nibbles for IPv6) under the zone."""
    reversed_ip = ip.reverse_pointer.removesuffix(".in-addr.arpa").removesuffix(".ip6.arpa")
    return f"{reversed_ip}.{zone.strip().rstrip('.').lower()}"


def _not_a_listing(value: str) -> str | None:
    """Why one A value of a blocklist's answer is not a listing, or None when it is one."""
    try:
        code = ipaddress.IPv4Address(value)
    except ValueError:
        return "not a listing (not an IPv4 address)"
    if code in _ERRORS:
        return _ERROR_CODES.get(
            value, "an error code of the list (127.255.255.0/24), not a listing"
        )
    if code in _NOT_LISTINGS:
        return (
            "not a listing (RFC 5782: listings are 127.0.0.2 and above; some lists answer "
            "127.0.0.1 to a refused query)"
        )
    if code not in _LOOPBACK:
        return "not a listing (outside 127.0.0.0/8: a resolver rewriting NXDOMAIN?)"
    return None


def classify_dnsbl(
    answer: Lookup, reasons: Lookup | None = None, *, zone: str = "the list"
) -> tuple[Outcome, str]:
    """A blocklist's answer: NXDOMAIN is "not listed"; listing codes only (127.0.0.2 and
    above) are "listed", with the TXT reason if any; any other answer (an error code,
    127.0.0.1, an address outside 127.0.0.0/8) or no answer is unknown, with the zone and
    the code: a wrong "listed" would pause a warming IP, a wrong "not listed" hide one."""
    if isinstance(answer, Failed):
        return Outcome.UNKNOWN, f"no answer ({answer.reason})"
    if isinstance(answer, Missing):
        return Outcome.PASS, "not listed"
    for value in answer.values:
        why = _not_a_listing(value)
        if why is not None:
            reason = f"{zone} answered {value}: {why}"
            if len(answer.values) > 1:
                reason += f" (the whole answer: {', '.join(answer.values)})"
            return Outcome.UNKNOWN, reason
    why = "; ".join(reasons.values) if isinstance(reasons, Found) else "no TXT reason given"
    return Outcome.FAIL, f"listed ({', '.join(answer.values)}): {why}"


async def dnsbl_check(dns: DnsClient, ip: IPAddress, zone: str, skip: Skip | None) -> Check:
    """``dnsbl:ZONE`` of an IP: its A record under the zone, and the TXT reason of a
    listing. ``skip``: not asked, and why (the address means nothing to public DNS)."""
    check = f"dnsbl:{zone}"
    if skip is not None:
        return Check.skipped(str(ip), check, skip)
    name = dnsbl_name(ip, zone)
    answer = await dns.query(name, "A")
    reasons = None
    if isinstance(answer, Found) and not any(map(_not_a_listing, answer.values)):
        reasons = await dns.query(name, "TXT")  # only a listing has a reason
    outcome, reason = classify_dnsbl(answer, reasons, zone=zone)
    return Check(str(ip), check, outcome, reason)
