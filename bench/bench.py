#!/usr/bin/env python3
"""warmrelay benchmark: load -> warmrelay -> loopback sink, all started here.

For each session count (default 16 and 100) and repetition it:

1. starts ``sink.py`` (a fast asyncio counting sink) on a free loopback port;
2. writes a config (fresh temp state dir, listener and admin on free
   127.0.0.1 ports, routes {"*": sink}, source IP 127.0.0.2 as a warm pool IP,
   or ``--warming``: 127.0.0.2 warming with a big cap + pool 127.0.0.3) and
   starts ``python -m warmrelay serve -c CONFIG``; waits for its "ready:" log
   line, keeps draining its stderr to a log file;
3. optionally sends ``--warmup`` messages first (not measured), waits for them
   at the sink and resets the sink;
4. runs ``loadgen.py`` in ``--loadgen-procs`` processes (one connection per
   message unless ``--reuse``), waits (bounded) until every accepted message
   reached the sink;
5. reads the relay's VmHWM and CPU time from /proc, stops it with SIGTERM.

With ``--events`` it also starts ``webhook_sink.py`` (a counting aiohttp receiver on a
free loopback port), points ``events.webhook`` at it (signing secret in the relay's
environment), waits after the load until it got the run's events (2 per message:
processed + delivered) and reports them and the time from the last message at the sink
to the last event at the receiver. ``--events-file PATH`` sets ``events.file``.

Per run it prints accepted msg/s, delivered msg/s (received / (last arrival -
first send)), p50/p99 of (arrival at the sink - 250 reply at the client) per
message, received/expected, duplicates, source IPs seen by the sink, the
relay's peak RSS and CPU seconds, and a ``JSON {...}`` line (also appended to
``--json-out``). With several runs it ends with a table of medians [ranges].

Only 127.0.0.0/8 addresses are used; every loop is bounded in count and time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import hashlib
import ipaddress
import json
import os
import re
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")
READY_RE = re.compile(rb"ready: smtp [0-9.]+:(\d+)(?:, admin [0-9.]+:(\d+))?")
SINK_RE = re.compile(rb"sink listening smtp=[0-9.]+:(\d+) ctl=[0-9.]+:(\d+)")
WEBHOOK_SINK_RE = re.compile(rb"webhook sink listening port=(\d+)")
WEBHOOK_SECRET_ENV = "WARMRELAY_BENCH_WEBHOOK_SECRET"
EVENTS_PER_MESSAGE = 2  # processed + delivered (one recipient, delivered at once)


def loopback(host: str) -> str:
    if not ipaddress.ip_address(host).is_loopback:
        sys.exit(f"refusing non-loopback address {host}")
    return host


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def relay_config(
    a: argparse.Namespace,
    state_dir: Path,
    listen_port: int,
    admin_port: int,
    sink_port: int,
    webhook_url: str | None = None,
) -> dict[str, Any]:
    """The relay's config as a dict (also used by harness_config.py). ``webhook_url``:
    events.webhook posts there (its secret in $WARMRELAY_BENCH_WEBHOOK_SECRET)."""
    today = dt.datetime.now(dt.UTC).date()
    if a.warming:
        ips: list[dict[str, Any]] = [
            {
                "address": a.warming_ip,
                "helo": "warming.bench.test",
                "warmup": {
                    "start": (today - dt.timedelta(days=1)).isoformat(),
                    "schedule": [a.warming_cap] * 30,
                },
            },
            {"address": a.pool_ip, "helo": "pool.bench.test"},
        ]
    else:
        ips = [{"address": a.ip, "helo": "pool.bench.test"}]
    delivery: dict[str, Any] = {}
    if a.concurrency is not None:
        delivery["concurrency"] = a.concurrency
    if a.connections_per_destination is not None:
        delivery["connections_per_destination"] = a.connections_per_destination
    smtp: dict[str, Any] = {
        "listen": [f"127.0.0.1:{listen_port}"],
        "hostname": "relay.bench.test",
        "allow_networks": ["127.0.0.0/8"],
    }
    if a.max_connections_per_client:
        smtp["max_connections_per_client"] = a.max_connections_per_client
        smtp["max_connections"] = max(1000, a.max_connections_per_client)
    cfg: dict[str, Any] = {
        "smtp": smtp,
        "admin": {"listen": f"127.0.0.1:{admin_port}"},
        "state": {"dir": str(state_dir), "counters": a.counters},
        "timezone": "UTC",
        "ips": ips,
        "overflow": "pool",
        "routes": {"*": f"127.0.0.1:{sink_port}"},
    }
    if delivery:
        cfg["delivery"] = delivery
    events: dict[str, Any] = {}
    if webhook_url:
        events["webhook"] = {
            "url": webhook_url,
            "secret_env": WEBHOOK_SECRET_ENV,
            "batch_max": getattr(a, "events_batch_max", 100),
            "batch_ms": getattr(a, "events_batch_ms", 1000),
        }
    if getattr(a, "events_file", None):
        events["file"] = a.events_file
    if events:
        cfg["events"] = events
    if a.dkim != "none":
        algorithms = {"rsa": ["rsa"], "ed25519": ["ed25519"], "dual": ["rsa", "ed25519"]}
        keys = []
        for alg in algorithms[a.dkim]:
            key_file = state_dir.parent / f"dkim-{alg}.pem"
            if not key_file.exists():  # the relay's own keygen: what an operator runs
                subprocess.run(
                    [
                        a.python,
                        "-m",
                        "warmrelay",
                        "dkim",
                        "keygen",
                        "--domain",
                        "bench.test",
                        "--selector",
                        alg,
                        "--algorithm",
                        alg,
                        "--out",
                        str(key_file),
                    ],
                    cwd=REPO,
                    check=True,
                    stdout=subprocess.DEVNULL,
                )
            algorithm = "rsa-sha256" if alg == "rsa" else "ed25519-sha256"
            keys.append({"selector": alg, "key_file": str(key_file), "algorithm": algorithm})
        cfg["dkim"] = {"domains": {"bench.test": {"keys": keys}}}  # loadgen's From domain
    return cfg


def tree_digest(root: Path) -> str:
    """8 hex digits of sha256 over warmrelay/'s *.py (paths and contents): tells apart runs
    of a checkout that others edit while the benchmark runs."""
    h = hashlib.sha256()
    for f in sorted(root.rglob("*.py")):
        h.update(str(f.relative_to(root)).encode() + b"\0")
        with contextlib.suppress(OSError):
            h.update(f.read_bytes())
    return h.hexdigest()[:8]


def warmrelay_version() -> str:
    """The commit of the checkout the relay runs from (+ "-dirty.<digest of warmrelay/*.py>"
    if warmrelay/ has changes)."""
    try:
        head = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(REPO), "status", "--porcelain", "--", "warmrelay"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout
        if not head:
            return "unknown"
        return head + (f"-dirty.{tree_digest(REPO / 'warmrelay')}" if dirty.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def to_yaml(cfg: dict[str, Any]) -> str:
    """JSON is valid YAML; no PyYAML needed to write it."""
    return json.dumps(cfg, indent=2) + "\n"


# ---------------------------------------------------------------- /proc
def tree_pids(root: int) -> list[int]:
    """root and its descendants (relay workers under ``serve --workers N``)."""
    parent: dict[int, int] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                st = Path(f"/proc/{d}/stat").read_bytes()
            except OSError:
                continue
            parent[int(d)] = int(st[st.rfind(b")") + 2 :].split()[1])
    members, frontier = [root], [root]
    while frontier:
        kids = [p for p, pp in parent.items() if pp in frontier]
        members += kids
        frontier = kids
    return members


def tree_cpu_s(root: int) -> float | None:
    vals = [proc_cpu_s(p) for p in tree_pids(root)]
    return sum(v for v in vals if v is not None) if vals[0] is not None else None


def tree_status_kb(root: int, key: str) -> int | None:
    vals = [proc_status_kb(p, key) for p in tree_pids(root)]
    return sum(v for v in vals if v) or None


def proc_cpu_s(pid: int) -> float | None:
    try:
        st = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    rest = st[st.rfind(b")") + 2 :].split()
    return sum(int(x) for x in rest[11:15]) / CLK_TCK  # utime stime cutime cstime


def proc_status_kb(pid: int, key: str) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


async def sample_rss(pid: int, out: list[int], interval_s: float = 0.5) -> None:
    """VmRSS of the relay's process tree every interval (VmHWM also holds the startup
    transient)."""
    while True:
        kb = tree_status_kb(pid, "VmRSS")
        if kb:
            out.append(kb)
        await asyncio.sleep(interval_s)


def box_cpu() -> tuple[int, int]:
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + v[4]
    return sum(v) - idle, sum(v)


def other_cpu_pct(
    box0: tuple[int, int], box1: tuple[int, int], wall_s: float, ours_s: list[float]
) -> float:
    busy_s = (box1[0] - box0[0]) / CLK_TCK
    return round(100.0 * max(0.0, busy_s - sum(ours_s)) / max(1e-9, wall_s), 1)


def pct(sorted_vals: list[int], p: float) -> int | None:
    if not sorted_vals:
        return None
    k = min(len(sorted_vals) - 1, max(0, round(p / 100.0 * (len(sorted_vals) - 1))))
    return sorted_vals[k]


def ms(ns: float | None) -> float | None:
    return None if ns is None else round(ns / 1e6, 2)


# ---------------------------------------------------------------- processes
class Sink:
    def __init__(self, py: str, logdir: Path, no_uvloop: bool) -> None:
        self.py, self.logdir, self.no_uvloop = py, logdir, no_uvloop
        self.proc: asyncio.subprocess.Process | None = None
        self.port = self.ctl_port = 0

    async def start(self) -> None:
        args = [self.py, str(HERE / "sink.py")] + (["--no-uvloop"] if self.no_uvloop else [])
        log_path = self.logdir / "sink.log"
        # a file, not a pipe: the sink never blocks on it (a local file: blocking is fine here)
        with open(log_path, "wb") as log:  # noqa: ASYNC230
            self.proc = await asyncio.create_subprocess_exec(*args, stdout=log, stderr=log)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and self.proc.returncode is None:
            m = SINK_RE.search(log_path.read_bytes())
            if m:
                self.port, self.ctl_port = int(m.group(1)), int(m.group(2))
                return
            await asyncio.sleep(0.05)
        raise RuntimeError(f"sink did not start: {log_path.read_text(errors='replace')[-2000:]}")

    async def cmd(self, c: str) -> dict[str, Any]:
        r, w = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", self.ctl_port, limit=1 << 26), 5
        )
        w.write(c.encode() + b"\n")
        line = await asyncio.wait_for(r.readline(), 30)
        w.close()
        return dict(json.loads(line))

    def cpu_s(self) -> float | None:
        return proc_cpu_s(self.proc.pid) if self.proc else None

    async def stop(self) -> None:
        if self.proc and self.proc.returncode is None:
            self.proc.terminate()
            try:
                await asyncio.wait_for(self.proc.wait(), 10)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()


class WebhookSink:
    """webhook_sink.py: answers 200 to the relay's POSTs and counts the events."""

    def __init__(self, py: str, logdir: Path, no_uvloop: bool) -> None:
        self.py, self.logdir, self.no_uvloop = py, logdir, no_uvloop
        self.proc: asyncio.subprocess.Process | None = None
        self.port = 0
        self.log_path = logdir / "webhook-sink.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/events"

    async def start(self, env: dict[str, str]) -> None:
        args = [self.py, str(HERE / "webhook_sink.py"), "--secret-env", WEBHOOK_SECRET_ENV]
        if self.no_uvloop:
            args.append("--no-uvloop")
        with open(self.log_path, "wb") as log:  # noqa: ASYNC230 (a local file)
            self.proc = await asyncio.create_subprocess_exec(*args, stdout=log, stderr=log, env=env)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and self.proc.returncode is None:
            m = WEBHOOK_SINK_RE.search(self.log_path.read_bytes())
            if m:
                self.port = int(m.group(1))
                return
            await asyncio.sleep(0.05)
        tail = self.log_path.read_text(errors="replace")[-2000:]
        raise RuntimeError(f"webhook sink did not start: {tail}")

    async def http(self, method: str, path: str) -> dict[str, Any]:
        """One HTTP/1.0 request (the connection closes after the answer), JSON answer."""
        r, w = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", self.port), 5)
        w.write(
            f"{method} {path} HTTP/1.0\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\n\r\n".encode()
        )
        raw = await asyncio.wait_for(r.read(), 30)
        w.close()
        head, _, body = raw.partition(b"\r\n\r\n")
        if b" 200 " not in head.split(b"\r\n", 1)[0]:
            raise RuntimeError(f"webhook sink {method} {path}: {head[:200]!r}")
        return dict(json.loads(body))

    async def stats(self) -> dict[str, Any]:
        return await self.http("GET", "/stats")

    async def reset(self) -> None:
        await self.http("POST", "/reset")

    async def wait_events(self, expected: int, timeout_s: float, stall_s: float) -> dict[str, Any]:
        """Poll until ``expected`` distinct events arrived, or none came for stall_s."""
        deadline = time.monotonic() + timeout_s
        last_n, last_change = -1, time.monotonic()
        while True:
            st = await self.stats()
            n = int(st["distinct_ids"])
            now = time.monotonic()
            if n != last_n:
                last_n, last_change = n, now
            if n >= expected or now > deadline or now - last_change > stall_s:
                return st
            await asyncio.sleep(0.05)

    def cpu_s(self) -> float | None:
        return proc_cpu_s(self.proc.pid) if self.proc else None

    async def stop(self) -> dict[str, Any] | None:
        """SIGTERM; its last line is the counts."""
        if not self.proc or self.proc.returncode is not None:
            return None
        self.proc.terminate()
        try:
            await asyncio.wait_for(self.proc.wait(), 10)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()
            return None
        lines = self.log_path.read_bytes().strip().splitlines()
        try:
            return dict(json.loads(lines[-1])) if lines else None
        except ValueError:
            return None


