"""An IP's own identity: can it be bound on this host, does it have a PTR record, is the
PTR name its ``helo``, and does that name resolve back to it (forward-confirmed reverse
DNS)?

Gmail, Microsoft and Yahoo refuse or junk mail from an IP without these, whatever its
volume; and an address that cannot be bound here will never send (``bind`` needs no DNS).
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Callable, Sequence

from warmrelay.config import IPAddress, IPConfig
from warmrelay.mail.preflight.dns import DnsClient, Failed, Found, Missing
from warmrelay.mail.preflight.report import Check, Outcome, Skip

# the checks that hang on the PTR answer: one missing or unanswered PTR settles all three
_PTR_CHECKS = ("ptr", "helo", "fcrdns")


async def identity_checks(
    dns: DnsClient,
    ip: IPConfig,
    *,
    bind: Callable[[IPAddress], OSError | None],
    skip: Skip | None,
) -> list[Check]:
    """bind, ptr, helo (PTR name = helo), fcrdns (that name resolves back to the IP).
    ``bind`` says why the address cannot be bound here (None: it can); ``skip``: the DNS
    checks are not asked, and why."""
    address, subject = ip.address, str(ip.address)
    unbound = bind(address)
    checks = [
        Check(subject, "bind", Outcome.PASS, "can be bound on this host")
        if unbound is None
        else Check(
            subject,
            "bind",
            Outcome.FAIL,
            f"cannot be bound on this host ({unbound.strerror}); run preflight on the sending host",
        )
    ]
    if skip is not None:
        return checks + [Check.skipped(subject, c, skip) for c in _PTR_CHECKS]
    reverse = address.reverse_pointer
    answer = await dns.query(reverse, "PTR")
    if isinstance(answer, Failed):
        why = f"no answer ({answer.reason})"
        return checks + [Check(subject, c, Outcome.UNKNOWN, why) for c in _PTR_CHECKS]
    names = [n for n in answer.values if n] if isinstance(answer, Found) else []
    if not names:
        why = f"no PTR record at {reverse}"
        return checks + [Check(subject, c, Outcome.FAIL, why) for c in _PTR_CHECKS]
    checks.append(Check(subject, "ptr", Outcome.PASS, f"PTR {', '.join(names)}"))
    helo = ip.helo.rstrip(".").lower()
    if helo in names:
        checks.append(Check(subject, "helo", Outcome.PASS, f"PTR name is the helo {ip.helo}"))
    else:
        checks.append(
            Check(
                subject,
                "helo",
                Outcome.FAIL,
                f"PTR is {', '.join(names)} but the helo is {ip.helo}: make them the same",
            )
        )
    checks.append(await _fcrdns(dns, address, names))
    return checks


async def _fcrdns(dns: DnsClient, address: IPAddress, names: Sequence[str]) -> Check:
    """Pass when one of the PTR names has an A (AAAA) record that is the address."""
    rdtype = "A" if address.version == 4 else "AAAA"
    lookups = await asyncio.gather(*(dns.query(n, rdtype) for n in names))
    seen: list[str] = []
    failed: list[str] = []
    for name, lookup in zip(names, lookups, strict=True):
        if isinstance(lookup, Found):
            if any(_same_ip(v, address) for v in lookup.values):
                return Check(
                    str(address), "fcrdns", Outcome.PASS, f"{name} resolves back to {address}"
                )
            seen.append(f"{name} -> {', '.join(lookup.values)}")
        elif isinstance(lookup, Missing):
            seen.append(f"{name} has no {rdtype} record")
        else:
            failed.append(lookup.reason)
    if failed:
        return Check(str(address), "fcrdns", Outcome.UNKNOWN, f"no answer ({'; '.join(failed)})")
    return Check(
        str(address),
        "fcrdns",
        Outcome.FAIL,
        f"the PTR name does not resolve back to {address} ({'; '.join(seen)})",
    )


def _same_ip(text: str, address: IPAddress) -> bool:
    try:
        return ipaddress.ip_address(text) == address
    except ValueError:
        return False
