"""Reputation feeds (issue 21): Microsoft SNDS's data CSV and Gmail Postmaster Tools v2,
each read from a real HTTP server on loopback (aiohttp.web, port 0): the formats, the
failures (each an unknown signal, never a healthy one), and a key that never shows."""

from __future__ import annotations

import asyncio
import base64
import json
import socket
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from warmrelay.reputation.feeds import FeedError, FeedValue
from warmrelay.reputation.postmaster import SCOPE, fetch_postmaster
from warmrelay.reputation.snds import fetch_snds, parse_snds

DAY = date(2026, 12, 5)
NEXT_DAY = date(2026, 12, 6)


@asynccontextmanager
async def serving(app: web.Application) -> AsyncIterator[str]:
    """``app`` on 127.0.0.1, a free port; its base URL. Stopped at the end."""
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        host, port = runner.addresses[0][:2]
        yield f"http://{host}:{port}"
    finally:
        await runner.cleanup()


def free_port() -> int:
    """A loopback port nobody listens on (bound, then closed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


# -- Microsoft SNDS ---------------------------------------------------------------------

KEY = "0f4c2d9e-5b7a-4e21-9c3d-8a1b2c3d4e5f"
OURS = ("127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5")

# The real format: no header, CRLF, 14 fields (HELO, JMR P1 sender and comments often
# empty). Two days; another account holder's IP; a garbage line; one of ours with an
# unreadable filter; two activity periods of 127.0.0.4 on the second day; 127.0.0.3 has
# no line on the second day and 127.0.0.5 none at all.
SNDS_DATA = (
    "127.0.0.2,12/5/2026 12:00 AM,12/5/2026 11:59 PM,1500,1480,1500,GREEN,< 0.1%,,,0,"
    "mta1.example.test,,\r\n"
    "192.0.2.9,12/5/2026 12:00 AM,12/5/2026 11:59 PM,90000,89000,90000,RED,4.5%,"
    "12/5/2026 1:02 AM,12/5/2026 9:40 PM,77,other.example,,\r\n"
    "127.0.0.3,12/5/2026 12:00 AM,12/5/2026 11:59 PM,800,790,800,YELLOW,0.3%,"
    "12/5/2026 3:10 PM,12/5/2026 3:10 PM,2,mta2.example.test,,\r\n"
    "<<garbage: not a line of SNDS data>>\r\n"
    "127.0.0.4,12/5/2026 12:00 AM,12/5/2026 11:59 PM,300,280,300,RED,1.2%,"
    "12/5/2026 8:00 AM,12/5/2026 6:00 PM,12,mta3.example.test,,\r\n"
    "127.0.0.2,12/6/2026 12:00 AM,12/6/2026 11:59 PM,2100,2050,2100,PURPLE,0.2%,,,0,"
    "mta1.example.test,,\r\n"
    "127.0.0.4,12/6/2026 8:00 AM,12/6/2026 3:59 PM,200,200,200,GREEN,0.1%,"
    "12/6/2026 9:00 AM,12/6/2026 9:00 AM,1,mta3.example.test,,\r\n"
    "127.0.0.4,12/6/2026 4:00 PM,12/6/2026 11:59 PM,250,240,250,YELLOW,< 0.1%,"
    "12/6/2026 5:00 PM,12/6/2026 7:00 PM,3,mta3.example.test,,\r\n"
)

LOGIN_PAGE = (
    "<!DOCTYPE html>\r\n<html><head><title>Sign in to your Microsoft account</title></head>"
    '<body><form method="post" action="/login.srf?wreply=https%3a%2f%2fsendersupport'
    f".olc.protection.outlook.com%2fsnds%2fdata.aspx%3fkey%3d{KEY}"
    '"><input name="loginfmt"></form></body></html>'
)


@dataclass
class FakeSnds:
    """SNDS's automated data access: the data CSV for the right key, the login page for
    any other; or a status, or no answer at all."""

    body: str = SNDS_DATA
    status: int = 200
    hang: bool = False
    released: asyncio.Event = field(default_factory=asyncio.Event)
    keys_seen: list[str] = field(default_factory=list)

    async def data(self, request: web.Request) -> web.Response:
        self.keys_seen.append(request.query.get("key", ""))
        if self.hang:
            await self.released.wait()
        if self.status != 200:
            return web.Response(status=self.status, text="Server Error")
        if request.query.get("key") != KEY:
            return web.Response(text=LOGIN_PAGE, content_type="text/html")
        return web.Response(text=self.body, content_type="text/plain")


@pytest.fixture
async def snds() -> AsyncIterator[tuple[FakeSnds, str]]:
    """A FakeSnds and its data URL (with the right key)."""
    fake = FakeSnds()
    app = web.Application()
    app.router.add_get("/snds/data.aspx", fake.data)
    async with serving(app) as base:
        try:
            yield fake, f"{base}/snds/data.aspx?key={KEY}"
        finally:
            fake.released.set()  # before the server stops: it waits for its handlers


def assert_no_key(err: FeedError) -> None:
    """Neither the message nor what a log line with the traceback shows holds the key."""
    assert KEY not in str(err)
    assert KEY not in "".join(traceback.format_exception(err))
    assert err.__cause__ is None


async def test_snds_values_for_our_ips_per_day(snds: tuple[FakeSnds, str]) -> None:
    fake, url = snds
    text = await fetch_snds(url, timeout_s=10)
    assert fake.keys_seen == [KEY]

    values, problems = parse_snds(text, OURS)

    def v(ip: str, day: date, signal: str, value: float | str) -> FeedValue:
        return FeedValue(ip, "microsoft", day, signal, value)

    assert values == [
        v("127.0.0.2", DAY, "snds_filter", "GREEN"),
        v("127.0.0.2", DAY, "snds_complaint_rate", 0.001),  # "< 0.1%": the bound
        v("127.0.0.2", DAY, "snds_trap_hits", 0.0),
        v("127.0.0.3", DAY, "snds_filter", "YELLOW"),
        v("127.0.0.3", DAY, "snds_complaint_rate", 0.003),
        v("127.0.0.3", DAY, "snds_trap_hits", 2.0),
        v("127.0.0.4", DAY, "snds_filter", "RED"),
        v("127.0.0.4", DAY, "snds_complaint_rate", 0.012),
        v("127.0.0.4", DAY, "snds_trap_hits", 12.0),
        # the unreadable filter is missing, the rest of that line is read
        v("127.0.0.2", NEXT_DAY, "snds_complaint_rate", 0.002),
        v("127.0.0.2", NEXT_DAY, "snds_trap_hits", 0.0),
        # two activity periods: the worse filter, the higher rate, the sum of trap hits
        v("127.0.0.4", NEXT_DAY, "snds_filter", "YELLOW"),
        v("127.0.0.4", NEXT_DAY, "snds_complaint_rate", 0.001),
        v("127.0.0.4", NEXT_DAY, "snds_trap_hits", 4.0),
    ]
    # nothing about 192.0.2.9 (not ours), 127.0.0.3 on the 6th, 127.0.0.5 at all
    assert problems == [
        "line 4: no IP address in the first field",
        "line 6 (127.0.0.2): filter result 'PURPLE' is not GREEN/YELLOW/RED",
    ]


async def test_snds_empty_day_gives_no_values_and_no_error(snds: tuple[FakeSnds, str]) -> None:
    fake, url = snds
    fake.body = ""
    text = await fetch_snds(url, timeout_s=10)
    assert text == ""
    assert parse_snds(text, OURS) == ([], [])
    # a day without our IPs: values for nobody, and nothing wrong either
    fake.body = SNDS_DATA.split("\r\n")[1] + "\r\n"
    assert parse_snds(await fetch_snds(url, timeout_s=10), OURS) == ([], [])


async def test_snds_wrong_key_gets_the_login_page(snds: tuple[FakeSnds, str]) -> None:
    fake, url = snds
    base = url.split("?")[0]
    text = await fetch_snds(f"{base}?key=not-the-key", timeout_s=10)
    assert "<html>" in text
    with pytest.raises(FeedError) as caught:
        parse_snds(text, OURS)
    assert "HTML page" in str(caught.value)
    assert "key" in str(caught.value)
    assert_no_key(caught.value)
    assert fake.keys_seen == ["not-the-key"]


async def test_snds_body_that_is_not_csv(snds: tuple[FakeSnds, str]) -> None:
    fake, url = snds
    fake.body = '{"error": "service unavailable"}\r\n'
    with pytest.raises(FeedError) as caught:
        parse_snds(await fetch_snds(url, timeout_s=10), OURS)
    assert str(caught.value) == (
        "SNDS answered something that is not its CSV data: line 1: no IP address in the first field"
    )


async def test_snds_server_error_names_the_status_not_the_key(
    snds: tuple[FakeSnds, str],
) -> None:
    fake, url = snds
    fake.status = 500
    with pytest.raises(FeedError) as caught:
        await fetch_snds(url, timeout_s=10)
    base = url.split("?")[0]
    assert str(caught.value) == f"SNDS {base}?key=<redacted>: HTTP 500 Internal Server Error"
    assert_no_key(caught.value)


async def test_snds_server_that_never_answers_times_out(snds: tuple[FakeSnds, str]) -> None:
    fake, url = snds
    fake.hang = True
    with pytest.raises(FeedError) as caught:
        await asyncio.wait_for(fetch_snds(url, timeout_s=0.3), timeout=20)
    assert fake.keys_seen == [KEY]  # it was asked, and kept silent
    assert str(caught.value).endswith(": no answer within 0.3s")
    assert_no_key(caught.value)


async def test_snds_nobody_listening() -> None:
    port = free_port()
    with pytest.raises(FeedError) as caught:
        await fetch_snds(f"http://127.0.0.1:{port}/snds/data.aspx?key={KEY}", timeout_s=10)
    assert str(caught.value) == (
        f"SNDS http://127.0.0.1:{port}/snds/data.aspx?key=<redacted>: "
        f"cannot connect to 127.0.0.1:{port}: connection refused"
    )
    assert_no_key(caught.value)


# -- Gmail Postmaster Tools v2 ---------------------------------------------------------

ACCESS_TOKEN = "ya29.loopback-test-token"
CLIENT_EMAIL = "warmrelay@warmrelay-test.iam.gserviceaccount.com"
IDENTIFIERS = {
    "127.0.0.2": "ip-127-0-0-2",
    "127.0.0.3": "ip-127-0-0-3",
    "127.0.0.4": "ip-127-0-0-4",
}


def fbl(identifier: str) -> tuple[str, str]:
    return (
        "FEEDBACK_LOOP_SPAM_RATE",
        f'feedback_loop_id = "{identifier}" AND aggregation_key_type = "ALL_DKIM"',
    )


def der(error_type: str = "", reason: str = "") -> tuple[str, str]:
    if not error_type:
        return ("DELIVERY_ERROR_RATE", "")
    return ("DELIVERY_ERROR_RATE", f'error_type = "{error_type}" AND error_reason = "{reason}"')


def b64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass
class FakePostmaster:
    """Google's OAuth token endpoint and the v2 API paths the client calls. ``stats`` is
    what Postmaster knows: domain -> (standardMetric, filter) -> value for DAY."""

    public_key: rsa.RSAPublicKey
    stats: dict[str, dict[tuple[str, str], float]] = field(default_factory=dict)
    token_answer: tuple[int, str] | None = None  # instead of a token
    api_answer: tuple[int, str] | None = None  # instead of the stats
    hang: bool = False
    page_size: int = 4  # fewer than asked for, as the API may: the client must page
    grants: list[dict[str, Any]] = field(default_factory=list)
    queries: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    released: asyncio.Event = field(default_factory=asyncio.Event)

    async def token(self, request: web.Request) -> web.Response:
        form = await request.post()
        assert form["grant_type"] == "urn:ietf:params:oauth:grant-type:jwt-bearer"
        header_b64, claims_b64, signature = str(form["assertion"]).split(".")
        self.public_key.verify(
            b64url(signature),
            f"{header_b64}.{claims_b64}".encode(),
            padding.PKCS1v15(),
            hashes.SHA256(),
        )
        assert json.loads(b64url(header_b64))["alg"] == "RS256"
        self.grants.append(json.loads(b64url(claims_b64)))
        if self.token_answer is not None:
            status, text = self.token_answer
            return web.Response(status=status, text=text, content_type="application/json")
        return web.json_response(
            {"access_token": ACCESS_TOKEN, "expires_in": 3599, "token_type": "Bearer"}
        )

    async def query(self, request: web.Request) -> web.Response:
        if request.headers.get("Authorization") != f"Bearer {ACCESS_TOKEN}":
            return web.json_response(
                {"error": {"code": 401, "status": "UNAUTHENTICATED"}}, status=401
            )
        domain = request.match_info["domain"]
        body = await request.json()
        self.queries.append((domain, body))
        if self.hang:
            await self.released.wait()
        if self.api_answer is not None:
            status, text = self.api_answer
            return web.Response(status=status, text=text, content_type="application/json")
        known = self.stats.get(domain, {})
        found = []
        for n, metric in enumerate(body["metricDefinitions"]):
            key = (metric["baseMetric"]["standardMetric"], metric.get("filter", ""))
            if key in known:
                kind = "doubleValue" if n % 2 else "floatValue"  # the API uses both
                found.append(
                    {
                        "name": f"domains/{domain}/domainStats/{n:08x}",
                        "metric": metric["name"],
                        "date": {"year": DAY.year, "month": DAY.month, "day": DAY.day},
                        "value": {kind: known[key]},
                    }
                )
        start = int(body.get("pageToken") or 0)
        answer: dict[str, Any] = {}
        if found:
            answer["domainStats"] = found[start : start + self.page_size]
        if start + self.page_size < len(found):
            answer["nextPageToken"] = str(start + self.page_size)
        return web.json_response(answer)


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    """A throwaway key for the service account (one per module: generating takes a while)."""
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture
async def postmaster(
    rsa_key: rsa.RSAPrivateKey, tmp_path: Path
) -> AsyncIterator[tuple[FakePostmaster, Callable[..., Awaitable[list[FeedValue]]]]]:
    """The fake Postmaster on loopback, and ``fetch(domains, timeout_s=...)``: our client
    (in a thread, as the caller runs it) with a service account whose token_uri is the
    fake's."""
    fake = FakePostmaster(rsa_key.public_key())
    app = web.Application()
    app.router.add_post("/token", fake.token)
    app.router.add_post("/v2/domains/{domain}/domainStats:query", fake.query)
    async with serving(app) as base:
        try:
            pem = rsa_key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ).decode()
            account = tmp_path / "postmaster.json"
            account.write_text(
                json.dumps(
                    {
                        "type": "service_account",
                        "project_id": "warmrelay-test",
                        "private_key_id": "0123456789abcdef",
                        "private_key": pem,
                        "client_email": CLIENT_EMAIL,
                        "client_id": "100000000000000000001",
                        "token_uri": f"{base}/token",
                    }
                )
            )

            async def fetch(domains: list[str], timeout_s: float = 10) -> list[FeedValue]:
                return await asyncio.to_thread(
                    fetch_postmaster,
                    account,
                    domains,
                    IDENTIFIERS,
                    DAY,
                    endpoint=f"{base}/",
                    timeout_s=timeout_s,
                )

            yield fake, fetch
        finally:
            fake.released.set()  # before the server stops: it waits for its handlers


