"""``serve --workers N``: N relay processes on one host, one admin endpoint.

One Python process uses one core. The supervisor reserves each listener's
port (so port 0 resolves once), starts N workers that each bind it with
SO_REUSEPORT (the kernel spreads connections over them), gives each its own
spool directory, restarts a worker that dies, forwards SIGTERM for a graceful
drain, and serves the admin endpoint: metrics merged from all workers
(prometheus-client multiprocess mode), status from the shared counters.

What it shares with its workers (the state.dir lock, configuration frames on their
stdin) is in ``operate.workers``.

The workers are forked, so they share the supervisor's memory: before its event loop, its
admin endpoint (aiohttp) or any thread exists, the supervisor imports what a worker runs
(``warmrelay.app`` and all it imports, the lazily loaded DNS record types), moves those
objects out of the collector's reach (``gc.freeze``: a collection in a worker would write
to every object's header, and so copy every page) and forks the N workers. A worker
shares those pages for as long as neither side writes to them; it builds everything else
anew (loop, listening sockets, spool, counters, thread pools) as an exec'd one did, and
keeps only its own fds (the state.dir lock, its stdin and stderr pipes). A worker that is
restarted later, when the supervisor runs its loop, aiohttp and the counters' threads, is
started as a new ``python -m warmrelay serve`` process, as every worker was before: forking
a process with threads can leave the child a lock held by a thread it does not have.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import importlib
import logging
import os
import random
import shutil
import signal
import socket
import sys
import threading
import traceback
from collections.abc import AsyncIterator, Iterable
from datetime import date
from typing import TYPE_CHECKING, Any, NoReturn, Protocol

from warmrelay import __version__
from warmrelay.config import Config
from warmrelay.errors import StartError, WarmrelayError
from warmrelay.operate import sdnotify
from warmrelay.operate.logs import LogFormat, pass_worker_line
from warmrelay.operate.tally import TallySnapshot, merge
from warmrelay.operate.workers import (
    WORKER_ENV,
    config_frame,
    receive_config,
    worker_env,
)

if TYPE_CHECKING:
    from warmrelay.operate.admin import AdminServer

log = logging.getLogger("warmrelay.supervisor")

RESTART_MIN_S = 0.5  # first restart: soon, a dead worker's acknowledged mail is waiting
RESTART_MAX_S = 30.0  # a worker that cannot start is retried at least this often
STABLE_S = 10.0  # a worker up this long after "ready" did not fail to start: back-off resets

# What a worker imports beyond warmrelay.app (which the supervisor imports anyway), so that
# it is in the memory the workers share: modules loaded on first use (the DNS record types
# of an MX, address or TXT answer and of a negative one, asyncio's DNS backend). aiohttp
# and redis-py only where the configuration makes the workers load them
# (preload_worker_modules).
WORKER_PRELOAD = (
    "dns._asyncio_backend",
    "dns.rdtypes.ANY.CNAME",
    "dns.rdtypes.ANY.MX",
    "dns.rdtypes.ANY.PTR",
    "dns.rdtypes.ANY.SOA",
    "dns.rdtypes.ANY.TXT",
    "dns.rdtypes.IN.A",
    "dns.rdtypes.IN.AAAA",
    "encodings.idna",
)


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


def restart_delay(failures: int) -> float:
    """Exponential back-off between restarts of a worker that keeps failing, capped: a
    worker that cannot start must not spin (and flood the log) but is retried for ever."""
    return float(min(RESTART_MAX_S, RESTART_MIN_S * 2 ** min(failures, 16)))


def _exit_text(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"signal {signal.Signals(-code).name}"
    return f"code {code}"


class _Stdin(Protocol):
    """What the supervisor uses of a worker's stdin (a StreamWriter, or a pipe transport)."""

    def write(self, data: bytes) -> None: ...

    def is_closing(self) -> bool: ...

    def close(self) -> None: ...


class WorkerProcess(Protocol):
    """What the supervisor uses of a worker process: asyncio's Process (a worker started
    with exec) or ForkedWorker."""

    @property
    def pid(self) -> int: ...

    @property
    def returncode(self) -> int | None: ...

    @property
    def stdin(self) -> _Stdin | None: ...

    @property
    def stderr(self) -> AsyncIterator[bytes] | None: ...

    def send_signal(self, sig: int) -> None: ...

    async def wait(self) -> int: ...


