"""The queue tools against `serve --workers 2`: every worker has its own spool and
scheduler, answers its supervisor on state.dir/worker-N.sock, and the supervisor's API
(`warmrelay queue`, ``/queue``, ``/status``) asks them all and merges the answers.

Real processes: the relay (supervisor and workers), the CLI, a sink on loopback. The sink
refuses with 451 until a test opens it, and retries are minutes apart, so mail stays
queued where the kernel put its session, and only an operator's action explains a
delivery within a test. Which worker took a message is read from its acceptance line
(``[wN] QUEUE_ID: from=<...>``); what a worker holds is asked of its own socket."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import getpass
import json
import os
import re
import signal
import socket
import stat
import subprocess
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import aiosmtplib
from support.cli import warmrelay_async
from support.polling import eventually
from support.relay import relay_doc
from support.relayproc import RelayProcess
from support.sink import Sink

from warmrelay.config import AdminConfig

SLOW_RETRY = {"retry_first_s": 600, "retry_max_s": 3600, "drain_timeout_s": 5}
WORKERS = (0, 1)
WORKER_LINE = re.compile(r"^\[w(\d+)\] ")
STARTED = re.compile(r"worker (\d+) started: pid (\d+)")
OPERATOR = re.compile(
    r"^\[w(\d+)\] .* WARNING .*operator: queue (\w+) by (.+?): \d+ message\(s\) (.*)$"
)
DEFERRAL = "451 4.7.1 Try again later (test gate)"
REFUSAL = "550 5.7.1 Refused by policy (test)"

StartRelay = Callable[..., Awaitable[RelayProcess]]


class Gate:
    """The sink's answer at RCPT: 451 while closed (a deferral), accepted once opened."""

    def __init__(self) -> None:
        self.closed = True

    def __call__(self, peer: str, rcpt: str) -> str | None:
        return DEFERRAL if self.closed else None


@dataclass(frozen=True)
class Queued:
    """A message as the test sent it, and the worker that accepted it."""

    queue_id: str
    worker: int
    rcpts: tuple[str, ...]
    subject: str


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def doc(tmp_path: Path, sink: Sink, **over: Any) -> dict[str, Any]:
    """The CLI reads the file: the admin port in it must be the one the relay listens on."""
    return relay_doc(
        tmp_path,
        sink.port,
        delivery=SLOW_RETRY,
        admin={"listen": f"127.0.0.1:{free_port()}"},
        **over,
    )


async def start(relay_process: StartRelay, document: dict[str, Any]) -> RelayProcess:
    return await relay_process(document, "--workers", "2")


def state_dir(relay: RelayProcess) -> Path:
    return relay.config_path.parent / "state"


async def queue_cli(relay: RelayProcess, *args: str) -> subprocess.CompletedProcess[str]:
    """`warmrelay queue ...` with the relay's file: a separate process, bounded in time."""
    return await warmrelay_async("queue", *args, "-c", str(relay.config_path))


def answer_of(result: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    """The --json output of a queue command."""
    try:
        parsed: dict[str, Any] = json.loads(result.stdout)
    except ValueError:
        raise AssertionError(f"not JSON: {result.stdout!r} {result.stderr!r}") from None
    return parsed


async def api(
    port: int, method: str, path: str, body: dict[str, Any] | None = None
) -> tuple[int, Any]:
    """One request to the supervisor's admin endpoint: (status, JSON)."""
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session,
        session.request(method, f"http://127.0.0.1:{port}{path}", json=body) as response,
    ):
        return response.status, await response.json()


async def page(port: int, path: str) -> tuple[int, str]:
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session,
        session.get(f"http://127.0.0.1:{port}{path}") as response,
    ):
        return response.status, await response.text()


async def ask_worker(relay: RelayProcess, index: int, path: str) -> Any:
    """GET ``path`` straight from worker ``index``'s socket, as its supervisor asks it: what
    that worker alone holds (the truth the merged answers are checked against)."""
    sock = state_dir(relay) / f"worker-{index}.sock"
    reader, writer = await asyncio.open_unix_connection(str(sock))
    try:
        writer.write(json.dumps({"method": "GET", "path": path}).encode() + b"\n")
        await writer.drain()
        answer = json.loads(await asyncio.wait_for(reader.read(), 30))
    finally:
        writer.close()
    assert answer["status"] == 200, answer
    return answer["body"]


