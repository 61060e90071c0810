"""Mailbox providers, recognised from the MX hosts of a recipient domain.

Providers judge each sending IP separately, so caps can be set per provider.
A domain hosted at Google (any MX under google.com) is "gmail" whatever its
name; a domain no rule matches is its own provider (its domain name).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class ProviderRule:
    name: str
    mx_suffixes: tuple[str, ...] = ()
    domains: tuple[str, ...] = ()


BUILTIN: tuple[ProviderRule, ...] = (
    ProviderRule("gmail", ("google.com", "googlemail.com"), ("gmail.com", "googlemail.com")),
    ProviderRule(
        "microsoft",
        ("outlook.com", "protection.outlook.com"),
        ("outlook.com", "hotmail.com", "live.com", "msn.com"),
    ),
    ProviderRule("yahoo", ("yahoodns.net",), ("yahoo.com", "aol.com", "ymail.com")),
    ProviderRule("apple", ("icloud.com",), ("icloud.com", "me.com", "mac.com")),
)


def _under(host: str, suffix: str) -> bool:
    host, suffix = host.lower().rstrip("."), suffix.lower().strip(".")
    return host == suffix or host.endswith("." + suffix)


class ProviderMap:
    """User-defined rules first (so they can override), then the built-in ones."""

    def __init__(self, custom: Iterable[ProviderRule] = ()) -> None:
        self.rules: tuple[ProviderRule, ...] = (*custom, *BUILTIN)

    @property
    def names(self) -> list[str]:
        return list(dict.fromkeys(r.name for r in self.rules))

    def recognise(self, domain: str, mx_hosts: Sequence[str]) -> str:
        domain = domain.lower().rstrip(".")
        for rule in self.rules:
            if domain in rule.domains:
                return rule.name
        for rule in self.rules:
            if any(_under(mx, s) for mx in mx_hosts for s in rule.mx_suffixes):
                return rule.name
        return domain


def provider_map(config: Mapping[str, tuple[Sequence[str], Sequence[str]]]) -> ProviderMap:
    """From the config's ``providers: {name: {mx: [...], domains: [...]}}``."""
    return ProviderMap(
        ProviderRule(name, tuple(mx), tuple(d.lower() for d in domains))
        for name, (mx, domains) in config.items()
    )
