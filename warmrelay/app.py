"""The relay process: startup -> serve -> shutdown, with an injectable shutdown trigger.

Tests pass an ``asyncio.Event``; ``run`` (the ``serve`` command) sets it from
SIGTERM/SIGINT. Startup recovers the spool before the listeners open, so
mail acknowledged before a crash is delivered first.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from dataclasses import dataclass
from datetime import date, datetime, timedelta, tzinfo
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlparse

import uvloop

from warmrelay import __version__
from warmrelay.config import (
    Config,
    IPConfig,
    LogConfig,
    admin_token,
    bind_error,
    bounce_secret,
    config_warnings,
    describe_changes,
    load_config,
)
from warmrelay.delivery.attempt import Attempts
from warmrelay.delivery.dispatcher import Dispatcher
from warmrelay.delivery.dispositions import Recorder
from warmrelay.delivery.nexthop import NextHopResolver
from warmrelay.delivery.replies import Outcome as ReplyOutcome
from warmrelay.errors import ConfigError, CounterError, StartError
from warmrelay.events.emitter import Events
from warmrelay.feedback.intake import FeedbackIntake
from warmrelay.feedback.outbound import Marks
from warmrelay.feedback.token import Tokens
from warmrelay.mail.dkim import DkimKeyError, Signer, quiet_key_warnings
from warmrelay.mail.preflight import RelayPreflight
from warmrelay.mail.suppression import SuppressionList
from warmrelay.operate import sdnotify, statuspage
from warmrelay.operate.actions import QueueActions
from warmrelay.operate.api import json_page
from warmrelay.operate.heap import settle_heap
from warmrelay.operate.logs import LogFormat, apply_log_format, setup_logging
from warmrelay.operate.metrics import Metrics
from warmrelay.operate.queueapi import QueueApi, worker_socket
from warmrelay.operate.queueview import summary
from warmrelay.operate.tally import TallySnapshot
from warmrelay.queue.scheduler import Clock, Scheduler, utc_now
from warmrelay.queue.spool import RecoveredMessage, Spool
from warmrelay.reputation.controller import SEVERITY, Decision
from warmrelay.reputation.fetch import FeedRunner
from warmrelay.reputation.signals import PairCounts
from warmrelay.smtp.listener import RelayHandler, make_protocol, valid_mailbox
from warmrelay.smtp.tlsfiles import TlsFiles
from warmrelay.warmup.control import IP_ACTIONS, Persisted
from warmrelay.warmup.counters import CounterKey, Counters, open_counters
from warmrelay.warmup.plan import WarmupState
from warmrelay.warmup.router import Router

if TYPE_CHECKING:
    from warmrelay.operate.admin import AdminServer

log = logging.getLogger("warmrelay")

SNDS_LEVEL = {"GREEN": 0, "YELLOW": 1, "RED": 2}  # warmrelay_reputation_signal{snds_filter}
CONNECTION_GAUGES_S = 1.0  # warmrelay_connections follows the connections within this


class Relay:
    def __init__(
        self,
        config: Config,
        *,
        clock: Clock = utc_now,
        worker: Worker | None = None,
        log_format: LogFormat | None = None,
    ) -> None:
        # ``serve --log-format``: wins over log.format, in this file and every reloaded one
        self.log_format = log_format
        config = self._with_log_format(config)
        self.config = config
        self.clock = clock
        self.worker = worker
        # fails closed, before anything is opened: a missing secret refuses to start
        self.admin_token = admin_token(config.admin)
        self.metrics = Metrics()
        self.spool = Spool(spool_dir(config.state.dir, worker.index if worker else 0))
        self.counters: Counters = open_counters(config.state.counters, config.state.dir)
        # signals per (IP, provider, day): the rates operators read, what the controller judges
        self.signals = PairCounts(self.counters, config.zone)
        self.router = Router(config, self.counters, self.signals)
        self._watch(self.router)
        self.resolver = NextHopResolver(
            routes=config.routes,
            nameservers=config.dns.nameservers,
            timeout_s=config.dns.timeout_s,
            mx_port=config.delivery.mx_port,
        )
        self.dispatcher = Dispatcher(config.delivery)
        self.dispatcher.on_change = self._connections_changed
        self.suppression = SuppressionList(
            self.counters, self.metrics, lambda: self.config.suppression, clock
        )
        # the data path: the scheduler moves deliveries between its queues, the delivery
        # stage attempts them and writes dispositions, the operator's actions act on both
        self.scheduler = Scheduler(
            self.spool, lambda: self.config.delivery, clock, self.metrics.spool_messages.set
        )
        self._lanes_seen: set[tuple[str, str]] = set()
        self._gauges_due: asyncio.TimerHandle | None = None  # connection gauges to set
        self.recorder = Recorder(
            self.spool,
            self.metrics,
            lambda: self.config.smtp.hostname,
            self.scheduler.accept,
            self.scheduler.data,
            self.suppression,
            lambda: self.attempts.providers,
        )
        self.attempts = Attempts(
            self.scheduler, self.dispatcher, self.recorder, self.metrics, clock
        )
        self.attempts.configure(config, self.router, self.resolver)
        self.actions = QueueActions(self.scheduler, self.recorder, self.spool, clock)
        # the reputation feeds (SNDS, Postmaster), fetched once per fleet into the store
        self.feeds = FeedRunner(
            lambda: self.config, self.counters, lambda: self.router.pairs, clock
        )
        # what comes back after the handover (bounces:): a return path of our own per
        # recipient, the intake of DSNs and complaints, the rates per IP and provider
        self.attempts.counts = self.signals
        self.intake: FeedbackIntake | None = None
        if config.bounces is not None:
            tokens = Tokens(bounce_secret(config.bounces), config.bounces.domain)  # fails closed
            self.attempts.marks = Marks(
                tokens, lambda: self.config, lambda: self.handler.dkim if self.handler else None
            )
            self.intake = FeedbackIntake(
                lambda: self.config,
                tokens,
                lambda: self.attempts.providers,
                self.signals,
                self.suppression,
                self.spool,
                self.scheduler.accept,
                self.metrics,
                clock,
                config.state.dir / "feedback",
            )
            self.intake.on_complaint = self._complained
        # the application's events: the outbox and webhook poster, the JSON lines file
        self.events = Events(
            lambda: self.config.events,
            self.metrics,
            self.counters,
            config.state.dir,
            (worker.index, worker.count) if worker else (0, 1),
            clock,
            lambda reply: self.attempts.rules.classify(reply) is ReplyOutcome.BLOCKED,
            lambda: self.config.bounces is not None,
        )
        self.recorder.events = self.events
        if self.intake is not None:
            self.intake.events = self.events
        # DNS identity checks: at start, GET /preflight, warmrelay_preflight_ok (getters: a
        # reload replaces config and router)
        self.preflight = RelayPreflight(
            lambda: self.config, lambda: self.router, self.metrics, clock
        )
        # the admin endpoint (aiohttp) exists where it is served: a worker of --workers
        # answers only its supervisor's queue requests, on a unix socket (no aiohttp)
        self._admin: AdminServer | None = None if worker is not None else self._make_admin()
        self._queue_socket: asyncio.Server | None = None
        self._servers: list[asyncio.Server] = []
        self.handler: RelayHandler | None = None
        tls = config.smtp.tls
        self.tls = TlsFiles(tls.cert, tls.key) if tls is not None else None

    def _make_admin(self) -> AdminServer:
        from warmrelay.operate.admin import AdminServer

        admin = AdminServer(
            {
                "/": self._status_html,
                "/metrics": self._metrics_page,
                "/healthz": self._health_page,
                "/status": self._status_page,
                "/preflight": self.preflight.page,
                "/suppression": self._suppression_page,
            },
            {"/ips/": self._ip_action, "/suppression/": self._suppression_action},
        )
        self.queue_routes(admin)
        admin.private.add("/suppression")  # addresses are personal data
        admin.private.add("/preflight")  # detailed state, as /status
        admin.private.add("/")  # the status page: what /status says
        admin.token = self.admin_token
        return admin

    @property
    def admin(self) -> AdminServer:
        """The admin endpoint (not in a worker of --workers: its supervisor serves it)."""
        if self._admin is None:
            raise RuntimeError("a worker of --workers has no admin endpoint")
        return self._admin

    @property
    def smtp_ports(self) -> list[int]:
        return [int(s.sockets[0].getsockname()[1]) for s in self._servers]

    def check_source_ips(self) -> None:
        """An IP not on this host is down from the start, not only at its first use
        (log line, warmrelay_ip_up 0, /healthz degraded); its mail leaves from the others.
        Checked again at each /healthz and scrape, so health stays honest after the mark
        expires (a bind probe is one socket call)."""
        now = self.clock()
        for ip in self.config.ips:
            if self.router.is_down(str(ip.address), now):
                continue
            unbound = bind_error(ip.address)
            if unbound is not None:
                address = str(ip.address)
                until = now + timedelta(seconds=self.config.delivery.ip_down_s)
                self.router.mark_down(address, until)
                self.metrics.ip_up.labels(address).set(0)
                log.error(
                    "source IP %s cannot be bound on this host (%s): marked down until %s "
                    "(then tried again); its mail leaves from the other IPs",
                    address,
                    unbound.strerror,
                    until.isoformat(),
                )

    async def start(self) -> None:
        self.config.state.dir.mkdir(parents=True, exist_ok=True)
        for warning in config_warnings(self.config):
            log.warning("config: %s", warning)
        await self.router.refresh(self.clock())  # pause, progress, suspensions from the store
        await self.suppression.start()  # loaded before the first bounce or RCPT
        self.check_source_ips()
        # in the background; waits at most preflight.timeout_s, for the blocklists only, so a
        # listed warming IP is paused before mail flows
        await self.preflight.start()
        # pushed on each change, not only at a scrape: workers of --workers are never scraped
        self.spool.on_change = self.router.ledger.on_change = self._disk_gauges
        self._disk_gauges()
        self.events.open()  # before any event: a former worker's outbox is moved in first
        recovered = await self.spool.open()
        recovered += await self._adopt_orphans()
        for item in recovered:
            self.scheduler.submit(item.message, item.done, item.attempts, item.on_hold)
        if recovered:
            log.info("recovered %d message(s) from the spool", len(recovered))
        self.scheduler.start(self.attempts.run)
        self.events.start()
        self.feeds.start()
        handler = self.handler = RelayHandler(
            self.config,
            self.spool,
            self.scheduler.accept,
            self.metrics,
            self.scheduler.admit,
            self.suppression,
        )
        handler.intake = self.intake
        handler.events = self.events
        loop = asyncio.get_running_loop()
        tls_ctx = self.tls.context if self.tls is not None else None
        if self.tls is not None:
            self.tls.watch()
        for n, listener in enumerate(self.config.smtp.listen):
            host, port = listener.address
            implicit = self.config.smtp.listener_tls(listener) == "implicit"
            try:
                server = await loop.create_server(
                    make_protocol(handler, self.config, listener, tls_ctx),
                    host,
                    self.worker.ports[n] if self.worker else port,
                    ssl=tls_ctx if implicit else None,
                    reuse_port=self.worker is not None,  # workers share each port
                )
            except OSError as exc:
                raise StartError.bind(f"smtp.listen[{n}]", host, port, exc) from exc
            self._servers.append(server)
        if self.config.admin.listen is not None and self.worker is None:
            await start_admin(self.admin, *self.config.admin.listen)
        if self.worker is not None:  # the supervisor's queue API forwards to this
            api = QueueApi(self.actions, self.spool, self.clock, self._today_json)
            path = worker_socket(self.config.state.dir, self.worker.index)
            self._queue_socket = await api.serve_unix(path)
        log.info(
            "warmrelay %s ready: smtp %s, admin %s, %d IP(s), event loop %s",
            __version__,
            ", ".join(
                f"{li.address[0]}:{p}"
                for li, p in zip(self.config.smtp.listen, self.smtp_ports, strict=True)
            ),
            f"{self.config.admin.listen[0]}:{self.admin.port}"
            if self.config.admin.listen and self.worker is None
            else "supervisor"
            if self.worker
            else "off",
            len(self.config.ips),
            type(asyncio.get_running_loop()).__module__.partition(".")[0],
        )

    async def _complained(self, ip: str, provider: str, now: datetime) -> None:
        """A complaint came in: the controller checks today's rate at once."""
        if self.router.pairs is not None:
            try:
                await self.router.pairs.check_now(ip, provider, now)
            except CounterError as exc:
                log.warning("reputation: cannot check %s %s now: %s", ip, provider, exc)

    def _watch(self, router: Router) -> None:
        """Count the decisions of ``router``'s controller; every series exists from the
        start at 0, so an alert's ``increase()`` sees the first back or pause too."""
        pairs = router.pairs
        if pairs is None:
            return
        pairs.on_decision = self._decided
        for ip in pairs.ips:
            for provider in pairs.providers:
                for action in SEVERITY:
                    self.metrics.warmup_decisions.labels(str(ip.address), provider, action)

    def _decided(self, ip: str, provider: str, decision: Decision) -> None:
        """A decision of the warmup controller, counted by the process that made it."""
        self.metrics.warmup_decisions.labels(ip, provider, decision.action).inc()

    def _with_log_format(self, config: Config) -> Config:
        if self.log_format is None or config.log.format == self.log_format:
            return config
        return config.model_copy(update={"log": LogConfig(format=self.log_format)})

    async def reload(self, path: str | Path | Config) -> bool:
        """SIGHUP: read the configuration file again. A file with errors changes nothing
        (each error is logged); a good one applies at once, except the parts that need a
        restart (listeners, admin, state, TLS files, delivery.concurrency): those keep
        running as they are, with a log line saying so. A worker of ``--workers`` is given
        the Config its supervisor accepted instead of a path: it never reads the file."""
        if isinstance(path, Config):
            new, path = path, "the supervisor's configuration"
        else:
            try:
                new = self._with_log_format(load_config(path))
            except ConfigError as exc:
                log.error(
                    "reload: %s has %d error(s); the running configuration stays",
                    path,
                    len(exc.problems),
                )
                for problem in exc.problems:
                    log.error("reload:   %s", problem)
                self.metrics.reloaded(False, self.clock().timestamp())
                return False
        old = self.config
        # DKIM keys are read now (a rotated file is picked up); a key that does not load
        # keeps the keys and dkim settings in force, and the summary line says so
        kept: list[str] = []
        signer: Signer | None = None
        try:
            signer = Signer.load(new)
        except DkimKeyError as exc:
            for problem in exc.problems:
                log.error("reload: DKIM key not loaded: %s", problem)
            new = new.model_copy(update={"dkim": old.dkim})
            kept.append("dkim (a key did not load: the keys and dkim settings in force stay)")
        fixed = {
            "smtp.listen": new.smtp.listen == old.smtp.listen,
            "smtp.tls": new.smtp.tls == old.smtp.tls,
            "admin": new.admin == old.admin,
            "state": new.state == old.state,
            "delivery.concurrency": new.delivery.concurrency == old.delivery.concurrency,
            "bounces": new.bounces == old.bounces,
            "events.webhook (on or off)": (new.events.webhook is None)
            == (old.events.webhook is None),
        }
        if not all(fixed.values()):
            kept.append(
                ", ".join(k for k, same in fixed.items() if not same)
                + " (they change only with a restart)"
            )
        delivery = new.delivery.model_copy(update={"concurrency": old.delivery.concurrency})
        smtp = new.smtp.model_copy(update={"listen": old.smtp.listen, "tls": old.smtp.tls})
        applied = new.model_copy(
            update={
                "smtp": smtp,
                "admin": old.admin,
                "state": old.state,
                "delivery": delivery,
                "bounces": old.bounces,
                "events": new.events
                if fixed["events.webhook (on or off)"]
                else new.events.model_copy(update={"webhook": old.events.webhook}),
            }
        )
        router = Router(applied, self.counters, self.signals)
        self._watch(router)
        router.carry_over(self.router)
        self.resolver = NextHopResolver(
            routes=applied.routes,
            nameservers=applied.dns.nameservers,
            timeout_s=applied.dns.timeout_s,
            mx_port=applied.delivery.mx_port,
        )
        self.router, self.config = router, applied
        self.dispatcher.configure(applied.delivery)
        self.attempts.configure(applied, router, self.resolver)
        if self.handler is not None:
            self.handler.configure(applied, signer or self.handler.dkim)
        if self.tls is not None:
            self.tls.reload()
        try:  # a new events.file, or the same one after a log rotation
            self.events.reopen()
        except OSError as exc:
            log.error("reload: cannot open events.file: %s", exc)
        changes = describe_changes(old, applied)  # what took effect, and only that
        (log.warning if kept else log.info)(
            "reload: %s applied (%d IPs): %s%s",
            path,
            len(applied.ips),
            "; ".join(changes) or "nothing changed",
            "".join(f"; running as before: {k}" for k in kept),
            extra={"changes": changes, "kept": kept},
        )
        if new.log.format != old.log.format and apply_log_format(new.log.format):
            log.info("reload: log.format is %s from now on", new.log.format)
        self.metrics.reloaded(True, self.clock().timestamp())
        return True

    async def _adopt_orphans(self) -> list[RecoveredMessage]:
        """Spools of workers that no longer exist (fewer --workers than before): move their
        messages into ours (stored durably first, then removed there)."""
        count = self.worker.count if self.worker else 1
        index = self.worker.index if self.worker else 0
        adopted: list[RecoveredMessage] = []
        for path in sorted(self.config.state.dir.glob("spool-*")):
            suffix = path.name.removeprefix("spool-")
            if not suffix.isdigit() or int(suffix) < count or int(suffix) % count != index:
                continue
            orphan = Spool(path)
            for item in await orphan.open():
                m = item.message
                data = orphan.read_data(m.queue_id)
                pending = [r for i, r in enumerate(m.rcpt_tos) if i not in item.done]
                if pending:
                    moved = await self.spool.store(
                        m.mail_from, pending, data, meta=m.meta, received_at=m.received_at
                    )
                    if item.on_hold:
                        self.spool.record_hold(moved.queue_id, True)
                    adopted.append(RecoveredMessage(moved, {}, item.attempts, item.on_hold))
                orphan.remove(m.queue_id)
            await orphan.close()
            log.info("adopted the spool of a former worker: %s", path)
        return adopted

    async def stop(self) -> None:
        """Stop accepting, then drain both ends within delivery.drain_timeout_s: SMTP
        sessions in a transaction may finish it (a DATA still gets its 250 once spooled;
        the others hear 421 4.3.2), deliveries in progress may end. The spool closes only
        after the sessions, so what they acknowledged is stored; the rest stays spooled."""
        await self.preflight.stop()  # cancels a run still going
        for server in self._servers:
            server.close()
        drain_s = self.config.delivery.drain_timeout_s
        sessions = (
            asyncio.create_task(self.handler.drain(drain_s)) if self.handler is not None else None
        )
        self.dispatcher.closing = True
        try:
            await self.scheduler.stop(drain_s)
            await self.router.ledger.settle_all()  # queued or cut-short sends give back
        finally:
            if sessions is not None:
                await sessions
        await self.dispatcher.close()
        await self.events.close()  # after the sessions and deliveries: their events written
        await self.spool.close()
        await self.feeds.stop()
        if self.intake is not None:
            await self.intake.close()
        await self.signals.flush()  # counts in flight written before the store closes
        await self.suppression.stop()
        await self.counters.close()
        if self._admin is not None:
            await self._admin.stop()
        if self._queue_socket is not None:
            self._queue_socket.close()
            await self._queue_socket.wait_closed()
        if self.tls is not None:
            self.tls.stop()
        log.info("warmrelay stopped; %d message(s) remain spooled", len(self.spool))

    async def serve(self, shutdown: asyncio.Event) -> None:
        await self.start()
        try:
            await shutdown.wait()
        finally:
            await self.stop()

    # -- admin pages ------------------------------------------------------------

    def queue_routes(self, admin: AdminServer) -> None:
        """The queue tools' API (warmrelay.queueapi) on ``admin``: this process's queue."""
        QueueApi(self.actions, self.spool, self.clock).register(admin)

    async def _count(self, key: CounterKey) -> int | None:
        try:
            return await self.counters.get(key)
        except CounterError:
            return None

    async def _sent(self, ip: IPConfig, now: datetime) -> int | None:
        return await self._count(self.router.counter_key(ip, now))

    def spool_size(self) -> int:
        return len(self.spool)

    def spool_oldest(self) -> float | None:
        """Receive time of the oldest spooled message (None: empty)."""
        return self.spool.oldest_received_at()

    @property
    def counters_up(self) -> bool:
        return bool(getattr(self.counters, "healthy", True))

    async def status(self, queue: bool = True) -> dict[str, Any]:
        """What every IP's records say now (re-read: other processes change them too);
        counts the store cannot give while it fails are null, the page still answers."""
        now = self.clock()
        self.router.reload_soon()
        await self.router.refresh(now)  # keeps the state it has while the store fails
        today = now.astimezone(self.config.zone).date()
        # like the queue: with --workers a question to each worker, so not for every scrape
        tally = await self.today_tally(today) if queue else None
        feedback = await self._feedback_rates(today) if self.intake is not None else None
        ips = []
        for ip in self.config.ips:
            st = self.router.status(ip, now)
            address = str(ip.address)
            control = self.router.control(address)
            if ip.warmup is None:
                role = "pool"
            elif st.state is WarmupState.WARM:  # warm by the operator's word or the schedule's end
                role = "completed" if control.completed else "finished"
            else:
                role = st.state.value  # warming, not_started, paused
            entry: dict[str, Any] = {
                "address": address,
                "helo": ip.helo,
                "state": st.state.value,
                "role": role,
                "warmup_day": st.day if ip.warmup is not None else None,
                "schedule_days": ip.warmup.schedule.days if ip.warmup is not None else None,
                "cap": st.cap,
                "sent": await self._sent(ip, now) if ip.warmup is not None else None,
                "up": not self.router.is_down(address, now),
            }
            entry["paused_since"] = (
                control.paused_since.isoformat() if control.paused_since else None
            )
            entry["completed"] = control.completed
            entry["completed_since"] = (
                control.completion.on.isoformat()
                if control.completed and control.completion.on
                else None
            )
            entry["suspended"] = {
                provider: {"until": s.until.isoformat(), "reason": s.reason}
                for provider, s in control.suspended.items()
                if self.router.suspension(address, provider, now)
            }
            pairs = self.router.pairs
            if pairs is not None and ip.warmup is not None and ip.warmup.progress == "reputation":
                # progress: reputation: per provider its day, cap, last decision and signals
                entry["pairs"] = pairs.status(ip)
            caps = self.router.caps(ip, now)
            if ip.warmup is not None and caps is not None and caps.limits:
                entry["cap_now"] = caps.limits[0].cap  # released so far today (smoothing)
                entry["providers"] = {}
                plan = ip.warmup.plan()
                for name in ip.warmup.providers:
                    pcaps = self.router.caps(ip, now, name)
                    assert pcaps is not None
                    lim = pcaps.limits[-1]
                    key = CounterKey(address, lim.window, lim.scope)
                    entry["providers"][name] = {
                        "cap": plan.providers[name].daily_cap(st.day, st.cap or 0),  # today's
                        "cap_now": lim.cap,
                        "sent": await self._count(key),
                    }
            if tally is not None:
                _add_today(entry, tally)
            if feedback is not None:  # complaints and bounces over handed over, per provider
                entry["feedback"] = feedback.get(address, {})
            ips.append(entry)
        report = self.preflight.latest
        return {
            "version": __version__,
            "time": now.isoformat(),
            "ips": ips,
            "counters": {"backend": _redact(self.config.state.counters), "up": self.counters_up},
            "spool": {
                "messages": self.spool_size(),
                "ready": self.scheduler.ready,
                "deferred": self.scheduler.deferred,
            },
            "preflight": None if report is None else report.to_json(),
            "events": self.events.status(now.timestamp()),
            # per source IP and provider: open and idle connections, and their limits
            "connections": [
                {"ip": ip, "provider": provider, **c}
                for (ip, provider), c in sorted(self.dispatcher.connections().items())
            ],
            # a walk over every queued message (and, with --workers, a question to each
            # worker): for the pages people read, not for every scrape (``queue=False``)
            "queue": await self.queue_summary() if queue else None,
            "reasons": await self.latest_reasons() if queue else None,
            **({} if tally is None else {"today": _today(tally, self.config.zone)}),
        }

    async def _feedback_rates(self, today: date) -> dict[str, dict[str, dict[str, Any]]] | None:
        """Per IP and provider: today's and the week's rates (None while the store fails)."""
        assert self.intake is not None
        ips = [str(ip.address) for ip in self.config.ips]
        providers = [*self.attempts.providers.names, "other"]
        try:
            return await self.signals.rates(ips, providers, today)
        except CounterError:
            return None

    def _today_json(self) -> dict[str, Any]:
        today = self.clock().astimezone(self.config.zone).date()
        return self.metrics.today.snapshot(today).to_json()

    async def today_tally(self, today: date) -> TallySnapshot:
        """Today's routing as this process counted it (the supervisor asks its workers)."""
        return self.metrics.today.snapshot(today)

    async def latest_reasons(self) -> dict[str, dict[str, Any]]:
        """The latest deferral and bounce per provider (the supervisor asks its workers)."""
        return self.actions.latest_reasons()

    async def queue_summary(self, top: int = 10) -> dict[str, Any]:
        """The qshape summary of this process's queue (the supervisor asks its workers)."""
        return summary(self.actions.views(), self.clock().timestamp(), top)

    async def ip_action(self, address: str, action: str) -> dict[str, Any]:
        """pause | resume | complete | uncomplete an IP; stored, so it survives restarts and
        every process sees it. ``persisted`` says "pending" when the store failed: in force in this
        process only until the store takes it (the caller should know)."""
        if address not in {str(ip.address) for ip in self.config.ips}:
            raise KeyError(address)
        now = self.clock()
        outcome = await {
            "pause": self.router.pause,
            "resume": self.router.resume,
            "complete": self.router.complete,
            "uncomplete": self.router.uncomplete,
        }[action](address, now)
        log.warning("operator: %s %s (%s)", action, address, outcome.value)
        entry = next(
            ip for ip in (await self.status(queue=False))["ips"] if ip["address"] == address
        )
        return {**entry, "persisted": outcome.value}

    async def _ip_action(self, path: str) -> tuple[int, str, bytes]:
        parts = path.strip("/").split("/")  # ips / ADDRESS / ACTION
        if len(parts) != 3 or parts[2] not in IP_ACTIONS:
            return json_page({"error": f"use POST /ips/ADDRESS/{'|'.join(IP_ACTIONS)}"}, 400)
        try:
            return json_page(await self.ip_action(parts[1], parts[2]))
        except KeyError:
            return json_page({"error": f"{parts[1]} is not an IP of this relay"}, 404)

    async def suppression_list(self) -> dict[str, Any]:
        """Every suppressed address in force, read from the store (the whole fleet's list)."""
        settings = self.config.suppression
        entries = await self.suppression.entries()
        return {
            "enabled": settings.enabled,
            "ttl_s": settings.ttl_s,
            "count": len(entries),
            "entries": [e.to_json(settings.ttl_s) for e in entries],
        }

    async def suppression_action(self, address: str, action: str) -> dict[str, Any]:
        """add | remove an address. ``persisted`` "pending": in force in this process only
        until the store takes it. KeyError: removing an address not on the list;
        ValueError: adding something that is not an address."""
        ttl_s = self.config.suppression.ttl_s
        if action == "add":
            if not valid_mailbox(address.strip().removeprefix("<").removesuffix(">")):
                raise ValueError(f"{address!r} is not an email address")
            added = await self.suppression.add(address, self.clock())
            log.warning(
                "operator: suppressed <%s> (%s)", added.entry.address, added.persisted.value
            )
            return {**added.entry.to_json(ttl_s), "persisted": added.persisted.value}
        removed = await self.suppression.remove(address)
        if removed.entry is None and removed.persisted is Persisted.STORED:
            raise KeyError(removed.address)
        log.warning("operator: unsuppressed <%s> (%s)", removed.address, removed.persisted.value)
        return {"address": removed.address, "removed": True, "persisted": removed.persisted.value}

    async def _suppression_page(self) -> tuple[int, str, bytes]:
        try:
            return json_page(await self.suppression_list())
        except CounterError as exc:
            return json_page({"error": f"state store: {exc}"}, 503)

    async def _suppression_action(self, path: str) -> tuple[int, str, bytes]:
        quoted, _, action = path.removeprefix("/suppression/").rpartition("/")
        if not quoted or action not in ("add", "remove"):
            return json_page({"error": "use POST /suppression/ADDRESS/add|remove"}, 400)
        address = unquote(quoted)
        try:
            return json_page(await self.suppression_action(address, action))
        except KeyError:
            return json_page({"error": f"{address} is not on the suppression list"}, 404)
        except ValueError as exc:
            return json_page({"error": str(exc)}, 400)

    async def _status_page(self) -> tuple[int, str, bytes]:
        return json_page(await self.status())

    async def _status_html(self) -> tuple[int, str, bytes]:
        return 200, "text/html; charset=utf-8", statuspage.render(await self.status())

    async def _health_page(self) -> tuple[int, str, bytes]:
        """200 while the relay accepts and delivers mail; "degraded: ..." names what is
        wrong (it still delivers, via the pool or other IPs), so alerts can say why."""
        self.check_source_ips()
        reasons = []
        if not self.spool.writable:  # every new message is answered 451 meanwhile
            reasons.append(f"spool not writable ({self.spool.fault})")
        if not self.counters_up:
            reasons.append("counters store unreachable")
        now = self.clock()
        addresses = [str(ip.address) for ip in self.config.ips]
        down = [a for a in addresses if self.router.is_down(a, now)]
        if down:
            reasons.append(f"source IP{'s' if len(down) > 1 else ''} down: {', '.join(down)}")
        if reasons:
            return 200, "text/plain", f"degraded: {'; '.join(reasons)}\n".encode()
        return 200, "text/plain", b"ok\n"

    async def _metrics_page(self) -> tuple[int, str, bytes]:
        await self.update_gauges()
        return 200, "text/plain; version=0.0.4; charset=utf-8", self.metrics.render()

    def _connections_changed(self) -> None:
        """A connection opened, closed or went idle (several times per message): the gauges
        follow within CONNECTION_GAUGES_S, not at each change. A scrape of this process sets
        them first anyway; a worker's are read from its metrics file, hence the timer."""
        if self._gauges_due is None:
            loop = asyncio.get_running_loop()
            self._gauges_due = loop.call_later(CONNECTION_GAUGES_S, self._connection_gauges)

    def _connection_gauges(self) -> None:
        """warmrelay_connections: every lane seen keeps its series (0 when closed)."""
        if self._gauges_due is not None:
            self._gauges_due.cancel()
            self._gauges_due = None
        now = self.dispatcher.connections()
        for key in self._lanes_seen - now.keys():
            for state in ("active", "idle"):
                self.metrics.connections.labels(*key, state).set(0)
        for key, c in now.items():
            self.metrics.connections.labels(*key, "active").set(c["open"] - c["idle"])
            self.metrics.connections.labels(*key, "idle").set(c["idle"])
        self._lanes_seen |= now.keys()

    async def update_gauges(self) -> None:
        """Gauges that mirror counters and state are set just before a scrape."""
        self.check_source_ips()
        self._connection_gauges()
        m = self.metrics
        status = await self.status(queue=False)
        for ip in status["ips"]:
            a = ip["address"]
            if ip["warmup_day"] is not None:
                day = ip["warmup_day"] if ip["state"] != WarmupState.NOT_STARTED.value else 0
                m.warmup_day.labels(a, "").set(day)
                for provider, pair in (ip.get("pairs") or {}).items():
                    m.warmup_day.labels(a, provider).set(pair["day"])
                    last = pair.get("last") or {}
                    for name, value in (last.get("values") or {}).items():
                        number = SNDS_LEVEL.get(value) if isinstance(value, str) else value
                        if isinstance(number, int | float):
                            m.reputation_signal.labels(a, provider, name).set(number)
                if ip["cap"] is None:  # warm: no cap, no series
                    m.drop(m.warmup_cap, a)
                else:
                    m.warmup_cap.labels(a).set(ip["cap"])
                if ip["sent"] is not None:
                    m.warmup_sent.labels(a).set(ip["sent"])
            m.ip_up.labels(a).set(1 if ip["up"] else 0)
            for provider in self.router.control(a).suspended:
                m.suspended.labels(a, provider).set(1 if provider in ip["suspended"] else 0)
        m.spool_messages.set(status["spool"]["messages"])
        oldest = self.spool_oldest()
        now_s = self.clock().timestamp()
        m.queue_oldest_age.set(0.0 if oldest is None else max(0.0, now_s - oldest))
        m.counters_up.set(1 if self.counters_up else 0)
        self._disk_gauges()

    def _disk_gauges(self) -> None:
        """The spool's and the ledger's state of a disk incident (see README: A disk
        incident)."""
        m = self.metrics
        m.spool_writable.set(1 if self.spool.writable else 0)
        m.spool_unrecorded.set(self.spool.unrecorded)
        m.reservations_unreleased.set(self.router.ledger.unreleased)


