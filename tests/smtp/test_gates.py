"""The listener's gates under hostile peers: who may send a PROXY header, whose address
decides after STARTTLS, what a misbehaving client leaves in the log, and limits on reload."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gc
import logging
import random
import socket
import ssl
import struct
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trustme
import yaml
from support.cli import warmrelay
from support.polling import eventually
from support.relay import relay_doc, running, send
from support.sink import Sink
from support.wire import read_reply

from warmrelay.config import parse_config
from warmrelay.smtp.auth import hash_password

PASSWORD = "correct horse battery"
REPLY_S = 5.0  # the longest any single reply may take before a test fails
# a lockout the reload test sees both active and run out: long enough that a busy machine
# still checks it while active, short enough to wait out
LOCKOUT_S = 3.0


@pytest.fixture(scope="module")
def app_hash() -> str:
    return str(hash_password(PASSWORD))


@pytest.fixture
def certs(tmp_path: Path) -> tuple[trustme.CA, Path, Path]:
    ca = trustme.CA()
    leaf = ca.issue_cert("relay.test", "127.0.0.1")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    leaf.private_key_and_cert_chain_pem.write_to_path(str(cert))
    leaf.private_key_pem.write_to_path(str(key))
    return ca, cert, key


def client_tls(ca: trustme.CA) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    return ctx


class Line:
    """A raw SMTP client over asyncio streams: bytes exactly as given, replies as read."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(
        cls, port: int, source: str = "127.0.0.1", tls: ssl.SSLContext | None = None
    ) -> Line:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1",
            port,
            local_addr=(source, 0),
            ssl=tls,
            server_hostname="relay.test" if tls else None,
        )
        return cls(reader, writer)

    async def reply(self) -> bytes:
        """One (possibly multi-line) reply; b"" once the relay has closed the connection."""
        return await read_reply(self.reader, REPLY_S)

    async def say(self, text: bytes) -> bytes:
        self.writer.write(text + b"\r\n")
        await self.writer.drain()
        return await self.reply()

    async def into_data(self, helo: bytes = b"hostile.test") -> None:
        """EHLO, MAIL, RCPT and DATA, after the greeting was read: the message may follow."""
        await self.say(b"EHLO " + helo)
        await self.say(b"MAIL FROM:<a@sender.test>")
        await self.say(b"RCPT TO:<x@example.test>")
        assert (await self.say(b"DATA")).startswith(b"354")

    async def starttls(self, tls: ssl.SSLContext) -> None:
        assert (await self.say(b"STARTTLS")).startswith(b"220")
        await self.writer.start_tls(tls, server_hostname="relay.test")

    async def rest(self) -> bytes:
        """Everything until the relay closes (a reset counts as closed); fails if it does not."""
        got = b""
        try:
            async with asyncio.timeout(REPLY_S):
                while chunk := await self.reader.read(65536):
                    got += chunk
        except ConnectionResetError:
            pass
        except TimeoutError:
            raise AssertionError(f"the relay kept the connection open after {got!r}") from None
        return got

    def reset(self) -> None:
        """Hang up with a TCP RST (SO_LINGER 0), as a crashing client does."""
        sock = self.writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.writer.transport.abort()

    def close(self) -> None:
        self.writer.close()


def proxy_v1(client: str) -> bytes:
    return f"PROXY TCP4 {client} 127.0.0.1 40000 25\r\n".encode()


def auth_plain(password: str) -> bytes:
    return b"AUTH PLAIN " + base64.b64encode(b"\0app\0" + password.encode())


async def dialogue(port: int, source: str, data: bytes) -> bytes:
    """Send everything at once, then read until the relay closes: all it ever answered."""
    c = await Line.open(port, source)
    try:
        c.writer.write(data)
        await c.writer.drain()
        return await c.rest()
    except ConnectionError:
        return b""
    finally:
        c.close()


async def via_balancer(port: int, client: str, tls: ssl.SSLContext | None = None) -> Line:
    """A connection from the trusted balancer (127.0.0.5) carrying ``client``, greeted and
    EHLO'd (after STARTTLS when ``tls`` is given)."""
    c = await Line.open(port, "127.0.0.5")
    c.writer.write(proxy_v1(client))
    assert (await c.reply()).startswith(b"220 "), client
    assert (await c.say(b"EHLO client.test")).startswith(b"250")
    if tls is not None:
        await c.starttls(tls)
        assert (await c.say(b"EHLO client.test")).startswith(b"250")
    return c


