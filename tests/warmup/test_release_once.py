"""A release is applied once, however its first answer was lost (issue 18).

The ledger retries a release the store refused. Refused is not the same as not
applied: a server slower than the client's timeout, a connection killed after the
script ran, one IP's script failing beside another's that ran. Each case on a real
redis-server (and the id's persistence on SQLite too): after it, the count equals
exactly what was handed over, and a new reservation cannot send over the cap.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from redis import asyncio as aioredis
from support.redisserver import RedisServer

from warmrelay.warmup.counters import CounterKey, Limit, SqliteCounters
from warmrelay.warmup.counters.redis import RedisCounters
from warmrelay.warmup.reservation import Ledger, Reservation

A = CounterKey("127.0.0.2", "2026-12-06")
B = CounterKey("127.0.0.3", "2026-12-06")
CAP = 10
PING_WAIT_S = 0.5  # an awake server answers a PING on loopback well within this, even busy
CLIENT_TIMEOUT_S = 2.0  # RedisCounters' socket timeout: a server asleep longer is given up on


async def settled(ledger: Ledger, done: Callable[[], bool], timeout_s: float = 30.0) -> None:
    """Until ``done()``, woken by each change of the ledger's refused releases."""
    changed = asyncio.Event()
    ledger.on_change = changed.set

    async def until() -> None:
        while not done():
            changed.clear()
            await changed.wait()

    await asyncio.wait_for(until(), timeout_s)


async def reservation(
    counters: RedisCounters | SqliteCounters, key: CounterKey, ledger: Ledger, n: int
) -> Reservation:
    """What the router does: reserve under the cap, own the grant."""
    assert await counters.reserve([Limit(key, CAP)], n) == n
    return Reservation(counters, [key], n, ledger)


async def resp(reader: asyncio.StreamReader) -> bytes:
    return await reader.readline()


def command(*words: str) -> bytes:
    out = [f"*{len(words)}\r\n".encode()]
    for w in words:
        out.append(f"${len(w.encode())}\r\n{w}\r\n".encode())
    return b"".join(out)


@contextlib.asynccontextmanager
async def asleep(server: RedisServer, seconds: float) -> AsyncIterator[None]:
    """The server runs ``DEBUG SLEEP`` (busy, answering nobody) while the block runs; it
    is known to sleep before the block starts: a PING on another connection goes
    unanswered for PING_WAIT_S. Leaves once the sleep is over. The block starts at most
    about PING_WAIT_S into the sleep: ``seconds`` must leave the block's work its time
    after that."""
    sleeper = await asyncio.open_connection("127.0.0.1", server.port)
    pinger = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        sleeper[1].write(command("DEBUG", "SLEEP", str(seconds)))
        await sleeper[1].drain()
        while True:  # an answered PING means the sleep did not begin yet
            pinger[1].write(command("PING"))
            await pinger[1].drain()
            try:
                assert await asyncio.wait_for(resp(pinger[0]), PING_WAIT_S) == b"+PONG\r\n"
            except TimeoutError:
                break
        yield
        assert await asyncio.wait_for(resp(sleeper[0]), seconds + 10) == b"+OK\r\n"
    finally:
        for _, writer in (sleeper, pinger):
            writer.close()


class Cutter:
    """A TCP proxy in front of redis-server that, once armed, lets the next request
    through and then kills the connection instead of passing the answer back: the
    command ran, its client never learns."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.armed = False
        self.cut = asyncio.Event()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return int(self._server.sockets[0].getsockname()[1])

    async def _serve(self, c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter) -> None:
        s_reader, s_writer = await asyncio.open_connection("127.0.0.1", self.target_port)

        async def upstream() -> None:
            while data := await c_reader.read(65536):
                s_writer.write(data)
                await s_writer.drain()
            s_writer.close()

        async def downstream() -> None:
            while data := await s_reader.read(65536):
                if self.armed:
                    self.armed = False
                    c_writer.transport.abort()  # the answer is lost with the connection
                    s_writer.close()
                    self.cut.set()
                    return
                c_writer.write(data)
                await c_writer.drain()
            c_writer.close()

        tasks = [asyncio.ensure_future(upstream()), asyncio.ensure_future(downstream())]
        self._tasks.update(tasks)
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.difference_update(tasks)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()


async def released_marker(server: RedisServer, r: Reservation) -> bool:
    probe = aioredis.Redis.from_url(server.url)
    try:
        key = f"warmrelay:{{{r.keys[0].ip}}}:released:{r.release_id}"
        return bool(await probe.exists(key))
    finally:
        await probe.aclose()


async def test_a_release_the_client_gave_up_on_but_the_server_ran_counts_once(
    redis_server: RedisServer,
) -> None:
    """Reserve 5 + 5 under a cap of 10; the server sleeps past the client's 2 s timeout
    while the second 5 are given back: the client gives up, the script runs after the
    sleep. The ledger's retry must not give them back again. The sleep leaves the give-back
    over 2 s beyond the client's timeout to be sent in (a busy machine)."""
    counters = RedisCounters(redis_server.url)
    ledger = Ledger()
    try:
        handed_over = await reservation(counters, A, ledger, 5)
        not_sent = await reservation(counters, A, ledger, 5)
        handed_over.keep(5)
        await handed_over.settle()  # nothing to give back
        async with asleep(redis_server, PING_WAIT_S + CLIENT_TIMEOUT_S + 2.5):
            not_sent.keep(0)
            await not_sent.settle()  # times out: kept by the ledger to retry
            assert ledger.unreleased == 5
        await settled(ledger, lambda: ledger.unreleased == 0)
        assert await released_marker(redis_server, not_sent)  # the first one ran after all
        assert await counters.get(A) == 5  # exactly what was handed over
        assert await counters.reserve([Limit(A, CAP)], 10) == 5  # never 15 against 10
    finally:
        await ledger.settle_all()
        await counters.close()


