"""The decision table of the warmup controller, one test per row: what each signal does
to a pair's day (advance, hold, back N, pause), and what ends a pause."""

from __future__ import annotations

from datetime import date

import pytest

from warmrelay.config import ThresholdsConfig
from warmrelay.config.reputation import Ladder, LadderOverrides
from warmrelay.reputation.controller import PairState, judge, pause_now, resumed
from warmrelay.reputation.signals import Signals

DAY = date(2026, 12, 5)
T = ThresholdsConfig()
AT_DAY_10 = PairState(day=10)


def sig(
    feeds: dict[str, float | str] | None = None,
    unknown: dict[str, str] | None = None,
    **counts: int,
) -> Signals:
    base = {"tried": 1000, "handed": 1000}
    return Signals({**base, **counts}, feeds or {}, unknown or {})


def decide(
    signals: Signals,
    provider: str = "gmail",
    state: PairState = AT_DAY_10,
    feeds: tuple[str, ...] = (),
    t: ThresholdsConfig = T,
) -> PairState:
    return judge(state, DAY, signals, provider, t, feeds)


def test_healthy_advances() -> None:
    after = decide(sig())
    assert (after.day, after.last and after.last.label) == (11, "advance")
    assert after.judged_to == date(2026, 12, 6)


def test_spam_rate_from_0_1_percent_holds() -> None:
    after = decide(sig({"spam_rate": 0.0015}))
    assert after.day == 10 and after.last is not None
    assert (after.last.label, after.last.reason) == ("hold", "spam rate 0.15 % \u2265 0.1 %")


def test_spam_rate_from_0_2_percent_steps_back_two_days() -> None:
    after = decide(sig({"spam_rate": 0.0024}))
    assert after.day == 8 and after.last is not None
    assert (after.last.label, after.last.reason) == ("back 2", "spam rate 0.24 % \u2265 0.2 %")


def test_spam_rate_from_0_3_percent_pauses_and_steps_back() -> None:
    after = decide(sig({"spam_rate": 0.003}))
    assert after.paused and after.paused_since == DAY and after.day == 8
    assert after.last is not None and after.last.label == "pause"


def test_complaint_rate_over_the_ceiling_pauses() -> None:
    after = decide(sig(complaint=4), provider="yahoo")  # 0.4 % of 1000 handed over
    assert after.paused and after.last is not None
    assert after.last.reason == "complaint rate 0.4 % \u2265 0.3 %"


def test_too_few_recipients_say_nothing() -> None:
    few = Signals({"tried": 40, "handed": 40, "complaint": 2, "rcpt_hard": 5}, {}, {})
    after = decide(few)
    assert after.day == 11 and after.last is not None and after.last.label == "advance"


