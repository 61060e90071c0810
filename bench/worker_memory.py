#!/usr/bin/env python3
"""Memory of ``warmrelay serve --workers N``: PSS and RSS of the supervisor and each worker.

For each N of ``--workers`` (default 1,2,4) it starts bench's ``sink.py`` and the relay
with bench.py's config (fresh temp state dir, listener and admin on free 127.0.0.1
ports, routes {"*": sink}, source IP 127.0.0.2; any bench.py option after ``--`` changes
that config, e.g. ``-- --dkim rsa``), waits for the ready line, sends ``--messages``
(200; one recipient each, over ``--sessions`` SMTP sessions) and waits until the sink has
them all, lets the relay settle (``--settle-s``), then reads ``/proc/PID/smaps_rollup``
of every process of the tree:

- RSS: resident pages, each counted whole in every process that maps it;
- PSS: resident pages, a page shared by k processes counted 1/k in each (what the tree
  costs: the PSS of its processes add up to its real use);
- USS: Private_Clean + Private_Dirty, what the process alone holds (freed when it exits).

With N=1 there is no supervisor: the one process is shown as ``single``. It prints a
table per N and a ``JSON {...}`` line per N (also appended to ``--json-out``).

Only 127.0.0.0/8 addresses are used; every wait is bounded.

  python bench/worker_memory.py                         # --workers 1, 2, 4; 200 messages
  python bench/worker_memory.py --workers 4 --messages 0 --json-out /tmp/mem.jsonl
  python bench/worker_memory.py -- --dkim rsa           # + DKIM signing (bench.py's option)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiosmtplib

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench

FIELDS = ("Rss", "Pss", "Pss_Anon", "Pss_File", "Private_Clean", "Private_Dirty")


def smaps_rollup(pid: int) -> dict[str, int]:
    """The kB fields of /proc/PID/smaps_rollup, plus Uss (private clean + dirty)."""
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if len(parts) == 3 and parts[2] == "kB":
                out[parts[0].rstrip(":")] = int(parts[1])
    out["Uss"] = out.get("Private_Clean", 0) + out.get("Private_Dirty", 0)
    return out


def children(pid: int) -> list[int]:
    """The live children of ``pid`` (every thread's), in pid order."""
    found: list[int] = []
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                found += [int(p) for p in f.read().split()]
    return sorted(found)


def mb(kb: float) -> float:
    return round(kb / 1024, 1)


async def send(port: int, messages: int, sessions: int, token: str) -> int:
    """``messages`` messages, one recipient each, over ``sessions`` concurrent sessions
    (one connection each, so the kernel spreads them over the workers); returns the
    number accepted."""
    per = [messages // sessions + (1 if s < messages % sessions else 0) for s in range(sessions)]
    accepted = 0

    async def session(s: int, count: int) -> None:
        nonlocal accepted
        if not count:
            return
        async with aiosmtplib.SMTP(hostname="127.0.0.1", port=port, timeout=30) as client:
            for i in range(count):
                mid = f"{token}-{s}-{i}"
                body = (
                    f"From: app@bench.test\r\nTo: u{s}.{i}@example.test\r\n"
                    f"Subject: memory {mid}\r\nX-Bench-Id: {mid}\r\n\r\n" + ("x" * 76 + "\r\n") * 26
                )
                await client.sendmail("app@bench.test", [f"u{s}.{i}@example.test"], body)
                accepted += 1

    await asyncio.gather(*(session(s, n) for s, n in enumerate(per)))
    return accepted


async def one(a: argparse.Namespace, b: argparse.Namespace, workers: int) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="warmrelay-memory-"))
    log_path = Path(b.log_dir) / f"relay-memory-w{workers}-{os.getpid()}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    sink = bench.Sink(b.python, tmp, b.no_uvloop)
    relay: bench.Relay | None = None
    try:
        await sink.start()
        cfg = bench.relay_config(b, tmp / "state", bench.free_port(), bench.free_port(), sink.port)
        cfg_path = tmp / "warmrelay-memory.yaml"
        cfg_path.write_text(bench.to_yaml(cfg))
        relay = bench.Relay(b.python, cfg_path, log_path, [], workers)
        t0 = time.monotonic()
        await relay.start(a.ready_timeout_s)
        ready_s = time.monotonic() - t0
        accepted = 0
        if a.messages:
            accepted = await send(relay.smtp_port, a.messages, a.sessions, "mem")
            await bench.wait_arrivals(sink, accepted, a.drain_timeout_s, 10.0)
        await asyncio.sleep(a.settle_s)
        got = int((await sink.cmd("COUNT"))["distinct_ids"])
        procs: list[dict[str, Any]] = []
        pids = [relay.pid, *children(relay.pid)] if workers > 1 else [relay.pid]
        for n, pid in enumerate(pids):
            role = "single" if workers == 1 else "supervisor" if n == 0 else f"worker {n - 1}"
            procs.append({"role": role, "pid": pid, **smaps_rollup(pid)})
        code = await relay.stop(b.stop_timeout_s)
        relay = None
    finally:
        if relay is not None:
            await relay.stop(b.stop_timeout_s)
        await sink.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    kids = [p for p in procs if p["role"].startswith("worker")] or procs
    return {
        "label": a.label,
        "warmrelay": bench.warmrelay_version(),
        "workers": workers,
        "messages": a.messages,
        "accepted": accepted,
        "delivered": got,
        "ready_s": round(ready_s, 2),
        "exit": code,
        "processes": [
            {"role": p["role"], "pid": p["pid"], **{k: p.get(k, 0) for k in (*FIELDS, "Uss")}}
            for p in procs
        ],
        "worker_pss_mb_mean": mb(sum(p["Pss"] for p in kids) / len(kids)),
        "worker_rss_mb_mean": mb(sum(p["Rss"] for p in kids) / len(kids)),
        "worker_uss_mb_mean": mb(sum(p["Uss"] for p in kids) / len(kids)),
        "tree_pss_mb": mb(sum(p["Pss"] for p in procs)),
        "tree_rss_mb": mb(sum(p["Rss"] for p in procs)),
    }


