"""``serve --workers N``: N relay processes on one host, one admin endpoint.

One Python process uses one core. The supervisor reserves each listener's
port (so port 0 resolves once), starts N workers that each bind it with
SO_REUSEPORT (the kernel spreads connections over them), gives each its own
spool directory, restarts a worker that dies, forwards SIGTERM for a graceful
drain, and serves the admin endpoint: metrics merged from all workers
(prometheus-client multiprocess mode), status from the shared counters.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import socket
import sys
from pathlib import Path
from typing import Any

from warmrelay import __version__
from warmrelay.config import Config

log = logging.getLogger("warmrelay.supervisor")

WORKER_ENV = "WARMRELAY_WORKER"  # "index/count/port,port": set for worker processes
RESTART_DELAY_S = 1.0


def reserve_ports(config: Config) -> tuple[list[socket.socket], list[int]]:
    """Bind (without listening) each listener's address with SO_REUSEPORT: resolves port 0
    and keeps the port ours while workers come and go."""
    holders, ports = [], []
    for listener in config.smtp.listen:
        host, port = listener.address
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        holders.append(sock)
        ports.append(int(sock.getsockname()[1]))
    return holders, ports


def spool_files(state_dir: Path) -> int:
    return sum(1 for d in state_dir.glob("spool*") for _ in d.glob("queue/*.msg"))


def supervise(config: Config, config_path: str, workers: int) -> int:
    metrics_dir = config.state.dir / "metrics"
    shutil.rmtree(metrics_dir, ignore_errors=True)
    metrics_dir.mkdir(parents=True)
    if "prometheus_client" in sys.modules:
        raise RuntimeError("prometheus_client was imported before the supervisor set it up")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)  # before prometheus is imported

    from warmrelay.app import Relay
    from warmrelay.metrics import render_all_processes

    holders, ports = reserve_ports(config)
    procs: dict[int, asyncio.subprocess.Process] = {}
    stopping = asyncio.Event()

    def signal_workers(sig: signal.Signals) -> None:
        for proc in procs.values():
            if proc.returncode is None:
                proc.send_signal(sig)

    class SupervisorRelay(Relay):
        """The supervisor's relay is never started: its router, counters and admin pages
        serve the whole host (spool files of every worker, metrics merged from all)."""

        def spool_size(self) -> int:
            return spool_files(config.state.dir)

        async def _metrics_page(self) -> tuple[int, str, bytes]:
            await self.update_gauges()
            body = render_all_processes(str(metrics_dir))
            return 200, "text/plain; version=0.0.4; charset=utf-8", body

        async def ip_action(self, address: str, action: str) -> dict[str, Any]:
            result = await super().ip_action(address, action)
            signal_workers(signal.SIGUSR1)  # workers re-read the state now, not in 30 s
            return result

    relay = SupervisorRelay(config)

    async def run_worker(index: int, ready: asyncio.Event) -> None:
        env = dict(os.environ)
        env[WORKER_ENV] = f"{index}/{workers}/" + ",".join(map(str, ports))
        while not stopping.is_set():
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "warmrelay",
                "serve",
                "-c",
                config_path,
                env=env,
                stderr=asyncio.subprocess.PIPE,
            )
            procs[index] = proc
            assert proc.stderr is not None
            async for raw in proc.stderr:
                line = raw.decode(errors="replace")
                sys.stderr.write(f"[w{index}] {line}")
                if " ready: " in line:
                    ready.set()
            code = await proc.wait()
            from prometheus_client import multiprocess

            multiprocess.mark_process_dead(proc.pid)  # type: ignore[no-untyped-call]
            if stopping.is_set():
                return
            log.error("worker %d exited with %s; restarting it", index, code)
            await asyncio.sleep(RESTART_DELAY_S)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stopping.set)
        reloads: set[asyncio.Task[bool]] = set()

        def reload() -> None:  # SIGHUP: every worker re-reads the file, and so do we
            signal_workers(signal.SIGHUP)
            reloads.add(loop.create_task(relay.reload(config_path)))

        loop.add_signal_handler(signal.SIGHUP, reload)
        await relay.router.refresh(relay.clock())
        relay.check_source_ips()  # the supervisor's /healthz and /metrics show it too
        if config.admin.listen is not None:
            await relay.admin.start(*config.admin.listen)
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
        await stopping.wait()
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


def worker_from_env() -> tuple[int, int, tuple[int, ...]] | None:
    value = os.environ.get(WORKER_ENV)
    if not value:
        return None
    index, count, ports = value.split("/")
    return int(index), int(count), tuple(int(p) for p in ports.split(",") if p)
