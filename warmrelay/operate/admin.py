"""Admin HTTP endpoint on aiohttp.web: pages (GET), actions (POST) and the queue API.

A real HTTP server rather than our own parsing: keep-alive, query strings, request
bodies, correct status lines, and a handler that raises gets a logged ``500`` with a
JSON body instead of a dropped connection.

Token rules (``admin.token_env``): when a token is configured, every POST and every
private page needs it — as a bearer token (``Authorization: Bearer T``, what the CLI
sends) or as the password of HTTP Basic (any user name; what a browser can send for
the status page). Without a token configured the endpoint is open: check-config warns
unless it listens on loopback.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import logging
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import Any

from aiohttp import web

from warmrelay.operate.api import ApiHandler, ApiRequest, Caller, Response, json_page

__all__ = ["AdminServer", "ApiHandler", "ApiRequest", "Caller", "Response", "json_page"]

log = logging.getLogger("warmrelay.admin")

Page = Callable[[], Awaitable[Response]]
Action = Callable[[str], Awaitable[Response]]  # gets the path, e.g. /ips/10.0.0.7/pause

# RFC 6750: a 401 names the scheme the client must use, so tools know to send a bearer token.
CHALLENGE = 'Bearer realm="warmrelay"'
# A browser cannot send a bearer token: it may send the token as a Basic password.
BROWSER_CHALLENGE = 'Basic realm="warmrelay", charset="UTF-8"'
MAX_BODY_BYTES = 64 * 1024  # JSON requests to the admin API are small


def reason_phrase(status: int) -> str:
    """The standard phrase of a status code (a client shows it; a wrong one misleads)."""
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"


CALLER = web.RequestKey("caller", Caller)


class AdminServer:
    """GET pages by exact path; POST actions by path prefix; API routes by pattern."""

    def __init__(self, pages: dict[str, Page], actions: dict[str, Action] | None = None) -> None:
        self._pages = pages
        self._actions = actions or {}
        self._api: list[tuple[str, str, ApiHandler, bool]] = []
        self.token: str | None = None  # if set: required for POST and for private pages
        self.private = {"/status"}
        self._runner: web.AppRunner | None = None
        self._site: web.BaseSite | None = None

    def route(self, method: str, pattern: str, handler: ApiHandler, private: bool = True) -> None:
        """An API route (aiohttp pattern, e.g. ``/queue/{queue_id}``); before ``start``."""
        self._api.append((method, pattern, handler, private))

    async def start(self, host: str, port: int) -> None:
        await self._start(lambda runner: web.TCPSite(runner, host, port, reuse_address=True))

    async def _start(self, site: Callable[[web.AppRunner], web.BaseSite]) -> None:
        app = web.Application(
            middlewares=[self._errors, self._auth], client_max_size=MAX_BODY_BYTES
        )
        for path, page in self._pages.items():
            app.router.add_get(path, self._page(page), allow_head=True)
        for prefix, action in self._actions.items():
            app.router.add_post(prefix + "{tail:.+}", self._action(action))
        for method, pattern, handler, _ in self._api:
            app.router.add_route(method, pattern, self._api_handler(handler))
        # access_log off: a scrape every 15 s is not news; actions log who asked
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        self._site = site(self._runner)
        await self._site.start()

    @property
    def port(self) -> int:
        assert self._runner is not None
        return int(self._runner.addresses[0][1])

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # -- handlers --------------------------------------------------------------------------

    @staticmethod
    def _page(page: Page) -> Callable[[web.Request], Awaitable[web.Response]]:
        async def handle(request: web.Request) -> web.Response:
            return _response(*await page())

        return handle

    @staticmethod
    def _action(action: Action) -> Callable[[web.Request], Awaitable[web.Response]]:
        async def handle(request: web.Request) -> web.Response:
            return _response(*await action(request.path))

        return handle

    @staticmethod
    def _api_handler(handler: ApiHandler) -> Callable[[web.Request], Awaitable[web.Response]]:
        async def handle(request: web.Request) -> web.Response:
            body: dict[str, Any] = {}
            if request.can_read_body:
                try:
                    parsed = await request.json(loads=json.loads)
                except (json.JSONDecodeError, UnicodeDecodeError):
                    return error(400, "the request body is not JSON")
                if parsed is not None and not isinstance(parsed, dict):
                    return error(400, "the request body must be a JSON object")
                body = parsed or {}
            api = ApiRequest(dict(request.match_info), dict(request.query), body, request[CALLER])
            return _response(*await handler(api))

        return handle

    def _private(self, request: web.Request) -> bool:
        if request.method not in ("GET", "HEAD") or request.path in self.private:
            return True
        resource = request.match_info.route.resource
        canonical = resource.canonical if resource is not None else ""
        return any(
            private and method == "GET" and pattern == canonical
            for method, pattern, _, private in self._api
        )

    @web.middleware
    async def _auth(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        peer = request.remote or "?"
        user = request.headers.get("X-Warmrelay-User", "")[:64]
        if self.token is None:
            request[CALLER] = Caller(peer, "none", user)
            return await handler(request)
        auth = self._authenticate(request.headers.get("Authorization", ""))
        if auth is None and self._private(request):
            response = error(401, "a valid admin token is required (Authorization: Bearer)")
            response.headers.add("WWW-Authenticate", CHALLENGE)
            if request.path == "/" and request.method in ("GET", "HEAD"):
                response.headers.add("WWW-Authenticate", BROWSER_CHALLENGE)
            return response
        request[CALLER] = Caller(peer, auth or "none", user)
        return await handler(request)

    def _authenticate(self, header: str) -> str | None:
        """ "token" (bearer), "basic:USER" (browser), or None if the token is not there."""
        assert self.token is not None
        scheme, _, given = header.strip().partition(" ")
        if scheme.lower() == "bearer":
            ok = hmac.compare_digest(given.strip().encode(), self.token.encode())
            return "token" if ok else None
        if scheme.lower() == "basic":
            try:
                decoded = base64.b64decode(given.strip(), validate=True).decode("utf-8")
            except (binascii.Error, UnicodeDecodeError):
                return None
            user, _, password = decoded.partition(":")
            if hmac.compare_digest(password.encode(), self.token.encode()):
                return f"basic:{user[:64]}"
        return None

    @web.middleware
    async def _errors(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        """404/405/413 as JSON; anything a handler raises is logged once, answered 500."""
        try:
            return await handler(request)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            response = error(exc.status, exc.reason.lower() if exc.reason else "error")
            if exc.status == 405:
                response.headers["Allow"] = exc.headers.get("Allow", "")
            return response
        except Exception:
            log.exception("admin: %s %s failed", request.method, request.path)
            return error(500, "internal error (logged by the relay)")


def _response(status: int, content_type: str, body: bytes) -> web.Response:
    response = web.Response(status=status, body=body)
    response.headers["Content-Type"] = content_type
    return response


def error(status: int, message: str) -> web.Response:
    """A JSON error: {"error": ...}."""
    return _response(*json_page({"error": message}, status))
