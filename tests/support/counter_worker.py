"""Reserve from a shared counters store in another OS process (concurrency tests).

Usage: counter_worker.py BACKEND TASKS CAP, BACKEND being "sqlite:PATH" or a
redis URL. Prints "ready", waits for a line on stdin (the start signal, so all
processes race), runs TASKS concurrent single-recipient reservations against
CAP and prints how many were granted.

Or: counter_worker.py BACKEND mix TASKS OPS SEED: TASKS concurrent tasks, each
of one KIND (day + hour + provider limits, as the router asks for a warming
IP). Prints "ready", waits for "go"; then each task makes OPS random steps,
reserving 1..4 or releasing part of what it holds; prints "churned" and waits
for "fill": then every task reserves 1..4 until the store grants nothing
more (nothing is released any more: full for good). Prints a JSON object:
what the tasks of each kind hold in the end, the grants that were 0 while
churning, and the errors.
"""

import asyncio
import json
import random
import sys
from pathlib import Path

from warmrelay.errors import CounterError
from warmrelay.warmup.counters import CounterKey, Counters, Limit, SqliteCounters, open_counters
from warmrelay.warmup.counters.base import new_release_id

IP = "127.0.0.2"
DAY = CounterKey(IP, "2026-11-28")
H08 = CounterKey(IP, "2026-11-28", "h08")
H09 = CounterKey(IP, "2026-11-28", "h09")
PROV_A = CounterKey(IP, "2026-11-28", "p:a")
PROV_B = CounterKey(IP, "2026-11-28", "p:b")
CAPS = {DAY: 600, H08: 300, H09: 250, PROV_A: 120, PROV_B: 400}
# kind -> the keys of its reservations: the day, an hour (per-hour smoothing), a provider
KINDS = {"A": (DAY, H08, PROV_A), "B": (DAY, H08, PROV_B), "C": (DAY, H09, PROV_B)}


def open_backend(spec: str) -> Counters:
    if spec.startswith("sqlite:"):
        return SqliteCounters(Path(spec.removeprefix("sqlite:")))
    return open_counters(spec, Path("."))


async def line() -> str:
    return await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)


async def single(spec: str, tasks: int, cap: int) -> None:
    counters = open_backend(spec)
    key = CounterKey("127.0.0.2", "2026-11-28")
    await counters.get(key)  # connect before the race
    print("ready", flush=True)
    await line()
    grants = await asyncio.gather(*(counters.reserve([Limit(key, cap)], 1) for _ in range(tasks)))
    await counters.close()
    print(sum(grants), flush=True)


async def mix(spec: str, tasks: int, ops: int, seed: int) -> None:
    counters = open_backend(spec)
    await counters.get(DAY)
    print("ready", flush=True)
    await line()
    held = {kind: 0 for kind in KINDS}
    zeros = 0
    errors = 0
    names = sorted(KINDS)

    async def churn(i: int) -> None:
        nonlocal zeros, errors
        rng = random.Random(seed * 1000 + i)
        kind = names[i % len(names)]
        limits = [Limit(k, CAPS[k]) for k in KINDS[kind]]
        mine = 0
        for _ in range(ops):
            try:
                if mine and rng.random() < 0.5:
                    give = rng.randint(1, mine)
                    await counters.release(KINDS[kind], give, new_release_id())
                    mine -= give
                else:
                    got = await counters.reserve(limits, rng.randint(1, 4))
                    zeros += got == 0
                    mine += got
            except CounterError:
                errors += 1
        held[kind] += mine

    await asyncio.gather(*(churn(i) for i in range(tasks)))
    print("churned", flush=True)
    await line()

    async def fill(i: int) -> None:
        nonlocal errors
        rng = random.Random(seed * 1000 + tasks + i)
        kind = names[i % len(names)]
        limits = [Limit(k, CAPS[k]) for k in KINDS[kind]]
        while True:
            try:
                got = await counters.reserve(limits, rng.randint(1, 4))
            except CounterError:
                errors += 1
                return
            if not got:
                return
            held[kind] += got

    await asyncio.gather(*(fill(i) for i in range(tasks)))
    await counters.close()
    print(json.dumps({"held": held, "zeros": zeros, "errors": errors}), flush=True)


if __name__ == "__main__":
    if sys.argv[2] == "mix":
        asyncio.run(mix(sys.argv[1], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])))
    else:
        asyncio.run(single(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])))
