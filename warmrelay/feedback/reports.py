"""What a report that came back says: a DSN (RFC 3464), an ARF complaint (RFC 5965), a
plain-text bounce (best effort), or nothing we recognise.

Parsed with the standard library's ``email`` package, defensively: reports come from
anyone, so any input (truncated MIME, wrong report types, huge parts, bytes that are no
mail at all) yields a ``Report`` and never an exception. Each bounced recipient gets a
class: ``hard`` (5.x.x, failed), ``soft`` (4.x.x: delayed or failed for now) or
``other`` (delivered, relayed, expanded, no status). A report quoting the original
message (most do: RFC 3464 recommends it, ARF requires it) yields our trace header too.
"""

from __future__ import annotations

import email
import email.policy
import re
from collections.abc import Iterator
from dataclasses import dataclass
from email.message import Message
from typing import Literal

from warmrelay.feedback.token import TRACE_HEADER

BounceClass = Literal["hard", "soft", "other"]

MAX_PARTS = 50  # a report with more MIME parts than this is not a report
MAX_SCAN_BYTES = 256 * 1024  # how much of a text part is searched for a reply line

_STATUS = re.compile(r"\b([245])\.(\d{1,3})\.(\d{1,3})\b")
_TRACE = re.compile(
    rb"(?im)^"
    + TRACE_HEADER.encode()
    + rb":[ \t]*([0-9]\.[A-Za-z0-9_\-]+(?:\r?\n[ \t]+[A-Za-z0-9_\-]+)*)"
)
_REPLY_LINE = re.compile(r"\b([45])\d\d[ -]+([45]\.\d{1,3}\.\d{1,3})\b[^\r\n]*")
_ADDRESS = re.compile(r"<?([A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,})>?")


@dataclass(frozen=True)
class Bounced:
    """One recipient a bounce report is about."""

    recipient: str  # Final-Recipient (or Original-Recipient), lower case; "" if none
    status: str  # e.g. "5.1.1" ("" if none)
    action: str  # failed, delayed, delivered, relayed, expanded ("" if none)
    diagnostic: str  # Diagnostic-Code, or the reply line of a plain-text bounce

    @property
    def bounce_class(self) -> BounceClass:
        if self.status.startswith("5") and self.action in ("failed", ""):
            return "hard"
        if self.status.startswith("4") and self.action in ("failed", "delayed", ""):
            return "soft"
        return "other"


@dataclass(frozen=True)
class BounceReport:
    kind: Literal["dsn", "text"]
    recipients: tuple[Bounced, ...]
    reporting_mta: str = ""  # the DSN's Reporting-MTA (its host name)
    trace: str | None = None  # our trace header, if the original is quoted


@dataclass(frozen=True)
class ComplaintReport:
    feedback_type: str  # abuse, fraud, virus, not-spam, other ...
    recipient: str = ""  # Original-Rcpt-To, often redacted (Yahoo's CFL removes it)
    source_ip: str = ""
    trace: str | None = None


@dataclass(frozen=True)
class Unrecognised:
    why: str


Report = BounceReport | ComplaintReport | Unrecognised


def parse_report(data: bytes) -> Report:
    """What ``data`` (a whole message as received) reports."""
    try:
        msg = email.message_from_bytes(data, policy=email.policy.compat32)
        return _parse(msg, data)
    except Exception as exc:  # anyone may send anything: nothing may escape
        return Unrecognised(f"cannot be parsed: {type(exc).__name__}")


def _parse(msg: Message, data: bytes) -> Report:
    parts = list(_walk(msg))
    if len(parts) > MAX_PARTS:
        return Unrecognised(f"more than {MAX_PARTS} MIME parts")
    content_type = msg.get_content_type()
    param = msg.get_param("report-type", "", header="content-type")
    report_type = param.lower() if isinstance(param, str) else ""
    trace = find_trace(msg, data)
    if content_type == "multipart/report" and report_type == "delivery-status":
        return _dsn(parts, trace)
    if content_type == "multipart/report" and report_type == "feedback-report":
        return _arf(parts, trace)
    return _text_bounce(parts, trace)


def _walk(msg: Message) -> Iterator[Message]:
    """The parts, but no more than enough to tell a report with too many."""
    for count, part in enumerate(msg.walk(), 1):
        yield part
        if count > MAX_PARTS:
            return


