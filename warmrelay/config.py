"""Configuration: one YAML file loaded once into typed, frozen objects.

Validation is done by pydantic (unknown keys are errors, every problem is
reported with its key path, not only the first); the few rules that span
several keys (duplicate IPs, an overflow policy that needs a warm IP) are
checked here on the raw document so they are reported even when other keys
are wrong too.
"""

from __future__ import annotations

import difflib
import errno
import ipaddress
import os
import re
import socket
import ssl
import types
from collections.abc import Mapping, Sequence
from datetime import date, datetime
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin
from urllib.parse import urlparse
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from warmrelay.errors import ConfigError, ConfigProblem, NextHopError
from warmrelay.warmup.eligibility import Eligibility
from warmrelay.warmup.plan import (
    PRESETS,
    ProviderCap,
    Schedule,
    SendingHours,
    WarmupPlan,
    extend_to_target,
    ramp,
)
from warmrelay.warmup.providers import BUILTIN

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_HOSTNAME = re.compile(r"^(?=.{1,253}$)([A-Za-z0-9_]([A-Za-z0-9-_]{0,61}[A-Za-z0-9_])?\.?)+$")


def _kind(value: Any) -> str:
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
        raise ValueError(f'must be "host:port" (e.g. "127.0.0.1:25"), not {_kind(value)}')
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
    if not _HOSTNAME.match(value):
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


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)


def _listener(value: Any) -> Any:
    """ "host:port" is short for {address: "host:port"}."""
    if isinstance(value, str):
        return {"address": value}
    if not isinstance(value, (Mapping, BaseModel)):
        raise ValueError(
            f'must be "host:port" (e.g. "127.0.0.1:2525") or a mapping with an address, '
            f"not {_kind(value)}"
        )
    return value


class ListenerConfig(_Frozen):
    """One listening socket and its security settings."""

    address: Listen
    tls: Literal["none", "starttls", "implicit"] | None = None  # None: starttls if smtp.tls
    require_auth: bool = False  # even clients from allow_networks must authenticate
    auth_without_tls: bool = False  # offer AUTH in clear text (only for loopback setups)
    proxy_protocol: bool = False  # behind a TCP load balancer: PROXY v1/v2 header required
    # The load balancers allowed to send that header; any other peer is closed at connect
    # (required with proxy_protocol: else anyone reaching the port could claim any address)
    proxy_from: tuple[Network, ...] = ()


class TlsConfig(_Frozen):
    cert: Path  # PEM certificate chain; reloaded when the file changes or on SIGHUP
    key: Path


class UserConfig(_Frozen):
    """An application allowed to relay after AUTH, and the senders it may use."""

    password_hash: str  # from `warmrelay hash-password` (argon2id)
    senders: tuple[str, ...] = ()  # address, *@domain or domain patterns; empty = any

    @field_validator("password_hash")
    @classmethod
    def _is_argon2(cls, value: str) -> str:
        if not value.startswith("$argon2"):
            raise ValueError("must be an argon2 hash from `warmrelay hash-password`")
        return value


class SmtpConfig(_Frozen):
    listen: tuple[Annotated[ListenerConfig, BeforeValidator(_listener)], ...] = Field(
        default=(ListenerConfig(address=("127.0.0.1", 2525)),), min_length=1
    )
    hostname: HostName = Field(default_factory=socket.getfqdn)
    allow_networks: tuple[RelayNetwork, ...] = (ipaddress.ip_network("127.0.0.0/8"),)
    max_message_bytes: int = Field(default=26_214_400, gt=0)
    max_recipients: int = Field(default=100, gt=0)
    timeout_s: float = Field(default=300.0, gt=0)  # idle time between commands / data lines
    data_timeout_s: float = Field(default=600.0, gt=0)  # the whole DATA phase
    max_connections: int = Field(default=1000, gt=0)
    max_connections_per_client: int = Field(default=100, gt=0)
    max_bad_commands: int = Field(default=20, gt=0)  # refused commands before we hang up
    max_auth_failures: int = Field(default=5, gt=0)  # per client IP, then locked out...
    auth_lockout_s: float = Field(default=900.0, gt=0)  # ...for this long
    auth_tarpit_s: float = Field(default=1.0, ge=0)  # reply delay per recent failure (max 5x)
    bare_newlines: Literal["normalize", "reject"] = "normalize"
    tls: TlsConfig | None = None
    users: Mapping[str, UserConfig] = Field(default_factory=dict)

    def listener_tls(self, listener: ListenerConfig) -> str:
        if listener.tls is not None:
            return listener.tls
        return "starttls" if self.tls is not None else "none"


