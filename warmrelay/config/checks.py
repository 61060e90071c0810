"""Checks beyond validity: a valid file can still be a mistake (``config_warnings``) or
not fit the host it runs on (``host_warnings``: a source IP that cannot be bound here).
Warnings, not errors: they return problems as data; check-config prints them, serve
logs them, tests read them. What serve refuses is in ``startup``."""

from __future__ import annotations

import errno
import socket
from typing import Any

from warmrelay.config.model import Config
from warmrelay.config.values import IPAddress, is_public_network
from warmrelay.errors import ConfigProblem


def config_warnings(config: Config) -> list[ConfigProblem]:
    """Valid settings that are often a mistake; they do not stop the relay."""
    warnings: list[ConfigProblem] = []
    for i, net in enumerate(config.smtp.allow_networks):
        if is_public_network(net):
            warnings.append(
                ConfigProblem(
                    f"smtp.allow_networks[{i}]",
                    f"{net} is a public network (not private, loopback, link-local or CGNAT): "
                    "every host in it may relay without AUTH; make sure they are all yours",
                )
            )
    warnings += _alignment_warnings(config)
    hook = config.events.webhook
    if hook is not None and _clear_text_off_host(hook.url):
        warnings.append(
            ConfigProblem(
                "events.webhook.url",
                f"{hook.url} is plain http to another host: the events (recipient addresses) "
                "cross the network unencrypted; use https",
            )
        )
    return warnings


def _clear_text_off_host(url: str) -> bool:
    """http:// to a host that is not this one (loopback is fine: a local collector)."""
    import ipaddress
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    if parts.scheme != "http":
        return False
    host = parts.hostname or ""
    if host == "localhost":
        return False
    try:
        return not ipaddress.ip_address(host).is_loopback
    except ValueError:
        return True


def organisational_domain(domain: str) -> str:
    """The registrable domain (DMARC's organisational domain: one label under the public
    suffix, from the Public Suffix List)."""
    from publicsuffixlist import PublicSuffixList  # its list loads once, on first need

    global _PSL
    if _PSL is None:
        _PSL = PublicSuffixList()
    return str(_PSL.privatesuffix(domain.lower().rstrip(".")) or domain.lower())


_PSL: Any = None


def _alignment_warnings(config: Config) -> list[ConfigProblem]:
    """DMARC passes on SPF only when the return path (our bounce domain) shares the From
    domain's organisational domain; with DKIM signing the signatures align instead, but
    a receiver that checks SPF alignment alone then sees a mismatch."""
    if config.bounces is None:
        return []
    ours = organisational_domain(config.bounces.domain)
    froms = sorted({*config.dkim.domains, *config.dkim.map.values()})
    apart = [d for d in froms if not d.startswith("*.") and organisational_domain(d) != ours]
    if not apart:
        return []
    return [
        ConfigProblem(
            "bounces.domain",
            f"{config.bounces.domain} does not share the organisational domain of "
            f"{', '.join(apart)} ({ours}): SPF will not align for DMARC there (DKIM still "
            "can); use a bounce domain under each From domain's own domain",
        )
    ]


_NOT_ON_THIS_HOST = {errno.EADDRNOTAVAIL, errno.EINVAL, errno.EAFNOSUPPORT}


def bind_error(address: IPAddress) -> OSError | None:
    """Why mail cannot leave from ``address`` on this host, or None. Binds a TCP socket to
    (address, 0), as delivery does; nothing is sent. Only "not on this host" errors count:
    a passing shortage (no free port right now) says nothing about the address."""
    family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.bind((str(address), 0))
    except OSError as exc:
        return exc if exc.errno in _NOT_ON_THIS_HOST else None
    return None


def host_warnings(config: Config) -> list[ConfigProblem]:
    """What does not hold on this host but does not stop serve either (it marks such an IP
    down and sends from the others). Warnings, not errors: a file may well be checked on
    another machine than the one that will run it. What serve refuses: start_problems."""
    warnings: list[ConfigProblem] = []
    for i, ip in enumerate(config.ips):
        exc = bind_error(ip.address)
        if exc is not None:
            warnings.append(
                ConfigProblem(
                    f"ips[{i}].address",
                    f"{ip.address} cannot be bound on this host ({exc.strerror}); the file "
                    "is still valid (it may be meant for another host), but a relay started "
                    "here marks this IP down and sends its mail from the other IPs",
                )
            )
    return warnings
