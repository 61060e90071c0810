"""The ``smtp:`` section: how applications reach the relay. Listeners (each with its
TLS mode, AUTH and PROXY protocol settings), the certificate, the users allowed to relay
after AUTH, the networks allowed without it, and the limits of a session."""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, Field, field_validator

from warmrelay.config.values import Frozen, HostName, Listen, Network, RelayNetwork, yaml_kind


def _listener(value: Any) -> Any:
    """ "host:port" is short for {address: "host:port"}."""
    if isinstance(value, str):
        return {"address": value}
    if not isinstance(value, (Mapping, BaseModel)):
        raise ValueError(
            f'must be "host:port" (e.g. "127.0.0.1:2525") or a mapping with an address, '
            f"not {yaml_kind(value)}"
        )
    return value


class ListenerConfig(Frozen):
    """One listening socket and its security settings."""

    address: Listen
    tls: Literal["none", "starttls", "implicit"] | None = None  # None: starttls if smtp.tls
    require_auth: bool = False  # even clients from allow_networks must authenticate
    auth_without_tls: bool = False  # offer AUTH in clear text (only for loopback setups)
    proxy_protocol: bool = False  # behind a TCP load balancer: PROXY v1/v2 header required
    # The load balancers allowed to send that header; any other peer is closed at connect
    # (required with proxy_protocol: else anyone reaching the port could claim any address)
    proxy_from: tuple[Network, ...] = ()


class TlsConfig(Frozen):
    cert: Path  # PEM certificate chain; reloaded when the file changes or on SIGHUP
    key: Path


class UserConfig(Frozen):
    """An application allowed to relay after AUTH, and the senders it may use."""

    password_hash: str  # from `warmrelay hash-password` (argon2id)
    senders: tuple[str, ...] = ()  # address, *@domain or domain patterns; empty = any

    @field_validator("password_hash")
    @classmethod
    def _is_argon2(cls, value: str) -> str:
        if not value.startswith("$argon2"):
            raise ValueError("must be an argon2 hash from `warmrelay hash-password`")
        return value


class SmtpConfig(Frozen):
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