Postmaster = tuple[FakePostmaster, Callable[..., Awaitable[list[FeedValue]]]]

GOOD_DAY = {
    "example.com": {
        fbl("ip-127-0-0-2"): 0.0008,
        fbl("ip-127-0-0-3"): 0.004,
        fbl("somebody-else"): 0.3,
        der(): 0.021,
        der("reject", "low_ip_reputation"): 0.015,
        der("temp_fail", "anomalous_traffic_pattern"): 0.006,
        der("reject", "ip_in_rbls"): 0.0,
    },
    "news.example.com": {
        fbl("ip-127-0-0-2"): 0.0021,
        der(): 0.01,
        der("reject", "bad_or_missing_ptr_record"): 0.01,
    },
}


async def test_postmaster_good_day(postmaster: Postmaster) -> None:
    fake, fetch = postmaster
    fake.stats = GOOD_DAY

    values = await fetch(["example.com", "news.example.com"])

    reasons = "low_ip_reputation,bad_or_missing_ptr_record,anomalous_traffic_pattern"

    def v(ip: str, signal: str, value: float | str) -> FeedValue:
        return FeedValue(ip, "gmail", DAY, signal, value)

    assert values == [
        v("127.0.0.2", "spam_rate", 0.0021),  # the higher of its two domains
        v("127.0.0.2", "delivery_error_rate", 0.021),  # per domain: every IP gets it
        v("127.0.0.2", "delivery_error_reasons", reasons),
        v("127.0.0.3", "spam_rate", 0.004),
        v("127.0.0.3", "delivery_error_rate", 0.021),
        v("127.0.0.3", "delivery_error_reasons", reasons),
        # no FBL data for ip-127-0-0-4: its spam rate is unknown, not 0
        v("127.0.0.4", "delivery_error_rate", 0.021),
        v("127.0.0.4", "delivery_error_reasons", reasons),
    ]

    # one JWT-bearer grant, signed by the service account, for the read scope
    assert len(fake.grants) == 1
    claims = fake.grants[0]
    assert claims["iss"] == CLIENT_EMAIL
    assert claims["scope"] == SCOPE == "https://www.googleapis.com/auth/postmaster.traffic.readonly"
    assert claims["aud"].endswith("/token")

    # example.com's 6 stats came in two pages of 4; news.example.com's 3 in one
    assert [(domain, body.get("pageToken")) for domain, body in fake.queries] == [
        ("example.com", None),
        ("example.com", "4"),
        ("news.example.com", None),
    ]
    _, body = fake.queries[0]
    assert body["parent"] == "domains/example.com"
    assert body["timeQuery"] == {"dateList": {"dates": [{"year": 2026, "month": 12, "day": 5}]}}
    assert body["aggregationGranularity"] == "DAILY"
    assert body["pageSize"] == 200
    asked = [
        (m["baseMetric"]["standardMetric"], m.get("filter", "")) for m in body["metricDefinitions"]
    ]
    assert asked[:4] == [fbl("ip-127-0-0-2"), fbl("ip-127-0-0-3"), fbl("ip-127-0-0-4"), der()]
    assert sorted(asked[4:]) == sorted(
        [der("reject", r) for r in ("bad_attachment", "bad_or_missing_ptr_record", "ip_in_rbls")]
        + [der("reject", r) for r in ("low_domain_reputation", "low_ip_reputation")]
        + [der("reject", r) for r in ("spammy_content", "stamp_policy_error", "other")]
        + [der("temp_fail", "anomalous_traffic_pattern"), der("temp_fail", "other")]
    )
    names = [m["name"] for m in body["metricDefinitions"]]
    assert len(set(names)) == len(names)


