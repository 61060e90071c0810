"""PIPELINING (RFC 2920): with a receiver that offers it, MAIL, every RCPT and DATA go in one
write and the replies are read in order; each recipient still gets the reply that decided
it, the same ``Reply`` the lockstep path gives (every scenario below runs both ways and
compares), and the bytes on the wire are the same. Receivers: a scripted one (raw asyncio,
records what arrived in which read), aiosmtpd, and a real Postfix."""

from __future__ import annotations

import asyncio
import itertools
import ssl
import uuid
from collections.abc import Iterator
from pathlib import Path

import aiosmtplib
import hypothesis
import hypothesis.strategies
import pytest
import trustme
from aiosmtplib.email import quote_address
from aiosmtplib.protocol import PERIOD_REGEX, normalize_message_line_endings
from support.pipelining_sink import PipeliningSink
from support.postfix import Postfix, postfix_running
from support.relay import relay_config, running
from support.scripted import EXTENSIONS, SILENT, Script, Session, scripted
from support.sink import MakeSink, Sink
from support.tap import tapped

from warmrelay.config import DeliveryConfig
from warmrelay.delivery.dispatcher import Connected, Dispatcher, Endpoint, Transaction
from warmrelay.delivery.nexthop import NextHop
from warmrelay.delivery.pipeline import message, quoted
from warmrelay.delivery.replies import Reply, Stage

ENDPOINT = Endpoint(None, "mta.test", "never")
MESSAGE = b"From: <app@sender.test>\r\nSubject: pipelined\r\n\r\nhello\r\n"
# what the body looks like on the wire: CRLF everywhere, leading dots doubled
TRICKY = (
    "From: <app@sender.test>\r\nSubject: caf\u00e9\r\n\r\n.leading dot\r\n..two\nbare LF\r"
    "bare CR\r\n.\r\nlast line without newline \u2713"
).encode()


def hop(port: int) -> NextHop:
    return NextHop("mx.test", "127.0.0.1", port, None, 0)


async def deliver(
    port: int,
    txs: list[Transaction],
    *,
    pipelining: bool = True,
    timeout_s: float = 10.0,
) -> tuple[Reply, ...]:
    """Through a Dispatcher of its own, closed after (QUIT on an idle connection)."""
    config = DeliveryConfig(starttls="never", pipelining=pipelining, timeout_s=timeout_s)
    dispatcher = Dispatcher(config)
    try:
        result = await dispatcher.send_all(ENDPOINT, [hop(port)], txs)
    finally:
        await dispatcher.close()
    assert result.connected is Connected.YES
    return result.replies


def tx(*rcpts: str, data: bytes = MESSAGE) -> Transaction:
    return Transaction("app@sender.test", list(rcpts), data)


def mail(*rcpts: str) -> tuple[str, list[str], bytes]:
    """``Dispatcher.send`` arguments after the hops."""
    return "app@sender.test", list(rcpts), MESSAGE


def pipelined(session: Session) -> bool:
    """MAIL, the RCPTs and DATA came in one read, before any of their replies went out."""
    group = session.group("MAIL")
    verbs = [c.line.split(b" ")[0].split(b":")[0].upper() for c in group]
    return (
        verbs[0] == b"MAIL"
        and verbs[-1] == b"DATA"
        and set(verbs[1:-1]) == {b"RCPT"}
        and len({c.replies_before for c in group}) == 1
    )


def lockstep(session: Session) -> bool:
    """Every command after the greeting came after the reply to the one before."""
    befores = [c.replies_before for c in session.commands]
    return all(b > a for a, b in itertools.pairwise(befores))


# --- which path -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("offered", "enabled", "expect_pipelined"),
    [(True, True, True), (False, True, False), (True, False, False)],
    ids=["offered", "not-offered", "switched-off"],
)
async def test_the_pipelined_path_only_when_offered_and_enabled(
    offered: bool, enabled: bool, expect_pipelined: bool
) -> None:
    extensions = EXTENSIONS if offered else tuple(e for e in EXTENSIONS if e != "PIPELINING")
    async with scripted(Script(extensions=extensions)) as receiver:
        replies = await deliver(
            receiver.port, [tx("a@dest.test", "b@dest.test")], pipelining=enabled
        )
        session = await receiver.session()
    assert [(r.code, r.stage, r.accepted) for r in replies] == [(250, Stage.DATA, True)] * 2
    assert session.verbs() == ["EHLO", "MAIL", "RCPT", "RCPT", "DATA", "QUIT"]
    assert session.messages == [MESSAGE]
    if expect_pipelined:
        assert pipelined(session)
        assert session.group("MAIL")[0].replies_before == 2  # greeting, EHLO: nothing else
        data = session.group("DATA")[0].read
        assert session.message_reads[0] > data  # the message waited for the 354
    else:
        assert lockstep(session)


