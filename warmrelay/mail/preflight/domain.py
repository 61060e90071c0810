"""A signing domain's checks: SPF for every IP (``spf``), each DKIM key's record against
our key file, and DMARC.

A new IP has no reputation, so receivers lean on the signing domain's: its records must
authorise every IP (overflow may send from any of them), publish exactly the keys we sign
with (else every signature fails), and carry a DMARC policy (bulk senders need one).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from warmrelay.config import DkimKeyConfig, IPConfig
from warmrelay.mail.dkim import Algorithm, parse_private_key
from warmrelay.mail.preflight.dns import DnsClient, Failed, Found, Missing
from warmrelay.mail.preflight.report import Check, Outcome, Skip
from warmrelay.mail.preflight.spf import spf_check


async def domain_checks(
    dns: DnsClient,
    domain: str,
    keys: Sequence[DkimKeyConfig],
    ips: Sequence[IPConfig],
    skip: Skip | None,
) -> list[Check]:
    """SPF for every IP (any may carry the domain's mail), each DKIM key, DMARC.
    ``skip``: DNS is not asked, and why; the key files are still checked."""
    if skip is not None:
        checks = [Check.skipped(domain, f"spf:{ip.address}", skip) for ip in ips]
        for key in keys:  # the key file is still ours to check
            ours = _our_key(domain, key)
            checks.append(
                ours
                if isinstance(ours, Check)
                else Check.skipped(domain, _dkim_check_name(key), skip)
            )
        return [*checks, Check.skipped(domain, "dmarc", skip)]
    parts = await asyncio.gather(
        *(spf_check(dns, domain, ip) for ip in ips),
        *(dkim_check(dns, domain, key) for key in keys),
        dmarc_check(dns, domain),
    )
    return list(parts)


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


async def dkim_check(dns: DnsClient, domain: str, key: DkimKeyConfig) -> Check:
    """``dkim:SELECTOR``: the key record at SELECTOR._domainkey.DOMAIN is our key file's."""
    check, name = _dkim_check_name(key), f"{key.selector}._domainkey.{domain}"
    ours = _our_key(domain, key)
    if isinstance(ours, Check):
        return ours
    answer = await dns.query(name, "TXT")
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


def _dkim_check_name(key: DkimKeyConfig) -> str:
    return f"dkim:{key.selector}"


def _our_key(domain: str, key: DkimKeyConfig) -> Check | PublicKey:
    """Our public key, or the failed check saying why there is none."""
    try:
        return public_key(key.key_file, key.algorithm)
    except OSError as exc:
        reason = f"cannot read key_file {key.key_file}: {exc.strerror}"
    except ValueError as exc:
        reason = str(exc)
    return Check(domain, _dkim_check_name(key), Outcome.FAIL, reason)


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


async def dmarc_check(dns: DnsClient, domain: str) -> Check:
    """_dmarc.DOMAIN, else the nearest parent's record (as receivers fall back to the
    organizational domain's), never the bare top-level domain."""
    labels = domain.rstrip(".").lower().split(".")
    for i in range(max(1, len(labels) - 1)):
        where = "_dmarc." + ".".join(labels[i:])
        answer = await dns.query(where, "TXT")
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
