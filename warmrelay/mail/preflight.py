"""Preflight: is each sending IP and signing domain fit to send before (and while) warming?

Receivers judge a new IP by its DNS identity before they look at volume: a PTR
record whose name is the EHLO name and resolves back to the IP, no blocklist
entry, and for each signing domain an SPF record authorising the IP, the DKIM
key published at its selector and a DMARC record. A warmup that starts with one
of these missing burns the IP's first days. This module checks them all.

Layout: pure parts (SPF parsing and macros, the classification of blocklist
answers, DKIM and DMARC records) take values and return outcomes; the DNS
lookups go through one small client (``DnsClient``, dnspython on
``dns.nameservers`` with ``preflight.timeout_s``) whose answers are values too
(``Found | Missing | Failed``); ``Preflight`` runs everything concurrently;
``RelayPreflight`` is the relay's side (run at start, ``GET /preflight``,
metrics, pausing a listed warming IP).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import enum
import ipaddress
import logging
import re
import urllib.parse
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import dns.asyncresolver
import dns.exception
import dns.name
import dns.nameserver
import dns.resolver

from warmrelay.config import Config, IPAddress, IPConfig, bind_error
from warmrelay.mail.dkim import Algorithm, parse_private_key
from warmrelay.operate.api import json_page
from warmrelay.warmup.plan import WarmupState

if TYPE_CHECKING:
    from warmrelay.operate.metrics import Metrics
    from warmrelay.warmup.router import Router

log = logging.getLogger("warmrelay.preflight")

Clock = Callable[[], datetime]


def _utc_now() -> datetime:
    return datetime.now(UTC)


# -- outcomes ---------------------------------------------------------------------------


class Outcome(enum.Enum):
    """What a check found. Unknown (no answer, a refused query) never fails a run:
    only what is known to hurt delivery does."""

    PASS = "pass"
    FAIL = "fail"
    UNKNOWN = "unknown"

    @property
    def gauge(self) -> int | None:
        """The value of warmrelay_preflight_ok: 1 pass, 0 fail; None (unknown): no series,
        warmrelay_preflight_unknown says so instead."""
        return {Outcome.PASS: 1, Outcome.FAIL: 0, Outcome.UNKNOWN: None}[self]


class Skip(enum.Enum):
    """Why a check was not made at all (its subject means nothing to public DNS). The
    operator needs that once per run, not once per check: ``Report.notes``."""

    NOT_PUBLIC = ("is not a public address", "are not public addresses")
    SPECIAL_USE = (
        "is under a special-use top-level domain",
        "are under special-use top-level domains",
    )

    def says(self, subjects: Sequence[str]) -> str:
        one, many = self.value
        return f"{subjects[0]} {one}" if len(subjects) == 1 else f"{', '.join(subjects)} {many}"


@dataclass(frozen=True)
class Check:
    """One check of one subject (an IP address or a signing domain), with its reason.

    ``check`` names: ``bind``, ``ptr``, ``helo``, ``fcrdns``, ``dnsbl:ZONE`` (per IP);
    ``spf:IP``, ``dkim:SELECTOR``, ``dmarc`` (per signing domain). ``skip``: the check was
    not made (unknown) because of what its subject is, not because DNS did not answer."""

    subject: str
    check: str
    outcome: Outcome
    reason: str
    skip: Skip | None = None

    def to_json(self) -> dict[str, str]:
        return {
            "subject": self.subject,
            "check": self.check,
            "result": self.outcome.value,
            "reason": self.reason,
        }


# how the notes name a check: "PTR, helo, FCrDNS and DNSBL checks skipped"
_FAMILIES = {
    "ptr": "PTR",
    "helo": "helo",
    "fcrdns": "FCrDNS",
    "dnsbl": "DNSBL",
    "spf": "SPF",
    "dkim": "DKIM",
    "dmarc": "DMARC",
}


def _and(words: Sequence[str]) -> str:
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} and {words[-1]}"


def skip_notes(checks: Sequence[Check]) -> list[str]:
    """One line per kind of skip, naming every subject and the checks skipped for it; the
    checks' own rows say the same thing a dozen times."""
    subjects: dict[Skip, dict[str, None]] = {}
    families: dict[Skip, dict[str, None]] = {}
    for c in checks:
        if c.skip is not None:
            subjects.setdefault(c.skip, {})[c.subject] = None
            family = c.check.partition(":")[0]
            families.setdefault(c.skip, {})[_FAMILIES.get(family, family)] = None
    notes = []
    for skip, names in subjects.items():
        them = "it" if len(names) == 1 else "them"
        notes.append(
            f"{skip.says(list(names))}: {_and(list(families[skip]))} checks skipped (public "
            f"DNS knows nothing of {them}; set dns.nameservers to ask your own)"
        )
    return notes


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


