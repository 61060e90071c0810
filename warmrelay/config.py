"""Configuration: one YAML file loaded once into typed, frozen objects.

Validation is done by pydantic (unknown keys are errors, every problem is
reported with its key path, not only the first); the few rules that span
several keys (duplicate IPs, an overflow policy that needs a warm IP) are
checked here on the raw document so they are reported even when other keys
are wrong too.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
from collections.abc import Mapping, Sequence
from datetime import date
from pathlib import Path
from typing import Annotated, Any, Literal
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
    field_validator,
    model_validator,
)

from warmrelay.eligibility import Eligibility
from warmrelay.errors import ConfigError, ConfigProblem
from warmrelay.providers import BUILTIN
from warmrelay.warmup import (
    PRESETS,
    ProviderCap,
    Schedule,
    SendingHours,
    WarmupPlan,
    extend_to_target,
    ramp,
)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_HOSTNAME = re.compile(r"^(?=.{1,253}$)([A-Za-z0-9_]([A-Za-z0-9-_]{0,61}[A-Za-z0-9_])?\.?)+$")


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
    else:
        port = int(port_text)
    if not host:
        raise ValueError(f"{value!r} has no host")
    if not (0 if allow_zero else 1) <= port < 65536:
        raise ValueError(f"{value!r}: port must be 1-65535")
    return host, port


def _host_port(value: Any) -> tuple[str, int]:
    if isinstance(value, (tuple, list)) and len(value) == 2:
        return str(value[0]), int(value[1])
    return parse_host_port(str(value))


def _listen(value: Any) -> tuple[str, int]:
    """A listening address; port 0 picks a free port (tests)."""
    if isinstance(value, (tuple, list)) and len(value) == 2:
        value = f"[{value[0]}]:{value[1]}" if ":" in str(value[0]) else f"{value[0]}:{value[1]}"
    host, port = parse_host_port(str(value), allow_zero=True)
    _ip(host)
    return host, port


def _dns_server(value: Any) -> tuple[str, int]:
    host, port = parse_host_port(str(value), default_port=53)
    _ip(host)
    return host, port


def _hostname(value: str) -> str:
    if not _HOSTNAME.match(value):
        raise ValueError(f"{value!r} is not a host name")
    return value


HostPort = Annotated[tuple[str, int], BeforeValidator(_host_port)]
Listen = Annotated[tuple[str, int], BeforeValidator(_listen)]
DnsServer = Annotated[tuple[str, int], BeforeValidator(_dns_server)]
Address = Annotated[IPAddress, BeforeValidator(_ip)]
Network = Annotated[IPNetwork, BeforeValidator(_network)]
HostName = Annotated[str, AfterValidator(_hostname)]


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)


def _listener(value: Any) -> Any:
    """ "host:port" is short for {address: "host:port"}."""
    return {"address": value} if isinstance(value, str) else value


class ListenerConfig(_Frozen):
    """One listening socket and its security settings."""

    address: Listen
    tls: Literal["none", "starttls", "implicit"] | None = None  # None: starttls if smtp.tls
    require_auth: bool = False  # even clients from allow_networks must authenticate
    auth_without_tls: bool = False  # offer AUTH in clear text (only for loopback setups)
    proxy_protocol: bool = False  # behind a TCP load balancer: PROXY v1/v2 header required


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
    allow_networks: tuple[Network, ...] = (ipaddress.ip_network("127.0.0.0/8"),)
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


class WarmupConfig(_Frozen):
    start: date
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


class ThrottleConfig(_Frozen):
    """Replies that mean "this IP sends too much"; extra regexes match "CODE TEXT"."""

    patterns: tuple[str, ...] = ()
    cooldown_s: float = Field(default=3600.0, gt=0)
    cooldown_max_s: float = Field(default=86400.0, gt=0)
    providers: Mapping[str, CooldownConfig] = Field(default_factory=dict)

    @field_validator("patterns")
    @classmethod
    def _compiles(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for pattern in value:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"{pattern!r} is not a regular expression: {exc}") from None
        return value

    def cooldown(self, provider: str | None) -> tuple[float, float]:
        own = self.providers.get(provider or "")
        return (
            (own.cooldown_s, own.cooldown_max_s) if own else (self.cooldown_s, self.cooldown_max_s)
        )


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
    routes: Mapping[str, HostPort] = Field(default_factory=dict)
    providers: Mapping[str, ProviderConfig] = Field(default_factory=dict)

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


def _message(err: Mapping[str, Any]) -> str:
    if err["type"] == "extra_forbidden":
        return "unknown key"
    if err["type"] == "missing":
        return "required key is missing"
    msg = str(err["msg"])
    return msg.removeprefix("Value error, ")


def _cross_key_problems(doc: Mapping[str, Any]) -> list[ConfigProblem]:
    """Rules spanning several keys, checked on the raw document."""
    problems: list[ConfigProblem] = []
    ips = doc.get("ips")
    if ips == []:
        problems.append(ConfigProblem("ips", "list at least one source IP"))
    if not isinstance(ips, list):
        return problems
    seen: dict[str, int] = {}
    has_warm = False
    custom = doc.get("providers")
    known = {r.name for r in BUILTIN} | (set(custom) if isinstance(custom, Mapping) else set())
    for i, entry in enumerate(ips):
        if not isinstance(entry, Mapping):
            continue
        warmup = entry.get("warmup")
        caps = warmup.get("providers") if isinstance(warmup, Mapping) else None
        for name in caps if isinstance(caps, Mapping) else ():
            if name not in known:
                problems.append(
                    ConfigProblem(
                        f"ips[{i}].warmup.providers.{name}",
                        f"unknown provider (known: {', '.join(sorted(known))}; "
                        "define others under providers:)",
                    )
                )
        if entry.get("warmup") is None:
            has_warm = True
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
    smtp = doc.get("smtp")
    if isinstance(smtp, Mapping) and smtp.get("tls") is None:
        for i, entry in enumerate(smtp.get("listen") or []):
            if isinstance(entry, Mapping) and entry.get("tls") in ("starttls", "implicit"):
                problems.append(
                    ConfigProblem(f"smtp.listen[{i}].tls", "needs smtp.tls (cert and key)")
                )
    if doc.get("overflow") == "smarthost" and not isinstance(doc.get("smarthost"), Mapping):
        problems.append(
            ConfigProblem("smarthost", "overflow: smarthost needs a smarthost block (host: ...)")
        )
    if doc.get("overflow", "pool") == "pool" and not has_warm and ips:
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
        problems = [
            ConfigProblem(format_path(e["loc"]), _message(e)) for e in exc.errors()
        ] + problems
    if problems or config is None:
        raise ConfigError(problems)
    if base_dir is not None and not config.state.dir.is_absolute():
        state = config.state.model_copy(update={"dir": base_dir / config.state.dir})
        config = config.model_copy(update={"state": state})
    return config


class _Loader(yaml.SafeLoader):
    """Safe YAML, but dates stay strings: pydantic then reports a bad date with its key path."""


_Loader.add_constructor(
    "tag:yaml.org,2002:timestamp",
    lambda loader, node: loader.construct_scalar(node),  # type: ignore[arg-type]
)


def load_config(path: str | Path) -> Config:
    """Read and validate a YAML file. Relative paths in it are relative to the file."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([ConfigProblem("", f"cannot read {p}: {exc.strerror}")]) from exc
    try:
        doc = yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as exc:
        raise ConfigError([ConfigProblem("", f"{p} is not valid YAML: {exc}")]) from exc
    return parse_config(doc, base_dir=p.resolve().parent)
