"""Configuration: the example is valid; every mistake is named with its key path."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from support.cli import warmrelay

from warmrelay.config import load_config, parse_config
from warmrelay.errors import ConfigError, WarmrelayError

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "config.example.yaml"


def minimal(**over: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "ips": [
            {
                "address": "127.0.0.2",
                "helo": "mta1.example.test",
                "warmup": {"start": "2026-11-27", "schedule": [50, 100]},
            },
            {"address": "127.0.0.3", "helo": "mta2.example.test"},
        ]
    }
    doc.update(over)
    return doc


def problems(doc: Any) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(doc)
    assert isinstance(info.value, WarmrelayError)
    return [str(p) for p in info.value.problems]


def test_example_config_is_valid_and_resolves_state_dir_next_to_it() -> None:
    cfg = load_config(EXAMPLE)
    assert cfg.state.dir == ROOT / "var"
    assert [str(ip.address) for ip in cfg.ips] == ["127.0.0.2", "127.0.0.3"]
    assert cfg.ips[0].warmup is not None
    # no start date: it warms from its first use, whenever the example is run
    assert cfg.ips[0].warmup.start is None
    assert cfg.ips[0].warmup.sending_hours is None  # and at any hour


def test_preset_name_becomes_its_table() -> None:
    doc = minimal()
    doc["ips"][0]["warmup"]["schedule"] = "sparkpost"
    cfg = parse_config(doc)
    assert cfg.ips[0].warmup is not None
    assert cfg.ips[0].warmup.schedule.daily[:3] == (200, 500, 1000)


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"smtp": {"colour": "blue"}}, "smtp.colour: unknown key"),
        ({"timezone": "Mars/Olympus"}, "timezone: unknown time zone 'Mars/Olympus'"),
        ({"overflow": "spray"}, "overflow: must be 'pool', 'hold' or 'smarthost' (got 'spray')"),
        ({"routes": {"*": "127.0.0.1"}}, "routes['*']: '127.0.0.1' needs a port"),
        ({"smtp": {"allow_networks": ["10.0.0.0/33"]}}, "smtp.allow_networks[0]:"),
        ({"state": {"counters": "mongodb://x"}}, "state.counters:"),
        ({"ips": []}, "ips: list at least one source IP"),
    ],
)
def test_single_mistakes(change: dict[str, Any], expected: str) -> None:
    assert any(p.startswith(expected) for p in problems(minimal(**change))), problems(
        minimal(**change)
    )


def test_ip_level_mistakes_name_the_entry() -> None:
    doc = minimal()
    doc["ips"][1]["address"] = "300.1.2.3"
    doc["ips"][0]["warmup"]["schedule"] = [10, -1]
    doc["ips"].append({"address": "127.0.0.2", "helo": "x.example.test"})
    found = problems(doc)
    assert "ips[1].address: '300.1.2.3' is not an IP address" in found
    assert "ips[0].warmup.schedule: day 2: cap -1 is negative" in found
    assert "ips[2].address: 127.0.0.2 is already listed as ips[0]" in found


@pytest.mark.parametrize(
    ("schedule", "expected"),
    [
        ([], "the schedule is empty"),
        (42, "must be a list of daily caps, a preset name or a ramp"),
        ({"start": 50, "growth": 1.4}, "a generated ramp needs exactly start, growth and target"),
        ({"start": 50, "growth": 0.9, "target": 100}, "a ramp needs start >= 1, growth > 1"),
        ({"preset": "sendgrid-manual", "target": 0}, "target must be a whole number >= 1"),
        ("fastest", "unknown preset 'fastest'"),
        ([1, "many"], "day 2: 'many' is not a whole number"),
    ],
)
def test_bad_schedules(schedule: Any, expected: str) -> None:
    doc = minimal()
    doc["ips"][0]["warmup"]["schedule"] = schedule
    assert any(p.startswith(f"ips[0].warmup.schedule: {expected}") for p in problems(doc))


def test_pool_overflow_needs_a_warm_ip() -> None:
    doc = minimal()
    del doc["ips"][1]
    assert any(p.startswith("overflow: 'pool' needs at least one warm IP") for p in problems(doc))
    assert parse_config({**doc, "overflow": "hold"}).overflow == "hold"


def test_empty_and_non_mapping_documents() -> None:
    assert problems(None) == ["the configuration is empty"]
    assert problems([1, 2]) == ["the configuration must be a mapping of keys"]


def test_check_config_prints_all_three_mistakes(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "smtp:\n  listen: ['127.0.0.1:2525']\n  colour: blue\n"
        "ips:\n"
        "  - address: 127.0.0.2\n    helo: mta1.example.test\n"
        "    warmup: {start: 2026-13-40, schedule: [50]}\n"
        "  - address: 127.0.0.3\n    helo: mta2.example.test\n"
        "routes: {'*': '127.0.0.1'}\n"
    )
    result = warmrelay("check-config", "-c", str(bad))
    assert result.returncode == 1
    assert "3 error(s)" in result.stderr
    for path in ("smtp.colour", "ips[0].warmup.start", "routes['*']"):
        assert f"  {path}: " in result.stderr


def test_check_config_summary_for_the_example() -> None:
    result = warmrelay("check-config", "-c", str(EXAMPLE))
    assert result.returncode == 0, result.stderr
    assert "OK" in result.stdout
    assert "127.0.0.2" in result.stdout and "127.0.0.3" in result.stdout
    assert "warm (pool)" in result.stdout


def test_unreadable_and_invalid_yaml(tmp_path: Path) -> None:
    assert warmrelay("check-config", "-c", str(tmp_path / "nope.yaml")).returncode == 1
    broken = tmp_path / "broken.yaml"
    broken.write_text("ips: [\n")
    result = warmrelay("check-config", "-c", str(broken))
    assert result.returncode == 1
    assert "not valid YAML" in result.stderr


# -- messages an operator can act on (issue 18) -----------------------------------------------

SYNTAX = """\
smtp:
  listen: ["127.0.0.1:2525"]
  hostname: relay.example.test: x
