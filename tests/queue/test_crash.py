"""Nothing acknowledged is lost: SIGKILL with mail in flight, then restart."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiosmtplib
from support.relay import relay_doc
from support.relayproc import RelayProcess
from support.sink import Sink

N = 500


def process_config(tmp_path: Path, sink_port: int) -> dict[str, Any]:
    return relay_doc(
        tmp_path,
        sink_port,
        cap=100,
        delivery={"retry_first_s": 0.5, "retry_max_s": 2, "connections_per_destination": 8},
    )


async def push(port: int, ids: range) -> list[int]:
    """One client session sending a message per id; returns the ids that got a 250."""
    acked = []
    async with aiosmtplib.SMTP(hostname="127.0.0.1", port=port) as client:
        for i in ids:
            msg = f"Subject: m{i}\r\nX-Test-Id: {i}\r\n\r\nbody {i}\r\n".encode()
            _, reply = await client.sendmail("app@sender.test", [f"u{i}@example.test"], msg)
            if reply.startswith("2.0.0 Ok: queued as"):
                acked.append(i)
    return acked


def ids_at(sink: Sink) -> list[int]:
    out = []
    for m in sink.messages:
        found = re.search(rb"X-Test-Id: (\d+)", m.data)
        assert found is not None
        out.append(int(found.group(1)))
    return out


StartRelay = Callable[..., Awaitable[RelayProcess]]


async def test_sigkill_in_flight_then_restart_delivers_everything(
    tmp_path: Path, make_sink: Callable[..., Awaitable[Sink]], relay_process: StartRelay
) -> None:
    sink = await make_sink(delay_s=0.1)  # a slow receiver keeps mail in flight
    config = process_config(tmp_path, sink.port)
    relay = await relay_process(config)
    sessions = 20
    chunks = [range(k, N, sessions) for k in range(sessions)]
    acked = sorted(
        i
        for part in await asyncio.gather(*(push(relay.smtp_port, c) for c in chunks))
        for i in part
    )
    assert acked == list(range(N))
    await relay.kill()  # SIGKILL: no drain, no goodbye
    before = len(sink.messages)
    assert before < N, "the test needs mail in flight at the kill"

    restarted = await relay_process(config)
    recovered = [line for line in restarted.log if "recovered" in line]
    await sink.wait_for_ids(set(acked), ids_at, timeout_s=60)
    assert await restarted.terminate() == 0

    seen = ids_at(sink)
    duplicates = len(seen) - len(set(seen))
    print(f"\ndelivered before kill: {before}; recovered: {recovered}; duplicates: {duplicates}")
    assert set(seen) == set(acked)  # none lost
    assert duplicates <= 8 * 2  # at most what was on the wire at the kill (2 IPs x 8 conns)


async def test_sigterm_drains_and_keeps_the_rest_spooled(
    tmp_path: Path, make_sink: Callable[..., Awaitable[Sink]], relay_process: StartRelay
) -> None:
    sink = await make_sink(delay_s=0.3)
    config = process_config(tmp_path, sink.port)
    config["delivery"] = {"connections_per_destination": 2, "drain_timeout_s": 10}
    relay = await relay_process(config)
    acked = await push(relay.smtp_port, range(40))
    assert len(acked) == 40
    await sink.wait_for(1)
    assert await relay.terminate() == 0  # SIGTERM: graceful
    assert not any(" INFO mail.log" in line for line in relay.log)  # no per-command lines
    stopped = [line for line in relay.log if "remain spooled" in line]
    assert stopped, relay.log[-5:]
    remaining = int(re.search(r"; (\d+) message", stopped[0]).group(1))  # type: ignore[union-attr]
    delivered = len(sink.messages)
    assert remaining > 0 and delivered + remaining == 40

    restarted = await relay_process(config)
    await sink.wait_for_ids(set(range(40)), ids_at, timeout_s=60)
    assert await restarted.terminate() == 0
    assert sorted(ids_at(sink)) == list(range(40))
