"""Safe to expose: TLS, AUTH, relay policy, limits, hostile input, the admin token."""

from __future__ import annotations

import asyncio
import base64
import ssl
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest
import trustme
from support.cli import warmrelay
from support.polling import eventually
from support.relay import http, http_get, relay_config, running, send
from support.sink import Sink

from warmrelay.config import UserConfig
from warmrelay.smtp.auth import Authenticator, hash_password

PASSWORD = "correct horse battery"


@pytest.fixture(scope="module")
def app_hash() -> str:
    return hash_password(PASSWORD)


@pytest.fixture
def certs(tmp_path: Path) -> tuple[trustme.CA, Path, Path, Path]:
    ca = trustme.CA()
    leaf = ca.issue_cert("relay.test", "127.0.0.1")
    cert, key, ca_file = tmp_path / "cert.pem", tmp_path / "key.pem", tmp_path / "ca.pem"
    leaf.private_key_and_cert_chain_pem.write_to_path(str(cert))
    leaf.private_key_pem.write_to_path(str(key))
    ca.cert_pem.write_to_path(str(ca_file))
    return ca, cert, key, ca_file


def secure_config(tmp_path: Path, sink: Sink, certs: Any, app_hash: str, **smtp: Any) -> Any:
    _, cert, key, _ = certs
    return relay_config(
        tmp_path,
        sink.port,
        smtp={
            "listen": [
                {"address": "127.0.0.1:0", "tls": "starttls"},
                {"address": "127.0.0.1:0", "tls": "implicit"},
            ],
            "allow_networks": ["127.0.0.1/32"],
            "tls": {"cert": str(cert), "key": str(key)},
            "users": {"app": {"password_hash": app_hash, "senders": ["*@sender.test"]}},
            "max_auth_failures": 3,
            "auth_tarpit_s": 0.01,
            **smtp,
        },
    )


def client(
    port: int,
    ca_file: Path,
    *,
    implicit: bool = False,
    source: str = "127.0.0.9",
    starttls: bool = True,
) -> aiosmtplib.SMTP:
    return aiosmtplib.SMTP(
        hostname="127.0.0.1",
        port=port,
        source_address=(source, 0),
        cert_bundle=str(ca_file),
        use_tls=implicit,
        start_tls=(starttls if not implicit else False),
    )


MSG = b"From: <a@sender.test>\r\nSubject: s\r\n\r\nbody\r\n"


async def test_starttls_then_auth_lets_an_outside_client_relay(
    tmp_path: Path, sink: Sink, certs: Any, app_hash: str
) -> None:
    async with running(secure_config(tmp_path, sink, certs, app_hash)) as relay:
        plain = client(relay.smtp_ports[0], certs[3], starttls=False)
        await plain.connect()
        ehlo = await plain.ehlo()
        assert "STARTTLS" in ehlo.message and "AUTH" not in ehlo.message  # AUTH only after TLS
        clear = await plain.execute_command(b"AUTH", b"PLAIN", base64.b64encode(b"\0app\0x"))
        assert clear.code == 538
        await plain.quit()

        tls = client(relay.smtp_ports[0], certs[3])
        await tls.connect()
        assert "AUTH" in (await tls.ehlo()).message
        await tls.login("app", PASSWORD)
        await tls.sendmail("a@sender.test", ["x@example.test"], MSG)
        await tls.quit()

        implicit = client(relay.smtp_ports[1], certs[3], implicit=True)
        await implicit.connect()
        await implicit.login("app", PASSWORD)
        await implicit.sendmail("b@sender.test", ["y@example.test"], MSG)
        await implicit.quit()
        got = await sink.wait_for(2)
    assert sorted(m.rcpts[0] for m in got) == ["x@example.test", "y@example.test"]
    assert all(b"with ESMTPSA" in m.data for m in got)


async def test_wrong_password_is_refused_then_locked_out(
    tmp_path: Path, sink: Sink, certs: Any, app_hash: str, caplog: pytest.LogCaptureFixture
) -> None:
    async with running(secure_config(tmp_path, sink, certs, app_hash)) as relay:
        for _ in range(3):
            c = client(relay.smtp_ports[0], certs[3])
            await c.connect()
            await c.ehlo()
            with pytest.raises(aiosmtplib.SMTPAuthenticationError) as bad:
                await c.auth_plain("app", "guess")
            assert bad.value.code == 535
            await c.quit()
        c = client(relay.smtp_ports[0], certs[3])
        await c.connect()
        await c.ehlo()
        with pytest.raises(aiosmtplib.SMTPAuthenticationError) as locked:
            await c.auth_plain("app", PASSWORD)  # even the right password: locked out a while
        assert (locked.value.code, locked.value.message[:5]) == (421, "4.7.0")
        c.close()
        other = client(relay.smtp_ports[0], certs[3], source="127.0.0.10")
        await other.connect()
        await other.login("app", PASSWORD)  # another client is not affected
        await other.quit()
    assert "guess" not in caplog.text and PASSWORD not in caplog.text
    assert "authentication failed for user 'app'" in caplog.text


