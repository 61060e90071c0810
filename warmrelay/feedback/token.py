"""Our return path and trace header: what lets a report that comes back days later name
the message, the recipient, the source IP and the provider it is about.

**Return path (VERP).** Each recipient's envelope sender is ``b<queue id>.<code>@<bounce
domain>``: the queue id in clear (operators read it), then 16 bytes in base32 (case
does not matter: some MTAs fold it): the recipient's index (2), a 4-byte keyed hash of
the recipient address and a 10-byte HMAC over all of it plus the source IP and the
provider. 44 characters, under SMTP's 64 for a local part. The IP and provider are not
written, only signed: the intake finds them by trying the few configured IPs and known
providers. A DSN's Final-Recipient must match the keyed hash, so a recipient who knows
its own return path cannot make us suppress anyone else.

**Trace header.** Complaint loops (Yahoo's CFL) redact the recipient from the report,
but quote the original's headers: ``Warmrelay-Trace`` carries queue id, recipient,
original sender, IP and provider, sealed (ChaCha20-Poly1305) so the redaction finds
no address in it and nobody can forge or read one. It is added per transaction, after
DKIM signing (it is trace, as our Received: line).

Keys are derived from ``bounces.secret_*`` (HMAC-SHA256 with a label per use).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

PREFIX = "b"
TRACE_HEADER = "Warmrelay-Trace"
_QUEUE_ID = re.compile(r"^[0-9A-Z]{16}$")  # Crockford base32 (queue.spool)
_LOCAL = re.compile(r"^b([0-9a-z]{16})\.([a-z2-7]{26})$", re.IGNORECASE)
_MAC_BYTES = 10
_RCPT_HASH_BYTES = 4
_TRACE_VERSION = "1"
_TRACE_AD = b"warmrelay-trace-v1"


@dataclass(frozen=True)
class Sent:
    """What one recipient's report is about."""

    queue_id: str
    index: int  # the recipient's position in the message
    ip: str  # the source IP that handed it over ("smarthost" through the smarthost)
    provider: str  # the recipient's provider ("other" when not recognised)
    recipient: str = ""  # known from a trace header (a return path only binds it)
    sender: str = ""  # the original envelope sender (trace header only)


@dataclass(frozen=True)
class ReturnPath:
    """A verified return-path token: the recipient is bound, not written (``binds``)."""

    sent: Sent
    _rcpt_hash: bytes
    _key: bytes

    def binds(self, recipient: str) -> bool:
        """Whether ``recipient`` is the address this return path was made for."""
        return hmac.compare_digest(_rcpt_hash(self._key, recipient), self._rcpt_hash)


