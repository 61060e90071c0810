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
high for the rest of the window: the ledger keeps it and gives it back when the
store answers again: on a timer with backoff, and at once when a reserve or
release shows that the store answers. A refused release may have been applied
all the same (the store ran it, its answer was lost to a timeout or a dropped
connection), so every retry carries the reservation's release id and the store
applies each id once: a retry never gives back twice, which would let the IP
send over its cap. One ERROR line per failure episode, one WARNING when it is
made good.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from types import TracebackType

from warmrelay.errors import CounterError
from warmrelay.warmup.counters import CounterKey, Counters
from warmrelay.warmup.counters.base import RELEASE_ID_TTL_S, new_release_id

log = logging.getLogger("warmrelay.router")

RELEASE_RETRY_FIRST_S = 1.0  # then doubling: a failing store is not hammered
RELEASE_RETRY_MAX_S = 60.0
# a release not made by then is given up (the store may have forgotten its id): its window
# is long over, and the count stays too high, never too low
RELEASE_RETRY_GIVE_UP_S = RELEASE_ID_TTL_S / 2

_Keys = tuple[CounterKey, ...]


class _Unreleased:
    """A release the store refused: retried with the same id until it is made."""

    __slots__ = ("counters", "keys", "n", "since")

    def __init__(self, counters: Counters, keys: _Keys, n: int, since: float) -> None:
        self.counters, self.keys, self.n, self.since = counters, keys, n, since


class Ledger:
    """The open reservations of one relay process, and the releases the store refused."""

    def __init__(self) -> None:
        self.open: set[Reservation] = set()
        self.on_change: Callable[[], None] | None = None  # ``unreleased`` changed
        self._unreleased: dict[str, _Unreleased] = {}  # by release id
        self._retrier: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._closing = False

    @property
    def unreleased(self) -> int:
        """Recipients still counted although their reservation was settled."""
        return sum(u.n for u in self._unreleased.values())

    def register(self, reservation: Reservation) -> None:
        """A new reservation: the store just answered a reserve, so retry the refused ones."""
        self.open.add(reservation)
        if self._unreleased:
            self._wake.set()

    async def release(self, counters: Counters, keys: _Keys, n: int, release_id: str) -> None:
        """Give ``n`` back on ``keys``, or keep it to retry. Runs as its own task: a cancelled
        caller (drain timeout) still returns its budget, or records that it could not."""
        task = asyncio.ensure_future(self._release(counters, keys, n, release_id))
        await asyncio.shield(task)

    async def _release(self, counters: Counters, keys: _Keys, n: int, release_id: str) -> None:
        try:
            await counters.release(keys, n, release_id)
        except CounterError as exc:  # the count stays high: safe, never over the cap
            if not self._unreleased:  # once per episode, not per reservation
                log.error(
                    "cannot give back %d reserved on %s (%s): counted until the store takes "
                    "it (retried; warmrelay_reservations_unreleased)",
                    n,
                    keys[0].ip,
                    exc,
                )
            self._keep(release_id, _Unreleased(counters, keys, n, time.monotonic()))
            return
        if self._unreleased:  # the store answers again: the refused ones too, now
            self._wake.set()

    def _keep(self, release_id: str, unreleased: _Unreleased) -> None:
        self._unreleased[release_id] = unreleased
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
        """One try of every refused release, each with its own id (applied at most once
        however often it is tried); True once none is left."""
        given = 0
        for release_id, u in list(self._unreleased.items()):
            if time.monotonic() - u.since > RELEASE_RETRY_GIVE_UP_S:
                log.error(
                    "gave up giving back %d reserved on %s after %.0f h: counted for its window",
                    u.n,
                    u.keys[0].ip,
                    RELEASE_RETRY_GIVE_UP_S / 3600,
                )
                del self._unreleased[release_id]
                self._changed()
                continue
            try:
                await u.counters.release(u.keys, u.n, release_id)
            except CounterError:
                return False
            given += u.n
            del self._unreleased[release_id]
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
        self.release_id = new_release_id()  # its one release, however often it is retried
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
            await self._ledger.release(self._counters, self.keys, give_back, self.release_id)

    async def __aenter__(self) -> Reservation:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.settle()