class AdminConfig(_Frozen):
    listen: Listen | None = ("127.0.0.1", 9465)
    token_env: str | None = None  # bearer token (from this variable) for POST and /status

    @field_validator("token_env")
    @classmethod
    def _variable_name(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", value):
            raise ValueError(f"{value!r} is not an environment variable name")
        return value


class StateConfig(_Frozen):
    dir: Path = Path("./var")
    counters: str = "sqlite"

    @field_validator("counters")
    @classmethod
    def _known_backend(cls, value: str) -> str:
        if value in ("sqlite", "memory"):
            return value
        if value.startswith(("redis://", "rediss://", "unix://")):
            parsed = urlparse(value)
            if value.startswith("unix://") or parsed.hostname:
                return value
            raise ValueError(f"{value!r}: a redis URL needs a host (redis://host:6379/0)")
        raise ValueError(f"{value!r} is not a counters backend (sqlite, memory or redis://...)")


class DnsConfig(_Frozen):
    nameservers: tuple[DnsServer, ...] = ()
    timeout_s: float = Field(default=5.0, gt=0)


class DeliveryConfig(_Frozen):
    concurrency: int = Field(default=64, gt=0)
    connections_per_destination: int = Field(default=16, gt=0)
    connect_timeout_s: float = Field(default=30.0, gt=0)
    timeout_s: float = Field(default=120.0, gt=0)
    idle_connection_s: float = Field(default=10.0, ge=0)
    retry_first_s: float = Field(default=300.0, gt=0)
    retry_max_s: float = Field(default=3600.0, gt=0)
    queue_lifetime_s: float = Field(default=5 * 86400.0, gt=0)
    ip_down_s: float = Field(default=300.0, gt=0)
    drain_timeout_s: float = Field(default=30.0, ge=0)
    mx_port: int = Field(default=25, gt=0, lt=65536)
    starttls: Literal["opportunistic", "never"] = "opportunistic"


_RAMP_KEYS = {"start", "growth", "target"}


def _schedule_mapping(value: Mapping[str, Any]) -> Schedule:
    """{preset: NAME, target: N} or {start: N, growth: F, target: N}."""
    keys = set(value)
    if "preset" in keys:
        if keys - {"preset", "target"}:
            raise ValueError(f"unknown keys {sorted(keys - {'preset', 'target'})} with preset")
        base = _schedule(value["preset"])
        target = value.get("target")
        if target is None:
            return base
        if isinstance(target, bool) or not isinstance(target, int) or target < 1:
            raise ValueError("target must be a whole number >= 1")
        return extend_to_target(base, target)
    if keys != _RAMP_KEYS:
        raise ValueError(
            "a generated ramp needs exactly start, growth and target "
            "(e.g. {start: 50, growth: 1.4, target: 500000})"
        )
    start, growth, target = value["start"], value["growth"], value["target"]
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (start, target)):
        raise ValueError("start and target must be whole numbers")
    if isinstance(growth, bool) or not isinstance(growth, (int, float)):
        raise ValueError("growth must be a number > 1 (e.g. 1.4)")
    return ramp(start, float(growth), target)


def _schedule(value: Any) -> Schedule:
    if isinstance(value, Mapping):
        return _schedule_mapping(value)
    if isinstance(value, str):
        preset = PRESETS.get(value)
        if preset is None:
            raise ValueError(f"unknown preset {value!r} (known: {', '.join(sorted(PRESETS))})")
        return preset
    if isinstance(value, (list, tuple)):
        if not value:
            raise ValueError("the schedule is empty: give daily caps or a preset name")
        caps: list[int] = []
        for i, cap in enumerate(value):
            if isinstance(cap, bool) or not isinstance(cap, int):
                raise ValueError(f"day {i + 1}: {cap!r} is not a whole number")
            if cap < 0:
                raise ValueError(f"day {i + 1}: cap {cap} is negative")
            caps.append(cap)
        return Schedule(name="custom", daily=tuple(caps))
    raise ValueError(
        f"must be a list of daily caps, a preset name or a ramp, not {type(value).__name__}"
    )


ScheduleField = Annotated[Schedule, BeforeValidator(_schedule)]


def _sending_hours(value: Any) -> SendingHours:
    return SendingHours.parse(str(value))


class ProviderCapConfig(_Frozen):
    """Per-provider cap of a warming IP: ``share`` of the day's cap, or its own ``schedule``."""

    share: float | None = Field(default=None, gt=0, le=1)
    schedule: ScheduleField | None = None

    @model_validator(mode="after")
    def _one_of(self) -> ProviderCapConfig:
        if (self.share is None) == (self.schedule is None):
            raise ValueError("give either share (e.g. 0.3) or schedule, not both or neither")
        return self


def _header_rule(value: Any) -> tuple[str, str]:
    return Eligibility.parse_header(str(value))


class EligibleConfig(_Frozen):
    """Which mail may use the warming IP; every rule given must match."""

    senders: tuple[str, ...] = ()
    header: Annotated[tuple[str, str], BeforeValidator(_header_rule)] | None = None
    recipient_domains: tuple[str, ...] = ()


_ISO_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")


def _start_date(value: Any) -> date:
    """A calendar date written YYYY-MM-DD. A number is refused: pydantic would read
    20261127 as seconds since 1970 and warm up from some day in 1970 or 2026."""
    if isinstance(value, date) and not isinstance(value, datetime):
        return value
    if isinstance(value, str) and _ISO_DATE.fullmatch(value.strip()):
        try:
            return date.fromisoformat(value.strip())
        except ValueError as exc:
            raise ValueError(f"{value!r} is not a date ({exc})") from None
    raise ValueError(
        f"must be a date written YYYY-MM-DD (e.g. 2026-11-27), not {_kind(value)}; "
        "or leave start out to begin on the day the relay first sends from this IP"
    )