ips:
  - {address: 127.0.0.3, helo: mta2.example.test}
"""


@pytest.mark.parametrize("command", ["check-config", "serve"])
def test_a_yaml_syntax_error_is_file_line_column_in_two_lines(tmp_path: Path, command: str) -> None:
    path = tmp_path / "relay.yaml"
    path.write_text(SYNTAX)
    result = warmrelay(command, "-c", str(path))
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    assert lines == [
        f"{path}:3:31: not valid YAML: mapping values are not allowed here",
        "  3 |   hostname: relay.example.test: x",
    ], result.stderr


def test_an_unclosed_bracket_names_where_it_was_opened(tmp_path: Path) -> None:
    path = tmp_path / "relay.yaml"
    path.write_text('smtp:\n  listen: ["127.0.0.1:2525"\nips: []\n')
    result = warmrelay("check-config", "-c", str(path))
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"{path}:3:1: not valid YAML: expected ',' or ']', but got '<scalar>' "
        "(while parsing a flow sequence at line 2)",
        "  3 | ips: []",
    ], result.stderr


def test_a_blank_error_line_shows_the_line_that_opened_the_construct(tmp_path: Path) -> None:
    path = tmp_path / "relay.yaml"
    path.write_text("ips: [\n")
    result = warmrelay("check-config", "-c", str(path))
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    assert lines[0].startswith(f"{path}:2:1: not valid YAML: "), result.stderr
    assert lines[1:] == ["  1 | ips: ["]


def test_a_control_character_is_named_with_its_line(tmp_path: Path) -> None:
    """PyYAML refuses it before parsing, with an offset only (this was a traceback)."""
    path = tmp_path / "relay.yaml"
    path.write_text("ips:\n  - {address: 127.0.0.3, helo: mta\x072.example.test}\n")
    result = warmrelay("check-config", "-c", str(path))
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"{path}:2:35: not valid YAML: special characters are not allowed (character U+0007)",
        "  2 |   - {address: 127.0.0.3, helo: mta\\x072.example.test}",  # shown, not rung
    ], result.stderr


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (
            {"smtp": {"max_recipients": "ten"}},
            "smtp.max_recipients: must be an integer (got 'ten')",
        ),
        ({"smtp": {"max_recipients": 0}}, "smtp.max_recipients: must be greater than 0 (got 0)"),
        ({"smtp": {"timeout_s": "soon"}}, "smtp.timeout_s: must be a number (got 'soon')"),
        ({"smtp": {"hostname": 5}}, "smtp.hostname: must be a string (got 5)"),
        (
            {"smtp": {"listen": [{"address": "127.0.0.1:2525", "require_auth": "maybe"}]}},
            "smtp.listen[0].require_auth: must be true or false (got 'maybe')",
        ),
        (
            {"smtp": {"bare_newlines": "fix"}},
            "smtp.bare_newlines: must be 'normalize' or 'reject' (got 'fix')",
        ),
        ({"delivery": {"mx_port": 1.5}}, "delivery.mx_port: must be an integer (got 1.5)"),
        ({"delivery": {"mx_port": None}}, "delivery.mx_port: must be an integer (got nothing)"),
    ],
)
def test_a_type_error_echoes_the_bad_value(change: dict[str, Any], expected: str) -> None:
    assert expected in problems(minimal(**change))


def test_a_secret_is_never_echoed() -> None:
    doc = minimal(smtp={"users": {"app": {"password_hash": 123456789}}})
    (found,) = problems(doc)
    assert found == "smtp.users.app.password_hash: must be a string"


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"overflw": "hold"}, "overflw: unknown key (did you mean overflow?)"),
        (
            {"smtp": {"max_recipents": 5}},
            "smtp.max_recipents: unknown key (did you mean max_recipients?)",
        ),
        (
            {"smtp": {"listen": [{"address": "127.0.0.1:2525", "requre_auth": True}]}},
            "smtp.listen[0].requre_auth: unknown key (did you mean require_auth?)",
        ),
        (
            {"dkim": {"domains": {"example.test": {"keys": [{"selecter": "s", "key_file": "k"}]}}}},
            "dkim.domains['example.test'].keys[0].selecter: unknown key (did you mean selector?)",
        ),
        ({"smtp": {"colour": "blue"}}, "smtp.colour: unknown key"),  # nothing close: no guess
    ],
)
def test_an_unknown_key_suggests_the_nearest_known_one(
    change: dict[str, Any], expected: str
) -> None:
    assert expected in problems(minimal(**change))


def test_an_unknown_key_deep_in_an_ip_entry() -> None:
    doc = minimal()
    doc["ips"][0]["warmup"]["shedule_x"] = 1
    doc["ips"][0]["warmup"]["sending_hour"] = "08:00-20:00"
    found = problems(doc)
    assert "ips[0].warmup.sending_hour: unknown key (did you mean sending_hours?)" in found
    assert "ips[0].warmup.shedule_x: unknown key (did you mean schedule?)" in found


def test_serve_and_check_config_print_the_same_problems(tmp_path: Path) -> None:
    path = tmp_path / "relay.yaml"
    path.write_text(
        "smtp: {max_recipients: ten, colour: blue}\n"
        "overflw: hold\n"
        "ips:\n  - {address: 127.0.0.3, helo: mta2.example.test}\n"
    )
    check = warmrelay("check-config", "-c", str(path))
    serve = warmrelay("serve", "-c", str(path))
    assert check.returncode == serve.returncode == 1
    assert check.stderr == serve.stderr
    assert check.stderr.splitlines() == [
        f"{path}: 3 error(s)",
        "  smtp.max_recipients: must be an integer (got 'ten')",
        "  smtp.colour: unknown key",
        "  overflw: unknown key (did you mean overflow?)",
    ]


def test_relative_paths_are_relative_to_the_file_not_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """check-config run by hand in /etc/warmrelay and serve run by systemd in / must read
    the same key and certificate files."""
    folder = tmp_path / "etc"
    folder.mkdir()
    path = folder / "relay.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "smtp": {"tls": {"cert": "tls/cert.pem", "key": "tls/key.pem"}},
                "state": {"dir": "var"},
                "dkim": {
                    "domains": {"example.test": {"keys": [{"selector": "s", "key_file": "k.pem"}]}}
                },
                "ips": [{"address": "127.0.0.2", "helo": "a.example.test"}],
            }
        )
    )
    monkeypatch.chdir(tmp_path)
    config = load_config(path)
    assert config.state.dir == folder / "var"
    assert config.smtp.tls is not None
    assert (config.smtp.tls.cert, config.smtp.tls.key) == (
        folder / "tls/cert.pem",
        folder / "tls/key.pem",
    )
    assert config.dkim.domains["example.test"].keys[0].key_file == folder / "k.pem"


def commented_blocks(text: str) -> dict[str, str]:
    """The top-level sections config.example.yaml shows commented out ("# key:" and its
    "#   " lines), uncommented."""
    blocks: dict[str, str] = {}
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if re.fullmatch(r"# [a-z_]+:", line):
            body = [line[2:]]
            for more in lines[i + 1 :]:
                if not more.startswith("#   "):
                    break
                body.append(more[2:])
            if len(body) > 1:
                blocks[line[2:-1]] = "\n".join(body)
    return blocks


def test_the_examples_commented_sections_are_valid_when_uncommented() -> None:
    """What the example shows commented out is what a user uncomments: it must parse."""
    blocks = commented_blocks(EXAMPLE.read_text())
    assert {"bounces", "dkim", "events", "reputation", "smarthost"} <= set(blocks)
    base = yaml.safe_load(EXAMPLE.read_text())
    for name, text in blocks.items():
        doc = {**base, **yaml.safe_load(text)}
        if name == "smarthost":
            doc["overflow"] = "smarthost"
        parse_config(doc)  # raises ConfigError naming the key path
    reputation = parse_config({**base, **yaml.safe_load(blocks["reputation"])}).reputation
    assert reputation.thresholds.ladder("deferral_rate", "microsoft").hold == 0.2
    assert reputation.thresholds.ladder("spam_rate", "gmail").pause == 0.003
