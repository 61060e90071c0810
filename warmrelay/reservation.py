"""Reservations: recipients held under a warming IP's caps until the attempt ends.

The counting rule: a recipient counts against an IP's cap once a receiver
accepted it at RCPT and the attempt ended in a handover (or a final refusal
of the message). Every other ending — refused, greylisted, throttled,
blocked, a connection or TLS failure, cancellation, shutdown — gives the
reservation back. Like KumoMTA's reservation released on drop, the release
is guaranteed by construction, not by remembered calls: a reservation is
used as ``async with``, which settles it on every path (exceptions and
cancellation included), and every open reservation is registered in a
``Ledger`` that settles whatever is left at shutdown.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from types import TracebackType

from warmrelay.counters import CounterKey, Counters
from warmrelay.errors import CounterError

log = logging.getLogger("warmrelay.router")


class Ledger:
    """The open reservations of one relay process."""

    def __init__(self) -> None:
        self.open: set[Reservation] = set()

    async def settle_all(self) -> None:
        """Shutdown: give back everything still held (queued or cut-short attempts)."""
        for reservation in list(self.open):
            await reservation.settle()


class Reservation:
    """``count`` recipients reserved on ``keys``; ``keep(k)`` marks k of them as counted for
    good, and ``settle`` gives the rest back, exactly once."""

    def __init__(
        self, counters: Counters, keys: Sequence[CounterKey], count: int, ledger: Ledger
    ) -> None:
        self._counters = counters
        self.keys = tuple(keys)
        self.count = count
        self.kept = 0
        self._ledger = ledger
        self._settled = False
        ledger.open.add(self)

    def keep(self, n: int) -> None:
        self.kept = min(self.count, self.kept + n)

    async def settle(self) -> None:
        if self._settled:
            return
        self._settled = True
        self._ledger.open.discard(self)
        give_back = self.count - self.kept
        if give_back <= 0:
            return
        try:
            # shielded: a cancelled attempt still returns its budget
            await asyncio.shield(self._counters.release(self.keys, give_back))
        except CounterError as exc:  # the count stays high: safe, never over the cap
            log.error("cannot release %d reserved on %s: %s", give_back, self.keys[0].ip, exc)

    async def __aenter__(self) -> Reservation:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.settle()