class WarmupConfig(_Frozen):
    # day 1; None: the day the relay first routes mail from the IP (kept in the state store)
    start: Annotated[date, BeforeValidator(_start_date)] | None = None
    schedule: ScheduleField
    sending_hours: Annotated[SendingHours, BeforeValidator(_sending_hours)] | None = None
    providers: Mapping[str, ProviderCapConfig] = Field(default_factory=dict)
    progress: Literal["calendar", "results"] = "calendar"
    progress_min_use: float = Field(default=0.9, gt=0, le=1)
    progress_max_throttle: float = Field(default=0.02, gt=0, le=1)
    eligible: EligibleConfig | None = None

    def plan(self) -> WarmupPlan:
        return WarmupPlan(
            self.schedule,
            self.start,
            self.sending_hours,
            {name: ProviderCap(p.share, p.schedule) for name, p in self.providers.items()},
        )

    def eligibility(self) -> Eligibility | None:
        e = self.eligible
        return None if e is None else Eligibility(e.senders, e.header, e.recipient_domains)


class IPConfig(_Frozen):
    address: Address
    helo: HostName
    weight: int = Field(default=1, gt=0)
    warmup: WarmupConfig | None = None


class CooldownConfig(_Frozen):
    cooldown_s: float = Field(default=3600.0, gt=0)
    cooldown_max_s: float = Field(default=86400.0, gt=0)


def _regexes(value: tuple[str, ...]) -> tuple[str, ...]:
    for pattern in value:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ValueError(f"{pattern!r} is not a regular expression: {exc}") from None
    return value


Patterns = Annotated[tuple[str, ...], AfterValidator(_regexes)]


class ThrottleConfig(_Frozen):
    """Replies that mean "this IP sends too much"; extra regexes match "CODE TEXT"."""

    patterns: Patterns = ()
    cooldown_s: float = Field(default=3600.0, gt=0)
    cooldown_max_s: float = Field(default=86400.0, gt=0)
    providers: Mapping[str, CooldownConfig] = Field(default_factory=dict)

    def cooldown(self, provider: str | None) -> tuple[float, float]:
        own = self.providers.get(provider or "")
        return (
            (own.cooldown_s, own.cooldown_max_s) if own else (self.cooldown_s, self.cooldown_max_s)
        )


class BlockConfig(_Frozen):
    """Replies that blame the sending IP's reputation (5xx): never a bounce; the warming IP is
    suspended for that provider for a long, growing cooldown. Extra regexes match "CODE TEXT"."""

    patterns: Patterns = ()
    cooldown_s: float = Field(default=6 * 3600.0, gt=0)
    cooldown_max_s: float = Field(default=7 * 86400.0, gt=0)


class SmarthostConfig(_Frozen):
    """Overflow relayed through the email provider's shared pool."""

    host: HostPort
    starttls: Literal["required", "opportunistic", "implicit"] = "required"
    username: str | None = None
    password_env: str | None = None  # the password is read from this environment variable
    helo: HostName | None = None
    verify: bool = True  # check the smarthost's certificate (against ca_file or the system CAs)
    ca_file: Path | None = None

    def password(self) -> str | None:
        return os.environ.get(self.password_env) if self.password_env else None


class ProviderConfig(_Frozen):
    """A mailbox provider of the operator's: MX host suffixes and/or recipient domains."""

    mx: tuple[str, ...] = ()
    domains: tuple[str, ...] = ()


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


class DkimKeyConfig(_Frozen):
    """One key of a signing domain; two keys give dual signatures (RFC 8463: Ed25519 and
    RSA side by side) or a rotation (old and new selector)."""

    selector: HostName
    key_file: Path  # PEM private key, mode 0600 (`warmrelay dkim keygen` writes one)
    algorithm: Literal["rsa-sha256", "ed25519-sha256"] = "rsa-sha256"


class DkimDomainConfig(_Frozen):
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
    if not _HOSTNAME.match(name.removeprefix("*.")):
        raise ValueError(f"{value!r} is not a domain name")
    return name


class DkimConfig(_Frozen):
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


class PreflightConfig(_Frozen):
    """Checks of each IP's and signing domain's DNS identity before and while warming."""

    on_start: bool = True  # run at start; results in the log, /preflight and metrics
    dnsbl_zones: tuple[str, ...] = (
        "zen.spamhaus.org",
        "b.barracudacentral.org",
        "bl.spamcop.net",
    )
    pause_listed: bool = True  # a warming IP found on a blocklist is paused, with the reason
    timeout_s: float = Field(default=5.0, gt=0)


class SuppressionConfig(_Frozen):
    """Hard-bounced addresses are refused at RCPT (550 5.1.1) until they expire."""

    enabled: bool = True
    ttl_s: float = Field(default=30 * 86400.0, gt=0)
    statuses: tuple[str, ...] = ("5.1.1", "5.1.2", "5.1.10", "5.2.1")


class LogConfig(_Frozen):
    """Log lines on stderr: text (one line per event) or json (one object per line)."""

    format: Literal["text", "json"] = "text"


