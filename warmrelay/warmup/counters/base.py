"""The counters interface shared by every backend."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from warmrelay.errors import CounterError
from warmrelay.tokens import token_hex

log = logging.getLogger("warmrelay.counters")


@dataclass(frozen=True)
class CounterKey:
    """What is counted: recipients handed over from ``ip`` in ``window`` (e.g. a local date).

    ``scope`` narrows the count (a provider, an hour) so several caps can apply
    to one delivery; "all" is the IP's whole window.
    """

    ip: str
    window: str
    scope: str = "all"

    def encode(self) -> str:
        return f"{self.ip}|{self.window}|{self.scope}"


@dataclass(frozen=True)
class Limit:
    """A cap that a reservation must respect."""

    key: CounterKey
    cap: int


class Counters(Protocol):
    """Atomic reserve/release of recipient counts under caps.

    ``reserve`` grants up to ``n`` so that, after it, no key's count exceeds its
    cap, and increments every key by what it granted, as one atomic step across
    all callers of the backend (tasks, processes). It returns the number
    granted (0..n), so the router can send part of a delivery from a warming IP
    and the rest via the pool.
    """

    async def reserve(self, limits: Sequence[Limit], n: int) -> int: ...

    async def release(self, keys: Sequence[CounterKey], n: int, release_id: str) -> None:
        """Take ``n`` off every key (not below 0), once per ``release_id``: a release whose
        answer was lost (a timeout, a dropped connection) may have been applied, so the
        caller retries it with the same id and the store applies it at most once. The
        store remembers applied ids for ``RELEASE_ID_TTL_S``."""
        ...

    async def get(self, key: CounterKey) -> int: ...

    async def counts(self, keys: Sequence[CounterKey]) -> list[int]:
        """Many counts in one read (a status page asks for a week of them)."""
        ...

    async def get_value(self, key: str) -> str | None:
        """Small persistent state beside the counts (pause flags, warmup progress)."""
        ...

    async def set_value(self, key: str, value: str | None) -> None:
        """Store (or with None, delete) a value; survives restarts like the counts."""
        ...

    async def compare_and_set(self, key: str, expected: str | None, new: str | None) -> bool:
        """Store ``new`` (None: delete) only if the value is still ``expected`` (None:
        absent), as one atomic step across all callers; true if it was stored."""
        ...

    async def list_values(self, prefix: str) -> dict[str, str]:
        """Every stored value whose key starts with ``prefix`` (records kept one per item,
        e.g. suppressed addresses, listed without an index record to keep in step)."""
        ...

    async def close(self) -> None: ...


RELEASE_ID_TTL_S = 2 * 86400  # applied release ids are remembered this long (a retry comes
# within seconds or minutes; the ledger gives up on one after RELEASE_RETRY_GIVE_UP_S)


def new_release_id() -> str:
    """A release id unique across processes and hosts (a fleet shares one store)."""
    return token_hex(9)


UNCAPPED = 2**62  # the cap of a tally: a count kept for rates, never a limit


async def tally(counters: Counters, keys: Sequence[CounterKey], n: int) -> None:
    """Add ``n`` to every key, with no cap: what was handed over, bounced, complained of
    (batched with the reservations: one write for all)."""
    await counters.reserve([Limit(key, UNCAPPED) for key in keys], n)


def grantable(counts: Sequence[int], caps: Sequence[int], n: int) -> int:
    """How many of ``n`` fit under every cap, given the current counts."""
    room = min((cap - count for count, cap in zip(counts, caps, strict=True)), default=n)
    return max(0, min(n, room))


CAS_ATTEMPTS = 20  # a record changed by others this often in a row: give up (CounterError)
CAS_BACKOFF_MAX_S = 0.05  # random wait between attempts, doubling up to this: no livelock

Change = Callable[[str | None], Awaitable[str | None]]


async def update_value(
    counters: Counters, key: str, change: Change, attempts: int = CAS_ATTEMPTS
) -> str | None:
    """Read-modify-write of one value without lost updates: ``change`` maps the stored
    value to the new one and runs again on the fresh value whenever another process
    changed it in between (compare-and-set). Returns the value stored in the end."""
    for attempt in range(attempts):
        old = await counters.get_value(key)
        new = await change(old)
        if new == old or await counters.compare_and_set(key, old, new):
            return new
        await asyncio.sleep(random.uniform(0, min(CAS_BACKOFF_MAX_S, 0.001 * 2**attempt)))
    raise CounterError(f"value {key!r} changed by others {attempts} times in a row")


# -- coalescing: the reservations waiting in one process, applied as one batch ---------------

MAX_BATCH = 256  # operations per batch: one transaction or one script stays short


@dataclass(eq=False)
class Pending:
    """One reserve (``caps`` given: grant up to ``n`` under every cap) or release (``caps``
    None: take ``n`` off every key, not below 0, unless ``release_id`` was applied
    before) waiting for its batch. ``keys`` are the backend's names for the counters."""

    keys: tuple[str, ...]
    caps: tuple[int, ...] | None
    n: int
    future: asyncio.Future[int]
    release_id: str = ""


