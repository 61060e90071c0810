"""Reserve from a shared SQLite counter file in another OS process (concurrency test).

Prints "ready", waits for a line on stdin (the start signal, so all processes
race), runs TASKS concurrent single-recipient reservations against CAP and
prints how many were granted.
"""

import asyncio
import sys
from pathlib import Path

from warmrelay.counters import CounterKey, Limit, SqliteCounters


async def main(path: str, tasks: int, cap: int) -> None:
    counters = SqliteCounters(Path(path))
    key = CounterKey("127.0.0.2", "2026-11-28")
    await counters.get(key)  # open the database before the race
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    grants = await asyncio.gather(*(counters.reserve([Limit(key, cap)], 1) for _ in range(tasks)))
    await counters.close()
    print(sum(grants), flush=True)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])))
