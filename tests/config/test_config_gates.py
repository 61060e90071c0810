"""Gates at load and start: an unset admin token, an open relay, duplicate keys, source IPs
that are not on this host and malformed shapes are refused or reported, never passed over;
and check-config refuses what serve refuses at start (keys, TLS files, state.dir, addresses).

Real sockets and real processes on loopback. 192.0.2.7 (TEST-NET-1) is never on the host:
binding to it fails with EADDRNOTAVAIL, and no packet is ever sent to it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import signal
import socket
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from support.cli import warmrelay
from support.disk import Disk
from support.relay import http, http_get, relay_config, relay_doc, running, send
from support.relayproc import RelayProcess
from support.sink import Sink

from warmrelay.app import Relay, log_failed_reload
from warmrelay.config import (
    config_warnings,
    host_warnings,
    load_config,
    parse_config,
    start_problems,
)
from warmrelay.errors import ConfigError, ConfigProblem, WarmrelayError
from warmrelay.operate.admin import reason_phrase

TOKEN_ENV = "WARMRELAY_GATES_TEST_TOKEN"
UNBOUND = "192.0.2.7"
REPLY_S = 30.0  # the longest one admin reply may take before a test fails

StartRelay = Callable[..., Awaitable[RelayProcess]]
Tmpfs = Callable[..., Disk]


def env_without(name: str) -> dict[str, str]:
    env = dict(os.environ)
    env.pop(name, None)
    return env


def problems_of(doc: Any) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(doc)
    return [str(p) for p in info.value.problems]


def write(tmp_path: Path, doc: dict[str, Any], name: str = "relay.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(doc))
    return path


# -- 1. the admin token fails closed -------------------------------------------------------


def test_serve_refuses_to_start_when_the_token_variable_is_unset(tmp_path: Path) -> None:
    path = write(tmp_path, relay_doc(tmp_path, 9, admin={"token_env": TOKEN_ENV}))
    result = warmrelay("serve", "-c", str(path), env=env_without(TOKEN_ENV))
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr  # one clear line, no traceback
    assert TOKEN_ENV in lines[0] and "admin.token_env" in lines[0]
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("value", [None, "", "   "])
def test_relay_refuses_an_unset_or_blank_token(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, value: str | None
) -> None:
    if value is None:
        monkeypatch.delenv(TOKEN_ENV, raising=False)
    else:
        monkeypatch.setenv(TOKEN_ENV, value)
    config = relay_config(tmp_path, 9, admin={"token_env": TOKEN_ENV})
    with pytest.raises(ConfigError) as info:
        Relay(config)
    assert isinstance(info.value, WarmrelayError)
    (problem,) = info.value.problems
    assert problem.path == "admin.token_env" and TOKEN_ENV in problem.message
    assert not (tmp_path / "state").exists()  # refused before anything was opened


async def raw_request(port: int, request: str) -> tuple[str, dict[str, str]]:
    """One request over a real socket: (status line, headers with lower-case names)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    # one request per connection: the server keeps HTTP/1.1 connections open otherwise
    writer.write(request.replace("\r\n", "\r\nConnection: close\r\n", 1).encode())
    raw = await asyncio.wait_for(reader.read(), REPLY_S)
    writer.close()
    head = raw.partition(b"\r\n\r\n")[0].decode("latin-1").split("\r\n")
    headers: dict[str, str] = {}
    for line in head[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return head[0], headers


async def test_401_has_its_reason_phrase_and_a_bearer_challenge(
    tmp_path: Path, sink: Sink, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(TOKEN_ENV, "gates-secret")
    config = relay_config(tmp_path, sink.port, admin={"token_env": TOKEN_ENV})
    async with running(config) as relay:
        port = relay.admin.port
        for request in (
            "GET /status HTTP/1.1\r\nHost: x\r\n\r\n",
            "GET /status HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer wrong\r\n\r\n",
            "POST /ips/127.0.0.2/pause HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
        ):
            line, headers = await raw_request(port, request)
            assert line == "HTTP/1.1 401 Unauthorized"
            assert headers["www-authenticate"] == 'Bearer realm="warmrelay"'
        line, headers = await raw_request(port, "GET /nope HTTP/1.1\r\nHost: x\r\n\r\n")
        assert line == "HTTP/1.1 404 Not Found" and "www-authenticate" not in headers
        line, _ = await raw_request(
            port, "PUT /metrics HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer gates-secret\r\n\r\n"
        )
        assert line == "HTTP/1.1 405 Method Not Allowed"
        code, _ = await http(port, "POST", "/ips/127.0.0.2/bogus", "gates-secret")
        assert code == 400
        line, _ = await raw_request(
            port,
            "POST /ips/127.0.0.2/bogus HTTP/1.1\r\nHost: x\r\n"
            "Authorization: Bearer gates-secret\r\nContent-Length: 0\r\n\r\n",
        )
        assert line == "HTTP/1.1 400 Bad Request"
        line, _ = await raw_request(
            port, "GET /status HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer gates-secret\r\n\r\n"
        )
        assert line == "HTTP/1.1 200 OK"


@pytest.mark.parametrize(
    ("status", "phrase"),
    [
        (200, "OK"),
        (401, "Unauthorized"),
        (500, "Internal Server Error"),
        (503, "Service Unavailable"),
        (599, "Unknown"),
    ],
)
def test_every_status_gets_its_own_phrase(status: int, phrase: str) -> None:
    assert reason_phrase(status) == phrase


# -- 2a. open relay networks ------------------------------------------------------------------


@pytest.mark.parametrize("network", ["0.0.0.0/0", "::/0", "0.0.0.0/7", "64.0.0.0/2", "2000::/3"])
def test_networks_that_open_the_relay_are_refused(network: str) -> None:
    """Shorter than IPv4 /8 or IPv6 /16 and not wholly private space (fc00::/7 passes)."""
    doc = relay_doc(Path("/nonexistent"), 9, smtp={"allow_networks": ["10.0.0.0/8", network]})
    found = problems_of(doc)
    (problem,) = [p for p in found if p.startswith("smtp.allow_networks[1]: ")]
    assert "open relay" in problem
    assert not any(p.startswith("smtp.allow_networks[0]") for p in found)


@pytest.mark.parametrize(
    ("network", "public"),
    [
        ("10.0.0.0/8", False),
        ("172.16.0.0/12", False),
        ("192.168.10.0/24", False),
        ("127.0.0.0/8", False),
        ("169.254.0.0/16", False),
        ("100.64.0.0/10", False),
        ("::1/128", False),
        ("fd00::/8", False),
        ("fc00::/7", False),  # wider than /16, but private: no open relay
        ("fe80::/64", False),
        ("8.8.8.0/24", True),
        ("172.0.0.0/8", True),  # only partly private
        ("2001:db8::/32", True),
    ],
)
def test_public_relay_networks_are_a_warning(network: str, public: bool) -> None:
    doc = relay_doc(Path("/nonexistent"), 9, smtp={"allow_networks": ["127.0.0.0/8", network]})
    warnings = config_warnings(parse_config(doc))
    assert [w.path for w in warnings] == (["smtp.allow_networks[1]"] if public else [])


def test_check_config_prints_warnings_and_exits_0(tmp_path: Path) -> None:
    doc = relay_doc(tmp_path, 9, smtp={"allow_networks": ["127.0.0.0/8", "203.0.113.0/24"]})
    result = warmrelay("check-config", "-c", str(write(tmp_path, doc)))
    assert result.returncode == 0, result.stderr
    assert "1 warning(s)" in result.stderr
    assert "  smtp.allow_networks[1]: 203.0.113.0/24 is a public network" in result.stderr
    assert "OK" in result.stdout


def test_check_config_refuses_an_open_relay(tmp_path: Path) -> None:
    doc = relay_doc(tmp_path, 9, smtp={"allow_networks": ["0.0.0.0/0"]})
    result = warmrelay("check-config", "-c", str(write(tmp_path, doc)))
    assert result.returncode == 1
    assert "  smtp.allow_networks[0]: 0.0.0.0/0 covers every IPv4 address" in result.stderr


async def test_serve_logs_warnings_at_start(
    tmp_path: Path, sink: Sink, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    config = relay_config(
        tmp_path, sink.port, smtp={"allow_networks": ["127.0.0.0/8", "198.51.100.0/24"]}
    )
    async with running(config):
        pass
    warned = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert any("smtp.allow_networks[1]: 198.51.100.0/24" in r.getMessage() for r in warned)


# -- 2b. duplicate keys -----------------------------------------------------------------------

DUPLICATES = """\
smtp:
  listen: ["127.0.0.1:2525"]
  hostname: relay.example.test
  allow_networks: ["127.0.0.0/8"]
  hostname: other.example.test
ips:
  - address: 127.0.0.2
    helo: mta1.example.test
    warmup: {start: 2026-11-27, schedule: [50]}
  - address: 127.0.0.3
    helo: mta2.example.test
    weight: 1
    helo: mta3.example.test
routes: {"*": "127.0.0.1:2600"}
colour: blue
routes: {"*": "127.0.0.1:2601"}
"""


def test_duplicate_keys_are_errors_with_both_lines_at_any_depth(tmp_path: Path) -> None:
    path = tmp_path / "dup.yaml"
    path.write_text(DUPLICATES)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    found = [str(p) for p in info.value.problems]
    assert found == [  # all at once, in file order, with the other problems
        "smtp.hostname: duplicate key (lines 3 and 5)",
        "ips[1].helo: duplicate key (lines 11 and 13)",
        "routes: duplicate key (lines 14 and 16)",
        "colour: unknown key",
    ]
    result = warmrelay("check-config", "-c", str(path))
    assert result.returncode == 1
    assert "4 error(s)" in result.stderr
    assert "  smtp.hostname: duplicate key (lines 3 and 5)" in result.stderr


def test_merge_keys_may_be_overridden_and_dates_stay_dates(tmp_path: Path) -> None:
    path = tmp_path / "merge.yaml"
    path.write_text(
        "ips:\n"
        "  - &warming\n"
        "    address: 127.0.0.2\n"
        "    helo: mta1.example.test\n"
        "    warmup: {start: 2026-11-27, schedule: [50]}\n"
        "  - <<: *warming\n"
        "    address: 127.0.0.3\n"
        "    warmup: null\n"
        "routes: {'*': '127.0.0.1:2600', 'Example.TEST': '127.0.0.1:2601'}\n"
    )
    config = load_config(path)
    assert [str(ip.address) for ip in config.ips] == ["127.0.0.2", "127.0.0.3"]
    assert config.ips[1].helo == "mta1.example.test" and config.ips[1].warmup is None
    assert config.ips[0].warmup is not None
    assert config.ips[0].warmup.start.isoformat() == "2026-11-27"


# -- 2c. source IPs not on this host ------------------------------------------------------------


def unbound_doc(tmp_path: Path, sink_port: int) -> dict[str, Any]:
    doc = relay_doc(tmp_path, sink_port)
    doc["ips"] = [
        {"address": "127.0.0.3", "helo": "mta2.example.test"},
        {"address": UNBOUND, "helo": "mta7.example.test"},
    ]
    return doc


def test_check_config_warns_about_an_address_not_on_this_host(tmp_path: Path) -> None:
    config = parse_config(unbound_doc(tmp_path, 9))
    (warning,) = host_warnings(config)
    assert warning.path == "ips[1].address" and UNBOUND in warning.message
    result = warmrelay("check-config", "-c", str(write(tmp_path, unbound_doc(tmp_path, 9))))
    assert result.returncode == 0, result.stderr
    assert f"  ips[1].address: {UNBOUND} cannot be bound on this host" in result.stderr
    assert "another host" in result.stderr


async def test_relay_starts_with_an_unbound_ip_marked_down(
    tmp_path: Path, sink: Sink, caplog: pytest.LogCaptureFixture
) -> None:
    config = parse_config(unbound_doc(tmp_path, sink.port))
    async with running(config) as relay:
        errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
        assert any(UNBOUND in m and "cannot be bound" in m for m in errors), errors
        port = relay.admin.port
        code, body = await http_get(port, "/metrics")  # right away, before any delivery
        assert code == 200
        assert f'warmrelay_ip_up{{ip="{UNBOUND}"}} 0.0' in body.decode()
        assert 'warmrelay_ip_up{ip="127.0.0.3"} 1.0' in body.decode()
        assert await http_get(port, "/healthz") == (
            200,
            f"degraded: source IP down: {UNBOUND}\n".encode(),
        )
        for n in range(4):  # routing avoids it: everything leaves from the other IP
            await send(relay, [f"r{n}@example.test"])
        await sink.wait_for(4)
    assert sink.by_peer() == {"127.0.0.3": 4}


async def test_healthz_stays_degraded_after_the_down_mark_expires(
    tmp_path: Path, sink: Sink
) -> None:
    """The mark lasts ip_down_s; an IP still not on this host must not read as healthy."""
    now = [datetime(2026, 11, 28, 12, 0, tzinfo=UTC)]
    config = parse_config(unbound_doc(tmp_path, sink.port))
    async with running(config, clock=lambda: now[0]) as relay:
        now[0] += timedelta(seconds=config.delivery.ip_down_s + 1)  # the first mark is over
        assert await http_get(relay.admin.port, "/healthz") == (
            200,
            f"degraded: source IP down: {UNBOUND}\n".encode(),
        )


async def test_supervisor_reports_an_unbound_ip(
    tmp_path: Path, sink: Sink, relay_process: StartRelay
) -> None:
    """serve --workers: the supervisor's own /healthz and /metrics show it, not only the
    workers' logs."""
    relay = await relay_process(unbound_doc(tmp_path, sink.port), "--workers", "2")
    health = await http_get(relay.admin_port, "/healthz")
    assert health == (200, f"degraded: source IP down: {UNBOUND}\n".encode())
    _, metrics = await http_get(relay.admin_port, "/metrics")
    assert f'warmrelay_ip_up{{ip="{UNBOUND}"}} 0.0' in metrics.decode()
    await relay.terminate()


async def test_healthz_is_ok_when_every_ip_is_bound(tmp_path: Path, sink: Sink) -> None:
    async with running(relay_config(tmp_path, sink.port)) as relay:
        assert await http_get(relay.admin.port, "/healthz") == (200, b"ok\n")


# -- 2d. malformed shapes -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"smtp": {"listen": 2525}}, "smtp.listen: must be a list, not a number (2525)"),
        ({"smtp": {"listen": "127.0.0.1:25"}}, "smtp.listen: must be a list"),
        ({"smtp": {"listen": [5]}}, 'smtp.listen[0]: must be "host:port"'),
        ({"smtp": {"listen": [{"address": {"a": 1}}]}}, "smtp.listen[0].address: must be"),
        ({"smtp": 5}, "smtp: must be a mapping (key: value), not a number (5)"),
        ({"ips": 5}, "ips: must be a list, not a number (5)"),
        ({"ips": [5]}, "ips[0]: must be a mapping"),
        ({"ips": ["a"]}, "ips[0]: must be a mapping"),
        ({"routes": ["a"]}, "routes: must be a mapping (key: value), not a list"),
        ({"routes": {"*": ["127.0.0.1", {}]}}, "routes['*']: "),
        ({"routes": {"*": {"host": 1}}}, "routes['*']: must be \"host:port\""),
        ({"routes": {"*": "127.0.0.1:smtp"}}, "routes['*']: '127.0.0.1:smtp': the port must be"),
        ({"routes": {"a..b": "127.0.0.1:25"}}, "routes['a..b']: not a domain name"),
        ({"dns": {"nameservers": [{"a": 1}]}}, "dns.nameservers[0]: must be"),
        ({"admin": {"token_env": ""}}, "admin.token_env: '' is not an environment variable"),
        ({"providers": [1]}, "providers: must be a mapping"),
    ],
)
def test_malformed_shapes_are_problems_with_a_key_path(
    change: dict[str, Any], expected: str
) -> None:
    doc = relay_doc(Path("/nonexistent"), 9)
    doc.update(change)
    found = problems_of(doc)
    assert any(p.startswith(expected) for p in found), found
    assert not any("should have at least 1 item" in p for p in found), found  # no echo


def test_check_config_reports_a_bare_port_as_listen(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(
        "smtp: {listen: 2525}\nips:\n  - {address: 127.0.0.3, helo: mta2.example.test}\n"
    )
    result = warmrelay("check-config", "-c", str(path))
    assert result.returncode == 1
    assert "  smtp.listen: must be a list" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"ips: [\xff]\n", "is not UTF-8 text"),
        (b"a: " + b"[" * 3000 + b"]" * 3000, "nested too deeply"),
    ],
)
def test_unreadable_text_is_a_problem_not_a_crash(
    tmp_path: Path, content: bytes, expected: str
) -> None:
    path = tmp_path / "odd.yaml"
    path.write_bytes(content)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert expected in str(info.value)


