"""Command line: ``warmrelay serve | check-config | schedule``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from datetime import UTC, date, datetime, timedelta
from typing import TYPE_CHECKING, Any

from warmrelay import __version__
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
from warmrelay.errors import ConfigError, ConfigProblem, WarmrelayError
from warmrelay.warmup.control import IP_ACTIONS
from warmrelay.warmup.plan import WarmupState, local_date, plan

if TYPE_CHECKING:
    from warmrelay.warmup.router import Router


def _fmt_hostport(hp: tuple[str, int]) -> str:
    host, port = hp
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _stored_state(config: Config) -> tuple[Router, str]:
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


def _role(ip: IPConfig, router: Router, now: datetime) -> tuple[str, str, str]:
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


def _notes(ip: IPConfig, router: Router, now: datetime, *, start: bool = True) -> list[str]:
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


def _timing_warnings(config: Config, router: Router, now: datetime) -> list[ConfigProblem]:
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
            _fmt_hostport(li.address) + f" ({config.smtp.listener_tls(li)})"
            for li in config.smtp.listen
        )
        + " (relay allowed from "
        + ", ".join(str(n) for n in config.smtp.allow_networks)
        + ")",
        "admin "
        + (_fmt_hostport(config.admin.listen) if config.admin.listen else "off")
        + f"; state {config.state.dir} (counters: {redact_url(config.state.counters)})",
        f"timezone {config.timezone}, today {local_date(now, config.zone)}, "
        f"overflow: {config.overflow}, log: {config.log.format}",
        "",
    ]
    rows = [("IP", "HELO", "ROLE", "DAY", "CAP TODAY")]
    rows += [(str(ip.address), ip.helo, *_role(ip, router, now)) for ip in config.ips]
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    for ip in config.ips:
        lines += [f"  {ip.address}: {note}" for note in _notes(ip, router, now)]
    return "\n".join(lines)


def _print_problems(path: str, kind: str, problems: Sequence[ConfigProblem]) -> None:
    print(f"{path}: {len(problems)} {kind}(s)", file=sys.stderr)
    for problem in problems:
        print(f"  {problem}", file=sys.stderr)


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
        _print_problems(args.config, "error", problems)
        return 1
    now = datetime.now(UTC)
    router, stored = _stored_state(config)
    warnings = config_warnings(config) + host_warnings(config)
    warnings += _timing_warnings(config, router, now)
    if warnings:
        _print_problems(args.config, "warning", warnings)
    print(f"{args.config}: OK")
    print(summary(config, now, router))
    print(stored)
    return 0


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
    config = _load_or_exit(args.config)
    now = datetime.now(UTC)
    today = local_date(now, config.zone)
    warming = [ip for ip in config.ips if ip.warmup is not None]
    if not warming:
        print("no IP has a warmup block: every IP is warm")
        return 0
    router, stored = _stored_state(config)
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
        for note in _notes(ip, router, now, start=False):
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
    for warning in _timing_warnings(config, router, now):
        print(f"warning: {warning}", file=sys.stderr)
    print()
    print(stored)
    return 0


def cmd_simulate(args: argparse.Namespace) -> int:
    import asyncio

    from warmrelay.warmup.simulate import completion_day, parse_mix, simulate, svg_chart, table

    config = _load_or_exit(args.config)
    try:
        mix = parse_mix(args.mix)
    except ValueError as exc:
        print(f"--mix: {exc}", file=sys.stderr)
        return 2
    if args.plot and not args.plot.endswith(".svg"):
        print("--plot: the chart is written as SVG; name the file *.svg", file=sys.stderr)
        return 2
    starts = [ip.warmup.start for ip in config.ips if ip.warmup and ip.warmup.start]
    start = args.start or (min(starts) if starts else local_date(datetime.now(UTC), config.zone))
    done = completion_day(config, start)
    days = args.days or max(1, min(400, (done or 0) + 3))
    rows = asyncio.run(simulate(config, args.daily, days, start, mix))
    print(
        f"{args.daily:,} recipients a day from {start}, mix "
        + ", ".join(f"{k} {v:.0%}" for k, v in mix.items())
    )
    print(table(rows))
    if done is None:
        print("no IP is warming up")
    elif done < 1:
        print(f"warmup completed before {start}")
    else:
        print(
            f"warmup completes on day {done} ({start + timedelta(days=done - 1)}); "
            f"from day {done + 1} every IP is warm"
        )
    if args.plot:
        with open(args.plot, "w", encoding="utf-8") as fh:
            fh.write(svg_chart(rows, f"warmrelay simulate: {args.daily:,} recipients/day"))
        print(f"chart written to {args.plot}")
    return 0


def _pending_in_relay(subject: str | None, action: str) -> int:
    """The running relay took the change but its state store did not (yet): exit 1."""
    print(
        f"{subject}: {action} is in force in the running relay, but its state store failed: "
        "other relay processes (workers, a fleet) see it only once the store answers again",
        file=sys.stderr,
    )
    return 1


def cmd_ip(args: argparse.Namespace) -> int:
    """Ask the running relay (admin endpoint); if none runs, write the state store directly."""
    import asyncio

    config = _load_or_exit(args.config)
    if args.address not in {str(ip.address) for ip in config.ips}:
        print(f"{args.address} is not listed under ips in {args.config}", file=sys.stderr)
        return 1
    from warmrelay.cli.client import Refused, RelayDown, call

    try:
        state = call(config, "POST", f"/ips/{args.address}/{args.action}")
    except Refused as exc:
        print(f"ip {args.action}: {exc}", file=sys.stderr)
        return 1
    except RelayDown:
        pass  # no relay running: change the store it will read at start
    else:
        if state.get("persisted") == "pending":
            return _pending_in_relay(args.address, args.action)
        print(f"{args.address}: {args.action} done by the running relay; state {state['state']}")
        _still_warm(args.action, state)
        return 0

    from warmrelay.app import Relay

    async def offline() -> dict[str, object]:
        relay = Relay(config)
        try:
            await relay.router.refresh(datetime.now(UTC))
            return await relay.ip_action(args.address, args.action)
        finally:
            await relay.counters.close()

    state = asyncio.run(offline())
    if state["persisted"] == "pending":  # this process ends now: nothing will store it
        print(
            f"{args.address}: {args.action} NOT recorded: the state store failed (see the log)",
            file=sys.stderr,
        )
        return 1
    print(
        f"{args.address}: {args.action} recorded in {config.state.dir} (no relay running); "
        f"state {state['state']}"
    )
    _still_warm(args.action, state)
    return 0


def _still_warm(action: str, state: dict[str, Any]) -> None:
    """``uncomplete`` of an IP whose schedule is over: it stays warm; say why."""
    if action == "uncomplete" and state.get("state") == WarmupState.WARM.value:
        print(
            f"{state.get('address')}: its schedule is over (day {state.get('warmup_day')} of "
            f"{state.get('schedule_days')}): it stays warm; give it a later warmup.start or a "
            "longer schedule to warm it again",
            file=sys.stderr,
        )


def cmd_suppression(args: argparse.Namespace) -> int:
    """List, add or remove suppressed addresses: through the running relay's admin endpoint
    (its own list changes at once), else straight on the state store (relays, workers and a
    fleet on that store read it within seconds)."""
    import asyncio
    import json
    import urllib.error
    import urllib.parse
    import urllib.request

    config = _load_or_exit(args.config)
    address: str | None = args.address
    if args.action != "list" and not address:
        print(f"suppression {args.action}: give the ADDRESS", file=sys.stderr)
        return 2
    from warmrelay.cli.client import Refused, RelayDown, call

    result: dict[str, Any] | None = None
    try:
        if args.action == "list":
            result = call(config, "GET", "/suppression")
        else:
            assert address is not None
            quoted = urllib.parse.quote(address, safe="@+")
            result = call(config, "POST", f"/suppression/{quoted}/{args.action}")
        where = "by the running relay"
    except Refused as exc:
        print(f"suppression {args.action}: {exc}", file=sys.stderr)
        return 1
    except RelayDown:
        pass  # no relay running: read or change the store it will read at start
    if result is None:
        from warmrelay.app import Relay

        async def offline() -> dict[str, Any]:
            relay = Relay(config)
            try:
                if args.action == "list":
                    return await relay.suppression_list()
                assert address is not None
                return await relay.suppression_action(address, args.action)
            finally:
                await relay.counters.close()

        try:
            result = asyncio.run(offline())
        except KeyError:
            print(f"{address}: not on the suppression list", file=sys.stderr)
            return 1
        except ValueError as exc:
            print(f"{address}: {exc}", file=sys.stderr)
            return 1
        where = "in the state store (no relay running)"
        if result.get("persisted") == "pending":  # this process ends now: nothing will store it
            print(f"{address}: {args.action} NOT recorded: the state store failed", file=sys.stderr)
            return 1
    elif result.get("persisted") == "pending":
        return _pending_in_relay(address, args.action)
    if args.action == "list":
        return _print_suppressed(result, address, args.json)
    if args.json:
        print(json.dumps(result, indent=2))
    elif args.action == "add":
        print(f"{result['address']}: suppressed until {result['until']} ({where})")
    else:
        print(f"{result['address']}: removed from the suppression list ({where})")
    return 0


def _print_suppressed(listing: dict[str, Any], address: str | None, as_json: bool) -> int:
    """The list (or the one entry of ``address``: exit 1 if it is not suppressed)."""
    import json

    entries: list[dict[str, str]] = listing["entries"]
    if address is not None:
        wanted = address.strip().removeprefix("<").removesuffix(">").lower()
        entries = [e for e in entries if e["address"] == wanted]
        listing = {**listing, "count": len(entries), "entries": entries}
    if as_json:
        print(json.dumps(listing, indent=2))
    elif address is not None and not entries:
        print(f"{address}: not suppressed", file=sys.stderr)
    else:
        days = float(listing["ttl_s"]) / 86400
        state = "" if listing["enabled"] else " (suppression.enabled is false: none refused)"
        print(f"{len(entries)} suppressed address(es), each for {days:g} days{state}")
        rows = [("ADDRESS", "SINCE", "UNTIL", "BY", "REPLY")]
        rows += [(e["address"], e["since"], e["until"], e["by"], e["reply"]) for e in entries]
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        for r in rows:
            print("  ".join(c.ljust(w) for c, w in zip(r[:4], widths, strict=True)) + "  " + r[4])
    return 1 if address is not None and not entries else 0


def cmd_preflight(args: argparse.Namespace) -> int:
    """Check each IP's and signing domain's DNS identity (meant to run on the sending host).
    Exit 1 when a check that hurts delivery fails; unknown (no answer) does not fail, but
    no DNS answer at all is exit 2 (could not check): a green run must mean "checked".
    Changes nothing: the running relay pauses a listed warming IP itself."""
    import asyncio
    import json

    from warmrelay.mail.preflight import Preflight

    config = _load_or_exit(args.config)
    report = asyncio.run(Preflight(config).run())
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
        if report.unchecked:  # the JSON says so too ("dns": {"error"}); this is for people
            print(f"preflight: {report.unchecked}", file=sys.stderr)
    else:
        print(report.table())
    if report.failed:
        return 1
    return 2 if report.unchecked else 0


def cmd_hash_password(args: argparse.Namespace) -> int:
    """Print an argon2id hash for smtp.users.NAME.password_hash (the password is read
    from standard input or a prompt, never from the command line)."""
    import getpass

    from warmrelay.smtp.auth import hash_password

    if sys.stdin.isatty():
        password = getpass.getpass("password: ")
        if getpass.getpass("again: ") != password:
            print("the passwords differ", file=sys.stderr)
            return 1
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    if len(password) < 12:
        print("use at least 12 characters", file=sys.stderr)
        return 1
    print(hash_password(password))
    return 0


def cmd_dkim_keygen(args: argparse.Namespace) -> int:
    """Write a new DKIM private key (mode 0600; an existing file is never replaced) and
    print the TXT record to publish at SELECTOR._domainkey.DOMAIN on standard output."""
    from pathlib import Path

    from warmrelay.mail.dkim import keygen

    out = Path(args.out) if args.out else None
    try:
        domain, entry, record = keygen(args.domain, args.selector, args.algorithm, out)
    except ValueError as exc:
        print(f"dkim keygen: {exc}", file=sys.stderr)
        return 2
    except FileExistsError as exc:
        print(
            f"dkim keygen: {exc.filename} exists: not replaced (a published record may belong "
            "to it); choose another --out",
            file=sys.stderr,
        )
        return 1
    except OSError as exc:
        print(f"dkim keygen: cannot write {exc.filename}: {exc.strerror}", file=sys.stderr)
        return 1
    print(record)
    print(
        f"wrote {entry.key_file} (mode 0600). Publish the TXT record above, then add to the "
        f"configuration:\n  dkim:\n    domains:\n      {domain}:\n        keys:\n"
        f"          - {{selector: {entry.selector}, key_file: {entry.key_file}, "
        f"algorithm: {entry.algorithm}}}",
        file=sys.stderr,
    )
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """Run the relay. A worker (started by a supervisor) takes its configuration from the
    supervisor, never from the file, which may be broken by now; anything else first takes
    state.dir for itself, so a second instance on it stops here, having touched nothing."""
    # imported late: check-config needs none of the I/O stack
    from warmrelay.operate.supervisor import (
        StateDirInUse,
        lock_state_dir,
        receive_config,
        supervise,
        worker_from_env,
    )

    worker = worker_from_env()
    if worker is not None:  # started by a supervisor
        from warmrelay.app import Worker, run

        return run(receive_config(), Worker(*worker))
    config = _load_or_exit(args.config)
    # refused before anything starts (supervisor, workers): a broken key or an unwritable
    # state.dir must not become a worker restart loop; check-config runs the same checks
    problems = start_problems(config)
    if problems:
        for problem in problems:
            print(f"{args.config}: cannot start: {problem}", file=sys.stderr)
        return 1
    try:
        lock_fd = lock_state_dir(config.state.dir)
    except StateDirInUse as exc:
        print(f"{args.config}: cannot start: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        where = config.state.dir
        print(f"{args.config}: cannot start: cannot lock {where}: {exc}", file=sys.stderr)
        return 1
    if args.workers > 1:
        from warmrelay.errors import StartError
        from warmrelay.operate.logs import setup_logging

        setup_logging(args.log_format or config.log.format)
        try:
            return supervise(config, args.config, args.workers, lock_fd, args.log_format)
        except StartError as exc:
            print(f"{args.config}: cannot start: {exc}", file=sys.stderr)
            return 1
    from warmrelay.app import run

    return run(config, path=args.config, log_format=args.log_format)


def _load_or_exit(path: str) -> Config:
    """The configuration, or exit 1 having printed what check-config prints for it."""
    try:
        return load_config(path)
    except ConfigError as exc:
        for line in config_error_lines(path, exc):
            print(line, file=sys.stderr)
        raise SystemExit(1) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="warmrelay", description="SMTP relay that warms up new sending IPs."
    )
    parser.add_argument("--version", action="version", version=f"warmrelay {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("serve", help="run the relay")
    p.add_argument("-c", "--config", required=True, help="YAML configuration file")
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        help="relay processes sharing the listening ports (default 1; one per core)",
    )
    p.add_argument(
        "--log-format",
        choices=["text", "json"],
        default=None,
        help="log lines as text or JSON objects (overrides log.format, also after reloads)",
    )
    p.set_defaults(func=cmd_serve)
    from warmrelay.cli import queue as queuecli

    queuecli.add_parser(sub)
    p = sub.add_parser("check-config", help="validate a configuration file")
    p.add_argument("-c", "--config", required=True)
    p.set_defaults(func=cmd_check_config)
    p = sub.add_parser("schedule", help="show the warmup plan of each warming IP")
    p.add_argument("-c", "--config", required=True)
    p.add_argument("--days", type=int, default=None, help="rows to show (default: until warm)")
    p.set_defaults(func=cmd_schedule)
    p = sub.add_parser("hash-password", help="print a password hash for smtp.users")
    p.set_defaults(func=cmd_hash_password)
    p = sub.add_parser("dkim", help="DKIM signing keys")
    dkim_sub = p.add_subparsers(dest="dkim_command", required=True)
    p = dkim_sub.add_parser("keygen", help="write a new key and print its DNS TXT record")
    p.add_argument("--domain", required=True, help="signing domain (d=)")
    p.add_argument("--selector", required=True, help="selector (s=), e.g. s2026")
    p.add_argument(
        "--algorithm",
        choices=["rsa", "ed25519"],
        default="rsa",
        help="rsa (2048-bit, verified everywhere; default) or ed25519 (RFC 8463, beside rsa)",
    )
    p.add_argument("--out", default=None, help="key file (default DOMAIN.SELECTOR.pem)")
    p.set_defaults(func=cmd_dkim_keygen)
    p = sub.add_parser(
        "ip", help="pause, resume, complete (or uncomplete) the warmup of a source IP"
    )
    p.add_argument("action", choices=IP_ACTIONS)
    p.add_argument("address")
    p.add_argument("-c", "--config", required=True)
    p.set_defaults(func=cmd_ip)
    p = sub.add_parser(
        "suppression", help="list, add or remove addresses refused after a hard bounce"
    )
    p.add_argument("action", choices=["list", "add", "remove"])
    p.add_argument("address", nargs="?", help="for add and remove (list: show only this one)")
    p.add_argument("-c", "--config", required=True)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_suppression)
    p = sub.add_parser(
        "preflight", help="check PTR, FCrDNS, blocklists, SPF, DKIM and DMARC before warming"
    )
    p.add_argument("-c", "--config", required=True)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_preflight)
    p = sub.add_parser("simulate", help="project a steady daily volume through the warmup")
    p.add_argument("-c", "--config", required=True)
    p.add_argument("--daily", type=int, required=True, help="recipients per day")
    p.add_argument("--days", type=int, default=None, help="days to simulate (default: until warm)")
    p.add_argument(
        "--start",
        type=date.fromisoformat,
        default=None,
        help="first simulated day (default: the earliest warmup start)",
    )
    p.add_argument("--mix", default=None, help="provider shares, e.g. gmail=0.4,microsoft=0.3")
    p.add_argument("--plot", default=None, help="write a chart of both series to FILE.svg")
    p.set_defaults(func=cmd_simulate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except BrokenPipeError:  # output piped into head & co.
        return 0
    except WarmrelayError as exc:  # our own, deliberate failures: their message, no traceback
        for line in str(exc).splitlines() or [type(exc).__name__]:
            print(f"warmrelay: {line}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