async def test_postmaster_domain_without_data(postmaster: Postmaster) -> None:
    fake, fetch = postmaster
    fake.stats = {"news.example.com": GOOD_DAY["news.example.com"]}

    assert await fetch(["quiet.example.com"]) == []  # nothing known: nothing said

    values = await fetch(["quiet.example.com", "news.example.com"])
    assert [(v.ip, v.signal, v.value) for v in values] == [
        ("127.0.0.2", "spam_rate", 0.0021),
        ("127.0.0.2", "delivery_error_rate", 0.01),
        ("127.0.0.2", "delivery_error_reasons", "bad_or_missing_ptr_record"),
        ("127.0.0.3", "delivery_error_rate", 0.01),
        ("127.0.0.3", "delivery_error_reasons", "bad_or_missing_ptr_record"),
        ("127.0.0.4", "delivery_error_rate", 0.01),
        ("127.0.0.4", "delivery_error_reasons", "bad_or_missing_ptr_record"),
    ]


async def test_postmaster_errors_without_reasons(postmaster: Postmaster) -> None:
    fake, fetch = postmaster
    fake.stats = {"example.com": {der(): 0.0004, der("reject", "other"): 0.0}}
    values = await fetch(["example.com"])
    assert [(v.ip, v.signal, v.value) for v in values if v.ip == "127.0.0.2"] == [
        ("127.0.0.2", "delivery_error_rate", 0.0004),
        ("127.0.0.2", "delivery_error_reasons", ""),  # known: none
    ]


