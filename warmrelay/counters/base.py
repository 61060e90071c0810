"""The counters interface shared by every backend."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol


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

    async def close(self) -> None: ...


def grantable(counts: Sequence[int], caps: Sequence[int], n: int) -> int:
    """How many of ``n`` fit under every cap, given the current counts."""
    room = min((cap - count for count, cap in zip(counts, caps, strict=True)), default=n)
    return max(0, min(n, room))