# --- each recipient its reply, as in lockstep ------------------------------------------

SCENARIOS: dict[str, tuple[Script, int, list[tuple[int, Stage, bool]]]] = {
    # RFC 2920 §3.1: DATA answered 354 with no valid recipient: a lone dot, no message
    "all-refused-354-anyway": (
        Script(
            rcpt=["550 5.1.1 no such user", "550 5.1.1 no such user"],
            end="554 5.5.1 Error: no valid recipients",
        ),
        2,
        [(550, Stage.RCPT, False)] * 2,
    ),
    "all-refused": (
        Script(
            rcpt=["550 5.1.1 no such user", "450 4.2.1 try later"],
            data="554 5.5.1 Error: no valid recipients",
        ),
        2,
        [(550, Stage.RCPT, False), (450, Stage.RCPT, False)],
    ),
    "mixed": (
        Script(rcpt=["250 2.1.5 Ok", "550 5.1.1 no such user", "251 2.1.5 will forward"]),
        3,
        [(250, Stage.DATA, True), (550, Stage.RCPT, False), (250, Stage.DATA, True)],
    ),
    "421-in-the-middle": (
        Script(rcpt=["250 2.1.5 Ok", "421 4.7.0 too many errors", "250 2.1.5 Ok"]),
        3,
        [(421, Stage.RCPT, False)] * 3,  # nothing was handed over: not "uncertain"
    ),
    "hang-up-after-rcpt": (
        Script(data=None),
        2,
        [(451, Stage.DATA, True)] * 2,
    ),
    "data-refused": (
        Script(data="554 5.7.1 rejected by policy"),
        2,
        [(554, Stage.DATA, True)] * 2,
    ),
    "refused-after-the-dot": (
        Script(end="552 5.3.4 message too big"),
        2,
        [(552, Stage.DATA, True)] * 2,
    ),
    "mail-refused": (
        Script(
            mail="550 5.7.1 sender blocked",
            rcpt=["503 5.5.1 Error: need MAIL command"] * 2,
            data="503 5.5.1 Error: need RCPT command",
        ),
        2,
        [(550, Stage.MAIL, False)] * 2,
    ),
    "mail-refused-354-anyway": (
        Script(mail="550 5.7.1 sender blocked", rcpt=["503 5.5.1 need MAIL"] * 2),
        2,
        [(550, Stage.MAIL, False)] * 2,
    ),
    "421-at-mail": (
        Script(mail="421 4.3.2 shutting down"),
        2,
        [(421, Stage.MAIL, False)] * 2,
    ),
    "hang-up-at-mail": (
        Script(mail=None),
        2,
        [(451, Stage.MAIL, False)] * 2,
    ),
}


# what the recipients accepted before a loss get (the same in lockstep); none of these had
# the message sent, so none is "maybe delivered" (which would count against a cap)
LOST_TEXT = {
    "421-in-the-middle": "4.7.0 too many errors",
    "hang-up-after-rcpt": "lost at DATA, not delivered: Unexpected EOF received",
    "hang-up-at-mail": "lost at MAIL: Unexpected EOF received",
}


@pytest.mark.parametrize("name", list(SCENARIOS))
async def test_each_recipient_gets_the_reply_the_lockstep_path_gives(name: str) -> None:
    script, n, expected = SCENARIOS[name]
    rcpts = [f"r{i}@dest.test" for i in range(n)]
    async with scripted(script) as receiver:
        lockstep_replies = await deliver(receiver.port, [tx(*rcpts)], pipelining=False)
        replies = await deliver(receiver.port, [tx(*rcpts)])
        step, pipe = await receiver.session(0), await receiver.session(1)
    assert [(r.code, r.stage, r.accepted) for r in replies] == expected
    assert replies == lockstep_replies  # codes, texts, stages, accepted, tls: all of it
    assert lockstep(step)
    assert pipelined(pipe)
    sent_body = MESSAGE.splitlines()[-1] in pipe.raw
    if name == "mixed" or name == "refused-after-the-dot":
        assert sent_body and pipe.messages == [MESSAGE]
    else:
        assert not sent_body  # no message without a recipient and a 354
    if name.endswith("354-anyway"):
        assert pipe.messages == [b""]  # the lone dot, RFC 2920 §3.1
        assert pipe.verbs()[-2:] == ["DATA", "QUIT"]  # the dot ended it: no RSET
    if name in ("all-refused", "data-refused", "mail-refused"):
        assert pipe.verbs()[-2:] == ["RSET", "QUIT"]  # connection kept, reset for the next
    if "421" in name or "hang-up" in name:
        assert pipe.verbs()[-1] != "QUIT"  # the receiver closed it: not kept for reuse
    if name in LOST_TEXT:
        assert replies[0].text.endswith(LOST_TEXT[name])
    assert not any(r.maybe_delivered for r in replies)


