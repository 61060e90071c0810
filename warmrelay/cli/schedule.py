"""`warmrelay schedule`: the warmup plan of each warming IP from today, from the stored state."""

from __future__ import annotations

import argparse
import sys
from datetime import UTC, date, datetime, timedelta
from typing import TYPE_CHECKING, Any

from warmrelay.cli.check import notes, stored_state, timing_warnings
from warmrelay.cli.common import load_or_exit
from warmrelay.config import Config, IPConfig
from warmrelay.warmup.plan import WarmupState, local_date, plan

if TYPE_CHECKING:
    from warmrelay.warmup.router import Router


def _plan_columns(ip: IPConfig) -> list[str]:
    """Extra columns of the schedule table: per-hour and per-provider caps where configured."""
    assert ip.warmup is not None
    cols = []
    if ip.warmup.schedule.hourly is not None or ip.warmup.sending_hours is not None:
        cols.append("per hour")
    cols += list(ip.warmup.providers)
    return cols


def _plan_cells(ip: IPConfig, day: int, cap: int) -> list[str]:
    assert ip.warmup is not None
    cells = []
    hourly, hours = ip.warmup.schedule.hourly, ip.warmup.sending_hours
    if hourly is not None or hours is not None:
        per_hour = [hourly[day - 1]] if hourly is not None else []
        if hours is not None:
            per_hour.append(cap // hours.slots)
        cells.append(f"{min(per_hour):,}")
    for pcap in ip.warmup.plan().providers.values():
        cells.append(f"{pcap.daily_cap(day, cap):,}")
    return cells


def _plan_start(ip: IPConfig, router: Router, now: datetime, today: date) -> date:
    """The day 1 that makes the plan's rows match the stored state: today's warmup day
    (pauses, results progress) counted back, a configured start still ahead, or today
    for a first use still to come."""
    st = router.status(ip, now)
    start = router.start(ip)
    if st.state is WarmupState.NOT_STARTED and start is not None:
        return start
    if st.day >= 1:
        return today - timedelta(days=st.day - 1)
    return start or today


def cmd_schedule(args: argparse.Namespace) -> int:
    config = load_or_exit(args.config)
    now = datetime.now(UTC)
    today = local_date(now, config.zone)
    warming = [ip for ip in config.ips if ip.warmup is not None]
    if not warming:
        print("no IP has a warmup block: every IP is warm")
        return 0
    router, stored = stored_state(config)
    for n, ip in enumerate(warming):
        assert ip.warmup is not None
        sched = ip.warmup.schedule
        address = str(ip.address)
        control = router.control(address)
        start = router.start(ip)
        if ip.warmup.start is not None:
            begins = f"start {ip.warmup.start}"
        elif start is not None:
            begins = f"started {start} (first use)"
        else:
            begins = "starts on first use"
        if n:
            print()
        print(f"{ip.address} ({ip.helo}): schedule {sched.name}, {begins}, {sched.days} days")
        for note in notes(ip, router, now, start=False):
            print(f"  {note}")
        if control.completed:
            continue  # warm by the operator's word: no plan
        st = router.status(ip, now)
        if st.state is WarmupState.WARM:
            print(f"  day {st.day} of {sched.days}: warm now, joins the pool")
        elif start is None:
            print("  the rows assume it is first used today")
        elif st.state is WarmupState.PAUSED:
            print("  the rows assume it resumes today")
        if ip.warmup.progress == "results":
            print("  progress: results: the rows are the fastest case (a day repeats until used)")
        if ip.warmup.progress == "reputation" and router.pairs is not None:
            print("  progress: reputation: each provider has its own day (the rows: the IP's)")
            for line in _pair_lines(router.pairs.status(ip)):
                print(f"    {line}")
        first = _plan_start(ip, router, now, today)
        days = args.days
        if days is None:  # through the day the IP turns warm, at most 60 rows
            last = (first - today).days + sched.days
            days = max(1, min(60, last + 1))
        if ip.warmup.sending_hours is not None:
            hours = ip.warmup.sending_hours
            print(
                f"  sends {hours} {config.timezone} only; each day's cap is released evenly "
                f"over {hours.slots} hours (unused budget carries into later hours that day)"
            )
        extra = _plan_columns(ip)
        print(f"  {'':2}{'date':<12}{'day':>5}  {'cap':>12}" + "".join(f"{c:>12}" for c in extra))
        for row in plan(sched, first, today, days):
            st = row.status
            cells: list[str] = []
            if st.state is WarmupState.NOT_STARTED:
                day, cap = "-", "0 (not started)"
            elif st.state is WarmupState.WARM:
                day, cap = str(st.day), "warm (pool)"
            else:
                assert st.cap is not None
                day, cap = str(st.day), f"{st.cap:,}"
                cells = _plan_cells(ip, st.day, st.cap)
            mark = "> " if row.today else "  "
            note = "  today" if row.today else ""
            print(
                f"  {mark}{row.date.isoformat():<12}{day:>5}  {cap:>12}"
                + "".join(f"{c:>12}" for c in cells)
                + note
            )
    for warning in timing_warnings(config, router, now):
        print(f"warning: {warning}", file=sys.stderr)
    for line in _feedback_lines(config, today):
        print(line)
    print()
    print(stored)
    return 0


def _feedback_lines(config: Config, today: date) -> list[str]:
    """What came back per IP and provider (with bounces:): hard bounces and complaints
    over what was handed over, the last 7 days and today, read from the state store."""
    import asyncio

    from warmrelay.errors import CounterError
    from warmrelay.reputation.signals import PairCounts
    from warmrelay.warmup.counters import SqliteCounters, open_counters
    from warmrelay.warmup.providers import BUILTIN

    if config.bounces is None or config.state.counters == "memory":
        return []
    counters = open_counters(config.state.counters, config.state.dir)
    if isinstance(counters, SqliteCounters) and not counters.path.exists():
        return []
    providers = [*config.providers, *(r.name for r in BUILTIN), "other"]

    async def read() -> dict[str, dict[str, dict[str, Any]]]:
        try:
            ips = [str(ip.address) for ip in config.ips]
            return await PairCounts(counters, config.zone).rates(ips, providers, today)
        finally:
            await counters.close()

    try:
        rates = asyncio.run(read())
    except (CounterError, OSError) as exc:
        return ["", f"what came back: cannot read the state store ({exc})"]
    lines = ["", f"what came back to {config.bounces.domain} (hard bounces, complaints):"]
    if not rates:
        lines.append("  nothing handed over or reported in the last 7 days")
    for ip, by_provider in rates.items():
        for provider, spans in by_provider.items():
            week, day = spans["week"], spans["today"]
            lines.append(
                f"  {ip:<15} {provider:<11} 7 days: handed {week['handed']:,}, "
                f"hard {week['hard']} ({_pct(week['hard_rate'])}), complaints "
                f"{week['complaints']} ({_pct(week['complaint_rate'])}); today: handed "
                f"{day.get('handed', 0):,}, hard {day.get('hard', 0)}, "
                f"complaints {day.get('complaints', 0)}"
            )
    return lines


def _pair_lines(pairs: dict[str, dict[str, Any]]) -> list[str]:
    """Per provider: its day and cap, and the controller's last decision with its reason
    and the signals it used."""
    lines = []
    for provider, pair in pairs.items():
        cap = f"cap {pair['cap']:,}" if pair["cap"] is not None else "warm"
        head = f"{provider:<11} day {pair['day']:>3}  {cap}"
        if pair["paused_since"]:
            head += f"  PAUSED since {pair['paused_since']}"
        last = pair.get("last")
        if last:
            used = ", ".join(f"{k} {_value(v)}" for k, v in sorted(last["values"].items()))
            head += f"  last: {last['on']} {last['action']} ({last['reason']})"
            head += f" [{used}]" if used else ""
        lines.append(head)
    return lines


def _value(v: object) -> str:
    return _pct(v) if isinstance(v, float) else str(v)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.2f} %"