def proxy_listener() -> dict[str, Any]:
    return {"address": "127.0.0.1:0", "proxy_protocol": True, "proxy_from": ["127.0.0.5/32"]}


# --- 1. PROXY headers only from proxy_from ---------------------------------------------


async def test_proxy_header_is_believed_only_from_proxy_from(
    tmp_path: Path, sink: Sink, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    doc = relay_doc(
        tmp_path, sink.port, smtp={"listen": [proxy_listener()], "allow_networks": ["10.0.0.0/8"]}
    )
    spoof = b"EHLO spoof.test\r\nMAIL FROM:<a@sender.test>\r\nRCPT TO:<x@example.test>\r\n"
    async with running(parse_config(doc)) as relay:
        port = relay.smtp_ports[0]
        for source in ("127.0.0.9", "127.0.0.1"):  # loopback, but not the balancer
            assert await dialogue(port, source, proxy_v1("10.1.2.3") + spoof) == b""
        assert await dialogue(port, "127.0.0.9", b"") == b""  # closed before any header

        allowed = await via_balancer(port, "10.1.2.3")  # the balancer: its client decides
        assert (await allowed.say(b"MAIL FROM:<a@sender.test>")).startswith(b"250")
        assert (await allowed.say(b"RCPT TO:<x@example.test>")).startswith(b"250")
        assert (await allowed.say(b"DATA")).startswith(b"354")
        assert (await allowed.say(b"Subject: via lb\r\n\r\nhi\r\n.")).startswith(b"250")
        outsider = await via_balancer(port, "192.0.2.7")
        assert (await outsider.say(b"MAIL FROM:<a@sender.test>")).startswith(b"250")
        assert (await outsider.say(b"RCPT TO:<x@example.test>")).startswith(b"550 5.7.1")
        for c in (allowed, outsider):
            c.close()
        (msg,) = await sink.wait_for(1)
    assert b"([10.1.2.3])" in msg.data
    refused = [r for r in caplog.records if "not in proxy_from" in r.getMessage()]
    assert [r.levelno for r in refused] == [logging.WARNING] * 3
    sources = [r.getMessage().split(":")[0] for r in refused]
    assert sources == ["127.0.0.9", "127.0.0.1", "127.0.0.9"]
    assert all(r.exc_info is None for r in caplog.records)


@pytest.mark.parametrize(
    ("listener", "problem"),
    [
        (
            {"address": "127.0.0.1:2526", "proxy_protocol": True},
            "smtp.listen[1].proxy_from: proxy_protocol: true needs proxy_from",
        ),
        (
            {"address": "127.0.0.1:2526", "proxy_protocol": True, "proxy_from": []},
            "smtp.listen[1].proxy_from: proxy_protocol: true needs proxy_from",
        ),
        (
            {"address": "127.0.0.1:2526", "proxy_from": ["10.0.0.5/32"]},
            "smtp.listen[1].proxy_from: only applies with proxy_protocol: true",
        ),
        (
            {"address": "127.0.0.1:2526", "proxy_protocol": True, "proxy_from": ["10.0.0.500"]},
            "smtp.listen[1].proxy_from[0]: '10.0.0.500' is not a network",
        ),
    ],
)
def test_check_config_refuses_proxy_protocol_without_proxy_from(
    tmp_path: Path, listener: dict[str, Any], problem: str
) -> None:
    path = tmp_path / "relay.yaml"
    doc = relay_doc(tmp_path, 2600, smtp={"listen": ["127.0.0.1:2525", listener]})
    path.write_text(yaml.safe_dump(doc))
    result = warmrelay("check-config", "-c", str(path))
    assert result.returncode == 1
    assert problem in result.stderr, result.stderr


def test_proxy_from_parses_like_allow_networks(tmp_path: Path) -> None:
    listener = {**proxy_listener(), "proxy_from": ["10.0.0.5", "10.0.1.0/24", "fd00::1/64"]}
    config = parse_config(relay_doc(tmp_path, 2600, smtp={"listen": [listener]}))
    assert [str(n) for n in config.smtp.listen[0].proxy_from] == [
        "10.0.0.5/32",
        "10.0.1.0/24",
        "fd00::/64",
    ]


# --- 2. one client identity per connection, STARTTLS included --------------------------


async def test_starttls_behind_a_balancer_keeps_the_real_client(
    tmp_path: Path, sink: Sink, certs: Any
) -> None:
    _, cert, key = certs
    tls = client_tls(certs[0])
    doc = relay_doc(
        tmp_path,
        sink.port,
        smtp={
            "listen": [{**proxy_listener(), "tls": "starttls"}],
            "tls": {"cert": str(cert), "key": str(key)},
            # the balancer's own address may relay (an internal host): must not matter
            "allow_networks": ["127.0.0.5/32", "198.51.100.0/24"],
        },
    )
    async with running(parse_config(doc)) as relay:
        port = relay.smtp_ports[0]
        outsider = await via_balancer(port, "192.0.2.9")
        assert (await outsider.say(b"MAIL FROM:<a@sender.test>")).startswith(b"250")
        assert (await outsider.say(b"RCPT TO:<x@example.test>")).startswith(b"550 5.7.1")
        await outsider.say(b"RSET")
        await outsider.starttls(tls)
        assert (await outsider.say(b"EHLO client.test")).startswith(b"250")
        assert (await outsider.say(b"MAIL FROM:<a@sender.test>")).startswith(b"250")
        assert (await outsider.say(b"RCPT TO:<x@example.test>")).startswith(b"550 5.7.1")
        outsider.close()

        # A header without a client (the balancer's health check) names nobody: the
        # balancer's own address does not open relaying.
        check = await Line.open(port, "127.0.0.5")
        check.writer.write(b"PROXY UNKNOWN\r\n")
        assert (await check.reply()).startswith(b"220 ")
        await check.say(b"EHLO lb.test")
        assert (await check.say(b"MAIL FROM:<a@sender.test>")).startswith(b"250")
        assert (await check.say(b"RCPT TO:<x@example.test>")).startswith(b"550 5.7.1")
        check.close()

        inside = await via_balancer(port, "198.51.100.7", tls)
        assert (await inside.say(b"MAIL FROM:<a@sender.test>")).startswith(b"250")
        assert (await inside.say(b"RCPT TO:<y@example.test>")).startswith(b"250")
        assert (await inside.say(b"DATA")).startswith(b"354")
        assert (await inside.say(b"Subject: tls\r\n\r\nhi\r\n.")).startswith(b"250")
        inside.close()
        (msg,) = await sink.wait_for(1)
    assert msg.rcpts == ["y@example.test"]
    assert b"([198.51.100.7])" in msg.data and b"with ESMTPS;" in msg.data


async def test_auth_failures_lock_out_the_client_behind_the_balancer_not_the_balancer(
    tmp_path: Path, sink: Sink, certs: Any, app_hash: str
) -> None:
    _, cert, key = certs
    tls = client_tls(certs[0])
    doc = relay_doc(
        tmp_path,
        sink.port,
        smtp={
            "listen": [{**proxy_listener(), "tls": "starttls"}],
            "tls": {"cert": str(cert), "key": str(key)},
            "allow_networks": ["127.0.0.1/32"],
            "users": {"app": {"password_hash": app_hash}},
            "max_auth_failures": 2,
            "auth_tarpit_s": 0.01,
        },
    )
    async with running(parse_config(doc)) as relay:
        port = relay.smtp_ports[0]
        attacker = await via_balancer(port, "203.0.113.66", tls)
        for _ in range(2):
            assert (await attacker.say(auth_plain("guess"))).startswith(b"535 5.7.8")
        assert (await attacker.say(auth_plain(PASSWORD))).startswith(b"421 4.7.0")
        attacker.close()

        other = await via_balancer(port, "203.0.113.7", tls)  # same balancer, other client
        assert (await other.say(auth_plain(PASSWORD))).startswith(b"235")
        assert (await other.say(b"MAIL FROM:<a@sender.test>")).startswith(b"250")
        assert (await other.say(b"RCPT TO:<z@example.test>")).startswith(b"250")
        other.close()

        again = await via_balancer(port, "203.0.113.66", tls)  # still locked: keyed per client
        assert (await again.say(auth_plain(PASSWORD))).startswith(b"421 4.7.0")
        again.close()


async def test_connection_cap_counts_the_client_behind_the_balancer(
    tmp_path: Path, sink: Sink
) -> None:
    doc = relay_doc(
        tmp_path,
        sink.port,
        smtp={
            "listen": [proxy_listener()],
            "allow_networks": ["198.51.100.0/24"],
            "max_connections_per_client": 2,
        },
    )
    async with running(parse_config(doc)) as relay:
        port = relay.smtp_ports[0]
        assert relay.handler is not None
        limits = relay.handler.limits
        # the balancer carries many clients: not capped as one client
        held = [await via_balancer(port, f"203.0.113.{n}") for n in range(1, 5)]
        # each client behind it is capped on its own ...
        held += [await via_balancer(port, "203.0.113.9") for _ in range(2)]
        over = await Line.open(port, "127.0.0.5")
        over.writer.write(proxy_v1("203.0.113.9"))
        assert (await over.reply()).startswith(b"421 4.7.0")
        assert await over.rest() == b""
        # ... unless it is in allow_networks (an application host)
        held += [await via_balancer(port, "198.51.100.7") for _ in range(3)]
        assert limits.open == 9
        for c in held:
            c.close()
        await eventually(lambda: limits.open == 0, what="every session closed")
        held = [await via_balancer(port, "203.0.113.9") for _ in range(2)]  # slots came back
        for c in held:
            c.close()


# --- 3. hostile sessions leave no tracebacks -------------------------------------------


@dataclass
class Target:
    """The relay's four listeners, and a client TLS context that trusts its certificate."""

    plain: int  # no TLS; AUTH in clear text allowed
    starttls: int
    implicit: int
    proxy: int  # PROXY protocol from 127.0.0.5
    tls: ssl.SSLContext


Session = Callable[[Target, random.Random], Awaitable[None]]


async def close_at_once(t: Target, rng: random.Random) -> None:
    (await Line.open(t.plain, "127.0.0.21")).close()


async def reset_at_once(t: Target, rng: random.Random) -> None:
    (await Line.open(rng.choice([t.plain, t.starttls]), "127.0.0.22")).reset()


async def random_bytes(t: Target, rng: random.Random) -> None:
    c = await Line.open(rng.choice([t.plain, t.starttls, t.implicit]), "127.0.0.23")
    c.writer.write(rng.randbytes(rng.randrange(1, 4000)))
    await c.writer.drain()
    c.reset() if rng.random() < 0.5 else c.close()


async def half_command(t: Target, rng: random.Random) -> None:
    c = await Line.open(t.plain, "127.0.0.24")
    await c.reply()
    c.writer.write(b"MAIL FROM:<half@sender.te")
    await c.writer.drain()
    c.reset() if rng.random() < 0.5 else c.close()


async def long_lines(t: Target, rng: random.Random) -> None:
    c = await Line.open(t.plain, "127.0.0.25")
    await c.reply()
    c.writer.write(b"EHLO " + b"x" * rng.randrange(1000, 70000) + b"\r\nNOOP\r\n")
    await c.writer.drain()
    c.reset()


async def reset_in_data(t: Target, rng: random.Random) -> None:
    c = await Line.open(t.plain, "127.0.0.1")
    await c.reply()
    await c.into_data()
    c.writer.write(b"Subject: cut\r\n\r\n" + b"y" * rng.randrange(0, 5000))
    await c.writer.drain()
    c.reset()


async def flood_then_reset(t: Target, rng: random.Random) -> None:
    """Many pipelined commands, never read: the relay answers onto a reset connection."""
    c = await Line.open(t.plain, "127.0.0.26")
    c.writer.write(b"NOOP\r\n" * 2000 + b"BOGUS\r\n" * 30)
    await c.writer.drain()
    c.reset()


async def quit_then_more(t: Target, rng: random.Random) -> None:
    c = await Line.open(t.plain, "127.0.0.27")
    c.writer.write(b"QUIT\r\nNOOP\r\nEHLO x\r\n")
    await c.writer.drain()
    await c.rest()
    c.close()


async def plaintext_to_implicit_tls(t: Target, rng: random.Random) -> None:
    c = await Line.open(t.implicit, "127.0.0.28")
    c.writer.write(b"EHLO plain.test\r\n")
    await c.writer.drain()
    await c.rest()
    c.close()


async def plaintext_after_starttls(t: Target, rng: random.Random) -> None:
    c = await Line.open(t.starttls, "127.0.0.29")
    await c.reply()
    await c.say(b"EHLO hostile.test")
    assert (await c.say(b"STARTTLS")).startswith(b"220")
    c.writer.write(b"EHLO still-plain.test\r\n" + rng.randbytes(300))
    await c.writer.drain()
    await c.rest()
    c.close()


async def reset_after_starttls(t: Target, rng: random.Random) -> None:
    c = await Line.open(t.starttls, "127.0.0.30")
    await c.reply()
    await c.say(b"EHLO hostile.test")
    assert (await c.say(b"STARTTLS")).startswith(b"220")
    c.reset()


async def reset_in_tls_data(t: Target, rng: random.Random) -> None:
    c = await Line.open(t.implicit, "127.0.0.1", tls=t.tls)
    await c.reply()
    await c.into_data()
    c.writer.write(b"Subject: cut\r\n\r\n" + b"z" * rng.randrange(0, 3000))
    await c.writer.drain()
    c.reset()


async def reset_during_auth(t: Target, rng: random.Random) -> None:
    """A failed AUTH is answered after the tarpit; the client is gone by then."""
    c = await Line.open(t.plain, "127.0.0.31")
    await c.reply()
    await c.say(b"EHLO hostile.test")
    c.writer.write(b"AUTH PLAIN " + base64.b64encode(b"\0app\0wrong") + b"\r\n")
    await c.writer.drain()
    c.reset()


async def proxy_garbage(t: Target, rng: random.Random) -> None:
    c = await Line.open(t.proxy, "127.0.0.5")
    c.writer.write(rng.choice([b"PROXY TCP4 what\r\n", b"\r\n\r\n\x00\r\nQUIT\n\x21", b"HELO"]))
    await c.writer.drain()
    c.reset() if rng.random() < 0.5 else c.close()


async def proxy_reset_in_data(t: Target, rng: random.Random) -> None:
    c = await Line.open(t.proxy, "127.0.0.5")
    c.writer.write(b"PROXY TCP4 127.0.0.1 127.0.0.1 4000 25\r\n")
    await c.reply()
    await c.into_data()
    c.writer.write(b"Subject: cut\r\n\r\nhalf a li")
    await c.writer.drain()
    c.reset()


HOSTILE: list[Session] = [
    close_at_once,
    reset_at_once,
    random_bytes,
    half_command,
    long_lines,
    reset_in_data,
    flood_then_reset,
    quit_then_more,
    plaintext_to_implicit_tls,
    plaintext_after_starttls,
    reset_after_starttls,
    reset_in_tls_data,
    reset_during_auth,
    proxy_garbage,
    proxy_reset_in_data,
]


def gates_doc(tmp_path: Path, sink: Sink, certs: Any, app_hash: str) -> dict[str, Any]:
    _, cert, key = certs
    return relay_doc(
        tmp_path,
        sink.port,
        smtp={
            "listen": [
                {"address": "127.0.0.1:0", "tls": "none", "auth_without_tls": True},
                {"address": "127.0.0.1:0", "tls": "starttls"},
                {"address": "127.0.0.1:0", "tls": "implicit"},
                {"address": "127.0.0.1:0", "proxy_protocol": True, "proxy_from": ["127.0.0.5"]},
            ],
            "tls": {"cert": str(cert), "key": str(key)},
            "users": {"app": {"password_hash": app_hash}},
            "auth_tarpit_s": 0.05,
            "max_auth_failures": 1000,
        },
    )


async def test_clients_that_reset_leave_no_unretrieved_errors_behind(
    tmp_path: Path, sink: Sink, caplog: pytest.LogCaptureFixture
) -> None:
    """A client's RST ends its session with ConnectionResetError, which asyncio also sets
    on the protocol's "closed" future; the protocol retrieves it only when it is finalized,
    and a garbage collection of the session's reference cycle may finalize the future
    first: "Future exception was never retrieved" in the log, for a client's hang-up."""
    sessions = []
    async with running(parse_config(relay_doc(tmp_path, sink.port))) as relay:
        assert relay.handler is not None
        handler = relay.handler
        for _ in range(30):
            c = await Line.open(relay.smtp_ports[0])
            assert (await c.reply()).startswith(b"220")
            sessions += [s for s in handler.sessions if s not in sessions]
            c.writer.write(b"EHLO reset.test\r\nMAIL FROM:<a@sender.test>\r\n")
            await c.writer.drain()
            c.reset()
        await eventually(lambda: handler.limits.open == 0, what="every session closed")
        # which object the collector finalizes first is up to its generations: that the
        # log stayed clean can be luck, so look at the futures themselves too
        futures = [s._closed for s in sessions if s._closed.done()]
        reset = [f for f in futures if not f.cancelled() and f._exception is not None]
        assert reset, "no session saw the reset as an error: the test tests nothing"
        assert not [f for f in reset if f._log_traceback]  # nothing left to report at GC
        sessions.clear()
        for _ in range(3):
            gc.collect()
            await asyncio.sleep(0)
    assert "never retrieved" not in caplog.text


async def test_hostile_clients_leave_no_errors_and_the_relay_keeps_working(
    tmp_path: Path, sink: Sink, certs: Any, app_hash: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    config = parse_config(gates_doc(tmp_path, sink, certs, app_hash))
    rng = random.Random(20260127)
    async with running(config) as relay:
        plain, starttls, implicit, proxy = relay.smtp_ports
        target = Target(plain, starttls, implicit, proxy, client_tls(certs[0]))

        sem = asyncio.Semaphore(20)

        async def one(i: int) -> None:
            # the relay hanging up on a hostile client is its right
            with contextlib.suppress(OSError, EOFError, asyncio.IncompleteReadError, TimeoutError):
                async with sem:
                    await HOSTILE[i % len(HOSTILE)](target, random.Random(rng.random()))

        await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(150))), 120)
        assert relay.handler is not None
        handler = relay.handler
        await eventually(lambda: handler.limits.open == 0, what="every session closed")
        gc.collect()
        for _ in range(3):
            await asyncio.sleep(0)

        await send(relay, ["after@example.test"])
        (msg,) = await sink.wait_for(1)
        assert msg.rcpts == ["after@example.test"]
        gc.collect()
        await asyncio.sleep(0)
    bad = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not bad, "\n".join(f"{r.name} {r.levelname} {r.getMessage()}" for r in bad[:5])
    assert "never retrieved" not in caplog.text
    assert "Traceback" not in caplog.text