async def send_session(port: int, rcpts: list[str], subject: str) -> str:
    """One message in a session of its own (the kernel picks the worker); its queue id."""
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, timeout=30)
    async with client:
        _, reply = await client.sendmail(
            "app@sender.test", rcpts, f"Subject: {subject}\r\n\r\nhello\r\n".encode()
        )
    return reply.rsplit(" ", 1)[1]


async def worker_of(relay: RelayProcess, queue_id: str) -> int:
    """The worker that accepted ``queue_id``: the prefix of its acceptance line."""
    line = await relay.wait_for_line(f"{queue_id}: from=<")
    found = WORKER_LINE.match(line)
    assert found, line
    return int(found.group(1))


def on(sent: list[Queued], worker: int) -> list[Queued]:
    return [q for q in sent if q.worker == worker]


async def spread(
    relay: RelayProcess,
    rcpts_of: Callable[[int], list[str]],
    enough: Callable[[list[Queued]], bool],
    most: int = 60,
) -> list[Queued]:
    """Sessions, one message each, until ``enough`` of them landed on each worker."""
    sent: list[Queued] = []
    for n in range(most):
        rcpts, subject = rcpts_of(n), f"message {n}"
        queue_id = await send_session(relay.smtp_port, rcpts, subject)
        sent.append(Queued(queue_id, await worker_of(relay, queue_id), tuple(rcpts), subject))
        if enough(sent):
            return sent
    spread_ = Counter(q.worker for q in sent)
    raise AssertionError(f"{most} sessions, still not spread over the workers: {spread_}")


async def outcome(relay: RelayProcess, queue_id: str, rcpt: str) -> str:
    """The log line of a recipient's first attempt (event-driven: the relay's own log)."""
    return await relay.wait_for_line(f"{queue_id}: to=<{rcpt}>")


async def all_deferred(relay: RelayProcess, sent: list[Queued]) -> None:
    """Every recipient's first attempt is over (deferred): nothing is in flight."""
    for q in sent:
        for rcpt in q.rcpts:
            line = await outcome(relay, q.queue_id, rcpt)
            assert f" deferred ({DEFERRAL})" in line, line


def worker_pids(relay: RelayProcess) -> dict[int, int]:
    """{worker index: pid} from the supervisor's own lines (the latest start of each)."""
    pids = {}
    for line in relay.log:
        found = STARTED.search(line)
        if found and not line.startswith("[w"):
            pids[int(found.group(1))] = int(found.group(2))
    return pids


def by_domain(messages: list[Queued]) -> dict[str, int]:
    return dict(Counter(r.rpartition("@")[2] for q in messages for r in q.rcpts))


def added(rows: list[list[int]]) -> list[int]:
    return [sum(column) for column in zip(*rows, strict=True)]


# -- views: list, summary, show --------------------------------------------------------------


