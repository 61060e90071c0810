"""Fetching the reputation feeds: once per fleet, on a schedule, into the state store.

Every relay process runs the loop; each feed's next fetch time is one record
(``feed-due:{feed}``) taken by compare-and-set, so only the process that moves it fetches:
one SNDS request and one Postmaster query per ``reputation.fetch_every_s`` however many
workers and relays share the store. What a feed said goes to ``FeedStore`` per IP,
provider and day, with the day marked read; a failure marks the day unknown (never
healthy: the controller holds after ``unknown_days`` of it). Critical values act at once
(``Pairs.pause_now``): SNDS RED, and a Postmaster spam rate at the pause limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable, Sequence
from datetime import date, datetime, timedelta

from warmrelay.config import Config
from warmrelay.errors import CounterError
from warmrelay.feedback.token import feedback_label
from warmrelay.reputation.feeds import FeedError, FeedValue
from warmrelay.reputation.pairs import Pairs
from warmrelay.reputation.signals import OK, FeedStore
from warmrelay.warmup.counters import Counters

log = logging.getLogger("warmrelay.reputation")

DUE_PREFIX = "feed-due:"


class FeedRunner:
    def __init__(
        self,
        config: Callable[[], Config],
        counters: Counters,
        pairs: Callable[[], Pairs | None],
        clock: Callable[[], datetime],
    ) -> None:
        self._config = config
        self._counters = counters
        self._pairs = pairs
        self._clock = clock
        self.store = FeedStore(counters)
        self._task: asyncio.Task[None] | None = None
        self.fetched = asyncio.Event()  # set after every fetch this process made (tests)

    def start(self) -> None:
        r = self._config().reputation
        if r.snds is None and r.gmail_postmaster is None:
            return
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _loop(self) -> None:
        while True:
            every = self._config().reputation.fetch_every_s
            for feed in self._feeds():
                try:
                    if await self._claim(feed, every):
                        await self.fetch(feed)
                except CounterError as exc:  # the store is down: the next round tries again
                    log.warning("reputation: cannot schedule %s now: %s", feed, exc)
                except Exception:  # a bug must not end the loop
                    log.exception("reputation: fetching %s failed", feed)
            await asyncio.sleep(min(every, 60.0))

    def _feeds(self) -> list[str]:
        r = self._config().reputation
        return [f for f, on in (("snds", r.snds), ("postmaster", r.gmail_postmaster)) if on]

    async def _claim(self, feed: str, every: float) -> bool:
        """Move the feed's next fetch time forward if it is due: True for the one process
        (of the fleet) whose compare-and-set did it."""
        key = DUE_PREFIX + feed
        current = await self._counters.get_value(key)
        now = time.time()
        if current is not None and float(current) > now:
            return False
        return await self._counters.compare_and_set(key, current, f"{now + every:.3f}")

    async def fetch(self, feed: str) -> None:
        """One fetch of ``feed`` now: values stored, the days marked, critical values
        acted on. A failure marks yesterday unknown (and is logged once per fetch)."""
        config = self._config()
        now = self._clock()
        yesterday = now.astimezone(config.zone).date() - timedelta(days=1)
        try:
            values = await (self._snds() if feed == "snds" else self._postmaster(yesterday))
        except FeedError as exc:
            log.warning("reputation: %s unknown for %s: %s", feed, yesterday, exc)
            await self.store.mark(feed, yesterday, str(exc))
            self.fetched.set()
            return
        days = {v.day for v in values} | {yesterday}
        by_key: dict[tuple[str, str, date], dict[str, float | str]] = {}
        for v in values:
            by_key.setdefault((v.ip, v.provider, v.day), {})[v.signal] = v.value
        for (ip, provider, day), found in by_key.items():
            await self.store.put(ip, provider, day, found)
        for day in days:
            await self.store.mark(feed, day, OK)
        log.info(
            "reputation: %s read: %d value(s) for %s",
            feed,
            len(values),
            ", ".join(sorted(d.isoformat() for d in days)),
        )
        await self._critical(values, now)
        self.fetched.set()

    async def _critical(self, values: Sequence[FeedValue], now: datetime) -> None:
        pairs = self._pairs()
        if pairs is None:
            return
        t = self._config().reputation.thresholds
        latest: dict[tuple[str, str, str], FeedValue] = {}
        for v in values:
            k = (v.ip, v.provider, v.signal)
            if k not in latest or v.day > latest[k].day:
                latest[k] = v
        for v in latest.values():
            if v.signal == "snds_filter" and v.value == "RED":
                reason = f"SNDS RED on {v.day}"
            elif v.signal == "spam_rate" and isinstance(v.value, float):
                ladder = t.ladder("spam_rate", v.provider)
                if ladder.action(v.value) != "pause":
                    continue
                assert ladder.pause is not None
                reason = (
                    f"spam rate {v.value * 100:.2g} % \u2265 {ladder.pause * 100:.2g} % on {v.day}"
                )
            else:
                continue
            await pairs.pause_now(v.ip, v.provider, reason, {v.signal: v.value}, now)

    async def _snds(self) -> list[FeedValue]:
        from warmrelay.reputation.snds import fetch_snds, parse_snds

        config = self._config()
        snds = config.reputation.snds
        assert snds is not None
        url = os.environ.get(snds.url_env, "").strip()
        if not url:
            raise FeedError(f"the environment variable {snds.url_env} is not set")
        text = await fetch_snds(url, config.reputation.fetch_timeout_s)
        values, problems = parse_snds(text, [str(ip.address) for ip in config.ips])
        if problems:
            log.warning("reputation: snds: %d line(s) not read: %s", len(problems), problems[0])
        return values

    async def _postmaster(self, day: date) -> list[FeedValue]:
        from warmrelay.reputation.postmaster import fetch_postmaster

        config = self._config()
        pm = config.reputation.gmail_postmaster
        assert pm is not None
        identifiers = {str(ip.address): feedback_label(str(ip.address)) for ip in config.ips}
        return await asyncio.to_thread(
            fetch_postmaster,
            pm.credentials_file,
            list(pm.domains),
            identifiers,
            day,
            endpoint=pm.endpoint,
            timeout_s=config.reputation.fetch_timeout_s,
        )