@dataclass(frozen=True)
class Report:
    """The results of one run. Every failed check hurts delivery (a receiver would hold it
    against the IP or the domain); ``ok`` is false as soon as one failed, or when no DNS
    answer arrived at all (nothing in DNS was checked: ``unchecked`` says why)."""

    started: datetime
    finished: datetime
    checks: tuple[Check, ...]
    paused: tuple[str, ...] = ()  # warming IPs this run paused (the relay only)
    dns: DnsStats | None = None

    @property
    def ok(self) -> bool:
        return not self.failed and self.unchecked is None

    @property
    def failed(self) -> list[Check]:
        return [c for c in self.checks if c.outcome is Outcome.FAIL]

    @property
    def unchecked(self) -> str | None:
        return None if self.dns is None else self.dns.error

    def counts(self) -> dict[str, int]:
        return {o.value: sum(c.outcome is o for c in self.checks) for o in Outcome}

    def notes(self) -> list[str]:
        return skip_notes(self.checks)

    def shown(self) -> list[Check]:
        """The checks worth a row (or a log line) of their own: not the skipped ones (a note
        says it once), nor, when no DNS answer arrived at all, every "no answer" (one line
        says it)."""
        return [
            c
            for c in self.checks
            if c.skip is None and not (self.unchecked and c.outcome is Outcome.UNKNOWN)
        ]

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "started": self.started.isoformat(),
            "finished": self.finished.isoformat(),
            "counts": self.counts(),
            "checks": [c.to_json() for c in self.checks],
            "paused": list(self.paused),
            "dns": None if self.dns is None else self.dns.to_json(),
        }

    def table(self) -> str:
        """For people: one row per check made, a note per kind of skipped check, then what
        to make of it."""
        rows = [("SUBJECT", "CHECK", "RESULT", "REASON")]
        rows += [(c.subject, c.check, c.outcome.value, c.reason) for c in self.shown()]
        widths = [max(len(r[i]) for r in rows) for i in range(3)]
        lines = [
            "  ".join([*(c.ljust(w) for c, w in zip(r[:3], widths, strict=True)), r[3]])
            for r in rows
        ]
        lines += ["", *self.notes()] if self.notes() else []
        n = self.counts()
        fix = ": each failure hurts delivery; fix it before warming"
        if self.unchecked:
            lines += ["", f"preflight: {self.unchecked}"]
            if n["fail"]:
                lines.append(f"{n['fail']} failed{fix}")
            return "\n".join(lines)
        skipped = sum(c.skip is not None for c in self.checks)
        advice = ""
        if n["fail"]:
            advice = fix
        elif n["unknown"] > skipped:  # asking again changes nothing for a skipped check
            advice = ": unknown is not a failure (no answer, or not asked); check again later"
        unknown = f"{n['unknown']} unknown" + (f" ({skipped} skipped)" if skipped else "")
        lines += ["", f"{n['fail']} failed, {unknown}, {n['pass']} passed{advice}"]
        return "\n".join(lines)


# -- DNS ----------------------------------------------------------------------------------


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


# -- blocklists ---------------------------------------------------------------------------

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


# -- SPF (RFC 7208) -------------------------------------------------------------------------


class SpfResult(enum.Enum):
    PASS = "pass"
    FAIL = "fail"
    SOFTFAIL = "softfail"
    NEUTRAL = "neutral"
    NONE = "none"
    PERMERROR = "permerror"
    TEMPERROR = "temperror"


@dataclass(frozen=True)
class SpfVerdict:
    """The result of check_host() and which term (through which includes) decided it."""

    result: SpfResult
    reason: str


class SpfSyntaxError(ValueError):
    """A record receivers cannot parse: permerror."""


_QUALIFIERS = {
    "+": SpfResult.PASS,
    "-": SpfResult.FAIL,
    "~": SpfResult.SOFTFAIL,
    "?": SpfResult.NEUTRAL,
}
_MECHANISMS = {"all", "include", "a", "mx", "ptr", "ip4", "ip6", "exists"}
_MACRO_STRING = re.compile(r"(?:%\{[slodiphcrtv]\d*r?[.\-+,/_=]*\}|%%|%_|%-|[!-$&-~])*", re.I)
_MACRO = re.compile(r"([a-z])(\d*)(r?)([.\-+,/_=]*)", re.I)
_MODIFIER = re.compile(r"([a-z][a-z0-9\-_.]*)=(.*)", re.I)
_DUAL_CIDR = re.compile(r"(.*?)(?:/(\d+))?(?://(\d+))?")
_DNS_TERMS = 10  # RFC 7208 4.6.4: include, a, mx, ptr, exists, redirect
_VOID_LOOKUPS = 2
_MX_NAMES = 10


@dataclass(frozen=True)
class Mechanism:
    """One directive: ``qualifier`` is the result when it matches; ``target`` is the
    domain-spec (macros unexpanded) or the network of ip4/ip6."""

    text: str
    qualifier: SpfResult
    name: str
    target: str | None = None
    cidr4: int | None = None
    cidr6: int | None = None


@dataclass(frozen=True)
class SpfRecord:
    mechanisms: tuple[Mechanism, ...]
    redirect: str | None = None


def is_spf(text: str) -> bool:
    return text[:6].lower() == "v=spf1" and (len(text) == 6 or text[6] == " ")


def _domain_spec(value: str, term: str) -> str:
    if not value or not _MACRO_STRING.fullmatch(value):
        raise SpfSyntaxError(f"'{term}': not a valid domain")
    return value


