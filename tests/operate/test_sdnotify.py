"""systemd Type=notify: READY, RELOADING (+ MONOTONIC_USEC) then READY, STOPPING, read from
a real unix datagram socket as systemd would (with the sender's pid), from a relay started
as a real process; with --workers only the supervisor speaks."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from support.relay import relay_doc
from support.relayproc import RelayProcess
from support.sink import Sink

from warmrelay.operate import sdnotify

UCRED = struct.Struct("3i")  # pid, uid, gid

StartRelay = Callable[..., Awaitable[RelayProcess]]


class NotifySocket:
    """What systemd listens on: a datagram socket; each message with the sender's pid."""

    def __init__(self, address: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.setblocking(False)
        self.messages: asyncio.Queue[tuple[int, dict[str, str]]] = asyncio.Queue()
        asyncio.get_running_loop().add_reader(self.sock.fileno(), self._read)

    def _read(self) -> None:
        while True:
            try:
                data, ancdata, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(UCRED.size))
            except BlockingIOError:
                return
            pid = next(
                UCRED.unpack(cdata[: UCRED.size])[0]
                for level, kind, cdata in ancdata
                if (level, kind) == (socket.SOL_SOCKET, socket.SCM_CREDENTIALS)
            )
            fields = dict(line.split("=", 1) for line in data.decode().split("\n") if line)
            self.messages.put_nowait((pid, fields))

    async def next(self, timeout_s: float = 30.0) -> tuple[int, dict[str, str]]:
        return await asyncio.wait_for(self.messages.get(), timeout_s)

    def pending(self) -> list[tuple[int, dict[str, str]]]:
        """Whatever arrived and was not taken yet (read now: the sender has exited)."""
        self._read()
        out = []
        while not self.messages.empty():
            out.append(self.messages.get_nowait())
        return out

    def close(self) -> None:
        asyncio.get_running_loop().remove_reader(self.sock.fileno())
        self.sock.close()


@pytest.fixture
async def notify_socket(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[NotifySocket]:
    path = tmp_path / "notify.sock"
    assert len(str(path)) < 100  # sun_path holds 108 bytes
    listener = NotifySocket(str(path))
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))  # inherited by the relay process
    yield listener
    listener.close()


def monotonic_usec() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


async def reload_and_stop(relay: RelayProcess, listener: NotifySocket) -> list[str]:
    """SIGHUP (a good file), SIGHUP (a broken file), SIGTERM; checks each message's pid and
    content, returns the STATUS texts of the READY=1 after each reload."""
    assert relay.proc is not None
    pid = relay.proc.pid
    statuses = []
    good = relay.config_path.read_text()
    for text in (good, good + "\nnot_a_key: 1\n"):
        relay.config_path.write_text(text)
        before = monotonic_usec()
        relay.proc.send_signal(signal.SIGHUP)
        sender, fields = await listener.next()
        after = monotonic_usec()
        assert sender == pid
        assert fields["RELOADING"] == "1"
        assert before <= int(fields["MONOTONIC_USEC"]) <= after  # CLOCK_MONOTONIC, in µs
        sender, fields = await listener.next()
        assert (sender, fields["READY"]) == (pid, "1")
        statuses.append(fields["STATUS"])
    relay.proc.send_signal(signal.SIGTERM)
    sender, fields = await listener.next()
    assert (sender, fields["STOPPING"]) == (pid, "1")
    assert await relay.terminate() == 0
    return statuses


async def test_ready_reloading_ready_stopping(
    tmp_path: Path, sink: Sink, notify_socket: NotifySocket, relay_process: StartRelay
) -> None:
    doc = relay_doc(tmp_path, sink.port, preflight={"on_start": False})
    relay = await relay_process(doc)
    assert relay.proc is not None
    sender, fields = await notify_socket.next()
    assert (sender, fields["READY"]) == (relay.proc.pid, "1")
    assert "2 IP(s)" in fields["STATUS"]
    applied, refused = await reload_and_stop(relay, notify_socket)  # it has stopped
    assert "reloaded" in applied
    assert "refused" in refused
    assert notify_socket.pending() == []  # nothing else, e.g. no second READY at exit


async def test_with_workers_only_the_supervisor_notifies(
    tmp_path: Path, sink: Sink, notify_socket: NotifySocket, relay_process: StartRelay
) -> None:
    doc = relay_doc(tmp_path, sink.port, preflight={"on_start": False})
    relay = await relay_process(doc, "--workers", "2")
    assert relay.proc is not None
    sender, fields = await notify_socket.next()
    assert (sender, fields["READY"]) == (relay.proc.pid, "1")
    assert "2 workers" in fields["STATUS"]
    workers = {line.split()[0] for line in relay.log if " ready: " in line}
    assert workers >= {"[w0]", "[w1]"}  # both workers were ready, and said nothing
    applied, refused = await reload_and_stop(relay, notify_socket)  # it has stopped
    assert "reloaded" in applied and "refused" in refused
    assert notify_socket.pending() == []  # no worker's READY (or STOPPING), before or after


async def test_notify_sends_to_the_abstract_namespace_and_never_raises(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    name = f"warmrelay-test-{os.getpid()}-{tmp_path.name}"
    listener = NotifySocket("\0" + name)
    try:
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert sdnotify.ready("serving: test")
        sender, fields = await listener.next()
        assert (sender, fields) == (os.getpid(), {"READY": "1", "STATUS": "serving: test"})
    finally:
        listener.close()
    monkeypatch.delenv("NOTIFY_SOCKET")
    assert sdnotify.stopping() is False  # not under systemd: nothing sent
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens.sock"))
    assert sdnotify.reloading() is False  # logged, not raised
    monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)  # closed above: nobody listens now
    assert sdnotify.notify("READY=1") is False
    monkeypatch.setenv("NOTIFY_SOCKET", "vsock:2:1234")  # a kind of socket we do not speak
    assert sdnotify.notify("READY=1") is False