class Config(_Frozen):
    smtp: SmtpConfig = SmtpConfig()
    admin: AdminConfig = AdminConfig()
    state: StateConfig = StateConfig()
    dns: DnsConfig = DnsConfig()
    delivery: DeliveryConfig = DeliveryConfig()
    timezone: str = "UTC"
    ips: tuple[IPConfig, ...]
    overflow: Literal["pool", "hold", "smarthost"] = "pool"
    smarthost: SmarthostConfig | None = None
    throttle: ThrottleConfig = ThrottleConfig()
    blocks: BlockConfig = BlockConfig()
    routes: Mapping[str, HostPort] = Field(default_factory=dict)
    providers: Mapping[str, ProviderConfig] = Field(default_factory=dict)
    dkim: DkimConfig = DkimConfig()
    preflight: PreflightConfig = PreflightConfig()
    suppression: SuppressionConfig = SuppressionConfig()
    log: LogConfig = LogConfig()

    @field_validator("timezone")
    @classmethod
    def _zone_exists(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {value!r} (e.g. UTC, Europe/Berlin)") from None
        return value

    @field_validator("routes")
    @classmethod
    def _lower_domains(cls, value: Mapping[str, tuple[str, int]]) -> Mapping[str, tuple[str, int]]:
        return {k.lower().rstrip("."): v for k, v in value.items()}

    @property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)


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


_SHAPE_ERRORS = {
    "tuple_type": "must be a list",
    "list_type": "must be a list",
    "dict_type": "must be a mapping (key: value)",
    "model_type": "must be a mapping (key: value)",
    "model_attributes_type": "must be a mapping (key: value)",
}


# pydantic's type errors in the words of someone editing YAML ("a valid integer, unable to
# parse string as an integer" says less than "must be an integer (got 'ten')")
_TYPE_ERRORS = {
    "int_type": "must be an integer",
    "int_parsing": "must be an integer",
    "int_from_float": "must be an integer",
    "float_type": "must be a number",
    "float_parsing": "must be a number",
    "finite_number": "must be a finite number",
    "bool_type": "must be true or false",
    "bool_parsing": "must be true or false",
    "string_type": "must be a string",
}

# Errors whose message is ours (it shows the value where that helps) or already says what
# was found: no "(got ...)" after them.
_NO_ECHO = {
    "value_error",
    "assertion_error",
    "missing",
    "extra_forbidden",
    "too_short",
    "too_long",
    *_SHAPE_ERRORS,
}


def _got(value: Any) -> str:
    """The value found, as it was written in YAML, short enough for one line."""
    if value is None:
        return "nothing"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, (list, tuple)):
        return "a list"
    text = repr(value)
    return text if len(text) <= 60 else text[:56] + "...'"


def _members(annotation: Any) -> list[Any]:
    """The types a field may hold: Annotated and unions (``X | None``) taken apart."""
    origin = get_origin(annotation)
    if origin is Annotated:
        return _members(get_args(annotation)[0])
    if origin in (Union, types.UnionType):
        return [m for arg in get_args(annotation) for m in _members(arg)]
    return [annotation]


def _known_keys(loc: Sequence[int | str]) -> list[str]:
    """The keys the mapping at ``loc`` may have (its model's fields), found by following
    the models from Config down; empty when ``loc`` leads to no model."""
    at: list[Any] = [Config]
    for part in loc:
        inside: list[Any] = []
        for member in (m for a in at for m in _members(a)):
            origin, args = get_origin(member), get_args(member)
            if isinstance(member, type) and issubclass(member, BaseModel):
                if isinstance(part, str) and part in member.model_fields:
                    inside.append(member.model_fields[part].annotation)
            elif origin in (tuple, list) and isinstance(part, int) and args:
                inside.append(args[0])
            elif origin in (Mapping, dict) and isinstance(part, str) and len(args) == 2:
                inside.append(args[1])
        at = inside
    models = [m for a in at for m in _members(a) if isinstance(m, type)]
    return [name for m in models if issubclass(m, BaseModel) for name in m.model_fields]


def _message(err: Mapping[str, Any]) -> str:
    """One pydantic error in YAML words: what is wrong, the nearest known key for a
    misspelt one, the value found for a type error (never a secret's)."""
    loc: Sequence[int | str] = err["loc"]
    kind = err["type"]
    if kind == "extra_forbidden":
        near = difflib.get_close_matches(str(loc[-1]), _known_keys(loc[:-1]), n=1)
        return f"unknown key (did you mean {near[0]}?)" if near else "unknown key"
    if kind == "missing":
        return "required key is missing"
    if kind in _SHAPE_ERRORS:  # YAML words, not Python ones ("a valid tuple")
        return f"{_SHAPE_ERRORS[kind]}, not {_kind(err.get('input'))}"
    if kind in ("too_short", "too_long") and isinstance(err.get("ctx"), Mapping):
        ctx = err["ctx"]
        bound = ctx.get("min_length") if kind == "too_short" else ctx.get("max_length")
        return f"must have at {'least' if kind == 'too_short' else 'most'} {bound} item(s)"
    msg = _TYPE_ERRORS.get(kind) or str(err["msg"]).removeprefix("Value error, ")
    msg = re.sub(r"^Input should be ", "must be ", msg)
    secret = any(isinstance(part, str) and _is_secret(part) for part in loc)
    if kind in _NO_ECHO or secret or "input" not in err:
        return msg
    return f"{msg} (got {_got(err['input'])})"


