"""Bounces and complaints come home (issue 20): our return path, the intake at the bounce
domain from any client, attribution to the IP and provider, suppression, forwarding."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest
import yaml
from support.cli import warmrelay_async
from support.relay import http_get, relay_doc, running, send
from support.sink import Received, Sink

from warmrelay.app import Relay
from warmrelay.config import parse_config

SECRET_ENV = "WARMRELAY_TEST_BOUNCE_SECRET"
BOUNCES = "bounces.relay.test"
OUTSIDER = "127.0.0.66"  # not in allow_networks: a receiver's MTA somewhere


def doc(tmp_path: Path, sink: Sink, **over: Any) -> dict[str, Any]:
    d = relay_doc(tmp_path, sink.port, **over)
    d["smtp"]["allow_networks"] = ["127.0.0.1/32"]
    d["bounces"] = {"domain": BOUNCES, "secret_env": SECRET_ENV, "sender_id": "acme"}
    return d


@pytest.fixture
def secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(SECRET_ENV, "0123456789abcdef0123456789abcdef")


@pytest.fixture
async def relay(tmp_path: Path, sink: Sink, secret: None) -> AsyncIterator[Relay]:
    async with running(parse_config(doc(tmp_path, sink))) as r:
        yield r


async def report(relay: Relay, rcpt: str, data: bytes, source: str = OUTSIDER) -> tuple[int, str]:
    """What an MTA out there does: MAIL FROM:<>, RCPT TO:<rcpt>, DATA; (code, message)
    of the first refusal, or of DATA."""
    client = aiosmtplib.SMTP(
        hostname="127.0.0.1", port=relay.smtp_ports[0], source_address=(source, 0)
    )
    async with client:
        await client.mail("")
        try:
            await client.rcpt(rcpt)
        except aiosmtplib.SMTPRecipientRefused as exc:
            return exc.code, exc.message
        try:
            answer = await client.data(data)
        except aiosmtplib.SMTPResponseException as exc:
            return exc.code, exc.message
        return answer.code, answer.message


def dsn(original: Received, rcpt: str, status: str = "5.1.1", headers_only: bool = True) -> bytes:
    """A receiver's RFC 3464 bounce of ``original`` for ``rcpt``, quoting its headers."""
    head = original.data.split(b"\r\n\r\n", 1)[0]
    quoted = (
        b"Content-Type: text/rfc822-headers\r\n\r\n" + head + b"\r\n"
        if headers_only
        else b"Content-Type: message/rfc822\r\n\r\n" + original.data
    )
    return (
        b"From: MAILER-DAEMON@mx.gmail.test\r\nTo: " + original.mail_from.encode() + b"\r\n"
        b"Subject: Delivery Status Notification (Failure)\r\nMIME-Version: 1.0\r\n"
        b'Content-Type: multipart/report; report-type=delivery-status; boundary="b1"\r\n\r\n'
        b"--b1\r\nContent-Type: text/plain\r\n\r\nThe address does not exist.\r\n"
        b"--b1\r\nContent-Type: message/delivery-status\r\n\r\n"
        b"Reporting-MTA: dns; mx.gmail.test\r\n\r\n"
        b"Final-Recipient: rfc822; " + rcpt.encode() + b"\r\nAction: failed\r\n"
        b"Status: "
        + status.encode()
        + b"\r\nDiagnostic-Code: smtp; 550 "
        + status.encode()
        + b" The email account that you tried to reach does not exist\r\n\r\n"
        b"--b1\r\n" + quoted + b"--b1--\r\n"
    )


def arf(original: Received, redact: bool = True) -> bytes:
    """A complaint loop's RFC 5965 report; Yahoo's CFL removes the recipient."""
    body = original.data
    if redact:
        for rcpt in original.rcpts:
            body = body.replace(rcpt.encode(), b"redacted@redacted")
    return (
        b"From: feedback@yahoo.test\r\nTo: fbl@" + BOUNCES.encode() + b"\r\n"
        b"Subject: complaint\r\nMIME-Version: 1.0\r\n"
        b'Content-Type: multipart/report; report-type=feedback-report; boundary="f1"\r\n\r\n'
        b"--f1\r\nContent-Type: text/plain\r\n\r\nThis is an abuse report.\r\n"
        b"--f1\r\nContent-Type: message/feedback-report\r\n\r\n"
        b"Feedback-Type: abuse\r\nUser-Agent: YahooCFL/1.0\r\nVersion: 1\r\n"
        b"Original-Rcpt-To: redacted@redacted\r\nSource-IP: 127.0.0.2\r\n\r\n"
        b"--f1\r\nContent-Type: message/rfc822\r\n\r\n" + body + b"\r\n--f1--\r\n"
    )