# -- 2e. reload failures are logged -----------------------------------------------------------


async def test_reload_of_a_malformed_file_is_refused_with_its_key_path(
    tmp_path: Path, sink: Sink
) -> None:
    path = write(tmp_path, relay_doc(tmp_path, sink.port))
    async with running(load_config(path)) as relay:
        bad = relay_doc(tmp_path, sink.port)
        bad["smtp"]["listen"] = 2525
        path.write_text(yaml.safe_dump(bad))
        assert await relay.reload(path) is False  # refused: no TypeError escapes
        await send(relay, ["still@example.test"])  # the running configuration stays
        await sink.wait_for(1)


async def test_sighup_with_a_malformed_file_logs_an_error(
    tmp_path: Path, sink: Sink, relay_process: StartRelay
) -> None:
    relay = await relay_process(relay_doc(tmp_path, sink.port))
    bad = relay_doc(tmp_path, sink.port)
    bad["smtp"]["listen"] = 2525
    relay.config_path.write_text(yaml.safe_dump(bad))
    assert relay.proc is not None
    relay.proc.send_signal(signal.SIGHUP)
    line = await relay.wait_for_line("smtp.listen: must be a list")
    assert "ERROR" in line
    await relay.wait_for_line("the running configuration stays")
    assert await relay.terminate() == 0


