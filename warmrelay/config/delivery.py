"""The sections of delivery, the way out: ``delivery:`` (concurrency, timeouts, retries,
queue lifetime), ``throttle:`` and ``blocks:`` (replies that blame the IP and how long it
rests), ``smarthost:`` (the overflow relay) and ``providers:`` (the operator's own
mailbox providers)."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, Field

from warmrelay.config.values import Frozen, HostName, HostPort


class DeliveryConfig(Frozen):
    """How deliveries are attempted and retried: concurrency, connections, timeouts, the
    retry backoff, the queue lifetime, STARTTLS towards next hops."""

    concurrency: int = Field(default=64, gt=0)
    # a provider no rule recognises: connections per (source IP, next hop), messages per
    # connection, idle seconds (gmail, microsoft, yahoo, apple have their own defaults;
    # providers.NAME.connections overrides either)
    connections_per_destination: int = Field(default=16, gt=0)
    max_messages_per_connection: int = Field(default=100, gt=0)
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
    # RFC 2920: with a receiver that offers PIPELINING, send MAIL, the RCPTs and DATA in
    # one write (one round trip instead of 2 + recipients); false: always lockstep
    pipelining: bool = True


class CooldownConfig(Frozen):
    """One provider's own cooldowns (``throttle.providers.NAME``)."""

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


class ThrottleConfig(Frozen):
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


class BlockConfig(Frozen):
    """Replies that blame the sending IP's reputation (5xx): never a bounce; the warming IP is
    suspended for that provider for a long, growing cooldown. Extra regexes match "CODE TEXT"."""

    patterns: Patterns = ()
    cooldown_s: float = Field(default=6 * 3600.0, gt=0)
    cooldown_max_s: float = Field(default=7 * 86400.0, gt=0)


class SmarthostConfig(Frozen):
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


class ConnectionsConfig(Frozen):
    """How one source IP may use connections to one provider: how many at once, how many
    messages each carries before it is closed (QUIT) and replaced, how long one is kept
    idle. A value left out is the default's (see README "Connections per provider")."""

    max_connections: int | None = Field(default=None, gt=0)
    max_messages_per_connection: int | None = Field(default=None, gt=0)
    idle_timeout_s: float | None = Field(default=None, ge=0)


class ProviderConfig(Frozen):
    """A mailbox provider of the operator's: MX host suffixes and/or recipient domains;
    or, under a built-in name (gmail, microsoft, yahoo, apple), only its connections."""

    mx: tuple[str, ...] = ()
    domains: tuple[str, ...] = ()
    connections: ConnectionsConfig | None = None