def show(r: dict[str, Any]) -> None:
    print(
        f"\n--workers {r['workers']}: {r['accepted']} accepted, {r['delivered']} at the sink, "
        f"ready in {r['ready_s']} s, exit {r['exit']} ({r['label']}, {r['warmrelay']})"
    )
    print(f"  {'process':<11} {'pid':>8} {'RSS MB':>8} {'PSS MB':>8} {'USS MB':>8} {'PSS/RSS':>8}")
    for p in r["processes"]:
        ratio = p["Pss"] / p["Rss"] if p["Rss"] else 0.0
        print(
            f"  {p['role']:<11} {p['pid']:>8} {mb(p['Rss']):>8} {mb(p['Pss']):>8} "
            f"{mb(p['Uss']):>8} {ratio:>8.2f}"
        )
    print(
        f"  {'tree':<11} {'':>8} {r['tree_rss_mb']:>8} {r['tree_pss_mb']:>8}   "
        f"(per worker: PSS {r['worker_pss_mb_mean']} MB, RSS {r['worker_rss_mb_mean']} MB)"
    )
    print("JSON " + json.dumps(r, sort_keys=True))


async def amain(a: argparse.Namespace, b: argparse.Namespace) -> int:
    results = []
    for n in a.workers:
        r = await one(a, b, n)
        show(r)
        results.append(r)
        if a.json_out:
            with open(a.json_out, "a") as f:  # noqa: ASYNC230 (a local file, between runs)
                f.write(json.dumps(r, sort_keys=True) + "\n")
    print(f"\n{'workers':>7} {'PSS/worker MB':>14} {'RSS/worker MB':>14} {'tree PSS MB':>12}")
    for r in results:
        print(
            f"{r['workers']:>7} {r['worker_pss_mb_mean']:>14} {r['worker_rss_mb_mean']:>14} "
            f"{r['tree_pss_mb']:>12}"
        )
    return 0 if all(r["exit"] == 0 and r["delivered"] >= r["accepted"] for r in results) else 1


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, argparse.Namespace]:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--workers", default="1,2,4", help="comma-separated worker counts")
    ap.add_argument("--messages", type=int, default=200, help="sent before measuring (0: none)")
    ap.add_argument("--sessions", type=int, default=8, help="concurrent SMTP sessions")
    ap.add_argument("--settle-s", type=float, default=2.0, help="wait before reading /proc")
    ap.add_argument("--drain-timeout-s", type=float, default=120.0)
    ap.add_argument("--ready-timeout-s", type=float, default=60.0)
    ap.add_argument("--json-out", help="append one JSON line per worker count to this file")
    ap.add_argument("--label", default="warmrelay")
    ap.add_argument("bench_args", nargs="*", help="after --: bench.py options for the config")
    a = ap.parse_args(argv)
    a.workers = [int(x) for x in str(a.workers).split(",") if x.strip()]
    if not (
        a.workers
        and all(1 <= n <= 16 for n in a.workers)
        and 0 <= a.messages <= 100_000
        and 1 <= a.sessions <= 200
        and 0 <= a.settle_s <= 600
    ):
        sys.exit("refusing: workers, messages, sessions or settle-s out of bounds")
    return a, bench.parse_args(a.bench_args)


if __name__ == "__main__":
    sys.exit(asyncio.run(amain(*parse_args())))