# Each operation's grant (0 for a release) or the error that kept it from the store
Answer = int | CounterError
Apply = Callable[[list[Pending]], Awaitable[list[Answer]]]


class Coalescer:
    """Reservations and releases made while the previous batch is with the store wait
    here; then all of them go as one batch (one write transaction, one script run).

    ``apply(batch)`` must evaluate the operations in order against the running counts, as
    one atomic step per part it sends (Redis: one script per IP), and return each one's
    answer: its grant (0 for a release), or the ``CounterError`` of its part; or raise
    ``CounterError``: then every operation of the batch fails with it. A failed operation
    may still have been applied (the store ran it, the answer was lost): a failed release
    is retried with its id, a failed reserve leaves the count too high (never too low).
    One batch is with the store at a time, so a batch is whatever arrived meanwhile: one
    operation when idle (no added wait), up to ``MAX_BATCH`` under load.

    A caller cancelled before its batch left is dropped from it; one cancelled while its
    batch was with the store has its grant given back (released in the next batch), as
    nobody will use it.
    """

    def __init__(self, apply: Apply) -> None:
        self._apply = apply
        self._pending: list[Pending] = []
        self._drainer: asyncio.Task[None] | None = None

    async def submit(
        self, keys: Sequence[str], caps: Sequence[int] | None, n: int, release_id: str = ""
    ) -> int:
        future = self._enqueue(keys, caps, n, release_id)
        return await future

    def give_back(self, keys: Sequence[str], n: int) -> None:
        """Release ``n`` on ``keys`` in a coming batch; nobody waits for it (a failure is
        logged: the count stays too high, never too low)."""
        future = self._enqueue(keys, None, n, new_release_id())
        future.add_done_callback(_log_lost_give_back)

    def _enqueue(
        self, keys: Sequence[str], caps: Sequence[int] | None, n: int, release_id: str
    ) -> asyncio.Future[int]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[int] = loop.create_future()
        self._pending.append(
            Pending(tuple(keys), None if caps is None else tuple(caps), n, future, release_id)
        )
        if self._drainer is None or self._drainer.get_loop() is not loop:  # (a loop closed)
            self._drainer = loop.create_task(self._drain())
        return future

    async def idle(self) -> None:
        """Until every queued operation was applied (or failed): for ``close``."""
        while self._drainer is not None:
            await asyncio.shield(self._drainer)

    async def _drain(self) -> None:
        batch: list[Pending] = []
        try:
            while self._pending:
                # a cancelled reserve is dropped; a release is made all the same (as before)
                batch = [
                    op
                    for op in self._pending[:MAX_BATCH]
                    if op.caps is None or not op.future.done()
                ]
                del self._pending[:MAX_BATCH]
                if not batch:
                    continue
                try:
                    answers = await self._apply(batch)
                except CounterError as exc:
                    _fail(batch, exc)
                    continue
                except Exception as exc:  # a bug: still no caller may hang or be granted
                    log.exception("counters batch failed")
                    _fail(batch, CounterError(f"counters batch failed: {exc!r}"))
                    continue
                for op, answer in zip(batch, answers, strict=True):
                    if isinstance(answer, CounterError):
                        _fail([op], answer)
                    elif not op.future.done():
                        op.future.set_result(answer)
                    elif op.caps is not None and answer:  # cancelled meanwhile
                        self.give_back(op.keys, answer)
                batch = []
        finally:
            if self._drainer is asyncio.current_task():
                self._drainer = None
                # cancelled itself (loop shutting down): nobody may wait forever
                for op in [*batch, *self._pending]:
                    op.future.cancel()
                self._pending.clear()


def _fail(batch: Sequence[Pending], exc: CounterError) -> None:
    for op in batch:
        if not op.future.done():
            error = CounterError(*exc.args)
            error.__cause__ = exc.__cause__
            op.future.set_exception(error)


def _log_lost_give_back(future: asyncio.Future[int]) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.warning(
            "a cancelled reservation could not be given back (%s): counted for its window",
            future.exception(),
        )
