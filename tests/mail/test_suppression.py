"""Suppression of dead addresses: a hard bounce, refusal at RCPT, expiry, CLI, admin, fleet."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest
import yaml
from support.dnsserver import LoopbackDNS
from support.polling import eventually
from support.redisserver import RedisServer, free_port
from support.relay import http, http_get, relay_config, relay_doc, running, send
from support.sink import Sink

from warmrelay.app import Relay
from warmrelay.cli import main
from warmrelay.config import parse_config
from warmrelay.delivery.replies import Reply, Stage
from warmrelay.mail.suppression import hard_status
from warmrelay.warmup.counters import Counters, MemoryCounters, SqliteCounters
from warmrelay.warmup.counters.redis import RedisCounters

DEAD = "dead@example.test"
BOUNCE = f"550 5.1.1 <{DEAD}>: Recipient address rejected: User unknown in virtual table"
STATUSES = ("5.1.1", "5.1.2", "5.1.10", "5.2.1")
TOKEN_ENV = "WARMRELAY_TEST_SUPPRESSION_TOKEN"


async def rcpt(relay: Relay, address: str) -> tuple[int, str]:
    """One RCPT (then the session ends without DATA): the relay's answer to it."""
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=relay.smtp_ports[0])
    async with client:
        await client.ehlo()
        await client.mail("app@sender.test")
        try:
            reply = await client.rcpt(address)
        except aiosmtplib.SMTPRecipientRefused as exc:
            return exc.code, exc.message
        return reply.code, reply.message


async def listed(relay: Relay) -> list[str]:
    return [e["address"] for e in (await relay.suppression_list())["entries"]]


def dsns(sink: Sink) -> list[bytes]:
    return [m.data for m in sink.messages if m.mail_from == ""]


def metric(text: str, event: str) -> float:
    prefix = f'warmrelay_suppressed_total{{event="{event}"}} '
    for line in text.splitlines():
        if line.startswith(prefix):
            return float(line.removeprefix(prefix))
    return 0.0


class Clock:
    """The relay's clock, moved forward by the test."""

    def __init__(self) -> None:
        self.offset = timedelta(0)

    def __call__(self) -> datetime:
        return datetime.now(UTC) + self.offset


# -- what counts as a hard bounce -----------------------------------------------------------


@pytest.mark.parametrize(
    ("reply", "status"),
    [
        (Reply(550, "5.1.1 <a@x.test>: no such user", "mx[1.2.3.4]:25", Stage.RCPT), "5.1.1"),
        (Reply(550, "5.2.1 mailbox disabled", "mx[1.2.3.4]:25", Stage.RCPT), "5.2.1"),
        (Reply(550, "5.1.2 bad destination system", "mx[1.2.3.4]:25", Stage.RCPT), "5.1.2"),
        (Reply(550, "User unknown", "mx[1.2.3.4]:25", Stage.RCPT), "5.1.1"),  # no status
        (Reply(556, "5.1.10 x.test: null MX", ""), "5.1.10"),  # our DNS verdicts
        (Reply(550, "5.1.2 x.test: no such domain", ""), "5.1.2"),
        (Reply(550, "5.7.1 rejected by policy", "mx[1.2.3.4]:25", Stage.RCPT), None),
        (Reply(552, "5.2.2 mailbox full", "mx[1.2.3.4]:25", Stage.RCPT), None),
        (Reply(550, "rejected", "mx[1.2.3.4]:25", Stage.RCPT), None),
        (Reply(450, "4.1.1 try later", "mx[1.2.3.4]:25", Stage.RCPT), None),
        (Reply(421, "4.7.0 too many connections", "mx[1.2.3.4]:25", Stage.RCPT), None),
        # for every recipient of the transaction: which one is dead is unknown
        (Reply(550, "5.1.1 no such user", "mx[1.2.3.4]:25", Stage.DATA, accepted=True), None),
        (Reply(550, "5.1.1 sender unknown", "mx[1.2.3.4]:25", Stage.MAIL), None),
        (Reply(554, "5.1.1 go away", "mx[1.2.3.4]:25", Stage.CONNECT), None),
    ],
)
def test_the_enhanced_status_decides(reply: Reply, status: str | None) -> None:
    assert hard_status(reply, STATUSES) == status


# -- the store: one record per address, listed by prefix, on every backend ------------------