async def test_a_failing_reload_task_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    async def failing() -> bool:
        raise RuntimeError("counters vanished mid-reload")

    async def fine() -> bool:
        return True

    tasks = [asyncio.create_task(failing()), asyncio.create_task(fine())]
    await asyncio.wait(tasks)
    for task in tasks:
        log_failed_reload(task)
    (record,) = [r for r in caplog.records if r.name == "warmrelay"]
    assert record.levelno == logging.ERROR
    assert "counters vanished mid-reload" in record.getMessage()
    assert "the running configuration stays" in record.getMessage()


def test_problems_are_data() -> None:
    """Warnings are ConfigProblem values (path, message), like errors."""
    doc = relay_doc(Path("/nonexistent"), 9, smtp={"allow_networks": ["192.0.2.0/24"]})
    (warning,) = config_warnings(parse_config(doc))
    assert isinstance(warning, ConfigProblem) and warning.path == "smtp.allow_networks[0]"


# -- 3. check-config refuses what serve refuses (issue 18) ------------------------------------
#
# The systemd unit runs check-config as ExecStartPre: a file it passes must not be one that
# serve then refuses. Each case runs both commands on one file and wants the same problem.

KEY_FILE = "dkim.domains['example.test'].keys[0].key_file"


def dkim_doc(tmp_path: Path, key: Path, algorithm: str = "rsa-sha256") -> dict[str, Any]:
    keys = [{"selector": "s1", "key_file": str(key), "algorithm": algorithm}]
    return relay_doc(tmp_path, 9, dkim={"domains": {"example.test": {"keys": keys}}})


