"""Throttling replies: a receiver saying "this IP is sending too much, slow down".

Recognised in the reply line "CODE TEXT" (aiosmtplib joins multi-line replies
with newlines, so the enhanced status code follows the code after a space).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

BUILTIN: tuple[tuple[str, str], ...] = (
    ("gmail", r"^421[ -]4\.7\.28\b"),  # "unusual rate of unsolicited mail"
    ("microsoft", r"^4\d\d[ -]4\.7\.65[01]\b"),  # "temporarily rate limited due to IP reputation"
    ("yahoo", r"^421[ -]4\.7\.0 \[TS(S0[45])\]"),  # [TSS04] / [TSS05]: deferred, too much
    ("apple", r"^421[ -].*\[HCM1\]"),  # iCloud: "Messages from x.x.x.x temporarily deferred"
)


class ThrottleRules:
    def __init__(self, extra: Iterable[str] = ()) -> None:
        self._patterns = [re.compile(p, re.IGNORECASE) for _, p in BUILTIN]
        self._patterns += [re.compile(p, re.IGNORECASE) for p in extra]

    def matches(self, code: int, text: str) -> bool:
        if not 400 <= code < 500:
            return False
        line = f"{code} {text}"
        return any(p.search(line) for p in self._patterns)