class ForkedWorker:
    """A worker forked before the supervisor's loop ran: its pid and the supervisor's ends of
    its pipes, made into asyncio objects by ``attach`` once the loop runs. Its exit is seen
    on a pidfd (readable when the child has exited) and reaped here: no other code of the
    supervisor waits for children it did not start itself."""

    def __init__(self, pid: int, stdin_fd: int, stderr_fd: int) -> None:
        self.pid = pid
        self.returncode: int | None = None
        self.stdin: asyncio.WriteTransport | None = None
        self.stderr: asyncio.StreamReader | None = None
        self._fds = (stdin_fd, stderr_fd)
        self._exited: asyncio.Future[int] | None = None

    async def attach(self) -> None:
        loop = asyncio.get_running_loop()
        stdin_fd, stderr_fd = self._fds
        reader = self.stderr = asyncio.StreamReader(loop=loop)
        # the transports own the pipes from here on (closed with them)
        stderr = open(stderr_fd, "rb", buffering=0)  # noqa: SIM115, ASYNC230 (a pipe)
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), stderr)
        stdin = open(stdin_fd, "wb", buffering=0)  # noqa: SIM115, ASYNC230 (a pipe)
        self.stdin, _ = await loop.connect_write_pipe(asyncio.Protocol, stdin)
        self._exited = loop.create_future()
        pidfd = os.pidfd_open(self.pid)
        loop.add_reader(pidfd, self._reap, pidfd)
        self._reap(pidfd)  # it may be gone already

    def _reap(self, pidfd: int) -> None:
        assert self._exited is not None
        try:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:  # cannot happen while we are its only reaper
            pid, status = self.pid, 255 << 8
        if pid == 0 or self._exited.done():
            return
        asyncio.get_running_loop().remove_reader(pidfd)
        os.close(pidfd)
        self.returncode = os.waitstatus_to_exitcode(status)
        self._exited.set_result(self.returncode)

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:  # not reaped: the pid is still this worker's
            os.kill(self.pid, sig)

    async def wait(self) -> int:
        assert self._exited is not None
        return await asyncio.shield(self._exited)

    def abandon(self) -> None:
        """Kill and reap a worker that was never attached (still waiting for its first
        configuration on stdin, so it has opened nothing: SIGKILL loses nothing)."""
        if self._exited is not None:
            return
        for fd in self._fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        with contextlib.suppress(OSError):
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)


def why_not_fork() -> str | None:
    """Why workers cannot be forked from this process now (None: they can): a thread could
    hold a lock (the import lock, a C library's) that the child would wait for for ever; a
    running loop would be shared with the child; without pidfds their exit is not seen."""
    if threading.active_count() > 1:
        return f"{threading.active_count()} threads run"
    if asyncio._get_running_loop() is not None:
        return "an event loop runs"
    try:
        os.close(os.pidfd_open(os.getpid()))
    except (AttributeError, OSError) as exc:
        return f"no pidfd ({exc})"
    return None


def preload_worker_modules(config: Config) -> None:
    """Import what workers load on first use (WORKER_PRELOAD), here, before the fork; and
    what this configuration makes each of them load: the Redis counters, and aiohttp for
    events.webhook (a worker posts its events itself). Without a webhook no worker maps
    aiohttp: the admin endpoint's is imported after the fork."""
    names = list(WORKER_PRELOAD)
    if config.state.counters.startswith(("redis://", "rediss://", "unix://")):
        names.append("warmrelay.warmup.counters.redis")
    if config.events.webhook is not None:
        names.append("aiohttp")
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError as exc:  # a newer library moved it: the worker loads its own
            log.debug("preload: %s: %s", name, exc)


def fork_worker(
    index: int,
    count: int,
    ports: tuple[int, ...],
    lock_fd: int | None,
    holders: list[socket.socket],
) -> ForkedWorker:
    """Fork worker ``index``; in the parent, its ForkedWorker (attach it once the loop runs).
    The child never returns from here: it runs the relay and exits."""
    stdin_r, stdin_w = os.pipe()
    stderr_r, stderr_w = os.pipe()
    for stream in (sys.stdout, sys.stderr):  # else the child writes our buffer out again
        if stream is not None:
            stream.flush()
    pid = os.fork()
    if pid == 0:
        _worker_main(index, count, ports, stdin_r, stderr_w, lock_fd, holders)
    os.close(stdin_r)
    os.close(stderr_w)
    return ForkedWorker(pid, stdin_w, stderr_r)


def _worker_main(
    index: int,
    count: int,
    ports: tuple[int, ...],
    stdin_fd: int,
    stderr_fd: int,
    lock_fd: int | None,
    holders: list[socket.socket],
) -> NoReturn:
    """A forked worker: what an exec'd worker starts with, then the relay, then exit.

    It inherits objects, not a running program: no loop ran and no thread existed in the
    supervisor (``why_not_fork``), so it builds its own loop, sockets and pools in ``run``.
    It keeps the fds an exec'd worker gets (0, 1, 2 and the state.dir lock): another
    worker's stdin pipe held here would keep that worker from seeing its supervisor die.
    Random state is drawn anew (``random`` and the spool's queue-id counter also do so at
    every fork, by os.register_at_fork). It never returns into the supervisor's frames."""
    code = 1
    try:
        gc.enable()  # the supervisor turned it off for the imports; the frozen stay frozen
        random.seed()
        os.dup2(stdin_fd, 0)
        os.dup2(stderr_fd, 2)
        for sock in holders:  # the fds are closed below; their objects must not close again
            sock.detach()
        _close_fds_but((0, 1, 2) if lock_fd is None else (0, 1, 2, lock_fd))
        os.environ[WORKER_ENV] = worker_env(index, count, ports)
        from warmrelay.app import Worker, run

        code = run(receive_config(), Worker(index, count, ports))
    except WarmrelayError as exc:  # as the CLI says it: the message, no traceback
        for line in str(exc).splitlines() or [type(exc).__name__]:
            print(f"warmrelay: {line}", file=sys.stderr)
    except SystemExit as exc:
        code = 0 if exc.code is None else exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        traceback.print_exc()
    finally:
        # what interpreter exit does first: join the threads left (the executors' idle
        # workers); then out, without running the supervisor's atexit handlers
        with contextlib.suppress(BaseException):
            getattr(threading, "_shutdown", lambda: None)()
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(BaseException):
                if stream is not None:
                    stream.flush()
        os._exit(code)