async def test_user_may_only_send_as_its_senders(
    tmp_path: Path, sink: Sink, certs: Any, app_hash: str
) -> None:
    async with running(secure_config(tmp_path, sink, certs, app_hash)) as relay:
        c = client(relay.smtp_ports[0], certs[3])
        await c.connect()
        await c.login("app", PASSWORD)
        with pytest.raises(aiosmtplib.SMTPSenderRefused) as refused:
            await c.sendmail("ceo@bank.test", ["x@example.test"], MSG)
        assert (refused.value.code, refused.value.message[:5]) == (553, "5.7.1")
        await c.quit()


OPEN_RELAY_PROBES = [
    "victim@example.test",
    "victim%example.test@relay.test",
    "@relay.test:victim@example.test",
    '"victim@example.test"@relay.test',
    "victim@example.test@relay.test",
    "example.test!victim@relay.test",
    "victim@[127.0.0.1]",
    "postmaster@relay.test",
]


@pytest.mark.parametrize("sender", ["probe@outside.test", "", "postmaster@relay.test"])
async def test_open_relay_battery(tmp_path: Path, sink: Sink, sender: str) -> None:
    config = relay_config(tmp_path, sink.port, smtp={"allow_networks": ["127.0.0.1/32"]})
    async with running(config) as relay:
        c = aiosmtplib.SMTP(
            hostname="127.0.0.1", port=relay.smtp_ports[0], source_address=("127.0.0.9", 0)
        )
        await c.connect()
        await c.ehlo()
        await c.execute_command(b"MAIL", f"FROM:<{sender}>".encode())
        for rcpt in OPEN_RELAY_PROBES:
            reply = await c.execute_command(b"RCPT", f"TO:<{rcpt}>".encode())
            assert reply.code in (550, 501, 553), (rcpt, reply)
        data = await c.execute_command(b"DATA")
        assert data.code == 503  # no recipient was accepted
        c.close()
    assert sink.messages == []


async def test_require_auth_listener_refuses_allowed_networks(
    tmp_path: Path, sink: Sink, certs: Any, app_hash: str
) -> None:
    config = secure_config(
        tmp_path,
        sink,
        certs,
        app_hash,
        allow_networks=["127.0.0.0/8"],
        listen=[{"address": "127.0.0.1:0", "tls": "starttls", "require_auth": True}],
    )
    async with running(config) as relay:
        c = client(relay.smtp_ports[0], certs[3], source="127.0.0.1")
        await c.connect()
        with pytest.raises(aiosmtplib.SMTPSenderRefused) as refused:
            await c.sendmail("a@sender.test", ["x@example.test"], MSG)
        assert refused.value.code == 530
        c.close()


async def test_connection_limit_per_client(tmp_path: Path, sink: Sink) -> None:
    config = relay_config(
        tmp_path,
        sink.port,
        smtp={"max_connections_per_client": 2, "allow_networks": ["127.0.0.1/32"]},
    )
    async with running(config) as relay:
        port = relay.smtp_ports[0]

        def from_(ip: str) -> aiosmtplib.SMTP:
            return aiosmtplib.SMTP(hostname="127.0.0.1", port=port, source_address=(ip, 0))

        held = [from_("127.0.0.9") for _ in range(2)]
        for c in held:
            await c.connect()
        with pytest.raises(aiosmtplib.SMTPConnectResponseError) as refused:
            await from_("127.0.0.9").connect()
        assert refused.value.code == 421
        others = [from_("127.0.0.5"), *(from_("127.0.0.1") for _ in range(4))]
        for c in others:  # another client still gets in; allowed networks are exempt
            await c.connect()
        for c in [*held, *others]:
            await c.quit()


async def test_too_many_bad_commands_hangs_up(tmp_path: Path, sink: Sink) -> None:
    config = relay_config(tmp_path, sink.port, smtp={"max_bad_commands": 3})
    async with running(config) as relay:
        reader, writer = await asyncio.open_connection("127.0.0.1", relay.smtp_ports[0])
        await reader.readline()
        for _ in range(3):
            writer.write(b"BOGUS\r\n")
        await writer.drain()
        lines = (await asyncio.wait_for(reader.read(), 10)).decode().splitlines()
        assert lines[-1].startswith("421 4.7.0")
        writer.close()


