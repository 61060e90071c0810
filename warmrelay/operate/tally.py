"""Today's routing in this process: what the status page says about overflow and pool traffic.

``warmrelay_routed_total`` counts since the process started, for Prometheus; an operator
looking at the page wants today's numbers. ``DayTally`` keeps them in memory, fed from the
same place that counter is counted (``Metrics.count_routed``), so the two never disagree:
recipients routed per (IP, reason), recipients each warming IP refused that went elsewhere
(per overflow reason), and the first time today a warming IP's day cap (or a provider's cap)
refused mail. Keyed by the relay's local date (config ``timezone``), emptied at the day
change. It lives and dies with the process: ``started`` says since when it counts, and a
supervisor merges its workers' snapshots (``merge``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, tzinfo
from typing import Any

CAP = "cap"  # OverflowReason.CAP.value: the day's cap is used up
PROVIDER_CAP = "provider cap"  # OverflowReason.PROVIDER_CAP.value
OVERFLOW = "overflow"  # RouteReason.OVERFLOW.value: a warming IP refused, elsewhere took it


@dataclass
class TallySnapshot:
    """One day's numbers (of one process, or merged): what ``/status`` shows as today's."""

    day: date
    started: datetime  # counting began then: earlier traffic (before a restart) is not in it
    routed: dict[str, dict[str, int]] = field(default_factory=dict)  # ip -> reason -> n
    overflow: dict[str, dict[str, int]] = field(default_factory=dict)  # warming ip -> why -> n
    # (warming ip, "" for the day cap or a provider's name) -> first refusal today
    cap_reached: dict[tuple[str, str], datetime] = field(default_factory=dict)

    def counted_since(self, zone: tzinfo) -> datetime | None:
        """When counting began, if that was today (None: the whole day is counted)."""
        return self.started if self.started.astimezone(zone).date() >= self.day else None

    def to_json(self) -> dict[str, Any]:
        """For a worker's answer to its supervisor."""
        return {
            "date": self.day.isoformat(),
            "started": self.started.isoformat(),
            "routed": self.routed,
            "overflow": self.overflow,
            "cap_reached": [
                [ip, scope, when.isoformat()] for (ip, scope), when in self.cap_reached.items()
            ],
        }

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> TallySnapshot:
        """The inverse of ``to_json``; ValueError, KeyError or TypeError if malformed."""
        return cls(
            date.fromisoformat(str(doc["date"])),
            datetime.fromisoformat(str(doc["started"])),
            {str(ip): _counts(by) for ip, by in dict(doc["routed"]).items()},
            {str(ip): _counts(by) for ip, by in dict(doc["overflow"]).items()},
            {(str(ip), str(s)): datetime.fromisoformat(str(w)) for ip, s, w in doc["cap_reached"]},
        )


def _counts(by: Mapping[str, Any]) -> dict[str, int]:
    return {str(k): int(v) for k, v in by.items()}


def _add(into: dict[str, dict[str, int]], key: str, sub: str, n: int) -> None:
    mine = into.setdefault(key, {})
    mine[sub] = mine.get(sub, 0) + n


def merge(snapshots: Iterable[TallySnapshot], day: date, started: datetime) -> TallySnapshot:
    """The workers' snapshots as one (``serve --workers``): counts add up, a cap was first
    reached at the earliest time any worker saw it refuse, and the whole counts only since the
    latest start among them (a worker restarted today lost what it had counted). Snapshots of
    another day are left out, except for their start."""
    out = TallySnapshot(day, started)
    for snap in snapshots:
        out.started = max(out.started, snap.started)
        if snap.day != day:
            continue
        for ip, by in snap.routed.items():
            for reason, n in by.items():
                _add(out.routed, ip, reason, n)
        for ip, by in snap.overflow.items():
            for why, n in by.items():
                _add(out.overflow, ip, why, n)
        for key, when in snap.cap_reached.items():
            out.cap_reached[key] = min(when, out.cap_reached.get(key, when))
    return out


class DayTally:
    """Today's counts of this process (see the module's docstring)."""

    def __init__(self, started: datetime | None = None) -> None:
        self.started = started or datetime.now(UTC)
        self._today = TallySnapshot(date.min, self.started)

    def count(
        self,
        ip: str,
        reason: str,
        n: int,
        refusals: Iterable[tuple[str, str, str | None]],
        now: datetime,
        zone: tzinfo,
    ) -> None:
        """``n`` recipients routed from ``ip`` (or "smarthost") for ``reason`` at ``now``;
        ``refusals``: (warming IP, overflow reason, provider) of each warming IP that did not
        take them."""
        today = self._day(now.astimezone(zone).date())
        _add(today.routed, ip, reason, n)
        for address, why, provider in refusals:
            if reason == OVERFLOW:
                _add(today.overflow, address, why, n)
            if why in (CAP, PROVIDER_CAP):
                scope = (provider or "") if why == PROVIDER_CAP else ""
                today.cap_reached.setdefault((address, scope), now)

    def snapshot(self, today: date) -> TallySnapshot:
        """Today's numbers (nothing yet when the last count was on another day)."""
        if self._today.day == today:
            return self._today
        return TallySnapshot(today, self.started)

    def _day(self, today: date) -> TallySnapshot:
        if self._today.day != today:  # the day changed: start again from nothing
            self._today = TallySnapshot(today, self.started)
        return self._today
