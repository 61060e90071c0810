"""The queue tools: on a running relay (admin API and `warmrelay queue`), and offline on
the spool. The sink refuses with 451 until a test lets it accept; retries are minutes
apart, so only a flush (or a release) can explain a delivery within the test."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import subprocess
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import aiosmtplib
import pytest
import yaml
from support.cli import warmrelay, warmrelay_async
from support.polling import eventually
from support.relay import relay_doc, running, send
from support.relayproc import RelayProcess
from support.sink import Sink

from warmrelay.config import parse_config

TOKEN_ENV = "WARMRELAY_TEST_QUEUE_TOKEN"
SLOW_RETRY = {"retry_first_s": 600, "retry_max_s": 3600, "drain_timeout_s": 5}


class Gate:
    """The sink's answer at RCPT: 451 while closed (a deferral), accepted once opened."""

    def __init__(self) -> None:
        self.closed = True
        self.refused = 0

    def __call__(self, peer: str, rcpt: str) -> str | None:
        if self.closed and not rcpt.startswith("<>"):
            self.refused += 1
            return "451 4.7.1 Try again later (test gate)"
        return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def doc(tmp_path: Path, sink: Sink, **over: Any) -> dict[str, Any]:
    """The CLI reads the file: the admin port in it must be the one the relay listens on."""
    over.setdefault("admin", {"listen": f"127.0.0.1:{free_port()}"})
    return relay_doc(tmp_path, sink.port, delivery=SLOW_RETRY, **over)


async def api(
    port: int, method: str, path: str, body: dict[str, Any] | None = None, token: str | None = None
) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with (
        aiohttp.ClientSession() as session,
        session.request(
            method, f"http://127.0.0.1:{port}{path}", json=body, headers=headers
        ) as response,
    ):
        return response.status, await response.json()


async def until_deferred(port: int, n: int) -> list[dict[str, Any]]:
    """Wait (polling the API the operator would use, bounded) until n messages are deferred."""
    found: list[dict[str, Any]] = []

    async def deferred() -> bool:
        _, listing = await api(port, "GET", "/queue?state=deferred")
        found[:] = listing["messages"]
        return bool(listing["count"] >= n)

    await eventually(deferred, timeout_s=30, what=f"{n} message(s) deferred")
    return found