def _cidr(value: str | None, top: int, term: str) -> int | None:
    if value is None:
        return None
    if not value.isdigit() or int(value) > top:
        raise SpfSyntaxError(f"'{term}': prefix length must be 0-{top}")
    return int(value)


def _mechanism(term: str) -> Mechanism:
    qualifier = _QUALIFIERS.get(term[0])
    body = term[1:] if qualifier is not None else term
    name, colon, arg = body.partition(":")
    if "/" in name:  # a/24, mx//64
        name, slash, rest = name.partition("/")
        arg, colon = slash + rest, ""
    name = name.lower()
    qual = qualifier or SpfResult.PASS
    if name not in _MECHANISMS:
        raise SpfSyntaxError(f"'{term}': unknown mechanism")
    if name == "all":
        if colon or arg:
            raise SpfSyntaxError(f"'{term}': all takes no argument")
        return Mechanism(term, qual, name)
    if name in ("include", "exists"):
        return Mechanism(term, qual, name, _domain_spec(arg, term))
    if name == "ptr":
        return Mechanism(term, qual, name, _domain_spec(arg, term) if colon else None)
    if name in ("ip4", "ip6"):
        network, _, prefix = arg.partition("/")
        version = 4 if name == "ip4" else 6
        try:
            address = ipaddress.ip_address(network)
        except ValueError:
            raise SpfSyntaxError(f"'{term}': not an IPv{version} address") from None
        if address.version != version:
            raise SpfSyntaxError(f"'{term}': not an IPv{version} address")
        cidr = _cidr(prefix if prefix else None, 32 if version == 4 else 128, term)
        if version == 4:
            return Mechanism(term, qual, name, str(address), cidr4=cidr)
        return Mechanism(term, qual, name, str(address), cidr6=cidr)
    m = _DUAL_CIDR.fullmatch(arg)  # a, mx: [:domain][/cidr4][//cidr6]
    assert m is not None  # the pattern matches any text
    spec, c4, c6 = m.groups()
    if colon and not spec:
        raise SpfSyntaxError(f"'{term}': not a valid domain")
    if not colon and spec:
        raise SpfSyntaxError(f"'{term}': unknown mechanism")
    return Mechanism(
        term,
        qual,
        name,
        _domain_spec(spec, term) if spec else None,
        _cidr(c4, 32, term),
        _cidr(c6, 128, term),
    )


def parse_spf(text: str) -> SpfRecord:
    """A "v=spf1 ..." record as data; raises SpfSyntaxError where receivers would say
    permerror (unknown mechanisms, bad networks or domains, a repeated redirect)."""
    if not is_spf(text):
        raise SpfSyntaxError("not an SPF record (no v=spf1)")
    mechanisms: list[Mechanism] = []
    redirect: str | None = None
    seen: set[str] = set()
    for term in text[6:].split():
        modifier = _MODIFIER.fullmatch(term)
        if modifier is not None:
            name, value = modifier.group(1).lower(), modifier.group(2)
            if name in ("redirect", "exp"):
                if name in seen:
                    raise SpfSyntaxError(f"'{name}=' given twice")
                seen.add(name)
                spec = _domain_spec(value, term)
                if name == "redirect":
                    redirect = spec
            elif not _MACRO_STRING.fullmatch(value):
                raise SpfSyntaxError(f"'{term}': bad modifier value")
            continue  # unknown modifiers are ignored (RFC 7208 6)
        mechanisms.append(_mechanism(term))
    return SpfRecord(tuple(mechanisms), redirect)


@dataclass(frozen=True)
class MacroContext:
    """What SPF macros expand to (RFC 7208 7.2)."""

    ip: IPAddress
    sender: str  # the envelope sender: local@domain
    domain: str  # the domain whose record is being evaluated
    helo: str


def _ip_macro(ip: IPAddress) -> str:
    if ip.version == 4:
        return str(ip)
    return ".".join(ip.exploded.replace(":", ""))


def expand_macros(spec: str, ctx: MacroContext) -> str:
    """A domain-spec with its macros expanded, cut to 253 characters from the left."""
    out: list[str] = []
    i = 0
    local, _, sender_domain = ctx.sender.rpartition("@")
    values = {
        "s": ctx.sender,
        "l": local or "postmaster",
        "o": sender_domain,
        "d": ctx.domain,
        "i": _ip_macro(ctx.ip),
        "p": "unknown",  # validated names of the IP: not worth the lookups
        "v": "in-addr" if ctx.ip.version == 4 else "ip6",
        "h": ctx.helo,
    }
    while i < len(spec):
        c = spec[i]
        if c != "%":
            out.append(c)
            i += 1
            continue
        nxt = spec[i + 1 : i + 2]
        if nxt in ("%", "_", "-"):
            out.append({"%": "%", "_": " ", "-": "%20"}[nxt])
            i += 2
            continue
        end = spec.find("}", i)
        m = _MACRO.fullmatch(spec[i + 2 : end]) if nxt == "{" and end > 0 else None
        if m is None:
            raise SpfSyntaxError(f"bad macro in {spec!r}")
        letter, digits, reverse, delimiters = m.groups()
        value = values.get(letter.lower())
        if value is None:  # c, r, t: only allowed in exp=
            raise SpfSyntaxError(f"macro %{{{letter}}} is not allowed in a domain")
        parts = re.split(f"[{re.escape(delimiters)}]", value) if delimiters else value.split(".")
        if reverse:
            parts.reverse()
        if digits:
            if int(digits) == 0:
                raise SpfSyntaxError(f"bad macro in {spec!r}")
            parts = parts[-int(digits) :]
        text = ".".join(parts)
        out.append(urllib.parse.quote(text, safe="-._~") if letter.isupper() else text)
        i = end + 1
    expanded = "".join(out).rstrip(".")
    while len(expanded) > 253 and "." in expanded:
        expanded = expanded.split(".", 1)[1]
    return expanded


