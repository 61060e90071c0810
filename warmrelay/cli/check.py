"""`warmrelay check-config`: the file's errors, what serve would refuse here, warnings, and a
summary of each IP as the state store has it (read only)."""

from __future__ import annotations

import argparse
import sys
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from warmrelay.cli.common import fmt_hostport, print_problems
from warmrelay.config import (
    Config,
    IPConfig,
    config_error_lines,
    config_warnings,
    host_warnings,
    load_config,
    redact_url,
    start_problems,
)
from warmrelay.errors import ConfigError, ConfigProblem
from warmrelay.warmup.plan import WarmupState, local_date

if TYPE_CHECKING:
    from warmrelay.warmup.router import Router


def stored_state(config: Config) -> tuple[Router, str]:
    """A router holding what the state store says of each IP (pause, completion, first use,
    results day, suspensions), read without writing, and where that came from. A store
    that is absent or cannot be read leaves the configuration's view (and says so)."""
    import asyncio

    from warmrelay.errors import CounterError
    from warmrelay.warmup.counters import MemoryCounters, SqliteCounters, open_counters
    from warmrelay.warmup.router import Router

    backend = config.state.counters
    if backend == "memory":
        return Router(config, MemoryCounters()), "state: memory (nothing is kept)"
    counters = open_counters(backend, config.state.dir)
    where = str(counters.path) if isinstance(counters, SqliteCounters) else redact_url(backend)
    router = Router(config, counters)

    async def read() -> bool:
        try:
            if isinstance(counters, SqliteCounters) and not counters.path.exists():
                return False  # never ran here: do not create the file
            await router.load_control()
            return True
        finally:
            await counters.close()

    try:
        found = asyncio.run(read())
    except (CounterError, OSError) as exc:
        note = f"state: cannot read {where} ({exc}); stored state (pauses...) not shown"
        return Router(config, MemoryCounters()), note
    if not found:
        return Router(config, MemoryCounters()), f"state: nothing stored yet ({where})"
    return router, f"state: read from {where}"


def role(ip: IPConfig, router: Router, now: datetime) -> tuple[str, str, str]:
    """(role, day, cap) columns for an IP today, stored state included."""
    if ip.warmup is None:
        return "warm (pool)", "-", "-"
    st = router.status(ip, now)
    control = router.control(str(ip.address))
    start = router.start(ip)
    days = ip.warmup.schedule.days
    if st.state is WarmupState.PAUSED:
        return (
            f"paused since {control.paused_since}",
            f"{st.day}/{days}" if st.day > 0 else "-",
            "0",
        )
    if st.state is WarmupState.NOT_STARTED:
        return f"warming from {start}", "-", "0"
    if st.state is WarmupState.WARM:
        if control.completed:
            on = control.completion.on
            return f"warm (completed{f' on {on}' if on else ''})", "-", "-"
        return "warm (warmup done)", f"{st.day}/{days}", "-"
    assert st.cap is not None
    role = "warming" if start is not None else "warming (starts on first use)"
    return role, f"{st.day}/{days}", f"{st.cap:,}"


def notes(ip: IPConfig, router: Router, now: datetime, *, start: bool = True) -> list[str]:
    """What the state store adds about a warming IP, one line each (``start``: with the
    line on a first-use start)."""
    if ip.warmup is None:
        return []
    address = str(ip.address)
    c = router.control(address)
    notes = []
    if start and ip.warmup.start is None:
        if c.started is not None:
            notes.append(f"day 1 was {c.started.on}, its first use (no warmup.start)")
        else:
            notes.append("starts on first use: day 1 is the day the relay first sends from it")
    if c.paused_since is not None:
        notes.append(
            f"paused since {c.paused_since}: sends nothing, does not advance "
            f"(warmrelay ip resume {address})"
        )
    if c.completed:
        on = f" on {c.completion.on}" if c.completion.on else ""
        notes.append(
            f"declared complete{on}: warm, in the pool (warmrelay ip uncomplete {address})"
        )
    if ip.warmup.progress == "results" and c.progress is not None:
        notes.append(f"progress: results, day {c.progress.day} as judged on {c.progress.on}")
    for provider, s in sorted(c.suspended.items()):
        if router.suspension(address, provider, now) is not None:
            what = "blocked by" if s.blocked else "suspended for"
            notes.append(
                f"{what} {provider or 'an unknown provider'} until "
                f"{s.until.astimezone(UTC):%Y-%m-%d %H:%M} UTC ({s.reason})"
            )
    return notes


