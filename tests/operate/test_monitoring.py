"""Shipped monitoring: the Prometheus alert rules (and their promtool unit tests), the Grafana
dashboard, and the metrics they rely on, read from a real relay's /metrics after real traffic.

promtool comes from the ``prometheus`` package (Debian/Ubuntu). Without it these tests are
skipped on a workstation; under CI (env CI set) its absence fails them.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiosmtpd.smtp import Envelope
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample
from support.polling import eventually
from support.relay import http_get, relay_config, relay_doc, running, send
from support.sink import Sink

from warmrelay.app import Relay
from warmrelay.config import parse_config

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
ALERTS_TEST = DEPLOY / "prometheus" / "alerts_test.yml"
DASHBOARD = DEPLOY / "grafana" / "warmrelay.json"

MakeSink = Callable[..., Awaitable[Sink]]

# a metric name in PromQL; "up" is Prometheus's own (the scrape succeeded)
METRIC = re.compile(r"\bwarmrelay_[a-z0-9_]+\b")


def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("promtool is missing: apt-get install -y prometheus")
        pytest.skip("promtool is not installed (apt-get install prometheus)")
    return found


def run_promtool(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [promtool(), *args], cwd=cwd, capture_output=True, text=True, timeout=120, check=False
    )


def alert_rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(ALERTS.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"] if "alert" in rule]


def dashboard() -> dict[str, Any]:
    result: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return result


def panels(board: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in board["panels"]:
        yield panel
        yield from panel.get("panels", [])  # inside a collapsed row


def dashboard_exprs(board: dict[str, Any]) -> list[str]:
    exprs = [t["expr"] for p in panels(board) for t in p.get("targets", [])]
    exprs += [
        v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
        for v in board["templating"]["list"]
        if v["type"] == "query"
    ]
    return exprs


def as_promql(expr: str) -> str:
    """A dashboard expression with Grafana's variables filled in, as Prometheus would get it."""
    expr = expr.replace("$__rate_interval", "5m").replace("$__interval", "1m")
    return re.sub(r"\$\{?(instance|ip)\}?", ".*", expr)


# -- (a) alert rules -----------------------------------------------------------------------


def test_alert_rules_pass_promtool_check_and_their_unit_tests() -> None:
    checked = run_promtool("check", "rules", ALERTS.name, cwd=ALERTS.parent)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in checked.stdout
    tested = run_promtool("test", "rules", ALERTS_TEST.name, cwd=ALERTS.parent)
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "SUCCESS" in tested.stdout


def test_each_alert_is_unit_tested_firing_and_quiet_when_healthy() -> None:
    names = {rule["alert"] for rule in alert_rules()}
    tests = yaml.safe_load(ALERTS_TEST.read_text())["tests"]
    assert tests
    fired = {
        case["alertname"] for t in tests for case in t["alert_rule_test"] if case["exp_alerts"]
    }
    assert fired == names  # every alert is shown to fire, and only alerts that exist
    healthy = [t for t in tests if t["name"].startswith("healthy")]
    assert len(healthy) == 1
    quiet = {c["alertname"] for c in healthy[0]["alert_rule_test"] if c["exp_alerts"] == []}
    assert quiet == names


def test_alerts_carry_severity_and_name_what_is_wrong() -> None:
    rules = alert_rules()
    assert {r["alert"] for r in rules} >= {
        "WarmrelayDown",
        "WarmrelayWarmingIPSuspended",
        "WarmrelayIPBlocked",
        "WarmrelayIPNotBindable",
        "WarmrelayCountersDown",
        "WarmrelaySpoolNotWritable",
        "WarmrelayQueueOldMessage",
        "WarmrelayBounceRateHigh",
        "WarmrelayDeferralRateHigh",
        "WarmrelayWarmupStalled",
        "WarmrelayWarmupPaused",
        "WarmrelayWarmupSteppedBack",
    }
    for rule in rules:
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
        assert set(rule["annotations"]) == {"summary", "description"}, rule["alert"]
        if "ip" in rule["expr"] or "warmrelay_warmup" in rule["expr"]:
            text = rule["annotations"]["summary"] + rule["annotations"]["description"]
            assert "$labels.ip" in text, rule["alert"]
        # an alert per provider (not one that only selects provider="", the IP's series)
        if re.search(r'provider(?!="")', rule["expr"]) or "warmrelay_suspended" in rule["expr"]:
            assert "$labels.provider" in rule["annotations"]["summary"], rule["alert"]


# -- (c) the dashboard -----------------------------------------------------------------------


