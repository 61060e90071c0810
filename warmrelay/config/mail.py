"""The sections of what makes mail acceptable to receivers (``warmrelay.mail``): DKIM
signing (``dkim:``), the identity preflight of IPs and signing domains
(``preflight:``), and the suppression of dead addresses (``suppression:``)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationInfo, field_validator

from warmrelay.config.values import HOSTNAME, Frozen, HostName

# the header fields signed by default (dkim.headers): what receivers show and act on
DKIM_HEADERS: tuple[str, ...] = (
    "from",
    "to",
    "cc",
    "subject",
    "date",
    "message-id",
    "reply-to",
    "in-reply-to",
    "references",
    "mime-version",
    "content-type",
    "content-transfer-encoding",
    "list-unsubscribe",
    "list-unsubscribe-post",
    "list-id",
    "feedback-id",
)


class DkimKeyConfig(Frozen):
    """One key of a signing domain; two keys give dual signatures (RFC 8463: Ed25519 and
    RSA side by side) or a rotation (old and new selector)."""

    selector: HostName
    key_file: Path  # PEM private key, mode 0600 (`warmrelay dkim keygen` writes one)
    algorithm: Literal["rsa-sha256", "ed25519-sha256"] = "rsa-sha256"


class DkimDomainConfig(Frozen):
    keys: tuple[DkimKeyConfig, ...] = Field(min_length=1)

    @field_validator("keys")
    @classmethod
    def _selectors_differ(cls, value: tuple[DkimKeyConfig, ...]) -> tuple[DkimKeyConfig, ...]:
        """Two signatures with one selector: one of them cannot match the published key."""
        seen = [k.selector.lower() for k in value]
        twice = sorted({s for s in seen if seen.count(s) > 1})
        if twice:
            raise ValueError(f"selector {', '.join(twice)} is listed twice")
        return value


# Fields that change or are added on the way: a signature over them would break in transit
# (our own Received: is added after signing; RFC 6376 5.4.1 says not to sign trace fields).
_DKIM_UNSIGNABLE = ("received", "return-path", "dkim-signature", "arc-seal", "bcc")


def _dkim_headers(value: tuple[str, ...]) -> tuple[str, ...]:
    names: list[str] = []
    for raw in value:
        name = raw.strip().lower()
        if not re.fullmatch(r"[!-9;-~]+", name):
            raise ValueError(f"{raw!r} is not a header field name")
        if name in _DKIM_UNSIGNABLE:
            raise ValueError(f"{name} must not be signed: it changes in transit")
        if name not in names:
            names.append(name)
    if "from" not in names:
        raise ValueError("must include from (RFC 6376 5.4: the From field is always signed)")
    return tuple(names)


def _dkim_domain_key(value: str) -> str:
    """A signing domain or map key ("*.suffix" allowed for map keys), lower case."""
    name = value.strip().lower().rstrip(".")
    if not HOSTNAME.match(name.removeprefix("*.")):
        raise ValueError(f"{value!r} is not a domain name")
    return name


class DkimConfig(Frozen):
    """DKIM signing at acceptance, before the spool (every retry sends the same bytes).
    The signing domain is the From: header's domain, or what ``map`` says for it."""

    domains: Mapping[str, DkimDomainConfig] = Field(default_factory=dict)
    map: Mapping[str, str] = Field(default_factory=dict)  # From domain or "*.suffix" -> domain
    unsigned: Literal["send", "refuse"] = "send"  # mail whose From domain has no key
    headers: tuple[str, ...] = DKIM_HEADERS  # signed, and From over-signed
    add_missing_headers: bool = True  # Message-ID and Date when absent (before signing)

    @field_validator("headers")
    @classmethod
    def _signable_headers(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return _dkim_headers(value)

    @field_validator("domains")
    @classmethod
    def _domain_names(cls, value: Mapping[str, DkimDomainConfig]) -> dict[str, DkimDomainConfig]:
        out: dict[str, DkimDomainConfig] = {}
        for name, domain in value.items():
            if name.startswith("*"):
                raise ValueError(f"{name!r}: a signing domain is one domain (use map for *.)")
            out[_dkim_domain_key(name)] = domain
        return out

    @field_validator("map")
    @classmethod
    def _map_to_signing_domains(
        cls, value: Mapping[str, str], info: ValidationInfo
    ) -> dict[str, str]:
        """Each target must have keys: a map entry to nowhere would silently send unsigned."""
        domains = info.data.get("domains")  # absent when domains itself is invalid
        out: dict[str, str] = {}
        for pattern, target in value.items():
            key, to = _dkim_domain_key(pattern), _dkim_domain_key(target)
            if to.startswith("*."):
                raise ValueError(f"{pattern!r} maps to {target!r}: name one signing domain")
            if domains is not None and to not in domains:
                raise ValueError(f"{pattern!r} maps to {target!r}, which has no keys under domains")
            out[key] = to
        return out


class PreflightConfig(Frozen):
    """Checks of each IP's and signing domain's DNS identity before and while warming."""

    on_start: bool = True  # run at start; results in the log, /preflight and metrics
    dnsbl_zones: tuple[str, ...] = (
        "zen.spamhaus.org",
        "b.barracudacentral.org",
        "bl.spamcop.net",
    )
    pause_listed: bool = True  # a warming IP found on a blocklist is paused, with the reason
    timeout_s: float = Field(default=5.0, gt=0)
    # the relay runs the checks again this often (a listing while warming pauses at once);
    # null: only at start
    every_s: float | None = Field(default=3600.0, gt=0)


class SuppressionConfig(Frozen):
    """Hard-bounced addresses are refused at RCPT (550 5.1.1) until they expire."""

    enabled: bool = True
    ttl_s: float = Field(default=30 * 86400.0, gt=0)
    statuses: tuple[str, ...] = ("5.1.1", "5.1.2", "5.1.10", "5.2.1")
    # how often each relay process reads the list's change token from the state store (a
    # change made elsewhere, by another worker or relay, is seen within this time)
    refresh_s: float = Field(default=5.0, gt=0)