def _validation_problems(exc: ValidationError) -> list[ConfigProblem]:
    """Pydantic's errors as problems. A list whose items are wrong is also "too short"
    (it counts only valid items): that echo of the item's own error is left out."""
    errors = exc.errors()
    lists_with_bad_items = {
        tuple(e["loc"][:k])
        for e in errors
        for k, part in enumerate(e["loc"])
        if isinstance(part, int)
    }
    return [
        ConfigProblem(format_path(e["loc"]), _message(e))
        for e in errors
        if not (e["type"] == "too_short" and tuple(e["loc"]) in lists_with_bad_items)
    ]


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


def _cross_key_problems(doc: Mapping[str, Any]) -> list[ConfigProblem]:
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


def parse_config(doc: Any, *, base_dir: Path | None = None) -> Config:
    """Validate a loaded YAML document; raise ConfigError listing every problem."""
    if doc is None:
        raise ConfigError([ConfigProblem("", "the configuration is empty")])
    if not isinstance(doc, Mapping):
        raise ConfigError([ConfigProblem("", "the configuration must be a mapping of keys")])
    problems = _cross_key_problems(doc)
    config: Config | None = None
    try:
        config = Config.model_validate(doc)
    except ValidationError as exc:
        problems = _validation_problems(exc) + problems
    if problems or config is None:
        raise ConfigError(problems)
    if base_dir is not None:
        anchored = _anchored(config, base_dir)
        assert isinstance(anchored, Config)
        config = anchored
    return config


def _anchored(value: Any, base_dir: Path) -> Any:
    """``value`` with every relative path in it (state.dir, key and certificate files, CA
    files) made relative to ``base_dir``, the configuration file's folder: the same file
    means the same files whatever the working directory (check-config run by hand in
    /etc/warmrelay, serve run by systemd in /)."""
    if isinstance(value, Path):
        return value if value.is_absolute() else base_dir / value
    if isinstance(value, BaseModel):
        changed = {}
        for name in type(value).model_fields:
            old = getattr(value, name)
            new = _anchored(old, base_dir)
            if new is not old:
                changed[name] = new
        return value.model_copy(update=changed) if changed else value
    if isinstance(value, dict):
        items = {k: _anchored(v, base_dir) for k, v in value.items()}
        same = all(items[k] is v for k, v in value.items())
        return value if same else items
    if isinstance(value, tuple | list):
        anchored = [_anchored(v, base_dir) for v in value]
        if all(a is v for a, v in zip(anchored, value, strict=True)):
            return value
        return type(value)(anchored)
    return value


