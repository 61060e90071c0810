"""The running relay's preflight: a run at start in the background, ``GET /preflight``,
the warmrelay_preflight_ok / _unknown gauges, the log lines, and pausing a warming IP
found on a blocklist before any mail leaves from it.

Kept apart from ``run``: only the relay has a router (to pause IPs with), metrics and an
admin endpoint, while ``warmrelay preflight`` checks and changes nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

from warmrelay.config import Config
from warmrelay.mail.preflight.report import Check, Outcome, Report
from warmrelay.mail.preflight.run import Clock, Preflight
from warmrelay.operate.api import json_page
from warmrelay.warmup.plan import WarmupState

if TYPE_CHECKING:
    from warmrelay.operate.metrics import Metrics
    from warmrelay.warmup.router import Router

log = logging.getLogger("warmrelay.preflight")


class RelayPreflight:
    """Runs at start in the background (results in the log, ``GET /preflight`` and
    warmrelay_preflight_ok), then every ``preflight.every_s``, and pauses a warming IP
    found on a blocklist (``preflight.pause_listed``) as soon as the blocklists answered:
    a listing while warming is a critical signal. ``config`` and ``router`` are getters:
    a reload replaces both."""

    def __init__(
        self,
        config: Callable[[], Config],
        router: Callable[[], Router],
        metrics: Metrics,
        clock: Clock,
    ) -> None:
        self.config = config
        self.router = router
        self.metrics = metrics
        self.clock = clock
        self.latest: Report | None = None
        self._task: asyncio.Task[Report] | None = None
        self._again: asyncio.Task[None] | None = None
        self.ran = asyncio.Event()  # set after each run (tests wait for a rerun)

    async def start(self) -> None:
        """Begin a run when ``preflight.on_start``. Readiness waits only for the blocklist
        answers (at most ``preflight.timeout_s``), so a listed warming IP is paused before
        any mail flows; the other checks finish in the background."""
        config = self.config()
        self._again = asyncio.get_running_loop().create_task(self._rerun())
        if not config.preflight.on_start:
            return
        checked = asyncio.Event()
        self._task = self._begin(checked)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(checked.wait(), config.preflight.timeout_s)

    async def _rerun(self) -> None:
        """Every ``preflight.every_s`` (read at each round: a reload may change it), one
        more run once the previous one ended."""
        while True:
            every = self.config().preflight.every_s
            await asyncio.sleep(every or 60.0)
            if every is None or (self._task is not None and not self._task.done()):
                continue
            self._task = self._begin(asyncio.Event())
            with contextlib.suppress(Exception):  # logged by the run itself
                await asyncio.shield(self._task)

    async def report(self) -> Report:
        """The latest results; the running run's, or a new run's when there are none."""
        if self.latest is not None:
            return self.latest
        if self._task is None or self._task.done():
            self._task = self._begin(asyncio.Event())
        return await asyncio.shield(self._task)

    async def page(self) -> tuple[int, str, bytes]:
        try:
            return json_page((await self.report()).to_json())
        except Exception as exc:  # a bug must not cost the admin endpoint its answer
            return json_page({"error": f"preflight failed: {exc}"}, 500)

    async def stop(self) -> None:
        if self._again is not None:
            self._again.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._again
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task

    def _begin(self, checked: asyncio.Event) -> asyncio.Task[Report]:
        task = asyncio.get_running_loop().create_task(self._run(checked))
        task.add_done_callback(_retrieve)
        return task

    async def _run(self, checked: asyncio.Event) -> Report:
        paused: list[str] = []

        async def listed(checks: Sequence[Check]) -> None:
            try:
                paused.extend(await self._pause_listed(checks))
            finally:
                checked.set()

        try:
            report = await Preflight(self.config(), clock=self.clock).run(listed)
        except Exception:
            log.exception("preflight: the run failed")
            raise
        finally:
            checked.set()
        report = replace(report, paused=tuple(paused))
        self.latest = report
        self._gauges(report)
        self.ran.set()
        # one line per problem, not per check: a dead resolver or loopback IPs (as in the
        # example configuration) would otherwise bury the failures under identical lines
        if report.unchecked:
            log.warning("preflight: %s", report.unchecked)
        for c in report.shown():
            if c.outcome is not Outcome.PASS:
                level = logging.WARNING if c.outcome is Outcome.FAIL else logging.INFO
                log.log(
                    level, "preflight: %s %s %s: %s", c.subject, c.check, c.outcome.value, c.reason
                )
        for note in report.notes():
            log.info("preflight: %s", note)
        n = report.counts()
        log.info(
            "preflight: %d failed, %d unknown, %d passed (GET /preflight for details)",
            n["fail"],
            n["unknown"],
            n["pass"],
        )
        return report

    def _gauges(self, report: Report) -> None:
        gauge, unknown = self.metrics.preflight_ok, self.metrics.preflight_unknown
        gauge.clear()  # checks of IPs or domains no longer configured go away
        unknown.clear()
        for c in report.checks:
            value = c.outcome.gauge
            if value is not None:
                gauge.labels(c.subject, c.check).set(value)
            unknown.labels(c.subject, c.check).set(1 if value is None else 0)

    async def _pause_listed(self, checks: Sequence[Check]) -> list[str]:
        """Pause each warming IP found listed; never let it warm up silently."""
        listed: dict[str, list[Check]] = {}
        for c in checks:
            if c.outcome is Outcome.FAIL:
                listed.setdefault(c.subject, []).append(c)
        config, router, now = self.config(), self.router(), self.clock()
        paused: list[str] = []
        for ip in config.ips:
            entries = listed.get(str(ip.address))
            if not entries:
                continue
            address = str(ip.address)
            where = "; ".join(f"{c.check.removeprefix('dnsbl:')}: {c.reason}" for c in entries)
            state = router.status(ip, now).state
            if ip.warmup is None or state is WarmupState.WARM:
                log.warning(
                    "preflight: pool IP %s is listed (%s); it keeps sending", address, where
                )
            elif state is WarmupState.PAUSED:
                log.warning(
                    "preflight: warming IP %s is listed (%s); it stays paused", address, where
                )
            elif not config.preflight.pause_listed:
                log.warning(
                    "preflight: warming IP %s is listed (%s); NOT paused (preflight.pause_listed "
                    "is off)",
                    address,
                    where,
                )
            else:
                persisted = await router.pause(address, now)
                paused.append(address)
                log.warning(
                    "preflight: warming IP %s is listed (%s): its warmup is paused (%s); "
                    "resume it once delisted: warmrelay ip resume %s",
                    address,
                    where,
                    persisted.value,
                    address,
                )
        return paused


def _retrieve(task: asyncio.Task[Report]) -> None:
    """Done-callback: the exception of a run nobody awaits was logged already; fetching it
    keeps asyncio from reporting it again at exit."""
    if not task.cancelled():
        task.exception()
