"""The ``ips:`` section: each source IP, its EHLO name and weight, and the warmup block
of a warming IP (start, schedule, sending hours, per-provider caps, progress by calendar
or results, which mail is eligible). The values become the pure policy objects of
``warmrelay.warmup`` (``WarmupConfig.plan()``, ``eligibility()``)."""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from datetime import date, datetime
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, model_validator

from warmrelay.config.delivery import ConnectionsConfig
from warmrelay.config.values import Address, Frozen, HostName, yaml_kind
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


class ProviderCapConfig(Frozen):
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


class EligibleConfig(Frozen):
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
        f"must be a date written YYYY-MM-DD (e.g. 2026-11-27), not {yaml_kind(value)}; "
        "or leave start out to begin on the day the relay first sends from this IP"
    )


class WarmupConfig(Frozen):
    # day 1; None: the day the relay first routes mail from the IP (kept in the state store)
    start: Annotated[date, BeforeValidator(_start_date)] | None = None
    schedule: ScheduleField
    sending_hours: Annotated[SendingHours, BeforeValidator(_sending_hours)] | None = None
    providers: Mapping[str, ProviderCapConfig] = Field(default_factory=dict)
    # calendar: a day per calendar day; results: a day repeats unless it used its cap with
    # few throttles; reputation: each provider has its own day, moved by the controller
    progress: Literal["calendar", "results", "reputation"] = "calendar"
    # tighter than the pool while it warms: capped by these for every provider
    connections: ConnectionsConfig | None = None
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


class IPConfig(Frozen):
    address: Address
    helo: HostName
    weight: int = Field(default=1, gt=0)
    warmup: WarmupConfig | None = None

    @functools.cached_property
    def text(self) -> str:
        """The address as text, the key of everything kept per IP: made once (ipaddress
        builds the string anew on every str(), and routing asks for it per message)."""
        return str(self.address)
