"""RFC 5322 dates for the headers we add (Received:, a missing Date:)."""

from __future__ import annotations

import functools
import math
from datetime import UTC, datetime
from email.utils import format_datetime


def mail_date(now: float) -> str:
    """``now`` (seconds since the epoch) as an RFC 5322 date in UTC, to the second.

    Two headers per message need it and a second holds hundreds of messages: formatting
    (a datetime, then strftime-like work in Python) once per second, not twice per message."""
    frac, whole = math.modf(now)  # the second datetime.fromtimestamp makes of it: it rounds
    micro = round(frac * 1e6)  # to the microsecond first (half to even), so 1.9999996 is 2
    return _of_second(int(whole) + (micro >= 1_000_000) - (micro < 0))


@functools.lru_cache(maxsize=4)
def _of_second(second: int) -> str:
    return format_datetime(datetime.fromtimestamp(second, UTC))