def timing_warnings(config: Config, router: Router, now: datetime) -> list[ConfigProblem]:
    """A warmup that is over (the IP is warm now) or has not begun (start ahead)."""
    warnings = []
    today = local_date(now, config.zone)
    for i, ip in enumerate(config.ips):
        if ip.warmup is None or router.control(str(ip.address)).completed:
            continue
        st = router.status(ip, now)
        days = ip.warmup.schedule.days
        if st.state is WarmupState.WARM:
            warnings.append(
                ConfigProblem(
                    f"ips[{i}].warmup",
                    f"day {st.day} of {days}: {ip.address} is warm now and joins the pool "
                    "(its warmup is over; the block can go)",
                )
            )
        elif st.state is WarmupState.NOT_STARTED and ip.warmup.start is not None:
            ahead = (ip.warmup.start - today).days
            warnings.append(
                ConfigProblem(
                    f"ips[{i}].warmup.start",
                    f"{ip.warmup.start} is {ahead} day(s) ahead: {ip.address} sends nothing "
                    "until then (leave start out to begin on the day it is first used)",
                )
            )
    return warnings


def summary(config: Config, now: datetime, router: Router | None = None) -> str:
    """What check-config prints: listeners, state, and each IP's role today (with the
    stored state when ``router`` holds it)."""
    if router is None:
        from warmrelay.warmup.counters import MemoryCounters
        from warmrelay.warmup.router import Router

        router = Router(config, MemoryCounters())
    lines = [
        "listen "
        + ", ".join(
            fmt_hostport(li.address) + f" ({config.smtp.listener_tls(li)})"
            for li in config.smtp.listen
        )
        + " (relay allowed from "
        + ", ".join(str(n) for n in config.smtp.allow_networks)
        + ")",
        "admin "
        + (fmt_hostport(config.admin.listen) if config.admin.listen else "off")
        + f"; state {config.state.dir} (counters: {redact_url(config.state.counters)})",
        f"timezone {config.timezone}, today {local_date(now, config.zone)}, "
        f"overflow: {config.overflow}, log: {config.log.format}",
        "",
    ]
    rows = [("IP", "HELO", "ROLE", "DAY", "CAP TODAY")]
    rows += [(str(ip.address), ip.helo, *role(ip, router, now)) for ip in config.ips]
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    for ip in config.ips:
        lines += [f"  {ip.address}: {note}" for note in notes(ip, router, now)]
    return "\n".join(lines)


def cmd_check_config(args: argparse.Namespace) -> int:
    """Exit 1 on errors: those of the file, and whatever serve would refuse to start with
    here (start_problems: the systemd unit runs this before serve, so it must refuse what
    serve refuses). Warnings (likely mistakes, and what does not hold on this host but
    does not stop serve) go to stderr but exit 0."""
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        for line in config_error_lines(args.config, exc):
            print(line, file=sys.stderr)
        return 1
    problems = start_problems(config)
    if problems:
        print_problems(args.config, "error", problems)
        return 1
    now = datetime.now(UTC)
    router, stored = stored_state(config)
    warnings = config_warnings(config) + host_warnings(config)
    warnings += timing_warnings(config, router, now)
    if warnings:
        print_problems(args.config, "warning", warnings)
    print(f"{args.config}: OK")
    print(summary(config, now, router))
    print(stored)
    return 0
