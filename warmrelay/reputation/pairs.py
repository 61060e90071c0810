"""The (IP, provider) pairs of every ``progress: reputation`` warming IP: their state in
the store, the judgement of each finished day, and what the router asks of them.

Each pair's state is one record (``pair:{ip}|{provider}``) changed by compare-and-set,
so the processes and relays that share a store judge each day once: the first write
wins, the others read it back and judge nothing (one log line and one metric per
decision, from the process that made it). A day is judged once its feeds are in (a
value or an "unknown" mark for each feed that speaks for the provider), or two hours
past ``reputation.fetch_hour`` on the next day whatever they say.

The IP's own day is the furthest pair's (never past the schedule while a pair is still
warming), and it is warm once every pair is: a provider held back keeps its own, lower
cap in the meantime.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from datetime import date, datetime, timedelta
from typing import Any

from warmrelay.config import Config, IPConfig
from warmrelay.errors import CounterError
from warmrelay.reputation.controller import (
    FEEDS_OF,
    Decision,
    PairState,
    judge,
    pause_now,
    resumed,
)
from warmrelay.reputation.signals import OK, OTHER, FeedStore, PairCounts, Signals
from warmrelay.warmup.counters import Counters
from warmrelay.warmup.counters.base import update_value
from warmrelay.warmup.plan import pair_cap
from warmrelay.warmup.providers import provider_map

log = logging.getLogger("warmrelay.reputation")

PREFIX = "pair:"
LATE_H = 2  # hours past fetch_hour after which a day is judged without its feeds
CATCH_UP = 3  # more days than this judged at once: a summary line and the last ones

OnDecision = Callable[[str, str, Decision], None]


class Pairs:
    def __init__(
        self, config: Config, counters: Counters, signals: PairCounts | None = None
    ) -> None:
        self._config = config
        self._counters = counters
        # the relay's own tallies (what its deliveries count), or a reader of the store's
        self.signals = signals or PairCounts(counters, config.zone)
        self.feeds = FeedStore(counters)
        self.ips = [ip for ip in config.ips if ip.warmup and ip.warmup.progress == "reputation"]
        known = provider_map({n: (p.mx, p.domains) for n, p in config.providers.items()})
        self.providers = [*known.names, OTHER]
        self._known = set(known.names)
        self._state: dict[tuple[str, str], PairState] = {}
        self.on_decision: OnDecision | None = None  # metrics (the relay sets it)

    def carry_over(self, old: Pairs) -> None:
        """After a reload: what the old one read (re-read at the next refresh anyway)."""
        self._state = dict(old._state)
        self.on_decision = old.on_decision

    def label(self, provider: str | None) -> str:
        """The pair a delivery belongs to: its provider, or "other" for a domain no rule
        recognises (the router's provider is then the domain itself)."""
        return provider if provider in self._known else OTHER

    def feeds_for(self, provider: str) -> tuple[str, ...]:
        """The configured feeds that speak for ``provider``."""
        r = self._config.reputation
        configured = {"snds": r.snds is not None, "postmaster": r.gmail_postmaster is not None}
        return tuple(f for f, p in FEEDS_OF.items() if p == provider and configured[f])

    # -- what the router asks -------------------------------------------------------------

    def state(self, ip: str, provider: str) -> PairState:
        return self._state.get((ip, self.label(provider)), PairState())

    def ip_day(self, ip: IPConfig) -> int:
        """The IP's day: its furthest pair's, no further than the schedule's last day
        while some pair still warms (past it: warm, every pair done)."""
        assert ip.warmup is not None
        days = [self.state(str(ip.address), p).day for p in self.providers]
        last = ip.warmup.schedule.days
        if min(days) > last:
            return last + 1
        return min(max(days), last)

    # -- the store ------------------------------------------------------------------------

    async def load(self) -> None:
        """Re-read every pair's record (CounterError when the store cannot answer)."""
        for ip in self.ips:
            for provider in self.providers:
                text = await self._counters.get_value(_key(str(ip.address), provider))
                self._state[(str(ip.address), provider)] = PairState.loads(text)

    async def refresh(self, now: datetime, starts: Callable[[IPConfig], date | None]) -> None:
        """Judge every finished day of every pair whose feeds are in (see the module)."""
        local = now.astimezone(self._config.zone)
        today = local.date()
        for ip in self.ips:
            start = starts(ip)
            if start is None or today <= start:
                continue
            for provider in self.providers:
                known = self.state(str(ip.address), provider)
                if known.judged_to is not None and known.judged_to >= today:
                    continue
                await self._judge(ip, provider, start, local)

    async def _judge(self, ip: IPConfig, provider: str, start: date, local: datetime) -> None:
        address = str(ip.address)
        made: list[Decision] = []
        t = self._config.reputation.thresholds
        feeds = self.feeds_for(provider)

        async def change(text: str | None) -> str | None:
            made.clear()
            state = PairState.loads(text)
            if state.judged_to is None:
                state = PairState(judged_to=start)
            on = state.judged_to
            assert on is not None
            while on < local.date():
                signals = await self._signals(address, provider, on, feeds, self._late(on, local))
                if signals is None:
                    break  # a feed has not spoken for that day yet: judge it later
                state = judge(state, on, signals, provider, t, feeds)
                assert state.last is not None
                made.append(state.last)
                on += timedelta(days=1)
            return state.dumps()

        stored = await update_value(self._counters, _key(address, provider), change)
        self._state[(address, provider)] = PairState.loads(stored)
        if len(made) > CATCH_UP:  # days nobody judged (no relay ran): one line, not one a day
            tally: dict[str, int] = {}
            for d in made:
                tally[d.label] = tally.get(d.label, 0) + 1
            log.info(
                "%s %s: %d days judged at once (%s to %s): %s",
                address,
                provider,
                len(made),
                made[0].on,
                made[-1].on,
                ", ".join(f"{n} {label}" for label, n in sorted(tally.items())),
                extra={"ip": address, "provider": provider},
            )
        for i, decision in enumerate(made):
            self._said(address, provider, decision, quiet=i < len(made) - CATCH_UP)

    def _late(self, day: date, local: datetime) -> bool:
        due = datetime.combine(day + timedelta(days=1), datetime.min.time(), local.tzinfo)
        return local >= due + timedelta(hours=self._config.reputation.fetch_hour + LATE_H)

    async def _signals(
        self, ip: str, provider: str, day: date, feeds: Sequence[str], late: bool
    ) -> Signals | None:
        """One pair's day; None while a feed that speaks for it was not asked yet (until
        it is ``late``: then it is unknown)."""
        counts = await self.signals.day(ip, provider, day)
        values = await self.feeds.get(ip, provider, day)
        unknown: dict[str, str] = {}
        for feed in feeds:
            status = await self.feeds.status(feed, day)
            if status == OK:
                continue  # read: what it said (or nothing, for a quiet IP) is in values
            if status is None and not late:
                return None
            unknown[feed] = status or "not fetched"
        return Signals(counts, values, unknown)

    def _said(self, ip: str, provider: str, d: Decision, quiet: bool = False) -> None:
        """Log (unless ``quiet``: a catch-up's older days) and count a decision."""
        if self.on_decision is not None:
            self.on_decision(ip, provider, d)
        if quiet:
            return
        used = ", ".join(f"{k} {_show(v)}" for k, v in sorted(d.values.items()))
        log.info(
            "%s %s: %s (%s on %s)%s",
            ip,
            provider,
            d.label if d.action != "back" else f"back {d.days} days",
            d.reason,
            d.on.isoformat(),
            f"; signals: {used}" if used else "",
            extra={"ip": ip, "provider": provider, "action": d.label, "reason": d.reason},
        )

    # -- at once --------------------------------------------------------------------------

    async def pause_now(
        self, ip: str, provider: str, reason: str, values: dict[str, float | str], now: datetime
    ) -> bool:
        """A critical signal: pause the pair now (True when this call paused it)."""
        if ip not in {str(i.address) for i in self.ips}:
            return False
        today = now.astimezone(self._config.zone).date()
        t = self._config.reputation.thresholds
        return await self._apply(
            ip, self.label(provider), lambda st: pause_now(st, today, reason, values, t)
        )

    async def _apply(
        self, ip: str, provider: str, change: Callable[[PairState], PairState]
    ) -> bool:
        """One change of a pair's record by compare-and-set; True when this call made it
        (its decision is said once, here)."""
        made: list[Decision] = []

        async def text_change(text: str | None) -> str | None:
            made.clear()
            state = PairState.loads(text)
            after = change(state)
            if after is not state and after.last is not None:
                made.append(after.last)
            return after.dumps()

        stored = await update_value(self._counters, _key(ip, provider), text_change)
        self._state[(ip, provider)] = PairState.loads(stored)
        for decision in made:
            self._said(ip, provider, decision)
        return bool(made)

    async def check_now(self, ip: str, provider: str, now: datetime) -> bool:
        """Today's own rates so far (a complaint just came in): pause at once when one is
        at its pause limit (with enough recipients behind it)."""
        provider = self.label(provider)
        today = now.astimezone(self._config.zone).date()
        t = self._config.reputation.thresholds
        try:
            await self.signals.flush()
            signals = Signals(await self.signals.day(ip, provider, today))
        except CounterError:
            return False
        for name, value in signals.rates(t.min_sample).items():
            ladder = t.ladder(name, provider)
            if ladder.action(value) == "pause":
                limit = ladder.pause
                assert limit is not None
                reason = (
                    f"{name.replace('_', ' ')} {value * 100:.2g} % \u2265 {limit * 100:.2g} % today"
                )
                return await self.pause_now(ip, provider, reason, {name: value}, now)
        return False

    async def resume(self, ip: str, who: str, now: datetime) -> list[str]:
        """An operator resumes every paused pair of ``ip``; the providers resumed."""
        today = now.astimezone(self._config.zone).date()
        return [
            provider
            for provider in self.providers
            if await self._apply(ip, provider, lambda st: resumed(st, today, who))
        ]

    def status(self, ip: IPConfig) -> dict[str, dict[str, Any]]:
        """Per provider: its day, whether it is paused, the last decision and its values."""
        assert ip.warmup is not None
        out = {}
        plan = ip.warmup.plan()
        for provider in self.providers:
            st = self.state(str(ip.address), provider)
            day = st.day
            out[provider] = {
                "day": day,
                "cap": pair_cap(plan, provider, day),
                "paused_since": st.paused_since.isoformat() if st.paused_since else None,
                "last": st.last.to_json() if st.last else None,
            }
        return out


def _key(ip: str, provider: str) -> str:
    return f"{PREFIX}{ip}|{provider}"


def _show(value: float | str) -> str:
    if isinstance(value, float):
        return f"{value * 100:.2g} %"
    return str(value)
