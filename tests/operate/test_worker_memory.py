"""``serve --workers``: workers are forked from the supervisor and share its memory.

Real processes (relayproc), loopback sockets, real signals; readiness from log lines and
pidfds, never from sleeps. The only memory figure asserted is a ratio the kernel reports
(PSS well below RSS: pages shared); the absolute numbers are bench/worker_memory.py's.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import re
import signal
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiosmtplib
import yaml
from support.relay import relay_doc
from support.relayproc import RelayProcess
from support.sink import Sink

from warmrelay.operate.supervisor import why_not_fork
from warmrelay.operate.workers import LOCK_NAME

StartRelay = Callable[..., Awaitable[RelayProcess]]

ACCEPTED = re.compile(r"^\[w(\d+)\] .* ([0-9A-HJKMNP-TV-Z]{16}): from=<")
STARTED = re.compile(r"worker (\d+) started: pid (\d+) \((.+)\)")
ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


def children(pid: int) -> list[int]:
    found: list[int] = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            found += [int(p) for p in f.read().split()]
    return sorted(found)


def parent_of(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


def memory_kb(pid: int) -> dict[str, int]:
    """The kB lines of /proc/PID/smaps_rollup (Rss, Pss, ...)."""
    with open(f"/proc/{pid}/smaps_rollup") as f:
        rows = [line.split() for line in f]
    return {r[0].rstrip(":"): int(r[1]) for r in rows if len(r) == 3 and r[2] == "kB"}


def proc_bytes(pid: int, name: str) -> bytes:
    with open(f"/proc/{pid}/{name}", "rb") as f:
        return f.read()


def counter_part(queue_id: str) -> int:
    """The per-process counter in a queue id: its low 35 bits (the last 7 characters)."""
    value = 0
    for char in queue_id:
        value = value * 32 + ALPHABET.index(char)
    return value & (2**35 - 1)


async def next_line(relay: RelayProcess, test: Callable[[str], bool], after: int = 0) -> int:
    """Index of the first log line from ``after`` on for which ``test`` holds; woken by each
    new line (relayproc's event)."""

    async def until() -> int:
        seen = after
        while True:
            for n in range(seen, len(relay.log)):
                if test(relay.log[n]):
                    return n
            seen = len(relay.log)
            relay._new_line.clear()
            await relay._new_line.wait()

    return await asyncio.wait_for(until(), 60)


async def exited(pid: int) -> None:
    """Until ``pid`` (not our child) has exited: its pidfd becomes readable."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    loop = asyncio.get_running_loop()
    gone: asyncio.Future[None] = loop.create_future()

    def readable() -> None:
        if not gone.done():
            gone.set_result(None)

    loop.add_reader(fd, readable)
    try:
        await asyncio.wait_for(gone, 60)
    finally:
        loop.remove_reader(fd)
        os.close(fd)


async def send(port: int, first: int, count: int) -> None:
    """``count`` messages in one session."""
    async with aiosmtplib.SMTP(hostname="127.0.0.1", port=port) as client:
        for i in range(first, first + count):
            body = f"Subject: m{i}\r\nX-Test-Id: {i}\r\n\r\nbody {i}\r\n"
            await client.sendmail("app@sender.test", [f"u{i}@example.test"], body)


def accepted_by(relay: RelayProcess) -> dict[str, int]:
    """{queue id: worker index} of every accepted message in the log."""
    found = {}
    for line in relay.log:
        m = ACCEPTED.search(line)
        if m:
            assert m.group(2) not in found, f"queue id {m.group(2)} given twice"
            found[m.group(2)] = int(m.group(1))
    return found


def accepted(relay: RelayProcess, count: int) -> Callable[[str], bool]:
    """A test for next_line: the log names ``count`` accepted messages (or more)."""
    return lambda _: len(accepted_by(relay)) >= count


def applied_by(index: int) -> Callable[[str], bool]:
    """A test for next_line: worker ``index`` applied a reload."""
    return lambda line: line.startswith(f"[w{index}]") and "reload:" in line and "applied" in line


def started_workers(relay: RelayProcess) -> dict[int, tuple[int, str]]:
    """{index: (pid, how)} of the workers the supervisor started first, from its log."""
    found: dict[int, tuple[int, str]] = {}
    for line in relay.log:
        m = STARTED.search(line)
        if m and int(m.group(1)) not in found:
            found[int(m.group(1))] = (int(m.group(2)), m.group(3))
    return found


def reaped(pid: int) -> bool:
    return not os.path.exists(f"/proc/{pid}")


def kill_all(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


async def test_forked_workers_share_memory_and_never_share_queue_ids(
    tmp_path: Path, sink: Sink, relay_process: StartRelay
) -> None:
    doc = relay_doc(tmp_path, sink.port, cap=1000)
    relay = await relay_process(doc, "--workers", "2")
    assert relay.proc is not None
    supervisor = relay.proc.pid
    workers = children(supervisor)
    try:
        started = started_workers(relay)
        assert {n: how for n, (_, how) in started.items()} == {0: "forked", 1: "forked"}
        assert sorted(pid for pid, _ in started.values()) == workers
        for pid, _ in started.values():
            assert parent_of(pid) == supervisor
            # forked, not exec'd: the supervisor's own command line (an exec'd worker's is
            # "python -m warmrelay serve -c ..." without --workers)
            assert proc_bytes(pid, "cmdline") == proc_bytes(supervisor, "cmdline")
            assert b"aiohttp" not in proc_bytes(pid, "maps")  # the admin endpoint's, not theirs

        # 200 messages, 10 per session: the kernel spreads the sessions over both workers
        await asyncio.gather(*(send(relay.smtp_port, 10 * s, 10) for s in range(20)))
        await sink.wait_for(200, timeout_s=60)
        await next_line(relay, accepted(relay, 200))
        ids = accepted_by(relay)  # asserts that no id was given twice
        by_worker = {w: {counter_part(q) for q, i in ids.items() if i == w} for w in (0, 1)}
        assert by_worker[0] and by_worker[1], "one worker got every session: nothing compared"
        # each worker counts from its own random start (a fork copies the counter: were it
        # not drawn anew, both would count through the same numbers, one id per number)
        assert not by_worker[0] & by_worker[1]

        for pid in workers:  # pages shared with the supervisor and each other
            mem = memory_kb(pid)
            assert mem["Pss"] < 0.6 * mem["Rss"], (pid, mem)
        assert await relay.terminate() == 0
    finally:
        if relay.proc.returncode is None:
            await relay.kill()
        kill_all(workers)


async def test_a_killed_worker_comes_back_a_reload_reaches_all_and_sigterm_ends_the_tree(
    tmp_path: Path, sink: Sink, relay_process: StartRelay
) -> None:
    doc = relay_doc(tmp_path, sink.port, cap=1000)
    relay = await relay_process(doc, "--workers", "2")
    assert relay.proc is not None
    supervisor = relay.proc.pid
    pids = children(supervisor)
    try:
        os.kill(started_workers(relay)[1][0], signal.SIGKILL)
        mark = len(relay.log)
        await next_line(relay, lambda line: "worker 1 " in line and "exited with signal" in line)
        line = relay.log[await next_line(relay, lambda line: "worker 1 started" in line, mark)]
        assert "(a new process)" in line  # the supervisor runs its loop now: no fork
        await next_line(relay, lambda line: line.startswith("[w1]") and " ready: " in line, mark)
        workers = children(supervisor)
        pids += workers
        assert len(workers) == 2 and started_workers(relay)[0][0] in workers  # 0 untouched

        # the restarted worker serves: sessions until one lands on it (the kernel's choice)
        n = 0
        while not any(w == 1 for w in accepted_by(relay).values()):
            assert n < 200, "no session reached the restarted worker"
            await send(relay.smtp_port, n, 1)
            n += 1
            await next_line(relay, accepted(relay, n))
        await sink.wait_for(n)

        # SIGHUP: the supervisor reads the file, both workers (forked, new) apply it
        doc["ips"][0]["warmup"]["schedule"] = [20] * 3650
        relay.config_path.write_text(yaml.safe_dump(doc))
        mark = len(relay.log)
        relay.proc.send_signal(signal.SIGHUP)
        for i in (0, 1):
            await next_line(relay, applied_by(i), mark)

        # SIGTERM: every worker drains and exits, then the supervisor, with 0
        assert await relay.terminate() == 0
        for pid in workers:
            await exited(pid)
            assert reaped(pid)  # by the supervisor, before it exited
        assert not [line for line in relay.log if "Traceback" in line]
        fd = os.open(tmp_path / "state" / LOCK_NAME, os.O_RDWR)
        try:  # no process of that instance holds state.dir any more
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(fd)
    finally:
        if relay.proc.returncode is None:
            await relay.kill()
        kill_all(pids)


def test_no_fork_beside_a_thread() -> None:
    """A thread may hold a lock the child would wait for for ever: the supervisor then
    starts its workers as new processes (the path of every restart)."""
    release = threading.Event()
    thread = threading.Thread(target=release.wait)
    thread.start()
    try:
        assert "threads run" in (why_not_fork() or "")
    finally:
        release.set()
        thread.join()


async def test_no_fork_inside_a_running_loop() -> None:
    assert why_not_fork() in ("an event loop runs", f"{threading.active_count()} threads run")
