"""The status page at GET /: loaded in a real browser (headless Chromium), over plain HTTP
(escaping, the token rule), and rendered from status dicts the relay does not produce yet.
The example configuration's page is measured in the browser (layout), and its numbers of
today (cap reached, overflow, the pool's traffic) are checked against /metrics."""

from __future__ import annotations

import asyncio
import html
import json
import os
import re
import shutil
from collections.abc import Awaitable, Callable
from datetime import UTC, date, datetime, timedelta
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest
import yaml
from aiosmtpd.smtp import Envelope
from support.relay import http, http_get, relay_config, running, send, status
from support.relayproc import RelayProcess
from support.sink import Sink

from warmrelay.config import parse_config
from warmrelay.operate import statuspage
from warmrelay.operate.tally import DayTally, TallySnapshot, merge

ROOT = Path(__file__).resolve().parents[2]
WARMING = "127.0.0.2"
POOL = "127.0.0.3"
VOID = {"meta", "link", "br", "hr", "img", "input", "wbr", "source", "col", "area", "base"}
BROWSER_S = 120  # one headless Chromium run, at most

StartRelay = Callable[..., Awaitable[RelayProcess]]
MakeSink = Callable[..., Awaitable[Sink]]


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


async def browser_dom(url: str, profile: Path, width: int = 1280) -> str:
    """The DOM headless Chromium built from ``url`` (a real browser, in a subprocess, so the
    relay in this test's loop keeps serving meanwhile), in a window ``width`` px wide."""
    proc = await asyncio.create_subprocess_exec(
        chromium(),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--no-first-run",
        f"--user-data-dir={profile}",
        f"--window-size={width},900",
        "--dump-dom",
        url,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), BROWSER_S)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
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
    assert warming["cap_now"] == warming["cap"]  # no sending_hours: nothing to release
    assert "cap_now" not in dom.ips[WARMING] and "provider-cap_now" not in dom.ips[WARMING]
    assert dom.text(WARMING, "sent") == "5"
    assert dom.text(WARMING, "helo") == "mta1.example.test"
    progress = dom.ips[WARMING]["progress"][0][1]
    assert (progress["value"], progress["max"]) == (str(warming["warmup_day"]), "3650")
    assert dom.text(WARMING, "provider-cap") == str(warming["providers"]["gmail"]["cap"]) == "5"
    assert dom.text(WARMING, "provider-sent") == "2"
    assert "sent" not in dom.ips["127.0.0.3"]  # a pool IP has no cap to count against
    assert dom.text(WARMING, "overflow") == "0"
    assert dom.text("127.0.0.3", "routed") == "0"  # the traffic it carried today: none
    assert dom.page_fields["queue-messages"] == str(st["spool"]["messages"])


def throttles_with_markup(peer: str, envelope: Envelope) -> str | None:
    if peer == WARMING and envelope.rcpt_tos[0].endswith("@brand.test"):
        return '421 4.7.28 <script>alert("x")</script> & unusual rate from your IP'
    return None


async def test_page_escapes_what_receivers_say(tmp_path: Path, make_sink: MakeSink) -> None:
    sink = await make_sink(data_reply=throttles_with_markup)
    config = relay_config(tmp_path, sink.port, preflight={"on_start": False})
    async with running(config) as relay:
        await send(relay, ["someone@brand.test"])
        (rerouted,) = await sink.wait_for(1)
        assert rerouted.peer == "127.0.0.3"  # throttled at the warming IP, sent from the pool
        st = await status(relay)
        reason = st["ips"][0]["suspended"]["brand.test"]["reason"]
        assert "<script>" in reason  # the raw text reached the status: the page must escape
        code, body = await http_get(relay.admin.port, "/")
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


# -- the example configuration: layout in a browser, and the numbers of today --------------

# Run in the page by the test (the page itself has no script): the geometry of what matters
# for layout, written into a <pre> that --dump-dom prints.
GEOMETRY_JS = """
(() => {
  const box = (el) => {
    const r = el.getBoundingClientRect();
    return {left: r.left, right: r.right, top: r.top, bottom: r.bottom, width: r.width};
  };
  const out = {height: document.documentElement.scrollHeight, cells: [], boxes: []};
  for (const c of document.querySelectorAll("td, th")) {
    const text = c.textContent.trim();
    if (text) {
      const r = c.getBoundingClientRect();
      const line = parseFloat(getComputedStyle(c).lineHeight) || 20;
      out.cells.push({text: text.slice(0, 60), width: r.width, lines: r.height / line});
    }
  }
  for (const el of document.querySelectorAll(".card, section.wide, .shared")) {
    let right = el.getBoundingClientRect().right;
    for (const inner of el.querySelectorAll("*")) {
      const scroller = inner.parentElement.closest(".scroll");
      if (scroller && el.contains(scroller)) continue;  // scrolls inside its own box
      right = Math.max(right, inner.getBoundingClientRect().right);
    }
    out.boxes.push({
      name: el.id || el.className, card: el.classList.contains("card"),
      scrollWidth: el.scrollWidth, clientWidth: el.clientWidth, contentRight: right, ...box(el),
    });
  }
  out.grid = box(document.querySelector("section.ips"));
  const pre = document.createElement("pre");
  pre.id = "geometry";
  pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
})();
"""


