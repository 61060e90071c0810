"""Receivers' replies: what each one means for a recipient, decided in one place.

Every reply for a recipient — the greeting, EHLO, MAIL, its RCPT, DATA, the
reply after the final dot, a hang-up, or our own verdict (no next hop, queue
lifetime) — becomes a ``Reply``, and ``ReplyRules.classify`` turns it into an
``Outcome``:

- delivered: 2xx after the final dot for a recipient accepted at RCPT;
- deferred: any other 4xx, a lost connection, a timeout;
- bounced: a 5xx about the recipient or the message;
- throttled: a 4xx saying *this IP* sends too much (Gmail 4.7.28, Microsoft
  4.7.650, Yahoo TSS04…): not the recipient's fault, retry from elsewhere;
- blocked: a 5xx blaming the sending IP's reputation (a DNS blocklist, Microsoft
  5.7.606-649, Yahoo BL21…): never a bounce, retry from elsewhere.

Replies are matched as "CODE TEXT" (aiosmtplib joins multi-line replies with
newlines, so the enhanced status follows the code after a space).
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable
from dataclasses import dataclass


class Outcome(enum.Enum):
    DELIVERED = "delivered"
    DEFERRED = "deferred"
    BOUNCED = "bounced"
    THROTTLED = "throttled"
    BLOCKED = "blocked"


class Stage(enum.Enum):
    """Where in the transaction the reply came (for logs, and the counting rule)."""

    LOCAL = "local"  # our own verdict: no next hop, lifetime, shutdown, bind failure
    CONNECT = "connect"  # greeting, EHLO, STARTTLS, AUTH, or no answer at all
    MAIL = "mail"
    RCPT = "rcpt"
    DATA = "data"  # the DATA command or the reply after the final dot


@dataclass(frozen=True)
class Reply:
    """What decided one recipient's attempt. ``accepted``: the receiver took the recipient at
    RCPT (the count against a warming IP is kept only if the attempt then ends in a handover
    or a final refusal of the message)."""

    code: int
    text: str
    hop: str  # "host[address]:port", or "" if no receiver said it
    stage: Stage = Stage.LOCAL
    accepted: bool = False
    tls: bool = False  # the transaction ran over TLS (the events' tls field)
    # the connection was lost after the message went out, before its reply: the receiver
    # may have it, so it counts against a warming IP's cap (and is retried, never at once)
    maybe_delivered: bool = False

    @property
    def status(self) -> str:
        """The enhanced status code from the reply text, or one derived from the code."""
        first = self.text.split(" ", 1)[0]
        parts = first.split(".")
        if len(parts) == 3 and all(p.isdigit() for p in parts) and first[0] in "245":
            return first
        return f"{str(self.code)[:1] if self.code else '4'}.0.0"

    @property
    def line(self) -> str:
        """The reply as one line, for logs and suspension reasons."""
        return f"{self.code} {self.text}".replace("\r", "").replace("\n", " ")


# (provider, pattern) — "this IP sends too much right now": 4xx only.
THROTTLE: tuple[tuple[str, str], ...] = (
    ("gmail", r"^421[ -]4\.7\.28\b"),  # "unusual rate of unsolicited mail"
    ("microsoft", r"^4\d\d[ -]4\.7\.65[01]\b"),  # "temporarily rate limited due to IP reputation"
    ("yahoo", r"^421[ -]4\.7\.0 \[TS(S0[45])\]"),  # [TSS04] / [TSS05]: deferred, too much
    ("apple", r"^421[ -].*\[HCM1\]"),  # iCloud: "Messages from x.x.x.x temporarily deferred"
)

# (provider, pattern) — "this IP is not welcome": 5xx only.
BLOCK: tuple[tuple[str, str], ...] = (
    ("gmail", r"^5\d\d[ -]5\.7\.1 .*likely unsolicited mail"),  # "[IP] ... likely unsolicited"
    ("gmail", r"^5\d\d[ -]5\.7\.25\b"),  # "the IP address sending this message has no PTR"
    ("microsoft", r"^5\d\d[ -]5\.7\.(6(0[6-9]|[1-4]\d)|511)\b"),  # banned sending IP / S3150
    ("yahoo", r"^5\d\d[ -]5\.7\.\d+ \[BL2[13]\]"),  # [BL21] / [BL23]: IP on a blocklist
    (
        "any",
        r"\b(blocked|listed|rejected) (using|at|in|on|by) \S*(spamhaus|spamcop|barracuda|"
        r"sorbs|uceprotect|rbl|dnsbl|bl\.)",
    ),
    ("any", r"\bzen\.spamhaus\.org\b|\bbl\.spamcop\.net\b|\bb\.barracudacentral\.org\b"),
    (
        "any",
        r"\b(client|sending|your) (ip|host)( address)? .{0,40}\b(blocked|blacklisted|"
        r"blocklisted|listed)\b",
    ),
)


class ReplyRules:
    """Throttle and block patterns (built in, plus the configuration's), and the one
    function that classifies a reply."""

    def __init__(self, throttle: Iterable[str] = (), block: Iterable[str] = ()) -> None:
        self._throttle = [re.compile(p, re.IGNORECASE) for _, p in THROTTLE]
        self._throttle += [re.compile(p, re.IGNORECASE) for p in throttle]
        self._block = [re.compile(p, re.IGNORECASE) for _, p in BLOCK]
        self._block += [re.compile(p, re.IGNORECASE) for p in block]

    def classify(self, reply: Reply) -> Outcome:
        code, line = reply.code, f"{reply.code} {reply.text}"
        if 200 <= code < 300:
            # 2xx at MAIL or RCPT is not a handover: only the final dot (or our own
            # "already done" verdicts) delivers
            return (
                Outcome.DELIVERED
                if reply.stage in (Stage.DATA, Stage.LOCAL)
                else (Outcome.DEFERRED)
            )
        if 500 <= code < 600:
            if any(p.search(line) for p in self._block):
                return Outcome.BLOCKED
            return Outcome.BOUNCED
        if 400 <= code < 500 and any(p.search(line) for p in self._throttle):
            return Outcome.THROTTLED
        return Outcome.DEFERRED