def _close_fds_but(keep: tuple[int, ...]) -> None:
    """Close every fd but ``keep`` (close_range(2) where there is one)."""
    low = 0
    for fd in sorted(keep):
        if low < fd:  # closerange(n, n) would close from n to the last fd (close_range(n, ~0))
            os.closerange(low, fd)
        low = fd + 1
    high = os.sysconf("SC_OPEN_MAX")
    if low < high:
        os.closerange(low, high)


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

    # what the workers run, imported with the collector off (as the gc module's docs advise
    # before a fork: no holes freed among the objects that stay, for the workers to fill);
    # the admin endpoint (aiohttp) only after the fork
    gc.disable()
    forked: dict[int, ForkedWorker] = {}
    try:
        from warmrelay.app import Relay, log_failed_reload, start_admin
        from warmrelay.operate.metrics import render_all_processes
        from warmrelay.operate.queueapi import FleetQueueApi, worker_socket
        from warmrelay.queue.spool import Spool

        holders, ports = reserve_ports(config)
        preload_worker_modules(config)
        reason = why_not_fork()
        if reason is None:
            gc.freeze()  # what is here now stays shared: a worker's collector never visits it
            try:
                for index in range(workers):
                    forked[index] = fork_worker(index, workers, tuple(ports), lock_fd, holders)
            except OSError as exc:  # out of processes or memory: the rest start with exec
                log.warning("cannot fork worker %d (%s): starting it anew", len(forked), exc)
        else:
            log.warning("workers start as new processes, sharing no memory: %s", reason)
    finally:
        gc.enable()
    procs: dict[int, WorkerProcess] = {}
    stopping = asyncio.Event()

    def signal_workers(sig: signal.Signals) -> None:
        for proc in procs.values():
            if proc.returncode is None:
                proc.send_signal(sig)

    def send_config(proc: WorkerProcess, frame: bytes) -> None:
        """Written at once, in order: a worker started during a reload still gets the
        newest configuration last."""
        if proc.returncode is None and proc.stdin is not None and not proc.stdin.is_closing():
            proc.stdin.write(frame)

    class SupervisorRelay(Relay):
        """The supervisor's relay is never started: its router, counters and admin pages
        serve the whole host (spool files of every worker, metrics merged from all)."""

        def spool_size(self) -> int:
            return Spool.count_on_disk(config.state.dir.glob("spool*"))

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

    def release() -> None:
        """At the end: the reserved ports, and workers forked but never attached (the
        supervisor failed before its loop ran them), which still wait for a configuration
        and so have nothing open. They are gone before we return: the state.dir lock they
        inherited is free again."""
        for worker in forked.values():
            worker.abandon()
        forked.clear()
        for sock in holders:
            sock.close()

    try:
        relay = SupervisorRelay(config, log_format=log_format)
    except BaseException:
        release()
        raise

    async def start_worker(index: int) -> WorkerProcess:
        """Worker ``index`` as a new process (``python -m warmrelay serve``), as the
        restart of a worker: the supervisor cannot fork one now (see the module)."""
        env = dict(os.environ)
        env[WORKER_ENV] = worker_env(index, workers, tuple(ports))
        return await asyncio.create_subprocess_exec(
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

    async def run_worker(index: int, ready: asyncio.Event) -> None:
        """Run worker ``index`` (the forked one first) with the running configuration;
        restart it when it dies, with exponential back-off while it keeps failing."""
        loop = asyncio.get_running_loop()
        failures = 0
        first = forked.pop(index, None)
        while True:
            proc: WorkerProcess
            if first is not None:  # attached even when stopping: it is told to stop below
                await first.attach()
                proc, first, how = first, None, "forked"
            elif stopping.is_set():
                return
            else:
                proc, how = await start_worker(index), "a new process"
            procs[index] = proc
            send_config(proc, config_frame(relay.config))
            log.info("worker %d started: pid %d (%s)", index, proc.pid, how)
            if stopping.is_set():  # signal_workers may have run before it was in procs
                proc.send_signal(signal.SIGTERM)
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
        release()
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