async def test_list_summary_and_show_merge_what_each_worker_holds(
    tmp_path: Path, sink: Sink, relay_process: StartRelay
) -> None:
    sink.rcpt_reply = Gate()
    relay = await start(relay_process, doc(tmp_path, sink))

    def rcpts(n: int) -> list[str]:
        return [f"r{n}@one.test"] + ([f"s{n}@two.test"] if n % 2 else [])

    def enough(sent: list[Queued]) -> bool:
        return all(
            len(on(sent, w)) >= 3 and any(len(q.rcpts) == 2 for q in on(sent, w)) for w in WORKERS
        )

    sent = await spread(relay, rcpts, enough)
    await all_deferred(relay, sent)
    where = {q.queue_id: q.worker for q in sent}
    pending = {q.queue_id: sorted(q.rcpts) for q in sent}

    # each worker holds its own part, and only that
    for w in WORKERS:
        own = await ask_worker(relay, w, "/queue")
        assert {m["queue_id"] for m in own["messages"]} == {q.queue_id for q in on(sent, w)}

    # list: every message whichever worker holds it, named with that worker
    listed = await queue_cli(relay, "list", "--json")
    assert listed.returncode == 0, listed.stderr
    code, through_api = await api(relay.admin_port, "GET", "/queue")
    assert code == 200
    for listing in (answer_of(listed), through_api):
        assert listing["count"] == len(sent)
        assert {m["queue_id"]: m["worker"] for m in listing["messages"]} == where
        assert {m["queue_id"]: sorted(m["pending"]) for m in listing["messages"]} == pending
        assert {m["state"] for m in listing["messages"]} == {"deferred"}
        assert all(m["last_reply"] == DEFERRAL for m in listing["messages"])
    text = await queue_cli(relay, "list")
    assert f"{len(sent)} message(s) (by the running relay)" in text.stdout, text.stderr
    assert all(q.queue_id in text.stdout for q in sent)

    # a filter goes to every worker
    two = [q for q in sent if len(q.rcpts) == 2]
    filtered = answer_of(await queue_cli(relay, "list", "--json", "--domain", "two.test"))
    assert {m["queue_id"]: m["worker"] for m in filtered["messages"]} == {
        q.queue_id: q.worker for q in two
    }
    assert {q.worker for q in two} == set(WORKERS)

    # summary: the workers' counts added up, per domain and in total
    parts = [await ask_worker(relay, w, "/queue/summary") for w in WORKERS]
    assert [p["messages"] for p in parts] == [len(on(sent, w)) for w in WORKERS]
    shown = await queue_cli(relay, "summary", "--json")
    assert shown.returncode == 0, shown.stderr
    code, api_summary = await api(relay.admin_port, "GET", "/queue/summary")
    assert code == 200
    code, st = await api(relay.admin_port, "GET", "/status")  # what the status page shows
    assert code == 200
    recipients = sum(len(q.rcpts) for q in sent)
    for shape in (answer_of(shown), api_summary, st["queue"]):
        assert shape["messages"] == len(sent) == sum(p["messages"] for p in parts)
        assert shape["recipients"] == recipients == sum(p["recipients"] for p in parts)
        assert shape["states"]["deferred"] == len(sent)
        assert shape["total"] == added([p["total"] for p in parts])
        assert shape["total"][0] == recipients  # all of it minutes old at most
        assert {d["domain"]: d["total"] for d in shape["domains"]} == by_domain(sent)
        for row in shape["domains"]:
            of_workers = [
                d["buckets"] for p in parts for d in p["domains"] if d["domain"] == row["domain"]
            ]
            assert len(of_workers) == 2, row  # both workers hold mail to each domain
            assert row["buckets"] == added(of_workers)
    table = await queue_cli(relay, "summary")
    assert f"{len(sent)} message(s): deferred {len(sent)}" in table.stdout, table.stderr

    # show: the message, its attempts and headers, and the worker that holds it
    for w in WORKERS:
        q = on(sent, w)[-1]
        result = await queue_cli(relay, "show", q.queue_id, "--json")
        assert result.returncode == 0, result.stderr
        detail = answer_of(result)
        code, through_api = await api(relay.admin_port, "GET", f"/queue/{q.queue_id}")
        assert code == 200
        for d in (detail, through_api):
            assert (d["queue_id"], d["worker"]) == (q.queue_id, w)
            assert ["Subject", q.subject] in d["headers"]
            assert [r["address"] for r in d["recipients"]] == list(q.rcpts)
            for r in d["recipients"]:
                [attempt] = r["attempts"]
                assert (attempt["result"], attempt["reply"]) == ("deferred", DEFERRAL)
        text = await queue_cli(relay, "show", q.queue_id)
        assert f"queue id:  {q.queue_id}  (worker {w})" in text.stdout, text.stderr
    code, missing = await api(relay.admin_port, "GET", "/queue/NOSUCHID")
    assert (code, missing) == (404, {"error": "no message NOSUCHID in the queue"})
    result = await queue_cli(relay, "show", "NOSUCHID")
    assert result.returncode == 1
    assert result.stderr.strip() == "queue show: no message NOSUCHID in the queue"
    assert await relay.terminate() == 0


