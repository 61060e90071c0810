"""Fixtures every test package shares. Each one owns what it starts: a sink, a
redis-server, a relay process or a tmpfs is stopped (or killed, or unmounted) when the test
ends, passed or failed. The helpers themselves live in ``support/``."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import uvloop
from support.disk import Disk, mount_tmpfs
from support.redisserver import RedisServer, redis_running
from support.relayproc import RelayProcess
from support.sink import Sink


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> dict[str, Callable[[], asyncio.AbstractEventLoop]]:
    """Every async test runs on the event loop serve runs on (uvloop), except those marked
    ``asyncio_loop``: they look at asyncio's own transports (write() can be wrapped there)."""
    if item.get_closest_marker("asyncio_loop") is not None:
        return {"asyncio": asyncio.new_event_loop}
    return {"uvloop": uvloop.new_event_loop}


@pytest.fixture
async def sink() -> AsyncIterator[Sink]:
    s = await Sink().start()
    try:
        yield s
    finally:
        await s.stop()


@pytest.fixture
async def make_sink() -> AsyncIterator[Callable[..., Awaitable[Sink]]]:
    """``await make_sink(rcpt_reply=..., host=...)``: a started sink, stopped at the end."""
    started: list[Sink] = []

    async def make(**kwargs: Any) -> Sink:
        s = await Sink(**kwargs).start()
        started.append(s)
        return s

    try:
        yield make
    finally:
        for s in started:
            await s.stop()


@pytest.fixture
async def redis_server(tmp_path: Path) -> AsyncIterator[RedisServer]:
    """A real redis-server on a free loopback port (DEBUG allowed: fault tests use it)."""
    async with redis_running(tmp_path / "redis", "--enable-debug-command", "yes") as server:
        yield server


@pytest.fixture
async def relay_process(
    tmp_path: Path,
) -> AsyncIterator[Callable[..., Awaitable[RelayProcess]]]:
    """``await relay_process(doc, *args, name=...)``: ``warmrelay serve`` as a real process,
    ready; killed at the end if the test did not stop it."""
    started: list[RelayProcess] = []

    async def start(doc: dict[str, Any], *args: str, name: str = "relay") -> RelayProcess:
        proc = RelayProcess(doc, tmp_path, *args, name=name)
        started.append(proc)
        return await proc.start()

    try:
        yield start
    finally:
        for proc in started:
            if proc.proc is not None and proc.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    await proc.kill()


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Callable[..., Disk]]:
    """``tmpfs(path, size="2m", read_only=False)``: a small tmpfs at ``path``, unmounted
    at the end."""
    with contextlib.ExitStack() as stack:

        def mount(path: Path, size: str = "2m", *, read_only: bool = False) -> Disk:
            return stack.enter_context(mount_tmpfs(path, size, read_only=read_only))

        yield mount
