"""The listener sets a session up as aiosmtpd's SMTP.__init__ would, but lists the auth_/
handle_/smtp_ methods once per class and binds them when looked up
(warmrelay.smtp.listener.RelaySMTP.__init__, _Methods): each new session must still get
what aiosmtpd's own __init__ (inspect.getmembers, dir, inspect.signature) would give it."""

from __future__ import annotations

import asyncio
import base64
import collections
import inspect
import logging
import ssl
import warnings
import weakref
from pathlib import Path

import pytest
from aiosmtpd.smtp import SMTP
from support.relay import relay_config, running
from support.sink import Sink

from warmrelay.smtp.listener import RelaySMTP, make_protocol


async def test_every_session_gets_the_methods_aiosmtpd_would_find(
    tmp_path: Path, sink: Sink
) -> None:
    config = relay_config(tmp_path, sink.port)
    async with running(config) as relay:
        assert relay.handler is not None
        factory = make_protocol(relay.handler, config, config.smtp.listen[0], None)
        first, second = factory(), factory()
        for proto in (first, second):
            assert isinstance(proto, RelaySMTP)
            handler = proto.event_handler
            hooks = {m[len("handle_") :] for m in dir(handler) if m.startswith("handle_")}
            assert set(proto._handle_hooks) == hooks and "DATA" in hooks
            assert all(proto._handle_hooks[k] == getattr(handler, "handle_" + k) for k in hooks)
            commands = {m[len("smtp_") :] for m in dir(proto) if m.startswith("smtp_")}
            assert set(proto._smtp_methods) == commands and "DATA" in commands
            # bound to this session, not to the one the names were first listed for
            assert proto._smtp_methods["DATA"].__self__ is proto
            auth = {
                n.replace("auth_", "").replace("__", "-")
                for obj in (proto, handler)
                for n, _ in inspect.getmembers(obj)
                if n.startswith("auth_")
            }
            assert set(proto._auth_methods) == auth and {"PLAIN", "LOGIN"} <= auth
            assert proto._auth_methods["PLAIN"].method.__self__ is proto
            ehlo = len(inspect.signature(handler.handle_EHLO).parameters)
            assert proto._ehlo_hook_ver == {4: "old", 5: "new"}[ehlo]
        assert first._smtp_methods["DATA"] != second._smtp_methods["DATA"]


@pytest.mark.parametrize("listener_kind", ["plain", "starttls-auth", "proxy"])
async def test_a_session_is_set_up_as_aiosmtpd_s_own_init_would(
    tmp_path: Path, sink: Sink, listener_kind: str
) -> None:
    """Every attribute aiosmtpd's SMTP.__init__ sets, for the arguments make_protocol
    passes, has the same value in a session made by RelaySMTP.__init__ (methods: the same
    function bound to the session; per-session objects: the same kind, not shared)."""
    config = relay_config(tmp_path, sink.port)
    listener = config.smtp.listen[0]
    context = None
    if listener_kind == "starttls-auth":
        listener = listener.model_copy(update={"require_auth": True, "tls": "starttls"})
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    elif listener_kind == "proxy":
        listener = listener.model_copy(update={"proxy_protocol": True})
    async with running(config) as relay:
        assert relay.handler is not None
        ours = make_protocol(relay.handler, config, listener, context)()
        kwargs = {
            "hostname": config.smtp.hostname,
            "data_size_limit": config.smtp.max_message_bytes,
            "enable_SMTPUTF8": True,
            "decode_data": False,
            "timeout": config.smtp.timeout_s,
            "ident": "warmrelay ESMTP",
            "loop": asyncio.get_running_loop(),
            "tls_context": ours.tls_context,
            "auth_required": ours._auth_required,
            "auth_require_tls": ours._auth_require_tls,
            "proxy_protocol_timeout": ours._proxy_timeout,
        }
        theirs = RelaySMTP.__new__(RelaySMTP)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # aiosmtpd warns of AUTH without TLS here
            SMTP.__init__(theirs, relay.handler, authenticator=theirs._capture, **kwargs)
        assert (listener_kind == "starttls-auth") == (ours.tls_context is not None)
        assert (listener_kind == "proxy") == (ours._proxy_timeout is not None)
        for name, expected in vars(theirs).items():
            got = getattr(ours, name)
            if isinstance(expected, dict) and name.endswith(("_methods", "_hooks")):
                assert set(got) == set(expected), name
                for key, value in expected.items():
                    if isinstance(value, tuple):  # _AuthMechAttr(method, is_builtin)
                        assert got[key].is_builtin == value.is_builtin, (name, key)
                        value, got_value = value.method, got[key].method
                    else:
                        got_value = got[key]
                    assert got_value.__func__ is value.__func__, (name, key)
                    owner = relay.handler if value.__self__ is relay.handler else ours
                    assert got_value.__self__ is owner, (name, key)
            elif inspect.ismethod(expected):
                assert got.__func__ is expected.__func__ and got.__self__ is ours, name
            elif isinstance(expected, (asyncio.StreamReader, asyncio.Future, weakref.ref)):
                assert type(got) is type(expected) and got is not expected, name
            elif isinstance(expected, collections.deque):
                assert got == expected and got is not expected, name
            else:
                assert got == expected, name