# -- actions reach the worker that holds the message -----------------------------------------


def spool_file(relay: RelayProcess, q: Queued) -> Path:
    spool = "spool" if q.worker == 0 else f"spool-{q.worker}"
    return state_dir(relay) / spool / "queue" / f"{q.queue_id}.msg"


def operator_lines(relay: RelayProcess) -> list[tuple[int, str, str, str]]:
    """(worker, action, who, queue ids) of each operator WARNING the workers logged."""
    out = []
    for line in relay.log:
        found = OPERATOR.match(line.rstrip("\n"))
        if found:
            out.append((int(found.group(1)), found.group(2), found.group(3), found.group(4)))
    return out


async def test_actions_through_the_supervisor_reach_the_worker_that_holds_the_mail(
    tmp_path: Path, sink: Sink, relay_process: StartRelay
) -> None:
    """Each message has a recipient at one.test, two.test and three.test; per worker one
    is held, one deleted, the others acted on by domain and then --all."""
    gate = Gate()
    sink.rcpt_reply = gate
    relay = await start(relay_process, doc(tmp_path, sink))
    sent = await spread(
        relay,
        lambda n: [f"a{n}@one.test", f"b{n}@two.test", f"c{n}@three.test"],
        lambda s: all(len(on(s, w)) >= 3 for w in WORKERS),
    )
    await all_deferred(relay, sent)
    held = {w: on(sent, w)[0] for w in WORKERS}
    gone = {w: on(sent, w)[1] for w in WORKERS}
    rest = [q for q in sent if q not in held.values() and q not in gone.values()]
    port = relay.admin_port

    # hold, one id at a time: only the worker holding it acts; an id no worker has is named
    result = await queue_cli(relay, "hold", held[0].queue_id, "--json")
    assert result.returncode == 0, result.stderr
    assert answer_of(result)["queue_ids"] == [held[0].queue_id]
    result = await queue_cli(relay, "hold", held[1].queue_id, "NOSUCHID", "--json")
    assert result.returncode == 1  # something named was not found
    answer = answer_of(result)
    assert (answer["queue_ids"], answer["not_done"]) == ([held[1].queue_id], ["NOSUCHID"])
    code, listing = await api(port, "GET", "/queue?state=on-hold")
    assert code == 200
    assert {m["queue_id"]: m["worker"] for m in listing["messages"]} == {
        q.queue_id: w for w, q in held.items()
    }

    # delete: one message on each worker, in one request
    for q in gone.values():
        assert spool_file(relay, q).exists()  # worker 0's spool is spool/, worker 1's spool-1/
    ids = sorted(q.queue_id for q in gone.values())
    code, deleted = await api(port, "POST", "/queue/delete", {"queue_ids": ids})
    assert code == 200
    assert (sorted(deleted["queue_ids"]), deleted["not_done"]) == (ids, [])
    await eventually(
        lambda: not any(spool_file(relay, q).exists() for q in gone.values()),
        what="the deleted messages' spool files removed",
    )
    code, listing = await api(port, "GET", "/queue")
    assert {m["queue_id"] for m in listing["messages"]} == {
        q.queue_id for q in sent if q not in gone.values()
    }

    # actions that do nothing: said so, nothing done (and no operator WARNING, below)
    result = await queue_cli(relay, "release", "--domain", "nowhere.test")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "queue release: 0 message(s) by the running relay"
    result = await queue_cli(relay, "flush", "NOSUCHID", "--json")
    assert result.returncode == 1
    answer = answer_of(result)
    assert (answer["count"], answer["queue_ids"], answer["not_done"]) == (0, [], ["NOSUCHID"])
    code, answer = await api(port, "POST", "/queue/release", {"queue_ids": ["NOSUCHID"]})
    assert code == 200 and (answer["count"], answer["not_done"]) == (0, ["NOSUCHID"])

    gate.closed = False

    def delivered() -> list[str]:
        return [r for m in sink.messages if m.mail_from for r in m.rcpts]

    # flush --domain: that domain's recipients on both workers, at once; held mail stays
    result = await queue_cli(relay, "flush", "--domain", "one.test", "--json")
    assert result.returncode == 0, result.stderr
    answer = answer_of(result)
    assert sorted(answer["queue_ids"]) == sorted(q.queue_id for q in rest)
    assert answer["left_on_hold"] == 2  # one on each worker
    wanted = {q.rcpts[0] for q in rest}
    await sink.wait_until(lambda: wanted <= set(delivered()))
    assert set(delivered()) == wanted  # the rest waits for its retry, minutes away

    # bounce --domain: a DSN for each message with a recipient there, from both workers
    bounced = [q for q in sent if q not in gone.values()]
    result = await queue_cli(
        relay, "bounce", "--domain", "two.test", "--reason", "domain retired", "--json"
    )
    assert result.returncode == 0, result.stderr
    assert sorted(answer_of(result)["queue_ids"]) == sorted(q.queue_id for q in bounced)

    def dsns() -> list[bytes]:
        return [m.data for m in sink.messages if m.mail_from == ""]

    await sink.wait_until(lambda: len(dsns()) == len(bounced))
    named = [set(re.findall(rb"b\d+@two\.test", dsn)) for dsn in dsns()]
    assert all(len(n) == 1 for n in named), named  # one DSN per message, for its recipient
    assert set().union(*named) == {q.rcpts[1].encode() for q in bounced}
    assert all(b"domain retired" in dsn for dsn in dsns())
    assert {m.rcpts[0] for m in sink.messages if m.mail_from == ""} == {"app@sender.test"}

    # release: the held messages' recipients left go out at once, from their workers
    ids = sorted(q.queue_id for q in held.values())
    result = await queue_cli(relay, "release", *ids, "--json")
    assert result.returncode == 0, result.stderr
    assert sorted(answer_of(result)["queue_ids"]) == ids
    wanted |= {r for q in held.values() for r in (q.rcpts[0], q.rcpts[2])}
    await sink.wait_until(lambda: wanted <= set(delivered()))

    # --all: whatever is left, on both workers
    result = await queue_cli(relay, "flush", "--all", "--json")
    assert result.returncode == 0, result.stderr
    assert sorted(answer_of(result)["queue_ids"]) == sorted(q.queue_id for q in rest)
    wanted |= {q.rcpts[2] for q in rest}
    await sink.wait_until(lambda: wanted <= set(delivered()))

    async def empty() -> bool:
        return bool((await api(port, "GET", "/queue"))[1]["count"] == 0)

    await eventually(empty, what="both workers' queues empty")
    assert sorted(delivered()) == sorted(wanted)  # each once; nothing deleted or bounced
    assert len(dsns()) == len(bounced)  # no DSN for the deleted ones

    # one operator WARNING per worker and action that did something, none for the others
    expected = Counter(
        {(w, action): 1 for w in WORKERS for action in ("hold", "delete", "bounce", "release")}
    )
    expected.update({(w, "flush"): 2 for w in WORKERS})  # --domain and --all; not NOSUCHID

    def logged() -> Counter[tuple[int, str]]:
        return Counter((w, action) for w, action, _, _ in operator_lines(relay))

    with contextlib.suppress(AssertionError):  # the lines pass through the supervisor
        await eventually(lambda: logged() == expected, what="the operator lines")
    assert logged() == expected
    for w, action, who, queue_ids in operator_lines(relay):
        if action in ("hold", "release"):
            assert queue_ids == held[w].queue_id  # each worker names only its own message
        if action == "delete":
            assert queue_ids == gone[w].queue_id
            assert who == "unknown@127.0.0.1 (none)"  # the API, without X-Warmrelay-User
        else:
            assert who == f"{getpass.getuser()}@127.0.0.1 (none)"  # the CLI names the OS user
    assert not [x for x in relay.log if "operator:" in x and not x.startswith("[w")]
    assert await relay.terminate() == 0


