"""The admin HTTP server itself (aiohttp.web): status lines, JSON errors, a failing page
answered 500 and logged, keep-alive, bearer and browser (Basic) token rules. Real
sockets on loopback; the pages are small functions of the test, the server is ours."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
from collections.abc import AsyncIterator

import aiohttp
import pytest

from warmrelay.operate.admin import AdminServer, ApiRequest, Response, json_page

TOKEN = "admin-http-token"


async def ok() -> Response:
    return json_page({"ok": True})


async def broken() -> Response:
    raise RuntimeError("page bug")


async def echo(request: ApiRequest) -> Response:
    return json_page(
        {
            "params": request.params,
            "query": request.query,
            "body": request.body,
            "caller": str(request.caller),
        }
    )


@pytest.fixture
async def server() -> AsyncIterator[AdminServer]:
    admin = AdminServer({"/status": ok, "/healthz": ok, "/broken": broken, "/": ok})
    admin.route("POST", "/things/{name}", echo)
    admin.route("GET", "/public/{name}", echo, private=False)
    admin.private.add("/")
    admin.token = TOKEN
    await admin.start("127.0.0.1", 0)
    yield admin
    await admin.stop()


async def request(
    port: int, method: str, path: str, headers: dict[str, str] | None = None, data: bytes = b""
) -> tuple[int, dict[str, str], bytes]:
    async with (
        aiohttp.ClientSession() as session,
        session.request(
            method, f"http://127.0.0.1:{port}{path}", headers=headers, data=data
        ) as response,
    ):
        # a multi-dict: WWW-Authenticate may come twice
        joined = {k.lower(): ", ".join(response.headers.getall(k)) for k in response.headers}
        return response.status, joined, await response.read()


BEARER = {"Authorization": f"Bearer {TOKEN}"}


async def test_errors_are_json_with_the_right_status(server: AdminServer) -> None:
    status, _, body = await request(server.port, "GET", "/nope")
    assert status == 404 and json.loads(body) == {"error": "not found"}
    status, headers, body = await request(server.port, "PUT", "/healthz", BEARER)
    assert status == 405 and "GET" in headers["allow"] and "error" in json.loads(body)
    status, _, body = await request(
        server.port, "POST", "/things/a", {**BEARER, "Content-Type": "application/json"}, b"{x"
    )
    assert status == 400 and json.loads(body) == {"error": "the request body is not JSON"}
    status, _, body = await request(
        server.port, "POST", "/things/a", {**BEARER, "Content-Type": "application/json"}, b"[1]"
    )
    assert status == 400 and "JSON object" in json.loads(body)["error"]
    status, _, _ = await request(server.port, "POST", "/things/a", BEARER, b"x" * 200_000)
    assert status == 413


async def test_a_failing_page_is_logged_and_answered_500(
    server: AdminServer, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR, logger="warmrelay.admin"):
        status, _, body = await request(server.port, "GET", "/broken")
    assert status == 500 and json.loads(body)["error"].startswith("internal error")
    [record] = [r for r in caplog.records if r.name == "warmrelay.admin"]
    assert "GET /broken failed" in record.getMessage() and record.exc_info is not None
    # the server lives on
    assert (await request(server.port, "GET", "/healthz"))[0] == 200


async def test_token_rules_bearer_and_browser(server: AdminServer) -> None:
    port = server.port
    assert (await request(port, "GET", "/healthz"))[0] == 200  # public
    assert (await request(port, "GET", "/public/x"))[0] == 200
    status, headers, _ = await request(port, "GET", "/status")
    assert status == 401 and headers["www-authenticate"] == 'Bearer realm="warmrelay"'
    status, headers, _ = await request(port, "GET", "/")  # the browser page offers Basic too
    assert status == 401 and 'Basic realm="warmrelay"' in headers["www-authenticate"]
    basic = base64.b64encode(f"ops:{TOKEN}".encode()).decode()
    assert (await request(port, "GET", "/", {"Authorization": f"Basic {basic}"}))[0] == 200
    wrong = base64.b64encode(b"ops:guess").decode()
    assert (await request(port, "GET", "/", {"Authorization": f"Basic {wrong}"}))[0] == 401
    assert (await request(port, "GET", "/", {"Authorization": "Basic %%%"}))[0] == 401
    assert (await request(port, "POST", "/things/a"))[0] == 401
    status, _, body = await request(
        port,
        "POST",
        "/things/a?x=1",
        {**BEARER, "X-Warmrelay-User": "alice", "Content-Type": "application/json"},
        b'{"k": "v"}',
    )
    assert status == 200
    assert json.loads(body) == {
        "params": {"name": "a"},
        "query": {"x": "1"},
        "body": {"k": "v"},
        "caller": "alice@127.0.0.1 (token)",
    }


async def test_keep_alive_serves_several_requests_on_one_connection(server: AdminServer) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        for _ in range(3):
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
            assert head.startswith(b"HTTP/1.1 200 OK\r\n")
            length = next(
                int(line.split(b":")[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            )
            await reader.readexactly(length)
    finally:
        writer.close()
