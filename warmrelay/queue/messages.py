"""What the queue holds: each queued message's state, and the deliveries it is cut into.

A spooled message becomes one ``Delivery`` per recipient domain (the unit the scheduler
moves between its queues and the delivery stage attempts). ``QueuedMessage`` is what
the queue knows of a message while it is queued: the recipients still pending, the
retry timers and parked deliveries the queue tools act on, and each recipient's last
few attempts for `warmrelay queue show`.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from warmrelay.delivery.replies import Reply
from warmrelay.queue.spool import SpooledMessage

HISTORY_MAX = 10  # attempts kept per recipient for `queue show`


def domain_of(address: str) -> str:
    return address.rpartition("@")[2].lower()


@dataclass
class Delivery:
    """Some recipients of one message, all at one domain: one unit of work."""

    queue_id: str
    domain: str
    indices: tuple[int, ...]
    attempts: int = 0
    last: Reply | None = None
    # released held mail: route only after ``after`` (the next older one) routed; ``turn``
    # is set once this one did (or gave up)
    after: asyncio.Future[None] | None = field(default=None, repr=False, compare=False)
    turn: asyncio.Future[None] | None = field(default=None, repr=False, compare=False)

    def again(self, indices: tuple[int, ...] | None = None) -> Delivery:
        """The same delivery (or some of its recipients) as a fresh unit of work: no
        place in a chain of released held mail."""
        return Delivery(
            self.queue_id, self.domain, self.indices if indices is None else indices,
            self.attempts, self.last,
        )  # fmt: skip


@dataclass(frozen=True)
class PastAttempt:
    """One recipient's outcome of one delivery attempt (`queue show`)."""

    at: float
    ip: str
    disposition: str  # delivered, deferred, bounced, expired, deleted
    reply: str


Timer = tuple[asyncio.TimerHandle, Delivery, float]  # the handle, what it retries, when


@dataclass
class QueuedMessage:
    message: SpooledMessage
    pending: set[int]
    attempts: int = 0
    timers: dict[int, Timer] = field(default_factory=dict)  # its deliveries waiting to retry
    on_hold: bool = False  # the operator's hold: deliveries park in ``parked`` until release
    parked: list[Delivery] = field(default_factory=list)
    history: dict[int, list[PastAttempt]] = field(default_factory=dict)  # per recipient
    tries: dict[int, int] = field(default_factory=dict)  # per recipient, since the start
    last_ip: str | None = None
    last_reply: str | None = None

    @property
    def queue_id(self) -> str:
        return self.message.queue_id

    def remember(self, rows: list[tuple[int, str, Reply]], ip: str, at: float) -> None:
        """Each recipient's latest attempts (memory only, a few each)."""
        for i, disposition, reply in rows:
            self.tries[i] = self.tries.get(i, 0) + 1
            attempts = self.history.setdefault(i, [])
            attempts.append(PastAttempt(at, ip, disposition, reply.line[:300]))
            del attempts[:-HISTORY_MAX]
            self.last_reply = reply.line[:300]
        if rows:
            self.last_ip = ip
