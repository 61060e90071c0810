"""``warmrelay simulate`` and the plan columns of ``warmrelay schedule``."""

from __future__ import annotations

import json
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

from support.cli import ROOT, warmrelay

from warmrelay.warmup.plan import PRESETS


def write_config(tmp_path: Path, warmup: str) -> Path:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        "ips:\n"
        f"  - {{address: 127.0.0.2, helo: a.example.test, warmup: {warmup}}}\n"
        "  - {address: 127.0.0.3, helo: b.example.test}\n"
    )
    return cfg


def test_simulate_sendgrid_completes_on_day_42_and_writes_a_chart(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, "{start: 2026-11-01, schedule: sendgrid}")
    chart = tmp_path / "plan.svg"
    result = warmrelay(
        "simulate",
        "-c",
        str(cfg),
        "--daily",
        "50000",
        "--mix",
        "gmail=0.4,microsoft=0.3",
        "--plot",
        str(chart),
    )
    assert result.returncode == 0, result.stderr
    assert "warmup completes on day 42 (2026-12-12)" in result.stdout
    rows = {
        line.split()[0]: line.split()
        for line in result.stdout.splitlines()
        if line.strip()[:1].isdigit()
    }
    day1 = rows["1"]
    assert day1[2:5] == ["1", "480", "480"]  # warmup day, cap, via warming
    assert day1[5] == "49,520"  # the rest via the pool
    assert rows["43"][2] == "warm"
    svg = chart.read_text()
    assert svg.startswith("<svg") and "via warming IPs" in svg and "<polyline" in svg


def test_simulate_rejects_a_bad_mix(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, "{start: 2026-11-01, schedule: [10]}")
    result = warmrelay("simulate", "-c", str(cfg), "--daily", "100", "--mix", "gmail=0.8,yahoo=0.5")
    assert result.returncode == 2
    assert "more than 1" in result.stderr


def test_schedule_shows_per_hour_and_provider_caps(tmp_path: Path) -> None:
    today = datetime.now(UTC).date()
    cfg = write_config(
        tmp_path,
        f"{{start: {today}, schedule: [120, 240], sending_hours: '08:00-20:00', "
        "providers: {gmail: {share: 0.25}}}",
    )
    result = warmrelay("schedule", "-c", str(cfg), "--days", "3")
    assert result.returncode == 0, result.stderr
    assert "per hour" in result.stdout and "gmail" in result.stdout
    assert "over 12 hours" in result.stdout
    tomorrow = (today + timedelta(days=1)).isoformat()
    line = next(x for x in result.stdout.splitlines() if tomorrow in x).split()
    assert line[-3:] == ["240", "20", "60"]


# -- simulate --signals: a file of daily signals replayed through the reputation controller

SCENARIO_CONFIG = ROOT / "deploy" / "scenarios" / "complaint-spike.yaml"
SCENARIO_SIGNALS = ROOT / "deploy" / "scenarios" / "complaint-spike.csv"
SCENARIO_CHART = ROOT / "deploy" / "complaint-spike.svg"
ROW_KEYS = {"date", "ip", "provider", "day", "cap", "action", "reason"}
SVG = "{http://www.w3.org/2000/svg}"


def replay_json(*args: str) -> list[dict[str, Any]]:
    result = warmrelay("simulate", *args, "--json")
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    assert isinstance(rows, list)
    return rows


def by_pair(rows: list[dict[str, Any]], provider: str) -> dict[str, dict[str, Any]]:
    return {r["date"]: r for r in rows if r["provider"] == provider}