def test_dashboard_is_valid_and_every_panel_queries_the_datasource_variable() -> None:
    board = dashboard()
    assert board["schemaVersion"] >= 38
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    ip = variables["ip"]
    assert ip["type"] == "query" and ip["query"]["query"].startswith("label_values(")
    assert ip["query"]["query"].rstrip().endswith(", ip)")
    ids = [p["id"] for p in panels(board)]
    assert len(ids) == len(set(ids))
    shown = [p for p in panels(board) if p["type"] != "row"]
    assert len(shown) >= 10
    for panel in shown:
        assert panel["targets"], panel["title"]
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        for target in panel["targets"]:
            assert target["expr"].strip(), panel["title"]
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]
    exprs = " ".join(dashboard_exprs(board))
    for wanted in (
        "warmrelay_warmup_sent",
        "warmrelay_warmup_cap",
        "warmrelay_warmup_day",
        "warmrelay_deliveries_total",
        "warmrelay_throttled_total",
        "warmrelay_blocked_total",
        "warmrelay_spool_messages",
        "warmrelay_queue_oldest_age_seconds",
        "histogram_quantile(0.5, sum by (le) (rate(warmrelay_delivery_latency_seconds_bucket",
        "histogram_quantile(0.99, sum by (le) (rate(warmrelay_delivery_latency_seconds_bucket",
        "warmrelay_counters_up",
        "warmrelay_spool_writable",
    ):
        assert wanted in exprs, wanted


def test_dashboard_expressions_are_promql(tmp_path: Path) -> None:
    """Each query, variables filled in, parses (promtool checks it as a recording rule)."""
    exprs = dashboard_exprs(dashboard())
    rules = [
        {"record": f"dashboard:query_{n}", "expr": as_promql(e)}
        for n, e in enumerate(exprs)
        if not e.startswith("label_values(")
    ]
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    checked = run_promtool("check", "rules", path.name, cwd=tmp_path)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"SUCCESS: {len(rules)} rules found" in checked.stdout


# -- (b) the metrics they use, from a real relay ------------------------------------------------

THROTTLE = "421 4.7.28 [127.0.0.2] Our system has detected an unusual rate of unsolicited mail"
BLOCK = "550 5.7.606 Access denied, banned sending IP [127.0.0.2]"


async def provider_sink(make_sink: MakeSink) -> Sink:
    """Gmail throttles the warming IP, Microsoft blocks it, nobody@ does not exist, and the
    first attempt to later@ is deferred."""
    deferred: set[str] = set()

    def rcpt_reply(peer: str, rcpt: str) -> str | None:
        if rcpt.startswith("nobody@"):
            return "550 5.1.1 <nobody@example.test>: no such user"
        if rcpt.startswith("later@") and rcpt not in deferred:
            deferred.add(rcpt)
            return "451 4.3.0 mailbox busy, try again later"
        return None

    def data_reply(peer: str, envelope: Envelope) -> str | None:
        if peer == "127.0.0.2" and envelope.rcpt_tos[0].endswith("@gmail.com"):
            return THROTTLE
        if peer == "127.0.0.2" and envelope.rcpt_tos[0].endswith("@outlook.com"):
            return BLOCK
        return None

    return await make_sink(rcpt_reply=rcpt_reply, data_reply=data_reply)


async def scrape(relay: Relay) -> list[Sample]:
    code, body = await http_get(relay.admin.port, "/metrics")
    assert code == 200
    return [s for f in text_string_to_metric_families(body.decode()) for s in f.samples]


def value(samples: list[Sample], name: str, **labels: str) -> float:
    """The sum of the samples of that name whose labels include ``labels``."""
    return sum(
        s.value
        for s in samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )


def series(samples: list[Sample], name: str, **labels: str) -> list[Sample]:
    return [
        s
        for s in samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    ]