@pytest.mark.parametrize("mode", ["normalize", "reject"])
async def test_smuggling_is_never_forwarded_as_two_messages(
    tmp_path: Path, sink: Sink, mode: str
) -> None:
    config = relay_config(tmp_path, sink.port, smtp={"bare_newlines": mode})
    smuggled = (
        b"Subject: outer\r\n\r\nhello\n.\nMAIL FROM:<evil@x.test>\r\n"
        b"RCPT TO:<victim@example.test>\r\nDATA\r\nSubject: inner\r\n\r\nsmuggled\r\n"
        b"also\r.\rQUIT\r\n"
    )
    async with running(config) as relay:
        c = aiosmtplib.SMTP(hostname="127.0.0.1", port=relay.smtp_ports[0])
        await c.connect()
        await c.ehlo()
        await c.mail("a@sender.test")
        await c.rcpt("x@example.test")
        if mode == "reject":
            with pytest.raises(aiosmtplib.SMTPDataError) as refused:
                await _raw_data(c, smuggled)
            assert (refused.value.code, refused.value.message[:6]) == (554, "5.6.11")
            await c.quit()
            return
        await _raw_data(c, smuggled)
        await c.quit()
        (msg,) = await sink.wait_for(1)
        assert msg.rcpts == ["x@example.test"]
        assert b"smuggled" in msg.data and b"\n.\n" not in msg.data
        # a second (smuggled) message would have been spooled before QUIT was answered:
        # once nothing is left to deliver, it would be at the sink
        await eventually(lambda: relay.scheduler.messages == 0, what="nothing left to deliver")
    assert len(sink.messages) == 1


async def _raw_data(c: aiosmtplib.SMTP, body: bytes) -> None:
    """DATA with the body exactly as given (aiosmtplib would fix the line endings)."""
    start = await c.execute_command(b"DATA")
    assert start.code == 354
    assert c.transport is not None
    c.transport.write(body + b".\r\n")
    reply = await c.protocol.read_response(timeout=10)  # type: ignore[union-attr]
    if reply.code != 250:
        raise aiosmtplib.SMTPDataError(reply.code, reply.message)


async def test_nul_bytes_are_refused(tmp_path: Path, sink: Sink) -> None:
    async with running(relay_config(tmp_path, sink.port)) as relay:
        c = aiosmtplib.SMTP(hostname="127.0.0.1", port=relay.smtp_ports[0])
        await c.connect()
        await c.ehlo()
        await c.mail("a@sender.test")
        await c.rcpt("x@example.test")
        with pytest.raises(aiosmtplib.SMTPDataError) as refused:
            await _raw_data(c, b"Subject: x\r\n\r\nnul \0 here\r\n")
        assert refused.value.code == 554
        await send(relay, ["after@example.test"])  # the relay is fine afterwards
        await sink.wait_for(1)