class _SpfAbort(Exception):
    """permerror or temperror: ends the whole evaluation."""

    def __init__(self, result: SpfResult, reason: str) -> None:
        super().__init__(reason)
        self.result = result
        self.reason = reason


class SpfEvaluation:
    """check_host() of RFC 7208 for one IP: includes, redirect, a, mx, ptr, exists, ip4,
    ip6, all, macros, the 10-lookup and 2-void-lookup limits."""

    def __init__(self, dns_client: DnsClient, ip: IPAddress, sender: str, helo: str) -> None:
        self._dns = dns_client
        self._ip = ip
        self._sender = sender
        self._helo = helo
        self._terms = 0
        self._voids = 0

    async def check(self, domain: str) -> SpfVerdict:
        try:
            return await self._check_host(domain, ())
        except _SpfAbort as exc:
            return SpfVerdict(exc.result, exc.reason)

    def _count_term(self) -> None:
        self._terms += 1
        if self._terms > _DNS_TERMS:
            raise _SpfAbort(
                SpfResult.PERMERROR,
                f"more than {_DNS_TERMS} DNS lookups (include, a, mx, ptr, exists, redirect): "
                "receivers stop there",
            )

    def _answer(self, lookup: Lookup, term: str) -> tuple[str, ...]:
        """Records of a lookup; no records is a void lookup (at most two are allowed)."""
        if isinstance(lookup, Failed):
            raise _SpfAbort(SpfResult.TEMPERROR, f"'{term}': {lookup.reason}")
        if isinstance(lookup, Missing):
            self._voids += 1
            if self._voids > _VOID_LOOKUPS:
                raise _SpfAbort(
                    SpfResult.PERMERROR,
                    f"more than {_VOID_LOOKUPS} lookups found nothing ('{term}' was one)",
                )
            return ()
        return lookup.values

    async def _addresses(self, host: str, term: str) -> tuple[str, ...]:
        rdtype = "A" if self._ip.version == 4 else "AAAA"
        return self._answer(await self._dns.query(host, rdtype), term)

    def _in(self, addresses: Sequence[str], cidr4: int | None, cidr6: int | None) -> bool:
        prefix = (cidr4 if cidr4 is not None else 32) if self._ip.version == 4 else None
        if prefix is None:
            prefix = cidr6 if cidr6 is not None else 128
        for text in addresses:
            with contextlib.suppress(ValueError):
                net = ipaddress.ip_network(f"{text}/{prefix}", strict=False)
                if net.version == self._ip.version and self._ip in net:
                    return True
        return False

    async def _check_host(self, domain: str, trail: tuple[str, ...]) -> SpfVerdict:
        lookup = await self._dns.query(domain, "TXT")
        if isinstance(lookup, Failed):
            raise _SpfAbort(SpfResult.TEMPERROR, lookup.reason)
        records = [t for t in lookup.values if is_spf(t)] if isinstance(lookup, Found) else []
        path = " -> ".join(trail)
        where = f"{domain}" + (f" (via {path})" if path else "")
        if not records:
            return SpfVerdict(SpfResult.NONE, f"no SPF record at {where}")
        if len(records) > 1:
            raise _SpfAbort(SpfResult.PERMERROR, f"{len(records)} SPF records at {where}")
        try:
            record = parse_spf(records[0])
        except SpfSyntaxError as exc:
            raise _SpfAbort(SpfResult.PERMERROR, f"{where}: {exc}") from None
        ctx = MacroContext(self._ip, self._sender, domain, self._helo)
        for mech in record.mechanisms:
            matched = await self._match(mech, ctx, (*trail, f"'{mech.text}' of {domain}"))
            if matched is not None:
                return SpfVerdict(mech.qualifier, matched)
        if record.redirect is not None:
            self._count_term()
            target = self._expand(record.redirect, ctx)
            verdict = await self._check_host(target, (*trail, f"'redirect={target}' of {domain}"))
            if verdict.result is SpfResult.NONE:
                raise _SpfAbort(SpfResult.PERMERROR, f"redirect={target}: {verdict.reason}")
            return verdict
        return SpfVerdict(SpfResult.NEUTRAL, f"no term of the record at {where} matches")

    def _expand(self, spec: str, ctx: MacroContext) -> str:
        try:
            return expand_macros(spec, ctx)
        except SpfSyntaxError as exc:
            raise _SpfAbort(SpfResult.PERMERROR, str(exc)) from None

    async def _match(
        self, mech: Mechanism, ctx: MacroContext, trail: tuple[str, ...]
    ) -> str | None:
        """None when the mechanism does not match, else the reason it did."""
        matched = " -> ".join(trail)
        name = mech.name
        if name == "all":
            return matched
        if name in ("ip4", "ip6"):
            assert mech.target is not None
            return matched if self._in([mech.target], mech.cidr4, mech.cidr6) else None
        self._count_term()
        target = (self._expand(mech.target, ctx) if mech.target else ctx.domain).lower()
        if name == "include":
            inner = await self._check_host(target, trail)
            if inner.result is SpfResult.NONE:
                raise _SpfAbort(SpfResult.PERMERROR, f"'{mech.text}': {inner.reason}")
            return inner.reason if inner.result is SpfResult.PASS else None
        if name == "a":
            found = await self._addresses(target, mech.text)
            return matched if self._in(found, mech.cidr4, mech.cidr6) else None
        if name == "exists":
            found = self._answer(await self._dns.query(target, "A"), mech.text)
            return matched if found else None
        if name == "mx":
            hosts = [h for h in self._answer(await self._dns.query(target, "MX"), mech.text) if h]
            if len(hosts) > _MX_NAMES:
                raise _SpfAbort(SpfResult.PERMERROR, f"'{mech.text}': more than 10 MX hosts")
            for host in hosts:
                if self._in(await self._addresses(host, mech.text), mech.cidr4, mech.cidr6):
                    return matched
            return None
        # ptr (deprecated, still seen): a validated name of the IP at or under the target
        names = await self._dns.query(self._ip.reverse_pointer, "PTR")
        if not isinstance(names, Found):
            return None  # errors here make the mechanism not match (RFC 7208 5.5)
        for host in names.values[:_MX_NAMES]:
            if host == target or host.endswith("." + target):
                rdtype = "A" if self._ip.version == 4 else "AAAA"
                back = await self._dns.query(host, rdtype)
                if isinstance(back, Found) and self._in(back.values, None, None):
                    return matched
        return None


