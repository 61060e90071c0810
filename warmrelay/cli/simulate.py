"""`warmrelay simulate`: a steady daily volume projected through the real router
(``--daily``), or a file of daily signals replayed through the reputation controller
(``--signals``)."""

from __future__ import annotations

import argparse
import os
import sys
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

from warmrelay.cli.common import load_or_exit
from warmrelay.warmup.plan import local_date

if TYPE_CHECKING:
    pass


def cmd_simulate(args: argparse.Namespace) -> int:
    if args.signals is not None:
        return _replay(args)
    if args.json:
        print("--json goes with --signals (the replay's rows)", file=sys.stderr)
        return 2
    import asyncio

    from warmrelay.warmup.simulate import completion_day, parse_mix, simulate, svg_chart, table

    config = load_or_exit(args.config)
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


def _replay(args: argparse.Namespace) -> int:
    """``--signals``: the replay's table (or JSON) and chart; a bad file is exit 2 with
    FILE:LINE for each problem."""
    import json

    from warmrelay.reputation.plot import svg_replay
    from warmrelay.reputation.replay import SignalsFileError, notes, parse_signals, replay, table

    for flag, value in (("--mix", args.mix), ("--start", args.start)):
        if value is not None:
            print(
                f"{flag} goes with --daily (the replay starts at each IP's start)", file=sys.stderr
            )
            return 2
    if args.days is not None and args.days < 1:
        print("--days: at least 1", file=sys.stderr)
        return 2
    if args.plot and not args.plot.endswith(".svg"):
        print("--plot: the chart is written as SVG; name the file *.svg", file=sys.stderr)
        return 2
    config = load_or_exit(args.config)
    try:
        with open(args.signals, encoding="utf-8") as fh:
            text = fh.read()
    except (OSError, UnicodeDecodeError) as exc:
        print(f"{args.signals}: cannot read it ({exc})", file=sys.stderr)
        return 2
    try:
        signals = parse_signals(text, config)
    except SignalsFileError as exc:
        for line, problem in exc.problems:
            print(f"{args.signals}:{line}: {problem}", file=sys.stderr)
        return 2
    rows = replay(config, signals, args.days)
    said = sys.stderr if args.json else sys.stdout
    print(
        f"{args.signals} replayed through progress: reputation's controller "
        "(reputation.thresholds of the config)",
        file=said,
    )
    for note in notes(config, signals, args.days):
        print(f"  {note}", file=said)
    if args.json:
        print(json.dumps([r.to_json() for r in rows], indent=2))
    else:
        print(table(rows))
    if args.plot:
        title = f"warmrelay simulate --signals {os.path.basename(args.signals)}"
        try:
            with open(args.plot, "w", encoding="utf-8") as fh:
                fh.write(svg_replay(rows, title, config.reputation.thresholds))
        except OSError as exc:
            print(f"--plot: cannot write {args.plot} ({exc})", file=sys.stderr)
            return 1
        print(f"chart written to {args.plot}", file=said)
    return 0
