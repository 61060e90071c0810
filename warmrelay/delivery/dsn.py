"""Delivery status notifications (RFC 3464 multipart/report, RFC 3463 status codes).

Pure: builds the bounce as bytes; queueing it (MAIL FROM:<>) is the caller's job. The stdlib
makes the outer headers and the text part; the container is joined by hand because
BytesGenerator cannot emit a raw 8-bit message/rfc822 payload (it encodes strictly as ASCII)
and re-generating a parsed original would rewrite its headers.
"""

from __future__ import annotations

import re
import secrets
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from email import policy
from email.message import EmailMessage, MIMEPart
from email.utils import format_datetime, make_msgid

__all__ = ["FailedRecipient", "build_dsn"]

_MAX_LINE = 998  # RFC 5322 2.1.1, octets without CRLF
_EOL = re.compile(rb"\r\n|\r|\n")
_PROSE = textwrap.TextWrapper(76, break_long_words=False, break_on_hyphens=False)
_FOLD = textwrap.TextWrapper(78, "", " ", break_long_words=False, break_on_hyphens=False)


@dataclass(frozen=True)
class FailedRecipient:
    """One recipient that bounced (5.x.x) or expired in the queue (4.4.7)."""

    address: str
    status: str
    diagnostic: str
    remote_mta: str | None
    last_attempt: datetime | None


def _date(dt: datetime) -> str:
    if dt.tzinfo is None:  # a naive time would be rendered "-0000" (zone unknown)
        raise ValueError("DSN dates must be timezone-aware")
    return format_datetime(dt)


def _addr(addr: str) -> str:
    """Address type and value; non-ASCII uses RFC 6533 utf-8-addr-xtext (\\x{HEX})."""
    if addr.isascii():
        return f"rfc822; {addr}"
    xtext = (c if "!" <= c <= "~" and c not in "+=\\" else f"\\x{{{ord(c):X}}}" for c in addr)
    return "utf-8; " + "".join(xtext)


def _printable(text: str) -> str:
    """Controls (CR, LF, NUL in a remote reply) become spaces: they must not reach the wire."""
    return "".join(c if c.isprintable() else " " for c in text)


def _field(name: str, value: str) -> str:
    """One delivery-status field, ASCII only, folded at 78 columns where it has spaces."""
    text = _printable(value).encode("ascii", "replace").decode("ascii")
    return "\n".join(_FOLD.wrap(f"{name}: {text}"))


def _crlf(data: bytes, headers_only: bool = False) -> bytes:
    """CRLF endings; lines over 998 octets broken with CRLF SP like Postfix (headers stay valid)."""
    lines = _EOL.split(data)
    if headers_only and b"" in lines:
        lines = lines[: lines.index(b"")]
    out: list[bytes] = []
    for line in lines:
        out.append(line[:_MAX_LINE])
        out += [b" " + line[i : i + 990] for i in range(_MAX_LINE, len(line), 990)]
    return b"\r\n".join(out)


def build_dsn(
    *,
    reporting_mta: str,
    queue_id: str,
    sender: str,
    recipients: Sequence[FailedRecipient],
    original: bytes,
    arrival: datetime,
    now: datetime,
    return_headers_only: bool = True,
) -> bytes:
    """Build a failure DSN to `sender` (CRLF, lines <= 998 octets), to send with MAIL FROM:<>.

    Expired recipients keep their 4.x.x status with Action: failed (RFC 3464 2.3.3).
    Raises ValueError for a null sender: RFC 5321 4.5.5 forbids bouncing a bounce.
    """
    if not sender:
        raise ValueError("no DSN for a null reverse-path (RFC 5321 4.5.5)")
    if not recipients:
        raise ValueError("a DSN needs at least one failed recipient")

    intro = f"This is the mail system at host {reporting_mta}. Your message (queue ID {queue_id})"
    text = [_PROSE.fill(intro + " could not be delivered to the following recipients.")]
    fields = [_field("Reporting-MTA", f"dns; {reporting_mta}"), _field("X-Queue-ID", queue_id)]
    fields.append(_field("Arrival-Date", _date(arrival)))
    for r in recipients:
        why = "failed permanently"  # 5.x.x; a 4.x.x status names the last transient cause
        if r.status.startswith("4."):
            why = "could not be delivered within the queue lifetime"
        said = f"; {r.remote_mta or 'the server'} said: {r.diagnostic}" if r.diagnostic else ""
        text.append(_PROSE.fill(_printable(f"<{r.address}>: {why} (status {r.status}){said}")))
        fields += ["", _field("Final-Recipient", _addr(r.address)), "Action: failed"]
        fields.append(_field("Status", r.status))
        if r.remote_mta:
            fields.append(_field("Remote-MTA", f"dns; {r.remote_mta}"))
        if r.diagnostic:
            fields.append(_field("Diagnostic-Code", f"smtp; {r.diagnostic}"))
        if r.last_attempt is not None:
            fields.append(_field("Last-Attempt-Date", _date(r.last_attempt)))

    notice = MIMEPart(policy=policy.SMTP)
    notice.set_content("\n\n".join(text) + "\n")
    notice["Content-Description"] = "Notification"
    status = b"Content-Description: Delivery report\r\nContent-Type: message/delivery-status\r\n"
    status += b"\r\n" + _crlf("\n".join(fields).encode("ascii"))
    returned = _crlf(original, return_headers_only)
    ctype = "text/rfc822-headers" if return_headers_only else "message/rfc822"
    desc = "Undelivered Message Headers" if return_headers_only else "Undelivered Message"
    cte = "7bit" if returned.isascii() else "8bit"
    third = f"Content-Description: {desc}\r\nContent-Type: {ctype}\r\n"
    third += f"Content-Transfer-Encoding: {cte}\r\n\r\n"
    parts = [notice.as_bytes(), status, third.encode("ascii") + returned]
    parts = [p if p.endswith(b"\r\n") else p + b"\r\n" for p in parts]
    boundary = f"=_dsn_{secrets.token_hex(12)}"  # "=_" never occurs in quoted-printable
    while any(boundary.encode() in p for p in parts):
        boundary = f"=_dsn_{secrets.token_hex(12)}"

    msg = EmailMessage(policy=policy.SMTP if sender.isascii() else policy.SMTPUTF8)
    msg["From"] = f'"Mail Delivery System" <MAILER-DAEMON@{reporting_mta}>'
    msg["To"] = f"<{sender}>"
    msg["Subject"] = "Undelivered Mail Returned to Sender"
    msg["Date"] = _date(now)
    msg["Message-ID"] = make_msgid(domain=reporting_mta)
    msg["Auto-Submitted"] = "auto-replied"  # RFC 3834: autoresponders must not answer this
    msg["MIME-Version"] = "1.0"
    msg["Content-Type"] = f'multipart/report; report-type=delivery-status; boundary="{boundary}"'
    # Headers only: flattening msg itself would emit an empty multipart body.
    head = b"".join(msg.policy.fold_binary(k, v) for k, v in msg.raw_items()) + b"\r\n"
    body = b"This is a MIME-encapsulated message.\r\n\r\n"
    body += b"".join(f"--{boundary}\r\n".encode() + p for p in parts)
    return head + body + f"--{boundary}--\r\n".encode()
