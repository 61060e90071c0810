"""Command line: ``warmrelay serve | check-config | schedule``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from datetime import UTC, datetime

from warmrelay import __version__
from warmrelay.config import Config, IPConfig, load_config
from warmrelay.errors import ConfigError
from warmrelay.schedule import WarmupState, local_date, plan, status_on


def _fmt_hostport(hp: tuple[str, int]) -> str:
    host, port = hp
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _role(ip: IPConfig, config: Config, now: datetime) -> tuple[str, str, str]:
    """(role, day, cap) columns for an IP today."""
    if ip.warmup is None:
        return "warm (pool)", "-", "-"
    st = status_on(ip.warmup.schedule, ip.warmup.start, local_date(now, config.zone))
    days = ip.warmup.schedule.days
    if st.state is WarmupState.NOT_STARTED:
        return f"warming from {ip.warmup.start}", "-", "0"
    if st.state is WarmupState.WARM:
        return "warm (warmup done)", f"{st.day}", "-"
    return "warming", f"{st.day}/{days}", f"{st.cap:,}"


def summary(config: Config, now: datetime) -> str:
    lines = [
        "listen "
        + ", ".join(_fmt_hostport(hp) for hp in config.smtp.listen)
        + " (relay allowed from "
        + ", ".join(str(n) for n in config.smtp.allow_networks)
        + ")",
        "admin "
        + (_fmt_hostport(config.admin.listen) if config.admin.listen else "off")
        + f"; state {config.state.dir} (counters: {config.state.counters})",
        f"timezone {config.timezone}, today {local_date(now, config.zone)}, "
        f"overflow: {config.overflow}",
        "",
    ]
    rows = [("IP", "HELO", "ROLE", "DAY", "CAP TODAY")]
    rows += [(str(ip.address), ip.helo, *_role(ip, config, now)) for ip in config.ips]
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return "\n".join(lines)


def cmd_check_config(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"{args.config}: {len(exc.problems)} error(s)", file=sys.stderr)
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        return 1
    print(f"{args.config}: OK")
    print(summary(config, datetime.now(UTC)))
    return 0


def cmd_schedule(args: argparse.Namespace) -> int:
    config = _load_or_exit(args.config)
    today = local_date(datetime.now(UTC), config.zone)
    warming = [ip for ip in config.ips if ip.warmup is not None]
    if not warming:
        print("no IP has a warmup block: every IP is warm")
        return 0
    for n, ip in enumerate(warming):
        assert ip.warmup is not None
        sched = ip.warmup.schedule
        days = args.days
        if days is None:  # through the day the IP turns warm, at most 60 rows
            last = (ip.warmup.start - today).days + sched.days
            days = max(1, min(60, last + 1))
        if n:
            print()
        print(
            f"{ip.address} ({ip.helo}): schedule {sched.name}, start {ip.warmup.start}, "
            f"{sched.days} days"
        )
        print(f"  {'':2}{'date':<12}{'day':>5}  {'cap':>12}")
        for row in plan(sched, ip.warmup.start, today, days):
            st = row.status
            if st.state is WarmupState.NOT_STARTED:
                day, cap = "-", "0 (not started)"
            elif st.state is WarmupState.WARM:
                day, cap = str(st.day), "warm (pool)"
            else:
                day, cap = str(st.day), f"{st.cap:,}"
            mark = "> " if row.today else "  "
            note = "  today" if row.today else ""
            print(f"  {mark}{row.date.isoformat():<12}{day:>5}  {cap:>12}{note}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from warmrelay.app import run  # imported late: check-config needs none of the I/O stack

    config = _load_or_exit(args.config)
    return run(config)


def _load_or_exit(path: str) -> Config:
    try:
        return load_config(path)
    except ConfigError as exc:
        print(f"{path}: {len(exc.problems)} error(s)", file=sys.stderr)
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        raise SystemExit(1) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="warmrelay", description="SMTP relay that warms up new sending IPs."
    )
    parser.add_argument("--version", action="version", version=f"warmrelay {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("serve", help="run the relay")
    p.add_argument("-c", "--config", required=True, help="YAML configuration file")
    p.set_defaults(func=cmd_serve)
    p = sub.add_parser("check-config", help="validate a configuration file")
    p.add_argument("-c", "--config", required=True)
    p.set_defaults(func=cmd_check_config)
    p = sub.add_parser("schedule", help="show the warmup plan of each warming IP")
    p.add_argument("-c", "--config", required=True)
    p.add_argument("--days", type=int, default=None, help="rows to show (default: until warm)")
    p.set_defaults(func=cmd_schedule)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
