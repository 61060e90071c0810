"""Faults around the relay's processes: a second instance on one state.dir, a worker that
dies after a refused reload, a supervisor killed under its workers, clients that hang up
without QUIT, and SIGTERM while clients are in the middle of DATA. Real processes (via
relayproc), real sockets, real signals."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import gc
import logging
import os
import re
import signal
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest
import yaml
from support.relay import http_get, relay_doc, running
from support.relayproc import RelayProcess
from support.sink import Sink
from support.wire import read_reply

from warmrelay.config import parse_config

REPLY_S = 30.0  # the longest any single reply may take before a test fails
DRAIN_S = 8  # the SIGTERM test's drain time: clients finish well within it, even on a busy host

StartRelay = Callable[..., Awaitable[RelayProcess]]
MakeSink = Callable[..., Awaitable[Sink]]


def message(i: int) -> bytes:
    return f"Subject: m{i}\r\nX-Test-Id: {i}\r\n\r\nbody {i}\r\n".encode()


def ids_at(sink: Sink) -> list[int]:
    out = []
    for m in sink.messages:
        found = re.search(rb"X-Test-Id: (\d+)", m.data)
        assert found is not None
        out.append(int(found.group(1)))
    return out


async def send_each(port: int, ids: range) -> None:
    """One session per message, so the kernel spreads them over the workers."""
    for i in ids:
        async with aiosmtplib.SMTP(hostname="127.0.0.1", port=port) as client:
            await client.sendmail("app@sender.test", [f"u{i}@example.test"], message(i))


def workers_of(relay: RelayProcess) -> dict[int, int]:
    """{worker index: pid} of a supervisor's live children: the latest "worker N started:
    pid P" line of its log for each N, among the processes whose parent it is (/proc)."""
    assert relay.proc is not None
    named: dict[int, int] = {}
    for line in relay.log:
        found = re.search(r"worker (\d+) started: pid (\d+)", line)
        if found:
            named[int(found[1])] = int(found[2])
    alive = {}
    for index, pid in named.items():
        with contextlib.suppress(OSError):
            stat = Path(f"/proc/{pid}/stat").read_text()
            state, ppid = stat.rsplit(")", 1)[1].split()[:2]
            if int(ppid) == relay.proc.pid and state != "Z":
                alive[index] = pid
    return alive