class Relay:
    def __init__(
        self,
        py: str,
        config_path: Path,
        log_path: Path,
        extra_cmd: list[str],
        workers: int = 1,
        env: dict[str, str] | None = None,
    ) -> None:
        self.py, self.config_path, self.log_path = py, config_path, log_path
        self.extra_cmd, self.workers, self.env = extra_cmd, workers, env
        self.proc: asyncio.subprocess.Process | None = None
        self._drain: asyncio.Task[None] | None = None
        self.smtp_port = self.admin_port = 0

    async def start(self, timeout_s: float) -> None:
        cmd = [*self.extra_cmd, self.py, "-m", "warmrelay", "serve", "-c", str(self.config_path)]
        if self.workers > 1:
            cmd += ["--workers", str(self.workers)]
        self.proc = await asyncio.create_subprocess_exec(
            *cmd,
            cwd=str(REPO),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            limit=1 << 20,
            env=self.env,
        )
        ready: asyncio.Future[tuple[int, int]] = asyncio.get_running_loop().create_future()
        self._drain = asyncio.create_task(self._read(ready))
        try:
            self.smtp_port, self.admin_port = await asyncio.wait_for(ready, timeout_s)
        except BaseException:
            await self.stop(5)
            raise

    async def _read(self, ready: asyncio.Future[tuple[int, int]]) -> None:
        assert self.proc and self.proc.stderr
        with open(self.log_path, "wb") as log:  # noqa: ASYNC230 (a local log file)
            while not ready.done():
                line = await self.proc.stderr.readline()
                if not line:
                    tail = self.log_path.read_text(errors="replace")[-2000:] if log.tell() else ""
                    ready.set_exception(RuntimeError(f"relay exited before ready:\n{tail}"))
                    return
                log.write(line)
                m = READY_RE.search(line)
                # with --workers the supervisor's own line ("..., N workers") is the one
                if m and (self.workers <= 1 or b" workers" in line):
                    log.flush()
                    ready.set_result((int(m.group(1)), int(m.group(2) or 0)))
            while True:  # after ready: copy raw chunks, cheaply
                chunk = await self.proc.stderr.read(1 << 16)
                if not chunk:
                    return
                log.write(chunk)

    @property
    def pid(self) -> int:
        assert self.proc
        return self.proc.pid

    async def stop(self, timeout_s: float) -> int | None:
        if not self.proc:
            return None
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), timeout_s)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        if self._drain:
            with contextlib.suppress(TimeoutError, RuntimeError):
                await asyncio.wait_for(self._drain, 5)
        return self.proc.returncode


