"""Admin HTTP endpoint: GET /metrics, /healthz, /status.

A few lines of HTTP/1.1 on asyncio streams: the relay needs three read-only
pages, not a web framework.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import Any

log = logging.getLogger("warmrelay.admin")

Response = tuple[int, str, bytes]
Page = Callable[[], Awaitable[Response]]
Action = Callable[[str], Awaitable[Response]]  # gets the path, e.g. /ips/10.0.0.7/pause

# RFC 6750: a 401 names the scheme the client must use, so tools know to send a bearer token.
CHALLENGE = 'Bearer realm="warmrelay"'


def reason_phrase(status: int) -> str:
    """The standard phrase of a status code (a client shows it; a wrong one misleads)."""
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"


class AdminServer:
    """GET pages by exact path; POST actions by path prefix."""

    def __init__(self, pages: dict[str, Page], actions: dict[str, Action] | None = None) -> None:
        self._pages = pages
        self._actions = actions or {}
        self.token: str | None = None  # if set: required for POST and for /status
        self.private = {"/status"}
        self._server: asyncio.Server | None = None

    async def start(self, host: str, port: int) -> None:
        self._server = await asyncio.start_server(self._handle, host, port)

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            head = request.decode("latin-1")
            method, _, rest = head.partition(" ")
            path = rest.partition(" ")[0].partition("?")[0]
            if self._needs_token(method, path) and not self._token_ok(head):
                status, ctype, body = 401, "text/plain", b"bearer token required\n"
            else:
                status, ctype, body = await self._dispatch(method, path)
            extra = f"WWW-Authenticate: {CHALLENGE}\r\n" if status == 401 else ""
            writer.write(
                f"HTTP/1.1 {status} {reason_phrase(status)}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(body)}\r\n{extra}Connection: close\r\n\r\n".encode()
                + body
            )
            await writer.drain()
        except (OSError, TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()

    def _needs_token(self, method: str, path: str) -> bool:
        return self.token is not None and (method != "GET" or path in self.private)

    def _token_ok(self, head: str) -> bool:
        assert self.token is not None
        for line in head.split("\r\n")[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() == "authorization":
                scheme, _, given = value.strip().partition(" ")
                return scheme.lower() == "bearer" and hmac.compare_digest(
                    given.strip().encode(), self.token.encode()
                )
        return False

    async def _dispatch(self, method: str, path: str) -> Response:
        if method == "GET" and path in self._pages:
            return await self._pages[path]()
        if method == "POST":
            for prefix, action in self._actions.items():
                if path.startswith(prefix):
                    return await action(path)
        if path in self._pages or any(path.startswith(p) for p in self._actions):
            return 405, "text/plain", b"method not allowed\n"
        return 404, "text/plain", b"not found\n"


def json_page(data: Any, status: int = 200) -> tuple[int, str, bytes]:
    return status, "application/json", (json.dumps(data, indent=2) + "\n").encode()
