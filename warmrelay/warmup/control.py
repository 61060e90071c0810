"""Per-IP state the operator and the receivers change: pause, completion, progress, suspensions,
and the day a warmup without a configured start began.

Pure data and pure rules. The router persists it through the counters' value
store so it survives restarts and is shared by relays using one store. Each
fact is its own record (``Record``), changed by compare-and-set on that record
alone: a pause by one process, a throttle in another and a day advance in a
third never overwrite each other, which one blob per IP could not promise.

Record layout (keys of the value store, values JSON):

- ``ip:{addr}:pause``: ``{"since": date|null, "days": n}`` (they change together)
- ``ip:{addr}:completed``: ``{"done": bool, "on": date}`` (``true`` in earlier versions);
  ``warmrelay ip uncomplete`` stores ``done: false`` (never a deletion, see below)
- ``ip:{addr}:started``: ``{"on": date, "paused_days": n}``: the day a warming IP without
  ``warmup.start`` first routed mail (written once, first writer wins, by compare-and-set),
  and the days it had spent paused before (they do not delay its warmup)
- ``ip:{addr}:progress``: ``{"day": n, "on": date}`` (``progress: results``)
- ``ip:{addr}:suspended``: sorted list of the providers that ever suspended
  the IP (an index: providers are open-ended, any domain can be one)
- ``ip:{addr}:suspended:{provider}``: ``{"until", "cooldown_s", "reason"}`` (and
  ``"blocked": true`` when a reply blamed the IP's reputation)

Records are never deleted (an expired suspension is still the "previous" one
that doubles the next cooldown), so "absent" always means "never set", which
is what lets ``ip:{addr}`` (the single blob of earlier versions) be migrated
by filling only absent records.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Any, Generic, TypeVar

T = TypeVar("T")


def _day(value: object) -> date | None:
    return date.fromisoformat(str(value)) if value else None


def _json(value: object) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


@dataclass(frozen=True)
class Pause:
    """Paused since a local date (None: running), and whole days lost to earlier pauses."""

    since: date | None = None
    days: int = 0

    def paused(self, today: date) -> Pause:
        return self if self.since is not None else Pause(today, self.days)

    def resumed(self, today: date) -> Pause:
        if self.since is None:
            return self
        return Pause(None, self.days + max(0, (today - self.since).days))

    def dumps(self) -> str:
        return _json({"since": self.since.isoformat() if self.since else None, "days": self.days})

    @classmethod
    def loads(cls, text: str | None) -> Pause:
        if not text:
            return cls()
        data = json.loads(text)
        return cls(_day(data.get("since")), int(data.get("days", 0)))


@dataclass(frozen=True)
class Completion:
    """The operator declared the warmup done (``done``) or undid that, on local date ``on``
    (None: a record of an earlier version, which kept no date)."""

    done: bool = False
    on: date | None = None

    def completed(self, today: date) -> Completion:
        return self if self.done else Completion(True, today)

    def undone(self, today: date) -> Completion:
        return Completion(False, today) if self.done else self

    def dumps(self) -> str | None:
        if not self.done and self.on is None:
            return None  # never set: nothing to store
        return _json({"done": self.done, "on": self.on.isoformat() if self.on else None})

    @classmethod
    def loads(cls, text: str | None) -> Completion:
        if not text:
            return cls()
        data = json.loads(text)
        if isinstance(data, bool):  # earlier versions stored a bare true
            return cls(data, None)
        return cls(bool(data.get("done")), _day(data.get("on")))


@dataclass(frozen=True)
class Started:
    """A warmup without a configured start began ``on`` this local date (its first use);
    ``paused_days`` were spent paused before it and do not count against it."""

    on: date
    paused_days: int = 0

    def dumps(self) -> str:
        return _json({"on": self.on.isoformat(), "paused_days": self.paused_days})

    @classmethod
    def loads(cls, text: str | None) -> Started | None:
        if not text:
            return None
        data = json.loads(text)
        return cls(date.fromisoformat(str(data["on"])), int(data.get("paused_days", 0)))


@dataclass(frozen=True)
class Progress:
    """``progress: results``: the current warmup ``day`` and the local date it applies ``on``."""

    day: int
    on: date

    def dumps(self) -> str:
        return _json({"day": self.day, "on": self.on.isoformat()})

    @classmethod
    def loads(cls, text: str | None) -> Progress | None:
        if not text:
            return None
        data = json.loads(text)
        return cls(int(data["day"]), date.fromisoformat(str(data["on"])))


@dataclass(frozen=True)
class Suspension:
    """A warming IP throttled by a provider: not used for it until ``until``."""

    until: datetime
    cooldown_s: float
    reason: str
    blocked: bool = False  # a reply blaming the IP's reputation, not a throttle

    def to_json(self) -> dict[str, object]:
        data: dict[str, object] = {
            "until": self.until.isoformat(),
            "cooldown_s": self.cooldown_s,
            "reason": self.reason,
        }
        if self.blocked:
            data["blocked"] = True
        return data

    @classmethod
    def from_json(cls, data: dict[str, object]) -> Suspension:
        return cls(
            datetime.fromisoformat(str(data["until"])),
            float(str(data["cooldown_s"])),
            str(data.get("reason", "")),
            bool(data.get("blocked", False)),
        )

    def dumps(self) -> str:
        return _json(self.to_json())

    @classmethod
    def loads(cls, text: str | None) -> Suspension | None:
        return cls.from_json(json.loads(text)) if text else None


@dataclass(frozen=True)
class Record(Generic[T]):
    """One fact of an IP's control state: its key suffix and how its value is stored.

    ``dumps`` returning None means "nothing to store" (the record stays absent)."""

    name: str
    loads: Callable[[str | None], T]
    dumps: Callable[[T], str | None]

    def key(self, address: str) -> str:
        return f"ip:{address}:{self.name}"


def _dump_optional(value: Progress | Suspension | Started | None) -> str | None:
    return None if value is None else value.dumps()


def _load_names(text: str | None) -> frozenset[str]:
    return frozenset(json.loads(text)) if text else frozenset()


def _dump_names(names: frozenset[str]) -> str | None:
    return _json(sorted(names)) if names else None


PAUSE: Record[Pause] = Record("pause", Pause.loads, Pause.dumps)
COMPLETED: Record[Completion] = Record("completed", Completion.loads, Completion.dumps)
STARTED: Record[Started | None] = Record("started", Started.loads, _dump_optional)
PROGRESS: Record[Progress | None] = Record("progress", Progress.loads, _dump_optional)
SUSPENDED: Record[frozenset[str]] = Record("suspended", _load_names, _dump_names)


def suspension_record(provider: str) -> Record[Suspension | None]:
    """The suspension of an IP for ``provider`` ("" when the provider is unknown)."""
    return Record(f"suspended:{provider}", Suspension.loads, _dump_optional)


# What the operator may do to an IP: `warmrelay ip ACTION ADDRESS`, POST /ips/ADDRESS/ACTION
IP_ACTIONS = ("pause", "resume", "complete", "uncomplete")


class Persisted(enum.Enum):
    """Where a change of control state ended up."""

    STORED = "stored"  # in the shared store: every relay process sees it
    PENDING = "pending"  # the store failed: in force in this process, stored once it answers


def legacy_key(address: str) -> str:
    """Where earlier versions kept an IP's whole control state as one JSON blob."""
    return f"ip:{address}"