def refused_alike(
    path: Path, env: Mapping[str, str] | None = None, prefix: Sequence[str] = ()
) -> tuple[list[str], list[str]]:
    """(check-config's error lines, serve's refusal lines), each without its framing;
    both exit 1 without a traceback."""
    check = warmrelay("check-config", "-c", str(path), env=env, prefix=prefix)
    serve = warmrelay("serve", "-c", str(path), env=env, prefix=prefix)
    for result in (check, serve):
        assert result.returncode == 1, result.stdout + result.stderr
        assert "Traceback" not in result.stderr, result.stderr
    errors = check.stderr.splitlines()
    assert errors[0].endswith(" error(s)"), check.stderr
    refusal = f"{path}: cannot start: "
    assert all(line.startswith(refusal) for line in serve.stderr.splitlines()), serve.stderr
    return [e.removeprefix("  ") for e in errors[1:]], [
        line.removeprefix(refusal) for line in serve.stderr.splitlines()
    ]


def assert_refused(path: Path, expected: str, env: Mapping[str, str] | None = None) -> None:
    checked, served = refused_alike(path, env)
    assert any(p.startswith(expected) for p in checked), checked
    assert any(p.startswith(expected) for p in served), served


def rsa_pem(bits: int = 2048) -> bytes:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def ed25519_public_pem() -> bytes:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    return (
        ed25519.Ed25519PrivateKey.generate()
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )


def test_check_config_refuses_a_missing_dkim_key(tmp_path: Path) -> None:
    key = tmp_path / "absent.pem"
    path = write(tmp_path, dkim_doc(tmp_path, key))
    assert_refused(path, f"{KEY_FILE}: cannot read {key}: No such file or directory")


KEY_CONTENTS: dict[str, Callable[[], bytes]] = {
    "garbage": lambda: b"-----BEGIN NONSENSE-----\nxyz\n",
    "a public key": ed25519_public_pem,
    "RSA-2048": rsa_pem,
    "RSA-1024": lambda: rsa_pem(1024),
}


@pytest.mark.parametrize(
    ("content", "algorithm", "expected"),
    [
        ("garbage", "rsa-sha256", "is not a PEM private key"),
        ("a public key", "rsa-sha256", "is not a PEM private key"),
        ("RSA-2048", "ed25519-sha256", "is not an Ed25519 key (algorithm is ed25519-sha256)"),
        ("RSA-1024", "rsa-sha256", "is a 1024-bit RSA key"),
    ],
)
def test_check_config_refuses_a_key_file_that_is_no_usable_key(
    tmp_path: Path, content: str, algorithm: str, expected: str
) -> None:
    key = tmp_path / "key.pem"
    key.write_bytes(KEY_CONTENTS[content]())
    key.chmod(0o600)
    path = write(tmp_path, dkim_doc(tmp_path, key, algorithm))
    assert_refused(path, f"{KEY_FILE}: {key} {expected}")


