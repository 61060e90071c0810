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

Per provider it also keeps, in memory, the latest deferral and the latest bounce
(``latest_reasons``, for the status page): what a provider said last is what an
operator asks first.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from warmrelay.delivery.dsn import FailedRecipient, build_dsn
from warmrelay.delivery.replies import Reply
from warmrelay.errors import SpoolError, WarmrelayError
from warmrelay.events.emitter import Events
from warmrelay.mail.suppression import SuppressionList
from warmrelay.operate.metrics import Metrics
from warmrelay.operate.queueview import operator_bounce
from warmrelay.queue.messages import domain_of
from warmrelay.queue.spool import Spool, SpooledMessage
from warmrelay.warmup.providers import ProviderMap
from warmrelay.warmup.router import RouteReason

log = logging.getLogger("warmrelay.delivery")

MAX_BACKOFF_EXPONENT = 30  # 2**30 x retry_first_s is past any retry_max_s: no overflow


@dataclass
class Verdicts:
    """Recipients (by index in the message) of one attempt, sorted by what happens next."""

    delivered: list[tuple[int, Reply]] = field(default_factory=list)
    failed: list[tuple[int, Reply, str]] = field(default_factory=list)  # bounced / expired
    retry: list[tuple[int, Reply]] = field(default_factory=list)  # deferred: after a backoff
    reroute: list[tuple[int, Reply]] = field(default_factory=list)  # deferred: routed again now


