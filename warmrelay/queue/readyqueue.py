"""Ready queues: routed sends waiting for a connection, one queue per lane: (source IP,
provider) for a recognised provider, (source IP, next hop) for any other domain.

As KumoMTA's ready queues: each queue has its own connection limit (the provider's
``max_connections``, else ``delivery.connections_per_destination``) and the whole relay a limit on
sends in progress (``delivery.concurrency``). A send takes a global slot
only once its own queue has a free connection, so a slow or blackholed
destination fills its own queue and never the slots other destinations need.
Queues are created on demand and dropped when empty.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Protocol

log = logging.getLogger("warmrelay.delivery")

FLOWING_S = 1.0  # a queue that finished a send this recently is draining, not stuck


class Job(Protocol):
    async def run(self) -> None:
        """Do the send (a free connection slot and a global slot are held meanwhile)."""

    async def drop(self) -> None:
        """Never run (shutdown): give back what the job holds; the mail stays spooled."""


@dataclass
class _Queue:
    jobs: collections.deque[Job] = field(default_factory=collections.deque)
    active: int = 0
    last_done: float = float("-inf")
    limit: int | None = None  # its own connection limit (a provider's), else the default


class ReadyQueues:
    def __init__(
        self,
        connections: Callable[[], int],
        concurrency: int,
        on_start: Callable[[], None] = lambda: None,
    ) -> None:
        self._connections = connections  # read on each start: follows reloads
        self._on_start = on_start  # a job left its queue (inflow control may let more in)
        self._slots = asyncio.Semaphore(concurrency)
        self._queues: dict[Hashable, _Queue] = {}
        self._runners: set[asyncio.Task[None]] = set()
        self._stopping = False
        self.running = 0  # jobs holding a global slot
        self.idle = asyncio.Event()
        self.idle.set()

    def put(self, key: Hashable, job: Job, limit: int | None = None) -> None:
        """Queue ``job`` on ``key``'s queue; ``limit``: that queue's connection limit (the
        latest given wins: a reload changes it), else the default."""
        queue = self._queues.setdefault(key, _Queue())
        queue.jobs.append(job)
        if limit is not None:
            queue.limit = limit
        connections = queue.limit if queue.limit is not None else self._connections()
        if queue.active < connections and not self._stopping:
            queue.active += 1
            self.idle.clear()
            task = asyncio.get_running_loop().create_task(self._drain(key, queue))
            self._runners.add(task)
            task.add_done_callback(self._runners.discard)

    @property
    def queued(self) -> int:
        """Jobs waiting for a connection or a global slot."""
        return sum(len(q.jobs) for q in self._queues.values())

    def pressure(self) -> int:
        """Jobs waiting in queues that are draining now (the relay, not the destination, is
        the bottleneck there): what inflow control weighs. A stuck destination's backlog
        does not slow down the intake of mail for everyone else."""
        now = time.monotonic()
        return sum(len(q.jobs) for q in self._queues.values() if now - q.last_done < FLOWING_S)

    async def _drain(self, key: Hashable, queue: _Queue) -> None:
        try:
            while queue.jobs and not self._stopping:
                async with self._slots:
                    if not queue.jobs or self._stopping:
                        break
                    job = queue.jobs.popleft()
                    self._on_start()
                    self.running += 1
                    try:
                        await job.run()
                    except Exception:  # a bug must not kill the queue; the mail stays spooled
                        log.exception("send to %s failed", key)
                    finally:
                        self.running -= 1
                        queue.last_done = time.monotonic()
        finally:
            queue.active -= 1
            if not queue.jobs and queue.active == 0 and self._queues.get(key) is queue:
                del self._queues[key]
            # another runner that ended in this same loop turn is done but still listed
            # (its done-callback runs later): it does not keep the queues busy
            me = asyncio.current_task()
            if all(t is me or t.done() for t in self._runners):
                self.idle.set()

    async def stop(self, drain_timeout_s: float) -> None:
        """Start nothing new; let sends in progress finish within the timeout, then cut them
        short (their reservations are given back as they unwind); drop what never started."""
        self._stopping = True
        if self._runners:
            try:
                await asyncio.wait_for(self.idle.wait(), drain_timeout_s)
            except TimeoutError:
                log.warning("drain timeout: %d send(s) cut short (they stay spooled)", self.running)
        for task in list(self._runners):
            task.cancel()
        await asyncio.gather(*self._runners, return_exceptions=True)
        for queue in self._queues.values():
            while queue.jobs:
                await queue.jobs.popleft().drop()
        self._queues.clear()