async def test_every_metric_the_dashboard_and_alerts_use_is_scraped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, make_sink: MakeSink
) -> None:
    caplog.set_level(logging.INFO, logger="warmrelay.delivery")
    sink = await provider_sink(make_sink)
    doc = relay_doc(tmp_path, sink.port, smtp={"allow_networks": ["127.0.0.1/32"]})
    yesterday = datetime.now(UTC).date() - timedelta(days=1)  # a day for the controller
    doc["ips"][0]["warmup"] = {"start": str(yesterday), "schedule": [10] * 30}
    doc["ips"][0]["warmup"]["progress"] = "reputation"
    async with running(parse_config(doc)) as relay:
        for rcpt in (
            "first@gmail.com",
            "second@outlook.com",
            "ok@example.test",
            "nobody@example.test",
            "later@example.test",
        ):
            await send(relay, [rcpt])
        with pytest.raises(Exception, match="Relaying denied"):  # counted as refused
            await send(relay, ["x@example.test"], source="127.0.0.9")

        def arrived() -> set[str]:
            return {r for m in sink.messages for r in m.rcpts}

        wanted = {
            "first@gmail.com",
            "second@outlook.com",
            "ok@example.test",
            "later@example.test",
            "app@sender.test",  # the DSN for nobody@
        }
        await sink.wait_until(lambda: wanted <= arrived())
        samples = await scrape(relay)
        reasons = relay.recorder.latest_reasons()

    names = {s.name for s in samples}
    used: set[str] = set()
    for rule in alert_rules():
        used |= set(METRIC.findall(rule["expr"]))
    for expr in dashboard_exprs(dashboard()):
        used |= set(METRIC.findall(expr))
    assert len(used) >= 20
    assert sorted(used - names) == []

    # hygiene: no _created series, no negative sentinel, no NaN on a single process
    assert [s.name for s in samples if s.name.endswith("_created")] == []
    assert [s for s in samples if not s.value >= 0] == []
    assert series(samples, "warmrelay_build_info")[0].labels["version"]
    assert value(samples, "warmrelay_config_last_reload_successful") == 1
    assert value(samples, "warmrelay_config_last_reload_success_timestamp_seconds") > 1.7e9

    # progress: reputation: yesterday judged (advance) for every pair, the other actions'
    # series at 0 (an alert's increase() sees the first pause), each pair's own day
    decisions = "warmrelay_warmup_decisions_total"
    for pair in ("gmail", "microsoft", "other"):
        assert value(samples, decisions, ip="127.0.0.2", provider=pair, action="advance") == 1
        assert value(samples, decisions, ip="127.0.0.2", provider=pair, action="pause") == 0
        assert value(samples, "warmrelay_warmup_day", ip="127.0.0.2", provider=pair) == 2
    assert value(samples, "warmrelay_warmup_day", ip="127.0.0.2", provider="") == 2

    # outcomes per provider add up to the per-IP contract metric
    warming = {"ip": "127.0.0.2"}
    provider = "warmrelay_provider_deliveries_total"
    assert value(samples, provider, **warming, provider="gmail", outcome="deferred") == 1
    assert value(samples, provider, **warming, provider="microsoft", outcome="deferred") == 1
    assert value(samples, provider, **warming, provider="other", outcome="deferred") == 1
    assert value(samples, provider, **warming, provider="other", outcome="bounced") == 1
    for ip in ("127.0.0.2", "127.0.0.3"):
        for outcome in ("delivered", "deferred", "bounced"):
            total = value(samples, "warmrelay_deliveries_total", ip=ip, outcome=outcome)
            assert value(samples, provider, ip=ip, outcome=outcome) == total

    # one latency observation per delivered recipient; one attempt per transaction, by outcome
    delivered = value(samples, "warmrelay_deliveries_total", outcome="delivered")
    assert delivered == 5
    assert value(samples, "warmrelay_delivery_latency_seconds_count") == delivered
    assert value(samples, "warmrelay_delivery_latency_seconds_bucket", le="+Inf") == delivered
    attempts = {
        s.labels["outcome"]
        for s in series(samples, "warmrelay_delivery_attempt_seconds_count")
        if s.value > 0
    }
    assert attempts == {"delivered", "deferred", "bounced", "throttled", "blocked"}

    # the latest deferral and bounce per provider, for the status page
    assert set(reasons) == {"gmail", "microsoft", "other"}
    gmail = reasons["gmail"]["deferred"]
    assert gmail["reply"] == THROTTLE and gmail["ip"] == "127.0.0.2"
    assert gmail["domain"] == "gmail.com" and gmail["retry_at"] is None  # rerouted at once
    assert reasons["microsoft"]["deferred"]["reply"] == BLOCK
    other = reasons["other"]
    assert other["deferred"]["reply"].startswith("451 4.3.0 mailbox busy")
    assert datetime.fromisoformat(other["deferred"]["retry_at"]) > datetime.fromisoformat(
        other["deferred"]["time"]
    )
    assert other["bounced"]["reply"].startswith("550 5.1.1")
    assert "bounced" not in reasons["gmail"]
    json.dumps(reasons)  # the status page serves it as is

    # a deferral's log line says when it is tried again
    lines = [r.getMessage() for r in caplog.records if " deferred (" in r.getMessage()]
    later = [m for m in lines if "to=<later@example.test>" in m]
    assert len(later) == 1
    assert re.search(r"; retry at \d{4}-\d\d-\d\dT\S+ \(in \d+s\)$", later[0]), later[0]
    gmail_line = next(m for m in lines if "to=<first@gmail.com>" in m)
    assert gmail_line.endswith("; retry now")