async def test_aiosmtpd_command_lines_are_still_logged_masked_when_asked_for(
    tmp_path: Path, sink: Sink, caplog: pytest.LogCaptureFixture
) -> None:
    """aiosmtpd's per-command log lines now go through our sanitized_log, which asks the
    logger before masking: an operator who turns "mail.log" up to INFO still gets every
    line, AUTH credentials masked; at WARNING (what serve sets) there is none."""
    secret = base64.b64encode(b"\0user\0hunter2").decode()

    async def session(port: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        await reader.readline()
        for line in (b"EHLO client.test", f"AUTH PLAIN {secret}".encode(), b"QUIT"):
            writer.write(line + b"\r\n")
            while (await reader.readline())[3:4] == b"-":
                pass
        writer.close()

    config = relay_config(tmp_path, sink.port)
    async with running(config) as relay:
        caplog.set_level(logging.INFO, logger="mail.log")
        await session(relay.smtp_ports[0])
        said = [r.getMessage() for r in caplog.records if r.name == "mail.log"]
        assert any("EHLO client.test" in m for m in said)
        auth = [m for m in said if "AUTH PLAIN" in m]
        assert auth and all(secret not in m and "********" in m for m in auth)
        caplog.clear()
        caplog.set_level(logging.WARNING, logger="mail.log")
        await session(relay.smtp_ports[0])
        assert [r for r in caplog.records if r.name == "mail.log"] == []


@pytest.mark.asyncio_loop  # wraps the transport's write(): asyncio's, not uvloop's C type
async def test_a_multi_line_reply_leaves_in_one_write(tmp_path: Path, sink: Sink) -> None:
    """aiosmtpd pushes EHLO's lines one write each; the listener holds the continuation
    lines ("250-") and writes the whole reply with its last line: one send(), one wake-up
    of the client. A continuation line followed by a reply of another code is dropped."""
    config = relay_config(tmp_path, sink.port)
    async with running(config) as relay:
        assert relay.handler is not None
        reader, writer = await asyncio.open_connection("127.0.0.1", relay.smtp_ports[0])
        assert (await reader.readline()).startswith(b"220 ")
        (session,) = relay.handler.sessions
        transport = session.transport
        assert isinstance(transport, asyncio.WriteTransport)
        writes: list[bytes] = []
        real_write = transport.write

        def counted(data: bytes | bytearray | memoryview) -> None:
            writes.append(bytes(data))
            real_write(data)

        transport.write = counted  # type: ignore[method-assign]
        writer.write(b"EHLO client.test\r\n")
        lines = [await reader.readline()]
        while lines[-1][3:4] == b"-":
            lines.append(await reader.readline())
        assert len(lines) >= 6 and lines[-1].startswith(b"250 ")
        assert {b"250-PIPELINING\r\n", b"250-ENHANCEDSTATUSCODES\r\n"} <= set(lines)
        assert writes == [b"".join(lines)]

        writes.clear()
        await session.push("250-a line whose reply never came")
        refusal = "451 4.3.0 Local error in processing, try again later"
        await session.push(refusal)
        assert await reader.readline() == refusal.encode() + b"\r\n"
        assert len(writes) == 1
        writer.write(b"NOOP\r\n")
        assert (await reader.readline()).startswith(b"250 ")
        writer.close()