@pytest.fixture(params=["memory", "sqlite", "redis"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Counters]:
    if request.param == "memory":
        yield MemoryCounters()
        return
    server = RedisServer(tmp_path / "redis") if request.param == "redis" else None
    counters: Counters | None = None
    try:
        if server is not None:
            await server.start()
            counters = RedisCounters(server.url)
        else:
            counters = SqliteCounters(tmp_path / "c.sqlite3")
        yield counters
    finally:
        if counters is not None:
            await counters.close()
        if server is not None:
            await server.stop()


async def test_values_are_listed_by_key_prefix(store: Counters) -> None:
    inside = {
        "suppressed:a@x.test": "1",
        "suppressed:*[?]\\@x.test": "2",  # glob characters are not patterns (Redis SCAN)
        "suppressed:ü@x.test": "3",
    }
    for key, value in {**inside, "suppressed;": "no", "suppresse": "no", "ip:1": "no"}.items():
        await store.set_value(key, value)
    assert await store.list_values("suppressed:") == inside
    assert await store.list_values("nothing:") == {}
    await store.set_value("suppressed:a@x.test", None)
    assert set(await store.list_values("suppressed:")) == set(inside) - {"suppressed:a@x.test"}


# -- end to end -----------------------------------------------------------------------------


async def test_a_hard_bounce_suppresses_the_address(
    tmp_path: Path, make_sink: Callable[..., Awaitable[Sink]]
) -> None:
    tried: list[str] = []

    def receiver(peer: str, address: str) -> str | None:
        tried.append(address)
        return BOUNCE if address == DEAD else None

    sink = await make_sink(rcpt_reply=receiver)
    async with running(relay_config(tmp_path, sink.port)) as relay:
        await send(relay, [DEAD], sender="app@sender.test")
        (dsn,) = await sink.wait_for(1)  # the first bounce still gets its DSN
        assert dsn.mail_from == "" and dsn.rcpts == ["app@sender.test"]
        assert b"Status: 5.1.1" in dsn.data and DEAD.encode() in dsn.data
        assert await listed(relay) == [DEAD]

        with pytest.raises(aiosmtplib.SMTPRecipientsRefused) as refused:
            await send(relay, ["Dead@EXAMPLE.test"])  # compared lower-cased
        (answer,) = refused.value.recipients
        assert answer.code == 550
        since = datetime.now(UTC).strftime("%Y-%m-%dT%H")
        assert answer.message.startswith(f"5.1.1 <Dead@EXAMPLE.test>: suppressed since {since}")
        assert answer.message.endswith(f'after "{BOUNCE}"')

        # one message to a dead and a live address: only the live one is taken and leaves
        await send(relay, [DEAD, "alive@example.test"])
        await sink.wait_for(2)
        assert sink.messages[1].rcpts == ["alive@example.test"]
        assert tried.count(DEAD) == 1  # nothing more reached the receiver for it
        _, text = await http_get(relay.admin.port, "/metrics")
        assert metric(text.decode(), "added") == 1
        assert metric(text.decode(), "refused") == 2


async def test_a_session_with_many_suppressed_addresses_is_not_hung_up(
    tmp_path: Path, sink: Sink
) -> None:
    config = relay_config(tmp_path, sink.port, smtp={"max_bad_commands": 3})
    async with running(config) as relay:
        dead = [f"gone{i}@example.test" for i in range(5)]
        for address in dead:
            await relay.suppression_action(address, "add")
        refused, _ = await send(relay, [*dead, "alive@example.test"])
        assert {a: r[0] for a, r in refused.items()} == dict.fromkeys(dead, 550)
        (msg,) = await sink.wait_for(1)
        assert msg.rcpts == ["alive@example.test"]


async def test_an_entry_expires_after_the_ttl(
    tmp_path: Path, make_sink: Callable[..., Awaitable[Sink]]
) -> None:
    dead = True
    sink = await make_sink(rcpt_reply=lambda peer, a: BOUNCE if a == DEAD and dead else None)
    clock = Clock()
    config = relay_config(tmp_path, sink.port, suppression={"ttl_s": 3600})
    async with running(config, clock=clock) as relay:
        await send(relay, [DEAD], sender="app@sender.test")
        await sink.wait_for(1)  # the DSN
        code, _ = await rcpt(relay, DEAD)
        assert code == 550
        clock.offset = timedelta(seconds=3599)
        code, _ = await rcpt(relay, DEAD)
        assert code == 550

        clock.offset = timedelta(seconds=3601)
        dead = False  # the mailbox exists again
        await send(relay, [DEAD])  # accepted again
        (_, msg) = await sink.wait_for(2)
        assert msg.rcpts == [DEAD]

        async def cleaned_up() -> bool:
            return await relay.counters.get_value(f"suppressed:{DEAD}") is None

        await eventually(cleaned_up, what="the expired entry removed from the store")
        assert await listed(relay) == []
        _, text = await http_get(relay.admin.port, "/metrics")
        assert metric(text.decode(), "expired") == 1


async def test_refusals_about_policy_or_for_now_do_not_suppress(
    tmp_path: Path, make_sink: Callable[..., Awaitable[Sink]]
) -> None:
    tries: dict[str, int] = {}

    def receiver(peer: str, address: str) -> str | None:
        tries[address] = tries.get(address, 0) + 1
        if address.startswith("policy@"):
            return "550 5.7.1 Message rejected due to local policy"
        if address.startswith("later@") and tries[address] == 1:
            return "421 4.7.0 Try again later"
        if address.startswith("busy@") and tries[address] == 1:
            return "450 4.2.1 Mailbox busy"
        return None

    sink = await make_sink(
        rcpt_reply=receiver,
        data_reply=lambda peer, env: (
            "550 5.1.1 no such user" if "data@x.test" in env.rcpt_tos else None
        ),
    )
    async with running(relay_config(tmp_path, sink.port)) as relay:
        for address in ("policy@x.test", "later@x.test", "busy@x.test", "data@x.test"):
            await send(relay, [address], sender="app@sender.test")
        await sink.wait_until(
            lambda: len(dsns(sink)) == 2 and len(sink.messages) == 4
        )  # policy and data bounced; later and busy delivered on their retry
        assert await listed(relay) == []
        for address in ("policy@x.test", "later@x.test", "busy@x.test", "data@x.test"):
            assert (await rcpt(relay, address))[0] == 250


async def test_null_mx_and_no_such_domain_suppress(tmp_path: Path, sink: Sink) -> None:
    async with LoopbackDNS() as dns:
        dns.add_mx("nullmx.test", 0, ".")  # RFC 7505; nowhere.test: NXDOMAIN
        dns.set_servfail("flaky.test")  # a lookup failure is no verdict
        config = relay_config(
            tmp_path,
            sink.port,
            routes={"sender.test": f"127.0.0.1:{sink.port}"},
            dns={"nameservers": [f"127.0.0.1:{dns.port}"], "timeout_s": 2},
            delivery={"retry_first_s": 3600},
        )
        async with running(config) as relay:
            await send(relay, ["a@nullmx.test", "b@nowhere.test", "c@flaky.test"])
            await sink.wait_until(lambda: len(dsns(sink)) == 2)
            assert await listed(relay) == ["a@nullmx.test", "b@nowhere.test"]
            _, message = await rcpt(relay, "a@nullmx.test")
            assert "suppressed since" in message and 'after "556 5.1.10 nullmx.test' in message
            assert (await rcpt(relay, "c@flaky.test"))[0] == 250


async def test_the_list_survives_a_restart(tmp_path: Path, sink: Sink) -> None:
    config = relay_config(tmp_path, sink.port)
    async with running(config) as relay:
        await relay.suppression_action(DEAD, "add")
    async with running(config) as relay:
        code, message = await rcpt(relay, DEAD)
        assert code == 550 and 'after "added by the operator"' in message


# -- admin endpoints and the command line ---------------------------------------------------


async def test_admin_endpoints_follow_the_token_rules(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(TOKEN_ENV, "s3cret-token")
    config = relay_config(tmp_path, 9, admin={"token_env": TOKEN_ENV})
    async with running(config) as relay:
        port, token = relay.admin.port, "s3cret-token"
        assert (await http(port, "GET", "/suppression"))[0] == 401  # addresses: private
        assert (await http(port, "POST", "/suppression/a+b@x.test/add"))[0] == 401
        assert (await http(port, "POST", "/suppression/a+b@x.test/add", "wrong"))[0] == 401
        code, body = await http(port, "POST", "/suppression/A+B@X.test/add", token)
        assert code == 200
        added = json.loads(body)
        assert (added["address"], added["by"], added["persisted"]) == (
            "a+b@x.test",
            "operator",
            "stored",
        )
        assert (await rcpt(relay, "a+b@x.test"))[0] == 550  # at once, no refresh needed
        code, body = await http(port, "GET", "/suppression", token)
        assert code == 200
        listing = json.loads(body)
        assert (listing["count"], listing["ttl_s"]) == (1, 30 * 86400.0)
        assert listing["entries"][0]["address"] == "a+b@x.test"
        assert (await http(port, "POST", "/suppression/a%2Fb@x.test/remove", token))[0] == 404
        assert (await http(port, "POST", "/suppression/not-an-address/add", token))[0] == 400
        assert (await http(port, "POST", "/suppression/a@x.test/purge", token))[0] == 400
        assert (await http(port, "GET", "/suppression/a@x.test/add", token))[0] == 405
        code, body = await http(port, "POST", "/suppression/a+b@x.test/remove", token)
        assert (code, json.loads(body)["removed"]) == (200, True)
        assert (await rcpt(relay, "a+b@x.test"))[0] == 250
        _, text = await http_get(port, "/metrics")
        assert metric(text.decode(), "removed") == 1


def write_config(tmp_path: Path, doc: dict[str, Any]) -> str:
    path = tmp_path / "warmrelay.yaml"
    path.write_text(yaml.safe_dump(doc))
    return str(path)


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_works_on_the_store_when_no_relay_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    doc = relay_doc(tmp_path, 9, admin={"listen": f"127.0.0.1:{free_port()}"})  # nobody there
    path = write_config(tmp_path, doc)
    code, out, _ = run_cli(capsys, "suppression", "add", "Bob@Example.test", "-c", path)
    assert code == 0 and "bob@example.test: suppressed until" in out
    assert "no relay running" in out
    code, out, _ = run_cli(capsys, "suppression", "list", "-c", path)
    assert code == 0 and "bob@example.test" in out and "added by the operator" in out
    code, out, _ = run_cli(capsys, "suppression", "list", "-c", path, "--json")
    assert [e["address"] for e in json.loads(out)["entries"]] == ["bob@example.test"]
    code, _, err = run_cli(capsys, "suppression", "list", "nobody@example.test", "-c", path)
    assert code == 1 and "not suppressed" in err
    code, out, _ = run_cli(capsys, "suppression", "remove", "bob@example.test", "-c", path)
    assert code == 0 and "removed" in out
    code, _, err = run_cli(capsys, "suppression", "remove", "bob@example.test", "-c", path)
    assert code == 1 and "not on the suppression list" in err
    code, _, err = run_cli(capsys, "suppression", "add", "no-at-sign", "-c", path)
    assert code == 1 and "not an email address" in err
    code, _, _ = run_cli(capsys, "suppression", "add", "-c", path)
    assert code == 2

    async def stored() -> dict[str, str]:
        counters = SqliteCounters(tmp_path / "state" / "counters.sqlite3")
        try:
            return await counters.list_values("suppressed:")
        finally:
            await counters.close()

    assert asyncio.run(stored()) == {}


async def test_cli_goes_through_the_running_relay(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(TOKEN_ENV, "cli-token")
    doc = relay_doc(
        tmp_path, 9, admin={"listen": f"127.0.0.1:{free_port()}", "token_env": TOKEN_ENV}
    )
    path = write_config(tmp_path, doc)

    async def cli(*argv: str) -> tuple[int, str, str]:
        return await asyncio.to_thread(run_cli, capsys, *argv)

    async with running(parse_config(doc)) as relay:
        code, out, _ = await cli("suppression", "add", DEAD, "-c", path)
        assert code == 0 and "by the running relay" in out
        assert (await rcpt(relay, DEAD))[0] == 550  # the relay's own list changed at once
        code, out, _ = await cli("suppression", "list", DEAD, "-c", path, "--json")
        assert code == 0 and json.loads(out)["entries"][0]["address"] == DEAD
        code, out, _ = await cli("suppression", "remove", DEAD, "-c", path)
        assert code == 0 and "by the running relay" in out
        assert (await rcpt(relay, DEAD))[0] == 250
        monkeypatch.setenv(TOKEN_ENV, "wrong")
        code, _, err = await cli("suppression", "list", "-c", path)
        assert code == 1 and "401" not in err
        assert err.strip() == (
            f"suppression list: the running relay did not accept the admin token in {TOKEN_ENV}"
        )


# -- a fleet on one Redis -------------------------------------------------------------------


async def test_a_fleet_on_one_redis_shares_the_list(
    tmp_path: Path, redis_server: RedisServer, make_sink: Callable[..., Awaitable[Sink]]
) -> None:
    sink = await make_sink(rcpt_reply=lambda peer, a: BOUNCE if a == DEAD else None)

    def config(name: str) -> Any:
        state = {"dir": str(tmp_path / name), "counters": redis_server.url}
        return relay_config(tmp_path, sink.port, state=state, suppression={"refresh_s": 0.2})

    async with running(config("a")) as a, running(config("b")) as b:
        assert (await rcpt(b, DEAD))[0] == 250  # B knows nothing yet
        await send(a, [DEAD], sender="app@sender.test")  # bounces through A
        await sink.wait_for(1)

        async def refused_by_b() -> bool:
            return (await rcpt(b, DEAD))[0] == 550

        await eventually(refused_by_b, what="B refuses it")  # a few refresh intervals
        _, message = await rcpt(b, DEAD)
        assert f'after "{BOUNCE}"' in message

        await b.suppression_action(DEAD, "remove")  # and back: removed through B

        async def accepted_by_a() -> bool:
            return (await rcpt(a, DEAD))[0] == 250

        await eventually(accepted_by_a, what="A accepts it again")