async def test_a_connection_killed_after_the_script_ran_releases_once(
    redis_server: RedisServer,
) -> None:
    cutter = Cutter(redis_server.port)
    port = await cutter.start()
    counters = RedisCounters(f"redis://127.0.0.1:{port}/0")
    ledger = Ledger()
    try:
        handed_over = await reservation(counters, A, ledger, 5)
        not_sent = await reservation(counters, A, ledger, 5)
        handed_over.keep(5)
        await handed_over.settle()
        cutter.armed = True
        not_sent.keep(0)
        await not_sent.settle()
        assert cutter.cut.is_set()
        assert ledger.unreleased == 5  # the client saw a dead connection
        await settled(ledger, lambda: ledger.unreleased == 0)
        assert await released_marker(redis_server, not_sent)
        assert await counters.get(A) == 5
        assert await counters.reserve([Limit(A, CAP)], 10) == 5
    finally:
        await ledger.settle_all()
        await counters.close()
        await cutter.stop()


async def test_one_ips_failing_script_does_not_fail_the_other_ips_release(
    redis_server: RedisServer,
) -> None:
    """Releases for two IPs in one batch run one script each; B's fails (its count key
    holds the wrong type). A's ran: its caller is told so, and nothing gives A back twice."""
    counters = RedisCounters(redis_server.url)
    probe = aioredis.Redis.from_url(redis_server.url)
    ledger = Ledger()
    try:
        a_sent = await reservation(counters, A, ledger, 5)
        a_back = await reservation(counters, A, ledger, 5)
        b_back = await reservation(counters, B, ledger, 4)
        a_sent.keep(5)
        await a_sent.settle()
        b_name = f"warmrelay:{{{B.ip}}}:{B.window}:{B.scope}"
        await probe.delete(b_name)
        await probe.hset(b_name, "broken", "1")  # GET fails: WRONGTYPE
        await asyncio.gather(a_back.settle(), b_back.settle())  # one batch, two scripts
        assert ledger.unreleased == 4  # only B's is kept to retry
        a_name = f"warmrelay:{{{A.ip}}}:{A.window}:{A.scope}"
        assert int(await probe.get(a_name)) == 5
        await probe.delete(b_name)
        await probe.set(b_name, 4)  # repaired: B's retry goes through, once
        await settled(ledger, lambda: ledger.unreleased == 0)
        assert await counters.get(B) == 0
        assert await counters.get(A) == 5
        assert await counters.reserve([Limit(A, CAP)], 10) == 5
    finally:
        await ledger.settle_all()
        await probe.aclose()
        await counters.close()


@pytest.mark.parametrize("backend", ["sqlite", "redis"])
async def test_a_release_id_is_remembered_across_a_restart(tmp_path: Path, backend: str) -> None:
    server = RedisServer(tmp_path / "redis") if backend == "redis" else None

    def open_store() -> RedisCounters | SqliteCounters:
        if server is not None:
            return RedisCounters(server.url)
        return SqliteCounters(tmp_path / "c.sqlite3")

    try:
        if server is not None:
            await server.start()
        first = open_store()
        assert await first.reserve([Limit(A, CAP)], 8) == 8
        await first.release([A], 3, "same-id")
        await first.close()
        if server is not None:
            await server.stop()
            await server.start()
        second = open_store()
        await second.release([A], 3, "same-id")  # a retry after a restart
        assert await second.get(A) == 5
        await second.release([A], 3, "other-id")
        assert await second.get(A) == 2
        await second.close()
    finally:
        if server is not None:
            await server.stop()
