"""In-memory counters: for tests and simulation; lost on exit."""

from __future__ import annotations

from collections.abc import Sequence

from warmrelay.warmup.counters.base import CounterKey, Limit, grantable


class MemoryCounters:
    """Atomic because reserve never awaits between read and write (one event loop)."""

    def __init__(self) -> None:
        self._counts: dict[CounterKey, int] = {}
        self._values: dict[str, str] = {}
        self._released: set[str] = set()  # lost with the process, as the counts are

    async def reserve(self, limits: Sequence[Limit], n: int) -> int:
        granted = grantable(
            [self._counts.get(lim.key, 0) for lim in limits], [lim.cap for lim in limits], n
        )
        if granted:
            for lim in limits:
                self._counts[lim.key] = self._counts.get(lim.key, 0) + granted
        return granted

    async def release(self, keys: Sequence[CounterKey], n: int, release_id: str) -> None:
        if release_id in self._released:
            return
        self._released.add(release_id)
        for key in keys:
            self._counts[key] = max(0, self._counts.get(key, 0) - n)

    async def get(self, key: CounterKey) -> int:
        return self._counts.get(key, 0)

    async def counts(self, keys: Sequence[CounterKey]) -> list[int]:
        return [self._counts.get(key, 0) for key in keys]

    async def get_value(self, key: str) -> str | None:
        return self._values.get(key)

    async def set_value(self, key: str, value: str | None) -> None:
        if value is None:
            self._values.pop(key, None)
        else:
            self._values[key] = value

    async def compare_and_set(self, key: str, expected: str | None, new: str | None) -> bool:
        if self._values.get(key) != expected:
            return False
        if new is None:  # no await between the check and the write
            self._values.pop(key, None)
        else:
            self._values[key] = new
        return True

    async def list_values(self, prefix: str) -> dict[str, str]:
        return {k: v for k, v in self._values.items() if k.startswith(prefix)}

    async def close(self) -> None:
        return None