async def exited(pid: int, timeout_s: float) -> None:
    """Wait (a pidfd becomes readable at exit, event-driven) until a process that is not our
    child has exited."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    loop = asyncio.get_running_loop()
    gone: asyncio.Future[None] = loop.create_future()
    loop.add_reader(fd, lambda: gone.done() or gone.set_result(None))
    try:
        await asyncio.wait_for(gone, timeout_s)
    finally:
        loop.remove_reader(fd)
        os.close(fd)


def kill_all(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


async def next_line(relay: RelayProcess, test: Any, after: int, timeout_s: float = 30.0) -> int:
    """Index of the first log line from index ``after`` on for which ``test(line)`` holds;
    woken by each new line (relayproc's event), not by polling."""

    async def until() -> int:
        seen = after
        while True:
            for n in range(seen, len(relay.log)):
                if test(relay.log[n]):
                    return n
            seen = len(relay.log)
            relay._new_line.clear()
            await relay._new_line.wait()

    return await asyncio.wait_for(until(), timeout_s)


def supervisor_lines(relay: RelayProcess, text: str) -> list[str]:
    return [line for line in relay.log if not line.startswith("[w") and text in line]


# -- 1. one instance per state.dir ---------------------------------------------------------


async def test_a_second_instance_on_the_same_state_dir_exits_and_touches_nothing(
    tmp_path: Path, sink: Sink, relay_process: StartRelay
) -> None:
    doc = relay_doc(tmp_path, sink.port)
    first = await relay_process(doc, "--workers", "2", name="first")
    assert first.proc is not None
    others: list[RelayProcess] = []
    workers = workers_of(first)
    try:
        await send_each(first.smtp_port, range(5))
        await sink.wait_for(5)
        at = 0
        for _ in range(5):  # each delivery written down: its metrics files exist by then
            at = await next_line(first, lambda line: " delivered (" in line, at) + 1
        metrics_dir = tmp_path / "state" / "metrics"
        before = sorted(p.name for p in metrics_dir.iterdir())
        assert before  # the workers' metric files
        for args, name in ((("--workers", "2"), "second"), ((), "single")):
            other = RelayProcess(doc, tmp_path, *args, name=name)  # must fail to start
            others.append(other)
            with pytest.raises(RuntimeError, match="relay exited"):
                await other.start()  # gone before any ready line
            assert other.proc is not None
            assert await other.proc.wait() == 1
            refusal = [line for line in other.log if "cannot start" in line]
            assert len(refusal) == 1, other.log
            assert "is in use by another warmrelay" in refusal[0]
            assert f"pid {first.proc.pid}" in refusal[0]
            assert not any("Traceback" in line for line in other.log)
        assert sorted(p.name for p in metrics_dir.iterdir()) == before
        _, metrics = await http_get(first.admin_port, "/metrics")
        assert b"warmrelay_received_total 5.0" in metrics
        await send_each(first.smtp_port, range(5, 6))  # the first one still works
        await sink.wait_for(6)
        assert not supervisor_lines(first, "exited with")  # its workers never crashed
        assert await first.terminate() == 0
    finally:
        for relay in (first, *others):
            if relay.proc is not None and relay.proc.returncode is None:
                for pid in workers_of(relay).values():
                    os.kill(pid, signal.SIGKILL)
                await relay.kill()
        kill_all(list(workers.values()))


# -- 2. restarts use the running configuration, with back-off ------------------------------


async def test_a_worker_killed_after_a_refused_reload_comes_back_with_the_running_config(
    tmp_path: Path, make_sink: MakeSink, relay_process: StartRelay
) -> None:
    receiver_down = [True]
    sink = await make_sink(
        data_reply=lambda peer, envelope: "451 4.3.0 not now" if receiver_down[0] else None
    )
    doc = relay_doc(tmp_path, sink.port)
    relay = await relay_process(doc, "--workers", "2")
    assert relay.proc is not None
    pids: list[int] = []
    try:
        await send_each(relay.smtp_port, range(8))  # acknowledged, then deferred (451)
        received = [-1]
        while len(received) <= 8:  # the supervisor passes worker lines on asynchronously
            received.append(await next_line(relay, lambda line: "from=<" in line, received[-1] + 1))
        holding = {int(relay.log[n][2]) for n in received[1:]}  # "[w1] ..."

        relay.config_path.write_text("smtp: {listen: [127.0.0.1:0]}\nips: nope\n")
        mark = len(relay.log)
        relay.proc.send_signal(signal.SIGHUP)
        await next_line(
            relay,
            lambda line: not line.startswith("[w") and "running configuration stays" in line,
            mark,
        )
        workers = workers_of(relay)
        pids = list(workers.values())
        assert sorted(workers) == [0, 1]
        mark = len(relay.log)
        for index in holding:
            os.kill(workers[index], signal.SIGKILL)
        for index in holding:  # back, from the configuration the supervisor runs
            await next_line(
                relay, lambda line, i=index: line.startswith(f"[w{i}]") and " ready: " in line, mark
            )
        pids += list(workers_of(relay).values())

        receiver_down[0] = False
        await sink.wait_for_ids(set(range(8)), ids_at, timeout_s=30)
        for index in holding:
            died = [
                line for line in supervisor_lines(relay, f"worker {index} ") if "exited" in line
            ]
            assert len(died) == 1, died  # killed once, then up again: no crash loop

        # a good file reaches the workers through the supervisor
        doc["ips"][0]["warmup"]["schedule"] = [20] * 3650
        relay.config_path.write_text(yaml.safe_dump(doc))
        mark = len(relay.log)
        relay.proc.send_signal(signal.SIGHUP)
        for i in (0, 1):
            await next_line(
                relay,
                lambda line, i=i: (
                    line.startswith(f"[w{i}]") and "reload:" in line and "applied" in line
                ),
                mark,
            )
        assert await relay.terminate() == 0
    finally:  # the supervisor first, so it restarts none of the workers killed here
        if relay.proc.returncode is None:
            await relay.kill()
        kill_all(pids)
    assert sorted(set(ids_at(sink))) == list(range(8))


async def test_a_worker_that_cannot_start_is_restarted_with_growing_delays(
    tmp_path: Path, sink: Sink, relay_process: StartRelay
) -> None:
    doc = relay_doc(tmp_path, sink.port)
    relay = await relay_process(doc, "--workers", "2")
    assert relay.proc is not None
    lock = os.open(tmp_path / "state" / "spool-1" / "lock", os.O_RDWR)
    pids: list[int] = []
    try:
        workers = workers_of(relay)
        pids = list(workers.values())
        os.kill(workers[1], signal.SIGKILL)
        # as another process holding worker 1's spool would: each restart fails to open it
        await asyncio.to_thread(fcntl.flock, lock, fcntl.LOCK_EX)
        mark = len(relay.log)
        await next_line(  # three failed starts after the kill: on a busy host, a while
            relay, lambda line: "worker 1 " in line and "in 4.0 s" in line, mark, timeout_s=90
        )
        delays = [
            float(m.group(1))
            for line in supervisor_lines(relay, "worker 1 ")
            if (m := re.search(r"restarting it in ([0-9.]+) s", line))
        ]
        assert delays == [0.5, 1.0, 2.0, 4.0]
        failed = [line for line in relay.log if line.startswith("[w1]") and "cannot start" in line]
        assert len(failed) == 3
        fcntl.flock(lock, fcntl.LOCK_UN)  # the spool is free again: worker 1 comes back
        await next_line(relay, lambda line: line.startswith("[w1]") and " ready: " in line, mark)
        await send_each(relay.smtp_port, range(4))
        await sink.wait_for_ids(set(range(4)), ids_at)
        assert await relay.terminate() == 0
    finally:
        os.close(lock)
        if relay.proc.returncode is None:  # the supervisor first: it would restart them
            await relay.kill()
        kill_all(pids)


async def test_workers_of_a_killed_supervisor_stop_and_free_the_state_dir(
    tmp_path: Path, make_sink: MakeSink, relay_process: StartRelay
) -> None:
    dead = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
    workers: dict[int, int] = {}
    try:
        doc = relay_doc(
            tmp_path, dead.sockets[0].getsockname()[1], delivery={"retry_first_s": 3600}
        )
        relay = await relay_process(doc, "--workers", "2", name="old")
        assert relay.proc is not None
        workers = workers_of(relay)
        await send_each(relay.smtp_port, range(6))  # spooled: the receiver hangs up
        await relay.kill()  # SIGKILL: the workers are orphans now
        for pid in workers.values():
            await exited(pid, timeout_s=30)  # they noticed, drained and exited
    finally:
        kill_all(list(workers.values()))
        dead.close()
    sink = await make_sink()
    doc["routes"] = {"*": f"127.0.0.1:{sink.port}"}
    doc["delivery"] = {"retry_first_s": 0.2}
    new = await relay_process(doc, "--workers", "2", name="new")
    await sink.wait_for_ids(set(range(6)), ids_at)  # the spools were left intact
    assert await new.terminate() == 0


# -- 3. a client's ordinary behaviour is not our error -------------------------------------


def blocking_session(port: int, i: int, read_reply: bool) -> None:
    """A client in its own thread (real concurrency with the relay's loop): one message,
    then it closes without QUIT, after reading its 250 or right after the final dot."""
    with socket.create_connection(("127.0.0.1", port), timeout=REPLY_S) as sock:
        replies = sock.makefile("rb")

        def reply() -> bytes:
            while True:
                line = replies.readline()
                if line[3:4] != b"-":
                    return line

        def say(command: bytes) -> bytes:
            sock.sendall(command + b"\r\n")
            return reply()

        assert reply().startswith(b"220")
        say(b"EHLO client.test")
        assert say(b"MAIL FROM:<app@sender.test>").startswith(b"250")
        assert say(b"RCPT TO:<u@example.test>").startswith(b"250")
        assert say(b"DATA").startswith(b"354")
        sock.sendall(message(i) + b".\r\n")
        if read_reply:
            assert reply().startswith(b"250")
        replies.close()


async def test_clients_closing_without_quit_leave_no_error(
    tmp_path: Path, sink: Sink, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    async with running(parse_config(relay_doc(tmp_path, sink.port))) as relay:
        port = relay.smtp_ports[0]
        await asyncio.gather(
            *(asyncio.to_thread(blocking_session, port, i, True) for i in range(5)),
            *(asyncio.to_thread(blocking_session, port, i, False) for i in range(5, 10)),
        )
        await sink.wait_for_ids(set(range(5)), ids_at)  # those that read their 250
    gc.collect()  # an unretrieved task exception is reported when the task is collected
    for _ in range(3):
        await asyncio.sleep(0)
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, "\n".join(f"{r.name}: {r.getMessage()}" for r in errors[:5])
    assert "never retrieved" not in caplog.text
    assert "Traceback" not in caplog.text
    ended = [r for r in caplog.records if "session" in r.getMessage() and r.name != "mail.log"]
    assert len(ended) <= 10  # at most one line per client


# -- 4. SIGTERM lets transactions in progress finish ---------------------------------------


class Client:
    """A raw SMTP client: bytes as given, replies as read."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int) -> Client:
        return cls(*await asyncio.open_connection("127.0.0.1", port))

    async def reply(self, timeout_s: float = REPLY_S) -> bytes:
        """One reply; b"" when the relay closed the connection (raises on a reset)."""
        return await read_reply(self.reader, timeout_s)

    async def say(self, text: bytes) -> bytes:
        self.writer.write(text + b"\r\n")
        await self.writer.drain()
        return await self.reply()

    async def into_data(self, i: int) -> bytes:
        """Up to the middle of the body; returns the rest to send."""
        assert (await self.reply()).startswith(b"220")
        await self.say(b"EHLO client.test")
        assert (await self.say(b"MAIL FROM:<app@sender.test>")).startswith(b"250")
        assert (await self.say(f"RCPT TO:<u{i}@example.test>".encode())).startswith(b"250")
        assert (await self.say(b"DATA")).startswith(b"354")
        data = message(i)
        half = len(data) - 4
        self.writer.write(data[:half])
        await self.writer.drain()
        return data[half:] + b".\r\n"


async def test_sigterm_lets_sessions_in_data_finish_or_tells_them_421(
    tmp_path: Path, make_sink: MakeSink, relay_process: StartRelay
) -> None:
    sink = await make_sink()
    doc = relay_doc(tmp_path, sink.port, delivery={"drain_timeout_s": DRAIN_S})
    relay = await relay_process(doc)
    assert relay.proc is not None
    finishing = [await Client.open(relay.smtp_port) for _ in range(4)]
    rests = [await c.into_data(i) for i, c in enumerate(finishing)]
    stalled = await Client.open(relay.smtp_port)
    await stalled.into_data(99)  # never sends the rest
    idle = await Client.open(relay.smtp_port)
    assert (await idle.reply()).startswith(b"220")
    await idle.say(b"EHLO idle.test")

    relay.proc.send_signal(signal.SIGTERM)
    assert (await idle.reply()).startswith(b"421 4.3.2")  # not in a transaction: now
    assert await idle.reply() == b""
    with pytest.raises(OSError):  # the listener is closed
        await asyncio.open_connection("127.0.0.1", relay.smtp_port)

    acked = []
    for i, (client, rest) in enumerate(zip(finishing, rests, strict=True)):
        client.writer.write(rest)
        await client.writer.drain()
        answer = await client.reply()
        assert answer.startswith((b"250 ", b"421 4.3.2")), answer
        if answer.startswith(b"250 "):
            acked.append(i)
            assert (await client.reply()).startswith(b"421 4.3.2")  # then: goodbye
        assert await client.reply() == b""  # closed, not reset
    assert acked == [0, 1, 2, 3]  # well within the drain time
    assert (await stalled.reply()).startswith(b"421 4.3.2")  # at the drain deadline
    assert await stalled.reply() == b""
    assert await relay.exited() == 0  # signalled once, above: no second SIGTERM
    assert not [line for line in relay.log if " ERROR " in line or "Traceback" in line]

    restarted = await relay_process(doc, name="restarted")  # what got 250 is delivered
    await sink.wait_for_ids(set(acked), ids_at)
    assert await restarted.terminate() == 0