# -- the latest reasons per provider, merged ------------------------------------------------


async def test_status_reasons_per_provider_merge_both_workers_newest_first(
    tmp_path: Path, sink: Sink, relay_process: StartRelay
) -> None:
    """One worker saw a deferral at exampleprov (one.test); both saw bounces there, the
    other one the newest: /status and the status page show the deferral of the one and
    the bounce of the other."""

    def reply(peer: str, rcpt: str) -> str | None:
        if rcpt.startswith("later"):
            return DEFERRAL
        return REFUSAL if rcpt.startswith("never") else None  # DSNs are taken

    sink.rcpt_reply = reply
    providers = {"exampleprov": {"domains": ["one.test"]}}
    relay = await start(relay_process, doc(tmp_path, sink, providers=providers))
    deferred_id = await send_session(relay.smtp_port, ["later@one.test"], "later")
    x = await worker_of(relay, deferred_id)
    line = await outcome(relay, deferred_id, "later@one.test")
    assert f" deferred ({DEFERRAL})" in line, line

    bounces: list[Queued] = []
    for n in range(60):  # until both workers bounced, and the newest bounce is not x's
        rcpt = f"never{n}@one.test"
        queue_id = await send_session(relay.smtp_port, [rcpt], f"never {n}")
        worker = await worker_of(relay, queue_id)
        line = await outcome(relay, queue_id, rcpt)
        assert f" bounced ({REFUSAL})" in line, line
        # the DSN is stored, then the bounce remembered: one attempt after the other
        await relay.wait_for_line(f"{queue_id}: sender non-delivery notification")
        bounces.append(Queued(queue_id, worker, (rcpt,), ""))
        if worker != x and x in {b.worker for b in bounces}:
            break
    else:
        raise AssertionError(f"bounces never spread: {Counter(b.worker for b in bounces)}")
    y = bounces[-1].worker
    x_bounce = on(bounces, x)[-1]

    mine = {w: (await ask_worker(relay, w, "/reasons"))["exampleprov"] for w in WORKERS}
    assert mine[x]["deferred"]["queue_id"] == deferred_id
    assert "deferred" not in mine[y]  # only x saw a deferral
    assert mine[x]["bounced"]["queue_id"] == x_bounce.queue_id
    assert mine[y]["bounced"]["queue_id"] == bounces[-1].queue_id
    assert mine[x]["bounced"]["time"] < mine[y]["bounced"]["time"]

    code, st = await api(relay.admin_port, "GET", "/status")
    assert code == 200
    merged = st["reasons"]["exampleprov"]
    assert merged["deferred"] == mine[x]["deferred"]  # the only one
    assert merged["bounced"] == mine[y]["bounced"]  # the newest of the two
    assert (merged["deferred"]["reply"], merged["bounced"]["reply"]) == (DEFERRAL, REFUSAL)
    assert merged["deferred"]["domain"] == merged["bounced"]["domain"] == "one.test"
    assert "other" not in st["reasons"]  # the DSNs were taken: nothing else to report

    code, html = await page(relay.admin_port, "/")
    assert code == 200
    reasons = html[html.index('id="reasons"') :]
    assert "exampleprov" in reasons and DEFERRAL in reasons and REFUSAL in reasons
    assert deferred_id in reasons and bounces[-1].queue_id in reasons
    assert x_bounce.queue_id not in reasons  # the older bounce lost
    assert await relay.terminate() == 0


