"""The warmup controller's decision: pure policy, no I/O.

``progress: reputation`` gives each (IP, provider) pair its own warmup day. At each day
change the pair's last day is judged from its ``Signals``:

- each rate goes up its ladder (``reputation.thresholds``): hold, back N, pause;
- SNDS: YELLOW holds, RED pauses; a block by the provider holds;
- a feed that should speak for the provider (SNDS for microsoft, Postmaster for gmail)
  and could not be read is unknown, never healthy: after ``unknown_days`` such days in
  a row the pair holds, it does not advance blind;
- the most severe verdict wins (pause > back > hold > advance), and its reason says
  which value crossed which limit.

A pause steps the day back (``back_days``) and sends nothing to that provider from that
IP until an operator resumes it or ``recover_days`` healthy days in a row; then it
resumes at the day it was stepped back to (a hold, reason "resumed"). Critical signals
(SNDS RED, complaints over the pause limit) pause at once, not at the day change:
``pause_now``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from datetime import date, timedelta
from typing import Any

from warmrelay.config import ThresholdsConfig
from warmrelay.config.reputation import Action
from warmrelay.reputation.signals import Signals

SEVERITY: dict[Action, int] = {"advance": 0, "hold": 1, "back": 2, "pause": 3}
LADDERS = (
    "spam_rate",
    "complaint_rate",
    "hard_bounce_rate",
    "throttle_rate",
    "deferral_rate",
    "delivery_error_rate",
)
# the feeds that speak for a provider: unknown there holds after unknown_days
FEEDS_OF = {"snds": "microsoft", "postmaster": "gmail"}
_DAY = timedelta(days=1)


@dataclass(frozen=True)
class Decision:
    """What the controller decided for one pair and day, and why."""

    on: date  # the day judged
    action: Action
    days: int  # back: how many days; 0 otherwise
    reason: str
    values: dict[str, float | str] = field(default_factory=dict)  # the signals it used

    @property
    def label(self) -> str:
        return f"back {self.days}" if self.action == "back" else self.action

    def to_json(self) -> dict[str, Any]:
        return {
            "on": self.on.isoformat(),
            "action": self.label,
            "reason": self.reason,
            "values": self.values,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Decision:
        label = str(data["action"])
        action, _, n = label.partition(" ")
        return cls(
            date.fromisoformat(str(data["on"])),
            action,  # type: ignore[arg-type]
            int(n) if n else 0,
            str(data.get("reason", "")),
            dict(data.get("values") or {}),
        )


@dataclass(frozen=True)
class PairState:
    """One (IP, provider) pair's warmup: its day, the first day not judged yet, a pause,
    and the runs the next decisions depend on."""

    day: int = 1
    judged_to: date | None = None  # every day before this one is judged
    paused_since: date | None = None
    healthy: int = 0  # healthy days in a row while paused
    unknown: int = 0  # days in a row a feed for this provider could not be read
    last: Decision | None = None

    @property
    def paused(self) -> bool:
        return self.paused_since is not None

    def dumps(self) -> str:
        return json.dumps(
            {
                "day": self.day,
                "judged_to": self.judged_to.isoformat() if self.judged_to else None,
                "paused_since": self.paused_since.isoformat() if self.paused_since else None,
                "healthy": self.healthy,
                "unknown": self.unknown,
                "last": self.last.to_json() if self.last else None,
            },
            sort_keys=True,
            separators=(",", ":"),
        )

    @classmethod
    def loads(cls, text: str | None) -> PairState:
        if not text:
            return cls()
        data = json.loads(text)
        return cls(
            int(data["day"]),
            date.fromisoformat(data["judged_to"]) if data.get("judged_to") else None,
            date.fromisoformat(data["paused_since"]) if data.get("paused_since") else None,
            int(data.get("healthy", 0)),
            int(data.get("unknown", 0)),
            Decision.from_json(data["last"]) if data.get("last") else None,
        )


def _pct(value: float) -> str:
    return f"{value * 100:.2g} %" if value < 0.01 else f"{value * 100:.1f} %"


def verdicts(signals: Signals, provider: str, t: ThresholdsConfig) -> list[tuple[Action, str]]:
    """Every signal that stops the ramp, with its reason, most severe first."""
    found: list[tuple[Action, str]] = []
    for name, value in signals.rates(t.min_sample).items():
        ladder = t.ladder(name, provider)
        action = ladder.action(value)
        if action != "advance":
            limit = ladder.limit(action)
            assert limit is not None
            what = name.replace("_", " ")
            found.append((action, f"{what} {_pct(value)} \u2265 {_pct(limit)}"))
    snds = signals.feeds.get("snds_filter")
    if snds == "RED":
        found.append(("pause", "SNDS RED"))
    elif snds == "YELLOW":
        found.append(("hold", "SNDS YELLOW"))
    if signals.count("blocked"):
        found.append(("hold", f"blocked {signals.count('blocked')} time(s)"))
    found.sort(key=lambda v: -SEVERITY[v[0]])
    return found


def judge(
    state: PairState,
    on: date,
    signals: Signals,
    provider: str,
    t: ThresholdsConfig,
    feeds: tuple[str, ...] = (),
) -> PairState:
    """The pair's state after judging day ``on`` (``feeds``: those configured that speak
    for this provider; unknown ones count towards ``unknown_days``)."""
    values: dict[str, float | str] = {**signals.rates(t.min_sample), **_feed_labels(signals)}
    missing = [f for f in feeds if f in signals.unknown]
    unknown = state.unknown + 1 if missing else 0
    found = verdicts(signals, provider, t)
    if missing and unknown >= t.unknown_days:
        why = "; ".join(f"{f} {signals.unknown[f]}" for f in missing)
        found.append(("hold", f"{'/'.join(missing)} unknown for {unknown} days ({why})"))
        found.sort(key=lambda v: -SEVERITY[v[0]])
    base = replace(state, judged_to=on + _DAY, unknown=unknown)
    if state.paused:
        healthy = state.healthy + 1 if not found and not missing else 0
        if healthy >= t.recover_days:
            decision = Decision(on, "hold", 0, f"resumed: healthy for {healthy} days", values)
            return replace(base, paused_since=None, healthy=0, last=decision)
        why = found[0][1] if found else f"healthy {healthy} of {t.recover_days} days"
        decision = Decision(on, "pause", 0, f"paused since {state.paused_since}: {why}", values)
        return replace(base, healthy=healthy, last=decision)
    if not found:
        return replace(base, day=state.day + 1, last=Decision(on, "advance", 0, "healthy", values))
    action, reason = found[0]
    if action == "pause":
        return _paused(base, on, reason, values, t)
    if action == "back" and state.day > 1:
        day = max(1, state.day - t.back_days)
        return replace(base, day=day, last=Decision(on, "back", state.day - day, reason, values))
    if action == "back":  # day 1: no day to step back to, it repeats
        reason += " (day 1: nothing to step back to)"
    return replace(base, last=Decision(on, "hold", 0, reason, values))


def pause_now(
    state: PairState, on: date, reason: str, values: dict[str, float | str], t: ThresholdsConfig
) -> PairState:
    """A critical signal, acted on at once (SNDS RED, complaints over the pause limit)."""
    if state.paused:
        return state
    return _paused(state, on, reason, values, t)


def _paused(
    state: PairState, on: date, reason: str, values: dict[str, float | str], t: ThresholdsConfig
) -> PairState:
    day = max(1, state.day - t.back_days)
    decision = Decision(on, "pause", 0, reason, values)
    return replace(state, day=day, paused_since=on, healthy=0, last=decision)


def resumed(state: PairState, on: date, who: str) -> PairState:
    """An operator resumes a paused pair (at the day it was stepped back to)."""
    if not state.paused:
        return state
    decision = Decision(on, "hold", 0, f"resumed by {who}")
    return replace(state, paused_since=None, healthy=0, last=decision)


def _feed_labels(signals: Signals) -> dict[str, float | str]:
    return {k: v for k, v in signals.feeds.items() if isinstance(v, str)}
