"""``warmrelay simulate`` and the plan columns of ``warmrelay schedule``."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from support.cli import warmrelay


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
