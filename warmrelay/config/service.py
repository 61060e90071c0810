"""The sections of the relay process itself, beside the data path: the admin endpoint
(``admin:``), where state is kept (``state:``), the DNS resolver (``dns:``) and the log
format (``log:``)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal
from urllib.parse import urlparse

from pydantic import Field, field_validator

from warmrelay.config.values import DnsServer, Frozen, Listen


class AdminConfig(Frozen):
    """The admin HTTP endpoint: metrics, health, status and the operator's actions."""

    listen: Listen | None = ("127.0.0.1", 9465)
    token_env: str | None = None  # bearer token (from this variable) for POST and /status
    # serve --workers: how long the supervisor waits for a worker's answer (queue tools,
    # /status); a worker that does not answer is left out and named, never waited for
    worker_timeout_s: float = Field(default=10.0, gt=0)

    @field_validator("token_env")
    @classmethod
    def _variable_name(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", value):
            raise ValueError(f"{value!r} is not an environment variable name")
        return value


class StateConfig(Frozen):
    """Where state lives: the directory (spool, lock, SQLite counters) and the counters
    backend (sqlite there, memory, or a Redis URL shared by a fleet)."""

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


class DnsConfig(Frozen):
    """The resolver of MX lookups and preflight; no nameservers: the system's."""

    nameservers: tuple[DnsServer, ...] = ()
    timeout_s: float = Field(default=5.0, gt=0)


class LogConfig(Frozen):
    """Log lines on stderr: text (one line per event) or json (one object per line)."""

    format: Literal["text", "json"] = "text"