async def test_postmaster_api_refuses(postmaster: Postmaster) -> None:
    fake, fetch = postmaster
    fake.api_answer = (
        403,
        json.dumps(
            {
                "error": {
                    "code": 403,
                    "message": "The caller does not have permission",
                    "status": "PERMISSION_DENIED",
                }
            }
        ),
    )
    with pytest.raises(FeedError) as caught:
        await fetch(["example.com"])
    assert str(caught.value) == (
        "gmail postmaster example.com: HTTP 403 The caller does not have permission"
    )
    assert len(fake.grants) == 1


@pytest.mark.parametrize(
    ("answer", "reason"),
    [
        (
            (400, '{"error": "invalid_grant", "error_description": "Invalid JWT Signature."}'),
            "refused: invalid_grant: Invalid JWT Signature.",
        ),
        ((200, "<html>sign in</html>"), "the answer is not a token response"),
    ],
)
async def test_postmaster_token_endpoint_refuses(
    postmaster: Postmaster, answer: tuple[int, str], reason: str
) -> None:
    fake, fetch = postmaster
    fake.token_answer = answer
    fake.stats = GOOD_DAY
    with pytest.raises(FeedError) as caught:
        await fetch(["example.com"])
    message = str(caught.value)
    assert message.startswith("gmail postmaster token endpoint http://127.0.0.1:")
    assert message.endswith(f"/token: {reason}")
    assert "\n" not in message
    assert len(fake.grants) == 1  # asked once (a refusal is not retried)
    assert fake.queries == []  # no token, no query


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ("{not json", "the answer is not JSON"),
        ('{"domainStats": "many"}', "domainStats is not a list"),
        ('[{"metric": "delivery_error_rate"}]', "the answer is not a QueryDomainStatsResponse"),
        (
            '{"domainStats": [{"metric": "delivery_error_rate", "value": {"doubleValue": 2.1}}]}',
            "delivery_error_rate = 2.1 is not a rate between 0 and 1",  # a percentage?
        ),
        (
            '{"domainStats": [{"metric": "fbl_0", "value": {"floatValue": "lots"}}]}',
            "the value of fbl_0 is not a number",
        ),
    ],
)
async def test_postmaster_garbage_answers(postmaster: Postmaster, body: str, reason: str) -> None:
    fake, fetch = postmaster
    fake.api_answer = (200, body)
    with pytest.raises(FeedError) as caught:
        await fetch(["example.com"])
    message = str(caught.value)
    assert message.startswith(f"gmail postmaster example.com: {reason}")
    assert "\n" not in message


async def test_postmaster_api_that_never_answers(postmaster: Postmaster) -> None:
    fake, fetch = postmaster
    fake.hang = True
    with pytest.raises(FeedError) as caught:
        await asyncio.wait_for(fetch(["example.com"], timeout_s=0.5), timeout=30)
    assert str(caught.value) == "gmail postmaster example.com: no answer within 0.5s"
    assert len(fake.queries) == 1


async def test_postmaster_credentials_file_unreadable(tmp_path: Path) -> None:
    missing = tmp_path / "nope.json"
    with pytest.raises(FeedError) as caught:
        await asyncio.to_thread(fetch_postmaster, missing, ["example.com"], IDENTIFIERS, DAY)
    assert str(caught.value) == (
        f"gmail postmaster: cannot read the service account file {missing}: "
        "no such file or directory"
    )
    not_a_key = tmp_path / "key.json"
    not_a_key.write_text('{"type": "service_account", "client_email": "x@y"}')
    with pytest.raises(FeedError) as caught:
        await asyncio.to_thread(fetch_postmaster, not_a_key, ["example.com"], IDENTIFIERS, DAY)
    assert str(caught.value).startswith(
        f"gmail postmaster: {not_a_key} is not a service account key file: "
    )
