"""What admin handlers and their callers share, without the HTTP server.

aiohttp (~8 MB per process) is imported only where an admin endpoint is served
(``warmrelay.admin``): the workers of ``serve --workers`` never serve one, they
answer their supervisor's queue requests on a unix socket (``warmrelay.queueapi``).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

Response = tuple[int, str, bytes]


@dataclass(frozen=True)
class Caller:
    """Who asked, as far as the request shows: logged with every change an operator makes.
    ``user`` is what the client says (the CLI sends the OS user in X-Warmrelay-User);
    ``auth`` how it proved it may ask ("forwarded": a supervisor names the caller)."""

    peer: str
    auth: str  # "token", "basic:USER", "none" (no token configured), "forwarded"
    user: str

    def __str__(self) -> str:
        if self.auth == "forwarded":  # the supervisor already wrote who it was
            return self.peer
        return f"{self.user or 'unknown'}@{self.peer} ({self.auth})"


@dataclass(frozen=True)
class ApiRequest:
    """What an API handler gets: the matched path parameters, the query, the JSON body."""

    params: dict[str, str]
    query: dict[str, str]
    body: dict[str, Any]
    caller: Caller


ApiHandler = Callable[[ApiRequest], Awaitable[Response]]


def json_page(data: Any, status: int = 200) -> Response:
    return status, "application/json", (json.dumps(data, indent=2) + "\n").encode()
