"""mail_date: the cached per-second date says what email.utils would say for any moment."""

from __future__ import annotations

from datetime import UTC, datetime
from email.utils import format_datetime

from hypothesis import given
from hypothesis import strategies as st

from warmrelay.mail.dates import mail_date


@given(st.floats(min_value=0, max_value=4e9, allow_nan=False), st.integers(0, 3))
def test_mail_date_is_format_datetime_of_the_moment(now: float, later: int) -> None:
    for moment in (now, now + later, now + later + 0.999):  # the cache across seconds
        assert mail_date(moment) == format_datetime(datetime.fromtimestamp(moment, UTC))
