"""Counters: per (IP, window, scope) counts with atomic, capped reservations.

One interface, several backends: memory (tests, simulation), SQLite (the
embedded default; survives restarts and is shared by the relay processes of
one host), Redis (a fleet of relays sharing one budget). Use ``open_counters``
to get the one the configuration names.
"""

from __future__ import annotations

from pathlib import Path

from warmrelay.warmup.counters.base import CounterKey, Counters, Limit
from warmrelay.warmup.counters.memory import MemoryCounters
from warmrelay.warmup.counters.sqlite import SqliteCounters

__all__ = ["CounterKey", "Counters", "Limit", "MemoryCounters", "SqliteCounters", "open_counters"]


def open_counters(backend: str, state_dir: Path) -> Counters:
    """The backend named by ``state.counters``."""
    if backend == "memory":
        return MemoryCounters()
    if backend == "sqlite":
        return SqliteCounters(state_dir / "counters.sqlite3")
    if backend.startswith(("redis://", "rediss://", "unix://")):
        from warmrelay.warmup.counters.redis import RedisCounters  # only fleets need redis-py

        return RedisCounters(backend)
    raise ValueError(f"unknown counters backend {backend!r}")
