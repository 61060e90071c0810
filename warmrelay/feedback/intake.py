"""Intake: what the listener does with mail to the bounce domain.

Anyone may send to the bounce domain (receivers bounce from anywhere, feedback loops
post from theirs): no AUTH, no relay permission, and nothing sent there is ever relayed
onward. A recipient that looks like one of our return paths but whose token does not
verify is refused at RCPT (``550 5.1.1``); any other local part (``fbl@``,
``postmaster@``) is taken, since feedback loops send to an address the operator
registered. Each report is limited in size (``bounces.max_report_bytes``) and in rate
per client address (``bounces.reports_per_minute``).

A report is written to ``state.dir/feedback/DAY/ID.eml`` (fsync) before the 250, so what
we acknowledged is kept whatever it turns out to be, recognised or not (pruned after
``bounces.keep_reports_days``). Then it is parsed (``reports``), tied to the message,
recipient, source IP and provider it is about (the return path's token, or our trace
header in the quoted original), and acted on: counted per IP and provider (metrics and
the signals of ``reputation.signals``), a hard bounce with a status of ``suppression.statuses`` and
every complaint put the address on the suppression list, and with ``bounces.forward``
the report goes on unchanged to the original sender (null sender, like our own DSNs).
Our own DSNs (Reporting-MTA is our host name) are never counted as a receiver's bounce.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from warmrelay.config import Config
from warmrelay.errors import SpoolError
from warmrelay.events.emitter import Events
from warmrelay.feedback.reports import (
    Bounced,
    BounceReport,
    ComplaintReport,
    Report,
    Unrecognised,
    parse_report,
)
from warmrelay.feedback.token import ReturnPath, Sent, Tokens
from warmrelay.mail.suppression import SuppressionList
from warmrelay.operate.metrics import Metrics
from warmrelay.queue.spool import Spool, SpooledMessage, new_queue_id
from warmrelay.reputation.signals import PairCounts
from warmrelay.warmup.providers import ProviderMap

log = logging.getLogger("warmrelay.feedback")

PRUNE_EVERY_S = 3600.0
OTHER = "other"  # the provider label of a domain no rule recognises


@dataclass(frozen=True)
class Outcome:
    """What became of one report (the log line, and what tests check)."""

    report_id: str
    report: Report
    about: tuple[Sent, ...]  # attributed recipients (IP and provider known)
    suppressed: tuple[str, ...]
    forwarded_as: str | None  # the queue id of the forwarded copy


class FeedbackIntake:
    def __init__(
        self,
        config: Callable[[], Config],
        tokens: Tokens,
        providers: Callable[[], ProviderMap],
        counts: PairCounts,
        suppression: SuppressionList | None,
        spool: Spool,
        accept: Callable[[SpooledMessage, bytes], None],
        metrics: Metrics,
        clock: Callable[[], datetime],
        store: Path,
    ) -> None:
        self._config = config
        self.tokens = tokens
        self._providers = providers
        self.counts = counts
        self._suppression = suppression
        self._spool = spool
        self._accept = accept  # a forwarded report enters the queue like a DSN
        self._metrics = metrics
        self._clock = clock
        self.store = store
        self._recent: dict[str, list[float]] = {}  # client -> report times (the rate limit)
        self._pruned_at = 0.0
        self._pruning: asyncio.Task[None] | None = None
        # a complaint may cross a pause limit today: the warmup controller acts at once
        self.on_complaint: Callable[[str, str, datetime], Awaitable[object]] | None = None
        self.events: Events | None = None  # the application's events (events:)

    # -- RCPT -----------------------------------------------------------------------------

    def is_report(self, address: str) -> bool:
        """Mail to this address is a report for the intake, not mail to relay."""
        return self.tokens.is_ours(address)

    def rcpt(self, address: str) -> str:
        """The reply to RCPT TO an address at the bounce domain."""
        if self.tokens.looks_like_token(address) and self._check(address) is None:
            return f"550 5.1.1 <{_shown(address)}>: no such return path here"
        return "250 2.1.5 Ok"

    def _check(self, address: str) -> ReturnPath | None:
        config = self._config()
        ips = [*(str(ip.address) for ip in config.ips), "smarthost"]
        return self.tokens.check(address, ips, [*self._providers().names, OTHER])

    # -- DATA -----------------------------------------------------------------------------

    async def take(self, client: str, rcpts: Sequence[str], data: bytes) -> str:
        """The reply to DATA of a report transaction; 250 only once the report is on disk."""
        bounces = self._config().bounces
        assert bounces is not None
        if len(data) > bounces.max_report_bytes:
            return f"552 5.3.4 Report too big (at most {bounces.max_report_bytes} bytes)"
        if not self._admit(client, bounces.reports_per_minute):
            log.warning(
                "%s: more than %d reports a minute: deferred", client, bounces.reports_per_minute
            )
            return "450 4.7.1 Too many reports from you now, try again later"
        report_id = new_queue_id()
        day = self._clock().astimezone(self._config().zone).date().isoformat()
        try:
            await asyncio.to_thread(_write_durably, self.store / day, f"{report_id}.eml", data)
        except OSError as exc:
            log.error("%s: cannot keep a report in %s: %s", client, self.store, exc)
            return "451 4.3.0 Cannot take the report now, try again later"
        self._prune_soon(bounces.keep_reports_days)
        report = await asyncio.to_thread(parse_report, data)
        outcome = await self._act(report_id, client, rcpts, report, data)
        return f"250 2.0.0 Ok: report taken as {outcome.report_id}"

    def _admit(self, client: str, per_minute: int) -> bool:
        now = time.monotonic()
        host = client.rsplit(":", 1)[0].strip("[]")
        times = [t for t in self._recent.get(host, []) if now - t < 60.0]
        if len(times) >= per_minute:
            self._recent[host] = times
            return False
        times.append(now)
        self._recent[host] = times
        if len(self._recent) > 10_000:  # forget clients that went quiet
            self._recent = {h: ts for h, ts in self._recent.items() if now - ts[-1] < 60.0}
        return True

    async def _act(
        self, report_id: str, client: str, rcpts: Sequence[str], report: Report, data: bytes
    ) -> Outcome:
        config = self._config()
        now = self._clock()
        returns = [rp for rp in (self._check(r) for r in rcpts) if rp is not None]
        traced = None
        if not isinstance(report, Unrecognised) and report.trace:
            traced = self.tokens.open_trace(report.trace)
        about: list[Sent] = []
        suppressed: list[str] = []
        kind = "unrecognised"
        if isinstance(report, BounceReport):
            kind = report.kind
            if report.reporting_mta and report.reporting_mta == config.smtp.hostname.lower():
                kind = "own"  # our own DSN came back to us: not a receiver's bounce
            else:
                for bounced in report.recipients:
                    sent = _attribute(bounced.recipient, returns, traced)
                    if sent is None:
                        continue
                    about.append(sent)
                    cls = bounced.bounce_class
                    self._metrics.async_bounces.labels(sent.ip, sent.provider, cls).inc()
                    self.counts.note(sent.ip, sent.provider, cls, 1, now)
                    address = bounced.recipient or sent.recipient
                    if self.events is not None and cls != "other":
                        await self.events.bounced(
                            sent, address, bounced.status, bounced.diagnostic, report_id, now
                        )
                    if (
                        cls == "hard"
                        and address
                        and await self._suppress(
                            address, "async bounce", bounced, sent.queue_id, now
                        )
                    ):
                        suppressed.append(address)
        elif isinstance(report, ComplaintReport):
            kind = "arf"
            sent = _attribute(report.recipient, returns, traced)
            if sent is not None:
                about.append(sent)
                self._metrics.complaints.labels(sent.ip, sent.provider).inc()
                self.counts.note(sent.ip, sent.provider, "complaint", 1, now)
                if self.on_complaint is not None:
                    await self.on_complaint(sent.ip, sent.provider, now)
                address = sent.recipient or report.recipient
                if self.events is not None:
                    feedback = report.feedback_type
                    await self.events.complained(sent, address, feedback, report_id, now)
                if address and self._suppression is not None:
                    text = f"complaint ({report.feedback_type}) via {sent.ip}"
                    added = await self._suppression.reported(
                        address, "complaint", "", text, now, sent.queue_id
                    )
                    if added is not None:
                        suppressed.append(address)
        self._metrics.feedback_reports.labels(kind, "yes" if about else "no").inc()
        forwarded = None
        if kind not in ("own", "unrecognised") and config.bounces and config.bounces.forward:
            forwarded = await self._forward(report_id, traced, data, now)
        outcome = Outcome(report_id, report, tuple(about), tuple(suppressed), forwarded)
        self._log(client, kind, outcome)
        return outcome

    async def _suppress(
        self, address: str, by: str, bounced: Bounced, queue_id: str, now: datetime
    ) -> bool:
        if self._suppression is None:
            return False
        text = bounced.diagnostic or f"{bounced.status} {bounced.action}".strip()
        added = await self._suppression.reported(address, by, bounced.status, text, now, queue_id)
        return added is not None

    async def _forward(
        self, report_id: str, traced: Sent | None, data: bytes, now: datetime
    ) -> str | None:
        """The report, unchanged but for our Received: line, to the original sender."""
        if traced is None or not traced.sender:
            self._metrics.feedback_forwarded.labels("no_sender").inc()
            return None
        hostname = self._config().smtp.hostname
        stamp = now.strftime("%a, %d %b %Y %H:%M:%S +0000")
        received = f"Received: by {hostname} (warmrelay feedback) id {report_id}; {stamp}\r\n"
        content = received.encode() + data
        try:
            copy = await self._spool.store(
                "", [traced.sender], content, received_at=now.timestamp()
            )
        except (SpoolError, OSError, ValueError) as exc:
            log.error(
                "feedback %s: cannot queue the copy for <%s>: %s", report_id, traced.sender, exc
            )
            self._metrics.feedback_forwarded.labels("failed").inc()
            return None
        self._metrics.feedback_forwarded.labels("forwarded").inc()
        self._accept(copy, content)
        return copy.queue_id

    def _log(self, client: str, kind: str, o: Outcome) -> None:
        if isinstance(o.report, Unrecognised):
            what = f"not recognised ({o.report.why}); kept"
        elif not o.about:
            what = "not attributed (no token or trace header of ours verifies)"
        else:
            what = ", ".join(f"{s.queue_id} via {s.ip} to {s.provider}" for s in o.about)
        extra = ""
        if o.suppressed:
            extra += f"; suppressed {', '.join(o.suppressed)}"
        if o.forwarded_as:
            extra += f"; forwarded as {o.forwarded_as}"
        log.info(
            "feedback %s: %s from %s: %s%s",
            o.report_id,
            kind,
            client,
            what,
            extra,
            extra={"report_id": o.report_id, "kind": kind, "client": client},
        )

    def _prune_soon(self, keep_days: float) -> None:
        now = time.time()
        if now - self._pruned_at < PRUNE_EVERY_S or self._pruning is not None:
            return
        self._pruned_at = now

        async def prune() -> None:
            try:
                await asyncio.to_thread(_prune, self.store, now - keep_days * 86400)
            except OSError as exc:
                log.warning("feedback: cannot prune %s: %s", self.store, exc)
            finally:
                self._pruning = None

        self._pruning = asyncio.get_running_loop().create_task(prune())

    async def close(self) -> None:
        if self._pruning is not None:
            await self._pruning


def _attribute(recipient: str, returns: Sequence[ReturnPath], traced: Sent | None) -> Sent | None:
    """Which send a reported recipient is about: a return path that binds the recipient,
    else our trace header (for the same recipient, or any when the report names none),
    else a return path when the report names no recipient (counted, not suppressed)."""
    for rp in returns:
        if recipient and rp.binds(recipient):
            return Sent(rp.sent.queue_id, rp.sent.index, rp.sent.ip, rp.sent.provider, recipient)
    if traced is not None and (not recipient or recipient == traced.recipient.lower()):
        return traced
    if not recipient and len(returns) == 1:
        return returns[0].sent
    return None


def _shown(address: str) -> str:
    return address.replace("\r", "").replace("\n", "")[:300]


def _write_durably(folder: Path, name: str, data: bytes) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{name}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, folder / name)
    dfd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def _prune(store: Path, older_than: float) -> None:
    if not store.is_dir():
        return
    for day in store.iterdir():
        if not day.is_dir():
            continue
        for f in day.iterdir():
            if f.stat().st_mtime < older_than:
                f.unlink(missing_ok=True)
        if not any(day.iterdir()):
            day.rmdir()
