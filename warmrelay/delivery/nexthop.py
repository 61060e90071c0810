"""Next-hop resolution: the ordered addresses to try for a recipient domain.

A configured route wins over DNS. Otherwise the MX records decide (RFC 5321 §5.1), with the
implicit MX (the domain's own A/AAAA) when there are none, and null MX (RFC 7505) as a bounce.
The result is one flat list so the dispatcher simply fails over entry by entry.
"""

from __future__ import annotations

import asyncio
import functools
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import dns.asyncresolver
import dns.exception
import dns.inet
import dns.name
import dns.nameserver
import dns.resolver
from dns.rdtypes.ANY.MX import MX

from warmrelay.errors import NextHopError


@dataclass(frozen=True)
class NextHop:
    """One address to connect to; ``mx`` is kept so later stages can recognise the provider.

    For an implicit MX, ``mx`` is the domain itself (it is the mail host); for routes it is None.
    """

    host: str
    address: str
    port: int
    mx: str | None
    preference: int


@functools.lru_cache(maxsize=4096)  # per recipient on the delivery path; dnspython is slow
def normalize_domain(domain: str) -> str:
    """Lower-case A-label form without the trailing dot, so routes and cache keys always match."""
    try:
        name = dns.name.from_text(domain.strip().lower())
    except dns.exception.DNSException as exc:
        raise NextHopError(f"invalid domain {domain!r}: {exc}", permanent=True) from exc
    if name == dns.name.root:
        raise NextHopError(f"invalid domain {domain!r}", permanent=True)
    return name.to_text(omit_final_dot=True).lower()