async def test_data_deadline_answers_421_then_closes(
    tmp_path: Path, sink: Sink, caplog: pytest.LogCaptureFixture
) -> None:
    doc = relay_doc(tmp_path, sink.port, smtp={"data_timeout_s": 0.3})
    async with running(parse_config(doc)) as relay:
        c = await Line.open(relay.smtp_ports[0])
        await c.reply()
        await c.into_data(b"slow.test")
        c.writer.write(b"Subject: slow\r\n\r\nand then nothing")
        assert (await c.reply()).startswith(b"421 4.4.2")  # told why, ...
        assert await c.rest() == b""  # ... then hung up on
        c.close()
    assert "127.0.0.1: DATA took too long" in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_a_silent_client_is_hung_up_on_after_timeout_s(tmp_path: Path, sink: Sink) -> None:
    doc = relay_doc(tmp_path, sink.port, smtp={"timeout_s": 0.4})
    async with running(parse_config(doc)) as relay:
        c = await Line.open(relay.smtp_ports[0])
        assert (await c.reply()).startswith(b"220")
        assert (await c.say(b"EHLO quiet.test")).startswith(b"250")
        said = time.monotonic()
        assert await c.rest() == b""  # then nothing from it: the relay hangs up
        assert time.monotonic() - said >= 0.35  # not before its idle time
        c.close()


