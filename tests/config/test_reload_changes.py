"""A reload says what changed: describe_changes lists key paths with old -> new, secrets
never shown; the relay logs that list when it accepts a file."""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

import pytest
import yaml
from support.relay import relay_doc, running
from support.sink import Sink

from warmrelay.config import describe_changes, parse_config, redact_url
from warmrelay.mail.dkim import generate_key, write_key

HASH_A = "$argon2id$v=19$m=65536,t=3,p=4$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaA"
HASH_B = "$argon2id$v=19$m=65536,t=3,p=4$c2FsdHNhbHQ$b3RoZXJvdGhlcm90aGVyb3Q"


def doc() -> dict[str, Any]:
    return {
        "smtp": {"users": {"app": {"password_hash": HASH_A}}},
        "state": {"counters": "redis://:first-secret@127.0.0.1:6379/0"},
        "ips": [
            {
                "address": "127.0.0.2",
                "helo": "a.example.test",
                "warmup": {"start": "2026-11-27", "schedule": [50, 100, 500]},
            },
            {"address": "127.0.0.3", "helo": "b.example.test"},
        ],
        "routes": {"*": "127.0.0.1:2600"},
    }


def test_nothing_changed() -> None:
    assert describe_changes(parse_config(doc()), parse_config(doc())) == []


def test_values_by_key_path_in_file_order() -> None:
    new = doc()
    new["ips"][0]["warmup"]["schedule"] = "sendgrid-manual"
    new["ips"][0]["warmup"]["sending_hours"] = "08:00-20:00"
    del new["ips"][0]["warmup"]["start"]
    new["routes"] = {"*": "127.0.0.1:2601", "example.test": "127.0.0.1:2602"}
    new["log"] = {"format": "json"}
    new["smtp"]["max_recipients"] = 50
    assert describe_changes(parse_config(doc()), parse_config(new)) == [
        "smtp.max_recipients: 100 \u2192 50",
        "ips['127.0.0.2'].warmup.start: 2026-11-27 \u2192 none",
        "ips['127.0.0.2'].warmup.schedule: [50, 100, 500] (3 days) \u2192 "
        "sendgrid-manual [50, 100, 500, 1000, ... 4000000] (17 days)",
        "ips['127.0.0.2'].warmup.sending_hours: none \u2192 08:00-20:00",
        "routes['*']: 127.0.0.1:2600 \u2192 127.0.0.1:2601",
        "routes['example.test']: (absent) \u2192 127.0.0.1:2602",
        "log.format: text \u2192 json",
    ]


def test_ips_are_matched_by_address_not_position() -> None:
    new = doc()
    new["ips"].insert(0, {"address": "127.0.0.4", "helo": "c.example.test", "weight": 2})
    new["ips"][2]["weight"] = 3
    assert describe_changes(parse_config(doc()), parse_config(new)) == [
        "ips['127.0.0.3'].weight: 1 \u2192 3",
        "ips['127.0.0.4']: (absent) \u2192 {address: 127.0.0.4, helo: c.example.test, weight: 2}",
    ]
    assert describe_changes(parse_config(new), parse_config(doc()))[0] == (
        "ips['127.0.0.4']: {address: 127.0.0.4, helo: c.example.test, weight: 2} \u2192 (absent)"
    )


def test_secrets_are_never_shown() -> None:
    new = doc()
    new["smtp"]["users"]["app"]["password_hash"] = HASH_B
    new["smtp"]["users"]["ops"] = {"password_hash": HASH_B, "senders": ["*@ops.test"]}
    new["state"]["counters"] = "redis://:second-secret@127.0.0.1:6380/0"
    new["smarthost"] = {"host": "smtp.example.test:587", "password_env": "SMARTHOST_PW"}
    new["overflow"] = "smarthost"
    lines = describe_changes(parse_config(doc()), parse_config(new))
    text = "\n".join(lines)
    for secret in ("first-secret", "second-secret", HASH_A, HASH_B, "aGFzaG", "b3RoZX"):
        assert secret not in text
    assert "smtp.users.app.password_hash: *** (a secret changed; not shown)" in lines
    assert "smtp.users.ops: (absent) \u2192 {password_hash: ***, senders: [*@ops.test]}" in lines
    assert (
        "state.counters: redis://:***@127.0.0.1:6379/0 \u2192 redis://:***@127.0.0.1:6380/0"
    ) in lines
    smarthost = "smarthost: none \u2192 {host: smtp.example.test:587"
    assert any(line.startswith(smarthost) for line in lines)
    assert "password_env: SMARTHOST_PW" in text  # the name of a variable is no secret


