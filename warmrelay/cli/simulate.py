"""`warmrelay simulate`: a steady daily volume projected through the real router."""

from __future__ import annotations

import argparse
import sys
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

from warmrelay.cli.common import load_or_exit
from warmrelay.warmup.plan import local_date

if TYPE_CHECKING:
    pass


def cmd_simulate(args: argparse.Namespace) -> int:
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
