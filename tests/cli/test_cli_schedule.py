"""``warmrelay schedule``: the plan per warming IP from today, today marked."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

from support.cli import warmrelay


def run_schedule(tmp_path: Path, start_offset_days: int, *extra: str) -> str:
    today = datetime.now(UTC).date()
    start = today + timedelta(days=start_offset_days)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        "ips:\n"
        f"  - {{address: 127.0.0.2, helo: a.example.test,"
        f" warmup: {{start: {start.isoformat()}, schedule: [10, 20, 30]}}}}\n"
        "  - {address: 127.0.0.3, helo: b.example.test}\n"
    )
    result = warmrelay("schedule", "-c", str(cfg), *extra)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_started_yesterday(tmp_path: Path) -> None:
    out = run_schedule(tmp_path, -1)
    today = datetime.now(UTC).date()
    lines = [line for line in out.splitlines() if line.strip().startswith(("> ", "20"))]
    assert lines[0].lstrip().startswith(f"> {today.isoformat()}")
    assert lines[0].split()[2:4] == ["2", "20"]
    assert "today" in lines[0]
    assert lines[-1].split()[-2:] == ["warm", "(pool)"]
    assert len(lines) == 3  # day 2, day 3, then warm


def test_future_start_and_days_option(tmp_path: Path) -> None:
    out = run_schedule(tmp_path, 2, "--days", "4")
    rows = [line.split() for line in out.splitlines()[2:] if re.match(r"\s+(> )?\d{4}-", line)]
    caps = [r[-1] for r in rows]
    assert len(rows) == 4
    assert rows[0][0] == ">"
    assert "not started" in out
    assert caps[-2:] == ["10", "20"]