async def cli(config_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`warmrelay queue ...` as a separate process (the relay in this loop keeps serving)."""
    return await warmrelay_async("queue", *args, "-c", str(config_path))


def proc_text(path: str) -> str:
    """A /proc file (memory, never blocks on a disk)."""
    with open(path) as f:
        return f.read()


def write(tmp_path: Path, document: dict[str, Any]) -> Path:
    path = tmp_path / "relay.yaml"
    path.write_text(yaml.safe_dump(document))
    return path


async def test_flush_delivers_a_deferred_message_at_once(tmp_path: Path, sink: Sink) -> None:
    gate = Gate()
    sink.rcpt_reply = gate
    document = doc(tmp_path, sink)
    path = write(tmp_path, document)
    async with running(parse_config(document)) as relay:
        port = relay.admin.port
        await send(relay, ["a@one.test"])
        await send(relay, ["b@two.test"])
        deferred = await until_deferred(port, 2)
        assert {m["state"] for m in deferred} == {"deferred"}
        assert all(m["next_retry"] and "451 4.7.1" in m["last_reply"] for m in deferred)

        result = await cli(path, "list", "--json", "--domain", "one.test")
        assert result.returncode == 0, result.stderr
        listed = json.loads(result.stdout)
        assert [m["pending"] for m in listed["messages"]] == [["a@one.test"]]
        text = await cli(path, "list")
        assert "deferred" in text.stdout and "2 message(s) (by the running relay)" in text.stdout

        summary = await cli(path, "summary", "--json")
        shape = json.loads(summary.stdout)
        assert shape["messages"] == 2 and shape["states"]["deferred"] == 2
        assert {d["domain"]: d["total"] for d in shape["domains"]} == {"one.test": 1, "two.test": 1}

        gate.closed = False
        flushed = await cli(path, "flush", "--domain", "one.test")
        assert flushed.returncode == 0, flushed.stderr
        arrived = await sink.wait_for(1)
        assert arrived[0].rcpts == ["a@one.test"]
        # the other one was not flushed: it still waits for its retry, minutes away
        _, left = await api(port, "GET", "/queue")
        assert [m["pending"] for m in left["messages"]] == [["b@two.test"]]
        assert left["messages"][0]["state"] == "deferred"
        assert (await cli(path, "flush", "--all")).returncode == 0
        await sink.wait_for(2)
        assert relay.scheduler.messages == 0


async def test_show_gives_envelope_headers_and_each_attempt(tmp_path: Path, sink: Sink) -> None:
    sink.rcpt_reply = Gate()
    document = doc(tmp_path, sink)
    path = write(tmp_path, document)
    async with running(parse_config(document)) as relay:
        await send(relay, ["x@one.test", "y@one.test"], subject="invoice 42")
        [message] = await until_deferred(relay.admin.port, 1)
        shown = await cli(path, "show", message["queue_id"], "--json")
        assert shown.returncode == 0, shown.stderr
        detail = json.loads(shown.stdout)
        assert detail["from"] == "app@sender.test"
        assert ["Subject", "invoice 42"] in detail["headers"]
        for r in detail["recipients"]:
            assert r["status"] == "pending"
            [attempt] = r["attempts"]
            assert attempt["result"] == "deferred" and attempt["reply"].startswith("451 4.7.1")
            assert attempt["ip"] in ("127.0.0.2", "127.0.0.3")
        text = await cli(path, "show", message["queue_id"])
        assert "to:        <x@one.test>  pending" in text.stdout
        missing = await cli(path, "show", "0000000000000000")
        assert missing.returncode == 1 and "404" not in missing.stderr


async def test_hold_keeps_mail_back_across_a_restart_until_release(
    tmp_path: Path, sink: Sink
) -> None:
    gate = Gate()
    sink.rcpt_reply = gate
    document = doc(tmp_path, sink)
    path = write(tmp_path, document)
    config = parse_config(document)
    async with running(config) as relay:
        await send(relay, ["h@one.test"])
        [message] = await until_deferred(relay.admin.port, 1)
        queue_id = message["queue_id"]
        held = await cli(path, "hold", queue_id)
        assert held.returncode == 0 and queue_id in held.stdout
        gate.closed = False
        await cli(path, "flush", "--all")  # a flush does not override the operator's hold
        _, listing = await api(relay.admin.port, "GET", "/queue?state=on-hold")
        assert [m["queue_id"] for m in listing["messages"]] == [queue_id]
    assert sink.messages == []
    async with running(config) as relay:  # the hold is on disk
        _, listing = await api(relay.admin.port, "GET", "/queue")
        assert [m["state"] for m in listing["messages"]] == ["on-hold"]
        assert sink.messages == []
        released = await cli(path, "release", queue_id)
        assert released.returncode == 0, released.stderr
        [received] = await sink.wait_for(1)
        assert received.rcpts == ["h@one.test"]


async def test_delete_removes_without_a_dsn_and_bounce_sends_one(
    tmp_path: Path, sink: Sink
) -> None:
    gate = Gate()
    sink.rcpt_reply = gate
    document = doc(tmp_path, sink)
    path = write(tmp_path, document)
    async with running(parse_config(document)) as relay:
        await send(relay, ["gone@one.test"], sender="app@sender.test")
        await send(relay, ["back@two.test"], sender="app@sender.test")
        deferred = await until_deferred(relay.admin.port, 2)
        ids = {m["pending"][0]: m["queue_id"] for m in deferred}
        spool = Path(document["state"]["dir"]) / "spool" / "queue"
        assert (spool / f"{ids['gone@one.test']}.msg").exists()

        deleted = await cli(path, "delete", ids["gone@one.test"])
        assert deleted.returncode == 0, deleted.stderr
        refused = await cli(path, "bounce", ids["back@two.test"])
        assert refused.returncode == 2 and "--reason" in refused.stderr
        gate.closed = False  # the DSN must be able to arrive
        bounced = await cli(path, "bounce", ids["back@two.test"], "--reason", "customer left")
        assert bounced.returncode == 0, bounced.stderr
        [dsn] = await sink.wait_for(1)
        assert dsn.mail_from == "" and dsn.rcpts == ["app@sender.test"]
        assert b"customer left" in dsn.data and b"back@two.test" in dsn.data
        await eventually(lambda: relay.scheduler.messages == 0, timeout_s=30)
        await eventually(  # the unlinks run on the spool's threads
            lambda: not list(spool.glob(f"{ids['gone@one.test']}.*")),
            what="the deleted message's files removed",
        )
    # nothing else went out: no DSN for the deleted one, neither original was sent
    assert [m.rcpts for m in sink.messages] == [["app@sender.test"]]
    assert not list(spool.glob(f"{ids['gone@one.test']}.*"))


async def test_offline_tools_work_on_the_spool_and_the_relay_honours_them(
    tmp_path: Path, sink: Sink
) -> None:
    gate = Gate()
    sink.rcpt_reply = gate
    document = doc(tmp_path, sink)
    path = write(tmp_path, document)
    config = parse_config(document)
    async with running(config) as relay:
        for rcpt in ("keep@one.test", "drop@two.test", "hold@three.test", "dsn@four.test"):
            await send(relay, [rcpt])
        deferred = await until_deferred(relay.admin.port, 4)
    ids = {m["pending"][0]: m["queue_id"] for m in deferred}

    def offline(*args: str) -> subprocess.CompletedProcess[str]:
        return warmrelay("queue", *args, "-c", str(path))

    listing = offline("list", "--json")
    assert listing.returncode == 0, listing.stderr
    assert {m["queue_id"] for m in json.loads(listing.stdout)["messages"]} == set(ids.values())
    assert {m["state"] for m in json.loads(listing.stdout)["messages"]} == {"queued"}
    assert "on the spool (no relay runs)" in offline("list").stdout
    assert offline("delete", ids["drop@two.test"]).returncode == 0
    assert offline("hold", ids["hold@three.test"]).returncode == 0
    assert offline("bounce", ids["dsn@four.test"], "--reason", "shop closed").returncode == 0
    flush = offline("flush", "--all")
    assert flush.returncode == 0 and "tried as soon as it starts" in flush.stdout
    shape = json.loads(offline("summary", "--json").stdout)
    assert shape["messages"] == 3  # keep, hold, and the DSN about dsn@four.test
    assert shape["states"]["on-hold"] == 1

    gate.closed = False
    async with running(config) as relay:
        await sink.wait_until(lambda: len(sink.messages) >= 2)
        await eventually(lambda: relay.scheduler.messages == 1, timeout_s=30)
        got = sorted(tuple(m.rcpts) for m in sink.messages)
        assert got == [("app@sender.test",), ("keep@one.test",)]
        dsn = next(m for m in sink.messages if m.mail_from == "")
        assert b"shop closed" in dsn.data
        _, left = await api(relay.admin.port, "GET", "/queue")
        assert [(m["queue_id"], m["state"]) for m in left["messages"]] == [
            (ids["hold@three.test"], "on-hold")
        ]


async def test_offline_tools_refuse_while_a_relay_holds_the_state_dir(
    tmp_path: Path, sink: Sink
) -> None:
    """A relay runs (it holds state.dir) but its admin endpoint is off: no second writer."""
    document = doc(tmp_path, sink, admin={"listen": None})
    path = write(tmp_path, document)
    from warmrelay.operate.workers import lock_state_dir

    fd = lock_state_dir(Path(document["state"]["dir"]))
    try:
        result = await cli(path, "list")
    finally:
        os.close(fd)
    assert result.returncode == 1 and "in use by another warmrelay" in result.stderr


async def test_the_queue_api_needs_the_token_and_says_what_is_wrong(
    tmp_path: Path, sink: Sink, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(TOKEN_ENV, "queue-secret")
    document = doc(tmp_path, sink, admin={"listen": "127.0.0.1:0", "token_env": TOKEN_ENV})
    async with running(parse_config(document)) as relay:
        port = relay.admin.port
        assert (await api(port, "GET", "/queue"))[0] == 401
        assert (await api(port, "GET", "/queue/summary"))[0] == 401
        assert (await api(port, "POST", "/queue/flush", {"all": True}))[0] == 401
        token = "queue-secret"
        assert (await api(port, "GET", "/queue", token=token))[0] == 200
        code, body = await api(port, "POST", "/queue/flush", {}, token)
        assert code == 400 and "exactly one of" in body["error"]
        code, body = await api(port, "POST", "/queue/explode", {"all": True}, token)
        assert code == 404 and "unknown action" in body["error"]
        code, body = await api(port, "GET", "/queue?state=sleeping", token=token)
        assert code == 400 and "state=" in body["error"]
        code, body = await api(port, "POST", "/queue/bounce", {"all": True}, token)
        assert code == 400 and "reason" in body["error"]


async def test_the_supervisor_merges_the_workers_queues(
    tmp_path: Path, sink: Sink, relay_process: Callable[..., Awaitable[RelayProcess]]
) -> None:
    """`serve --workers 2`: every worker has its own spool; the supervisor's API asks them
    all, so list, summary, show and flush see mail wherever the kernel put its session."""
    gate = Gate()
    sink.rcpt_reply = gate
    document = doc(tmp_path, sink)
    relay = await relay_process(document, "--workers", "2")
    path = relay.config_path
    for n in range(12):  # one session each: the kernel spreads them over both workers
        client = aiosmtplib.SMTP(hostname="127.0.0.1", port=relay.smtp_port)
        async with client:
            await client.sendmail("app@sender.test", [f"r{n}@one.test"], b"Subject: x\r\n\r\nx\r\n")
    deferred = await until_deferred(relay.admin_port, 12)
    assert relay.proc is not None
    children = proc_text(f"/proc/{relay.proc.pid}/task/{relay.proc.pid}/children").split()
    assert len(children) == 2
    for pid in children:  # a worker serves no HTTP: aiohttp (~8 MB) stays out
        assert "aiohttp" not in proc_text(f"/proc/{pid}/maps")
    workers = {m["worker"] for m in deferred}
    assert workers == {0, 1}, "all sessions went to one worker: cannot tell merging apart"
    _, st = await api(relay.admin_port, "GET", "/status")  # what the status page shows
    assert st["queue"]["messages"] == 12
    newest = max(m["received_at"] for m in deferred)
    latest = st["reasons"]["other"]["deferred"]
    assert latest["reply"].startswith("451 4.7.1") and latest["time"] >= newest
    shape = json.loads((await cli(path, "summary", "--json")).stdout)
    assert shape["messages"] == 12 and shape["domains"][0] == {
        "domain": "one.test",
        "total": 12,
        "buckets": [12] + [0] * (len(shape["buckets"]) - 1),
    }
    shown = json.loads((await cli(path, "show", deferred[-1]["queue_id"], "--json")).stdout)
    assert shown["worker"] == deferred[-1]["worker"] and ["Subject", "x"] in shown["headers"]
    gate.closed = False
    flushed = await cli(path, "flush", "--all")
    assert flushed.returncode == 0 and "12 message(s) by the running relay" in flushed.stdout
    await sink.wait_for(12)
    assert sorted(r for m in sink.messages for r in m.rcpts) == sorted(
        f"r{n}@one.test" for n in range(12)
    )
    assert await relay.terminate() == 0


# -- issue 18: the operator wins over sends in flight; a failed action changes nothing -------


async def test_operator_actions_win_over_sends_waiting_for_a_connection(
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    make_sink: Callable[..., Awaitable[Sink]],
) -> None:
    """One connection per destination, the receiver holds the first message in DATA; three
    more wait on the ready queue behind it. The operator bounces one (and the one being
    sent), deletes one, holds one. None of the waiting ones is sent; the send under way
    ends with its outcome written down cleanly (no KeyError: the message is gone)."""
    caplog.set_level(logging.INFO, logger="warmrelay")
    gate = asyncio.Event()
    sink = await make_sink(data_gate=gate)
    document = relay_doc(
        tmp_path,
        sink.port,
        delivery={**SLOW_RETRY, "connections_per_destination": 1},
    )
    async with running(parse_config(document)) as relay:
        port = relay.admin.port
        first = (await send(relay, ["first@one.test"]))[1].rsplit(" ", 1)[1]
        await sink.wait_until(lambda: sink.in_data == 1)  # being sent, held in DATA
        ids = {
            name: (await send(relay, [f"{name}@one.test"]))[1].rsplit(" ", 1)[1]
            for name in ("bounced", "deleted", "held")
        }
        _, listing = await api(port, "GET", "/queue?state=active")
        assert {m["queue_id"] for m in listing["messages"]} >= set(ids.values())
        body = {"queue_ids": [ids["bounced"], first], "reason": "stop this campaign"}
        code, bounced = await api(port, "POST", "/queue/bounce", body)
        assert code == 200 and sorted(bounced["queue_ids"]) == sorted(body["queue_ids"])
        code, deleted = await api(port, "POST", "/queue/delete", {"queue_ids": [ids["deleted"]]})
        assert code == 200 and deleted["queue_ids"] == [ids["deleted"]]
        code, held = await api(port, "POST", "/queue/hold", {"queue_ids": [ids["held"]]})
        assert code == 200 and held["queue_ids"] == [ids["held"]]
        gate.set()  # the first send completes: the receiver took it after all
        dsns = lambda: [m for m in sink.messages if m.mail_from == ""]  # noqa: E731
        await sink.wait_until(lambda: len(dsns()) == 2)
        await eventually(lambda: relay.scheduler.messages == 1, timeout_s=30)  # the held one
        code, released = await api(port, "POST", "/queue/release", {"all": True})
        assert released["queue_ids"] == [ids["held"]]
        await eventually(lambda: relay.scheduler.messages == 0, timeout_s=30)
        status = (await api(port, "GET", "/status"))[1]
        warming = next(ip for ip in status["ips"] if ip["address"] == "127.0.0.2")
        assert warming["sent"] == 2  # first and held: the others' reservations went back
    originals = sorted(r for m in sink.messages if m.mail_from for r in m.rcpts)
    assert originals == ["first@one.test", "held@one.test"]
    told = sorted(b"bounced@one.test" in m.data for m in sink.messages if m.mail_from == "")
    assert told == [False, True]  # one DSN names the waiting one, one the one in flight
    lines = [r.getMessage() for r in caplog.records]
    late = [m for m in lines if first in m and "after the operator had finished it" in m]
    assert len(late) == 1 and " delivered " in late[0], late
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]


async def test_queue_cli_speaks_to_the_operator(tmp_path: Path, sink: Sink) -> None:
    """No HTTP status codes, no trailing colon, no operator WARNING for an action that did
    nothing, flush says what it left on hold, client words for a missing token."""
    gate = Gate()
    sink.rcpt_reply = gate
    document = doc(tmp_path, sink)
    path = write(tmp_path, document)
    async with running(parse_config(document)) as relay:
        await send(relay, ["a@one.test"])
        await send(relay, ["b@two.test"])
        deferred = await until_deferred(relay.admin.port, 2)
        held = await cli(path, "hold", deferred[0]["queue_id"])
        assert held.returncode == 0, held.stderr
        missing = await cli(path, "show", "NOSUCHID")
        assert missing.returncode == 1
        assert missing.stderr.strip() == "queue show: no message NOSUCHID in the queue"
        nothing = await cli(path, "release", "--domain", "nowhere.test")
        assert nothing.returncode == 0
        assert nothing.stdout.strip() == "queue release: 0 message(s) by the running relay"
        flushed = await cli(path, "flush", "--all")
        assert flushed.returncode == 0, flushed.stderr
        assert "left 1 message(s) on hold alone" in flushed.stdout


async def test_a_connection_failure_names_the_address_once(tmp_path: Path) -> None:
    dead = free_port()  # nothing listens there
    document = relay_doc(tmp_path, dead, delivery=SLOW_RETRY)
    async with running(parse_config(document)) as relay:
        await send(relay, ["a@one.test"])
        (deferred,) = await until_deferred(relay.admin.port, 1)
    reply = deferred["last_reply"]
    assert reply.startswith(f"451 4.4.1 127.0.0.1[127.0.0.1]:{dead}: "), reply
    assert reply.count("127.0.0.1") == 2 and reply.count(str(dead)) == 1, reply


async def test_queue_cli_without_the_token_gets_client_words(
    tmp_path: Path, sink: Sink, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(TOKEN_ENV, "queue-secret")
    document = doc(
        tmp_path, sink, admin={"listen": f"127.0.0.1:{free_port()}", "token_env": TOKEN_ENV}
    )
    path = write(tmp_path, document)
    async with running(parse_config(document)):
        monkeypatch.delenv(TOKEN_ENV)
        listed = await cli(path, "list")
        assert listed.returncode == 1
        assert listed.stderr.strip() == (
            f"queue list: the running relay wants its admin token: set {TOKEN_ENV} "
            "(admin.token_env) here"
        )
        monkeypatch.setenv(TOKEN_ENV, "wrong")
        listed = await cli(path, "list")
        assert listed.stderr.strip() == (
            f"queue list: the running relay did not accept the admin token in {TOKEN_ENV}"
        )
