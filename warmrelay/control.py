"""Per-IP state the operator and the receivers change: pause, completion, progress, suspensions.

Pure data and pure rules; the router persists it through the counters' value
store so it survives restarts and is shared by relays using one store.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from datetime import date, datetime


@dataclass
class IPControl:
    paused_since: date | None = None  # local date of the pause; None when running
    paused_days: int = 0  # whole days lost to earlier pauses (calendar progression)
    completed: bool = False  # the operator declared the warmup done: the IP is warm
    day: int | None = None  # progress: results -- the current warmup day...
    day_date: date | None = None  # ...and the local date it applies to
    suspended: dict[str, Suspension] = field(default_factory=dict)  # by provider

    def dumps(self) -> str:
        data = asdict(self)
        for key in ("paused_since", "day_date"):
            if data[key] is not None:
                data[key] = data[key].isoformat()
        data["suspended"] = {p: s.to_json() for p, s in self.suspended.items()}
        return json.dumps(data, sort_keys=True)

    @classmethod
    def loads(cls, text: str | None) -> IPControl:
        if not text:
            return cls()
        data = json.loads(text)

        def day(value: str | None) -> date | None:
            return date.fromisoformat(value) if value else None

        return cls(
            paused_since=day(data.get("paused_since")),
            paused_days=int(data.get("paused_days", 0)),
            completed=bool(data.get("completed", False)),
            day=data.get("day"),
            day_date=day(data.get("day_date")),
            suspended={
                p: Suspension.from_json(s) for p, s in (data.get("suspended") or {}).items()
            },
        )

    def pause(self, today: date) -> None:
        if self.paused_since is None:
            self.paused_since = today

    def resume(self, today: date) -> None:
        if self.paused_since is not None:
            self.paused_days += max(0, (today - self.paused_since).days)
            self.paused_since = None

    def calendar_day(self, start: date, today: date) -> int:
        """Days since the start, less the days spent paused: a pause does not advance."""
        day = (today - start).days + 1 - self.paused_days
        if self.paused_since is not None:
            day -= max(0, (today - self.paused_since).days)
        return day


@dataclass(frozen=True)
class Suspension:
    """A warming IP throttled by a provider: not used for it until ``until``."""

    until: datetime
    cooldown_s: float
    reason: str

    def to_json(self) -> dict[str, object]:
        return {
            "until": self.until.isoformat(),
            "cooldown_s": self.cooldown_s,
            "reason": self.reason,
        }

    @classmethod
    def from_json(cls, data: dict[str, object]) -> Suspension:
        return cls(
            datetime.fromisoformat(str(data["until"])),
            float(str(data["cooldown_s"])),
            str(data.get("reason", "")),
        )


REPEAT_WINDOW_S = 86400.0  # a new throttle within a day of the last cooldown's end doubles it


def next_cooldown(previous: Suspension | None, now: datetime, base_s: float, max_s: float) -> float:
    """Base cooldown, doubled for each repeat, up to the maximum."""
    if previous is None or (now - previous.until).total_seconds() > REPEAT_WINDOW_S:
        return base_s
    return min(max_s, max(base_s, previous.cooldown_s * 2))


def advances(sent: int, throttled: int, cap: int, min_use: float, max_throttle: float) -> bool:
    """progress: results -- a day counts when its cap was used enough without throttling."""
    if cap <= 0 or sent < min_use * cap:
        return False
    return throttled / sent < max_throttle if sent else True
