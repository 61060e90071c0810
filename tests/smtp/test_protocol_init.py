"""The listener lists aiosmtpd's auth_/handle_/smtp_ methods once per class instead of per
connection (warmrelay.smtp.listener._Introspection): each new session must still get what
aiosmtpd's own introspection (inspect.getmembers, dir, inspect.signature) would give it."""

from __future__ import annotations

import inspect
from pathlib import Path

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