class _Loader(yaml.SafeLoader):
    """Safe YAML with two changes. Dates stay strings: pydantic then reports a bad date with
    its key path. A key given twice in one mapping is a problem (key path and both lines),
    not a silent "the second wins": an operator editing the first one would see no effect."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._duplicates: list[tuple[int, ConfigProblem]] = []  # (line, problem)
        self._paths: dict[int, list[int | str]] = {}  # id(node) -> where it first appears
        self._keys: dict[int, list[yaml.Node]] = {}  # id(mapping) -> its keys as written

    @property
    def duplicates(self) -> list[ConfigProblem]:
        """Keys given twice, in the order of the file."""
        return [problem for _, problem in sorted(self._duplicates, key=lambda d: d[0])]

    def get_single_data(self) -> Any:
        node = self.get_single_node()
        if node is None:
            return None
        self._index(node, [])
        return self.construct_document(node)

    def _index(self, node: yaml.Node, path: list[int | str]) -> None:
        """Record each node's key path and each mapping's keys before construction (which
        flattens ``<<`` merges in place). Anchors can make cycles: visit a node once."""
        if id(node) in self._paths:
            return
        self._paths[id(node)] = path
        if isinstance(node, yaml.MappingNode):
            self._keys[id(node)] = [k for k, _ in node.value]
            for key, value in node.value:
                name = key.value if isinstance(key, yaml.ScalarNode) else "?"
                self._index(value, [*path, str(name)])
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                self._index(item, [*path, i])

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        first_line: dict[Any, int] = {}
        for key_node in self._keys.get(id(node), ()):
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag.endswith(":merge"):
                continue  # "<<" merges are meant to be overridden; complex keys fail below
            key = self.construct_object(key_node)
            line = key_node.start_mark.line + 1
            if key in first_line:
                where = format_path([*self._paths.get(id(node), []), str(key_node.value)])
                message = f"duplicate key (lines {first_line[key]} and {line})"
                self._duplicates.append((line, ConfigProblem(where, message)))
            else:
                first_line[key] = line
        return super().construct_mapping(node, deep)


_Loader.add_constructor(
    "tag:yaml.org,2002:timestamp",
    lambda loader, node: loader.construct_scalar(node),  # type: ignore[arg-type]
)


class ConfigSyntaxError(ConfigError):
    """The file is not YAML. One problem, ``FILE:LINE:COLUMN: not valid YAML: what``, and
    the line it is on (``source``, or None): PyYAML's own text is nine lines about a
    "<unicode string>" that names neither the file nor, plainly, the line."""

    def __init__(self, problem: ConfigProblem, source: str | None) -> None:
        super().__init__([problem])
        self.source = source


def _source_line(mark: yaml.Mark) -> str | None:
    """``  LINE | text``: the line ``mark`` is on, or the last non-blank one before it (an
    error found at a blank line or the end of the file was made above it)."""
    if not isinstance(mark.buffer, str):
        return None
    lines = mark.buffer.rstrip("\0").split("\n")
    for n in range(min(mark.line, len(lines) - 1), -1, -1):
        text = lines[n].rstrip("\r ")
        if text.strip():  # control characters and tabs shown as escapes, not rung or lost
            text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
            return f"  {n + 1} | {text if len(text) <= 120 else text[:117] + '...'}"
    return None


def _syntax_error(path: Path, text: str, exc: yaml.YAMLError) -> ConfigSyntaxError:
    """``exc`` as one line naming file, line and column (1-based, as editors count), with
    what was being parsed when that helps (an unclosed bracket), and the source line."""
    if isinstance(exc, yaml.reader.ReaderError):  # a control character: only its offset
        line = text.count("\n", 0, exc.position)
        column = exc.position - (text.rfind("\n", 0, exc.position) + 1)
        mark = yaml.Mark(str(path), exc.position, line, column, text, exc.position)
        what = f"{exc.reason} (character U+{int(exc.character):04X})"
        where = f"{path}:{line + 1}:{column + 1}"
        problem = ConfigProblem("", f"{where}: not valid YAML: {what}")
        return ConfigSyntaxError(problem, _source_line(mark))
    if not isinstance(exc, yaml.MarkedYAMLError) or exc.problem_mark is None:
        text = " ".join(str(exc).split())
        return ConfigSyntaxError(ConfigProblem("", f"{path} is not valid YAML: {text}"), None)
    mark, context_mark = exc.problem_mark, exc.context_mark
    what = exc.problem or exc.context or "syntax error"
    if exc.problem and exc.context and context_mark is not None:
        what += f" ({exc.context} at line {context_mark.line + 1})"
    where = f"{path}:{mark.line + 1}:{mark.column + 1}"
    source = _source_line(mark)
    return ConfigSyntaxError(ConfigProblem("", f"{where}: not valid YAML: {what}"), source)


def config_error_lines(path: str | Path, exc: ConfigError) -> list[str]:
    """What check-config and serve print for a file that cannot be loaded (one formatter,
    so both say the same): a syntax error in at most two lines, else a count and every
    problem with its key path."""
    if isinstance(exc, ConfigSyntaxError):
        return [str(p) for p in exc.problems] + ([exc.source] if exc.source else [])
    return [f"{path}: {len(exc.problems)} error(s)", *(f"  {p}" for p in exc.problems)]


def load_config(path: str | Path) -> Config:
    """Read and validate a YAML file. Relative paths in it are relative to the file.

    Every problem is reported at once: duplicate keys together with validation errors."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([ConfigProblem("", f"cannot read {p}: {exc.strerror}")]) from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(
            [ConfigProblem("", f"{p} is not UTF-8 text (byte {exc.start} cannot be decoded)")]
        ) from None
    try:
        loader = _Loader(text)  # refuses control characters already
    except yaml.YAMLError as exc:
        raise _syntax_error(p, text, exc) from None
    try:
        doc = loader.get_single_data()
    except yaml.YAMLError as exc:
        raise _syntax_error(p, text, exc) from None
    except RecursionError:
        raise ConfigError([ConfigProblem("", f"{p} is nested too deeply")]) from None
    finally:
        loader.dispose()
    try:
        config = parse_config(doc, base_dir=p.resolve().parent)
    except ConfigError as exc:
        raise ConfigError(loader.duplicates + exc.problems) from None
    if loader.duplicates:
        raise ConfigError(loader.duplicates)
    return config


# -- what a reload changes ------------------------------------------------------------

_SECRET_WORDS = ("password", "secret", "token")


def _is_secret(name: str) -> bool:
    """Fields whose value is a secret (``password_hash``); ``*_env`` only names a variable."""
    lowered = name.lower()
    return any(w in lowered for w in _SECRET_WORDS) and not lowered.endswith("_env")


def redact_url(text: str) -> str:
    """A URL without its password (``redis://:***@host``, also ``?password=***``)."""
    if "://" not in text:
        return text
    parsed = urlparse(text)
    netloc = parsed.netloc
    if parsed.password is not None:
        userinfo, _, host = netloc.rpartition("@")
        netloc = f"{userinfo.partition(':')[0]}:***@{host}"
    query = re.sub(r"(?i)(^|&)(password|pass|token)=[^&]*", r"\1\2=***", parsed.query)
    return parsed._replace(netloc=netloc, query=query).geturl()


_ABSENT = object()  # a mapping key or an IP that one side does not have