def example_doc(tmp_path: Path, sink_port: int) -> dict[str, Any]:
    """config.example.yaml as shipped, with its ports, state and next hop moved for a test."""
    doc: dict[str, Any] = yaml.safe_load((ROOT / "config.example.yaml").read_text())
    doc["smtp"]["listen"] = ["127.0.0.1:0"]
    doc["admin"]["listen"] = "127.0.0.1:0"
    doc["state"]["dir"] = str(tmp_path / "var")
    doc["routes"] = {"*": f"127.0.0.1:{sink_port}"}
    return doc


async def geometry(page: bytes, tmp_path: Path, width: int) -> dict[str, Any]:
    """Where Chromium puts the page's tables, cards and sections in a window ``width`` wide."""
    html_file = tmp_path / f"measured-{width}.html"
    script = f"<script>{GEOMETRY_JS}</script></body>".encode()
    html_file.write_bytes(page.replace(b"</body>", script))
    dom = await browser_dom(html_file.as_uri(), tmp_path / "profile", width)
    found = re.search(r'<pre id="geometry">(.*?)</pre>', dom, re.S)
    assert found, dom[-2000:]
    result: dict[str, Any] = json.loads(html.unescape(found.group(1)))
    return result


def page_text(page: str) -> str:
    """What a reader sees: the text outside tags, style and title."""

    class Text(HTMLParser):
        def __init__(self) -> None:
            super().__init__()
            self.parts: list[str] = []
            self.skip = 0

        def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
            self.skip += tag in ("style", "title")

        def handle_endtag(self, tag: str) -> None:
            self.skip -= tag in ("style", "title")

        def handle_data(self, data: str) -> None:
            if not self.skip:
                self.parts.append(data)

    parser = Text()
    parser.feed(page)
    return " ".join(parser.parts)


def routed_metric(metrics: str) -> dict[tuple[str, str], float]:
    """warmrelay_routed_total by (ip, reason)."""
    pattern = r'^warmrelay_routed_total\{ip="([^"]+)",reason="([^"]+)"\} (\S+)$'
    return {(ip, r): float(v) for ip, r, v in re.findall(pattern, metrics, re.M)}


async def overflowing_traffic(smtp_port: int, sink: Sink, sessions: bool = False) -> None:
    """58 recipients at a domain of no known provider: the example's day-1 cap is 50, so 8
    overflow to the pool. ``sessions``: one session per recipient (spread over workers)."""
    rcpts = [f"user{n}@example.org" for n in range(58)]
    batches = [[r] for r in rcpts] if sessions else [rcpts[i : i + 10] for i in range(0, 58, 10)]
    for batch in batches:
        client = aiosmtplib.SMTP(hostname="127.0.0.1", port=smtp_port)
        async with client:
            body = f"From: <app@sender.test>\r\nTo: <{batch[0]}>\r\nSubject: hi\r\n\r\nhi\r\n"
            await client.sendmail("app@sender.test", batch, body.encode())
    await sink.wait_until(lambda: sum(sink.by_peer().values()) >= 58, 60)


