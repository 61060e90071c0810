"""Ready queues: idle is known the moment the last send ends, however many end at once."""

from __future__ import annotations

import asyncio

from warmrelay.queue.readyqueue import ReadyQueues


class Job:
    def __init__(self, go: asyncio.Event) -> None:
        self.go = go
        self.done = asyncio.Event()

    async def run(self) -> None:
        await self.go.wait()
        self.done.set()

    async def drop(self) -> None:
        self.done.set()


async def test_sends_ending_in_the_same_loop_turn_leave_the_queues_idle() -> None:
    """Two destinations whose sends end together: a stop after them must not wait its
    drain timeout (each runner used to see the other still listed)."""
    queues = ReadyQueues(lambda: 1, 4)
    go = asyncio.Event()
    jobs = [Job(go), Job(go)]
    queues.put("a", jobs[0])
    queues.put("b", jobs[1])
    await asyncio.sleep(0)  # both runners start and wait
    assert not queues.idle.is_set()
    go.set()  # both end in one loop turn
    await asyncio.gather(*(j.done.wait() for j in jobs))
    for _ in range(3):
        await asyncio.sleep(0)  # the runners' finally blocks
    assert queues.idle.is_set()
    await asyncio.wait_for(queues.stop(30.0), 10.0)  # no drain wait (its timeout is 30 s)