def _show(value: Any, name: str = "") -> str:
    """A configuration value as a YAML editor would write it, secrets left out."""
    if value is _ABSENT:
        return "(absent)"
    if value is None:
        return "none"
    if _is_secret(name):
        return "***"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, str):
        return redact_url(value)
    if isinstance(value, Schedule):
        caps = ", ".join(str(c) for c in value.daily[:4])
        more = f", ... {value.daily[-1]}" if value.days > 4 else ""
        label = "" if value.name == "custom" else f"{value.name} "
        return f"{label}[{caps}{more}] ({value.days} days)"
    if isinstance(value, BaseModel):
        fields = [f for f in type(value).model_fields if f in value.model_fields_set]
        return "{" + ", ".join(f"{f}: {_show(getattr(value, f), f)}" for f in fields) + "}"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k}: {_show(v, str(k))}" for k, v in value.items()) + "}"
    if (
        isinstance(value, tuple)
        and len(value) == 2
        and isinstance(value[0], str)
        and isinstance(value[1], int)
    ):
        host, port = value
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(_show(v, name) for v in value) + "]"
    if isinstance(value, date):
        return value.isoformat()
    return str(value)


def _diff(old: Any, new: Any, path: list[int | str], out: list[str]) -> None:
    if old == new:
        return
    name = str(path[-1]) if path else ""
    if isinstance(old, BaseModel) and type(old) is type(new):
        for field in type(old).model_fields:
            _diff(getattr(old, field), getattr(new, field), [*path, field], out)
        return
    if isinstance(old, Mapping) and isinstance(new, Mapping):
        for key in [*old, *(k for k in new if k not in old)]:
            _diff(old.get(key, _ABSENT), new.get(key, _ABSENT), [*path, str(key)], out)
        return
    if path == ["ips"]:  # entries by address: one inserted is not a change of all after it
        before = {str(ip.address): ip for ip in old}
        after = {str(ip.address): ip for ip in new}
        for address in [*before, *(a for a in after if a not in before)]:
            _diff(before.get(address, _ABSENT), after.get(address, _ABSENT), [*path, address], out)
        return
    if (
        isinstance(old, tuple)
        and isinstance(new, tuple)
        and len(old) == len(new)
        and any(isinstance(v, BaseModel) for v in old)
    ):
        for i, (a, b) in enumerate(zip(old, new, strict=True)):
            _diff(a, b, [*path, i], out)
        return
    before_text, after_text = _show(old, name), _show(new, name)
    where = format_path(path)
    if before_text == after_text:  # only a secret part differs
        out.append(f"{where}: {before_text} (a secret changed; not shown)")
    else:
        out.append(f"{where}: {before_text} \u2192 {after_text}")


def describe_changes(old: Config, new: Config) -> list[str]:
    """What a reload changes, one "key.path: old \u2192 new" per value, in file order;
    secrets (password hashes, tokens, passwords in URLs) are never shown. Source IPs are
    named by address (``ips['127.0.0.2'].warmup.start``), added or removed ones as a whole."""
    out: list[str] = []
    _diff(old, new, [], out)
    return out


# -- checks beyond validity ------------------------------------------------------------
#
# A valid file can still be a mistake (warnings) or not fit the host it runs on. These
# return problems as data: check-config prints them, serve logs them, tests read them.


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
    return warnings


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


def admin_token(admin: AdminConfig) -> str | None:
    """The bearer token the admin endpoint requires (None: none configured, or no endpoint).

    Fails closed: if ``token_env`` names a variable that is unset or blank, this raises
    instead of returning None, so a missing secret never means an open endpoint."""
    if admin.token_env is None or admin.listen is None:
        return None
    token = os.environ.get(admin.token_env, "").strip()
    if not token:  # an empty or blank secret is as good as none
        raise ConfigError(
            [
                ConfigProblem(
                    "admin.token_env",
                    f"the environment variable {admin.token_env} is not set or empty; "
                    "refusing to run with an open admin endpoint (set it to a long random "
                    "secret, or remove admin.token_env)",
                )
            ]
        )
    return token


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


# -- what serve refuses at start -------------------------------------------------------
#
# A valid file can still be one `serve` refuses on this host. These checks are the ones it
# runs before anything starts; check-config runs the same function, because the systemd
# unit's ExecStartPre relies on it: a file check-config passes must not fail to start.


def _write_probe(directory: Path) -> OSError | None:
    """Why a file cannot be created in ``directory``, or None. An unnamed O_TMPFILE file
    (gone at close, never seen by a relay that runs there) tells it exactly, for root too
    (read-only file system, immutable directory); os.access where O_TMPFILE is missing."""
    flag = getattr(os, "O_TMPFILE", 0)
    if flag:
        try:
            os.close(os.open(directory, flag | os.O_WRONLY, 0o600))
            return None
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
                return exc
    if os.access(directory, os.W_OK | os.X_OK):
        return None
    read_only = os.statvfs(directory).f_flag & os.ST_RDONLY
    code = errno.EROFS if read_only else errno.EACCES
    return OSError(code, os.strerror(code))


def state_dir_problem(state_dir: Path) -> ConfigProblem | None:
    """Why serve could not create or write ``state.dir`` (its lock, counters and spool live
    there), or None. Creates nothing: a missing directory is judged by its nearest
    existing parent, which serve would create it in."""
    try:
        return _state_dir_problem(state_dir)
    except OSError as exc:  # not even a look: a parent directory that may not be entered
        return ConfigProblem("state.dir", f"{state_dir} cannot be reached: {exc.strerror}")


