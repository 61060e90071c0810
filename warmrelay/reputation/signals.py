"""Signals per source IP, provider and local day: what the warmup controller judges, and
the rates operators read.

Two kinds, both in the state store (shared by every worker and relay on it):

- **tallies** (``PairCounts``): recipients tried and handed over, deferred, throttled,
  blocked and refused for good at RCPT (counted by the delivery stage), out-of-band
  bounces by class and complaints (counted by the feedback intake). Counting never
  slows delivery down: ``note`` hands the write to a task this object owns (awaited at
  ``flush``); a store that fails costs a few counts, logged once per episode.
- **feed values** (``FeedStore``): what Microsoft SNDS and Gmail Postmaster said of an IP
  and day, or that the feed could not be read (unknown, never healthy).

``Signals`` is one pair's day, with the rates the controller's ladders apply to.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, tzinfo
from typing import Any, Literal

from warmrelay.errors import CounterError
from warmrelay.warmup.counters import CounterKey, Counters
from warmrelay.warmup.counters.base import tally

log = logging.getLogger("warmrelay.reputation")

Tallied = Literal[
    "tried", "handed", "deferred", "throttled", "blocked", "rcpt_hard",
    "hard", "soft", "other", "complaint",
]  # fmt: skip
TALLIED: tuple[Tallied, ...] = (
    "tried", "handed", "deferred", "throttled", "blocked", "rcpt_hard",
    "hard", "soft", "other", "complaint",
)  # fmt: skip
WEEK_DAYS = 7
OTHER = "other"  # the provider label of a domain no rule recognises


def key(ip: str, provider: str, day: date, what: Tallied) -> CounterKey:
    return CounterKey(ip, day.isoformat(), f"pair-{what}:{provider}")


@dataclass(frozen=True)
class Signals:
    """One (IP, provider) pair's day: our own counts, and what the feeds said (a feed
    that could not be read is in ``unknown``, with why)."""

    counts: Mapping[str, int] = field(default_factory=dict)
    feeds: Mapping[str, float | str] = field(default_factory=dict)
    unknown: Mapping[str, str] = field(default_factory=dict)  # feed -> why
    given: Mapping[str, float] = field(default_factory=dict)  # rates known as such (simulate)

    def count(self, what: str) -> int:
        return int(self.counts.get(what, 0))

    def rates(self, min_sample: int) -> dict[str, float]:
        """Our own rates, only with at least ``min_sample`` recipients tried (fewer say
        nothing a ladder should act on), then the feeds' rates."""
        out: dict[str, float] = {}
        tried = self.count("tried")
        if tried >= min_sample:
            out["throttle_rate"] = self.count("throttled") / tried
            out["deferral_rate"] = self.count("deferred") / tried
            out["hard_bounce_rate"] = (self.count("rcpt_hard") + self.count("hard")) / tried
        handed = self.count("handed")
        if handed >= min_sample:
            out["complaint_rate"] = self.count("complaint") / handed
        for name in ("spam_rate", "delivery_error_rate"):
            value = self.feeds.get(name)
            if isinstance(value, int | float):
                out[name] = float(value)
        return {**out, **self.given}

    def to_json(self) -> dict[str, Any]:
        return {
            "counts": {k: v for k, v in self.counts.items() if v},
            "feeds": dict(self.feeds),
            "unknown": dict(self.unknown),
        }


class PairCounts:
    """Signals counted per (IP, provider, day) in the state store. Counting never holds up a
    delivery: notes add up in memory and one writer task takes whatever gathered while
    the previous write was with the store (one store operation per distinct amount, not
    one task and one operation per note: a delivery notes two or more)."""

    def __init__(self, counters: Counters, zone: tzinfo) -> None:
        self._counters = counters
        self.zone = zone
        self._due: dict[CounterKey, int] = {}
        self._writer: asyncio.Task[None] | None = None
        self._failing = False

    def note(self, ip: str, provider: str, what: Tallied, n: int, now: datetime) -> None:
        """Count ``n`` in the background (the caller never waits for the store)."""
        if n <= 0:
            return
        k = key(ip, provider, now.astimezone(self.zone).date(), what)
        self._due[k] = self._due.get(k, 0) + n
        if self._writer is None:
            self._writer = asyncio.get_running_loop().create_task(self._write())

    async def _write(self) -> None:
        try:
            while self._due:
                due, self._due = self._due, {}
                by_amount: dict[int, list[CounterKey]] = {}
                for k, n in due.items():
                    by_amount.setdefault(n, []).append(k)
                await asyncio.gather(*(self._add(keys, n) for n, keys in by_amount.items()))
        finally:
            self._writer = None

    async def _add(self, keys: list[CounterKey], n: int) -> None:
        try:
            await tally(self._counters, keys, n)
        except CounterError as exc:
            if not self._failing:
                log.warning("signals: cannot count %s (%s): the rates miss it", keys[0], exc)
            self._failing = True
            return
        self._failing = False

    async def flush(self) -> None:
        """Every count noted so far written (or failed)."""
        while self._writer is not None:
            await asyncio.wait([self._writer])

    async def day(self, ip: str, provider: str, day: date) -> dict[str, int]:
        """One pair's tallies of one day (CounterError when the store fails)."""
        values = await self._counters.counts([key(ip, provider, day, w) for w in TALLIED])
        return dict(zip(TALLIED, values, strict=True))

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


# -- feed values ----------------------------------------------------------------------------

FEED_PREFIX = "feed:"  # feed:{ip}|{provider}|{day}  -> {"signal": value, ...}
STATUS_PREFIX = "feed-status:"  # feed-status:{feed}|{day} -> "ok" or why it could not be read
OK = "ok"


class FeedStore:
    """What the feeds said, per IP, provider and day, in the value store (a fleet shares
    it: one process fetches, every process reads); and per feed and day whether it was
    read (a feed read without a line for an IP simply has nothing to say of it)."""

    def __init__(self, counters: Counters) -> None:
        self._counters = counters

    async def put(
        self, ip: str, provider: str, day: date, values: Mapping[str, float | str]
    ) -> None:
        name = f"{FEED_PREFIX}{ip}|{provider}|{day.isoformat()}"
        current = await self._counters.get_value(name)
        merged = {**(json.loads(current) if current else {}), **values}
        await self._counters.set_value(name, json.dumps(merged, sort_keys=True))

    async def get(self, ip: str, provider: str, day: date) -> dict[str, float | str]:
        text = await self._counters.get_value(f"{FEED_PREFIX}{ip}|{provider}|{day.isoformat()}")
        return dict(json.loads(text)) if text else {}

    async def mark(self, feed: str, day: date, status: str) -> None:
        """``OK`` (read), or why it could not be read (unknown). An "ok" is never undone
        by a later failure for the same day."""
        name = f"{STATUS_PREFIX}{feed}|{day.isoformat()}"
        if status != OK and await self._counters.get_value(name) == OK:
            return
        await self._counters.set_value(name, status[:300])

    async def status(self, feed: str, day: date) -> str | None:
        """``OK``, why the feed could not be read, or None: not asked yet."""
        return await self._counters.get_value(f"{STATUS_PREFIX}{feed}|{day.isoformat()}")
