"""The in-process tests run on the event loop ``serve`` runs on (tests/conftest.py); the few
marked ``asyncio_loop`` on asyncio's own."""

from __future__ import annotations

import asyncio

import pytest


async def test_tests_run_on_uvloop_as_serve_does() -> None:
    assert type(asyncio.get_running_loop()).__module__.partition(".")[0] == "uvloop"


@pytest.mark.asyncio_loop
async def test_a_marked_test_runs_on_asyncio_s_own_loop() -> None:
    assert isinstance(asyncio.get_running_loop(), asyncio.BaseEventLoop)