class NextHopResolver:
    """Finds next hops for domains, with a small positive cache.

    Only successful results are cached, for the smallest TTL of the records used, so a
    failure is retried with fresh DNS answers on the next attempt. ``timeout_s`` bounds each
    DNS lookup. Nameservers must be IP literals (we cannot resolve the resolver).
    """

    def __init__(
        self,
        *,
        routes: Mapping[str, tuple[str, int]],
        nameservers: Sequence[tuple[str, int]] = (),
        timeout_s: float = 5.0,
        mx_port: int = 25,
        cache_max_entries: int = 10000,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self._routes = {k if k == "*" else normalize_domain(k): v for k, v in routes.items()}
        self._mx_port = mx_port
        self._cache_max_entries = cache_max_entries
        self._clock = clock
        self._rng = rng or random.Random()
        self._cache: dict[str, tuple[float, list[NextHop]]] = {}
        if nameservers:
            for host, _ in nameservers:
                if not dns.inet.is_address(host):
                    raise ValueError(f"nameserver {host!r} is not an IP address")
            self._resolver = dns.asyncresolver.Resolver(configure=False)
            self._resolver.nameservers = [
                dns.nameserver.Do53Nameserver(h, p) for h, p in nameservers
            ]
        else:
            self._resolver = dns.asyncresolver.Resolver()
        self._resolver.lifetime = timeout_s
        # Several tries per lookup, so one lost UDP datagram does not cost the whole budget.
        self._resolver.timeout = min(timeout_s, 2.0)

    async def resolve(self, domain: str) -> list[NextHop]:
        """Addresses to try in order; NextHopError.permanent tells a bounce from a retry."""
        name = normalize_domain(domain)
        cached = self._cache.get(name)
        if cached is not None and cached[0] > self._clock():
            return self._order(cached[1])
        hops, ttl = await self._lookup(name)
        if ttl > 0 and self._cache_max_entries > 0:
            self._cache.pop(name, None)
            while len(self._cache) >= self._cache_max_entries:
                # Oldest insertion first: cheap, and close to soonest expiry.
                del self._cache[next(iter(self._cache))]
            self._cache[name] = (self._clock() + ttl, hops)
        return self._order(hops)

    def _order(self, hops: list[NextHop]) -> list[NextHop]:
        """Shuffle hosts of equal preference on every call (RFC 5321 §5.1) to spread load."""
        groups: dict[tuple[int, str], list[NextHop]] = {}
        for hop in hops:
            groups.setdefault((hop.preference, hop.host), []).append(hop)
        keys = list(groups)
        self._rng.shuffle(keys)
        keys.sort(key=lambda k: k[0])  # stable: keeps the shuffle within a preference
        return [hop for key in keys for hop in groups[key]]

    async def _lookup(self, name: str) -> tuple[list[NextHop], float]:
        route = self._routes.get(name) or self._routes.get("*")
        if route is not None:
            host, port = route
            if dns.inet.is_address(host):
                return [NextHop(host, host, port, None, 0)], 0.0  # nothing to cache
            try:
                addresses, ttl = await self._addresses(host)
            except NextHopError as exc:
                # A broken route is the operator's to fix: keep the mail queued meanwhile.
                raise NextHopError(f"route for {name}: {exc}", permanent=False) from exc
            return [NextHop(host, a, port, None, 0) for a in addresses], ttl
        try:
            answer = await self._query(name, "MX")
        except dns.resolver.NXDOMAIN as exc:
            raise NextHopError(f"{name}: no such domain", permanent=True) from exc
        if answer.rrset is None:
            try:
                addresses, ttl = await self._addresses(name)
            except NextHopError as exc:
                raise NextHopError(f"{name} has no MX; {exc}", permanent=exc.permanent) from exc
            return [NextHop(name, a, self._mx_port, name, 0) for a in addresses], ttl
        records: list[MX] = list(answer.rrset)
        mxs = sorted({(r.preference, r.exchange) for r in records if r.exchange != dns.name.root})
        if not mxs:
            raise NextHopError(
                f"{name}: null MX: domain accepts no mail", permanent=True, status="5.1.10"
            )
        hosts = [(pref, exchange.to_text(omit_final_dot=True).lower()) for pref, exchange in mxs]
        results = await asyncio.gather(
            *(self._addresses(h) for _, h in hosts), return_exceptions=True
        )
        hops: list[NextHop] = []
        ttl = float(answer.chaining_result.minimum_ttl)
        for (pref, host), result in zip(hosts, results, strict=True):
            if isinstance(result, NextHopError):
                continue  # this MX host is unusable; the others may do
            if isinstance(result, BaseException):
                raise result
            ttl = min(ttl, result[1])
            hops += [NextHop(host, a, self._mx_port, host, pref) for a in result[0]]
        if not hops:
            names = ", ".join(h for _, h in hosts)
            raise NextHopError(f"{name}: no MX host resolves ({names})", permanent=False)
        return hops, ttl

    async def _addresses(self, host: str) -> tuple[list[str], float]:
        """IPv4 then IPv6 addresses of ``host`` and their smallest TTL.

        Uses whatever was found even if the other family failed. Raises a temporary
        NextHopError if nothing was found and a lookup failed, a permanent one if the host
        simply has no address.
        """
        answers = await asyncio.gather(
            self._query(host, "A"), self._query(host, "AAAA"), return_exceptions=True
        )
        addresses: list[str] = []
        ttl = float("inf")
        failure: NextHopError | None = None
        for answer in answers:
            if isinstance(answer, dns.resolver.NXDOMAIN):
                continue
            if isinstance(answer, NextHopError):
                failure = answer
                continue
            if isinstance(answer, BaseException):
                raise answer
            if answer.rrset is not None:
                addresses += [rdata.to_text() for rdata in answer.rrset]
                ttl = min(ttl, answer.chaining_result.minimum_ttl)
        if addresses:
            return addresses, ttl
        if failure is not None:
            raise failure
        raise NextHopError(f"{host} has no A or AAAA address", permanent=True)

    async def _query(self, name: str, rdtype: str) -> dns.resolver.Answer:
        """One lookup; NODATA gives an answer without rrset, NXDOMAIN is left to the caller."""
        try:
            return await self._resolver.resolve(
                dns.name.from_text(name), rdtype, raise_on_no_answer=False
            )
        except dns.resolver.NXDOMAIN:
            raise
        except (dns.exception.DNSException, OSError) as exc:
            raise NextHopError(
                f"DNS {rdtype} lookup of {name} failed: {exc}", permanent=False
            ) from exc
