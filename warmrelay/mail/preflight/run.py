"""One preflight run: every check of one configuration, concurrently, through one
``DnsClient`` of its own, gathered into a ``Report`` (per IP its identity checks then its
blocklists, then each signing domain's checks).

The run, not the checks, decides what is not asked at all (``Skip``): what public DNS
knows nothing of, when only the system resolver would be asked.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from itertools import chain

from warmrelay.config import Config, IPAddress, bind_error
from warmrelay.mail.preflight.bounces import bounce_domain_checks
from warmrelay.mail.preflight.dns import DnsClient
from warmrelay.mail.preflight.dnsbl import dnsbl_check
from warmrelay.mail.preflight.domain import domain_checks
from warmrelay.mail.preflight.identity import identity_checks
from warmrelay.mail.preflight.report import Check, Report, Skip

Clock = Callable[[], datetime]

BlocklistHook = Callable[[Sequence[Check]], Awaitable[None]]

# RFC 6761 / 2606: never delegated in public DNS, so nothing to ask the system resolver
SPECIAL_USE_TLDS = frozenset({"test", "example", "invalid", "localhost", "local"})


def _utc_now() -> datetime:
    return datetime.now(UTC)


class Preflight:
    """Every check of one configuration; I/O through ``DnsClient`` and ``bind``.

    A non-public source address (loopback, private, documentation) is asked about only
    through configured ``dns.nameservers``: public blocklists and reverse zones say nothing
    about it (several lists even answer "listed" for 127.0.0.2, their test entry)."""

    def __init__(
        self,
        config: Config,
        *,
        bind: Callable[[IPAddress], OSError | None] = bind_error,
        clock: Clock = _utc_now,
    ) -> None:
        self._config = config
        self._bind = bind
        self._clock = clock

    async def run(self, on_blocklists: BlocklistHook | None = None) -> Report:
        """Run every check concurrently. ``on_blocklists`` gets every blocklist result as
        soon as they are all in (the relay pauses listed warming IPs then, not later).
        Each run asks afresh, through a client of its own."""
        config = self._config
        started = self._clock()
        dns = DnsClient(config.dns.nameservers, config.preflight.timeout_s)
        try:
            blocklists, *rest = await asyncio.gather(
                self._blocklists(dns, on_blocklists),
                *(
                    identity_checks(dns, ip, bind=self._bind, skip=self._ip_skip(ip.address))
                    for ip in config.ips
                ),
                *(
                    domain_checks(dns, name, domain.keys, config.ips, self._domain_skip(name))
                    for name, domain in config.dkim.domains.items()
                ),
                *(
                    [
                        bounce_domain_checks(
                            dns,
                            config.bounces.domain,
                            config.ips,
                            config.smtp.hostname,
                            self._domain_skip(config.bounces.domain),
                        )
                    ]
                    if config.bounces is not None
                    else []
                ),
            )
        finally:
            await dns.close()
        identities, domains = rest[: len(config.ips)], rest[len(config.ips) :]
        by_ip: dict[str, list[Check]] = {str(ip.address): [] for ip in config.ips}
        for c in chain(*identities, blocklists):
            by_ip[c.subject].append(c)
        checks = [*chain(*by_ip.values()), *chain(*domains)]
        return Report(started, self._clock(), tuple(checks), dns=dns.stats())

    def _ip_skip(self, ip: IPAddress) -> Skip | None:
        """Why the IP's DNS checks are not asked, or None when they are."""
        if ip.is_global or self._config.dns.nameservers:
            return None
        return Skip.NOT_PUBLIC

    def _domain_skip(self, domain: str) -> Skip | None:
        """Why the domain's DNS checks are not asked, or None when they are."""
        tld = domain.rstrip(".").lower().rpartition(".")[2]
        if tld not in SPECIAL_USE_TLDS or self._config.dns.nameservers:
            return None
        return Skip.SPECIAL_USE

    async def _blocklists(self, dns: DnsClient, hook: BlocklistHook | None) -> list[Check]:
        checks = list(
            await asyncio.gather(
                *(
                    dnsbl_check(dns, ip.address, zone, self._ip_skip(ip.address))
                    for ip in self._config.ips
                    for zone in self._config.preflight.dnsbl_zones
                )
            )
        )
        if hook is not None:
            await hook(checks)
        return checks
