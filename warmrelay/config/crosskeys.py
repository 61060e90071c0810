"""The rules that span several keys, checked on the raw YAML document rather than on
the models: they are then reported together with pydantic's errors even when other keys
are wrong too (a file with a bad date and a duplicate IP shows both). Duplicate IPs,
unknown providers in a warmup block, TLS modes without smtp.tls, PROXY protocol without
the balancers' addresses, route keys that are not domains, and an overflow policy that
has nothing to overflow to."""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from typing import Any

from warmrelay.config.values import format_path
from warmrelay.errors import ConfigProblem, NextHopError
from warmrelay.warmup.providers import BUILTIN


def _ips_problems(ips: list[Any], known_providers: set[str]) -> tuple[list[ConfigProblem], bool]:
    """Duplicate addresses and unknown providers; also whether any entry may be a warm IP
    (an entry that is not a mapping is already an error: it is not held against overflow)."""
    problems: list[ConfigProblem] = []
    seen: dict[str, int] = {}
    maybe_warm = False
    for i, entry in enumerate(ips):
        if not isinstance(entry, Mapping):
            maybe_warm = True
            continue
        warmup = entry.get("warmup")
        caps = warmup.get("providers") if isinstance(warmup, Mapping) else None
        for name in caps if isinstance(caps, Mapping) else ():
            if name not in known_providers:
                problems.append(
                    ConfigProblem(
                        f"ips[{i}].warmup.providers.{name}",
                        f"unknown provider (known: {', '.join(sorted(known_providers))}; "
                        "define others under providers:)",
                    )
                )
        if warmup is None:
            maybe_warm = True
        try:
            key = str(ipaddress.ip_address(str(entry.get("address"))))
        except ValueError:
            continue
        if key in seen:
            problems.append(
                ConfigProblem(f"ips[{i}].address", f"{key} is already listed as ips[{seen[key]}]")
            )
        else:
            seen[key] = i
    return problems, maybe_warm


def _routes_problems(routes: Mapping[Any, Any]) -> list[ConfigProblem]:
    """Route keys must be domain names: the relay could not even start with one that is not."""
    from warmrelay.delivery.nexthop import (
        normalize_domain,  # DNS name rules, as delivery applies them
    )

    problems: list[ConfigProblem] = []
    for domain in routes:
        if domain == "*" or not isinstance(domain, str):  # a non-string: pydantic reports it
            continue
        try:
            normalize_domain(domain)
        except NextHopError as exc:
            problems.append(
                ConfigProblem(format_path(["routes", domain]), f"not a domain name ({exc})")
            )
    return problems


def cross_key_problems(doc: Mapping[str, Any]) -> list[ConfigProblem]:
    """Rules spanning several keys, checked on the raw document. Every value may have any
    shape here (pydantic reports wrong shapes): look into it only after checking its type."""
    problems: list[ConfigProblem] = []
    ips = doc.get("ips")
    if ips == []:
        problems.append(ConfigProblem("ips", "list at least one source IP"))
    maybe_warm = True  # unknown unless ips is a list we can read
    if isinstance(ips, list) and ips:
        custom = doc.get("providers")
        known = {r.name for r in BUILTIN} | (
            {str(k) for k in custom} if isinstance(custom, Mapping) else set()
        )
        ip_problems, maybe_warm = _ips_problems(ips, known)
        problems += ip_problems
    smtp = doc.get("smtp")
    listen = smtp.get("listen") if isinstance(smtp, Mapping) else None
    if isinstance(smtp, Mapping) and smtp.get("tls") is None and isinstance(listen, list):
        for i, entry in enumerate(listen):
            if isinstance(entry, Mapping) and entry.get("tls") in ("starttls", "implicit"):
                problems.append(
                    ConfigProblem(f"smtp.listen[{i}].tls", "needs smtp.tls (cert and key)")
                )
    for i, entry in enumerate(listen if isinstance(listen, list) else []):
        # A PROXY header is believed only from the balancers in proxy_from: one without the
        # other is an open door (anyone names any client) or a setting that does nothing.
        if not isinstance(entry, Mapping):
            continue
        proxied = str(entry.get("proxy_protocol")).lower() in ("true", "yes", "on", "1", "y", "t")
        if proxied and not entry.get("proxy_from"):
            problems.append(
                ConfigProblem(
                    f"smtp.listen[{i}].proxy_from",
                    "proxy_protocol: true needs proxy_from, the load balancers' addresses "
                    "(e.g. [10.0.0.5/32]); otherwise any client could claim any address",
                )
            )
        elif entry.get("proxy_from") and not proxied:
            problems.append(
                ConfigProblem(
                    f"smtp.listen[{i}].proxy_from", "only applies with proxy_protocol: true"
                )
            )
    routes = doc.get("routes")
    if isinstance(routes, Mapping):
        problems += _routes_problems(routes)
    if doc.get("overflow") == "smarthost" and not isinstance(doc.get("smarthost"), Mapping):
        problems.append(
            ConfigProblem("smarthost", "overflow: smarthost needs a smarthost block (host: ...)")
        )
    if doc.get("overflow", "pool") == "pool" and not maybe_warm:
        problems.append(
            ConfigProblem(
                "overflow",
                "'pool' needs at least one warm IP (an entry of ips without a warmup block); "
                "add one or use overflow: hold",
            )
        )
    return problems
