"""SPF (RFC 7208): does each signing domain's record authorise each IP? Any IP under
``ips`` may carry any domain's mail (overflow), so each needs a ``pass`` from each domain.

This is check_host() in full, as receivers run it (``include:``, ``redirect=``, macros,
``a``, ``mx``, ``ptr``, ``exists``, and the limits of 10 DNS-querying terms and 2 void
lookups past which every receiver says permerror), because a record that merely looks
right must fail here too. Parsing and macro expansion are pure; the evaluation asks
``DnsClient``.
"""

from __future__ import annotations

import contextlib
import enum
import ipaddress
import re
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass

from warmrelay.config import IPAddress, IPConfig
from warmrelay.mail.preflight.dns import DnsClient, Failed, Found, Lookup, Missing
from warmrelay.mail.preflight.report import Check, Outcome


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
_MX_NAMES = 10  # RFC 7208 4.6.4: address lookups per mx (more: permerror) or ptr (rest ignored)


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
        if self._ip.version == 4:
            prefix = 32 if cidr4 is None else cidr4
        else:
            prefix = 128 if cidr6 is None else cidr6
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
                raise _SpfAbort(
                    SpfResult.PERMERROR, f"'{mech.text}': more than {_MX_NAMES} MX hosts"
                )
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


async def spf_check(dns: DnsClient, domain: str, ip: IPConfig) -> Check:
    """``spf:IP`` of a signing domain: check_host() for mail from postmaster@DOMAIN sent
    from the IP with its helo."""
    evaluation = SpfEvaluation(dns, ip.address, f"postmaster@{domain}", ip.helo)
    outcome, reason = classify_spf(await evaluation.check(domain))
    return Check(domain, f"spf:{ip.address}", outcome, reason)