async def test_the_example_page_fits_a_browser_window(tmp_path: Path, sink: Sink) -> None:
    """With config.example.yaml (two IPs, preflight on loopback addresses) the page is read
    at 1280 px and at 700 px: no squeezed table column, nothing running out of its card
    into the next one, the IPs side by side using the width, the page not a scroll marathon,
    and the reason every loopback check shares ("not a public address") said once."""
    chromium()
    config = parse_config(example_doc(tmp_path, sink.port))
    async with running(config) as relay:
        await overflowing_traffic(relay.smtp_ports[0], sink)
        await relay.preflight.report()  # the results shown with each IP
        code, page = await http_get(relay.admin.port, "/")
    assert code == 200
    for width in (1280, 700):
        geo = await geometry(page, tmp_path, width)
        for cell in geo["cells"]:
            assert cell["width"] >= 40, f"{width} px: a squeezed column: {cell}"
            assert cell["lines"] <= 4, f"{width} px: a cell wrapped into a tower: {cell}"
        for b in geo["boxes"]:
            assert b["scrollWidth"] <= b["clientWidth"], f"{width} px: content overflows {b}"
            assert b["contentRight"] <= b["right"] + 0.5, f"{width} px: runs out of {b}"
        cards = [b for b in geo["boxes"] if b["card"]]
        assert len(cards) == 2
        a, b = cards
        apart = a["right"] <= b["left"] or b["right"] <= a["left"]
        assert apart or a["bottom"] <= b["top"] or b["bottom"] <= a["top"], "cards overlap"
        if width == 1280:
            assert geo["height"] < 1500, f"two IPs make a page {geo['height']} px tall"
            grid = geo["grid"]
            assert {round(c["top"]) for c in cards} == {round(cards[0]["top"])}, "side by side"
            used = max(c["right"] for c in cards) - min(c["left"] for c in cards)
            assert used >= 0.95 * grid["width"], f"the IPs use {used} of {grid['width']} px"
    text = page_text(page.decode())
    assert text.count("not a public address") == 1, "one note for every IP, not one per check"


async def test_the_page_says_when_the_cap_was_reached_and_where_mail_went(
    tmp_path: Path, sink: Sink
) -> None:
    """The example's warming IP reaches its cap (50 on day 1) and 8 recipients overflow to
    the pool: /status and the page say so (the cap reached, and when; the overflow; the
    pool's traffic of today), with the numbers /metrics counted and the receiver saw."""
    config = parse_config(example_doc(tmp_path, sink.port))
    before = datetime.now(UTC)
    async with running(config) as relay:
        await overflowing_traffic(relay.smtp_ports[0], sink)
        st = await status(relay)
        code, page = await http_get(relay.admin.port, "/")
        metrics = routed_metric((await http_get(relay.admin.port, "/metrics"))[1].decode())
    assert sink.by_peer() == {WARMING: 50, POOL: 8}
    assert metrics == {(WARMING, "warmup"): 50.0, (POOL, "overflow"): 8.0}

    ips = {ip["address"]: ip for ip in st["ips"]}
    warming, pool = ips[WARMING], ips[POOL]
    assert (warming["cap"], warming["sent"], warming["cap_reached"]) == (50, 50, True)
    reached = datetime.fromisoformat(warming["cap_reached_at"])
    assert before <= reached <= datetime.fromisoformat(st["time"])
    assert warming["overflow_today"] == metrics[(POOL, "overflow")] == 8
    assert warming["overflow_today_reasons"] == {"cap": 8}
    assert warming["routed_today"] == {"warmup": 50}
    assert warming["provider_caps_reached_at"] == {"gmail": None, "microsoft": None}
    assert pool["routed_today"] == {"overflow": 8}
    assert pool["overflow_today"] is None and pool["cap_reached"] is False  # no cap to reach
    assert st["today"]["date"] == reached.date().isoformat()  # UTC, as the example says
    assert st["today"]["counted_since"] is not None  # started today: says since when

    assert code == 200
    dom = parse(page.decode())
    assert dom.ips[WARMING]["cap-reached"][0][1]["data-at"] == warming["cap_reached_at"]
    assert dom.text(WARMING, "overflow") == "8"
    assert dom.text(WARMING, "overflow-cap") == "8"
    assert dom.text(POOL, "routed") == "8"
    assert dom.text(POOL, "routed-overflow") == "8"
    assert "cap reached" in page_text(page.decode())
    assert "count since" in page_text(page.decode())  # this process only saw part of today


async def test_the_supervisor_adds_up_its_workers_numbers_of_today(
    tmp_path: Path, sink: Sink, relay_process: StartRelay
) -> None:
    """`serve --workers 2`: each worker routes (and counts) part of the traffic; the
    supervisor's /status adds their tallies up to what the merged /metrics say."""
    relay = await relay_process(example_doc(tmp_path, sink.port), "--workers", "2")
    await overflowing_traffic(relay.smtp_port, sink, sessions=True)
    code, body = await http_get(relay.admin_port, "/status")
    metrics = routed_metric((await http_get(relay.admin_port, "/metrics"))[1].decode())
    deliveries = [line for line in relay.log if " to=<" in line and "delivered" in line]
    assert await relay.terminate() == 0
    assert {line[:4] for line in deliveries} == {"[w0]", "[w1]"}, "one worker took it all"
    assert code == 200
    st = json.loads(body)
    ips = {ip["address"]: ip for ip in st["ips"]}
    assert sink.by_peer() == {WARMING: 50, POOL: 8}
    assert metrics == {(WARMING, "warmup"): 50.0, (POOL, "overflow"): 8.0}
    assert ips[WARMING]["overflow_today"] == 8 and ips[WARMING]["cap_reached_at"]
    assert ips[WARMING]["routed_today"] == {"warmup": 50}
    assert ips[POOL]["routed_today"] == {"overflow": 8}