def classify_spf(verdict: SpfVerdict) -> tuple[Outcome, str]:
    """Only pass is good for deliverability; temperror means "no answer now": unknown."""
    text = f"{verdict.result.value}: {verdict.reason}"
    if verdict.result is SpfResult.PASS:
        return Outcome.PASS, text
    if verdict.result is SpfResult.TEMPERROR:
        return Outcome.UNKNOWN, text
    return Outcome.FAIL, text


# -- DKIM -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class PublicKey:
    """Our public key as DKIM publishes it: ``k=`` and the ``p=`` bytes in each form
    receivers accept (RSA: SubjectPublicKeyInfo, or the bare RSAPublicKey some publish)."""

    kind: str  # rsa | ed25519
    forms: tuple[bytes, ...]
    note: str  # e.g. "RSA-2048"


def public_key(key_file: Path, algorithm: Algorithm) -> PublicKey:
    """The public half of a PEM private key file, checked as signing checks it
    (dkim.parse_private_key); raises OSError when unreadable, ValueError why not usable."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = parse_private_key(key_file.read_bytes(), key_file, algorithm)
    if isinstance(key, rsa.RSAPrivateKey):
        pub = key.public_key()
        spki = pub.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        pkcs1 = pub.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.PKCS1)
        return PublicKey("rsa", (spki, pkcs1), f"RSA-{key.key_size}")
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return PublicKey("ed25519", (raw,), "Ed25519")


def dkim_tags(text: str) -> dict[str, str]:
    """A DKIM key record's tags (tag=value; ...), names lower case, values stripped."""
    tags: dict[str, str] = {}
    for part in text.split(";"):
        name, eq, value = part.partition("=")
        if eq:
            tags.setdefault(name.strip().lower(), value.strip())
    return tags


def compare_dkim(name: str, records: Sequence[str], ours: PublicKey) -> tuple[Outcome, str]:
    """Whether the key record at ``name`` is exactly our key (else receivers fail our
    signatures): one record, DKIM1, our key type, our key bytes, not revoked."""
    keys = [dkim_tags(r) for r in records]
    keys = [t for t in keys if "p" in t]
    if not keys:
        return Outcome.FAIL, f"TXT at {name} is not a DKIM key (no p=)"
    if len(keys) > 1:
        return Outcome.FAIL, f"{len(keys)} DKIM keys at {name}: receivers may use either; keep one"
    tags = keys[0]
    if tags.get("v", "DKIM1") != "DKIM1":
        return Outcome.FAIL, f"v={tags['v']} at {name}: receivers ignore it (must be DKIM1)"
    kind = tags.get("k", "rsa").lower()
    if kind != ours.kind:
        return Outcome.FAIL, f"k={kind} at {name}, but key_file holds an {ours.note} key"
    p = re.sub(r"\s+", "", tags["p"])
    if not p:
        return Outcome.FAIL, f"the key at {name} is revoked (empty p=)"
    try:
        published = base64.b64decode(p, validate=True)
    except (binascii.Error, ValueError):
        return Outcome.FAIL, f"p= at {name} is not base64"
    if published not in ours.forms:
        return (
            Outcome.FAIL,
            f"the key at {name} is not the public key of key_file ({ours.note}): our "
            "signatures fail until DNS publishes this key",
        )
    testing = (
        " (t=y: testing mode, receivers may ignore failures)" if "y" in tags.get("t", "") else ""
    )
    return Outcome.PASS, f"{name} publishes our key ({ours.note}){testing}"