async def test_oldest_queued_message_age(tmp_path: Path, make_sink: MakeSink) -> None:
    accept = [False]
    sink = await make_sink(rcpt_reply=lambda peer, rcpt: None if accept[0] else "451 4.3.0 later")
    ahead = [timedelta(0)]

    def clock() -> datetime:
        return datetime.now(UTC) + ahead[0]

    config = relay_config(tmp_path, sink.port)
    async with running(config, clock=clock) as relay:
        assert value(await scrape(relay), "warmrelay_queue_oldest_age_seconds") == 0
        await send(relay, ["stuck@example.test"])
        ahead[0] = timedelta(hours=2)  # the relay's clock: two hours after the 250
        age = value(await scrape(relay), "warmrelay_queue_oldest_age_seconds")
        assert 7200 <= age < 7200 + 60
        accept[0] = True
        await sink.wait_for(1)
        await eventually(lambda: relay.spool_size() == 0, timeout_s=30)
        assert value(await scrape(relay), "warmrelay_queue_oldest_age_seconds") == 0


async def test_warm_ip_has_no_cap_series(tmp_path: Path, sink: Sink) -> None:
    """While warming the cap is a number; once warm there is no cap and no series (not -1)."""
    ahead = [timedelta(0)]

    def clock() -> datetime:
        return datetime.now(UTC) + ahead[0]

    today = datetime.now(UTC).date()
    doc = relay_doc(tmp_path, sink.port)
    doc["ips"][0]["warmup"] = {"start": str(today - timedelta(days=1)), "schedule": [10, 20]}
    async with running(parse_config(doc), clock=clock) as relay:
        samples = await scrape(relay)
        assert value(samples, "warmrelay_warmup_cap", ip="127.0.0.2") == 20
        assert value(samples, "warmrelay_warmup_day", ip="127.0.0.2") == 2
        ahead[0] = timedelta(days=1)  # day 3: past the schedule, warm
        samples = await scrape(relay)
        assert series(samples, "warmrelay_warmup_cap", ip="127.0.0.2") == []
        assert value(samples, "warmrelay_warmup_day", ip="127.0.0.2") == 3
        assert [s.value for s in samples if s.name.startswith("warmrelay_warmup")] != []
        assert all(s.value >= 0 for s in samples)


async def test_reload_outcome_and_time_are_metrics(tmp_path: Path, sink: Sink) -> None:
    path = tmp_path / "relay.yml"
    doc = relay_doc(tmp_path, sink.port)
    path.write_text(yaml.safe_dump(doc))
    async with running(parse_config(doc)) as relay:
        started = value(
            await scrape(relay), "warmrelay_config_last_reload_success_timestamp_seconds"
        )
        assert value(await scrape(relay), "warmrelay_config_last_reload_successful") == 1
        path.write_text(yaml.safe_dump({**doc, "overflow": "nowhere"}))
        assert await relay.reload(path) is False
        samples = await scrape(relay)
        assert value(samples, "warmrelay_config_last_reload_successful") == 0
        ts = "warmrelay_config_last_reload_success_timestamp_seconds"
        assert value(samples, ts) == started  # the configuration in force is the old one
        path.write_text(yaml.safe_dump(doc))
        assert await relay.reload(path) is True
        samples = await scrape(relay)
        assert value(samples, "warmrelay_config_last_reload_successful") == 1
        assert value(samples, ts) > started


def test_no_created_series_from_worker_processes(tmp_path: Path) -> None:
    """serve --workers: the supervisor merges the workers' files; no _created there either."""
    script = (
        "from warmrelay.operate.metrics import Metrics, render_all_processes\n"
        "m = Metrics()\n"
        "m.deliveries.labels('192.0.2.1', 'delivered').inc()\n"
        "m.delivery_latency.labels('192.0.2.1').observe(1.5)\n"
        "m.attempt_seconds.labels('delivered').observe(0.2)\n"
        "m.warmup_cap.labels('192.0.2.1').set(50)\n"
        "m.drop(m.warmup_cap, '192.0.2.1')\n"
        "import sys; sys.stdout.write(render_all_processes(sys.argv[1]).decode())\n"
    )
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    samples = [s for f in text_string_to_metric_families(done.stdout) for s in f.samples]
    names = {s.name for s in samples}
    assert "warmrelay_delivery_latency_seconds_bucket" in names
    assert "warmrelay_deliveries_total" in names
    assert [n for n in names if n.endswith("_created")] == []
    (cap,) = series(samples, "warmrelay_warmup_cap")  # cannot be deleted from the files:
    assert cap.value != cap.value  # NaN, which no rule or panel compares as a number
    assert value(samples, "warmrelay_build_info") == 1