@dataclass
class IPControl:
    """What this process knows of one IP's records (re-read on refresh)."""

    pause: Pause = Pause()
    completion: Completion = Completion()  # done: the operator declared the IP warm
    progress: Progress | None = None
    suspended: dict[str, Suspension] = field(default_factory=dict)  # by provider
    started: Started | None = None  # first use of a warmup without a configured start

    @property
    def completed(self) -> bool:
        return self.completion.done

    @property
    def paused_since(self) -> date | None:
        return self.pause.since

    @property
    def paused_days(self) -> int:
        return self.pause.days

    @property
    def day(self) -> int | None:
        return self.progress.day if self.progress else None

    @property
    def day_date(self) -> date | None:
        return self.progress.on if self.progress else None

    def start(self, configured: date | None) -> date | None:
        """Day 1: the configured start, else the stored first use (None: not used yet)."""
        if configured is not None:
            return configured
        return self.started.on if self.started is not None else None

    def calendar_day(self, start: date, today: date) -> int:
        """Days since the start, less the days spent paused: a pause does not advance.
        Pauses before a first-use start (``started``) are not held against it."""
        day = (today - start).days + 1 - self.pause.days
        if self.started is not None and self.started.on == start:
            day += self.started.paused_days
        if self.pause.since is not None:
            day -= max(0, (today - self.pause.since).days)
        return day

    @classmethod
    def from_legacy(cls, text: str) -> IPControl:
        """The single JSON blob of earlier versions (read once, for migration)."""
        data: dict[str, Any] = json.loads(text)
        day, on = data.get("day"), _day(data.get("day_date"))
        return cls(
            pause=Pause(_day(data.get("paused_since")), int(data.get("paused_days", 0))),
            completion=Completion(bool(data.get("completed", False))),
            progress=Progress(int(day), on) if day is not None and on is not None else None,
            suspended={
                p: Suspension.from_json(s) for p, s in (data.get("suspended") or {}).items()
            },
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