async def test_a_receiver_that_stops_answering_times_out_as_in_lockstep() -> None:
    async with scripted(Script(end=SILENT)) as receiver:
        lockstep_replies = await deliver(
            receiver.port, [tx("a@dest.test")], pipelining=False, timeout_s=0.3
        )
        replies = await deliver(receiver.port, [tx("a@dest.test")], timeout_s=0.3)
    assert replies == lockstep_replies
    assert replies[0].text.endswith("lost during DATA, delivery uncertain: timed out")
    assert replies[0].maybe_delivered  # the message went out: it counts against a cap


async def test_replies_split_one_per_write_are_read_in_order() -> None:
    script = Script(rcpt=["550 5.1.1 no such user", "250 2.1.5 Ok", "452 4.5.3 too many"])
    async with scripted(script, one_write_per_reply=True) as receiver:
        replies = await deliver(receiver.port, [tx("a@dest.test", "b@dest.test", "c@dest.test")])
        session = await receiver.session()
    assert [(r.code, r.stage) for r in replies] == [
        (550, Stage.RCPT),
        (250, Stage.DATA),
        (452, Stage.RCPT),
    ]
    assert pipelined(session)


async def test_the_connection_carries_the_next_transaction_after_each_ending() -> None:
    """After a lone dot, an RSET and a delivery, the next transaction (VERP: one per
    recipient) pipelines again on the same connection."""
    script = Script(
        by_address={"gone@dest.test": "550 5.1.1 no such user"},
        end="250 2.0.0 Ok",
    )
    txs = [tx("gone@dest.test"), tx("a@dest.test"), tx("gone@dest.test"), tx("b@dest.test")]
    async with scripted(script) as receiver:
        replies = await deliver(receiver.port, txs)
        session = await receiver.session()
    assert [r.code for r in replies] == [550, 250, 550, 250]
    assert len(receiver.sessions) == 1
    assert session.messages == [b"", MESSAGE, b"", MESSAGE]  # the lone dots, the messages
    assert session.verbs().count("MAIL") == 4
    for n in range(4):
        group = session.group("MAIL", n)
        assert [c.line[:4] for c in group] == [b"MAIL", b"RCPT", b"DATA"]


async def test_a_reused_connection_that_turned_421_is_replaced_by_a_fresh_one() -> None:
    """An idle connection the receiver gave up on (421 at the pipelined MAIL): the
    transaction goes again on a fresh connection, as in lockstep."""
    async with scripted(Script(later_mail="421 4.4.2 idle too long")) as receiver:
        dispatcher = Dispatcher(DeliveryConfig(starttls="never"))
        try:
            first = await dispatcher.send(ENDPOINT, [hop(receiver.port)], *mail("a@dest.test"))
            again = await dispatcher.send(ENDPOINT, [hop(receiver.port)], *mail("b@dest.test"))
        finally:
            await dispatcher.close()
        old, fresh = await receiver.session(0), await receiver.session(1)
    assert [r.code for r in first.replies + again.replies] == [250, 250]
    assert old.verbs() == ["EHLO", "MAIL", "RCPT", "DATA", "MAIL", "RCPT", "DATA"]
    assert pipelined(fresh) and fresh.messages == [MESSAGE]