async def metric_value(relay: Relay, line_start: str) -> float:
    _, body = await http_get(relay.admin.port, "/metrics")
    for line in body.decode().splitlines():
        if line.startswith(line_start):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def metric_sum(relay: Relay, line_start: str) -> float:
    _, body = await http_get(relay.admin.port, "/metrics")
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in body.decode().splitlines()
        if line.startswith(line_start)
    )


def originals(sink: Sink) -> list[Received]:
    return [m for m in sink.messages if m.mail_from]


async def test_each_recipient_leaves_with_its_own_return_path_and_a_feedback_id(
    relay: Relay, sink: Sink
) -> None:
    await send(relay, ["alice@gmail.com", "bob@gmail.com", "carol@example.test"])
    got = await sink.wait_for(3)
    assert sorted(r for m in got for r in m.rcpts) == [
        "alice@gmail.com", "bob@gmail.com", "carol@example.test",
    ]  # fmt: skip
    senders = [m.mail_from for m in got]
    assert all(s.endswith("@" + BOUNCES) and len(s.split("@")[0]) <= 64 for s in senders)
    assert len(set(senders)) == 3  # a token per recipient
    for m in got:
        assert m.peer == "127.0.0.2"
        assert b"\r\nFeedback-ID: ip-127-0-0-2:warmrelay:mail:acme\r\n" in b"\r\n" + m.data
        assert m.data.startswith(b"Warmrelay-Trace: 1.")
        assert m.rcpts[0].encode() not in m.data.split(b"\r\n", 1)[0]  # sealed, not readable


async def test_a_dsn_from_anywhere_suppresses_counts_and_reaches_the_sender(
    relay: Relay, sink: Sink, tmp_path: Path
) -> None:
    await send(relay, ["gone@gmail.com"], sender="app@sender.test")
    (original,) = await sink.wait_for(1)
    code, text = await report(relay, original.mail_from, dsn(original, "gone@gmail.com"))
    assert code == 250, text
    assert relay.suppression.check("gone@gmail.com") is not None  # refused from now on
    hard = 'warmrelay_async_bounces_total{class="hard",ip="127.0.0.2",provider="gmail"}'
    assert await metric_value(relay, hard) == 1.0
    forwarded = await sink.wait_until(lambda: len(sink.messages) == 2) or sink.messages[1]
    assert forwarded.mail_from == "" and forwarded.rcpts == ["app@sender.test"]
    assert b"The email account that you tried to reach does not exist" in forwarded.data
    assert forwarded.peer == "127.0.0.3"  # a null sender never uses the warming IP
    assert relay.intake is not None
    await relay.intake.counts.flush()  # the counts in flight are written
    rates = (await relay.status())["ips"][0]["feedback"]["gmail"]["today"]
    assert (rates["handed"], rates["hard"], rates["hard_rate"]) == (1, 1, 1.0)
    _, page = await http_get(relay.admin.port, "/")
    assert b'<span data-field="hard-rate">100.00 %</span>' in page
    path = tmp_path / "relay.yaml"
    path.write_text(yaml.safe_dump(doc(tmp_path, sink)))
    shown = await warmrelay_async("schedule", "-c", str(path))
    assert shown.returncode == 0, shown.stderr
    assert "127.0.0.2       gmail       7 days: handed 1, hard 1 (100.00 %)" in shown.stdout


async def test_a_complaint_with_the_recipient_redacted_is_attributed_and_suppressed(
    relay: Relay, sink: Sink
) -> None:
    await send(relay, ["dave@yahoo.com"], sender="app@sender.test")
    (original,) = await sink.wait_for(1)
    complaint = arf(original)
    assert b"dave@yahoo.com" not in complaint  # redacted everywhere
    code, text = await report(relay, f"fbl@{BOUNCES}", complaint)
    assert code == 250, text
    assert relay.suppression.check("dave@yahoo.com") is not None
    assert (
        await metric_value(relay, 'warmrelay_complaints_total{ip="127.0.0.2",provider="yahoo"}')
        == 1.0
    )


async def test_a_forged_or_altered_token_is_refused_and_changes_nothing(
    relay: Relay, sink: Sink
) -> None:
    await send(relay, ["erin@gmail.com"])
    (original,) = await sink.wait_for(1)
    local, _, domain = original.mail_from.partition("@")
    altered = local[:-1] + ("a" if local[-1] != "a" else "b") + "@" + domain
    forged = "b" + "0" * 16 + "." + "a" * 26 + "@" + domain
    for rcpt in (altered, forged):
        code, text = await report(relay, rcpt, dsn(original, "erin@gmail.com"))
        assert code == 550 and text.startswith("5.1.1"), (code, text)
    # the token is bound to its recipient: a bounce naming someone else changes nothing
    code, _ = await report(relay, original.mail_from, dsn(original, "frank@gmail.com"))
    assert code == 250
    assert relay.suppression.check("erin@gmail.com") is None
    assert relay.suppression.check("frank@gmail.com") is None
    assert await metric_value(relay, "warmrelay_async_bounces_total{") == 0.0


