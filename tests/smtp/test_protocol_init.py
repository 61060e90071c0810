"""The listener lists aiosmtpd's auth_/handle_/smtp_ methods once per class instead of per
connection (warmrelay.smtp.listener._Introspection): each new session must still get what
aiosmtpd's own introspection (inspect.getmembers, dir, inspect.signature) would give it."""

from __future__ import annotations

import asyncio
import base64
import inspect
import logging
from pathlib import Path

import pytest
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