async def run_load(
    a: argparse.Namespace, py: str, port: int, count: int, sessions: int, run_token: str
) -> dict[str, Any]:
    """Start the loadgen processes, release them together, merge their results."""
    nproc = max(1, min(a.loadgen_procs, sessions))
    procs = []
    for k in range(nproc):
        s_k = sessions // nproc + (1 if k < sessions % nproc else 0)
        args = [
            py,
            str(HERE / "loadgen.py"),
            "--port",
            str(port),
            "--sessions",
            str(s_k),
            "--count-total",
            str(count),
            "--first",
            str(k),
            "--step",
            str(nproc),
            "--size",
            str(a.size),
            "--run",
            run_token,
            "--timeout-s",
            str(a.timeout_s),
        ]
        if a.reuse:
            args += ["--reuse", "--reuse-max", str(a.reuse_max)]
        if a.pipelining:
            args.append("--pipelining")
        if a.no_uvloop:
            args.append("--no-uvloop")
        p = await asyncio.create_subprocess_exec(
            *args, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, limit=1 << 26
        )
        procs.append(p)
    for p in procs:
        assert p.stdout
        line = await asyncio.wait_for(p.stdout.readline(), 30)
        if line.strip() != b"READY":
            raise RuntimeError(f"loadgen did not start: {line!r}")
    for p in procs:
        assert p.stdin
        p.stdin.write(b"GO\n")
        await p.stdin.drain()
    results = []
    for p in procs:
        out, _ = await asyncio.wait_for(p.communicate(), a.timeout_s + 60)
        try:
            results.append(json.loads(out.splitlines()[-1]))
        except (ValueError, IndexError) as exc:
            dump = Path(a.log_dir) / f"loadgen-output-{os.getpid()}-{p.pid}.txt"
            dump.write_bytes(out)
            raise RuntimeError(
                f"loadgen {p.pid} (exit {p.returncode}) wrote no valid result "
                f"({exc}); its output is in {dump}"
            ) from None
    acks: dict[str, int] = {}
    failed: list[Any] = []
    for r in results:
        for n, t in r["acks"]:
            acks[f"{run_token}-{n}"] = t
        failed += r["failed"]
    firsts = [r["t_first_send"] for r in results if r["t_first_send"]]
    lasts = [r["t_last_ack"] for r in results if r["t_last_ack"]]
    return {
        "acks": acks,
        "failed": failed,
        "t_first_send": min(firsts) if firsts else None,
        "t_last_ack": max(lasts) if lasts else None,
        "connections": sum(r["connections"] for r in results),
        "timed_out": any(r["timed_out"] for r in results),
        "loadgen_cpu_s": round(sum(r["cpu_s"] for r in results), 2),
        "loadgen_procs": nproc,
    }


