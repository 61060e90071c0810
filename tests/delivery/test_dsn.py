"""Tests for warmrelay.dsn: the bounce message must parse as RFC 3464 and be SMTP-safe."""

from __future__ import annotations

import email
import email.policy
import re
from datetime import UTC, datetime, timedelta, timezone
from email.message import EmailMessage
from email.utils import parsedate_to_datetime
from typing import Any

import pytest

from warmrelay.delivery.dsn import FailedRecipient, build_dsn

NOW = datetime(2025, 3, 4, 5, 6, 7, tzinfo=UTC)
ARRIVAL = NOW - timedelta(days=5)
ORIGINAL = (
    b"From: App <app@example.com>\r\n"
    b"To: bob@example.org\r\n"
    b"Subject: Your invoice 42\r\n"
    b"Message-ID: <orig-1@example.com>\r\n"
    b"\r\n"
    b"Body line one\r\n"
    b"SECRET BODY\r\n"
)
BOUNCED = FailedRecipient(
    address="bob@example.org",
    status="5.1.1",
    diagnostic="550 5.1.1 <bob@example.org>: no such user",
    remote_mta="mx1.example.org",
    last_attempt=NOW - timedelta(minutes=1),
)
EXPIRED = FailedRecipient(
    address="carol@example.net",
    status="4.4.7",
    diagnostic="421 4.7.0 [TSS04] Messages temporarily deferred",
    remote_mta="mta5.am0.yahoodns.net",
    last_attempt=NOW - timedelta(hours=1),
)


def make(**kw: Any) -> bytes:
    args: dict[str, Any] = {
        "reporting_mta": "relay.example.com",
        "queue_id": "4F2A9C01",
        "sender": "app@example.com",
        "recipients": [BOUNCED],
        "original": ORIGINAL,
        "arrival": ARRIVAL,
        "now": NOW,
    }
    args.update(kw)
    return build_dsn(**args)


def parse(raw: bytes) -> EmailMessage:
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    return msg


def parts(msg: EmailMessage) -> list[EmailMessage]:
    return list(msg.iter_parts())  # type: ignore[arg-type]


def blocks(msg: EmailMessage) -> list[Any]:
    """The stdlib parses message/delivery-status into a list of header blocks."""
    status = parts(msg)[1]
    payload = status.get_payload()
    assert isinstance(payload, list)
    return payload


def assert_smtp_safe(raw: bytes) -> None:
    assert raw.endswith(b"\r\n")
    assert b"\n" not in raw.replace(b"\r\n", b""), "bare LF"
    assert b"\r" not in raw.replace(b"\r\n", b""), "bare CR"
    assert max(len(line) for line in raw.split(b"\r\n")) <= 998


def test_structure_and_per_message_fields() -> None:
    raw = make()
    assert_smtp_safe(raw)
    msg = parse(raw)
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    assert [p.get_content_type() for p in parts(msg)] == [
        "text/plain",
        "message/delivery-status",
        "text/rfc822-headers",
    ]
    assert not msg.defects
    per_message, rcpt = blocks(msg)
    assert per_message["Reporting-MTA"] == "dns; relay.example.com"
    assert per_message["X-Queue-ID"] == "4F2A9C01"
    assert parsedate_to_datetime(per_message["Arrival-Date"]) == ARRIVAL
    assert rcpt["Final-Recipient"] == "rfc822; bob@example.org"
    assert rcpt["Action"] == "failed"
    assert rcpt["Status"] == "5.1.1"
    assert rcpt["Remote-MTA"] == "dns; mx1.example.org"
    assert rcpt["Diagnostic-Code"] == "smtp; 550 5.1.1 <bob@example.org>: no such user"
    assert parsedate_to_datetime(rcpt["Last-Attempt-Date"]) == BOUNCED.last_attempt


def test_top_level_headers() -> None:
    msg = parse(make())
    assert msg["From"].addresses[0].addr_spec == "MAILER-DAEMON@relay.example.com"
    assert msg["From"].addresses[0].display_name == "Mail Delivery System"
    assert msg["To"].addresses[0].addr_spec == "app@example.com"
    assert msg["Subject"] == "Undelivered Mail Returned to Sender"
    assert msg["Auto-Submitted"] == "auto-replied"
    assert msg["MIME-Version"] == "1.0"
    assert msg["Date"].datetime == NOW
    assert re.fullmatch(r"<[^<>@\s]+@relay\.example\.com>", msg["Message-ID"])


def test_human_readable_part_names_recipients_and_queue_id() -> None:
    msg = parse(make(recipients=[BOUNCED, EXPIRED]))
    text = parts(msg)[0].get_content()
    assert "4F2A9C01" in text
    assert "bob@example.org" in text and "no such user" in text
    assert "carol@example.net" in text
    assert "could not be delivered within the queue lifetime" in " ".join(text.split())


def test_part3_has_original_headers_only() -> None:
    raw = make()
    third = parts(parse(raw))[2]
    content = third.get_content()
    assert "Subject: Your invoice 42" in content
    assert "Message-ID: <orig-1@example.com>" in content
    assert "SECRET BODY" not in content
    assert b"SECRET BODY" not in raw


def test_expired_recipient_is_failed_with_4_4_7() -> None:
    msg = parse(make(recipients=[EXPIRED]))
    (rcpt,) = blocks(msg)[1:]
    assert rcpt["Action"] == "failed"
    assert rcpt["Status"] == "4.4.7"
    assert rcpt["Diagnostic-Code"].startswith("smtp; 421 4.7.0 [TSS04]")