async def test_an_outsider_is_still_refused_for_every_other_domain(
    relay: Relay, sink: Sink
) -> None:
    code, text = await report(relay, "victim@example.test", b"Subject: spam\r\n\r\nhi\r\n")
    assert (code, text[:5]) == (550, "5.7.1")
    await asyncio.sleep(0)
    assert sink.messages == []


async def test_a_thousand_garbage_reports_are_counted_kept_and_change_nothing(
    tmp_path: Path, sink: Sink, secret: None
) -> None:
    document = doc(tmp_path, sink)
    document["bounces"]["reports_per_minute"] = 100_000
    async with running(parse_config(document)) as relay:
        await _garbage(relay, sink)


async def _garbage(relay: Relay, sink: Sink) -> None:
    rng = random.Random(20)
    good = dsn(
        Received("127.0.0.2", 0, False, "x", "b@x", ["a@gmail.com"], b"From: a\r\n\r\nx\r\n"),
        "a@gmail.com",
    )
    samples = []
    for i in range(1000):
        kind = i % 5
        if kind == 0:
            data = good[: rng.randrange(len(good))]  # truncated MIME
        elif kind == 1:
            data = good.replace(b"delivery-status", b"disposition-notification")  # wrong type
        elif kind == 2:
            data = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 400)))
        elif kind == 3:
            huge = (b"A" * 76 + b"\r\n") * 4000  # a 300 KB part
            data = good.replace(b"The address does not exist.\r\n", huge)
        else:
            data = b"Content-Type: multipart/report; boundary=x\r\n\r\n--x\r\n" * 60
        samples.append(data.replace(b"\r\n.\r\n", b"\r\n..\r\n"))
    client = aiosmtplib.SMTP(
        hostname="127.0.0.1", port=relay.smtp_ports[0], source_address=(OUTSIDER, 0)
    )
    taken = 0
    async with client:
        for data in samples:
            await client.mail("")
            await client.rcpt(f"postmaster@{BOUNCES}")
            try:
                await client.data(data)
                taken += 1
            except aiosmtplib.SMTPResponseException as exc:
                raise AssertionError(f"report {taken} refused: {exc}") from exc
    unrecognised = await metric_value(
        relay, 'warmrelay_feedback_reports_total{attributed="no",kind="unrecognised"}'
    )
    assert await metric_sum(relay, 'warmrelay_feedback_reports_total{attributed="no"') == taken
    assert await metric_sum(relay, 'warmrelay_feedback_reports_total{attributed="yes"') == 0
    assert taken == len(samples) and unrecognised >= 400  # random bytes, boundary soup at least
    kept = list((Path(relay.config.state.dir) / "feedback").glob("*/*.eml"))
    assert len(kept) == taken
    assert relay.suppression.check("a@gmail.com") is None
    assert await metric_value(relay, "warmrelay_async_bounces_total{") == 0.0
    assert sink.messages == []  # nothing forwarded, nothing relayed


async def test_feedback_id_is_signed_and_a_retry_from_the_ip_sends_the_same_bytes(
    tmp_path: Path, make_sink: Any, secret: None
) -> None:
    """DKIM at delivery, per source IP: the Feedback-ID that names the IP is in h=, the
    signature verifies (the trace header above it is not signed), and the 451-then-250
    retry from the same IP carries byte for byte what the first try carried."""
    import dkim as dkimpy

    from warmrelay.mail.dkim import generate_key, txt_value, write_key

    key = generate_key("rsa")
    key_file = tmp_path / "s1.pem"
    write_key(key_file, key)
    tried: list[bytes] = []

    def first_refused(peer: str, envelope: Any) -> str | None:
        tried.append(bytes(envelope.original_content))
        return "451 4.3.0 try again" if len(tried) == 1 else None

    sink = await make_sink(data_reply=first_refused)
    document = doc(tmp_path, sink)
    document["dkim"] = {
        "domains": {"sender.test": {"keys": [{"selector": "s1", "key_file": str(key_file)}]}}
    }
    async with running(parse_config(document)) as relay:
        await send(relay, ["gina@gmail.com"], sender="app@sender.test")
        (got,) = await sink.wait_for(1)
    assert len(tried) == 2 and tried[0] == tried[1] == got.data  # identical bytes
    record = txt_value(key).encode()

    def dns(name: bytes, timeout: int = 5) -> bytes:
        assert name == b"s1._domainkey.sender.test."
        return record

    signature = got.data.split(b"DKIM-Signature:", 1)[1].split(b"\r\n\r\n", 1)[0]
    assert b"feedback-id" in signature.replace(b"\r\n", b"").replace(b" ", b"").replace(b"\t", b"")
    assert dkimpy.verify(got.data, dnsfunc=dns)
    forged = got.data.replace(b"ip-127-0-0-2:", b"ip-127-0-0-9:")
    assert not dkimpy.verify(forged, dnsfunc=dns)  # the IP's field is covered