async def test_pipelined_over_starttls_and_reused(make_sink: MakeSink) -> None:
    """The reader takes the TLS transport over and gives it back: a refusal, then a second
    transaction on the same TLS connection."""
    ca = trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("sink.test").configure_cert(server_ctx)
    sink = await PipeliningSink(
        tls_context=server_ctx,
        rcpt_reply=lambda peer, rcpt: "550 5.1.1 no such user" if rcpt.startswith("x") else None,
    ).start()
    dispatcher = Dispatcher(DeliveryConfig())  # STARTTLS when offered
    endpoint = Endpoint(None, "mta.test", "opportunistic")
    try:
        first = await dispatcher.send(endpoint, [hop(sink.port)], *mail("a@d.test", "x@d.test"))
        again = await dispatcher.send(endpoint, [hop(sink.port)], *mail("b@d.test"))
        got = await sink.wait_for(2)
    finally:
        await dispatcher.close()
        await sink.stop()
    replies = first.replies + again.replies
    assert [(r.code, r.stage, r.tls) for r in replies] == [
        (250, Stage.DATA, True),
        (550, Stage.RCPT, True),
        (250, Stage.DATA, True),
    ]
    assert [m.rcpts for m in got] == [["a@d.test"], ["b@d.test"]]
    assert all(m.tls for m in got)
    assert len({m.peer_port for m in got}) == 1  # one connection


# --- the same bytes -------------------------------------------------------------------


async def test_the_same_bytes_on_the_wire_pipelined_or_not() -> None:
    """SMTPUTF8 addresses, 8-bit body, SIZE, leading dots, bare CR and LF, no final CRLF:
    aiosmtplib's quoting, encoding and dot-stuffing either way."""
    mail = Transaction("expéditeur@sender.test", ["dés@dest.test", "b@dest.test"], TRICKY)
    async with scripted() as receiver:
        await deliver(receiver.port, [mail], pipelining=False)
        await deliver(receiver.port, [mail])
        step, pipe = await receiver.session(0), await receiver.session(1)
    assert lockstep(step) and pipelined(pipe)
    assert bytes(pipe.raw) == bytes(step.raw)
    assert f"SMTPUTF8 BODY=8BITMIME SIZE={len(TRICKY)}".encode() in pipe.raw
    assert b"\r\n...two\r\nbare LF\r\nbare CR\r\n..\r\n" in pipe.raw


async def test_the_same_message_at_an_aiosmtpd_sink_pipelined_or_not(sink: Sink) -> None:
    """aiosmtpd does not offer PIPELINING (lockstep); the subclass that does gets a
    pipelined group (seen through a tap) and the same message."""
    mail = Transaction("expéditeur@sender.test", ["dés@dest.test", "b@dest.test"], TRICKY)
    await deliver(sink.port, [mail])
    pipelining = await PipeliningSink().start()
    try:
        async with tapped(pipelining.port) as tap:
            await deliver(tap.port, [mail])
            await pipelining.wait_for(1)
    finally:
        await pipelining.stop()
    [plain], [piped] = sink.messages, pipelining.messages
    assert (piped.mail_from, piped.rcpts, piped.data, piped.mail_options) == (
        plain.mail_from,
        plain.rcpts,
        plain.data,
        plain.mail_options,
    )
    assert [line.split(b":")[0] for line in tap.groups()[0]] == [
        b"MAIL FROM",
        b"RCPT TO",
        b"RCPT TO",
        b"DATA",
    ]


# --- a real Postfix -------------------------------------------------------------------

REFUSED = "refused@dest.test"
POSTFIX_MAIN = {
    "smtpd_recipient_restrictions": (
        f"check_recipient_access inline:{{ {{{REFUSED} = 550 5.1.1 no such user}} }}"
    )
}


@pytest.fixture(scope="module")
def postfix() -> Iterator[Postfix]:
    """One private Postfix for the module (it starts in 0.1 s, but why twice)."""
    with postfix_running(main=POSTFIX_MAIN) as instance:
        yield instance


async def test_postfix_takes_a_pipelined_delivery_from_the_relay(
    tmp_path: Path, postfix: Postfix
) -> None:
    message_id = f"{uuid.uuid4().hex}@sender.test"
    message = (
        f"From: <app@sender.test>\r\nTo: <a@dest.test>\r\nSubject: via postfix\r\n"
        f"Message-ID: <{message_id}>\r\n\r\npipelined\r\n"
    ).encode()
    async with (
        tapped(postfix.ports["smtp"]) as tap,
        running(relay_config(tmp_path, tap.port)) as relay,
    ):
        client = aiosmtplib.SMTP(hostname="127.0.0.1", port=relay.smtp_ports[0])
        async with client:
            await client.sendmail("app@sender.test", ["a@dest.test", "b@dest.test"], message)
        line = await postfix.wait_for_log(rf"([0-9A-F]+): message-id=<{message_id}>")
        queue_id = line.group(1)
        for rcpt in ("a@dest.test", "b@dest.test"):
            await postfix.wait_for_log(rf"{queue_id}: to=<{rcpt}>.*status=sent")
    assert [[line.split(b":")[0] for line in group] for group in tap.groups()] == [
        [b"MAIL FROM", b"RCPT TO", b"RCPT TO", b"DATA"]
    ]
    assert "improper command pipelining" not in postfix.log()