def without_root_rights() -> list[str]:
    """A command prefix that takes away root's right to read and write any file
    (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH): the tests run as root in CI, and the service
    runs as its own user. Empty when not root (the rights are not there to drop)."""
    if os.geteuid() != 0:
        return []
    tool = shutil.which("setpriv")
    if tool is None:
        pytest.skip("setpriv (util-linux) is not installed")
    drop = "-dac_override,-dac_read_search"
    return [tool, f"--inh-caps={drop}", f"--bounding-set={drop}"]


def not_ours(path: Path, mode: int) -> None:
    """Make ``path`` another user's with ``mode`` (as root), or leave us only the rights
    of others in ``mode`` (as anyone else)."""
    if os.geteuid() == 0:
        path.chmod(mode)
        os.chown(path, 65534, 65534)
    else:
        path.chmod((mode & 0o007) * 0o111)


@pytest.mark.parametrize("layout", ["missing", "exists", "hidden"])
def test_check_config_refuses_an_unreadable_key_and_state_dir(tmp_path: Path, layout: str) -> None:
    """A key file of mode 0600 and a state directory of another user (e.g. created by a
    run as root before the service's first start as its own user)."""
    key = tmp_path / "key.pem"
    key.write_bytes(rsa_pem())
    not_ours(key, 0o600)
    other = tmp_path / "other"
    other.mkdir()
    not_ours(other, 0o700 if layout == "hidden" else 0o755)
    state = other if layout == "exists" else other / "state"
    doc = dkim_doc(tmp_path, key)
    doc["state"]["dir"] = str(state)
    checked, served = refused_alike(write(tmp_path, doc), prefix=without_root_rights())
    expected = {
        "missing": f"{state} cannot be created: {other}: Permission denied",
        "exists": f"{state} is not writable: Permission denied",
        "hidden": f"{state} cannot be reached: Permission denied",  # not even a stat
    }
    for problem in (
        f"{KEY_FILE}: cannot read {key}: Permission denied",
        f"state.dir: {expected[layout]}",
    ):
        assert problem in checked, checked
        assert problem in served, served


def test_check_config_refuses_a_state_dir_under_a_file(tmp_path: Path) -> None:
    afile = tmp_path / "afile"
    afile.write_text("")
    doc = relay_doc(tmp_path, 9, state={"dir": str(afile / "state")})
    path = write(tmp_path, doc)
    assert_refused(
        path, f"state.dir: {afile / 'state'} cannot be created: {afile} is not a directory"
    )
    assert_refused(
        write(tmp_path, relay_doc(tmp_path, 9, state={"dir": str(afile)})),
        f"state.dir: {afile} is not a directory",
    )


def test_check_config_refuses_a_read_only_state_dir(tmp_path: Path, tmpfs: Tmpfs) -> None:
    """A read-only file system (EROFS for root too)."""
    ro = tmpfs(tmp_path / "ro", "1m", read_only=True).path
    doc = relay_doc(tmp_path, 9, state={"dir": str(ro)})
    assert_refused(write(tmp_path, doc), f"state.dir: {ro} is not writable: Read-only file system")
    doc = relay_doc(tmp_path, 9, state={"dir": str(ro / "state")})
    assert_refused(
        write(tmp_path, doc),
        f"state.dir: {ro / 'state'} cannot be created: {ro}: Read-only file system",
    )


def test_check_config_refuses_a_read_only_spool(tmp_path: Path, tmpfs: Tmpfs) -> None:
    """serve refuses a read-only spool (every later start would deliver its mail again)."""
    state = tmp_path / "state"
    spool = tmpfs(state / "spool", "1m", read_only=True).path
    path = write(tmp_path, relay_doc(tmp_path, 9))
    assert_refused(path, f"state.dir: {spool} is not writable: Read-only file system")