def test_check_config_refuses_a_missing_secret_and_warns_about_alignment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import yaml
    from support.cli import warmrelay

    from warmrelay.mail.dkim import generate_key, write_key

    key_file = tmp_path / "k.pem"
    write_key(key_file, generate_key("ed25519"))
    document = relay_doc(tmp_path, 9)
    document["bounces"] = {"domain": "bounces.other-org.test", "secret_env": SECRET_ENV}
    document["dkim"] = {
        "domains": {
            "example.test": {
                "keys": [
                    {"selector": "s", "key_file": str(key_file), "algorithm": "ed25519-sha256"}
                ]
            }
        }
    }
    path = tmp_path / "relay.yaml"
    path.write_text(yaml.safe_dump(document))
    monkeypatch.delenv(SECRET_ENV, raising=False)
    refused = warmrelay("check-config", "-c", str(path))
    assert refused.returncode == 1
    assert f"bounces.secret_env: the environment variable {SECRET_ENV} is not set" in refused.stderr
    served = warmrelay("serve", "-c", str(path))
    assert served.returncode == 1 and "bounces.secret_env" in served.stderr
    monkeypatch.setenv(SECRET_ENV, "0123456789abcdef0123456789abcdef")
    passed = warmrelay("check-config", "-c", str(path))
    assert passed.returncode == 0, passed.stderr
    assert "bounces.domain: bounces.other-org.test does not share the organisational domain" in (
        passed.stderr
    )


async def test_our_own_dsn_coming_back_is_not_a_receivers_bounce(relay: Relay, sink: Sink) -> None:
    await send(relay, ["hank@gmail.com"])
    (original,) = await sink.wait_for(1)
    own = dsn(original, "hank@gmail.com").replace(
        b"Reporting-MTA: dns; mx.gmail.test", b"Reporting-MTA: dns; relay.test"
    )
    code, _ = await report(relay, original.mail_from, own)
    assert code == 250
    assert relay.suppression.check("hank@gmail.com") is None
    assert await metric_value(relay, "warmrelay_async_bounces_total{") == 0.0
    assert (
        await metric_value(relay, 'warmrelay_feedback_reports_total{attributed="no",kind="own"}')
        == 1.0
    )


async def test_one_transaction_per_recipient_each_with_its_own_outcome(
    tmp_path: Path, make_sink: Any, secret: None
) -> None:
    """The second recipient's transaction is deferred (451 after DATA), the first and third
    delivered: each gets its own verdict, the deferred one is retried and arrives once."""
    refused: list[str] = []

    def second_later(peer: str, envelope: Any) -> str | None:
        if envelope.rcpt_tos == ["two@gmail.com"] and not refused:
            refused.append("two@gmail.com")
            return "451 4.3.0 not now"
        return None

    sink = await make_sink(data_reply=second_later)
    async with running(parse_config(doc(tmp_path, sink))) as relay:
        await send(relay, ["one@gmail.com", "two@gmail.com", "three@gmail.com"])
        await sink.wait_until(lambda: len(sink.messages) == 3)
        await sink.wait_until(lambda: relay.scheduler.messages == 0)
    delivered = sorted(r for m in sink.messages for r in m.rcpts)
    assert delivered == ["one@gmail.com", "three@gmail.com", "two@gmail.com"]
    assert refused == ["two@gmail.com"]
    assert len({m.mail_from for m in sink.messages}) == 3


async def test_reports_are_limited_in_size_and_rate_per_client(
    tmp_path: Path, sink: Sink, secret: None
) -> None:
    document = doc(tmp_path, sink)
    document["bounces"] |= {"max_report_bytes": 2000, "reports_per_minute": 2}
    async with running(parse_config(document)) as relay:
        small = b"Subject: hi\r\n\r\n" + b"x\r\n" * 10
        big = b"Subject: hi\r\n\r\n" + (b"x" * 70 + b"\r\n") * 40
        code, text = await report(relay, f"postmaster@{BOUNCES}", big)
        assert (code, text[:5]) == (552, "5.3.4")
        assert [(await report(relay, f"postmaster@{BOUNCES}", small))[0] for _ in range(3)] == [
            250,
            250,
            450,
        ]
        other = (await report(relay, f"postmaster@{BOUNCES}", small, source="127.0.0.67"))[0]
        assert other == 250  # the limit is per client address
