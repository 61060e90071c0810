"""log.format: text (one line per event, as before) or json (one object per line, through
python-json-logger), taken from the configuration before the relay logs anything, in a
single process, in a supervisor and in its workers; a reload switches it."""

from __future__ import annotations

import json
import logging
import re
import signal
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiosmtplib
import hypothesis
import hypothesis.strategies
import pytest
import yaml
from support.relay import relay_doc
from support.relayproc import RelayProcess
from support.sink import Sink

from warmrelay.operate.logs import formatter

ISO_UTC = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")
TEXT_LINE = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ [\w.]+: ")

StartRelay = Callable[..., Awaitable[RelayProcess]]


def record(message: str, *args: object, **extra: Any) -> logging.LogRecord:
    rec = logging.LogRecord("warmrelay.delivery", logging.INFO, __file__, 1, message, args, None)
    rec.created = 1795753321.5  # 2026-11-27T04:22:01.500Z
    rec.__dict__.update(extra)
    return rec


def test_json_has_time_level_logger_message_and_the_extra_fields() -> None:
    line = formatter("json").format(record("to=<%s> ok", "a@b.test", queue_id="Q1", ip="1.2.3.4"))
    assert "\n" not in line
    data = json.loads(line)
    assert data == {
        "time": "2026-11-27T04:22:01.500Z",
        "level": "INFO",
        "logger": "warmrelay.delivery",
        "message": "to=<a@b.test> ok",
        "queue_id": "Q1",
        "ip": "1.2.3.4",
    }
    assert list(data)[:4] == ["time", "level", "logger", "message"]


def test_json_of_a_worker_and_of_an_exception() -> None:
    try:
        raise ValueError("bad \u00e9 input")
    except ValueError:
        rec = record("failed")
        rec.exc_info = sys.exc_info()
    data = json.loads(formatter("json", worker=3).format(rec))
    assert data["worker"] == 3
    assert data["exc_info"].startswith("Traceback") and "bad \u00e9 input" in data["exc_info"]


def test_text_is_the_format_of_before() -> None:
    line = formatter("text").format(record("to=<%s> ok", "a@b.test", queue_id="Q1"))
    assert TEXT_LINE.match(line) and line.endswith(" INFO warmrelay.delivery: to=<a@b.test> ok")


def parse_all(lines: list[str]) -> list[dict[str, Any]]:
    out = []
    for line in lines:
        data = json.loads(line)  # every line: one JSON object, nothing else
        assert ISO_UTC.fullmatch(data["time"]), line
        assert {"level", "logger", "message"} <= set(data), line
        out.append(data)
    return out


async def send_one(port: int, rcpt: str) -> None:
    message = f"From: <app@sender.test>\r\nTo: <{rcpt}>\r\nSubject: x\r\n\r\nhi\r\n"
    async with aiosmtplib.SMTP(hostname="127.0.0.1", port=port) as client:
        await client.sendmail("app@sender.test", [rcpt], message)


async def test_a_relay_logs_json_from_its_first_line_and_a_reload_switches_to_text(
    tmp_path: Path, sink: Sink, relay_process: StartRelay
) -> None:
    doc = relay_doc(tmp_path, sink.port, log={"format": "json"})
    relay = await relay_process(doc)
    await send_one(relay.smtp_port, "a@example.test")
    await relay.wait_for_line("to=<a@example.test>")
    entries = parse_all(relay.log)
    (delivered,) = [e for e in entries if e.get("rcpt") == "a@example.test"]
    assert delivered["logger"] == "warmrelay.delivery"
    assert (delivered["ip"], delivered["reason"]) == ("127.0.0.2", "warmup")
    assert delivered["disposition"] == "delivered"
    assert delivered["queue_id"] in delivered["message"]
    assert any(" ready: smtp " in e["message"] for e in entries)
    # serve runs on uvloop (what the in-process tests run on too: tests/conftest.py)
    assert any(e["message"].endswith(", event loop uvloop") for e in entries)

    doc["log"] = {"format": "text"}
    relay.config_path.write_text(yaml.safe_dump(doc))
    seen = len(relay.log)
    assert relay.proc is not None
    relay.proc.send_signal(signal.SIGHUP)
    await relay.wait_for_line("reload: log.format is text from now on")
    (applied,) = [json.loads(x) for x in relay.log[seen:] if "applied" in x]
    assert applied["message"].endswith("applied (2 IPs): log.format: json \u2192 text")
    assert applied["changes"] == ["log.format: json \u2192 text"]
    switched = next(x for x in relay.log[seen:] if "log.format is text" in x)
    assert TEXT_LINE.match(switched), switched
    assert await relay.terminate() == 0