# -- DMARC ----------------------------------------------------------------------------------

_POLICIES = {"none", "quarantine", "reject"}


def dmarc_records(values: Sequence[str]) -> list[dict[str, str]]:
    out = []
    for text in values:
        tags = dkim_tags(text)  # same tag=value; syntax
        if tags.get("v", "").upper() == "DMARC1" and text.lstrip()[:2].lower() == "v=":
            out.append(tags)
    return out


def classify_dmarc(where: str, records: Sequence[dict[str, str]], sub: bool) -> tuple[Outcome, str]:
    """The policy of the record found at ``where`` (``sub``: it is the organizational
    domain's, whose sp= applies to the signing domain)."""
    if len(records) > 1:
        return Outcome.FAIL, f"{len(records)} DMARC records at {where}: receivers ignore them all"
    tags = records[0]
    p = tags.get("p", "").lower()
    if p not in _POLICIES:
        return Outcome.FAIL, f"the record at {where} has no valid p= (none, quarantine, reject)"
    policy = tags.get("sp", p).lower() if sub else p
    details = [f"p={p}"]
    if "sp" in tags:
        details.append(f"sp={tags['sp']}")
    if "pct" in tags:
        details.append(f"pct={tags['pct']}")
    text = f"{where}: {' '.join(details)}"
    if sub:
        text += f" (the organizational domain's record; {policy} applies here)"
    if policy == "none":
        text += "; monitoring only, nothing enforced"
    return Outcome.PASS, text


# -- the run ----------------------------------------------------------------------------------

BlocklistHook = Callable[[Sequence[Check]], Awaitable[None]]

