"""Reserve from a shared counters store in another OS process (concurrency test).

Usage: counter_worker.py BACKEND TASKS CAP, BACKEND being "sqlite:PATH" or a
redis URL. Prints "ready", waits for a line on stdin (the start signal, so all
processes race), runs TASKS concurrent single-recipient reservations against
CAP and prints how many were granted.
"""

import asyncio
import sys
from pathlib import Path

from warmrelay.counters import CounterKey, Counters, Limit, SqliteCounters, open_counters


def open_backend(spec: str) -> Counters:
    if spec.startswith("sqlite:"):
        return SqliteCounters(Path(spec.removeprefix("sqlite:")))
    return open_counters(spec, Path("."))


async def main(spec: str, tasks: int, cap: int) -> None:
    counters = open_backend(spec)
    key = CounterKey("127.0.0.2", "2026-11-28")
    await counters.get(key)  # connect before the race
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    grants = await asyncio.gather(*(counters.reserve([Limit(key, cap)], 1) for _ in range(tasks)))
    await counters.close()
    print(sum(grants), flush=True)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])))
