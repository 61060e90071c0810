"""``serve --workers N``: N relay processes on one host, one admin endpoint.

One Python process uses one core. The supervisor reserves each listener's
port (so port 0 resolves once), starts N workers that each bind it with
SO_REUSEPORT (the kernel spreads connections over them), gives each its own
spool directory, restarts a worker that dies, forwards SIGTERM for a graceful
drain, and serves the admin endpoint: metrics merged from all workers
(prometheus-client multiprocess mode), status from the shared counters.

What it shares with its workers (the state.dir lock, configuration frames on their
stdin) is in ``operate.workers``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
import sys
from collections.abc import Iterable
from datetime import date
from pathlib import Path
from typing import Any

from warmrelay import __version__
from warmrelay.config import Config
from warmrelay.errors import StartError
from warmrelay.operate import sdnotify
from warmrelay.operate.logs import LogFormat, pass_worker_line
from warmrelay.operate.tally import TallySnapshot, merge
from warmrelay.operate.workers import (
    WORKER_ENV,
    config_frame,
)

log = logging.getLogger("warmrelay.supervisor")

RESTART_MIN_S = 0.5  # first restart: soon, a dead worker's acknowledged mail is waiting
RESTART_MAX_S = 30.0  # a worker that cannot start is retried at least this often
STABLE_S = 10.0  # a worker up this long after "ready" did not fail to start: back-off resets


def reserve_ports(config: Config) -> tuple[list[socket.socket], list[int]]:
    """Bind (without listening) each listener's address with SO_REUSEPORT: resolves port 0
    and keeps the port ours while workers come and go."""
    holders: list[socket.socket] = []
    ports: list[int] = []
    for n, listener in enumerate(config.smtp.listen):
        host, port = listener.address
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            sock.close()
            for held in holders:
                held.close()
            raise StartError.bind(f"smtp.listen[{n}]", host, port, exc) from exc
        holders.append(sock)
        ports.append(int(sock.getsockname()[1]))
    return holders, ports


def spool_files(state_dir: Path) -> int:
    return sum(1 for d in state_dir.glob("spool*") for _ in d.glob("queue/*.msg"))


def restart_delay(failures: int) -> float:
    """Exponential back-off between restarts of a worker that keeps failing, capped: a
    worker that cannot start must not spin (and flood the log) but is retried for ever."""
    return float(min(RESTART_MAX_S, RESTART_MIN_S * 2 ** min(failures, 16)))


def _exit_text(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"signal {signal.Signals(-code).name}"
    return f"code {code}"


def supervise(
    config: Config,
    config_path: str,
    workers: int,
    lock_fd: int | None = None,
    log_format: LogFormat | None = None,
) -> int:
    """Run N workers until SIGTERM/SIGINT. ``lock_fd`` (from lock_state_dir) is inherited by
    every worker, so state.dir stays taken until the last process of this instance exits."""
    metrics_dir = config.state.dir / "metrics"
    shutil.rmtree(metrics_dir, ignore_errors=True)  # ours: state.dir is locked
    metrics_dir.mkdir(parents=True)
    if "prometheus_client" in sys.modules:
        raise RuntimeError("prometheus_client was imported before the supervisor set it up")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)  # before prometheus is imported

    from warmrelay.app import Relay, log_failed_reload, start_admin
    from warmrelay.operate.admin import AdminServer
    from warmrelay.operate.metrics import render_all_processes
    from warmrelay.operate.queueapi import FleetQueueApi, worker_socket
    from warmrelay.queue.spool import Spool

    holders, ports = reserve_ports(config)
    procs: dict[int, asyncio.subprocess.Process] = {}
    stopping = asyncio.Event()

    def signal_workers(sig: signal.Signals) -> None:
        for proc in procs.values():
            if proc.returncode is None:
                proc.send_signal(sig)

    def send_config(proc: asyncio.subprocess.Process, frame: bytes) -> None:
        """Written at once, in order: a worker started during a reload still gets the
        newest configuration last."""
        if proc.returncode is None and proc.stdin is not None and not proc.stdin.is_closing():
            proc.stdin.write(frame)

    class SupervisorRelay(Relay):
        """The supervisor's relay is never started: its router, counters and admin pages
        serve the whole host (spool files of every worker, metrics merged from all)."""

        def spool_size(self) -> int:
            return spool_files(config.state.dir)

        async def _metrics_page(self) -> tuple[int, str, bytes]:
            await self.update_gauges()
            body = render_all_processes(str(metrics_dir))
            return 200, "text/plain; version=0.0.4; charset=utf-8", body

        def spool_oldest(self) -> float | None:
            return Spool.oldest_on_disk(config.state.dir.glob("spool*"))

        async def latest_reasons(self) -> dict[str, dict[str, Any]]:
            return await self.fleet_queue.reasons_of()

        async def queue_summary(self, top: int = 10) -> dict[str, Any]:
            return await self.fleet_queue.summary_of(top)

        async def today_tally(self, today: date) -> TallySnapshot:
            """Each worker counts what it routes: ask them all (as for the reasons), add up."""
            answers = await self.fleet_queue.todays_of()
            return merge(worker_tallies(answers), today, self.metrics.today.started)

        def queue_routes(self, admin: AdminServer) -> None:
            """Each worker has its own spool: ask them all (unix sockets), merge."""
            sockets = [worker_socket(config.state.dir, i) for i in range(workers)]
            self.fleet_queue = FleetQueueApi(sockets, lambda: self.config.admin.worker_timeout_s)
            self.fleet_queue.register(admin)

        async def ip_action(self, address: str, action: str) -> dict[str, Any]:
            result = await super().ip_action(address, action)
            signal_workers(signal.SIGUSR1)  # workers re-read the state now, not in 30 s
            return result

    relay = SupervisorRelay(config, log_format=log_format)

    async def run_worker(index: int, ready: asyncio.Event) -> None:
        """Start worker ``index`` with the running configuration; restart it when it dies,
        with exponential back-off while it keeps failing."""
        loop = asyncio.get_running_loop()
        env = dict(os.environ)
        env[WORKER_ENV] = f"{index}/{workers}/" + ",".join(map(str, ports))
        failures = 0
        while not stopping.is_set():
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "warmrelay",
                "serve",
                "-c",
                config_path,
                env=env,
                stdin=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                pass_fds=() if lock_fd is None else (lock_fd,),
            )
            procs[index] = proc
            send_config(proc, config_frame(relay.config))
            log.info("worker %d started: pid %d", index, proc.pid)
            ready_at: float | None = None
            assert proc.stderr is not None
            async for raw in proc.stderr:
                line = raw.decode(errors="replace")
                pass_worker_line(line, index, relay.config.log.format)
                if ready_at is None and " ready: " in line:
                    ready_at = loop.time()
                    ready.set()
            code = await proc.wait()
            if proc.stdin is not None:
                proc.stdin.close()
            from prometheus_client import multiprocess

            multiprocess.mark_process_dead(proc.pid)  # type: ignore[no-untyped-call]
            if stopping.is_set():
                return
            if ready_at is not None and loop.time() - ready_at >= STABLE_S:
                failures = 0
            delay = restart_delay(failures)
            failures += 1
            log.error(
                "worker %d (pid %d) exited with %s; restarting it in %.1f s",
                index,
                proc.pid,
                _exit_text(code),
                delay,
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), delay)

    async def reload() -> bool:
        """SIGHUP: the supervisor checks the file; only a configuration it accepted goes to
        the workers. A refused file changes nothing anywhere, restarts included."""
        if not await relay.reload(config_path):
            return False
        frame = config_frame(relay.config)
        for proc in procs.values():
            send_config(proc, frame)
        return True

    async def main() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stopping.set)
        reloads: set[asyncio.Task[bool]] = set()  # held so a running reload is not collected

        def reloaded(task: asyncio.Task[bool]) -> None:
            reloads.discard(task)
            log_failed_reload(task)
            sdnotify.reload_done(task)

        def on_sighup() -> None:
            sdnotify.reloading()
            task = loop.create_task(reload())
            reloads.add(task)
            task.add_done_callback(reloaded)

        loop.add_signal_handler(signal.SIGHUP, on_sighup)
        await relay.router.refresh(relay.clock())
        relay.check_source_ips()  # the supervisor's /healthz and /metrics show it too
        if config.admin.listen is not None:
            await start_admin(relay.admin, *config.admin.listen)
        readies = [asyncio.Event() for _ in range(workers)]
        tasks = [asyncio.create_task(run_worker(i, readies[i])) for i in range(workers)]

        async def all_ready() -> None:
            await asyncio.gather(*(e.wait() for e in readies))

        ready_task = asyncio.create_task(all_ready())
        stop_task = asyncio.create_task(stopping.wait())
        await asyncio.wait([ready_task, stop_task], return_when=asyncio.FIRST_COMPLETED)
        ready_task.cancel()
        if not stopping.is_set():
            host = config.smtp.listen[0].address[0]
            admin = f"{config.admin.listen[0]}:{relay.admin.port}" if config.admin.listen else "off"
            log.info(
                "warmrelay %s ready: smtp %s:%d, admin %s, %d workers",
                __version__,
                host,
                ports[0],
                admin,
                workers,
            )
            sdnotify.ready(f"serving: {workers} workers, {len(config.ips)} IP(s)")
        await stopping.wait()
        sdnotify.stopping()
        log.info("stopping %d workers", workers)
        signal_workers(signal.SIGTERM)
        await asyncio.gather(*tasks, return_exceptions=True)
        await relay.admin.stop()
        await relay.counters.close()

    try:
        asyncio.run(main())
    finally:
        for sock in holders:
            sock.close()
    return 0


def worker_tallies(answers: Iterable[tuple[int, int, Any]]) -> list[TallySnapshot]:
    """The workers' answers to GET /today; one that cannot be read is logged and left out."""
    out = []
    for index, status, body in answers:
        try:
            if status != 200:
                raise ValueError(f"status {status}")
            out.append(TallySnapshot.from_json(body))
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("status: worker %d's tally of today cannot be read: %s", index, exc)
    return out
