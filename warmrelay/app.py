"""The relay process: startup -> serve -> shutdown, with an injectable shutdown trigger.

Tests pass an ``asyncio.Event``; ``run`` (the ``serve`` command) sets it from
SIGTERM/SIGINT. Startup recovers the spool before the listeners open, so
mail acknowledged before a crash is delivered first.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from typing import Any

from warmrelay import __version__
from warmrelay.admin import AdminServer, json_page
from warmrelay.config import Config
from warmrelay.counters import CounterKey, Counters, open_counters
from warmrelay.dispatcher import Dispatcher
from warmrelay.listener import RelayHandler, make_protocol
from warmrelay.metrics import Metrics
from warmrelay.nexthop import NextHopResolver
from warmrelay.router import Router
from warmrelay.schedule import WarmupState
from warmrelay.scheduler import Clock, Scheduler, utc_now
from warmrelay.spool import Spool
from warmrelay.tlsfiles import TlsFiles

log = logging.getLogger("warmrelay")


class Relay:
    def __init__(self, config: Config, *, clock: Clock = utc_now) -> None:
        self.config = config
        self.clock = clock
        self.metrics = Metrics()
        self.spool = Spool(config.state.dir / "spool")
        self.counters: Counters = open_counters(config.state.counters, config.state.dir)
        self.router = Router(config, self.counters)
        self.resolver = NextHopResolver(
            routes=config.routes,
            nameservers=config.dns.nameservers,
            timeout_s=config.dns.timeout_s,
            mx_port=config.delivery.mx_port,
        )
        self.dispatcher = Dispatcher(config.delivery)
        self.scheduler = Scheduler(
            config, self.spool, self.router, self.resolver, self.dispatcher, self.metrics, clock
        )
        self.admin = AdminServer(
            {
                "/metrics": self._metrics_page,
                "/healthz": self._health_page,
                "/status": self._status_page,
            },
            {"/ips/": self._ip_action},
        )
        self._servers: list[asyncio.Server] = []
        tls = config.smtp.tls
        self.tls = TlsFiles(tls.cert, tls.key) if tls is not None else None
        token_env = config.admin.token_env
        self.admin_token = os.environ.get(token_env) if token_env else None
        if token_env and not self.admin_token:
            log.warning("admin.token_env: %s is not set; the admin endpoint is open", token_env)
        self.admin.token = self.admin_token

    @property
    def smtp_ports(self) -> list[int]:
        return [int(s.sockets[0].getsockname()[1]) for s in self._servers]

    async def start(self) -> None:
        self.config.state.dir.mkdir(parents=True, exist_ok=True)
        await self.router.refresh(self.clock())  # pause, progress, suspensions from the store
        recovered = await self.spool.open()
        for item in recovered:
            self.scheduler.submit(item.message, item.done, item.attempts)
        if recovered:
            log.info("recovered %d message(s) from the spool", len(recovered))
        self.scheduler.start()
        handler = RelayHandler(self.config, self.spool, self.scheduler.accept, self.metrics)
        loop = asyncio.get_running_loop()
        tls_ctx = self.tls.context if self.tls is not None else None
        if self.tls is not None:
            self.tls.watch()
        for listener in self.config.smtp.listen:
            host, port = listener.address
            implicit = self.config.smtp.listener_tls(listener) == "implicit"
            server = await loop.create_server(
                make_protocol(handler, self.config, listener, tls_ctx),
                host,
                port,
                ssl=tls_ctx if implicit else None,
            )
            self._servers.append(server)
        if self.config.admin.listen is not None:
            await self.admin.start(*self.config.admin.listen)
        log.info(
            "warmrelay %s ready: smtp %s, admin %s, %d IP(s)",
            __version__,
            ", ".join(
                f"{li.address[0]}:{p}"
                for li, p in zip(self.config.smtp.listen, self.smtp_ports, strict=True)
            ),
            f"{self.config.admin.listen[0]}:{self.admin.port}"
            if self.config.admin.listen
            else "off",
            len(self.config.ips),
        )

    async def stop(self) -> None:
        """Stop accepting, drain deliveries in progress, close stores; the rest stays spooled."""
        for server in self._servers:
            server.close()
        self.dispatcher.closing = True
        await self.scheduler.stop(self.config.delivery.drain_timeout_s)
        await self.dispatcher.close()
        await self.spool.close()
        await self.counters.close()
        await self.admin.stop()
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

    async def status(self) -> dict[str, Any]:
        now = self.clock()
        ips = []
        for ip in self.config.ips:
            st = self.router.status(ip, now)
            address = str(ip.address)
            entry: dict[str, Any] = {
                "address": address,
                "helo": ip.helo,
                "state": st.state.value,
                "warmup_day": st.day if ip.warmup is not None else None,
                "cap": st.cap,
                "sent": await self.router.sent(ip, now) if ip.warmup is not None else None,
                "up": not self.router.is_down(address, now),
            }
            control = self.router.control(address)
            entry["paused_since"] = (
                control.paused_since.isoformat() if control.paused_since else None
            )
            entry["suspended"] = {
                provider: {"until": s.until.isoformat(), "reason": s.reason}
                for provider, s in control.suspended.items()
                if self.router.suspension(address, provider, now)
            }
            caps = self.router.caps(ip, now)
            if ip.warmup is not None and caps is not None and caps.limits:
                entry["cap_now"] = caps.limits[0].cap  # released so far today (smoothing)
                entry["providers"] = {}
                for name in ip.warmup.providers:
                    pcaps = self.router.caps(ip, now, name)
                    assert pcaps is not None
                    lim = pcaps.limits[-1]
                    key = CounterKey(address, lim.window, lim.scope)
                    entry["providers"][name] = {
                        "cap_now": lim.cap,
                        "sent": await self.counters.get(key),
                    }
            ips.append(entry)
        return {
            "version": __version__,
            "time": now.isoformat(),
            "ips": ips,
            "spool": {
                "messages": len(self.spool),
                "ready": self.scheduler.ready,
                "deferred": self.scheduler.deferred,
            },
        }

    async def ip_action(self, address: str, action: str) -> dict[str, Any]:
        """pause | resume | complete an IP; persisted, so it survives restarts."""
        if address not in {str(ip.address) for ip in self.config.ips}:
            raise KeyError(address)
        now = self.clock()
        await {
            "pause": self.router.pause,
            "resume": self.router.resume,
            "complete": self.router.complete,
        }[action](address, now)
        log.warning("operator: %s %s", action, address)
        return next(ip for ip in (await self.status())["ips"] if ip["address"] == address)

    async def _ip_action(self, path: str) -> tuple[int, str, bytes]:
        parts = path.strip("/").split("/")  # ips / ADDRESS / ACTION
        if len(parts) != 3 or parts[2] not in ("pause", "resume", "complete"):
            return json_page({"error": "use POST /ips/ADDRESS/pause|resume|complete"}, 400)
        try:
            return json_page(await self.ip_action(parts[1], parts[2]))
        except KeyError:
            return json_page({"error": f"{parts[1]} is not an IP of this relay"}, 404)

    async def _status_page(self) -> tuple[int, str, bytes]:
        return json_page(await self.status())

    async def _health_page(self) -> tuple[int, str, bytes]:
        return 200, "text/plain", b"ok\n"

    async def _metrics_page(self) -> tuple[int, str, bytes]:
        m = self.metrics
        for ip in (await self.status())["ips"]:
            a = ip["address"]
            if ip["warmup_day"] is not None:
                day = ip["warmup_day"] if ip["state"] != WarmupState.NOT_STARTED.value else 0
                m.warmup_day.labels(a).set(day)
                m.warmup_cap.labels(a).set(-1 if ip["cap"] is None else ip["cap"])
                m.warmup_sent.labels(a).set(ip["sent"])
            m.ip_up.labels(a).set(1 if ip["up"] else 0)
            for provider in self.router.control(a).suspended:
                m.suspended.labels(a, provider).set(1 if provider in ip["suspended"] else 0)
        m.spool_messages.set(len(self.spool))
        return 200, "text/plain; version=0.0.4; charset=utf-8", m.render()


def run(config: Config) -> int:
    """The ``serve`` command: run until SIGTERM or SIGINT."""
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )

    async def main() -> None:
        shutdown = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, shutdown.set)
        relay = Relay(config)
        if relay.tls is not None:
            loop.add_signal_handler(signal.SIGHUP, relay.tls.reload)
        await relay.serve(shutdown)

    try:
        asyncio.run(main())
    except OSError as exc:
        log.error("cannot start: %s", exc)
        return 1
    return 0