def test_redact_url() -> None:
    assert redact_url("redis://user:pw@host:6379/0") == "redis://user:***@host:6379/0"
    assert redact_url("rediss://host:6379/0?password=pw&db=1") == (
        "rediss://host:6379/0?password=***&db=1"
    )
    assert redact_url("redis://host:6379/0") == "redis://host:6379/0"
    assert redact_url("sqlite") == "sqlite"


async def test_the_relay_logs_what_a_reload_changed(
    tmp_path: Path, sink: Sink, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="warmrelay")
    first = relay_doc(tmp_path, sink.port)
    path = tmp_path / "relay.yaml"
    path.write_text(yaml.safe_dump(first))
    async with running(parse_config(first)) as relay:
        second = copy.deepcopy(first)
        second["ips"][0]["warmup"]["schedule"] = [20] * 10
        second["overflow"] = "hold"
        path.write_text(yaml.safe_dump(second))
        assert await relay.reload(path)
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("reload: ")]
    assert line == (
        f"reload: {path} applied (2 IPs): ips['127.0.0.2'].warmup.schedule: "
        f"[10, 10, 10, 10, ... 10] (3650 days) \u2192 [20, 20, 20, 20, ... 20] (10 days); "
        "overflow: pool \u2192 hold"
    )


async def test_a_reload_says_once_and_truly_what_took_effect(
    tmp_path: Path, sink: Sink, caplog: pytest.LogCaptureFixture
) -> None:
    """A new DKIM key path whose file is broken, and a listener change (restart only): the
    errors name the key; the one summary line lists what applied and what runs as before,
    never the key path or the listener as if they had changed."""
    caplog.set_level(logging.INFO, logger="warmrelay")
    good, broken = tmp_path / "good.pem", tmp_path / "broken.pem"
    write_key(good, generate_key("ed25519"))
    broken.write_text("not a key\n")
    broken.chmod(0o600)
    first = relay_doc(tmp_path, sink.port)
    first["dkim"] = {
        "domains": {
            "sender.test": {
                "keys": [{"selector": "s1", "key_file": str(good), "algorithm": "ed25519-sha256"}]
            }
        }
    }
    path = tmp_path / "relay.yaml"
    async with running(parse_config(first)) as relay:
        second = copy.deepcopy(first)
        second["dkim"]["domains"]["sender.test"]["keys"][0]["key_file"] = str(broken)
        second["smtp"]["listen"] = ["127.0.0.1:0", "127.0.0.1:0"]
        second["overflow"] = "hold"
        path.write_text(yaml.safe_dump(second))
        assert await relay.reload(path)
        assert relay.config.dkim == parse_config(first).dkim  # in force: the old key
    lines = [r for r in caplog.records if r.getMessage().startswith("reload: ")]
    errors = [r.getMessage() for r in lines if r.levelno == logging.ERROR]
    assert len(errors) == 1 and str(broken) in errors[0] and "not loaded" in errors[0]
    (summary,) = [r for r in lines if r.levelno < logging.ERROR]
    assert summary.levelno == logging.WARNING
    assert summary.getMessage() == (
        f"reload: {path} applied (2 IPs): overflow: pool \u2192 hold; running as before: "
        "dkim (a key did not load: the keys and dkim settings in force stay); "
        "running as before: smtp.listen (they change only with a restart)"
    )
