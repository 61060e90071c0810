"""Rates per source IP and provider: what came back over what was handed over.

Three tallies per (IP, provider, local day) in the state store, shared by every worker
and relay on it: recipients handed over (counted by the delivery stage), out-of-band
bounces by class, and complaints. A rate is complaints (or hard bounces) over handed
over, today and over the last 7 days: the number Gmail's bulk-sender rules (spam rate
under 0.1 %, never 0.3 %) and the warmup controller look at.

Counting must never slow delivery down or fail it: ``note`` hands the write to a task
this object owns (awaited at ``close``); a store that fails costs the rate a few counts,
logged once per episode.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Sequence
from datetime import date, datetime, timedelta, tzinfo
from typing import Any, Literal

from warmrelay.errors import CounterError
from warmrelay.warmup.counters import CounterKey, Counters
from warmrelay.warmup.counters.base import tally

log = logging.getLogger("warmrelay.feedback")

Tallied = Literal["handed", "hard", "soft", "other", "complaint"]
WEEK_DAYS = 7


def key(ip: str, provider: str, day: date, what: Tallied) -> CounterKey:
    return CounterKey(ip, day.isoformat(), f"fb-{what}:{provider}")


class FeedbackCounts:
    def __init__(self, counters: Counters, zone: tzinfo) -> None:
        self._counters = counters
        self.zone = zone
        self._tasks: set[asyncio.Task[None]] = set()
        self._failing = False

    def note(self, ip: str, provider: str, what: Tallied, n: int, now: datetime) -> None:
        """Count ``n`` in the background (the caller never waits for the store)."""
        if n <= 0:
            return
        day = now.astimezone(self.zone).date()
        task = asyncio.get_running_loop().create_task(self._add(key(ip, provider, day, what), n))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _add(self, k: CounterKey, n: int) -> None:
        try:
            await tally(self._counters, [k], n)
        except CounterError as exc:
            if not self._failing:
                log.warning("feedback rates: cannot count %s (%s): the rate misses it", k, exc)
            self._failing = True
            return
        self._failing = False

    async def close(self) -> None:
        """Every count in flight written (or failed) first."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def rates(
        self, ips: Iterable[str], providers: Sequence[str], today: date
    ) -> dict[str, dict[str, dict[str, Any]]]:
        """Per IP and provider (only pairs that handed over or heard back): today's and
        the last 7 days' counts and rates, ``{"today": {...}, "week": {...}}`` each with
        handed, hard, soft, complaints, hard_rate, complaint_rate (null with nothing
        handed over)."""
        days = [today - timedelta(days=d) for d in range(WEEK_DAYS)]
        kinds: tuple[Tallied, ...] = ("handed", "hard", "soft", "complaint")
        wanted = [(ip, p, d, w) for ip in ips for p in providers for d in days for w in kinds]
        values = await self._counters.counts([key(*w) for w in wanted])
        found: dict[tuple[str, str], dict[str, dict[str, int]]] = {}
        for (ip, p, d, w), value in zip(wanted, values, strict=True):
            if not value:
                continue
            span = found.setdefault((ip, p), {"today": {}, "week": {}})
            for name in ("today", "week") if d == today else ("week",):
                span[name][w] = span[name].get(w, 0) + value
        out: dict[str, dict[str, dict[str, Any]]] = {}
        for (ip, p), spans in sorted(found.items()):
            out.setdefault(ip, {})[p] = {name: _rates(c) for name, c in spans.items()}
        return out


def _rates(c: dict[str, int]) -> dict[str, Any]:
    handed = c.get("handed", 0)
    hard, soft, complaints = c.get("hard", 0), c.get("soft", 0), c.get("complaint", 0)
    return {
        "handed": handed,
        "hard": hard,
        "soft": soft,
        "complaints": complaints,
        "hard_rate": hard / handed if handed else None,
        "complaint_rate": complaints / handed if handed else None,
    }