@dataclass(frozen=True)
class Worker:
    """This process is worker ``index`` of ``count`` (``serve --workers``)."""

    index: int
    count: int
    ports: tuple[int, ...]  # the listeners' ports, resolved by the supervisor


def _add_today(entry: dict[str, Any], tally: TallySnapshot) -> None:
    """An IP's numbers of today (``status``): what it routed, by reason; for a warming IP
    what it refused that went elsewhere, and whether (and when first) its cap was reached:
    full by the count, even when this process did not see the moment (after a restart)."""
    address = entry["address"]
    entry["routed_today"] = dict(tally.routed.get(address, {}))
    warmup = entry["warmup_day"] is not None
    overflow = tally.overflow.get(address, {})
    entry["overflow_today"] = sum(overflow.values()) if warmup else None
    entry["overflow_today_reasons"] = dict(overflow) if warmup else None
    reached = tally.cap_reached.get((address, ""))
    cap, sent = entry["cap"], entry["sent"]
    capped = entry["role"] == "warming" and isinstance(cap, int) and cap > 0
    entry["cap_reached"] = reached is not None or (capped and isinstance(sent, int) and sent >= cap)
    entry["cap_reached_at"] = reached.isoformat() if reached is not None else None
    # per provider: beside "providers", whose entries programs may compare whole
    entry["provider_caps_reached_at"] = {
        name: at.isoformat() if (at := tally.cap_reached.get((address, name))) else None
        for name in entry.get("providers") or {}
    }


