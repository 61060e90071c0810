"""The root of the configuration: ``Config``, one field per top-level key, each
section's model from its own module, and the top-level values that belong to no section
(``timezone``, ``overflow``, ``routes``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import Field, field_validator

from warmrelay.config.delivery import (
    BlockConfig,
    DeliveryConfig,
    ProviderConfig,
    SmarthostConfig,
    ThrottleConfig,
)
from warmrelay.config.events import EventsConfig
from warmrelay.config.feedback import BouncesConfig
from warmrelay.config.mail import DkimConfig, PreflightConfig, SuppressionConfig
from warmrelay.config.reputation import ReputationConfig
from warmrelay.config.service import AdminConfig, DnsConfig, LogConfig, StateConfig
from warmrelay.config.smtp import SmtpConfig
from warmrelay.config.values import Frozen, HostPort
from warmrelay.config.warmup import IPConfig


class Config(Frozen):
    """The whole file: one field per top-level key."""

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
    bounces: BouncesConfig | None = None
    reputation: ReputationConfig = ReputationConfig()
    events: EventsConfig = EventsConfig()
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
