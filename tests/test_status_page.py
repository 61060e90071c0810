"""The status page at GET /: loaded in a real browser (headless Chromium), over plain HTTP
(escaping, the token rule), and rendered from status dicts the relay does not produce yet."""

from __future__ import annotations

import asyncio
import os
import shutil
from datetime import UTC, datetime
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.smtp import Envelope
from conftest import Sink, http, http_get, relay_config, running, send, status

from warmrelay import statuspage

WARMING = "127.0.0.2"
VOID = {"meta", "link", "br", "hr", "img", "input", "wbr", "source", "col", "area", "base"}


class Fields(HTMLParser):
    """The text and attributes of each ``data-field`` element, per ``data-ip`` element."""

    def __init__(self) -> None:
        super().__init__()
        self.ips: dict[str, dict[str, list[tuple[str, dict[str, str]]]]] = {}
        self.roles: dict[str, str] = {}
        self.page_fields: dict[str, str] = {}
        self._stack: list[tuple[str, str | None, str | None]] = []  # tag, ip, field
        self._text: dict[int, list[str]] = {}

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        ip = a.get("data-ip") or (self._stack[-1][1] if self._stack else None)
        if "data-ip" in a:
            self.ips[a["data-ip"]] = {}
            self.roles[a["data-ip"]] = a.get("data-role", "")
        field = a.get("data-field")
        if field is not None:
            target = self.ips[ip] if ip is not None else None
            if target is not None:
                target.setdefault(field, []).append(("", a))
        if tag not in VOID:
            self._stack.append((tag, ip, field))
            self._text[len(self._stack)] = []

    def handle_endtag(self, tag: str) -> None:
        if not self._stack or tag in VOID:
            return
        depth = len(self._stack)
        _, ip, field = self._stack.pop()
        text = "".join(self._text.pop(depth, [])).strip()
        if depth > 1:
            self._text.setdefault(depth - 1, []).append(text)
        if field is not None:
            if ip is not None:
                values = self.ips[ip][field]
                values[-1] = (text, values[-1][1])
            else:
                self.page_fields[field] = text

    def handle_data(self, data: str) -> None:
        if self._stack:
            self._text[len(self._stack)].append(data)

    def text(self, ip: str, field: str, n: int = 0) -> str:
        return self.ips[ip][field][n][0]


def parse(page: str) -> Fields:
    parser = Fields()
    parser.feed(page)
    parser.close()
    return parser


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed (CI needs the Debian package chromium)")
        pytest.skip("chromium is not installed")
    return found


async def browser_dom(url: str, profile: Path) -> str:
    """The DOM headless Chromium built from ``url`` (a real browser, in a subprocess, so the
    relay in this test's loop keeps serving meanwhile)."""
    proc = await asyncio.create_subprocess_exec(
        chromium(),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        f"--user-data-dir={profile}",
        "--dump-dom",
        url,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 0, err.decode(errors="replace")[-2000:]
    return out.decode()


def provider_doc() -> dict[str, Any]:
    return {
        "ips": [
            {
                "address": WARMING,
                "helo": "mta1.example.test",
                "warmup": {
                    "start": "2026-01-01",
                    "schedule": [10] * 3650,
                    "providers": {"gmail": {"share": 0.5}},
                },
            },
            {"address": "127.0.0.3", "helo": "mta2.example.test"},
        ],
        "preflight": {"on_start": False},
    }


async def test_browser_shows_what_status_says(tmp_path: Path, sink: Sink) -> None:
    chromium()  # skip before starting anything when there is no browser
    config = relay_config(tmp_path, sink.port, **provider_doc())
    async with running(config) as relay:
        await send(relay, ["a@example.test", "b@example.test", "c@example.test"])
        await send(relay, ["x@gmail.com", "y@gmail.com"])
        await sink.wait_for(2)
        st = await status(relay)
        warming = next(ip for ip in st["ips"] if ip["address"] == WARMING)
        assert warming["sent"] == 5  # the page is checked against counts, not zeros
        assert warming["providers"]["gmail"]["sent"] == 2

        dom = parse(await browser_dom(f"http://127.0.0.1:{relay.admin.port}/", tmp_path / "p"))

    assert set(dom.ips) == {WARMING, "127.0.0.3"}
    assert dom.roles == {WARMING: "warming", "127.0.0.3": "pool"}
    assert dom.text(WARMING, "day") == str(warming["warmup_day"])
    assert dom.text(WARMING, "days") == str(warming["schedule_days"]) == "3650"
    assert dom.text(WARMING, "cap") == str(warming["cap"]) == "10"
    assert dom.text(WARMING, "cap_now") == str(warming["cap_now"])
    assert dom.text(WARMING, "sent") == "5"
    assert dom.text(WARMING, "helo") == "mta1.example.test"
    progress = dom.ips[WARMING]["progress"][0][1]
    assert (progress["value"], progress["max"]) == (str(warming["warmup_day"]), "3650")
    assert dom.text(WARMING, "provider-cap") == str(warming["providers"]["gmail"]["cap"]) == "5"
    assert dom.text(WARMING, "provider-sent") == "2"
    assert "sent" not in dom.ips["127.0.0.3"]  # a pool IP has no cap to count against
    assert dom.page_fields["queue-messages"] == str(st["spool"]["messages"])


def throttles_with_markup(peer: str, envelope: Envelope) -> str | None:
    if peer == WARMING and envelope.rcpt_tos[0].endswith("@brand.test"):
        return '421 4.7.28 <script>alert("x")</script> & unusual rate from your IP'
    return None


async def test_page_escapes_what_receivers_say(tmp_path: Path) -> None:
    sink = await Sink(data_reply=throttles_with_markup).start()
    try:
        config = relay_config(tmp_path, sink.port, preflight={"on_start": False})
        async with running(config) as relay:
            await send(relay, ["someone@brand.test"])
            (rerouted,) = await sink.wait_for(1)
            assert rerouted.peer == "127.0.0.3"  # throttled at the warming IP, sent from the pool
            st = await status(relay)
            reason = st["ips"][0]["suspended"]["brand.test"]["reason"]
            assert "<script>" in reason  # the raw text reached the status: the page must escape
            code, body = await http_get(relay.admin.port, "/")
    finally:
        await sink.stop()
    assert code == 200
    page = body.decode()
    assert page.startswith("<!DOCTYPE html>")
    assert '<meta http-equiv="refresh" content="15">' in page
    assert "<script" not in page
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; unusual rate" in page
    dom = parse(page)
    assert dom.roles[WARMING] == "warming"
    assert "src=" not in page and "http://" not in page and "https://" not in page  # no assets


async def test_page_needs_the_token_as_status_does(
    tmp_path: Path, sink: Sink, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TEST_ADMIN_TOKEN", "t0ken-secret")
    config = relay_config(
        tmp_path, sink.port, admin={"token_env": "TEST_ADMIN_TOKEN"}, preflight={"on_start": False}
    )
    async with running(config) as relay:
        port = relay.admin.port
        assert (await http_get(port, "/"))[0] == 401
        code, body = await http(port, "GET", "/", "t0ken-secret")
    assert code == 200
    assert b'data-ip="127.0.0.2"' in body and b"t0ken" not in body


# -- the pure function, with what other parts add to the status ----------------------------

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC).isoformat()


def ip_entry(address: str, **over: Any) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "address": address,
        "helo": "mta.example.test",
        "state": "warming",
        "role": "warming",
        "warmup_day": 4,
        "schedule_days": 30,
        "cap": 200,
        "cap_now": 100,
        "sent": 42,
        "up": True,
        "paused_since": None,
        "completed": False,
        "suspended": {},
    }
    return {**entry, **over}


