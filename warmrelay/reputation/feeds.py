"""What the reputation feeds (Microsoft SNDS, Gmail Postmaster Tools) hand the warmup
controller: one value per (IP, provider, day, signal), or an error saying the feed could not
be read. A signal with no value is unknown, never healthy."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date

from warmrelay.errors import WarmrelayError


class FeedError(WarmrelayError):
    """A feed could not be read: its signals are unknown (never healthy)."""


@dataclass(frozen=True)
class FeedValue:
    """One signal of one source IP at one provider on one day."""

    ip: str  # the source IP the value is about
    provider: str  # "microsoft" for SNDS, "gmail" for Postmaster
    day: date  # the local day the value describes
    # snds_filter | snds_complaint_rate | snds_trap_hits | spam_rate | delivery_error_rate
    # | delivery_error_reasons
    signal: str
    # rates as fractions (0.003 = 0.3 %), filter as "GREEN"/"YELLOW"/"RED", reasons as a
    # comma-separated string
    value: float | str
