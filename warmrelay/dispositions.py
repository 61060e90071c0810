"""Dispositions: what became of each recipient of an attempt, written down.

One log line per recipient outcome, the metrics, the spool's record of
finished recipients, and a DSN to the sender for bounced and expired ones
(stored in the spool before the original's recipients are marked done).
The scheduler decides *when* to try again; this module only records and
says which recipients are left.

What a receiver took stays taken: a recipient leaves the pending set before
the spool is asked to write that down, and a spool that cannot write keeps the
record in memory (see ``spool``) instead of failing, so a full or read-only
disk never turns a delivery into a resend.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

from warmrelay.dsn import FailedRecipient, build_dsn
from warmrelay.errors import WarmrelayError
from warmrelay.metrics import Metrics
from warmrelay.replies import Reply
from warmrelay.spool import Spool, SpooledMessage
from warmrelay.suppression import SuppressionList

log = logging.getLogger("warmrelay.delivery")

MAX_BACKOFF_EXPONENT = 30  # 2**30 x retry_first_s is past any retry_max_s: no overflow


@dataclass
class Verdicts:
    """Recipients (by index in the message) of one attempt, sorted by what happens next."""

    delivered: list[tuple[int, Reply]] = field(default_factory=list)
    failed: list[tuple[int, Reply, str]] = field(default_factory=list)  # bounced / expired
    retry: list[tuple[int, Reply]] = field(default_factory=list)  # deferred: after a backoff
    reroute: list[tuple[int, Reply]] = field(default_factory=list)  # deferred: routed again now


def domain_of(address: str) -> str:
    return address.rpartition("@")[2].lower()


def retry_delay(attempts: int, first_s: float, max_s: float, expires_in_s: float) -> float:
    """Exponential backoff between ``first_s`` and ``max_s``; the last retry lands on the
    expiry. Once expired (a DSN that could not be stored yet) it keeps backing off: an
    expiry retried at once would spin."""
    delay = min(first_s * float(2 ** min(max(0, attempts - 1), MAX_BACKOFF_EXPONENT)), max_s)
    return min(delay, expires_in_s) if expires_in_s > 0 else delay


class Recorder:
    def __init__(
        self,
        spool: Spool,
        metrics: Metrics,
        hostname: Callable[[], str],
        accept: Callable[[SpooledMessage, bytes], None],
        read: Callable[[str], bytes],
        suppression: SuppressionList | None = None,
    ) -> None:
        self._spool = spool
        self._metrics = metrics
        self._hostname = hostname
        self._accept = accept  # a stored DSN enters the queue like any message
        self._read = read
        self._suppression = suppression  # hard bounces go on it

    async def record(
        self,
        msg: SpooledMessage,
        pending: set[int],
        v: Verdicts,
        *,
        ip: str,
        reason: str,
        now: datetime,
    ) -> bool:
        """Log, count and write down final recipients; remove them from ``pending`` first.
        Returns True when the message is finished (nothing pending). Failed recipients
        whose DSN cannot be stored move to ``v.retry``."""
        for i, reply in v.delivered:
            self._log(msg, i, ip, reason, "delivered", reply, now)
        for i, reply, disposition in v.failed:
            self._log(msg, i, ip, reason, disposition, reply, now)
        for i, reply in (*v.retry, *v.reroute):
            self._log(msg, i, ip, reason, "deferred", reply, now)
        if v.failed and not await self._notify(msg, v.failed, now):
            v.retry += [(i, reply) for i, reply, _ in v.failed]  # DSN not stored: try later
            v.failed = []
        if self._suppression is not None:  # a final bounce saying the address is dead
            for i, reply, disposition in v.failed:
                if disposition == "bounced":
                    await self._suppression.bounced(msg.rcpt_tos[i], reply, now, msg.queue_id)
        finals = [(i, "delivered") for i, _ in v.delivered] + [(i, d) for i, _, d in v.failed]
        finishing = pending.issubset(i for i, _ in finals)
        for disposition in {d for _, d in finals}:
            idx = [i for i, d in finals if d == disposition]
            pending.difference_update(idx)  # first: whatever the disk says, they are done
            self._metrics.deliveries.labels(ip, disposition).inc(len(idx))
            if not finishing:  # a finished message is removed at once: nothing to record
                self._spool.mark_done(msg.queue_id, idx, disposition)
        deferred = len(v.retry) + len(v.reroute)
        if deferred:
            self._metrics.deliveries.labels(ip, "deferred").inc(deferred)
        return not pending

    def _log(
        self,
        msg: SpooledMessage,
        i: int,
        ip: str,
        reason: str,
        disposition: str,
        reply: Reply,
        now: datetime,
    ) -> None:
        rcpt = msg.rcpt_tos[i]
        log.info(
            "%s: to=<%s> domain=%s ip=%s reason=%s relay=%s delay=%.2fs %s (%s)",
            msg.queue_id,
            rcpt,
            domain_of(rcpt),
            ip,
            reason or "-",
            reply.hop or "none",
            max(0.0, now.timestamp() - msg.received_at),
            disposition,
            reply.line[:300],
        )

    async def _notify(
        self, msg: SpooledMessage, failed: Sequence[tuple[int, Reply, str]], now: datetime
    ) -> bool:
        """Store a DSN to the sender for failed recipients; False if the spool refused it."""
        if not msg.mail_from:  # never bounce a bounce (RFC 5321 §4.5.5)
            return True
        recipients = [
            FailedRecipient(
                address=msg.rcpt_tos[i],
                status="4.4.7" if disp == "expired" else reply.status,
                diagnostic=reply.line if reply.hop else reply.text,
                remote_mta=reply.hop.split("[", 1)[0] if reply.hop else None,
                last_attempt=now,
            )
            for i, reply, disp in failed
        ]
        try:
            dsn = build_dsn(
                reporting_mta=self._hostname(),
                queue_id=msg.queue_id,
                sender=msg.mail_from,
                recipients=recipients,
                original=self._read(msg.queue_id),
                arrival=datetime.fromtimestamp(msg.received_at, UTC),
                now=now,
            )
            bounce = await self._spool.store("", [msg.mail_from], dsn, received_at=now.timestamp())
        except (WarmrelayError, OSError, ValueError) as exc:
            # the spool logged its own fault once; a line per message and retry would flood
            level = logging.ERROR if self._spool.writable else logging.INFO
            log.log(level, "%s: cannot queue the DSN to <%s>: %s", msg.queue_id, msg.mail_from, exc)
            return False
        self._metrics.dsn_sent.inc()
        log.info("%s: sender non-delivery notification: %s", msg.queue_id, bounce.queue_id)
        self._accept(bounce, dsn)
        return True
