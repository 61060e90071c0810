"""What the sections share: the frozen base of every section, the value types and
validators more than one section uses (IP addresses and networks, host:port, host
names, the guard against an open relay), and how keys and values are named in messages
(key paths, secret keys, what a YAML value is).

Kept apart so that each section module, the loader and the checks can import it
without importing each other.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping, Sequence
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict


class Frozen(BaseModel):
    """The base of every section: unknown keys are errors, values never change once loaded."""

    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)


IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# a DNS host name: labels of letters, digits, "-" and "_", 253 characters at most
HOSTNAME = re.compile(r"^(?=.{1,253}$)([A-Za-z0-9_]([A-Za-z0-9-_]{0,61}[A-Za-z0-9_])?\.?)+$")


def _ip(value: Any) -> IPAddress:
    try:
        return ipaddress.ip_address(str(value))
    except ValueError:
        raise ValueError(f"{value!r} is not an IP address") from None


def _network(value: Any) -> IPNetwork:
    try:
        return ipaddress.ip_network(str(value), strict=False)
    except ValueError:
        raise ValueError(f"{value!r} is not a network (e.g. 10.0.0.0/8)") from None


def parse_host_port(
    value: str, *, default_port: int | None = None, allow_zero: bool = False
) -> tuple[str, int]:
    """Split ``host:port`` / ``[v6]:port`` / ``host`` (when a default port is given)."""
    text = str(value).strip()
    m = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\](?::(\d+))?", text)
    if m:
        host, port_text = m.group(1), m.group(2)
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    elif text.count(":") > 1:  # a bare IPv6 address
        host, port_text = text, None
    else:
        host, port_text = text, None
    if port_text is None:
        if default_port is None:
            raise ValueError(f"{value!r} needs a port (host:port)")
        port = default_port
    elif port_text.isdigit():
        port = int(port_text)
    else:
        raise ValueError(f"{value!r}: the port must be a number (host:port)")
    if not host:
        raise ValueError(f"{value!r} has no host")
    if not (0 if allow_zero else 1) <= port < 65536:
        raise ValueError(f"{value!r}: port must be 1-65535")
    return host, port


def _address_text(value: Any) -> str:
    """The "host:port" text of a string or a [host, port] pair; any other shape is a
    ValueError (pydantic reports it with its key path), never a TypeError (a crash)."""
    if isinstance(value, (tuple, list)) and len(value) == 2:
        host, port = value
        if not isinstance(host, str) or isinstance(port, bool) or not isinstance(port, int):
            raise ValueError(f'{value!r}: give "host:port" or [host, port number]')
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if not isinstance(value, str):
        raise ValueError(f'must be "host:port" (e.g. "127.0.0.1:25"), not {yaml_kind(value)}')
    return value


def _host_port(value: Any) -> tuple[str, int]:
    return parse_host_port(_address_text(value))


def _listen(value: Any) -> tuple[str, int]:
    """A listening address; port 0 picks a free port (tests)."""
    host, port = parse_host_port(_address_text(value), allow_zero=True)
    _ip(host)
    return host, port


def _dns_server(value: Any) -> tuple[str, int]:
    host, port = parse_host_port(_address_text(value), default_port=53)
    _ip(host)
    return host, port


def _hostname(value: str) -> str:
    if not HOSTNAME.match(value):
        raise ValueError(f"{value!r} is not a host name")
    return value


# Shortest prefixes smtp.allow_networks accepts: anything wider lets a large part of the
# Internet relay without AUTH, which is an open relay whatever the intent was.
MIN_RELAY_PREFIX = {4: 8, 6: 16}

# Networks that are not on the public Internet: relay permission for them is the normal case.
_NON_PUBLIC = tuple(
    ipaddress.ip_network(n)
    for n in (
        "10.0.0.0/8",
        "172.16.0.0/12",
        "192.168.0.0/16",
        "127.0.0.0/8",
        "169.254.0.0/16",  # link-local
        "100.64.0.0/10",  # carrier-grade NAT (RFC 6598)
        "::1/128",
        "fc00::/7",  # unique local
        "fe80::/10",  # link-local
    )
)


def is_public_network(net: IPNetwork) -> bool:
    """True unless the whole network is private, loopback, link-local or CGNAT space."""
    return not any(
        net.version == n.version and net.subnet_of(n)  # type: ignore[arg-type]
        for n in _NON_PUBLIC
    )


def _not_open_relay(net: IPNetwork) -> IPNetwork:
    """Refuse relay networks so wide that the relay would be open to (part of) the Internet.
    A wide network of private space only (fd00::/8) opens nothing to the Internet: allowed."""
    shortest = MIN_RELAY_PREFIX[net.version]
    if net.prefixlen >= shortest or not is_public_network(net):
        return net
    if net.prefixlen == 0:
        what = f"covers every IPv{net.version} address"
    elif net.version == 4:
        what = f"is wider than /{shortest} ({net.num_addresses:,} addresses)"
    else:
        what = f"is wider than /{shortest}"
    raise ValueError(
        f"{net} {what}: anyone there could relay mail through this host without "
        f"AUTH (an open relay, blocklisted within hours); list only the networks of your "
        f"applications (IPv4 /{MIN_RELAY_PREFIX[4]} or narrower, IPv6 /{MIN_RELAY_PREFIX[6]} "
        f"or narrower) and let other clients authenticate (smtp.users)"
    )


HostPort = Annotated[tuple[str, int], BeforeValidator(_host_port)]
Listen = Annotated[tuple[str, int], BeforeValidator(_listen)]
DnsServer = Annotated[tuple[str, int], BeforeValidator(_dns_server)]
Address = Annotated[IPAddress, BeforeValidator(_ip)]
Network = Annotated[IPNetwork, BeforeValidator(_network)]
RelayNetwork = Annotated[IPNetwork, BeforeValidator(_network), AfterValidator(_not_open_relay)]
HostName = Annotated[str, AfterValidator(_hostname)]


# -- how keys and values are named in messages ----------------------------------------


def format_path(loc: Sequence[int | str]) -> str:
    """('ips', 1, 'warmup', 'start') -> 'ips[1].warmup.start'."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", part):
            out += f".{part}" if out else part
        else:
            out += f"[{part!r}]"
    return out


_SECRET_WORDS = ("password", "secret", "token")


def is_secret_key(name: str) -> bool:
    """Fields whose value is a secret (``password_hash``); ``*_env`` only names a variable."""
    lowered = name.lower()
    return any(w in lowered for w in _SECRET_WORDS) and not lowered.endswith("_env")


def yaml_kind(value: Any) -> str:
    """What a YAML value is, in the words of someone editing YAML (for error messages)."""
    if value is None:
        return "empty"
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, (int, float)):
        return f"a number ({value!r})"
    if isinstance(value, str):
        return f"a string ({value!r})"
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, (list, tuple)):
        return "a list"
    return type(value).__name__
