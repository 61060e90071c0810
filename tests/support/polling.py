"""Bounded polling, for state no event announces (a file on disk, a count in a store, a
value in another process). Prefer an event where there is one (``Sink.wait_until``,
``RelayProcess.wait_for_line``)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

INTERVAL_S = 0.05


async def eventually(
    check: Callable[[], bool | Awaitable[bool]],
    timeout_s: float = 15.0,
    what: str = "",
    interval_s: float = INTERVAL_S,
) -> None:
    """Until ``check()`` (a function or a coroutine function) is true; AssertionError
    naming ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = check()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout_s:g}s: {what or check}")
        await asyncio.sleep(interval_s)