def attempt_outcome(connected: bool, v: Verdicts, throttled: int = 0, blocked: int = 0) -> str:
    """The outcome label of one attempt (warmrelay_delivery_attempt_seconds): what every
    recipient got (delivered, bounced, deferred, throttled, blocked), else "mixed";
    "unreachable" when no next hop took a transaction."""
    if not connected:
        return "unreachable"
    counts = {
        "delivered": len(v.delivered),
        "bounced": len(v.failed),
        "deferred": len(v.retry) + len(v.reroute),
        "throttled": throttled,
        "blocked": blocked,
    }
    kinds = [k for k, n in counts.items() if n]
    return kinds[0] if len(kinds) == 1 else "mixed"


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
        providers: Callable[[], ProviderMap] = ProviderMap,
    ) -> None:
        self._spool = spool
        self._metrics = metrics
        self._hostname = hostname
        self._accept = accept  # a stored DSN enters the queue like any message
        self._read = read
        self._suppression = suppression  # hard bounces go on it
        self._providers = providers  # the configured ones (a reload replaces them)
        # provider label -> "deferred" / "bounced" -> the latest such reply
        self._latest: dict[str, dict[str, dict[str, Any]]] = {}
        self.events: Events | None = None  # the application's events (events:)

    def provider_label(self, provider: str, domain: str) -> str:
        """A recognised provider's name, else "other" (an unknown domain is its own provider:
        as a label, it would make one series per domain). Without a provider (the next hop
        was never resolved), the domain alone may still name one (gmail.com)."""
        known = self._providers()
        name = provider or known.recognise(domain, ())
        return name if name in known.names else "other"

    def latest_reasons(self) -> dict[str, dict[str, Any]]:
        """Per provider label, the latest deferral and the latest bounce this process saw:
        ``{"gmail": {"deferred": {"time", "reply", "ip", "queue_id", "domain",
        "retry_at"}, "bounced": {"time", "reply", "ip", "queue_id", "domain"}}}`` (a key
        only once seen; ``retry_at`` null when it is routed again at once)."""
        return {p: {k: dict(e) for k, e in kinds.items()} for p, kinds in self._latest.items()}

    def _remember(
        self,
        provider: str,
        kind: str,
        msg: SpooledMessage,
        i: int,
        reply: Reply,
        ip: str,
        now: datetime,
        **extra: Any,
    ) -> None:
        self._latest.setdefault(provider, {})[kind] = {
            "time": now.isoformat(),
            "reply": reply.line[:300],
            "ip": ip,
            "queue_id": msg.queue_id,
            "domain": domain_of(msg.rcpt_tos[i]),
            **extra,
        }

    async def record(
        self,
        msg: SpooledMessage,
        pending: set[int],
        v: Verdicts,
        *,
        ip: str,
        reason: str,
        now: datetime,
        provider: str = "",
        retry_in_s: float | None = None,
        attempt: int = 1,
        tries: Mapping[int, int] | None = None,
    ) -> bool:
        """Log, count and write down final recipients; remove them from ``pending`` first.
        Returns True when the message is finished (nothing pending). Failed recipients
        whose DSN cannot be stored move to ``v.retry``. ``provider``: the next hop's
        (recognised from its MX hosts), if resolved; ``retry_in_s``: when ``v.retry`` is
        tried again (``v.reroute`` is routed again at once); ``attempt``: the backoff's
        count of this try, ``tries``: each recipient's tries so far, reroutes included
        (the events' ``attempt`` is the larger)."""
        for i, reply in v.delivered:
            self._log(msg, i, ip, reason, "delivered", reply, now)
        for i, reply, disposition in v.failed:
            self._log(msg, i, ip, reason, disposition, reply, now)
        retry_at = None if retry_in_s is None else now + timedelta(seconds=retry_in_s)
        for i, reply in v.retry:
            self._log(msg, i, ip, reason, "deferred", reply, now, retry_at)
        for i, reply in v.reroute:
            self._log(msg, i, ip, reason, "deferred", reply, now, now)
        # the list first, then the DSN: by the time the sender reads of the bounce, a new
        # message to that address is refused (a DSN that cannot be stored yet does not make
        # the receiver's verdict less final)
        if self._suppression is not None:  # a final bounce saying the address is dead
            for i, reply, disposition in v.failed:
                if disposition == "bounced":
                    await self._suppression.bounced(msg.rcpt_tos[i], reply, now, msg.queue_id)
        if v.failed and not await self._notify(msg, v.failed, now):
            v.retry += [(i, reply) for i, reply, _ in v.failed]  # DSN not stored: try later
            v.failed = []
        finals = [(i, "delivered") for i, _ in v.delivered] + [(i, d) for i, _, d in v.failed]
        finishing = pending.issubset(i for i, _ in finals)
        # one delivery is one domain, so one provider
        indices = [i for i, _ in (*v.delivered, *v.retry, *v.reroute)] + [i for i, *_ in v.failed]
        label = (
            self.provider_label(provider, domain_of(msg.rcpt_tos[indices[0]])) if indices else ""
        )
        if self.events is not None:
            self._events(msg, v, ip, reason, label, attempt, now, tries)
        for disposition in {d for _, d in finals}:
            idx = [i for i, d in finals if d == disposition]
            pending.difference_update(idx)  # first: whatever the disk says, they are done
            self._metrics.deliveries.labels(ip, disposition).inc(len(idx))
            self._metrics.provider_deliveries.labels(ip, label, disposition).inc(len(idx))
            if not finishing:  # a finished message is removed at once: nothing to record
                self._spool.mark_done(msg.queue_id, idx, disposition)
        if v.delivered:  # from the 250 the client got to the receiver's acceptance
            latency = self._metrics.delivery_latency.labels(ip)
            for _ in v.delivered:
                latency.observe(max(0.0, now.timestamp() - msg.received_at))
        deferred = len(v.retry) + len(v.reroute)
        if deferred:
            self._metrics.deliveries.labels(ip, "deferred").inc(deferred)
            self._metrics.provider_deliveries.labels(ip, label, "deferred").inc(deferred)
            if v.reroute:
                i, reply = v.reroute[-1]
                self._remember(label, "deferred", msg, i, reply, ip, now, retry_at=None)
            else:
                i, reply = v.retry[-1]
                at = retry_at.isoformat() if retry_at is not None else None
                self._remember(label, "deferred", msg, i, reply, ip, now, retry_at=at)
        bounced = [(i, reply) for i, reply, d in v.failed if d == "bounced"]
        if bounced:
            self._remember(label, "bounced", msg, *bounced[-1], ip, now)
        return not pending

    def _events(
        self,
        msg: SpooledMessage,
        v: Verdicts,
        ip: str,
        reason: str,
        label: str,
        attempt: int,
        now: datetime,
        tries: Mapping[int, int] | None = None,
    ) -> None:
        """One event per recipient outcome, in the order the log says them."""
        assert self.events is not None
        rows = [(i, "delivered", r) for i, r in v.delivered]
        rows += [(i, d, r) for i, r, d in v.failed]
        rows += [(i, "deferred", r) for i, r in (*v.retry, *v.reroute)]
        warming = reason.startswith(RouteReason.WARMUP.value)
        self.events.outcomes(
            msg,
            rows,
            ip=ip,
            provider=label,
            warming=warming,
            attempt={i: max(attempt, (tries or {}).get(i, 0)) for i, _, _ in rows},
            now=now,
        )

    def attempted(self, queue_id: str, attempts: int) -> None:
        """Tries so far of a message's deferred recipients (the backoff after a restart)."""
        self._spool.record_attempt(queue_id, attempts)

    async def finish_by_operator(
        self,
        msg: SpooledMessage,
        pending: set[int],
        indices: Sequence[int],
        who: str,
        bounce_reason: str | None,
        now: datetime,
    ) -> bool:
        """``warmrelay queue delete|bounce``: the recipients are done, as the operator said.
        A bounce stores its DSN first and raises ``SpoolError`` (nothing changed) if it
        cannot: an operator's action is done whole or not at all. True when the message is
        finished."""
        if bounce_reason is None:
            disposition, tail = "deleted", "(no DSN)"
        else:
            disposition, reply = (
                "bounced",
                Reply(554, "5.0.0 " + operator_bounce(bounce_reason), ""),
            )
            failed = [(i, reply, disposition) for i in indices]
            dsn = await self._store_dsn(msg, failed, now)  # raises: nothing changed
            tail = f"({bounce_reason}; DSN {dsn})" if dsn else f"({bounce_reason}; null sender)"
        pending.difference_update(indices)
        for i in indices:
            log.warning(
                "%s: to=<%s> %s by %s %s", msg.queue_id, msg.rcpt_tos[i], disposition, who, tail
            )

        if self.events is not None:
            said = reply if bounce_reason is not None else Reply(0, disposition, "")
            rows = [(i, disposition, said) for i in indices]
            self.events.outcomes(
                msg, rows, ip="none", provider="", warming=False, attempt={}, now=now
            )
        self._metrics.deliveries.labels("none", disposition).inc(len(indices))
        if pending:
            self._spool.mark_done(msg.queue_id, indices, disposition)
        return not pending

    def record_late(
        self, msg: SpooledMessage, v: Verdicts, *, ip: str, reason: str, now: datetime
    ) -> None:
        """The outcome of a send that was under way when the operator finished its
        recipients (delete, bounce): said and counted as it happened, nothing else (no
        spool record, DSN, suppression or retry: the operator's word stands)."""
        rows = [(i, "delivered", r) for i, r in v.delivered]
        rows += [(i, d, r) for i, r, d in v.failed]
        rows += [(i, "deferred", r) for i, r in (*v.retry, *v.reroute)]
        for i, disposition, reply in rows:
            self._log(msg, i, ip, reason, disposition, reply, now, late=True)
            self._metrics.deliveries.labels(ip, disposition).inc()
        if self.events is not None:  # what happened, happened: the application hears it
            self._events(msg, v, ip, reason, "", 0, now)

    def _log(
        self,
        msg: SpooledMessage,
        i: int,
        ip: str,
        reason: str,
        disposition: str,
        reply: Reply,
        now: datetime,
        retry_at: datetime | None = None,
        late: bool = False,
    ) -> None:
        """One line per recipient outcome; a deferral says when it is tried again."""
        rcpt = msg.rcpt_tos[i]
        if late:
            then = "; after the operator had finished it"
        elif retry_at is None:
            then = ""
        elif retry_at <= now:  # throttled or blocked: routed again at once, avoiding the IP
            then = "; retry now"
        else:
            wait_s = (retry_at - now).total_seconds()
            then = f"; retry at {retry_at.isoformat()} (in {wait_s:.0f}s)"
        domain = domain_of(rcpt)
        delay = max(0.0, now.timestamp() - msg.received_at)
        text = reply.line[:300]
        log.info(
            "%s: to=<%s> domain=%s ip=%s reason=%s relay=%s delay=%.2fs %s (%s)%s",
            msg.queue_id,
            rcpt,
            domain,
            ip,
            reason or "-",
            reply.hop or "none",
            delay,
            disposition,
            text,
            then,
            extra={  # log.format json: every field of the text line, typed
                "queue_id": msg.queue_id,
                "rcpt": rcpt,
                "domain": domain,
                "ip": ip,
                "reason": reason or None,
                "relay": reply.hop or None,
                "delay": round(delay, 3),
                "disposition": disposition,
                "code": reply.code,
                "status": reply.status,
                "reply": text,
                "retry_at": retry_at.isoformat() if retry_at is not None else None,
                "late": late or None,
            },
        )

    async def _notify(
        self, msg: SpooledMessage, failed: Sequence[tuple[int, Reply, str]], now: datetime
    ) -> bool:
        """Store a DSN to the sender for failed recipients; False if the spool refused it."""
        try:
            await self._store_dsn(msg, failed, now)
        except SpoolError as exc:
            # the spool logged its own fault once; a line per message and retry would flood
            level = logging.ERROR if self._spool.writable else logging.INFO
            log.log(level, "%s: cannot queue the DSN to <%s>: %s", msg.queue_id, msg.mail_from, exc)
            return False
        return True

    async def _store_dsn(
        self, msg: SpooledMessage, failed: Sequence[tuple[int, Reply, str]], now: datetime
    ) -> str | None:
        """Store a DSN to the sender for failed recipients and queue it; its queue id (None
        for a null sender: never bounce a bounce, RFC 5321 §4.5.5). ``SpoolError`` if the
        spool refused it."""
        if not msg.mail_from:
            return None
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
        except SpoolError:
            raise
        except (WarmrelayError, OSError, ValueError) as exc:
            raise SpoolError(f"cannot store the DSN: {exc}") from exc
        self._metrics.dsn_sent.inc()
        log.info("%s: sender non-delivery notification: %s", msg.queue_id, bounce.queue_id)
        self._accept(bounce, dsn)
        return bounce.queue_id
