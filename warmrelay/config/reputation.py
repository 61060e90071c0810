"""The section of the warmup controller (``warmrelay.reputation``), the inputs and
thresholds of ``warmup.progress: reputation`` (``reputation:``): Microsoft SNDS, Gmail
Postmaster Tools, and the ladders that turn a signal into hold, back or pause. The
defaults follow published guidance; the README cites each source."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from warmrelay.config.values import Frozen

Action = Literal["advance", "hold", "back", "pause"]


class Ladder(Frozen):
    """Where a rate (a fraction: 0.001 = 0.1 %) stops the ramp: from ``hold`` it repeats
    the day, from ``back`` it steps back, from ``pause`` it sends nothing to that provider.
    A step left out is never taken."""

    hold: float | None = Field(default=None, ge=0, le=1)
    back: float | None = Field(default=None, ge=0, le=1)
    pause: float | None = Field(default=None, ge=0, le=1)

    @model_validator(mode="after")
    def _rising(self) -> Ladder:
        steps = [v for v in (self.hold, self.back, self.pause) if v is not None]
        if steps != sorted(steps):
            raise ValueError("hold <= back <= pause")
        return self

    def action(self, value: float) -> Action:
        if self.pause is not None and value >= self.pause:
            return "pause"
        if self.back is not None and value >= self.back:
            return "back"
        if self.hold is not None and value >= self.hold:
            return "hold"
        return "advance"

    def limit(self, action: Action) -> float | None:
        return {"hold": self.hold, "back": self.back, "pause": self.pause}.get(action)


class Ladders(Frozen):
    """The ladder of every rate signal (a provider may override some)."""

    # Gmail's bulk-sender rules: under 0.1 %, never 0.3 % (Postmaster spam rate)
    spam_rate: Ladder = Ladder(hold=0.001, back=0.002, pause=0.003)
    # complaints from feedback loops over what was handed over; Yahoo's ceiling is 0.3 %
    complaint_rate: Ladder = Ladder(hold=0.001, back=0.002, pause=0.003)
    # hard bounces (at RCPT and after the handover) over what was tried
    hard_bounce_rate: Ladder = Ladder(hold=0.02, back=0.05)
    # throttling replies over what was tried (as progress: results: max_throttle 2 %)
    throttle_rate: Ladder = Ladder(hold=0.02)
    # deferrals (4xx other than throttles) over what was tried
    deferral_rate: Ladder = Ladder(hold=0.1, back=0.3)
    # Postmaster's delivery error rate (rejected or temp-failed at Gmail)
    delivery_error_rate: Ladder = Ladder(hold=0.02, back=0.1)


class LadderOverrides(Frozen):
    """A provider's own ladders; each one given replaces the default one."""

    spam_rate: Ladder | None = None
    complaint_rate: Ladder | None = None
    hard_bounce_rate: Ladder | None = None
    throttle_rate: Ladder | None = None
    deferral_rate: Ladder | None = None
    delivery_error_rate: Ladder | None = None


class ThresholdsConfig(Ladders):
    back_days: int = Field(default=2, ge=1)  # a "back" steps back this many days
    recover_days: int = Field(default=3, ge=1)  # healthy days that end a pause
    unknown_days: int = Field(default=2, ge=1)  # a feed unknown this long: hold
    min_sample: int = Field(default=100, ge=1)  # our own rates need this many recipients
    providers: Mapping[str, LadderOverrides] = Field(default_factory=dict)

    def ladder(self, signal: str, provider: str) -> Ladder:
        own = self.providers.get(provider)
        found = getattr(own, signal, None) if own is not None else None
        ladder = found if found is not None else getattr(self, signal)
        assert isinstance(ladder, Ladder)
        return ladder


class SndsConfig(Frozen):
    url_env: str  # the variable holding the automated-access URL (its key is a secret)


class PostmasterConfig(Frozen):
    credentials_file: Path  # a service account's JSON key with Postmaster access
    domains: tuple[str, ...] = Field(min_length=1)  # the verified domains to read
    endpoint: str | None = None  # the API's root URL (default Google's; a proxy, a test)


class ReputationConfig(Frozen):
    snds: SndsConfig | None = None
    gmail_postmaster: PostmasterConfig | None = None
    fetch_hour: int = Field(default=6, ge=0, le=23)  # local hour: yesterday's feeds are out
    fetch_every_s: float = Field(default=3600.0, ge=1)  # one fetch per feed per fleet
    fetch_timeout_s: float = Field(default=60.0, gt=0)
    thresholds: ThresholdsConfig = ThresholdsConfig()