# -- the workers' sockets, and a worker that does not answer --------------------------------


async def test_worker_sockets_are_private_and_a_dead_worker_is_left_out_at_once(
    tmp_path: Path, sink: Sink, relay_process: StartRelay
) -> None:
    """A worker killed (and kept from starting again: another process holds its spool)
    refuses at once: the supervisor answers with the other worker's mail instead of
    waiting, and says which worker did not answer. Once it is back, its spool is
    listed again."""
    sink.rcpt_reply = Gate()
    relay = await start(relay_process, doc(tmp_path, sink))
    state = state_dir(relay)
    for w in WORKERS:
        mode = os.stat(state / f"worker-{w}.sock").st_mode
        assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600
    assert sorted(p.name for p in state.glob("*.sock")) == ["worker-0.sock", "worker-1.sock"]

    sent = await spread(
        relay,
        lambda n: [f"r{n}@one.test"],
        lambda s: all(len(on(s, w)) >= 2 for w in WORKERS),
    )
    await all_deferred(relay, sent)
    pid = worker_pids(relay)[1]
    lock = os.open(state / "spool-1" / "lock", os.O_RDWR)
    try:
        mark = len(relay.log)
        os.kill(pid, signal.SIGKILL)
        # as another process holding worker 1's spool would: each restart fails to open it
        await asyncio.wait_for(asyncio.to_thread(fcntl.flock, lock, fcntl.LOCK_EX), 30)

        began = time.monotonic()
        listed = await queue_cli(relay, "list", "--json")
        took = time.monotonic() - began
        assert listed.returncode == 1  # incomplete: said, not hidden
        assert "worker 1 did not answer: its mail is not in this answer" in listed.stderr
        assert took < AdminConfig().worker_timeout_s, f"{took:.1f}s: it waited for the dead worker"
        answer = answer_of(listed)
        assert answer["missing_workers"] == [1]
        assert {m["queue_id"]: m["worker"] for m in answer["messages"]} == {
            q.queue_id: 0 for q in on(sent, 0)
        }
        said = await relay.wait_for_line("queue: worker 1 did not answer GET /queue")
        assert not said.startswith("[w") and "WARNING" in said, said
        assert not [x for x in relay.log[mark:] if "queue: worker 0 did not answer" in x]

        summary = answer_of(await queue_cli(relay, "summary", "--json"))
        assert summary["messages"] == len(on(sent, 0)) and summary["missing_workers"] == [1]
        code, st = await api(relay.admin_port, "GET", "/status")
        assert code == 200 and st["queue"]["messages"] == len(on(sent, 0))
        # an action on its mail finds nobody holding it, and says so
        result = await queue_cli(relay, "hold", on(sent, 1)[0].queue_id, "--json")
        assert result.returncode == 1
        assert answer_of(result)["not_done"] == [on(sent, 1)[0].queue_id]
    finally:
        fcntl.flock(lock, fcntl.LOCK_UN)
        os.close(lock)

    def back() -> bool:
        return any(x.startswith("[w1]") and " ready: " in x for x in relay.log[mark:])

    await eventually(back, timeout_s=60, what="worker 1 started again")
    listed = await queue_cli(relay, "list", "--json")
    assert listed.returncode == 0, listed.stderr
    assert {m["queue_id"]: m["worker"] for m in answer_of(listed)["messages"]} == {
        q.queue_id: q.worker for q in sent
    }
    assert await relay.terminate() == 0