def test_check_config_refuses_tls_files_serve_cannot_load(tmp_path: Path) -> None:
    import trustme

    leaf = trustme.CA().issue_cert("relay.test")
    cert, key, other = tmp_path / "cert.pem", tmp_path / "key.pem", tmp_path / "other.pem"
    leaf.private_key_and_cert_chain_pem.write_to_path(str(cert))
    leaf.private_key_pem.write_to_path(str(key))
    trustme.CA().issue_cert("relay.test").private_key_pem.write_to_path(str(other))
    absent = tmp_path / "absent.pem"
    doc = relay_doc(tmp_path, 9, smtp={"tls": {"cert": str(absent), "key": str(key)}})
    assert_refused(write(tmp_path, doc), f"smtp.tls.cert: cannot read {absent}: No such file")
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    doc = relay_doc(tmp_path, 9, smtp={"tls": {"cert": str(garbage), "key": str(key)}})
    assert_refused(write(tmp_path, doc), f"smtp.tls.cert: {garbage} is not a PEM certificate")
    doc = relay_doc(tmp_path, 9, smtp={"tls": {"cert": str(cert), "key": str(other)}})
    assert_refused(write(tmp_path, doc), f"smtp.tls.key: {other} is not the key of {cert}")


def test_check_config_refuses_an_unset_admin_token(tmp_path: Path) -> None:
    """serve refuses to start without it; ExecStartPre runs with the service's environment."""
    path = write(tmp_path, relay_doc(tmp_path, 9, admin={"token_env": TOKEN_ENV}))
    assert_refused(
        path,
        f"admin.token_env: the environment variable {TOKEN_ENV} is not set or empty",
        env_without(TOKEN_ENV),
    )


def test_check_config_and_serve_list_the_same_problems(tmp_path: Path) -> None:
    """One function decides what serve refuses at start; check-config lists its answer."""
    afile = tmp_path / "afile"
    afile.write_text("")
    doc = dkim_doc(tmp_path, tmp_path / "absent.pem")
    doc["state"]["dir"] = str(afile / "state")
    doc["admin"]["token_env"] = TOKEN_ENV
    doc["smtp"]["tls"] = {"cert": str(tmp_path / "c.pem"), "key": str(tmp_path / "k.pem")}
    checked, served = refused_alike(write(tmp_path, doc), env_without(TOKEN_ENV))
    assert checked == served
    assert [p.partition(":")[0] for p in checked] == [
        "admin.token_env",
        KEY_FILE,
        "smtp.tls.cert",
        "smtp.tls.key",
        "state.dir",
    ]


def test_check_config_creates_nothing(tmp_path: Path) -> None:
    path = write(tmp_path, relay_doc(tmp_path, 9))
    result = warmrelay("check-config", "-c", str(path))
    assert result.returncode == 0, result.stderr
    assert not (tmp_path / "state").exists()  # serve creates it; a check does not


def test_start_problems_of_a_good_file_are_none(tmp_path: Path) -> None:
    assert start_problems(relay_config(tmp_path, 9)) == []
    assert not (tmp_path / "state").exists()


def test_check_config_refuses_listening_addresses_not_on_this_host(tmp_path: Path) -> None:
    doc = relay_doc(tmp_path, 9, smtp={"listen": ["127.0.0.1:0", f"{UNBOUND}:2525"]})
    doc["admin"]["listen"] = f"{UNBOUND}:9465"
    checked, served = refused_alike(write(tmp_path, doc))
    assert (
        checked
        == served
        == [
            f"smtp.listen[1].address: {UNBOUND}:2525 cannot be bound on this host: "
            "Cannot assign requested address",
            f"admin.listen: {UNBOUND}:9465 cannot be bound on this host: "
            "Cannot assign requested address",
        ]
    )


def test_a_port_in_use_is_no_problem_for_check_config(tmp_path: Path) -> None:
    """The relay being checked (before a reload) holds its ports."""
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        doc = relay_doc(tmp_path, 9, smtp={"listen": [f"127.0.0.1:{port}"]})
        result = warmrelay("check-config", "-c", str(write(tmp_path, doc)))
    assert result.returncode == 0, result.stderr


# -- 4. a port in use at start: the key, the address, one line ------------------------------


