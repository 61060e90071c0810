"""The DNS client of a preflight run, and what its lookups came to.

Checks must tell "no" from "no answer": NXDOMAIN or NODATA (``Missing``) can fail a
check, a timeout, SERVFAIL or REFUSED (``Failed``) only makes it unknown. So a lookup
returns a value (``Found | Missing | Failed``), never raises. And when not one query was
answered (a dead resolver, or one that does not serve this host) every DNS check is
unknown, which must not read as "nothing wrong": ``DnsStats`` counts the answers and
says so in one line.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import dns.asyncresolver
import dns.exception
import dns.name
import dns.nameserver
import dns.resolver


@dataclass(frozen=True)
class Found:
    """Records of the asked type, as text (TXT strings joined; host names lower case)."""

    values: tuple[str, ...]


@dataclass(frozen=True)
class Missing:
    """No such records: NXDOMAIN (``nxdomain``) or the name exists without them (NODATA)."""

    nxdomain: bool


@dataclass(frozen=True)
class Failed:
    """No answer: a timeout, SERVFAIL, a refused or malformed query. Never a "no".
    ``kind`` sums it up for ``DnsStats``: "timed out", the rcode ("REFUSED", "SERVFAIL")
    or "failed"."""

    reason: str
    kind: str = "failed"


Lookup = Found | Missing | Failed


def _name_text(name: dns.name.Name) -> str:
    return "" if name == dns.name.root else name.to_text(omit_final_dot=True).lower()


def _rdata_text(rdata: Any) -> str:
    if hasattr(rdata, "strings"):  # TXT: one record may be split into several strings
        return b"".join(rdata.strings).decode("utf-8", "replace")
    if hasattr(rdata, "exchange"):  # MX
        return _name_text(rdata.exchange)
    if hasattr(rdata, "target"):  # PTR
        return _name_text(rdata.target)
    return str(rdata.to_text())


def _no_nameservers(question: str, exc: dns.resolver.NoNameservers) -> Failed:
    """Every nameserver gave up on the question: say what they answered (REFUSED,
    SERVFAIL) when they all said the same, as that is what an operator can act on."""
    said = [e[3] for e in exc.kwargs.get("errors") or []]  # an rcode's text, or an exception
    if said and all(isinstance(x, str) for x in said) and len(set(said)) == 1:
        return Failed(f"{question}: the nameservers answered {said[0]}", str(said[0]))
    return Failed(f"{question}: the nameservers failed ({exc})")


def _server_text(ns: object) -> str:
    if isinstance(ns, dns.nameserver.Do53Nameserver):
        host, port = ns.address, ns.port
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return str(ns)


@dataclass(frozen=True)
class DnsStats:
    """How the run's lookups went. When not one answer arrived (a dead or refusing
    resolver) every DNS check is unknown, which must not read as "nothing wrong"."""

    servers: tuple[str, ...]  # host:port as asked
    system: bool  # the system's resolver (dns.nameservers is empty)
    queries: int
    answered: int  # an answer, NXDOMAIN included; not a timeout, SERVFAIL or REFUSED
    failures: tuple[tuple[str, int], ...] = ()  # (kind: "timed out", an rcode, "failed"), count
    example: str = ""  # one failure's reason, for "failed"

    @property
    def error(self) -> str | None:
        """One line saying that no DNS check could be made, or None when some could."""
        if not self.queries or self.answered:
            return None
        where = ", ".join(self.servers)
        if self.system:  # /etc/resolv.conf's, which may be what the operator forgot
            where = (
                f"the system resolver {where}" if where else "a system resolver without nameservers"
            )
        if len(self.failures) == 1:
            kind = self.failures[0][0]
            if kind == "timed out":
                why = "every query timed out"
            elif kind == "failed":
                why = f"every query failed: {self.example}"
            else:
                why = f"every query was answered {kind}"
        else:
            why = "every query failed: " + ", ".join(
                f"{n} {kind if kind in ('timed out', 'failed') else 'answered ' + kind}"
                for kind, n in self.failures
            )
        return f"no DNS answers from {where} ({why}): nothing in DNS was checked"

    def to_json(self) -> dict[str, Any]:
        return {
            "servers": list(self.servers),
            "queries": self.queries,
            "answered": self.answered,
            "error": self.error,
        }


class DnsClient:
    """dnspython on the configured nameservers (the system's when none are), each lookup
    bounded by ``timeout_s``; answers are values, and each (name, type) is asked once per
    client (one client per run), however many checks need it."""

    def __init__(self, nameservers: Sequence[tuple[str, int]], timeout_s: float) -> None:
        self._system = not nameservers
        if nameservers:
            self._resolver = dns.asyncresolver.Resolver(configure=False)
            self._resolver.nameservers = [
                dns.nameserver.Do53Nameserver(h, p) for h, p in nameservers
            ]
        else:
            try:
                self._resolver = dns.asyncresolver.Resolver()
            except dns.resolver.NoResolverConfiguration:  # no /etc/resolv.conf: all unknown
                self._resolver = dns.asyncresolver.Resolver(configure=False)
        self._resolver.lifetime = timeout_s
        self._resolver.timeout = min(timeout_s, 2.0)  # retried within the lifetime
        self._asked: dict[tuple[str, str], asyncio.Task[Lookup]] = {}

    async def query(self, name: str, rdtype: str) -> Lookup:
        key = (name.strip().rstrip(".").lower(), rdtype)
        task = self._asked.get(key)
        if task is None:
            task = self._asked[key] = asyncio.ensure_future(self._ask(*key))
        return await asyncio.shield(task)

    async def _ask(self, name: str, rdtype: str) -> Lookup:
        try:
            qname = dns.name.from_text(name)
            answer = await self._resolver.resolve(qname, rdtype, raise_on_no_answer=False)
        except dns.resolver.NXDOMAIN:
            return Missing(nxdomain=True)
        except dns.resolver.LifetimeTimeout:
            return Failed(f"{rdtype} {name}: no answer within the timeout", "timed out")
        except dns.resolver.NoNameservers as exc:
            return _no_nameservers(f"{rdtype} {name}", exc)
        except (dns.exception.DNSException, OSError) as exc:
            return Failed(f"{rdtype} {name}: {exc}")
        if answer.rrset is None:
            return Missing(nxdomain=False)
        return Found(tuple(_rdata_text(r) for r in answer.rrset))

    def stats(self) -> DnsStats:
        """What the lookups so far came to (each (name, type) counted once)."""
        lookups = [
            t.result()
            for t in self._asked.values()
            if t.done() and not t.cancelled() and t.exception() is None
        ]
        failed = [x for x in lookups if isinstance(x, Failed)]
        kinds: dict[str, int] = {}
        for f in failed:
            kinds[f.kind] = kinds.get(f.kind, 0) + 1
        return DnsStats(
            servers=tuple(_server_text(ns) for ns in self._resolver.nameservers),
            system=self._system,
            queries=len(lookups),
            answered=len(lookups) - len(failed),
            failures=tuple(kinds.items()),
            example=failed[0].reason if failed else "",
        )

    async def close(self) -> None:
        for task in self._asked.values():
            task.cancel()
        await asyncio.gather(*self._asked.values(), return_exceptions=True)