@pytest.mark.parametrize("pipelining", [True, False])
async def test_postfix_refusals(postfix: Postfix, pipelining: bool) -> None:
    """A refused recipient beside an accepted one, then only refused ones: pipelined,
    Postfix answers DATA 554 ("no valid recipients"), we RSET; in lockstep DATA (through
    the same reader) is sent only for the first. Nothing out of order in its log."""
    marker = uuid.uuid4().hex
    data = f"Subject: {marker}\r\nMessage-ID: <{marker}@sender.test>\r\n\r\nhi\r\n".encode()
    replies = await deliver(
        postfix.ports["smtp"],
        [tx("ok@dest.test", REFUSED, data=data), tx(REFUSED, data=data)],
        pipelining=pipelining,
    )
    assert [(r.code, r.stage, r.accepted) for r in replies] == [
        (250, Stage.DATA, True),
        (550, Stage.RCPT, False),
        (550, Stage.RCPT, False),
    ]
    assert replies[0].text.startswith("2.0.0 Ok: queued as ")
    queue_id = replies[0].text.rsplit(" ", 1)[1]
    await postfix.wait_for_log(rf"{queue_id}: message-id=<{marker}@sender.test>")
    await postfix.wait_for_log(rf"{queue_id}: to=<ok@dest.test>.*status=sent")
    log = postfix.log()
    assert "improper command pipelining" not in log
    assert "non-SMTP command" not in log  # no lone dot after a refused DATA


async def test_postfix_tells_improper_pipelining_the_check_above_can_fail() -> None:
    """Postfix logs a client that sends past DATA before the 354 (what a wrong pipelining
    client does), so its absence in the tests above means something. An instance of its
    own: that line must not reach the log the other tests read."""
    with postfix_running() as postfix:
        reader, writer = await asyncio.open_connection("127.0.0.1", postfix.ports["smtp"])
        await reader.readline()
        writer.write(b"EHLO wrong.test\r\n")
        while (await reader.readline())[3:4] == b"-":
            pass
        writer.write(
            b"MAIL FROM:<wrong@sender.test>\r\nRCPT TO:<x@dest.test>\r\nDATA\r\n"
            b"Subject: too early\r\n\r\nx\r\n.\r\nQUIT\r\n"
        )
        await reader.read()
        writer.close()
        await postfix.wait_for_log(r"improper command pipelining after DATA from localhost")


@hypothesis.settings(max_examples=500, deadline=None)
@hypothesis.given(
    hypothesis.strategies.lists(
        hypothesis.strategies.sampled_from([b"\r\n", b"\r", b"\n", b".", b"..", b"a", b"\xff"]),
        max_size=40,
    )
)
def test_the_message_bytes_are_aiosmtplib_s(pieces: list[bytes]) -> None:
    """``message`` skips aiosmtplib's two regex passes when the mail already has CRLF
    endings; with or without that shortcut it sends what aiosmtplib would."""
    data = b"".join(pieces)
    expected = PERIOD_REGEX.sub(b"..", normalize_message_line_endings(data)) + b".\r\n"
    assert message(data) == expected


_ATEXT = "abcXYZ019!#$%&'*+/=?^_`{|}~-"


@hypothesis.settings(max_examples=1000, deadline=None)
@hypothesis.given(
    hypothesis.strategies.one_of(
        hypothesis.strategies.from_regex(
            r"[a-zA-Z0-9!#$%&'*+/=?^_`{|}~.-]+@[a-zA-Z0-9.-]+", fullmatch=True
        ),
        hypothesis.strategies.text(alphabet=_ATEXT + '."()<>@,:;[]\\ \té\r\n\0', max_size=30),
    )
)
def test_addresses_are_quoted_as_aiosmtplib_quotes_them(address: str) -> None:
    """``quoted`` skips aiosmtplib's parser for a plain local@domain; for every address,
    plain or not (dots in odd places, quotes, comments, control characters), it gives what
    ``quote_address`` gives, or refuses what it refuses."""
    try:
        expected = quote_address(address)
    except ValueError:
        with pytest.raises(ValueError):
            quoted(address)
        return
    assert quoted(address) == expected
