"""``Events``: what the data path calls when something happens to a recipient. It builds
the event, counts it, appends it to ``events.file`` and writes it to the outbox for the
webhook. It never raises and never waits for the network: a full or failing outbox or
file costs events (counted in warmrelay_events_lost_total, one log line per episode),
never mail.

Only mail an application handed over has events (a message with a client in its
metadata): not our own DSNs, not the reports we forward.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import sqlite3
import sys
import uuid
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from warmrelay.config import EventsConfig, webhook_secret
from warmrelay.delivery.replies import Reply
from warmrelay.errors import CounterError, StartError
from warmrelay.events.model import EventName, Origin, build
from warmrelay.events.outbox import Outbox, Put, outbox_path
from warmrelay.events.webhook import Webhook, shown
from warmrelay.feedback.token import Sent
from warmrelay.operate.metrics import Metrics
from warmrelay.queue.spool import SpooledMessage, queue_id_floor
from warmrelay.warmup.counters import Counters

log = logging.getLogger("warmrelay.events")

ARGS_PREFIX = "event-args:"  # state store: a message's custom arguments, by queue id
PRUNE_EVERY_S = 6 * 3600.0


def async_reply(status: str, diagnostic: str) -> Reply:
    """A DSN's Diagnostic-Code ("smtp; 550 5.7.1 ...") as the reply it quotes, so the one
    classifier reads it as it reads a reply of our own attempts."""
    text = diagnostic.split(";", 1)[1].strip() if ";" in diagnostic[:12] else diagnostic.strip()
    found = re.match(r"(\d{3})[ -](.*)", text)
    if found:
        return Reply(int(found[1]), found[2], "")
    code = 550 if status.startswith("5") else 450
    return Reply(code, f"{status} {text}".strip(), "")


def origin(msg: SpooledMessage) -> Origin | None:
    """What the events of ``msg`` share; None for mail that is ours (no events)."""
    if "client" not in msg.meta:
        return None
    args = msg.meta.get("args")
    smtp_id = msg.meta.get("message_id") or None
    return Origin(msg.queue_id, smtp_id, json.loads(args) if args else {})


class Events:
    def __init__(
        self,
        config: Callable[[], EventsConfig],
        metrics: Metrics,
        counters: Counters,
        state_dir: Path,
        worker: tuple[int, int],  # (index, count) of --workers; (0, 1) alone
        clock: Callable[[], datetime],
        blocked: Callable[[Reply], bool],
        keep_args: Callable[[], bool],
    ) -> None:
        self._config = config
        self._metrics = metrics
        self._counters = counters
        self._state_dir = state_dir
        self._worker = worker
        self._clock = clock
        self._blocked = blocked  # the one reply classifier: is this refusal a block?
        self._keep_args = keep_args  # with bounces: arguments outlive the message
        self.outbox: Outbox | None = None
        self.webhook: Webhook | None = None
        self._file: tuple[str, int] | None = None  # (path, fd)
        self._failing: set[str] = set()  # the reasons of loss now (one line per episode)
        self._tasks: set[asyncio.Task[None]] = set()
        self._pruned_at = 0.0

    # -- life ---------------------------------------------------------------------------

    def open(self) -> None:
        """The outbox (with a former worker's events moved in) and the file. Raises
        ConfigError (the secret) and OSError (the state directory) at start."""
        config = self._config()
        if config.webhook is not None:
            secret = webhook_secret(config.webhook)
            index, count = self._worker
            self.outbox = Outbox(outbox_path(self._state_dir, index), self._max_events)
            try:
                self.outbox.open()
                self._adopt(self.outbox, index, count)
            except sqlite3.Error as exc:
                where = self.outbox.path
                raise StartError(f"events: cannot open the outbox {where}: {exc}") from exc
            self.webhook = Webhook(
                lambda: self._config().webhook,
                lambda: secret,
                self.outbox,
                self._metrics,
                lambda: self._clock().timestamp(),
            )
        self.reopen()

    def _adopt(self, outbox: Outbox, index: int, count: int) -> None:
        """The outboxes of workers that no longer exist (fewer --workers than before)."""
        for path in sorted((self._state_dir / "events").glob("outbox-*.sqlite3")):
            n = path.name.removeprefix("outbox-").removesuffix(".sqlite3")
            if n.isdigit() and int(n) >= count and int(n) % count == index:
                moved = outbox.adopt(path)
                log.info("events: %d event(s) adopted from a former worker: %s", moved, path)

    def start(self) -> None:
        if self.webhook is not None:
            self.webhook.start()

    def reopen(self) -> None:
        """(Re)open events.file (after a reload, or a log rotation's SIGHUP)."""
        path = self._config().file
        if self._file is not None and self._file[0] != "-":
            os.close(self._file[1])
        self._file = None
        if path == "-":
            self._file = (path, sys.stdout.fileno())
        elif path is not None:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
            self._file = (path, fd)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self.webhook is not None:
            await self.webhook.stop()
        if self.outbox is not None:
            self.outbox.close()
        if self._file is not None and self._file[0] != "-":
            os.close(self._file[1])
        self._file = None

    def status(self, now: float) -> dict[str, Any] | None:
        """For /status: where events go and what waits (this process's outbox)."""
        config = self._config()
        if config.webhook is None and config.file is None:
            return None
        out: dict[str, Any] = {"file": config.file, "webhook": None}
        if config.webhook is not None and self.outbox is not None:
            oldest = self.outbox.oldest
            out["webhook"] = {
                "url": shown(config.webhook.url),
                "outbox": self.outbox.count,
                "oldest_age_s": None if oldest is None else round(max(0.0, now - oldest), 3),
            }
        return out

    def _max_events(self) -> int:
        webhook = self._config().webhook
        return webhook.max_events if webhook is not None else 0

    # -- what happened ------------------------------------------------------------------

    @property
    def enabled(self) -> bool:
        """Events go somewhere (a webhook or a file): else none is even built."""
        config = self._config()
        return config.webhook is not None or config.file is not None

    def processed(self, msg: SpooledMessage) -> None:
        """Accepted and spooled: one event per recipient."""
        o = origin(msg) if self.enabled else None
        if o is None:
            return
        now = msg.received_at
        self.emit(*(build("processed", r, now, o, str(i), {}) for i, r in enumerate(msg.rcpt_tos)))
        if (o.args or o.smtp_id) and self._keep_args():  # later reports name the message
            self._background(self._remember(msg.queue_id, o))

    def outcomes(
        self,
        msg: SpooledMessage,
        rows: Sequence[tuple[int, str, Reply]],
        *,
        ip: str,
        provider: str,
        warming: bool,
        attempt: Mapping[int, int],
        now: datetime,
    ) -> None:
        """What one delivery attempt did to recipients of ``msg``: (index, disposition,
        reply) with the Recorder's dispositions (delivered, deferred, bounced, expired,
        deleted), and each one's tries so far; written together."""
        o = origin(msg) if self.enabled else None
        if o is None:
            return
        sent = {"ip": ip if ip != "none" else None, "provider": provider or None}
        events = []
        for i, disposition, reply in rows:
            tried = {**sent, "warming": warming, "tls": int(reply.tls)} if reply.hop else sent
            name: EventName
            fields: dict[str, Any]
            key = str(i)
            if disposition == "delivered":
                name, fields = "delivered", {**tried, "response": reply.line}
            elif disposition == "deferred":
                # a reroute (throttle, block) keeps the attempt: the IP and time tell apart
                n = attempt.get(i, 1)
                name, key = "deferred", f"{i}/{n}/{ip}/{now.timestamp():.3f}"
                fields = {**tried, "response": reply.line, "attempt": str(n)}
            elif disposition == "bounced":
                kind = "blocked" if self._blocked(reply) else "bounce"
                name = "bounce"
                fields = {
                    **tried,
                    "reason": reply.line,
                    "status": reply.status,
                    "type": kind,
                    "async": False,
                }
            elif disposition == "expired":
                name = "dropped"
                fields = {**sent, "reason": f"expired: {reply.line}", "status": "4.4.7"}
            else:  # deleted by the operator
                name, fields = "dropped", {"reason": f"{disposition} by the operator"}
            events.append(build(name, msg.rcpt_tos[i], now.timestamp(), o, key, fields))
        self.emit(*events)

    def refused(self, rcpt: str, reason: str, now: datetime) -> None:
        """A recipient refused at RCPT because it is suppressed (no message exists yet)."""
        if not self.enabled:
            return
        o = Origin(None)
        self.emit(build("dropped", rcpt, now.timestamp(), o, uuid.uuid4().hex, {"reason": reason}))

    async def bounced(
        self, sent: Sent, rcpt: str, status: str, diagnostic: str, report_id: str, now: datetime
    ) -> None:
        """A DSN after the handover: a 5.x.x is a bounce (``type`` blocked when the one
        reply classifier calls it a block), a 4.x.x a deferral downstream."""
        reply = async_reply(status, diagnostic)
        fields: dict[str, Any] = {"ip": sent.ip, "provider": sent.provider, "status": status}
        if status.startswith("5"):
            kind = "blocked" if self._blocked(reply) else "bounce"
            fields |= {"reason": reply.line, "type": kind}
            await self.reported("bounce", sent.queue_id, sent.index, rcpt, fields, report_id, now)
        else:
            fields |= {"response": reply.line}
            await self.reported("deferred", sent.queue_id, sent.index, rcpt, fields, report_id, now)

    async def complained(
        self, sent: Sent, rcpt: str, feedback_type: str, report_id: str, now: datetime
    ) -> None:
        """A complaint (ARF) about one recipient; the address may be redacted ("")."""
        fields = {"ip": sent.ip, "provider": sent.provider, "type": feedback_type or None}
        await self.reported("spamreport", sent.queue_id, sent.index, rcpt, fields, report_id, now)

    async def reported(
        self,
        name: EventName,
        queue_id: str,
        index: int,
        rcpt: str,
        fields: Mapping[str, Any],
        report_id: str,
        now: datetime,
    ) -> None:
        """A bounce or complaint that came back after the handover (``async``: true), with
        the message's custom arguments when they were kept."""
        if not self.enabled:
            return
        args: dict[str, Any] = {}
        try:
            text = await self._counters.get_value(ARGS_PREFIX + queue_id)
            kept = json.loads(text) if text else {}
            args = dict(kept.get("args") or {})
            smtp_id = kept.get("smtp_id")
        except (CounterError, ValueError):
            smtp_id = None
        o = Origin(queue_id, smtp_id, args)
        event = build(name, rcpt, now.timestamp(), o, f"{index}/{report_id}", fields)
        self.emit({**event, "async": True})
        self._prune_soon()

    # -- writing ------------------------------------------------------------------------

    def emit(self, *events: dict[str, Any]) -> None:
        """Count and write ``events`` (one write to the file, one transaction in the
        outbox for all of them)."""
        if not events:
            return
        bodies = []
        for event in events:
            self._metrics.events.labels(event["event"]).inc()
            bodies.append(json.dumps(event, separators=(",", ":"), ensure_ascii=False))
        if self._file is not None:
            lines = "".join(b + "\n" for b in bodies).encode("utf-8", "surrogateescape")
            try:
                os.write(self._file[1], lines)
                self._ok("file_error")
            except OSError as exc:
                self._metrics.events_lost.labels("file_error").inc(len(bodies))
                self._lost("file_error", f"cannot append to {self._file[0]}: {exc.strerror}")
        if self.outbox is None or self._config().webhook is None:
            return
        puts = self.outbox.put(self._clock().timestamp(), bodies)
        assert self.webhook is not None
        self._metrics.webhook_outbox.set(self.outbox.count)  # the age: the poster's
        if Put.STORED in puts:
            self._ok("outbox_error")
            self.webhook.wake()
        full = puts.count(Put.FULL)
        failed = puts.count(Put.FAILED)
        if full:
            self._metrics.events_lost.labels(Put.FULL.value).inc(full)
            self._lost(Put.FULL.value, f"the outbox holds {self.outbox.count} events (max_events)")
        elif not failed:
            self._ok(Put.FULL.value)
        if failed:
            self._metrics.events_lost.labels(Put.FAILED.value).inc(failed)
            self._lost(Put.FAILED.value, f"cannot write to {self.outbox.path}")

    def _lost(self, reason: str, why: str) -> None:
        if reason not in self._failing:
            self._failing.add(reason)
            log.error("events: %s: events are lost until it recovers (%s)", why, reason)

    def _ok(self, reason: str) -> None:
        if reason in self._failing:
            self._failing.discard(reason)
            log.info("events: written again (%s is over)", reason)

    # -- custom arguments for later reports ---------------------------------------------

    async def _remember(self, queue_id: str, o: Origin) -> None:
        value = json.dumps({"args": dict(o.args), "smtp_id": o.smtp_id}, separators=(",", ":"))
        try:
            await self._counters.set_value(ARGS_PREFIX + queue_id, value)
        except CounterError as exc:  # its later reports lose the arguments, nothing else
            log.debug("events: cannot keep the arguments of %s: %s", queue_id, exc)
        self._prune_soon()

    def _prune_soon(self) -> None:
        now = self._clock().timestamp()
        if now - self._pruned_at < PRUNE_EVERY_S:
            return
        self._pruned_at = now
        self._background(self._prune(now - self._config().args_keep_days * 86400))

    async def _prune(self, before: float) -> None:
        floor = ARGS_PREFIX + queue_id_floor(before)
        try:
            kept = await self._counters.list_values(ARGS_PREFIX)
            for key in (k for k in kept if k < floor):
                await self._counters.set_value(key, None)
        except CounterError as exc:
            log.debug("events: cannot prune kept arguments now: %s", exc)

    def _background(self, work: Any) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