async def wait_arrivals(
    sink: Sink, expected: int, drain_timeout_s: float, stall_s: float
) -> dict[str, Any]:
    deadline = time.monotonic() + drain_timeout_s
    last_n, last_change = -1, time.monotonic()
    while True:
        st = await sink.cmd("COUNT")
        n = int(st["distinct_ids"])
        now = time.monotonic()
        if n != last_n:
            last_n, last_change = n, now
        if n >= expected or now > deadline or now - last_change > stall_s:
            return st
        await asyncio.sleep(0.05)


async def one_run(a: argparse.Namespace, sessions: int, rep: int) -> dict[str, Any]:
    py = a.python
    tmp = Path(tempfile.mkdtemp(prefix="warmrelay-bench-"))
    state_dir = tmp / "state"
    log_path = Path(a.log_dir) / f"relay-c{sessions}-r{rep}-{os.getpid()}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    sink = Sink(py, tmp, a.no_uvloop)
    webhook = WebhookSink(py, tmp, a.no_uvloop) if a.events else None
    env = dict(os.environ)
    env[WEBHOOK_SECRET_ENV] = secrets.token_hex(32)
    relay: Relay | None = None
    hook: asyncio.subprocess.Process | None = None
    ev: dict[str, Any] | None = None
    ev_warmup: dict[str, Any] | None = None
    ev_final: dict[str, Any] | None = None
    file_lines: int | None = None
    cpu_mid = None
    try:
        await sink.start()
        if webhook is not None:
            await webhook.start(env)
        listen_port, admin_port = free_port(), free_port()
        cfg = relay_config(
            a, state_dir, listen_port, admin_port, sink.port, webhook.url if webhook else None
        )
        cfg_path = tmp / "warmrelay-bench.yaml"
        cfg_path.write_text(to_yaml(cfg))
        relay = Relay(
            py,
            cfg_path,
            log_path,
            a.relay_prefix.split() if a.relay_prefix else [],
            a.workers,
            env,
        )
        version = warmrelay_version()
        await relay.start(a.ready_timeout_s)
        if a.warmup > 0:
            tok = f"w{secrets.token_hex(3)}"
            w = await run_load(a, py, relay.smtp_port, a.warmup, min(sessions, a.warmup), tok)
            await wait_arrivals(sink, len(w["acks"]), a.drain_timeout_s, a.stall_s)
            await sink.cmd("RESET")
            if webhook is not None:  # the warm-up's events too, then count afresh
                ev_warmup = await webhook.wait_events(
                    EVENTS_PER_MESSAGE * len(w["acks"]), a.events_timeout_s, a.stall_s
                )
                await webhook.reset()
        file_offset = events_file_size(a)
        tok = f"m{secrets.token_hex(3)}"
        cpu0, box0, sink0 = tree_cpu_s(relay.pid), box_cpu(), sink.cpu_s()
        hook0 = webhook.cpu_s() if webhook is not None else None
        self0, wall0 = sum(os.times()[:2]), time.monotonic()
        if a.on_load_start:
            hook = await asyncio.create_subprocess_shell(
                a.on_load_start.replace("{pid}", str(relay.pid))
            )
        sampler = asyncio.create_task(sample_rss(relay.pid, rss_samples := []))
        try:
            load = await run_load(a, py, relay.smtp_port, a.count, sessions, tok)
            expected = len(load["acks"])
            await wait_arrivals(sink, expected, a.drain_timeout_s, a.stall_s)
            if webhook is not None:  # the events' tail (batch_ms) is part of their cost
                cpu_mid = tree_cpu_s(relay.pid)
                ev = await webhook.wait_events(
                    EVENTS_PER_MESSAGE * expected, a.events_timeout_s, a.stall_s
                )
        finally:
            sampler.cancel()
        cpu1, box1, sink1 = tree_cpu_s(relay.pid), box_cpu(), sink.cpu_s()
        hook1 = webhook.cpu_s() if webhook is not None else None
        self1, wall1 = sum(os.times()[:2]), time.monotonic()
        file_lines = events_file_lines(a, file_offset)
        nprocs = len(tree_pids(relay.pid))
        hwm_kb = tree_status_kb(relay.pid, "VmHWM")  # sum of per-process peaks
        rss_kb = tree_status_kb(relay.pid, "VmRSS")
        st = await sink.cmd("STATS")
        rc = await relay.stop(a.stop_timeout_s)
        relay = None
    finally:
        if relay is not None:
            await relay.stop(a.stop_timeout_s)
        await sink.stop()
        if webhook is not None:
            ev_final = await webhook.stop()
        if not a.keep_state:
            shutil.rmtree(tmp, ignore_errors=True)
        if hook is not None and hook.returncode is None:  # e.g. a profiler: let it finish
            try:
                await asyncio.wait_for(hook.wait(), a.hook_timeout_s)
            except TimeoutError:
                hook.kill()
                await hook.wait()

    arrivals: dict[str, int] = st["arrivals"]
    acks: dict[str, int] = load["acks"]
    t0 = load["t_first_send"]
    lat = sorted(arrivals[k] - t for k, t in acks.items() if k in arrivals)
    ours = [v for k, v in arrivals.items() if k.startswith(tok + "-")]
    last_arrival = max(ours) if ours else None
    accepted_s = (load["t_last_ack"] - t0) / 1e9 if load["t_last_ack"] and t0 else None
    delivered_s = (last_arrival - t0) / 1e9 if last_arrival and t0 else None
    received = len(ours)
    res: dict[str, Any] = {
        "label": a.label,
        "warmrelay": version,
        "count": a.count,
        "sessions": sessions,
        "size": a.size,
        "rep": rep,
        "reuse": a.reuse,
        "pipelining": a.pipelining,
        "warming": a.warming,
        "loadgen_procs": load["loadgen_procs"],
        "connections": load["connections"],
        "accepted": expected,
        "failed": len(load["failed"]),
        "failed_sample": load["failed"][:3],
        "timed_out": load["timed_out"],
        "accepted_per_s": round(expected / accepted_s, 1) if accepted_s else None,
        "accepted_s": round(accepted_s, 3) if accepted_s else None,
        "delivered_per_s": round(received / delivered_s, 1) if delivered_s else None,
        "delivered_s": round(delivered_s, 3) if delivered_s else None,
        "lat_p50_ms": ms(pct(lat, 50)),
        "lat_p99_ms": ms(pct(lat, 99)),
        "lat_max_ms": ms(lat[-1] if lat else None),
        "received": received,
        "expected": expected,
        "missing": expected - received,
        "duplicates": st["duplicates"],
        "foreign": st["received"] - st["duplicates"] - received,
        "peers": st["peers"],
        "sink_sessions": st["sessions"],
        "relay_vmhwm_mb": round(hwm_kb / 1024, 1) if hwm_kb else None,
        "relay_rss_end_mb": round(rss_kb / 1024, 1) if rss_kb else None,
        "relay_rss_peak_load_mb": round(max(rss_samples) / 1024, 1) if rss_samples else None,
        "relay_cpu_s": round(cpu1 - cpu0, 2) if cpu0 is not None and cpu1 is not None else None,
        "relay_cpu_ms_per_msg": (
            round(1000 * (cpu1 - cpu0) / max(1, expected), 2)
            if cpu0 is not None and cpu1 is not None
            else None
        ),
        "relay_exit": rc,
        "relay_procs": nprocs,
        "workers": a.workers,
        "dkim": a.dkim,
        "box_busy_pct": round(100.0 * (box1[0] - box0[0]) / max(1, box1[1] - box0[1]), 1),
        "loadgen_cpu_s": load["loadgen_cpu_s"],
        # CPU used by everything else on the machine (other tests, builds...) during the run,
        # in % of one core: if it is large, the run was disturbed
        "other_cpu_pct_of_core": other_cpu_pct(
            box0,
            box1,
            wall1 - wall0,
            [
                (cpu1 or 0) - (cpu0 or 0),
                (sink1 or 0) - (sink0 or 0),
                load["loadgen_cpu_s"],
                self1 - self0,
                (hook1 or 0) - (hook0 or 0),
            ],
        ),
        "sink_cpu_s": round(sink1 - sink0, 2) if sink0 is not None and sink1 is not None else None,
        "config": {k: cfg[k] for k in ("ips",)} | {"delivery": cfg.get("delivery", {})},
        "relay_log": str(log_path),
        "events": a.events,
        "events_file": a.events_file,
    }
    if a.events:
        assert ev is not None
        last_event = ev["last_ns"]
        res |= {
            "events_expected": EVENTS_PER_MESSAGE * expected,
            "events_received": ev["distinct_ids"],
            "events_missing": max(0, EVENTS_PER_MESSAGE * expected - ev["distinct_ids"]),
            "events_duplicates": ev["duplicates"],
            "events_by_event": ev["by_event"],
            "events_posts": ev["posts"],
            "events_bad_signature": ev["bad_signature"],
            # the last event at the receiver - the last message at the sink
            "events_lag_ms": (
                ms(last_event - last_arrival) if last_event and last_arrival else None
            ),
            # and the receiver's pace: events / (last event - first send)
            "events_per_s": (
                round(ev["distinct_ids"] / ((last_event - t0) / 1e9), 1)
                if last_event and t0
                else None
            ),
            "events_received_final": ev_final["distinct_ids"] if ev_final else None,
            "events_warmup": (
                f"{ev_warmup['distinct_ids']}/{EVENTS_PER_MESSAGE * a.warmup}"
                if ev_warmup
                else None
            ),
            "relay_cpu_tail_s": (
                round(cpu1 - cpu_mid, 2) if cpu1 is not None and cpu_mid is not None else None
            ),
            "webhook_sink_cpu_s": (
                round(hook1 - hook0, 2) if hook0 is not None and hook1 is not None else None
            ),
        }
    if file_lines is not None:
        res["events_file_lines"] = file_lines
    return res