# RFC 6761 / 2606: never delegated in public DNS, so nothing to ask the system resolver
SPECIAL_USE_TLDS = frozenset({"test", "example", "invalid", "localhost", "local"})


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
        self._dns = DnsClient(config.dns.nameservers, config.preflight.timeout_s)

    async def run(self, on_blocklists: BlocklistHook | None = None) -> Report:
        """Run every check concurrently. ``on_blocklists`` gets every blocklist result as
        soon as they are all in (the relay pauses listed warming IPs then, not later)."""
        started = self._clock()
        try:
            results = await asyncio.gather(
                self._blocklists(on_blocklists),
                *(self._identity(ip) for ip in self._config.ips),
                *(self._domain(d) for d in self._config.dkim.domains),
            )
        finally:
            await self._dns.close()
        by_ip: dict[str, list[Check]] = {str(ip.address): [] for ip in self._config.ips}
        for check in results[1 : 1 + len(self._config.ips)]:
            for c in check:
                by_ip[c.subject].append(c)
        for c in results[0]:
            by_ip[c.subject].append(c)
        checks = [c for cs in by_ip.values() for c in cs]
        checks += [c for cs in results[1 + len(self._config.ips) :] for c in cs]
        return Report(started, self._clock(), tuple(checks), dns=self._dns.stats())

    def _ask_about_ip(self, ip: IPAddress) -> bool:
        return ip.is_global or bool(self._config.dns.nameservers)

    def _ask_about_domain(self, domain: str) -> bool:
        tld = domain.rstrip(".").lower().rpartition(".")[2]
        return tld not in SPECIAL_USE_TLDS or bool(self._config.dns.nameservers)

    def _not_asked(self, subject: str, check: str, skip: Skip) -> Check:
        return Check(
            subject,
            check,
            Outcome.UNKNOWN,
            f"{skip.says([subject])}: not looked up in public DNS (set dns.nameservers to "
            "ask your own)",
            skip,
        )

    def _ip_not_asked(self, ip: IPAddress, check: str) -> Check:
        return self._not_asked(str(ip), check, Skip.NOT_PUBLIC)

    async def _blocklists(self, hook: BlocklistHook | None) -> list[Check]:
        async def one(ip: IPAddress, zone: str) -> Check:
            check = f"dnsbl:{zone}"
            if not self._ask_about_ip(ip):
                return self._ip_not_asked(ip, check)
            name = dnsbl_name(ip, zone)
            answer = await self._dns.query(name, "A")
            reasons = None
            if isinstance(answer, Found) and not any(map(_not_a_listing, answer.values)):
                reasons = await self._dns.query(name, "TXT")  # only a listing has a reason
            outcome, reason = classify_dnsbl(answer, reasons, zone=zone)
            return Check(str(ip), check, outcome, reason)

        checks = list(
            await asyncio.gather(
                *(
                    one(ip.address, zone)
                    for ip in self._config.ips
                    for zone in self._config.preflight.dnsbl_zones
                )
            )
        )
        if hook is not None:
            await hook(checks)
        return checks

    async def _identity(self, ip: IPConfig) -> list[Check]:
        """bind, ptr, helo (PTR name = helo), fcrdns (that name resolves back to the IP)."""
        address, subject = ip.address, str(ip.address)
        unbound = self._bind(address)
        checks = [
            Check(subject, "bind", Outcome.PASS, "can be bound on this host")
            if unbound is None
            else Check(
                subject,
                "bind",
                Outcome.FAIL,
                f"cannot be bound on this host ({unbound.strerror}); run preflight on the "
                "sending host",
            )
        ]
        if not self._ask_about_ip(address):
            return checks + [self._ip_not_asked(address, c) for c in ("ptr", "helo", "fcrdns")]
        reverse = address.reverse_pointer
        answer = await self._dns.query(reverse, "PTR")
        if isinstance(answer, Failed):
            why = f"no answer ({answer.reason})"
            return checks + [
                Check(subject, c, Outcome.UNKNOWN, why) for c in ("ptr", "helo", "fcrdns")
            ]
        names = [n for n in answer.values if n] if isinstance(answer, Found) else []
        if not names:
            why = f"no PTR record at {reverse}"
            return checks + [
                Check(subject, c, Outcome.FAIL, why) for c in ("ptr", "helo", "fcrdns")
            ]
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
        checks.append(await self._fcrdns(address, names))
        return checks

    async def _fcrdns(self, address: IPAddress, names: Sequence[str]) -> Check:
        rdtype = "A" if address.version == 4 else "AAAA"
        lookups = await asyncio.gather(*(self._dns.query(n, rdtype) for n in names))
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
            return Check(
                str(address), "fcrdns", Outcome.UNKNOWN, f"no answer ({'; '.join(failed)})"
            )
        return Check(
            str(address),
            "fcrdns",
            Outcome.FAIL,
            f"the PTR name does not resolve back to {address} ({'; '.join(seen)})",
        )

    async def _domain(self, domain: str) -> list[Check]:
        """SPF for every IP (any may carry the domain's mail), each DKIM key, DMARC."""
        keys = self._config.dkim.domains[domain].keys
        if not self._ask_about_domain(domain):
            what = Skip.SPECIAL_USE
            checks = [self._not_asked(domain, f"spf:{ip.address}", what) for ip in self._config.ips]
            for k in keys:  # the key file is still ours to check
                key = _our_key(domain, k.selector, k.key_file, k.algorithm)
                if not isinstance(key, Check):
                    key = self._not_asked(domain, f"dkim:{k.selector}", what)
                checks.append(key)
            return [*checks, self._not_asked(domain, "dmarc", what)]
        parts = await asyncio.gather(
            *(self._spf(domain, ip) for ip in self._config.ips),
            *(self._dkim(domain, k.selector, k.key_file, k.algorithm) for k in keys),
            self._dmarc(domain),
        )
        return list(parts)

    async def _spf(self, domain: str, ip: IPConfig) -> Check:
        evaluation = SpfEvaluation(self._dns, ip.address, f"postmaster@{domain}", ip.helo)
        outcome, reason = classify_spf(await evaluation.check(domain))
        return Check(domain, f"spf:{ip.address}", outcome, reason)

    async def _dkim(
        self, domain: str, selector: str, key_file: Path, algorithm: Algorithm
    ) -> Check:
        check, name = f"dkim:{selector}", f"{selector}._domainkey.{domain}"
        ours = _our_key(domain, selector, key_file, algorithm)
        if isinstance(ours, Check):
            return ours
        answer = await self._dns.query(name, "TXT")
        if isinstance(answer, Failed):
            return Check(domain, check, Outcome.UNKNOWN, f"no answer ({answer.reason})")
        if isinstance(answer, Missing):
            return Check(
                domain,
                check,
                Outcome.FAIL,
                f"no DKIM record at {name}: receivers cannot verify our signatures",
            )
        outcome, reason = compare_dkim(name, answer.values, ours)
        return Check(domain, check, outcome, reason)

    async def _dmarc(self, domain: str) -> Check:
        """_dmarc.DOMAIN, else the nearest parent's record (as receivers fall back to the
        organizational domain's), never the bare top-level domain."""
        labels = domain.rstrip(".").lower().split(".")
        for i in range(max(1, len(labels) - 1)):
            where = "_dmarc." + ".".join(labels[i:])
            answer = await self._dns.query(where, "TXT")
            if isinstance(answer, Failed):
                return Check(domain, "dmarc", Outcome.UNKNOWN, f"no answer ({answer.reason})")
            records = dmarc_records(answer.values) if isinstance(answer, Found) else []
            if records:
                outcome, reason = classify_dmarc(where, records, sub=i > 0)
                return Check(domain, "dmarc", outcome, reason)
        return Check(
            domain,
            "dmarc",
            Outcome.FAIL,
            f"no DMARC record at _dmarc.{domain}: bulk senders need one (p=none at least)",
        )


def _our_key(domain: str, selector: str, key_file: Path, algorithm: Algorithm) -> Check | PublicKey:
    """Our public key, or the failed check saying why there is none."""
    try:
        return public_key(key_file, algorithm)
    except OSError as exc:
        reason = f"cannot read key_file {key_file}: {exc.strerror}"
    except ValueError as exc:
        reason = str(exc)
    return Check(domain, f"dkim:{selector}", Outcome.FAIL, reason)


def _same_ip(text: str, address: IPAddress) -> bool:
    try:
        return ipaddress.ip_address(text) == address
    except ValueError:
        return False


# -- the relay's side ----------------------------------------------------------------------