# -- today's tally and what the page makes of it --------------------------------------------


def test_the_tally_starts_again_each_day_and_workers_add_up() -> None:
    zone = UTC
    started = datetime(2026, 3, 1, 8, 0, tzinfo=UTC)
    tally = DayTally(started)
    noon = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
    cap = [("10.0.0.1", "cap", None)]
    tally.count("10.0.0.1", "warmup", 5, [], noon, zone)
    tally.count("10.0.0.9", "overflow", 3, cap, noon, zone)
    tally.count("10.0.0.9", "overflow", 2, cap, noon + timedelta(hours=1), zone)
    tally.count("10.0.0.9", "overflow", 1, [("10.0.0.1", "provider cap", "gmail")], noon, zone)
    tally.count("10.0.0.9", "pool", 4, [("10.0.0.1", "paused", None)], noon, zone)  # no overflow
    today = tally.snapshot(noon.date())
    assert today.routed == {"10.0.0.1": {"warmup": 5}, "10.0.0.9": {"overflow": 6, "pool": 4}}
    assert today.overflow == {"10.0.0.1": {"cap": 5, "provider cap": 1}}
    assert today.cap_reached == {("10.0.0.1", ""): noon, ("10.0.0.1", "gmail"): noon}
    assert today.counted_since(zone) == started  # started today: since then
    assert tally.snapshot(date(2026, 3, 2)).routed == {}  # nothing yet tomorrow
    assert tally.snapshot(noon.date()).routed  # ... and asking did not forget today
    tomorrow = noon + timedelta(days=1)
    tally.count("10.0.0.1", "warmup", 1, [], tomorrow, zone)
    later = tally.snapshot(tomorrow.date())
    assert later.routed == {"10.0.0.1": {"warmup": 1}} and later.cap_reached == {}
    assert later.counted_since(zone) is None  # running since yesterday: the whole day

    worker = TallySnapshot.from_json(json.loads(json.dumps(today.to_json())))
    assert worker == today
    other = DayTally(started + timedelta(hours=2))
    other.count("10.0.0.9", "overflow", 7, [("10.0.0.1", "cap", None)], noon - timedelta(1), zone)
    other.count("10.0.0.9", "overflow", 7, cap, noon - timedelta(hours=1), zone)
    both = merge([worker, other.snapshot(noon.date())], noon.date(), started)
    assert both.overflow["10.0.0.1"] == {"cap": 12, "provider cap": 1}
    assert both.cap_reached[("10.0.0.1", "")] == noon - timedelta(hours=1)  # the earliest
    assert both.started == started + timedelta(hours=2)  # counts only since the latest start


def test_render_cap_reached_released_and_overflow() -> None:
    """ "Released so far" only where smoothing holds back part of the cap; "cap reached"
    when the count says so, with or without the moment; the pool's traffic of today."""
    at = "2026-03-01T10:42:07+00:00"
    page = statuspage.render(
        {
            "time": NOW,
            "today": {"date": "2026-03-01", "counted_since": "2026-03-01T09:00:00+00:00"},
            "ips": [
                ip_entry(
                    "10.0.0.1",
                    cap=200,
                    cap_now=200,
                    sent=200,
                    cap_reached=True,
                    cap_reached_at=at,
                    overflow_today=12,
                    overflow_today_reasons={"cap": 9, "provider cap": 3},
                    routed_today={"warmup": 200},
                    providers={
                        "gmail": {"cap": 60, "cap_now": 60, "sent": 60},
                        "yahoo": {"cap": 60, "cap_now": 60, "sent": 7},
                    },
                    provider_caps_reached_at={"gmail": "2026-03-01T09:30:00+00:00", "yahoo": None},
                ),
                ip_entry("10.0.0.2", cap=50, cap_now=50, sent=50, cap_reached=True),
                ip_entry("10.0.0.3", cap=200, cap_now=100, sent=42, overflow_today=0),
                ip_entry(
                    "10.0.0.5",
                    role="pool",
                    warmup_day=None,
                    cap=None,
                    sent=None,
                    routed_today={"overflow": 12, "pool": 30},
                ),
            ],
        }
    ).decode()
    dom = parse(page)
    assert "cap_now" not in dom.ips["10.0.0.1"]  # no smoothing: the cap is all released
    assert dom.text("10.0.0.3", "cap_now") == "100"
    assert dom.ips["10.0.0.1"]["cap-reached"][0][1]["data-at"] == at
    assert '<time datetime="2026-03-01T10:42:07+00:00">10:42:07 UTC</time>' in page
    assert dom.text("10.0.0.1", "overflow") == "12"
    gmail = page.index("<td>gmail</td>")
    assert "Cap first reached" in page and "09:30:00 UTC" in page[gmail : page.index("yahoo")]
    assert dom.text("10.0.0.1", "overflow-provider-cap") == "3"
    assert dom.ips["10.0.0.2"]["cap-reached"][0][1]["data-at"] == ""  # when: not known
    assert "when is not known" in page
    assert "cap-reached" not in dom.ips["10.0.0.3"]
    assert dom.text("10.0.0.5", "routed") == "42"
    assert dom.text("10.0.0.5", "routed-overflow") == "12"
    assert dom.text("10.0.0.5", "routed-pool") == "30"
    assert "count since" in page and "09:00:00 UTC" in page