def events_file_size(a: argparse.Namespace) -> int | None:
    """The size of events.file before the measured load (None: no file, or stdout)."""
    if not a.events_file or a.events_file == "-":
        return None
    try:
        return os.path.getsize(a.events_file)
    except OSError:
        return 0


def events_file_lines(a: argparse.Namespace, offset: int | None) -> int | None:
    """Lines the relay appended to events.file since ``offset``."""
    if offset is None:
        return None
    try:
        with open(a.events_file, "rb") as f:
            f.seek(offset)
            return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))
    except OSError:
        return 0


def print_run(r: dict[str, Any]) -> None:
    print(
        f"== c{r['sessions']} rep {r['rep']} (warmrelay {r['warmrelay']}"
        f"{', workers ' + str(r['workers']) if r['workers'] > 1 else ''}): "
        f"{r['count']} msgs x {r['size']} B"
        f"{' reuse' if r['reuse'] else ''}{' pipelining' if r['pipelining'] else ''}"
        f"{' warming' if r['warming'] else ''}"
    )
    print(
        f"   accepted  {r['accepted_per_s']} msg/s ({r['accepted_s']} s; failed "
        f"{r['failed']}{' TIMED OUT' if r['timed_out'] else ''})"
    )
    print(
        f"   delivered {r['delivered_per_s']} msg/s ({r['delivered_s']} s first send -> "
        f"last arrival)"
    )
    print(f"   250 -> sink p50/p99/max {r['lat_p50_ms']}/{r['lat_p99_ms']}/{r['lat_max_ms']} ms")
    print(
        f"   received/expected {r['received']}/{r['expected']} duplicates {r['duplicates']} "
        f"source IPs {r['peers']} (sink sessions {r['sink_sessions']})"
    )
    print(
        f"   relay VmHWM {r['relay_vmhwm_mb']} MB (RSS peak during the load "
        f"{r['relay_rss_peak_load_mb']} MB), CPU {r['relay_cpu_s']} s "
        f"({r['relay_cpu_ms_per_msg']} ms/msg), exit {r['relay_exit']}; box busy "
        f"{r['box_busy_pct']}%, loadgen CPU {r['loadgen_cpu_s']} s, sink CPU "
        f"{r['sink_cpu_s']} s; others on the box {r['other_cpu_pct_of_core']}% of a core"
    )
    if r.get("events"):
        print(
            f"   events received/expected {r['events_received']}/{r['events_expected']} "
            f"{r['events_by_event']} duplicates {r['events_duplicates']} in "
            f"{r['events_posts']} POSTs (bad signatures {r['events_bad_signature']}); last "
            f"event {r['events_lag_ms']} ms after the last message reached the sink; relay "
            f"CPU in that tail {r['relay_cpu_tail_s']} s; warm-up events {r['events_warmup']}"
        )
    if r.get("events_file_lines") is not None:
        print(f"   events.file: {r['events_file_lines']} lines written ({r['events_file']})")
    if r["other_cpu_pct_of_core"] > 15:
        print("   WARNING: other processes used the CPU during this run: it is disturbed")
    if r["failed_sample"]:
        print(f"   failures (sample): {r['failed_sample']}")
    if r["failed"] or r["missing"] or r["duplicates"] or r.get("events_missing"):
        print(f"   relay log: {r['relay_log']}")