def test_the_committed_scenario_steps_gmail_back_and_lets_microsoft_advance() -> None:
    rows = replay_json("-c", str(SCENARIO_CONFIG), "--signals", str(SCENARIO_SIGNALS))
    sendgrid = PRESETS["sendgrid"].daily
    for r in rows:  # each cap is the schedule's at the pair's own day
        assert r["cap"] == sendgrid[r["day"] - 1], r
    gmail = by_pair(rows, "gmail")
    assert [gmail[f"2026-11-0{d}"]["action"] for d in range(1, 6)] == ["advance"] * 5
    spike = gmail["2026-11-06"]
    assert (spike["day"], spike["cap"], spike["action"]) == (6, sendgrid[5], "back 2")
    assert "spam rate 0.24 %" in spike["reason"]
    after = gmail["2026-11-07"]
    assert (after["day"], after["action"]) == (4, "hold")
    assert "spam rate 0.15 %" in after["reason"]
    recovering = [gmail[f"2026-11-{d:02d}"] for d in range(8, 16)]
    assert all(r["action"] == "advance" for r in recovering)
    assert [r["day"] for r in recovering] == list(range(4, 12))
    microsoft = by_pair(rows, "microsoft")
    assert len(microsoft) == 15  # through the file's last date (11-12) + 3 days
    assert all(r["action"] == "advance" for r in microsoft.values())
    assert [r["day"] for r in microsoft.values()] == list(range(1, 16))

    table = warmrelay("simulate", "-c", str(SCENARIO_CONFIG), "--signals", str(SCENARIO_SIGNALS))
    assert table.returncode == 0, table.stderr
    line = next(
        x for x in table.stdout.splitlines() if x.startswith("2026-11-06  127.0.0.2  gmail")
    )
    assert line.split()[3:7] == ["6", "2,592", "back", "2"]
    assert "start 2026-11-01" in table.stdout and "its progress is" not in table.stdout


def test_replay_json_rows_have_the_documented_schema() -> None:
    rows = replay_json(
        "-c", str(SCENARIO_CONFIG), "--signals", str(SCENARIO_SIGNALS), "--days", "45"
    )
    assert len(rows) == 2 * 45
    for r in rows:
        assert set(r) == ROW_KEYS
        assert date.fromisoformat(r["date"]).isoformat() == r["date"]
        assert r["ip"] == "127.0.0.2" and r["provider"] in {"gmail", "microsoft"}
        assert isinstance(r["day"], int) and r["day"] >= 1
        assert r["cap"] is None or isinstance(r["cap"], int)
        assert r["action"] in {"advance", "hold", "pause"} or r["action"].startswith("back ")
        assert isinstance(r["reason"], str) and r["reason"]
    warm = by_pair(rows, "microsoft")["2026-12-13"]  # day 43: past sendgrid's 42 days
    assert (warm["day"], warm["cap"]) == (43, None)


def test_snds_red_pauses_until_recover_days_healthy_days(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        "ips:\n"
        "  - {address: 127.0.0.2, helo: a.example.test, warmup: "
        "{start: 2026-11-01, schedule: [100, 200, 400, 800], progress: calendar}}\n"
        "  - {address: 127.0.0.3, helo: b.example.test}\n"
        "reputation: {thresholds: {recover_days: 2}}\n"
    )
    signals = tmp_path / "s.csv"
    signals.write_text(
        "date,ip,provider,signal,value\n"
        "2026-11-01,127.0.0.2,microsoft,snds_filter,green\n"
        "2026-11-02,127.0.0.2,microsoft,snds_filter,RED\n"
        "2026-11-03,127.0.0.2,gmail,spam_rate,0.0024\n"  # a fraction, as 0.24%
    )
    rows = replay_json("-c", str(cfg), "--signals", str(signals), "--days", "6")
    microsoft = [(r["day"], r["cap"], r["action"]) for r in by_pair(rows, "microsoft").values()]
    assert microsoft == [
        (1, 100, "advance"),
        (2, 200, "pause"),  # SNDS RED: steps back (back_days 2) and sends nothing
        (1, 0, "pause"),
        (1, 0, "hold"),  # recover_days (2) healthy days: resumed at the day it stepped back to
        (1, 100, "advance"),
        (2, 200, "advance"),
    ]
    reasons = [r["reason"] for r in by_pair(rows, "microsoft").values()]
    assert reasons[1] == "SNDS RED"
    assert reasons[2].startswith("paused since 2026-11-02")
    assert reasons[3] == "resumed: healthy for 2 days"
    spike = by_pair(rows, "gmail")["2026-11-03"]
    assert spike["action"] == "back 2" and "spam rate 0.24 %" in spike["reason"]

    table = warmrelay("simulate", "-c", str(cfg), "--signals", str(signals), "--days", "6")
    assert table.returncode == 0, table.stderr
    assert "its progress is calendar: the rows show what reputation would do" in table.stdout