@pytest.mark.parametrize(("hard", "label"), [(30, "hold"), (60, "back 2")])
def test_hard_bounce_rate_holds_from_2_and_steps_back_from_5_percent(hard: int, label: str) -> None:
    after = decide(sig(rcpt_hard=hard // 2, hard=hard - hard // 2))
    assert after.last is not None and after.last.label == label


def test_throttle_rate_from_2_percent_holds() -> None:
    after = decide(sig(throttled=25))
    assert after.last is not None and after.last.label == "hold" and after.day == 10


def test_deferral_rate_from_30_percent_steps_back() -> None:
    after = decide(sig(deferred=350))
    assert after.last is not None and after.last.label == "back 2"


def test_delivery_error_rate_holds_then_steps_back() -> None:
    assert decide(sig({"delivery_error_rate": 0.03})).last.label == "hold"  # type: ignore[union-attr]
    assert decide(sig({"delivery_error_rate": 0.2})).last.label == "back 2"  # type: ignore[union-attr]


def test_snds_yellow_holds_and_red_pauses() -> None:
    yellow = decide(sig({"snds_filter": "YELLOW"}), provider="microsoft")
    assert yellow.last is not None and (yellow.last.label, yellow.last.reason) == (
        "hold",
        "SNDS YELLOW",
    )
    red = decide(sig({"snds_filter": "RED"}), provider="microsoft")
    assert red.paused and red.last is not None and red.last.reason == "SNDS RED"


def test_a_block_holds() -> None:
    after = decide(sig(blocked=3))
    assert after.last is not None and after.last.reason == "blocked 3 time(s)"


def test_an_unknown_feed_is_never_healthy_after_unknown_days() -> None:
    unknown = sig(unknown={"snds": "HTTP 503"})
    first = decide(unknown, "microsoft", feeds=("snds",))
    assert first.day == 11 and first.unknown == 1  # one day's allowance
    second = judge(first, date(2026, 12, 6), unknown, "microsoft", T, ("snds",))
    assert second.day == 11 and second.last is not None and second.last.label == "hold"
    assert second.last.reason == "snds unknown for 2 days (snds HTTP 503)"
    known = judge(
        second, date(2026, 12, 7), sig({"snds_filter": "GREEN"}), "microsoft", T, ("snds",)
    )
    assert known.unknown == 0 and known.day == 12


def test_a_feed_for_another_provider_does_not_hold_this_one() -> None:
    after = decide(sig(unknown={"snds": "down"}), "gmail", feeds=())
    after = judge(after, date(2026, 12, 6), sig(unknown={"snds": "down"}), "gmail", T, ())
    assert after.day == 12


def test_a_pause_ends_after_recover_days_healthy_days() -> None:
    paused = decide(sig({"spam_rate": 0.004}))
    state, day = paused, DAY
    for n in range(1, 4):
        day = date(2026, 12, 5 + n)
        state = judge(state, day, sig(), "gmail", T)
        if n < 3:
            assert state.paused and state.healthy == n and state.last is not None
            assert state.last.label == "pause"
    assert not state.paused and state.day == paused.day  # resumes where it stepped back to
    assert state.last is not None and state.last.reason == "resumed: healthy for 3 days"


def test_an_unhealthy_day_while_paused_starts_the_count_again() -> None:
    paused = decide(sig({"spam_rate": 0.004}))
    one = judge(paused, date(2026, 12, 6), sig(), "gmail", T)
    bad = judge(one, date(2026, 12, 7), sig({"spam_rate": 0.0012}), "gmail", T)
    assert bad.paused and bad.healthy == 0


def test_a_provider_may_have_its_own_ladder() -> None:
    t = ThresholdsConfig(providers={"yahoo": LadderOverrides(complaint_rate=Ladder(pause=0.002))})
    assert decide(sig(complaint=2), "yahoo", t=t).paused
    assert not decide(sig(complaint=2), "gmail", t=t).paused  # 0.2 %: back for the others


def test_the_most_severe_verdict_wins() -> None:
    after = decide(sig({"spam_rate": 0.0021, "snds_filter": "YELLOW"}), "gmail")
    assert after.last is not None and after.last.label == "back 2"


def test_critical_signals_pause_at_once_and_only_once() -> None:
    now = pause_now(AT_DAY_10, DAY, "SNDS RED", {"snds_filter": "RED"}, T)
    assert now.paused and now.day == 8
    assert pause_now(now, DAY, "SNDS RED", {}, T) is now


def test_back_never_goes_below_day_one() -> None:
    after = decide(sig({"spam_rate": 0.0025}), state=PairState(day=1))
    assert after.day == 1 and after.last is not None and after.last.label == "hold"
    assert after.last.reason == "spam rate 0.25 % \u2265 0.2 % (day 1: nothing to step back to)"
    after = decide(sig({"spam_rate": 0.0025}), state=PairState(day=2))
    assert after.day == 1 and after.last is not None and after.last.label == "back 1"


def test_an_operator_resumes_a_pause() -> None:
    paused = decide(sig({"spam_rate": 0.004}))
    back = resumed(paused, DAY, "alice")
    assert not back.paused and back.last is not None and back.last.reason == "resumed by alice"


def test_state_survives_the_store() -> None:
    after = decide(sig({"spam_rate": 0.0024}))
    assert PairState.loads(after.dumps()) == after