def summarize(runs: list[dict[str, Any]]) -> str:
    def mr(key: str, rs: list[dict[str, Any]]) -> str:
        xs = [r[key] for r in rs if r.get(key) is not None]
        if not xs:
            return "-"
        med = statistics.median(xs)
        if len(xs) == 1:
            return f"{med:g}"
        return f"{med:g} [{min(xs):g}-{max(xs):g}]"

    lines = [
        "| sessions | runs | accepted msg/s | delivered msg/s | 250→sink p50 ms | "
        "250→sink p99 ms | received/expected | dups | source IPs | VmHWM MB | RSS load MB | "
        "relay CPU ms/msg | box busy % | others % of a core |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    by: dict[int, list[dict[str, Any]]] = {}
    for r in runs:
        by.setdefault(r["sessions"], []).append(r)
    for s, rs in by.items():
        ips = sorted({ip for r in rs for ip in r["peers"]})
        lines.append(
            f"| {s} | {len(rs)} | {mr('accepted_per_s', rs)} | {mr('delivered_per_s', rs)} | "
            f"{mr('lat_p50_ms', rs)} | {mr('lat_p99_ms', rs)} | "
            f"{sum(r['received'] for r in rs)}/{sum(r['expected'] for r in rs)} | "
            f"{sum(r['duplicates'] for r in rs)} | {', '.join(ips)} | {mr('relay_vmhwm_mb', rs)} | "
            f"{mr('relay_rss_peak_load_mb', rs)} | "
            f"{mr('relay_cpu_ms_per_msg', rs)} | {mr('box_busy_pct', rs)} | "
            f"{mr('other_cpu_pct_of_core', rs)} |"
        )
    ev = [r for r in runs if r.get("events")]
    if ev:
        lines += [
            "",
            "| sessions | runs | events received/expected | event dups | POSTs | "
            "last event after last message ms | events/s at the receiver | "
            "relay CPU in the tail s |",
            "|---|---|---|---|---|---|---|---|",
        ]
        by = {}
        for r in ev:
            by.setdefault(r["sessions"], []).append(r)
        for s, rs in by.items():
            lines.append(
                f"| {s} | {len(rs)} | {sum(r['events_received'] for r in rs)}/"
                f"{sum(r['events_expected'] for r in rs)} | "
                f"{sum(r['events_duplicates'] for r in rs)} | {mr('events_posts', rs)} | "
                f"{mr('events_lag_ms', rs)} | {mr('events_per_s', rs)} | "
                f"{mr('relay_cpu_tail_s', rs)} |"
            )
    return "\n".join(lines)


async def amain(a: argparse.Namespace) -> int:
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    runs = []
    bad = False
    for rep in range(1, a.reps + 1):
        for s in a.sessions:
            r = await one_run(a, s, rep)
            print_run(r)
            line = json.dumps(r, sort_keys=True)
            print("JSON " + line, flush=True)
            if a.json_out:
                with open(a.json_out, "a") as f:  # noqa: ASYNC230
                    f.write(line + "\n")
            runs.append(r)
            bad |= bool(r["missing"] or r["failed"] or r["duplicates"] or r.get("events_missing"))
    print()
    print(summarize(runs))
    return 1 if bad else 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("-n", "--count", type=int, default=10_000, help="messages per run")
    ap.add_argument(
        "-s",
        "--sessions",
        default="16,100",
        help="comma-separated concurrent client sessions, one run each",
    )
    ap.add_argument("-l", "--size", type=int, default=4096, help="message size in bytes")
    ap.add_argument("-r", "--reps", type=int, default=1, help="repetitions of each run")
    ap.add_argument(
        "--warmup",
        type=int,
        default=500,
        help="messages sent (and delivered) before each measured run; 0 = none",
    )
    ap.add_argument(
        "--reuse",
        action="store_true",
        help="keep client connections for several messages (default: one per message)",
    )
    ap.add_argument("--reuse-max", type=int, default=1000)
    ap.add_argument("--pipelining", action="store_true", help="send MAIL+RCPT+DATA at once")
    ap.add_argument(
        "--loadgen-procs",
        type=int,
        default=1,
        help="load generator processes (sessions are split among them)",
    )
    ap.add_argument("--ip", default="127.0.0.2", help="the one (warm pool) source IP")
    ap.add_argument(
        "--warming",
        action="store_true",
        help="IPs: warming 127.0.0.2 (cap --warming-cap/day) + warm pool 127.0.0.3",
    )
    ap.add_argument("--warming-cap", type=int, default=10_000_000)
    ap.add_argument("--warming-ip", default="127.0.0.2")
    ap.add_argument("--pool-ip", default="127.0.0.3", help="the warm pool IP with --warming")
    ap.add_argument("--concurrency", type=int, help="delivery.concurrency")
    ap.add_argument(
        "--connections-per-destination", type=int, help="delivery.connections_per_destination"
    )
    ap.add_argument(
        "--workers",
        type=int,
        default=1,
        help="serve --workers N (relay processes with SO_REUSEPORT; needs a relay "
        "that has it); CPU, RSS and VmHWM are then summed over the tree",
    )
    ap.add_argument(
        "--max-connections-per-client",
        type=int,
        default=1000,
        help="smtp.max_connections_per_client (the default 100 refuses a load of 100 "
        "sessions plus probes from one IP); 0 = leave the key out (older relays)",
    )
    ap.add_argument(
        "--dkim",
        choices=("none", "rsa", "ed25519", "dual"),
        default="none",
        help="sign the load's From domain (dual: RSA-2048 + Ed25519); keys made by keygen",
    )
    ap.add_argument("--counters", default="sqlite", help="state.counters (sqlite or memory)")
    ap.add_argument(
        "--events",
        action="store_true",
        help="events.webhook to a counting receiver (webhook_sink.py); report the events "
        "it got (2 per message) and the last one's lag after the last message",
    )
    ap.add_argument("--events-batch-max", type=int, default=100, help="events.webhook.batch_max")
    ap.add_argument("--events-batch-ms", type=int, default=1000, help="events.webhook.batch_ms")
    ap.add_argument(
        "--events-file",
        help="events.file: the relay appends the events as JSON lines here (with or "
        "without --events; lines written during the load are counted)",
    )
    ap.add_argument(
        "--events-timeout-s",
        type=float,
        default=120,
        help="max seconds to wait for the events after the last message arrived",
    )
    ap.add_argument(
        "--python", default=sys.executable, help="interpreter for the relay, sink and loadgen"
    )
    ap.add_argument(
        "--relay-prefix",
        default="",
        help="command put before the relay's python, e.g. 'taskset -c 1'",
    )
    ap.add_argument(
        "--on-load-start",
        default="",
        help="shell command run when the measured load starts; {pid} = relay pid "
        "(e.g. 'py-spy record -o /tmp/p.svg --pid {pid} --duration 20')",
    )
    ap.add_argument(
        "--hook-timeout-s",
        type=float,
        default=120,
        help="max wait for the --on-load-start command after the run",
    )
    ap.add_argument("--no-uvloop", action="store_true", help="sink and loadgen on asyncio's loop")
    ap.add_argument("--timeout-s", type=float, default=600, help="max seconds for one load")
    ap.add_argument(
        "--drain-timeout-s",
        type=float,
        default=300,
        help="max seconds to wait for arrivals after the load",
    )
    ap.add_argument(
        "--stall-s",
        type=float,
        default=30,
        help="stop waiting after this long without a new arrival",
    )
    ap.add_argument("--ready-timeout-s", type=float, default=30)
    ap.add_argument("--stop-timeout-s", type=float, default=40)
    ap.add_argument("--keep-state", action="store_true", help="keep the temp dir (config, spool)")
    ap.add_argument("--log-dir", default=str(Path(tempfile.gettempdir()) / "warmrelay-bench-logs"))
    ap.add_argument("--json-out", help="append one JSON line per run to this file")
    ap.add_argument("--label", default="warmrelay")
    a = ap.parse_args(argv)
    a.sessions = [int(x) for x in str(a.sessions).split(",") if x.strip()]
    if a.events_file and a.events_file != "-":  # the relay runs in the repository
        a.events_file = str(Path(a.events_file).resolve())
    for ip in (a.ip, a.warming_ip, a.pool_ip):
        loopback(ip)
    if not (
        0 < a.count <= 1_000_000
        and all(0 < s <= 2000 for s in a.sessions)
        and 0 < a.reps <= 20
        and 0 <= a.warmup <= 100_000
    ):
        sys.exit("refusing: count, sessions, reps or warmup out of bounds")
    return a


if __name__ == "__main__":
    sys.exit(asyncio.run(amain(parse_args())))