def test_a_bad_signals_file_is_exit_2_with_file_and_line(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, "{start: 2026-11-01, schedule: [10, 20], progress: reputation}")
    bad = tmp_path / "bad.csv"
    bad.write_text(
        "date,ip,provider,signal,value\n"
        "2026-11-01,127.0.0.2,gmail,spam_rate,0.1%\n"
        "2026-11-31,127.0.0.2,gmail,spam_rate,0.1%\n"
        "2026-11-02,127.0.0.2,gmail,open_rate,0.1\n"
        "2026-11-02,127.0.0.2,gmail,spam_rate,lots\n"
        "2026-11-02,127.0.0.3,gmail,spam_rate,0.1%\n"
        "2026-11-02,127.0.0.2,hotmail,spam_rate,0.1%\n"
        "2026-11-02,127.0.0.2,microsoft,snds_filter,BLUE\n"
    )
    result = warmrelay("simulate", "-c", str(cfg), "--signals", str(bad))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and result.stdout == ""
    lines = result.stderr.splitlines()
    assert [x.split(": ", 1)[0] for x in lines] == [f"{bad}:{n}" for n in range(3, 9)]
    assert "not a date" in lines[0] and "unknown signal 'open_rate'" in lines[1]
    assert "not a number" in lines[2] and "no warmup block" in lines[3]
    assert "provider 'hotmail' is unknown" in lines[4] and "GREEN, YELLOW or RED" in lines[5]

    header = tmp_path / "header.csv"
    header.write_text("date,ip,provider,signal,value,note\n")
    result = warmrelay("simulate", "-c", str(cfg), "--signals", str(header))
    assert result.returncode == 2
    assert result.stderr.startswith(f"{header}:1: unknown column 'note'")


def test_daily_and_signals_are_one_or_the_other(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, "{start: 2026-11-01, schedule: [10]}")
    both = warmrelay("simulate", "-c", str(cfg), "--daily", "100", "--signals", "x.csv")
    assert both.returncode == 2 and "not allowed with" in both.stderr
    neither = warmrelay("simulate", "-c", str(cfg))
    assert neither.returncode == 2 and "--daily --signals" in neither.stderr


def test_the_replay_chart_marks_holds_and_steps_back(tmp_path: Path) -> None:
    chart = tmp_path / "replay.svg"
    result = warmrelay(
        "simulate",
        "-c",
        str(SCENARIO_CONFIG),
        "--signals",
        str(SCENARIO_SIGNALS),
        "--plot",
        str(chart),
    )
    assert result.returncode == 0, result.stderr
    root = ElementTree.parse(chart).getroot()
    assert root.tag == f"{SVG}svg"
    markers = {
        " ".join(g.get("class", "").split()[1:]): g.findtext(f"{SVG}title") or ""
        for g in root.iter(f"{SVG}g")
        if g.get("class", "").startswith("marker ")
    }
    assert set(markers) == {"back", "hold"}  # gmail only: microsoft advanced every day
    assert "back 2" in markers["back"] and "spam rate 0.24 %" in markers["back"]
    assert "hold" in markers["hold"] and "spam_rate 0.15 %" in markers["hold"]
    texts = [t.text for t in root.iter(f"{SVG}text")]
    assert "back 2" in texts and "0.24 %" in texts  # the step back and the value behind it
    steps = [p for p in root.iter(f"{SVG}path") if p.get("class") == "cap"]
    assert len(steps) == 2  # a cap line per (ip, provider)


def test_the_committed_chart_is_what_the_command_writes_today(tmp_path: Path) -> None:
    chart = tmp_path / "complaint-spike.svg"
    result = warmrelay(
        "simulate",
        "-c",
        "deploy/scenarios/complaint-spike.yaml",
        "--signals",
        "deploy/scenarios/complaint-spike.csv",
        "--plot",
        str(chart),
    )
    assert result.returncode == 0, result.stderr
    assert chart.read_text() == SCENARIO_CHART.read_text(), (
        "deploy/complaint-spike.svg is stale: regenerate it with the command in deploy/README.md"
    )