def test_optional_fields_omitted() -> None:
    rcpt = FailedRecipient("dave@nowhere.invalid", "5.1.2", "", None, None)
    (block,) = blocks(parse(make(recipients=[rcpt])))[1:]
    assert block["Final-Recipient"] == "rfc822; dave@nowhere.invalid"
    assert block["Status"] == "5.1.2"
    for name in ("Remote-MTA", "Diagnostic-Code", "Last-Attempt-Date"):
        assert name not in block


def test_multiple_recipients_in_order() -> None:
    third = FailedRecipient("erin@example.org", "5.7.1", "554 5.7.1 policy", "mx1.example.org", NOW)
    raw = make(recipients=[BOUNCED, EXPIRED, third])
    assert_smtp_safe(raw)
    rcpts = blocks(parse(raw))[1:]
    assert [b["Final-Recipient"] for b in rcpts] == [
        "rfc822; bob@example.org",
        "rfc822; carol@example.net",
        "rfc822; erin@example.org",
    ]
    assert [b["Status"] for b in rcpts] == ["5.1.1", "4.4.7", "5.7.1"]
    assert all(b["Action"] == "failed" for b in rcpts)


@pytest.mark.parametrize(
    "subject",
    ["Grüße aus Köln".encode(), "Café".encode("latin-1"), b"\xff\xfe broken \x80"],
)
def test_8bit_original_headers_pass_through_raw(subject: bytes) -> None:
    original = b"From: a@example.com\r\nSubject: " + subject + b"\r\n\r\nbody \xe9\r\n"
    raw = make(original=original)
    assert_smtp_safe(raw)
    assert b"Subject: " + subject + b"\r\n" in raw
    third = parts(parse(raw))[2]
    assert third.get_content_type() == "text/rfc822-headers"
    assert third["Content-Transfer-Encoding"] == "8bit"


def test_ascii_original_is_7bit() -> None:
    assert parts(parse(make()))[2]["Content-Transfer-Encoding"] == "7bit"


@pytest.mark.parametrize("spaces", [True, False])
def test_2000_char_diagnostic_keeps_lines_short(spaces: bool) -> None:
    word = "word " if spaces else "x"
    diag = "550 5.7.1 " + (word * 2000)[:2000]
    raw = make(recipients=[FailedRecipient("bob@example.org", "5.7.1", diag, "mx", NOW)])
    assert_smtp_safe(raw)
    (rcpt,) = blocks(parse(raw))[1:]
    unfolded = rcpt["Diagnostic-Code"]
    assert unfolded.startswith("smtp; 550 5.7.1 ")
    if spaces:  # folding at whitespace is lossless
        assert " ".join(unfolded.split()) == " ".join(f"smtp; {diag}".split())
    else:
        assert unfolded.replace(" ", "") == f"smtp;{diag}".replace(" ", "")


def test_control_characters_in_diagnostic_are_neutralised() -> None:
    diag = "550-5.1.1 first line\r\n550 5.1.1 second line\x00"
    raw = make(recipients=[FailedRecipient("bob@example.org", "5.1.1", diag, "mx", NOW)])
    assert_smtp_safe(raw)
    assert b"\x00" not in raw
    (rcpt,) = blocks(parse(raw))[1:]
    assert "first line" in rcpt["Diagnostic-Code"] and "second line" in rcpt["Diagnostic-Code"]


def test_bare_lf_original_is_converted_to_crlf() -> None:
    original = b"Subject: lf only\nX-Long: " + b"a" * 3000 + b"\n\nbody\n"
    raw = make(original=original, return_headers_only=False)
    assert_smtp_safe(raw)
    assert b"Subject: lf only\r\n" in raw


def test_full_original_as_message_rfc822() -> None:
    raw = make(return_headers_only=False)
    assert_smtp_safe(raw)
    third = parts(parse(raw))[2]
    assert third.get_content_type() == "message/rfc822"
    inner = third.get_content()
    assert inner["Subject"] == "Your invoice 42"
    assert "SECRET BODY" in inner.get_content()


def test_original_without_body_separator() -> None:
    raw = make(original=b"Subject: headers only")
    assert "Subject: headers only" in parts(parse(raw))[2].get_content()


def test_non_ascii_recipient_uses_utf8_xtext() -> None:
    rcpt = FailedRecipient("jösé@example.org", "5.1.1", "", None, None)
    raw = make(recipients=[rcpt])
    assert_smtp_safe(raw)
    (block,) = blocks(parse(raw))[1:]
    assert block["Final-Recipient"] == "utf-8; j\\x{F6}s\\x{E9}@example.org"


def test_non_utc_dates_are_kept() -> None:
    tz = timezone(timedelta(hours=-5))
    msg = parse(make(now=NOW.astimezone(tz)))
    assert msg["Date"].endswith("-0500")
    assert msg["Date"].datetime == NOW


def test_refuses_null_sender() -> None:
    with pytest.raises(ValueError):
        make(sender="")


def test_refuses_no_recipients() -> None:
    with pytest.raises(ValueError):
        make(recipients=[])


def test_refuses_naive_dates() -> None:
    with pytest.raises(ValueError):
        make(now=datetime(2025, 1, 1))
