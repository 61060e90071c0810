"""A fleet: relays sharing one Redis budget, worker processes, PROXY protocol."""

from __future__ import annotations

import asyncio
import ipaddress
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiosmtplib
import pytest
from support.polling import eventually
from support.redisserver import RedisServer
from support.relay import http_get, relay_config, relay_doc, running, send, status
from support.relayproc import RelayProcess
from support.sink import Sink

MSG = b"Subject: fleet\r\n\r\nhello\r\n"

StartRelay = Callable[..., Awaitable[RelayProcess]]


async def push(port: int, rcpts: list[str]) -> None:
    async with aiosmtplib.SMTP(hostname="127.0.0.1", port=port) as client:
        for rcpt in rcpts:
            await client.sendmail("app@sender.test", [rcpt], MSG)


async def blast(ports: list[int], total: int, sessions_per_port: int = 10) -> None:
    """total messages, one recipient each, over many sessions spread across the ports."""
    jobs = []
    per_session = total // (len(ports) * sessions_per_port)
    n = 0
    for port in ports:
        for _ in range(sessions_per_port):
            jobs.append(push(port, [f"u{n + k}@example.test" for k in range(per_session)]))
            n += per_session
    await asyncio.gather(*jobs)


async def test_three_relays_on_one_redis_share_the_cap(
    tmp_path: Path, sink: Sink, redis_server: RedisServer, relay_process: StartRelay
) -> None:
    redis = redis_server
    relays = []
    for i in range(3):
        doc = relay_doc(
            tmp_path / f"r{i}",
            sink.port,
            cap=100,
            state={"dir": str(tmp_path / f"r{i}" / "state"), "counters": redis.url},
        )
        (tmp_path / f"r{i}").mkdir()
        relays.append(await relay_process(doc, name=f"r{i}"))
    await blast([r.smtp_port for r in relays], 300)
    await sink.wait_for(300, timeout_s=60)
    for r in relays:
        assert await r.terminate() == 0
    assert sink.by_peer() == {"127.0.0.2": 100, "127.0.0.3": 200}


async def test_workers_on_sqlite_share_the_cap(tmp_path: Path, sink: Sink) -> None:
    """8 workers on 2 cores, 480 messages in 48 concurrent sessions, a cap of 100: the
    coalesced reservations of all workers never give the warming IP one more."""
    doc = relay_doc(tmp_path, sink.port, cap=100)
    # not the relay_process fixture: 8 workers on 2 busy cores need more than its 30 s to start
    relay = RelayProcess(doc, tmp_path, "--workers", "8")
    try:
        await relay.start(timeout_s=90)
        await blast([relay.smtp_port], 480, sessions_per_port=48)
        await sink.wait_for(480, timeout_s=120)
        _, metrics = await http_get(relay.admin_port, "/metrics")
        text = metrics.decode()
        assert "warmrelay_received_total 480.0" in text  # summed over the workers
        assert 'warmrelay_warmup_sent{ip="127.0.0.2"} 100.0' in text
        served = {line.split()[0] for line in relay.log if "delivered" in line}
        assert len(served) >= 4, served  # the kernel spread the sessions over the workers
        assert await relay.terminate() == 0
    finally:
        if relay.proc is not None and relay.proc.returncode is None:
            await relay.kill()
    assert sink.by_peer() == {"127.0.0.2": 100, "127.0.0.3": 380}


async def test_redis_down_pauses_warming_ips_and_loses_nothing(
    tmp_path: Path, sink: Sink, redis_server: RedisServer
) -> None:
    redis = redis_server
    config = relay_config(tmp_path, sink.port, cap=1000, state={"counters": redis.url})
    async with running(config) as relay:
        for i in range(10):
            await send(relay, [f"before{i}@example.test"])
        await sink.wait_for(10)
        await redis.stop()
        for i in range(10):
            await send(relay, [f"down{i}@example.test"])  # still accepted
        await sink.wait_for(20)
        down = [m.peer for m in sink.messages if m.rcpts[0].startswith("down")]
        assert set(down) == {"127.0.0.3"}  # nothing from the warming IP while Redis is down
        code, health = await http_get(relay.admin.port, "/healthz")
        assert (code, health) == (200, b"degraded: counters store unreachable\n")
        _, metrics = await http_get(relay.admin.port, "/metrics")
        assert b"warmrelay_counters_up 0.0" in metrics
        assert (await status(relay))["counters"]["up"] is False

        await redis.start()  # same port, counts kept (appendonly)
        n = 0

        async def recovered() -> bool:
            """One more message; true once it left from the warming IP again."""
            nonlocal n
            assert n < 300, "the relay did not recover"
            await send(relay, [f"after{n}@example.test"])
            await sink.wait_for(21 + n)
            n += 1
            return sink.messages[-1].peer == "127.0.0.2"

        if sink.messages[-1].peer != "127.0.0.2":  # back on the warming IP once reachable
            await eventually(recovered, timeout_s=90, what="the relay recovered")
        warming = (await status(relay))["ips"][0]
        assert warming["sent"] == 11  # 10 before, 1 after: nothing was counted while down
        assert (await status(relay))["counters"]["up"] is True
    assert len(sink.messages) == 20 + n  # none lost


