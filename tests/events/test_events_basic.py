"""Events end to end on a relay in the test's loop: fields, signature, order."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from support.polling import eventually
from support.relay import relay_config, running, send, status
from support.sink import Sink
from support.webhook import Receiver

from warmrelay.events.webhook import SIGNATURE_HEADER, verify

SECRET_ENV = "WARMRELAY_TEST_WEBHOOK_SECRET"
SECRET = "0123456789abcdef0123456789abcdef"


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    r = await Receiver().start()
    try:
        yield r
    finally:
        await r.stop()


async def test_processed_then_delivered_signed(
    tmp_path: Path, sink: Sink, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(SECRET_ENV, SECRET)
    config = relay_config(
        tmp_path,
        sink.port,
        events={"webhook": {"url": receiver.url, "secret_env": SECRET_ENV, "batch_ms": 50}},
    )
    async with running(config) as relay:
        await send(relay, ["a@example.test", "b@example.test"])
        await sink.wait_for(1)
        await receiver.wait_until(lambda: len(receiver.taken()) >= 4)
        assert relay.events.webhook is not None
        await asyncio.wait_for(relay.events.webhook.posted.wait(), 10)

        async def emptied() -> bool:
            return bool((await status(relay))["events"]["webhook"]["outbox"] == 0)

        await eventually(emptied, what="the outbox emptied after the 2xx")
        shown = (await status(relay))["events"]
    assert shown == {
        "file": None,
        "webhook": {"url": receiver.url, "outbox": 0, "oldest_age_s": None},
    }
    events = receiver.taken()
    names = [(e["email"], e["event"]) for e in events]
    assert names.index(("a@example.test", "processed")) < names.index(
        ("a@example.test", "delivered")
    )
    for post in receiver.posts:
        assert verify(SECRET.encode(), post.headers[SIGNATURE_HEADER], post.body, time.time())
    delivered = next(e for e in events if e["event"] == "delivered")
    assert delivered["ip"] == "127.0.0.2" and delivered["warming"] is True
    assert delivered["response"].startswith("250")