def _today(tally: TallySnapshot, zone: tzinfo) -> dict[str, Any]:
    """Which day the per-IP numbers of today are, and since when they were counted (null:
    the whole day; else the process started today and saw nothing before)."""
    since = tally.counted_since(zone)
    return {
        "date": tally.day.isoformat(),
        "counted_since": None if since is None else since.isoformat(),
    }


def spool_dir(state_dir: Path, index: int) -> Path:
    """Worker 0 (and a single process) uses state.dir/spool; worker i, spool-i."""
    return state_dir / ("spool" if index == 0 else f"spool-{index}")


def _redact(url: str) -> str:
    """A counters URL without its password (it may carry one)."""
    parsed = urlparse(url)
    if parsed.password:
        return url.replace(f":{parsed.password}@", ":***@")
    return url


def log_failed_reload(task: asyncio.Task[bool]) -> None:
    """Done-callback of a SIGHUP reload. Nobody awaits that task, so without this an
    exception in it vanishes: the operator would believe the new file is in force."""
    if task.cancelled():
        return
    exc = task.exception()
    if exc is not None:
        log.error(
            "reload: failed (%s: %s); the running configuration stays",
            type(exc).__name__,
            exc,
            exc_info=exc,
        )


def run(
    config: Config,
    worker: Worker | None = None,
    path: str | None = None,
    log_format: LogFormat | None = None,
) -> int:
    """The ``serve`` command (or one worker of it): run until SIGTERM or SIGINT."""
    setup_logging(log_format or config.log.format, worker=worker.index if worker else None)
    if worker is not None:
        quiet_key_warnings()  # the supervisor said it

    async def main() -> None:
        shutdown = asyncio.Event()
        loop = asyncio.get_running_loop()
        notifies = worker is None  # with --workers, systemd hears from the supervisor only

        def stop() -> None:
            if notifies and not shutdown.is_set():
                sdnotify.stopping()
            shutdown.set()

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop)
        relay = Relay(config, worker=worker, log_format=log_format)
        reloads: set[asyncio.Task[bool]] = set()  # held so a running reload is not collected

        def reloaded(task: asyncio.Task[bool]) -> None:
            reloads.discard(task)
            log_failed_reload(task)
            if notifies:
                sdnotify.reload_done(task)

        def reload(path: str | Config) -> None:
            if notifies:
                sdnotify.reloading()
            task = loop.create_task(relay.reload(path))
            reloads.add(task)
            task.add_done_callback(reloaded)

        if path is not None:  # SIGHUP: reload the configuration (and the TLS certificate)
            loop.add_signal_handler(signal.SIGHUP, reload, path)
        elif relay.tls is not None:
            loop.add_signal_handler(signal.SIGHUP, relay.tls.reload)
        else:  # a worker: its reloads come from the supervisor; a stray SIGHUP must not kill it
            loop.add_signal_handler(signal.SIGHUP, lambda: None)
        loop.add_signal_handler(signal.SIGUSR1, relay.router.reload_soon)
        follower: asyncio.Task[None] | None = None
        if worker is not None:
            from warmrelay.operate.workers import follow_supervisor

            async def follow() -> None:
                """Reloads come from the supervisor (it read and accepted the file); the end
                of its pipe means it died: drain and exit rather than live on unsupervised."""
                await follow_supervisor(reload)
                if not shutdown.is_set():
                    log.warning("the supervisor is gone (its pipe closed); stopping")
                    shutdown.set()

            follower = loop.create_task(follow())
        try:
            await relay.start()
            settle_heap()
            if notifies:
                sdnotify.ready(f"serving: {len(relay.config.ips)} IP(s)")
            try:
                await shutdown.wait()
            finally:
                await relay.stop()
        finally:
            if follower is not None:
                follower.cancel()

    try:
        # uvloop (see pyproject.toml): asyncio's transports and callbacks in C, ~15 % less
        # CPU per message; the CLI's short commands keep asyncio's own loop
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(main())
    except (StartError, OSError) as exc:
        log.error("%s: cannot start: %s", path or "warmrelay", exc)
        return 1
    return 0


async def start_admin(admin: AdminServer, host: str, port: int) -> None:
    """The admin endpoint on admin.listen; a bind failure names the key."""
    try:
        await admin.start(host, port)
    except OSError as exc:
        raise StartError.bind("admin.listen", host, port, exc) from exc