def proxy_v2_header(src: str, src_port: int, dst: str, dst_port: int) -> bytes:
    signature = b"\r\n\r\n\x00\r\nQUIT\n"
    addresses = (
        ipaddress.IPv4Address(src).packed
        + ipaddress.IPv4Address(dst).packed
        + struct.pack("!HH", src_port, dst_port)
    )
    return signature + bytes([0x21, 0x11]) + struct.pack("!H", len(addresses)) + addresses


async def balancer(relay_port: int) -> asyncio.Server:
    """A TCP load balancer on loopback: connects to the relay from 127.0.0.5 and prepends a
    PROXY v2 header naming the real client."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        client_ip, client_port = writer.get_extra_info("peername")[:2]
        up_r, up_w = await asyncio.open_connection(
            "127.0.0.1", relay_port, local_addr=("127.0.0.5", 0)
        )
        up_w.write(proxy_v2_header(client_ip, client_port, "127.0.0.1", relay_port))

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            while data := await src.read(65536):
                dst.write(data)
                await dst.drain()
            dst.close()

        await asyncio.gather(pipe(reader, up_w), pipe(up_r, writer), return_exceptions=True)

    return await asyncio.start_server(handle, "127.0.0.1", 0)


async def test_proxy_protocol_v2_decides_with_the_real_client(tmp_path: Path, sink: Sink) -> None:
    config = relay_config(
        tmp_path,
        sink.port,
        smtp={
            "listen": [
                {"address": "127.0.0.1:0", "proxy_protocol": True, "proxy_from": ["127.0.0.5/32"]}
            ],
            "allow_networks": ["127.0.0.1/32"],
        },
    )
    async with running(config) as relay:
        lb = await balancer(relay.smtp_ports[0])
        try:
            lb_port = lb.sockets[0].getsockname()[1]
            allowed = aiosmtplib.SMTP(
                hostname="127.0.0.1", port=lb_port, source_address=("127.0.0.1", 0)
            )
            async with allowed:
                await allowed.sendmail("app@sender.test", ["ok@example.test"], MSG)
            outsider = aiosmtplib.SMTP(
                hostname="127.0.0.1", port=lb_port, source_address=("127.0.0.9", 0)
            )
            async with outsider:
                with pytest.raises(aiosmtplib.SMTPRecipientsRefused) as refused:
                    await outsider.sendmail("app@sender.test", ["no@example.test"], MSG)
            assert refused.value.recipients[0].code == 550
            (msg,) = await sink.wait_for(1)
            assert msg.rcpts == ["ok@example.test"]
            assert b"[127.0.0.1]" in msg.data  # the Received: header names the real client
            with pytest.raises((aiosmtplib.SMTPException, ConnectionError)):
                await aiosmtplib.SMTP(
                    hostname="127.0.0.1", port=relay.smtp_ports[0], timeout=15
                ).connect()  # not the balancer (proxy_from): closed at once
        finally:
            lb.close()


async def test_spools_of_former_workers_are_recovered(
    tmp_path: Path, sink: Sink, relay_process: StartRelay
) -> None:
    """Mail spooled by 3 workers is delivered by a single process started afterwards."""
    dead = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
    try:
        dead_port = dead.sockets[0].getsockname()[1]
        state = {"dir": str(tmp_path / "state")}
        doc = relay_doc(tmp_path, dead_port, state=state, delivery={"retry_first_s": 3600})
        workers = await relay_process(doc, "--workers", "3", name="three")
        await blast([workers.smtp_port], 30, sessions_per_port=15)
        assert await workers.terminate() == 0
    finally:
        dead.close()
    spools = sorted(p.name for p in (tmp_path / "state").glob("spool*"))
    assert spools == ["spool", "spool-1", "spool-2"]
    single = await relay_process(relay_doc(tmp_path, sink.port, state=state), name="one")
    await sink.wait_for(30)
    assert await single.terminate() == 0
    assert len({m.rcpts[0] for m in sink.messages}) == 30
    assert any("adopted the spool" in line for line in single.log)