async def test_admin_token(tmp_path: Path, sink: Sink, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEST_ADMIN_TOKEN", "t0ken-secret")
    config = relay_config(tmp_path, sink.port, admin={"token_env": "TEST_ADMIN_TOKEN"})
    async with running(config) as relay:
        port = relay.admin.port
        assert (await http_get(port, "/metrics"))[0] == 200
        assert (await http_get(port, "/status"))[0] == 401
        assert (await http(port, "POST", "/ips/127.0.0.2/pause"))[0] == 401
        code, body = await http(port, "POST", "/ips/127.0.0.2/pause", "t0ken-secret")
        assert code == 200 and b"t0ken" not in body
        code, body = await http(port, "GET", "/status", "t0ken-secret")
        assert code == 200 and b"t0ken" not in body
        assert b"t0ken" not in (await http_get(port, "/metrics"))[1]


async def test_certificate_reload_keeps_sessions(
    tmp_path: Path, sink: Sink, certs: Any, app_hash: str
) -> None:
    ca, cert, key, ca_file = certs
    async with running(secure_config(tmp_path, sink, certs, app_hash)) as relay:
        before = client(relay.smtp_ports[0], ca_file, source="127.0.0.1")
        await before.connect()
        first = _peer_cn(before)
        renewed = ca.issue_cert("relay.test", "127.0.0.1", common_name="renewed.relay.test")
        renewed.private_key_and_cert_chain_pem.write_to_path(str(cert))
        renewed.private_key_pem.write_to_path(str(key))
        assert relay.tls is not None and relay.tls.reload()
        after = client(relay.smtp_ports[0], ca_file, source="127.0.0.1")
        await after.connect()
        assert (_peer_cn(after), first != "renewed.relay.test") == ("renewed.relay.test", True)
        await before.sendmail("a@sender.test", ["old@example.test"], MSG)  # still alive
        await sink.wait_for(1)
        for c in (before, after):
            await c.quit()


def _peer_cn(c: aiosmtplib.SMTP) -> str:
    assert c.transport is not None
    obj = c.transport.get_extra_info("ssl_object")
    assert isinstance(obj, ssl.SSLObject)
    peer = obj.getpeercert()
    assert peer is not None
    subject = dict(x[0] for x in peer["subject"])  # type: ignore[misc]
    return str(subject.get("commonName", ""))


def test_hash_password_command_and_verification() -> None:
    result = warmrelay("hash-password", stdin="a long enough secret\n")
    assert result.returncode == 0, result.stderr
    hashed = result.stdout.strip()
    assert hashed.startswith("$argon2id$")
    auth = Authenticator({"u": UserConfig(password_hash=hashed)})
    assert asyncio.run(auth.verify("u", "a long enough secret"))
    assert not asyncio.run(auth.verify("u", "wrong"))
    assert not asyncio.run(auth.verify("nobody", "a long enough secret"))
    short = warmrelay("hash-password", stdin="short\n")
    assert short.returncode == 1


async def test_invalid_utf8_address_and_8bit_without_8bitmime(tmp_path: Path, sink: Sink) -> None:
    async with running(relay_config(tmp_path, sink.port)) as relay:
        reader, writer = await asyncio.open_connection("127.0.0.1", relay.smtp_ports[0])
        await reader.readline()

        async def say(line: bytes) -> bytes:
            writer.write(line + b"\r\n")
            await writer.drain()
            reply = await reader.readline()
            while reply[3:4] == b"-":
                reply = await reader.readline()
            return reply

        await say(b"EHLO client.test")
        assert (await say(b"MAIL FROM:<a@sender.test> SMTPUTF8")).startswith(b"250")
        assert (await say(b"RCPT TO:<\xff\xfe@example.test>"))[:1] == b"5"
        assert (await say(b"RCPT TO:<ok@example.test>")).startswith(b"250")
        assert (await say(b"DATA")).startswith(b"354")
        # 8-bit bytes although BODY=8BITMIME was not declared: accepted, sent as 8BITMIME
        assert (await say(b"Subject: caf\xc3\xa9\r\n\r\nna\xc3\xafve\r\n.")).startswith(b"250")
        await say(b"QUIT")
        writer.close()
        (msg,) = await sink.wait_for(1)
    assert msg.data.endswith(b"na\xc3\xafve\r\n")


@pytest.mark.parametrize(
    ("content", "bare"),
    [
        (b"a\r\nb\r\n", False),
        (b"", False),
        (b"a\nb\r\n", True),
        (b"a\rb\r\n", True),
        (b"a\r\r\n", True),
        (b"a\r\n\n", True),
        (b"\r\n.\r\n", False),
    ],
)
def test_bare_newline_detection(content: bytes, bare: bool) -> None:
    from warmrelay.smtp.listener import _has_bare_newline

    assert _has_bare_newline(content) is bare


ADDRESS_ARGS = [
    "<a@b.c>",
    "<a@b.c> SIZE=10 BODY=8BITMIME",
    "<a.b+c@ex-ample.com>",
    " <x@y.z>",
    "<>",
    "a@b.c",
    "<a@b.c",
    '<"q q"@b.c>',
    "<@r.test:v@e.test>",
    "<a@[127.0.0.1]>",
    "<a..b@c.d>",
    "<.a@c.d>",
    "<a@b.c>junk",
    "<é@b.c>",
    "<a@-b.c>",
    "<a@b.c.>",
    "<a@b.c> ",
    "<a b@c.d>",
    "<a@b.c>\r",
    "<a@b.c>\t SIZE=1",
    "<" + "x" * 70 + "@b.c>",
    "<a@b.c>>",
    "<<a@b.c>",
]


@pytest.mark.parametrize("arg", ADDRESS_ARGS)
def test_fast_address_parsing_agrees_with_aiosmtpd(arg: str) -> None:
    from aiosmtpd.smtp import SMTP

    from warmrelay.smtp.listener import RelaySMTP

    fast, slow = RelaySMTP.__new__(RelaySMTP), RelaySMTP.__new__(RelaySMTP)
    fast.local_part_limit = slow.local_part_limit = 0
    assert RelaySMTP._getaddr(fast, arg) == SMTP._getaddr(slow, arg)