async def test_workers_json_lines_reach_the_supervisors_stderr_unchanged(
    tmp_path: Path, sink: Sink, relay_process: StartRelay
) -> None:
    doc = relay_doc(tmp_path, sink.port, log={"format": "json"})
    relay = await relay_process(doc, "--workers", "2")
    await send_one(relay.smtp_port, "w@example.test")
    await relay.wait_for_line("to=<w@example.test>")
    entries = parse_all(relay.log)  # no "[w0] " prefix: that would not be JSON
    assert await relay.terminate() == 0
    (delivered,) = [e for e in entries if e.get("rcpt") == "w@example.test"]
    assert delivered["worker"] in (0, 1)
    started = [
        e for e in entries if e["logger"] == "warmrelay.supervisor" and "started" in e["message"]
    ]
    assert len(started) == 2 and all("worker" not in e for e in started)  # the supervisor's own
    assert {e["worker"] for e in entries if " ready: " in e["message"] and "worker" in e} == {0, 1}


@pytest.mark.parametrize("fmt", ["yaml", 1, None])
def test_log_format_must_be_text_or_json(tmp_path: Path, fmt: object) -> None:
    from warmrelay.config import parse_config
    from warmrelay.errors import ConfigError

    with pytest.raises(ConfigError) as info:
        parse_config({**relay_doc(tmp_path, 1), "log": {"format": fmt}})
    assert [p.path for p in info.value.problems] == ["log.format"]
    with pytest.raises(ConfigError) as info:
        parse_config({**relay_doc(tmp_path, 1), "log": {"colour": "red"}})
    assert [str(p) for p in info.value.problems] == ["log.colour: unknown key"]


@pytest.mark.parametrize("workers", [(), ("--workers", "2")])
async def test_log_format_on_the_command_line_wins_over_the_file_and_its_reloads(
    tmp_path: Path, sink: Sink, workers: tuple[str, ...], relay_process: StartRelay
) -> None:
    """`serve --log-format json` with log.format text in the file: JSON from the first
    line, with the acceptance and delivery lines' fields typed; a reload keeps JSON."""
    doc = relay_doc(tmp_path, sink.port, log={"format": "text"})
    relay = await relay_process(doc, *workers, "--log-format", "json")
    await send_one(relay.smtp_port, "a@example.test")
    await relay.wait_for_line("to=<a@example.test>")
    entries = parse_all(relay.log)
    (accepted,) = [e for e in entries if e.get("nrcpt") is not None]
    assert accepted["from"] == "app@sender.test" and accepted["nrcpt"] == 1
    assert accepted["size"] > 0 and accepted["client"].startswith("127.0.0.1")
    assert accepted["dkim"].startswith("unsigned") and accepted["queue_id"] in accepted["message"]
    (delivered,) = [e for e in entries if e.get("rcpt") == "a@example.test"]
    assert delivered["queue_id"] == accepted["queue_id"]
    assert (delivered["domain"], delivered["ip"], delivered["reason"]) == (
        "example.test",
        "127.0.0.2",
        "warmup",
    )
    assert delivered["relay"] == f"127.0.0.1[127.0.0.1]:{sink.port}"
    assert isinstance(delivered["delay"], float) and delivered["delay"] >= 0
    assert (delivered["code"], delivered["status"]) == (250, "2.0.0")
    assert delivered["reply"].startswith("250 ")
    seen = len(relay.log)
    assert relay.proc is not None
    relay.proc.send_signal(signal.SIGHUP)
    await relay.wait_for_line("applied")
    parse_all(relay.log[seen:])  # still one JSON object per line
    assert await relay.terminate() == 0


@hypothesis.settings(max_examples=300, deadline=None)
@hypothesis.given(
    hypothesis.strategies.lists(
        hypothesis.strategies.floats(min_value=1.6e9, max_value=1.9e9), min_size=1, max_size=6
    ),
    hypothesis.strategies.integers(min_value=0, max_value=3),
)
def test_the_text_format_writes_what_logging_s_formatter_writes(
    moments: list[float], nearby: int
) -> None:
    """The text formatter formats the date and time once per second; for records in any
    order, in one second or across seconds, its lines are logging.Formatter's."""
    ours, theirs = (
        formatter("text"),
        logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"),
    )
    moments = moments + [moments[0] + k * 0.3 for k in range(nearby)]  # the same second, the next
    for created in moments:
        record = logging.LogRecord(
            "warmrelay.test", logging.INFO, __file__, 1, "x %s", ("y",), None
        )
        record.created = created
        record.msecs = int((created - int(created)) * 1000) + 0.0
        assert ours.format(record) == theirs.format(record)