async def test_each_command_gives_a_client_timeout_s_more(tmp_path: Path, sink: Sink) -> None:
    """A session lasts as long as its commands keep coming (here three times timeout_s),
    and ends timeout_s after the last one."""
    doc = relay_doc(tmp_path, sink.port, smtp={"timeout_s": 0.4})
    async with running(parse_config(doc)) as relay:
        c = await Line.open(relay.smtp_ports[0])
        assert (await c.reply()).startswith(b"220")
        for _ in range(8):
            assert (await c.say(b"NOOP")).startswith(b"250")
            await asyncio.sleep(0.15)  # the client's own pace, not a wait for the relay
        assert (await c.say(b"NOOP")).startswith(b"250")  # 1.2 s in: still open
        said = time.monotonic()
        assert await c.rest() == b""
        assert time.monotonic() - said >= 0.35
        c.close()


# --- 4. limits follow a reload ---------------------------------------------------------


async def test_reload_applies_connection_and_auth_limits_to_the_running_relay(
    tmp_path: Path, sink: Sink, app_hash: str
) -> None:
    path = tmp_path / "relay.yaml"
    smtp = {
        "listen": [{"address": "127.0.0.1:0", "auth_without_tls": True}],
        "allow_networks": ["127.0.0.1/32"],
        "users": {"app": {"password_hash": app_hash}},
        "max_connections": 100,
        "max_connections_per_client": 3,
        "max_auth_failures": 2,
        "auth_lockout_s": 900,
        "auth_tarpit_s": 0,
    }
    doc = relay_doc(tmp_path, sink.port, smtp=smtp)
    path.write_text(yaml.safe_dump(doc))

    async def connect(source: str) -> tuple[Line, bytes]:
        c = await Line.open(port, source)
        return c, await c.reply()

    async def fail_auth(source: str, times: int) -> float:
        """``times`` wrong passwords in one session; how long the first answer took."""
        c, _ = await connect(source)
        await c.say(b"EHLO client.test")
        loop = asyncio.get_running_loop()
        began = loop.time()
        assert (await c.say(auth_plain("guess"))).startswith(b"535")
        took = loop.time() - began
        for _ in range(times - 1):
            assert (await c.say(auth_plain("guess"))).startswith(b"535")
        c.close()
        return took

    async def auth_reply(source: str) -> bytes:
        c, _ = await connect(source)
        await c.say(b"EHLO client.test")
        reply = await c.say(auth_plain(PASSWORD))
        c.close()
        return reply

    async with running(parse_config(doc)) as relay:
        assert relay.handler is not None
        limits = relay.handler.limits
        port = relay.smtp_ports[0]
        await fail_auth("127.0.0.40", 2)
        assert (await auth_reply("127.0.0.40")).startswith(b"421 4.7.0")  # locked (900 s)
        held = [await connect("127.0.0.9") for _ in range(2)]
        assert [greeting[:3] for _, greeting in held] == [b"220", b"220"]

        smtp.update(
            max_connections=3,
            max_connections_per_client=2,
            max_auth_failures=3,
            auth_lockout_s=LOCKOUT_S,
            auth_tarpit_s=0.05,
        )
        path.write_text(yaml.safe_dump(relay_doc(tmp_path, sink.port, smtp=smtp)))
        assert await relay.reload(path)

        assert limits.open == 2  # open sessions are still counted ...
        third, greeting = await connect("127.0.0.9")
        assert greeting.startswith(b"421 4.7.0")  # ... against the new per-client cap
        third.close()
        other, greeting = await connect("127.0.0.10")
        assert greeting.startswith(b"220")
        full, greeting = await connect("127.0.0.11")
        assert greeting.startswith(b"421 4.7.0")  # the new total cap
        full.close()
        for c, _ in held:
            assert (await c.say(b"NOOP")).startswith(b"250")  # held sessions live on
            c.close()
        other.close()
        await eventually(lambda: limits.open == 0, what="every session closed")

        assert await fail_auth("127.0.0.41", 2) >= 0.05  # the new tarpit
        await fail_auth("127.0.0.41", 1)  # not locked after 2: 3 failures allowed now
        assert (await auth_reply("127.0.0.41")).startswith(b"421 4.7.0")  # locked after 3
        await asyncio.sleep(LOCKOUT_S + 0.05)  # the new lockout runs out
        assert (await auth_reply("127.0.0.41")).startswith(b"235")
        assert (await auth_reply("127.0.0.40")).startswith(b"421 4.7.0")  # locked before: kept