def _state_dir_problem(state_dir: Path) -> ConfigProblem | None:
    where = "state.dir"
    if not state_dir.exists():
        parent = state_dir.parent
        while not parent.exists() and not parent.is_symlink() and parent != parent.parent:
            parent = parent.parent
        if parent.is_symlink() and not parent.exists():
            reason = f"{parent} is a symbolic link to nothing"
        elif state_dir.is_symlink():
            reason = f"it is a symbolic link to nothing ({os.readlink(state_dir)})"
        elif not parent.is_dir():
            reason = f"{parent} is not a directory"
        elif (exc := _write_probe(parent)) is not None:
            reason = f"{parent}: {exc.strerror}"
        else:
            return None
        return ConfigProblem(where, f"{state_dir} cannot be created: {reason}")
    if not state_dir.is_dir():
        return ConfigProblem(where, f"{state_dir} is not a directory")
    # the directory itself, and the spools a relay (or a worker of --workers) left there:
    # a start on a read-only spool is refused (its deliveries could not be recorded)
    spools = sorted(
        d for d in state_dir.glob("spool*") if re.fullmatch(r"spool(-\d+)?", d.name) and d.is_dir()
    )
    for directory in [state_dir, *spools]:
        exc = _write_probe(directory)
        if exc is not None:
            return ConfigProblem(where, f"{directory} is not writable: {exc.strerror}")
    from warmrelay.operate.supervisor import (
        LOCK_NAME,  # the flock serve takes (supervisor imports us)
    )

    lock = state_dir / LOCK_NAME
    if lock.exists():
        try:
            os.close(os.open(lock, os.O_RDWR))  # no flock: a running relay keeps its lock
        except OSError as exc:
            return ConfigProblem(where, f"{lock} cannot be opened for writing: {exc.strerror}")
    return None


def _tls_problems(tls: TlsConfig) -> list[ConfigProblem]:
    """Why the listeners' certificate and key cannot be loaded, as serve loads them."""
    problems = []
    for name, path in (("cert", tls.cert), ("key", tls.key)):
        try:
            with path.open("rb"):
                pass
        except OSError as exc:
            problems.append(
                ConfigProblem(f"smtp.tls.{name}", f"cannot read {path}: {exc.strerror}")
            )
    if problems:
        return problems
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_verify_locations(cafile=tls.cert)  # parses the chain alone
    except (ssl.SSLError, ValueError):
        return [ConfigProblem("smtp.tls.cert", f"{tls.cert} is not a PEM certificate chain")]
    asked: list[bool] = []

    def no_passphrase() -> bytes:
        """Without this OpenSSL would prompt on the terminal for an encrypted key."""
        asked.append(True)
        return b""

    try:
        context.load_cert_chain(tls.cert, tls.key, password=no_passphrase)
    except ssl.SSLError as exc:
        if asked:
            message = f"{tls.key} is encrypted with a passphrase; store it without"
        elif exc.reason == "KEY_VALUES_MISMATCH":
            message = f"{tls.key} is not the key of {tls.cert}"
        else:
            message = f"{tls.key} is not a PEM private key for {tls.cert}"
        return [ConfigProblem("smtp.tls.key", message)]
    except OSError as exc:
        return [ConfigProblem("smtp.tls", f"cannot load {tls.cert} and {tls.key}: {exc}")]
    return []


def _listen_problem(where: str, address: tuple[str, int]) -> ConfigProblem | None:
    """Why serve could not listen on ``address`` here: not an address of this host, or a
    port below 1024 without the right to bind it. A port in use is no problem: the relay
    being checked or restarted may hold it right now."""
    host, port = address
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            return None
        hint = " (ports below 1024 need root or CAP_NET_BIND_SERVICE)" if port < 1024 else ""
        text = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        return ConfigProblem(where, f"{text} cannot be bound on this host: {exc.strerror}{hint}")
    return None


def start_problems(config: Config) -> list[ConfigProblem]:
    """Everything ``serve`` refuses to start with, beyond a valid file: an unset admin
    token, DKIM keys it cannot use, TLS files it cannot load, listening addresses it
    cannot bind, a state.dir it cannot create or write. check-config reports the same
    list, so it refuses what serve refuses."""
    from warmrelay.mail.dkim import load_keys  # dkim imports this module

    problems: list[ConfigProblem] = []
    for i, listener in enumerate(config.smtp.listen):
        problem = _listen_problem(f"smtp.listen[{i}].address", listener.address)
        problems += [problem] if problem is not None else []
    if config.admin.listen is not None:
        problem = _listen_problem("admin.listen", config.admin.listen)
        problems += [problem] if problem is not None else []
    try:
        admin_token(config.admin)
    except ConfigError as exc:
        problems += exc.problems
    try:
        load_keys(config.dkim)
    except ConfigError as exc:
        problems += exc.problems
    if config.smtp.tls is not None:
        problems += _tls_problems(config.smtp.tls)
    state = state_dir_problem(config.state.dir)
    if state is not None:
        problems.append(state)
    return problems