class Tokens:
    """Makes and checks return paths and trace headers with keys from one secret."""

    def __init__(self, secret: bytes, domain: str) -> None:
        self.domain = domain.lower().rstrip(".")
        self._mac_key = _derive(secret, b"return-path")
        self._aead = ChaCha20Poly1305(_derive(secret, b"trace-header"))
        self._nonce_key = _derive(secret, b"trace-nonce")

    # -- return path --------------------------------------------------------------------

    def return_path(self, sent: Sent, recipient: str) -> str:
        """``b<queue id>.<code>@<bounce domain>`` for this recipient from this IP."""
        if not _QUEUE_ID.match(sent.queue_id) or not 0 <= sent.index < 2**16:
            raise ValueError(f"cannot make a return path for {sent.queue_id}/{sent.index}")
        rh = _rcpt_hash(self._mac_key, recipient)
        code = sent.index.to_bytes(2, "big") + rh + self._mac(sent, rh)
        local = (
            PREFIX
            + sent.queue_id.lower()
            + "."
            + base64.b32encode(code).decode().rstrip("=").lower()
        )
        return f"{local}@{self.domain}"

    def is_ours(self, address: str) -> bool:
        """An address at the bounce domain (any local part)."""
        return address.rpartition("@")[2].lower().rstrip(".") == self.domain

    def looks_like_token(self, address: str) -> bool:
        return bool(_LOCAL.match(address.rpartition("@")[0]))

    def check(
        self, address: str, ips: Iterable[str], providers: Iterable[str]
    ) -> ReturnPath | None:
        """The return path ``address`` names, if we made it: its MAC verifies for one of
        the ``ips`` and ``providers`` (tried in turn: they are not written). None for an
        address we did not make (forged, altered, or an older secret)."""
        m = _LOCAL.match(address.rpartition("@")[0])
        if not m:
            return None
        queue_id = m.group(1).upper()
        code = base64.b32decode(m.group(2).upper() + "======")
        if base64.b32encode(code).decode().rstrip("=") != m.group(2).upper():
            return None  # spare bits set: not the form we write (one token, one spelling)
        index = int.from_bytes(code[:2], "big")
        rh = code[2 : 2 + _RCPT_HASH_BYTES]
        mac = code[2 + _RCPT_HASH_BYTES :]
        candidates = list(providers)
        for ip in ips:
            for provider in candidates:
                sent = Sent(queue_id, index, ip, provider)
                if hmac.compare_digest(self._mac(sent, rh), mac):
                    return ReturnPath(sent, rh, self._mac_key)
        return None

    def _mac(self, sent: Sent, rcpt_hash: bytes) -> bytes:
        text = f"{sent.queue_id.upper()}|{sent.index}|{sent.ip}|{sent.provider}|".encode()
        return hmac.new(self._mac_key, text + rcpt_hash, hashlib.sha256).digest()[:_MAC_BYTES]

    # -- trace header -------------------------------------------------------------------

    def trace(self, sent: Sent) -> bytes:
        """The ``Warmrelay-Trace:`` header line (with CRLF) for one transaction."""
        plain = json.dumps(
            {
                "q": sent.queue_id,
                "i": sent.index,
                "ip": sent.ip,
                "p": sent.provider,
                "r": sent.recipient,
                "s": sent.sender,
            },
            separators=(",", ":"),
        ).encode()
        # the nonce is derived from what is sealed (as SIV does): a retry from the same IP
        # sends the same bytes, and two different plaintexts never share a nonce
        nonce = hmac.new(self._nonce_key, plain, hashlib.sha256).digest()[:12]
        sealed = self._aead.encrypt(nonce, plain, _TRACE_AD)
        value = base64.urlsafe_b64encode(nonce + sealed).decode().rstrip("=")
        return f"{TRACE_HEADER}: {_TRACE_VERSION}.{value}\r\n".encode("ascii")

    def open_trace(self, value: str) -> Sent | None:
        """What a trace header's value says, if we sealed it (else None)."""
        version, _, body = "".join(value.split()).partition(".")
        if version != _TRACE_VERSION or not body:
            return None
        try:
            raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
            plain = self._aead.decrypt(raw[:12], raw[12:], _TRACE_AD)
            data = json.loads(plain)
            return Sent(
                str(data["q"]),
                int(data["i"]),
                str(data["ip"]),
                str(data["p"]),
                str(data["r"]),
                str(data["s"]),
            )
        except (ValueError, InvalidTag, KeyError, TypeError):
            return None


def _derive(secret: bytes, label: bytes) -> bytes:
    return hmac.new(secret, b"warmrelay/" + label, hashlib.sha256).digest()


def _rcpt_hash(key: bytes, recipient: str) -> bytes:
    address = recipient.strip().strip("<>").lower()
    return hmac.new(key, b"rcpt|" + address.encode(), hashlib.sha256).digest()[:_RCPT_HASH_BYTES]


# -- Feedback-ID ----------------------------------------------------------------------------

FEEDBACK_ID = "Feedback-ID"
_HEADER_END = re.compile(rb"\r\n\r\n")


def feedback_label(ip: str) -> str:
    """The identifier that names ``ip`` in Feedback-ID (what Postmaster reports by)."""
    return "ip-" + ip.replace(".", "-").replace(":", "-")


def feedback_id(ip: str, sender_id: str) -> bytes:
    """Gmail's ``Feedback-ID: a:b:c:SenderId`` header line: the first field names the
    source IP, so Postmaster Tools' spam rate per identifier is a spam rate per IP."""
    return f"{FEEDBACK_ID}: {feedback_label(ip)}:warmrelay:mail:{sender_id}\r\n".encode("ascii")


def without_header(content: bytes, name: str) -> bytes:
    """``content`` without the header fields called ``name`` (with their folded lines):
    ours replaces the client's (one Feedback-ID, the one that names the IP)."""
    end = _HEADER_END.search(content)
    head, rest = (content[: end.start() + 2], content[end.start() + 2 :]) if end else (content, b"")
    wanted = name.lower().encode() + b":"
    lines = head.split(b"\r\n")
    out: list[bytes] = []
    skipping = False
    for line in lines:
        if line[:1] in (b" ", b"\t") and skipping:
            continue
        skipping = line.lower().startswith(wanted) or (
            line.lower().startswith(wanted[:-1])
            and line[len(wanted) - 1 :].lstrip().startswith(b":")
        )
        if not skipping:
            out.append(line)
    return b"\r\n".join(out) + rest
