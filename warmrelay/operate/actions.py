"""The operator's queue actions and views (`warmrelay queue`, ``/queue``): list and show
what is queued, flush, hold, release, delete and bounce.

They act on the queue through the narrow interface the scheduler offers (``message``,
``queued``, ``cancel``, ``due``) and write dispositions through the Recorder, so the
scheduler keeps its one job. An operator's action and a send in flight race: the
operator wins (see ``delivery.attempt``), and an action that cannot be completed (a
bounce whose DSN cannot be stored) changes nothing and says so (``ActionResult.failed``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime

from warmrelay.delivery.dispositions import Recorder
from warmrelay.errors import SpoolError
from warmrelay.operate.queueview import ActionResult, MessageView, QueueState, RecipientView
from warmrelay.queue.messages import QueuedMessage, domain_of
from warmrelay.queue.scheduler import Scheduler
from warmrelay.queue.spool import Spool

log = logging.getLogger("warmrelay.queue")


@dataclass(frozen=True)
class Target:
    """What a queue action applies to: some queue ids, the recipients at one domain, or all."""

    queue_ids: tuple[str, ...] = ()
    domain: str | None = None
    everything: bool = False

    def messages(self, queued: Mapping[str, QueuedMessage]) -> list[str]:
        if self.everything:
            return list(queued)
        if self.domain is not None:
            d = self.domain.lower()
            return [
                q
                for q, m in queued.items()
                if any(domain_of(m.message.rcpt_tos[i]) == d for i in m.pending)
            ]
        return [q for q in self.queue_ids if q in queued]

    def recipients(self, state: QueuedMessage) -> list[int]:
        """The pending recipients it names in one message (a domain: only those there)."""
        if self.domain is None:
            return sorted(state.pending)
        d = self.domain.lower()
        return sorted(i for i in state.pending if domain_of(state.message.rcpt_tos[i]) == d)


class QueueActions:
    def __init__(
        self,
        scheduler: Scheduler,
        recorder: Recorder,
        spool: Spool,
        clock: Callable[[], datetime],
    ) -> None:
        self._queue = scheduler
        self._recorder = recorder
        self._spool = spool
        self._clock = clock

    # -- views ----------------------------------------------------------------

    def latest_reasons(self) -> dict[str, dict[str, object]]:
        """The latest deferral and bounce per provider (status page, /status)."""
        return self._recorder.latest_reasons()

    def views(self) -> list[MessageView]:
        """Every queued message as the queue tools show it, oldest first."""
        held = self._queue.held_until()
        states = sorted(self._queue.queued.values(), key=lambda m: m.message.received_at)
        return [_view(m, held.get(m.queue_id)) for m in states]

    def view(self, queue_id: str) -> MessageView | None:
        state = self._queue.message(queue_id)
        if state is None:
            return None
        return _view(state, self._queue.held_until().get(queue_id))

    # -- actions --------------------------------------------------------------

    def flush(self, target: Target) -> ActionResult:
        """Retry now what waits for a retry or a window (the router may hold it again);
        mail an operator holds stays held (counted in ``left_on_hold``)."""
        result = ActionResult()
        for queue_id in target.messages(self._queue.queued):
            state = self._queue.queued[queue_id]
            if state.on_hold:
                result.left_on_hold += 1
                continue
            waiting = self._queue.cancel(queue_id, set(target.recipients(state)))
            for delivery in waiting:
                self._queue.due(delivery.again())
            if waiting:
                result.queue_ids.append(queue_id)
        return result

    def hold(self, target: Target) -> ActionResult:
        """The operator's hold: nothing of these messages is sent until ``release`` (kept
        across restarts). A send waiting for a connection parks instead; one already under
        way finishes."""
        result = ActionResult()
        for queue_id in target.messages(self._queue.queued):
            state = self._queue.queued[queue_id]
            if state.on_hold:
                continue
            state.on_hold = True
            state.parked += self._queue.cancel(queue_id)
            self._spool.record_hold(queue_id, True)
            result.queue_ids.append(queue_id)
        return result

    def release(self, target: Target) -> ActionResult:
        """End the operator's hold: the parked deliveries are due now."""
        result = ActionResult()
        for queue_id in target.messages(self._queue.queued):
            state = self._queue.queued[queue_id]
            if not state.on_hold:
                continue
            state.on_hold = False
            for delivery in state.parked:
                self._queue.due(delivery.again())
            state.parked.clear()
            self._spool.record_hold(queue_id, False)
            result.queue_ids.append(queue_id)
        return result

    async def delete(self, target: Target, who: str) -> ActionResult:
        """Drop the named recipients without a DSN (the operator's decision, logged with
        who asked). A send waiting for a connection leaves them out; one already under
        way is only said and counted when it ends."""
        return await self._finish(target, who, None)

    async def bounce(self, target: Target, reason: str, who: str) -> ActionResult:
        """Fail the named recipients now with a DSN to the sender that gives ``reason``.
        A message whose DSN cannot be stored is left as it was (``failed``)."""
        return await self._finish(target, who, reason)

    async def _finish(self, target: Target, who: str, bounce_reason: str | None) -> ActionResult:
        result = ActionResult()
        now = self._clock()
        for queue_id in target.messages(self._queue.queued):
            state = self._queue.message(queue_id)
            if state is None:  # finished while an earlier DSN was stored
                continue
            indices = target.recipients(state)
            if not indices:
                continue
            try:
                finished = await self._recorder.finish_by_operator(
                    state.message, state.pending, indices, who, bounce_reason, now
                )
            except SpoolError as exc:
                result.failed[queue_id] = f"cannot store the DSN ({exc}): nothing changed"
                continue
            wanted = set(indices)
            self._queue.cancel(queue_id, wanted)
            state.parked = [p for p in state.parked if not set(p.indices) <= wanted]
            if finished:
                self._queue.forget(queue_id)
            result.queue_ids.append(queue_id)
        return result


def _view(state: QueuedMessage, held_until: float | None) -> MessageView:
    msg = state.message
    next_retry = min((at for _, _, at in state.timers.values()), default=None)
    if state.on_hold:
        where = QueueState.ON_HOLD
    elif next_retry is not None:  # (some of it may also be held: the retry shows first)
        where = QueueState.DEFERRED
    elif held_until is not None:
        where = QueueState.HELD
    else:  # due, routing, on a ready queue, being sent
        where = QueueState.ACTIVE
    recipients = tuple(
        RecipientView(
            address,
            "pending" if i in state.pending else "done",
            tuple(state.history.get(i, ())),
        )
        for i, address in enumerate(msg.rcpt_tos)
    )
    return MessageView(
        msg.queue_id,
        msg.mail_from,
        msg.received_at,
        msg.size,
        where,
        recipients,
        state.attempts,
        next_retry,
        held_until,
        state.last_ip,
        state.last_reply,
    )
