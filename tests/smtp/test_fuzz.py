"""Fuzzing: random and mutated SMTP dialogues against a relay process over real sockets.

Bounded in examples and time. Afterwards: the relay still runs, relayed nothing
for the non-allowed fuzzing client, holds no leftover sessions or file
descriptors, and a normal client still gets its mail through.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiosmtplib
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support.polling import eventually
from support.relay import http_get, relay_doc
from support.relayproc import RelayProcess
from support.sink import Sink

VERBS = [
    b"EHLO fuzz.test",
    b"HELO fuzz.test",
    b"MAIL FROM:<a@outside.test>",
    b"MAIL FROM:<>",
    b"MAIL FROM:<a@outside.test> SIZE=999999999999",
    b"MAIL FROM:<a@b> BODY=8BITMIME SMTPUTF8",
    b"RCPT TO:<victim@example.test>",
    b"RCPT TO:<v%example.test@relay.test>",
    b"RCPT TO:<\xff\xfe@example.test>",
    b"DATA",
    b".",
    b"RSET",
    b"NOOP",
    b"VRFY root",
    b"AUTH PLAIN AGFwcABwYXNz",
    b"AUTH LOGIN",
    b"STARTTLS",
    b"BDAT 10 LAST",
    b"QUIT",
    b"Subject: x",
    b"",
    b"\x00\x01\x02",
    b"A" * 2000,
]
line = st.one_of(
    st.sampled_from(VERBS),
    st.binary(max_size=200),
    st.tuples(st.sampled_from(VERBS), st.binary(max_size=20), st.integers(0, 40)).map(
        lambda t: t[0][: t[2]] + t[1] + t[0][t[2] :]
    ),
)
ending = st.sampled_from([b"\r\n", b"\n", b"\r", b"\r\r\n", b""])
dialogue = st.lists(st.tuples(line, ending), min_size=1, max_size=25)


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def converse(port: int, steps: list[tuple[bytes, bytes]]) -> None:
    with socket.create_connection(
        ("127.0.0.1", port), timeout=2, source_address=("127.0.0.9", 0)
    ) as s:
        s.settimeout(0.05)
        try:
            s.recv(4096)
            s.sendall(b"".join(text + end for text, end in steps))
            deadline = time.monotonic() + 0.3
            while time.monotonic() < deadline and s.recv(65536):
                pass
        except (TimeoutError, ConnectionError):
            pass


async def sessions(admin_port: int) -> int:
    _, body = await http_get(admin_port, "/metrics")
    line = next(x for x in body.decode().splitlines() if x.startswith("warmrelay_smtp_sessions"))
    return int(float(line.split()[1]))


async def test_fuzzed_dialogues(
    tmp_path: Path, sink: Sink, relay_process: Callable[..., Awaitable[RelayProcess]]
) -> None:
    doc = relay_doc(
        tmp_path,
        sink.port,
        smtp={"allow_networks": ["127.0.0.1/32"], "max_connections_per_client": 1000},
    )
    relay = await relay_process(doc)
    assert relay.proc is not None
    pid = relay.proc.pid
    baseline = open_fds(pid)

    @settings(
        max_examples=120,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )
    @given(dialogue)
    def fuzz(steps: list[tuple[bytes, bytes]]) -> None:
        converse(relay.smtp_port, steps)
        assert relay.proc is not None and relay.proc.returncode is None

    await asyncio.get_running_loop().run_in_executor(None, fuzz)

    async def no_sessions() -> bool:  # sessions end when the relay sees each client's close
        return await sessions(relay.admin_port) == 0

    await eventually(no_sessions, what="every fuzzing session ended")
    assert open_fds(pid) <= baseline + 2  # no leaked sockets or files

    async with aiosmtplib.SMTP(hostname="127.0.0.1", port=relay.smtp_port) as client:
        await client.sendmail(
            "app@sender.test", ["ok@example.test"], b"Subject: after the storm\r\n\r\nhi\r\n"
        )
    got = await sink.wait_for(1)
    assert await relay.terminate() == 0
    assert [m.rcpts for m in got] == [["ok@example.test"]]  # nothing relayed for the fuzzer
    assert not any("Traceback" in line for line in relay.log), "".join(relay.log[-30:])
