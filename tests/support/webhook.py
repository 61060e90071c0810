"""A real HTTP receiver on loopback for the event webhook: it records every POST (its
headers, body and events) and answers as the test says (a status, a wait, a hang)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web


@dataclass
class Post:
    headers: dict[str, str]
    body: bytes
    status: int  # what the receiver answered

    @property
    def events(self) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = json.loads(self.body)
        return found


@dataclass
class Receiver:
    """``answer``: the status for the next POST (called per POST); ``gate``: when set, each
    POST waits for it before answering (a slow receiver)."""

    answer: Callable[[], int] = lambda: 200
    gate: asyncio.Event | None = None
    posts: list[Post] = field(default_factory=list)
    port: int = 0
    _runner: web.AppRunner | None = None
    _changed: asyncio.Condition = field(default_factory=asyncio.Condition)

    async def start(self, port: int = 0) -> Receiver:
        app = web.Application()
        app.router.add_post("/hook", self._handle)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", port)
        await site.start()
        server = site._server
        assert server is not None and server.sockets
        self.port = int(server.sockets[0].getsockname()[1])
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        if self.gate is not None:
            await self.gate.wait()
        status = self.answer()
        async with self._changed:
            self.posts.append(Post(dict(request.headers), body, status))
            self._changed.notify_all()
        return web.Response(status=status, text="ok" if status < 300 else "no")

    def taken(self) -> list[dict[str, Any]]:
        """Every event of the POSTs answered 2xx, in arrival order (duplicates kept)."""
        return [e for p in self.posts if 200 <= p.status < 300 for e in p.events]

    async def wait_until(self, done: Callable[[], bool], timeout_s: float = 30.0) -> None:
        async def until() -> None:
            async with self._changed:
                await self._changed.wait_for(done)

        await asyncio.wait_for(until(), timeout_s)
