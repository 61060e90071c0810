"""The counters interface shared by every backend."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from warmrelay.errors import CounterError


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

    async def release(self, keys: Sequence[CounterKey], n: int) -> None: ...

    async def get(self, key: CounterKey) -> int: ...

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