async def test_a_stopped_worker_does_not_hang_the_queue_tools(
    tmp_path: Path, sink: Sink, relay_process: StartRelay
) -> None:
    """SIGSTOP: the worker's socket accepts but nothing answers. The supervisor gives up
    after admin.worker_timeout_s, well before the operator's client does, and says which
    worker is missing (the client used to time out first and take the relay for down)."""
    sink.rcpt_reply = Gate()
    document = doc(tmp_path, sink)
    document["admin"]["worker_timeout_s"] = 1
    relay = await start(relay_process, document)
    sent = await spread(
        relay,
        lambda n: [f"r{n}@one.test"],
        lambda s: all(len(on(s, w)) >= 1 for w in WORKERS),
    )
    await all_deferred(relay, sent)
    pid = worker_pids(relay)[1]
    os.kill(pid, signal.SIGSTOP)
    try:
        listed = await queue_cli(relay, "list", "--json")
        assert listed.returncode == 1, listed.stderr
        assert "worker 1 did not answer: its mail is not in this answer" in listed.stderr
        answer = answer_of(listed)
        assert answer["missing_workers"] == [1]
        assert {m["queue_id"] for m in answer["messages"]} == {q.queue_id for q in on(sent, 0)}
        said = await relay.wait_for_line("queue: worker 1 did not answer GET /queue")
        assert "no answer within 1 s (admin.worker_timeout_s)" in said
        shown = await queue_cli(relay, "show", on(sent, 1)[0].queue_id)
        assert shown.returncode == 1 and "not: 1" in shown.stderr
    finally:
        os.kill(pid, signal.SIGCONT)
    listed = await queue_cli(relay, "list", "--json")
    assert listed.returncode == 0 and "missing_workers" not in answer_of(listed)
    assert await relay.terminate() == 0