def test_render_one_note_for_a_reason_several_ips_share() -> None:
    def check(ip: str, name: str, result: str, reason: str) -> dict[str, str]:
        return {"subject": ip, "check": name, "result": result, "reason": reason}

    local = "{} is not a public address: not looked up in public DNS"
    checks = [
        check(ip, name, "unknown", local.format(ip))
        for ip in ("10.0.0.1", "10.0.0.2")
        for name in ("ptr", "helo", "dnsbl:zen.spamhaus.org")
    ] + [check("10.0.0.2", "bind", "fail", "10.0.0.2 is not an address of this host")]
    page = statuspage.render(
        {
            "time": NOW,
            "ips": [ip_entry("10.0.0.1"), ip_entry("10.0.0.2")],
            "preflight": {"finished": NOW, "counts": {}, "checks": checks, "paused": []},
        }
    ).decode()
    text = page_text(page)
    assert text.count("not a public address") == 1
    assert "10.0.0.1 and 10.0.0.2" in text and "ptr, helo, dnsbl:zen.spamhaus.org" in text
    assert text.count("is not an address of this host") == 1  # one IP's own: in its card
    card = page[page.index('data-ip="10.0.0.2"') :]
    assert "10.0.0.2 is not an address of this host" in card


async def test_status_and_page_explain_each_providers_decision(tmp_path: Path, sink: Sink) -> None:
    """progress: reputation: /status and the page show per provider its day, its cap (its
    share applied), the last decision, its reason and the values it used."""
    from warmrelay.reputation.signals import FeedStore
    from warmrelay.warmup.counters import SqliteCounters

    today = datetime.now(UTC).date()
    doc = provider_doc()
    doc["ips"][0]["warmup"] = {
        "start": str(today - timedelta(days=4)),
        "schedule": [100, 200, 300, 400, 500, 600],
        "providers": {"gmail": {"share": 0.5}},
        "progress": "reputation",
    }
    config = relay_config(tmp_path, sink.port, **doc)
    counters = SqliteCounters(config.state.dir / "counters.sqlite3")
    try:  # what Postmaster said of yesterday, as the fetcher stores it
        await FeedStore(counters).put(
            WARMING, "gmail", today - timedelta(days=1), {"spam_rate": 0.0024}
        )
    finally:
        await counters.close()
    async with running(config) as relay:
        st = await status(relay)
        code, body = await http_get(relay.admin.port, "/")
    assert code == 200
    pairs = next(ip for ip in st["ips"] if ip["address"] == WARMING)["pairs"]
    gmail, microsoft = pairs["gmail"], pairs["microsoft"]
    # 3 healthy days (day 4), then yesterday's 0.24 %: back 2, to day 2
    assert (gmail["day"], gmail["cap"]) == (2, 100)  # day 2's 200, gmail's half
    assert gmail["last"]["action"] == "back 2"
    assert gmail["last"]["reason"] == "spam rate 0.24 % \u2265 0.2 %"
    assert gmail["last"]["values"] == {"spam_rate": 0.0024}
    assert (microsoft["day"], microsoft["cap"], microsoft["last"]["action"]) == (5, 500, "advance")
    dom = parse(body.decode())
    providers = [t for t, _ in dom.ips[WARMING]["pair-day"]]
    assert providers[:2] == ["2", "5"] or "2" in providers
    decisions = [t for t, _ in dom.ips[WARMING]["pair-decision"]]
    signals = [t for t, _ in dom.ips[WARMING]["pair-signals"]]
    assert "back 2: spam rate 0.24 % \u2265 0.2 %" in decisions
    assert "spam rate 0.24 %" in signals
