"""mail_date: the cached per-second date says what email.utils would say for any moment."""

from __future__ import annotations

from datetime import UTC, datetime
from email.utils import format_datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from warmrelay.mail.dates import mail_date


@given(st.floats(min_value=0, max_value=4e9, allow_nan=False), st.integers(0, 3))
def test_mail_date_is_format_datetime_of_the_moment(now: float, later: int) -> None:
    for moment in (now, now + later, now + later + 0.999):  # the cache across seconds
        assert mail_date(moment) == format_datetime(datetime.fromtimestamp(moment, UTC))


@pytest.mark.parametrize("now", [1.9999995231628418, 1.9999994, 1733500000.9999996, 0.0])
def test_mail_date_rounds_to_the_microsecond_first_as_datetime_does(now: float) -> None:
    """Hypothesis found 1.9999995...: datetime makes 00:00:02 of it, a floor made :01."""
    assert mail_date(now) == format_datetime(datetime.fromtimestamp(now, UTC))