@pytest.mark.parametrize("workers", [(), ("--workers", "2")])
@pytest.mark.parametrize("which", ["smtp", "admin"])
def test_a_port_in_use_names_its_key(tmp_path: Path, which: str, workers: tuple[str, ...]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        doc = relay_doc(tmp_path, 9)
        if which == "smtp":
            doc["smtp"]["listen"] = [f"127.0.0.1:{port}"]
            key = "smtp.listen[0]"
        else:
            doc["admin"] = {"listen": f"127.0.0.1:{port}"}
            key = "admin.listen"
        path = write(tmp_path, doc)
        served = warmrelay("serve", "-c", str(path), *workers)
    assert served.returncode == 1
    assert "Traceback" not in served.stderr, served.stderr
    refusal = [line for line in served.stderr.splitlines() if "cannot start" in line]
    assert len(refusal) == 1, served.stderr
    assert refusal[0].endswith(
        f"{path}: cannot start: {key} 127.0.0.1:{port}: address already in use"
    )


@pytest.mark.parametrize("workers", [(), ("--workers", "2")])
async def test_a_key_readable_by_others_is_said_once(
    tmp_path: Path, sink: Sink, workers: tuple[str, ...], relay_process: StartRelay
) -> None:
    """Checked before the start, loaded at the start, by every worker and at each reload:
    the warning is one line all the same."""
    key = tmp_path / "k.pem"
    key.write_bytes(rsa_pem())
    key.chmod(0o644)
    doc = dkim_doc(tmp_path, key)
    doc["routes"] = {"*": f"127.0.0.1:{sink.port}"}
    relay = await relay_process(doc, *workers)
    assert relay.proc is not None
    relay.proc.send_signal(signal.SIGHUP)
    await relay.wait_for_line("reload: ")
    assert await relay.terminate() == 0
    said = [line for line in relay.log if "readable by others" in line]
    assert len(said) == 1, said


def test_check_config_refuses_reputation_feeds_it_could_never_read(tmp_path: Path) -> None:
    """A feed without its secret or key file would be unknown every day: the ramp would hold
    for good. serve and check-config refuse it by name; with both set the file passes."""
    key_file = tmp_path / "postmaster.json"
    reputation = {
        "snds": {"url_env": "WR_TEST_SNDS_URL"},
        "gmail_postmaster": {"credentials_file": str(key_file), "domains": ["example.test"]},
    }
    path = write(tmp_path, relay_doc(tmp_path, 9, reputation=reputation))
    env = {k: v for k, v in os.environ.items() if k != "WR_TEST_SNDS_URL"}
    checked, served = refused_alike(path, env)
    for problems in (checked, served):
        assert (
            "reputation.snds.url_env: the environment variable WR_TEST_SNDS_URL is not set or "
            "empty (it holds the SNDS automated-access URL with its key)"
        ) in problems
        assert (
            "reputation.gmail_postmaster.credentials_file: cannot read the service account "
            f"file {key_file}: no such file or directory"
        ) in problems
    key_file.write_text('{"type": "service_account", "client_email": "x@y"}')
    checked, _ = refused_alike(path, env)
    assert any(
        p.startswith(f"reputation.gmail_postmaster.credentials_file: {key_file} is not a service")
        for p in checked
    ), checked
    key_file.write_text(
        json.dumps(
            {
                "type": "service_account",
                "client_email": "warmrelay@project.iam.gserviceaccount.com",
                "private_key": rsa_pem().decode(),
                "private_key_id": "1",
                "token_uri": "http://127.0.0.1:9/token",
            }
        )
    )
    passed = warmrelay("check-config", "-c", str(path), env={**env, "WR_TEST_SNDS_URL": "x"})
    assert passed.returncode == 0, passed.stderr


def test_check_config_refuses_an_event_webhook_without_its_secret(tmp_path: Path) -> None:
    """Unsigned events would let anyone feed the application's suppression list: serve
    and check-config refuse a webhook whose secret is unset or short; http to another
    host is a warning (the events carry recipient addresses)."""
    hook = {"url": "http://hooks.example.test/mail", "secret_env": "WR_TEST_HOOK_SECRET"}
    path = write(tmp_path, relay_doc(tmp_path, 9, events={"webhook": hook}))
    env = {k: v for k, v in os.environ.items() if k != "WR_TEST_HOOK_SECRET"}
    expected = (
        "events.webhook.secret_env: the environment variable WR_TEST_HOOK_SECRET is not set or "
        "empty; refusing to post unsigned events"
    )
    assert_refused(path, expected, env)
    assert_refused(path, "events.webhook.secret_env: the environment variable "
                   "WR_TEST_HOOK_SECRET is shorter than 16 bytes",
                   {**env, "WR_TEST_HOOK_SECRET": "short"})  # fmt: skip
    passed = warmrelay(
        "check-config", "-c", str(path), env={**env, "WR_TEST_HOOK_SECRET": "x" * 32}
    )
    assert passed.returncode == 0, passed.stderr
    assert (
        "events.webhook.url: http://hooks.example.test/mail is plain http to another host"
        in passed.stderr
    )