def _dsn(parts: list[Message], trace: str | None) -> Report:
    status_part = next(
        (p for p in parts if p.get_content_type() == "message/delivery-status"), None
    )
    if status_part is None:
        return Unrecognised("a delivery-status report without a message/delivery-status part")
    blocks = _field_blocks(status_part)
    if not blocks:
        return Unrecognised("a delivery-status part without fields")
    per_message, per_recipient = blocks[0], blocks[1:]
    if not per_recipient and ("final-recipient" in per_message or "action" in per_message):
        per_message, per_recipient = {}, blocks  # no per-message block (seen in the wild)
    recipients = []
    for block in per_recipient:
        address = _typed_address(block.get("final-recipient", "")) or _typed_address(
            block.get("original-recipient", "")
        )
        status = _STATUS.search(block.get("status", ""))
        recipients.append(
            Bounced(
                address,
                status.group(0) if status else "",
                block.get("action", "").strip().lower(),
                " ".join(block.get("diagnostic-code", "").split())[:500],
            )
        )
    if not recipients:
        return Unrecognised("a delivery-status report naming no recipient")
    mta = _typed_address(per_message.get("reporting-mta", ""), address=False)
    return BounceReport("dsn", tuple(recipients), mta.lower(), trace)


def _arf(parts: list[Message], trace: str | None) -> Report:
    feedback = next((p for p in parts if p.get_content_type() == "message/feedback-report"), None)
    if feedback is None:
        return Unrecognised("a feedback report without a message/feedback-report part")
    blocks = _field_blocks(feedback)
    fields = blocks[0] if blocks else {}
    kind = fields.get("feedback-type", "").strip().lower()
    if not kind:
        return Unrecognised("a feedback report without Feedback-Type")
    rcpt = _plain_address(fields.get("original-rcpt-to", ""))
    return ComplaintReport(kind, rcpt, fields.get("source-ip", "").strip(), trace)


def _text_bounce(parts: list[Message], trace: str | None) -> Report:
    """The common non-standard bounce: a text part with a 5xx (or 4xx) reply line and the
    address it refused. Best effort: without both, it is not recognised."""
    for part in parts:
        if (
            part.get_content_maintype() != "text"
            or part.get_content_type() == "text/rfc822-headers"
        ):
            continue
        text = _text_of(part)
        line = _REPLY_LINE.search(text)
        if line is None:
            continue
        before = text[max(0, line.start() - 300) : line.end()]
        addresses = _ADDRESS.findall(before)
        recipient = addresses[-1].lower() if addresses else ""
        status = line.group(2)
        action = "failed" if status.startswith(("4", "5")) else ""
        bounced = Bounced(recipient, status, action, " ".join(line.group(0).split())[:500])
        return BounceReport("text", (bounced,), "", trace)
    return Unrecognised("no delivery-status or feedback report, and no reply line in its text")


def _text_of(part: Message) -> str:
    payload = part.get_payload(decode=True)
    if not isinstance(payload, bytes):
        return ""
    charset = part.get_content_charset() or "utf-8"
    try:
        return payload[:MAX_SCAN_BYTES].decode(charset, errors="replace")
    except LookupError:
        return payload[:MAX_SCAN_BYTES].decode("utf-8", errors="replace")


def _field_blocks(part: Message) -> list[dict[str, str]]:
    """The header blocks of a message/delivery-status or message/feedback-report part,
    each as lower-case field name -> value (the first of each name)."""
    payload = part.get_payload()
    blocks: list[Message] = []
    if isinstance(payload, list):
        blocks = [p for p in payload if isinstance(p, Message)]
    elif isinstance(payload, str):  # not parsed as fields (odd encodings): parse it here
        text = payload.replace("\r\n", "\n")
        blocks = [
            email.message_from_string(b, policy=email.policy.compat32)
            for b in text.split("\n\n")
            if b.strip()
        ]
    out = []
    for block in blocks[:MAX_PARTS]:
        fields: dict[str, str] = {}
        for name, value in block.items():
            fields.setdefault(name.lower(), str(value))
        if fields:
            out.append(fields)
    return out


def _typed_address(value: str, *, address: bool = True) -> str:
    """``rfc822; a@b.test`` -> ``a@b.test`` (``dns; mx.b.test`` -> ``mx.b.test``)."""
    _, _, rest = value.partition(";")
    rest = (rest or value).strip().strip("<>").strip()
    if address and "@" not in rest:
        return ""
    return rest.lower() if address else rest


def _plain_address(value: str) -> str:
    found = _ADDRESS.search(value)
    return found.group(1).lower() if found else ""


def find_trace(msg: Message, data: bytes) -> str | None:
    """Our trace header's value in the quoted original (message/rfc822, or the headers of
    text/rfc822-headers, whatever their transfer encoding), else in the raw bytes."""
    for part in msg.walk():
        kind = part.get_content_type()
        if kind == "message/rfc822":
            inner = part.get_payload()
            if isinstance(inner, list) and inner and isinstance(inner[0], Message):
                value = inner[0].get(TRACE_HEADER)
                if value:
                    return " ".join(str(value).split())
        elif kind == "text/rfc822-headers":
            raw = part.get_payload(decode=True)
            if isinstance(raw, bytes):
                found = _TRACE.search(raw)
                if found:
                    return b"".join(found.group(1).split()).decode("ascii", "replace")
    found = _TRACE.search(data)
    return b"".join(found.group(1).split()).decode("ascii", "replace") if found else None