def test_render_roles_suspensions_preflight_queue_and_reasons() -> None:
    page = statuspage.render(
        {
            "version": "9.9",
            "time": NOW,
            "ips": [
                ip_entry(
                    "10.0.0.1",
                    suspended={
                        "gmail": {"until": "2026-03-01T13:30:00+00:00", "reason": "421 4.7.28 <u>"}
                    },
                ),
                ip_entry("10.0.0.2", role="paused", state="paused", paused_since="2026-02-27"),
                ip_entry("10.0.0.3", role="completed", state="warm", cap=None, completed=True),
                ip_entry("10.0.0.4", role="not_started", state="not_started", warmup_day=-2),
                ip_entry("10.0.0.5", role="pool", warmup_day=None, cap=None, sent=None, up=False),
            ],
            "counters": {"backend": "sqlite", "up": False},
            "spool": {"messages": 1, "ready": 1, "deferred": 0},
            "queue": {
                "messages": 7,
                "recipients": 9,
                "states": {"active": 3, "deferred": 4},
                "oldest_age_s": 4000.0,
                "buckets": ["<5m", ">=5m"],
                "total": [2, 7],
                "domains": [
                    {"domain": "gmail.com", "total": 6, "buckets": [1, 5]},
                    {"domain": "<evil>.test", "total": 3, "buckets": [1, 2]},
                ],
            },
            "reasons": {
                "gmail": {
                    "deferred": {
                        "time": NOW,
                        "reply": "451 4.7.650 <img src=x onerror=alert(1)>",
                        "ip": "10.0.0.1",
                        "queue_id": "Q1",
                    },
                    "bounced": {"time": NOW, "reply": "550 5.1.1 no such user", "ip": "10.0.0.3"},
                }
            },
            "preflight": {
                "ok": False,
                "finished": NOW,
                "counts": {"pass": 1, "fail": 1, "unknown": 0},
                "checks": [
                    {"subject": "10.0.0.1", "check": "ptr", "result": "fail", "reason": "no PTR"},
                    {"subject": "example.test", "check": "dmarc", "result": "pass", "reason": "p="},
                ],
                "paused": [],
            },
        }
    ).decode()
    dom = parse(page)
    assert dom.roles == {
        "10.0.0.1": "warming",
        "10.0.0.2": "paused",
        "10.0.0.3": "completed",
        "10.0.0.4": "not_started",
        "10.0.0.5": "pool",
    }
    assert dom.page_fields["queue-messages"] == "7"  # the queue summary wins over the spool
    assert dom.page_fields["queue-oldest"] == "67 min"
    assert '<tr data-domain="gmail.com"><td>gmail.com</td><td class="n">6</td>' in page
    assert "<u>" not in page and "421 4.7.28 &lt;u&gt;" in page
    assert "(in 1 h 30 min)" in page  # the suspension's end, relative to the status time
    assert "&lt;evil&gt;.test" in page and "gmail.com" in page
    assert "<img" not in page and "&lt;img src=x onerror=alert(1)&gt;" in page
    assert "550 5.1.1 no such user" in page
    assert "Paused since" in page and "2026-02-27" in page
    assert "Warmup starts in <b>3</b> days" in page
    assert "no PTR" in page and "example.test" in page
    assert "DOWN" in page  # the counters store
