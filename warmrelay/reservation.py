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

A release the store refuses (disk full, Redis away) would leave the count too
high for the rest of the window: the ledger keeps it (summed per key) and
gives it back when the store answers again: on a timer with backoff, and at
once when a reserve or release shows that the store answers. One ERROR line per
failure episode, one WARNING when it is made good.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from types import TracebackType

from warmrelay.counters import CounterKey, Counters
from warmrelay.errors import CounterError

log = logging.getLogger("warmrelay.router")

RELEASE_RETRY_FIRST_S = 1.0  # then doubling: a failing store is not hammered
RELEASE_RETRY_MAX_S = 60.0

_Keys = tuple[CounterKey, ...]


class Ledger:
    """The open reservations of one relay process, and the releases the store refused."""

    def __init__(self) -> None:
        self.open: set[Reservation] = set()
        self.on_change: Callable[[], None] | None = None  # ``unreleased`` changed
        self._unreleased: dict[tuple[Counters, _Keys], int] = {}
        self._retrier: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._closing = False

    @property
    def unreleased(self) -> int:
        """Recipients still counted although their reservation was settled."""
        return sum(self._unreleased.values())

    def register(self, reservation: Reservation) -> None:
        """A new reservation: the store just answered a reserve, so retry the refused ones."""
        self.open.add(reservation)
        if self._unreleased:
            self._wake.set()

    async def release(self, counters: Counters, keys: _Keys, n: int) -> None:
        """Give ``n`` back on ``keys``, or keep it to retry. Runs as its own task: a cancelled
        caller (drain timeout) still returns its budget, or records that it could not."""
        task = asyncio.ensure_future(self._release(counters, keys, n))
        await asyncio.shield(task)

    async def _release(self, counters: Counters, keys: _Keys, n: int) -> None:
        try:
            await counters.release(keys, n)
        except CounterError as exc:  # the count stays high: safe, never over the cap
            if not self._unreleased:  # once per episode, not per reservation
                log.error(
                    "cannot give back %d reserved on %s (%s): counted until the store takes "
                    "it (retried; warmrelay_reservations_unreleased)",
                    n,
                    keys[0].ip,
                    exc,
                )
            self._keep(counters, keys, n)
            return
        if self._unreleased:  # the store answers again: the refused ones too, now
            self._wake.set()

    def _keep(self, counters: Counters, keys: _Keys, n: int) -> None:
        self._unreleased[(counters, keys)] = self._unreleased.get((counters, keys), 0) + n
        self._changed()
        if self._retrier is None and not self._closing:
            self._retrier = asyncio.get_running_loop().create_task(self._retry())

    async def _retry(self) -> None:
        """Until every refused release went through: wait (backoff, or a wake-up), retry."""
        delay = RELEASE_RETRY_FIRST_S
        try:
            while True:
                self._wake.clear()
                if not self._closing:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), delay)
                if await self._give_back() or self._closing:
                    return  # never cut short: a release in flight must be accounted for
                delay = min(delay * 2, RELEASE_RETRY_MAX_S)
        finally:
            self._retrier = None

    async def _give_back(self) -> bool:
        """One try of every refused release; True once none is left."""
        given = 0
        for (counters, keys), n in list(self._unreleased.items()):
            try:
                await counters.release(keys, n)
            except CounterError:
                return False
            given += n
            left = self._unreleased.pop((counters, keys)) - n
            if left > 0:  # more were refused meanwhile
                self._unreleased[(counters, keys)] = left
            self._changed()
        if given:
            log.warning("gave back %d reserved recipient(s) whose release had failed", given)
        return not self._unreleased

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change()

    async def settle_all(self) -> None:
        """Shutdown: give back everything still held (queued or cut-short attempts), and
        what the store refused before, once more; what it still refuses is said once."""
        for reservation in list(self.open):
            await reservation.settle()
        self._closing = True
        if self._retrier is not None:  # its last try, now
            self._wake.set()
            await self._retrier
        elif self._unreleased:
            await self._give_back()
        if self._unreleased:
            log.error(
                "stopping with %d reserved recipient(s) the counters store refused to give "
                "back: counted against their windows",
                self.unreleased,
            )


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
        ledger.register(self)

    def keep(self, n: int) -> None:
        self.kept = min(self.count, self.kept + n)

    async def settle(self) -> None:
        if self._settled:
            return
        self._settled = True
        self._ledger.open.discard(self)
        give_back = self.count - self.kept
        if give_back > 0:
            await self._ledger.release(self._counters, self.keys, give_back)

    async def __aenter__(self) -> Reservation:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.settle()