class RelayPreflight:
    """Runs at start in the background (results in the log, ``GET /preflight`` and
    warmrelay_preflight_ok), and pauses a warming IP found on a blocklist
    (``preflight.pause_listed``) as soon as the blocklists answered. ``config`` and
    ``router`` are getters: a reload replaces both."""

    def __init__(
        self,
        config: Callable[[], Config],
        router: Callable[[], Router],
        metrics: Metrics,
        clock: Clock,
    ) -> None:
        self.config = config
        self.router = router
        self.metrics = metrics
        self.clock = clock
        self.latest: Report | None = None
        self._task: asyncio.Task[Report] | None = None

    async def start(self) -> None:
        """Begin a run when ``preflight.on_start``. Readiness waits only for the blocklist
        answers (at most ``preflight.timeout_s``), so a listed warming IP is paused before
        any mail flows; the other checks finish in the background."""
        config = self.config()
        if not config.preflight.on_start:
            return
        checked = asyncio.Event()
        self._task = self._begin(checked)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(checked.wait(), config.preflight.timeout_s)

    async def report(self) -> Report:
        """The latest results; the running run's, or a new run's when there are none."""
        if self.latest is not None:
            return self.latest
        if self._task is None or self._task.done():
            self._task = self._begin(asyncio.Event())
        return await asyncio.shield(self._task)

    async def page(self) -> tuple[int, str, bytes]:
        try:
            return json_page((await self.report()).to_json())
        except Exception as exc:  # a bug must not cost the admin endpoint its answer
            return json_page({"error": f"preflight failed: {exc}"}, 500)

    async def stop(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task

    def _begin(self, checked: asyncio.Event) -> asyncio.Task[Report]:
        task = asyncio.get_running_loop().create_task(self._run(checked))
        task.add_done_callback(_retrieve)
        return task

    async def _run(self, checked: asyncio.Event) -> Report:
        paused: list[str] = []

        async def listed(checks: Sequence[Check]) -> None:
            try:
                paused.extend(await self._pause_listed(checks))
            finally:
                checked.set()

        try:
            report = await Preflight(self.config(), clock=self.clock).run(listed)
        except Exception:
            log.exception("preflight: the run failed")
            raise
        finally:
            checked.set()
        report = replace(report, paused=tuple(paused))
        self.latest = report
        self._gauges(report)
        # one line per problem, not per check: a dead resolver or loopback IPs (as in the
        # example configuration) would otherwise bury the failures under identical lines
        if report.unchecked:
            log.warning("preflight: %s", report.unchecked)
        for c in report.shown():
            if c.outcome is not Outcome.PASS:
                level = logging.WARNING if c.outcome is Outcome.FAIL else logging.INFO
                log.log(
                    level, "preflight: %s %s %s: %s", c.subject, c.check, c.outcome.value, c.reason
                )
        for note in report.notes():
            log.info("preflight: %s", note)
        n = report.counts()
        log.info(
            "preflight: %d failed, %d unknown, %d passed (GET /preflight for details)",
            n["fail"],
            n["unknown"],
            n["pass"],
        )
        return report

    def _gauges(self, report: Report) -> None:
        gauge, unknown = self.metrics.preflight_ok, self.metrics.preflight_unknown
        gauge.clear()  # checks of IPs or domains no longer configured go away
        unknown.clear()
        for c in report.checks:
            value = c.outcome.gauge
            if value is not None:
                gauge.labels(c.subject, c.check).set(value)
            unknown.labels(c.subject, c.check).set(1 if value is None else 0)

    async def _pause_listed(self, checks: Sequence[Check]) -> list[str]:
        """Pause each warming IP found listed; never let it warm up silently."""
        listed: dict[str, list[Check]] = {}
        for c in checks:
            if c.outcome is Outcome.FAIL:
                listed.setdefault(c.subject, []).append(c)
        config, router, now = self.config(), self.router(), self.clock()
        paused: list[str] = []
        for ip in config.ips:
            entries = listed.get(str(ip.address))
            if not entries:
                continue
            address = str(ip.address)
            where = "; ".join(f"{c.check.removeprefix('dnsbl:')}: {c.reason}" for c in entries)
            state = router.status(ip, now).state
            if ip.warmup is None or state is WarmupState.WARM:
                log.warning(
                    "preflight: pool IP %s is listed (%s); it keeps sending", address, where
                )
            elif state is WarmupState.PAUSED:
                log.warning(
                    "preflight: warming IP %s is listed (%s); it stays paused", address, where
                )
            elif not config.preflight.pause_listed:
                log.warning(
                    "preflight: warming IP %s is listed (%s); NOT paused (preflight.pause_listed "
                    "is off)",
                    address,
                    where,
                )
            else:
                persisted = await router.pause(address, now)
                paused.append(address)
                log.warning(
                    "preflight: warming IP %s is listed (%s): its warmup is paused (%s); "
                    "resume it once delisted: warmrelay ip resume %s",
                    address,
                    where,
                    persisted.value,
                    address,
                )
        return paused


def _retrieve(task: asyncio.Task[Report]) -> None:
    """Done-callback: the exception of a run nobody awaits was logged already; fetching it
    keeps asyncio from reporting it again at exit."""
    if not task.cancelled():
        task.exception()
