"""Simulation: project a steady daily volume through the real router, day by day.

It drives the same ``Router`` and counters code as the relay (memory backend,
simulated clock), so what it shows is what the relay would do, not a copy of
the rules. Each day's volume is spread evenly over 24 hours and split by the
provider mix.
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta

from warmrelay.config import Config
from warmrelay.warmup.counters import MemoryCounters
from warmrelay.warmup.plan import WarmupState
from warmrelay.warmup.router import Hold, Router, RouteReason

OTHER = "other"  # the share of the mix no named provider takes


@dataclass(frozen=True)
class SimDay:
    n: int  # 1-based simulated day
    date: date
    warmup_days: str  # each warming IP's warmup day, e.g. "3" or "3/1"
    cap: int  # sum of the warming IPs' day caps
    warming: int  # recipients sent from warming IPs
    pool: int  # recipients sent from warm pool IPs
    held: int  # recipients held back (overflow: hold)

    @property
    def total(self) -> int:
        return self.warming + self.pool + self.held


def parse_mix(text: str | None) -> dict[str, float]:
    """'gmail=0.4,microsoft=0.3' -> {'gmail': 0.4, 'microsoft': 0.3, 'other': 0.3}."""
    mix: dict[str, float] = {}
    for part in (text or "").split(","):
        if not part.strip():
            continue
        name, sep, value = part.partition("=")
        if not sep:
            raise ValueError(f"{part!r}: expected provider=share")
        share = float(value)
        if not 0 < share <= 1:
            raise ValueError(f"{part!r}: a share is between 0 and 1")
        mix[name.strip()] = share
    rest = 1.0 - sum(mix.values())
    if rest < -1e-9:
        raise ValueError("the shares add up to more than 1")
    if rest > 1e-9:
        mix[OTHER] = mix.get(OTHER, 0.0) + rest
    return mix


async def simulate(
    config: Config, daily: int, days: int, start: date, mix: Mapping[str, float]
) -> list[SimDay]:
    router = Router(config, MemoryCounters())
    zone = config.zone
    warming_ips = [ip for ip in config.ips if ip.warmup is not None]
    result = []
    sent_by: dict[str, int] = {name: 0 for name in mix}
    for n in range(1, days + 1):
        day = start + timedelta(days=n - 1)
        counts = {"warming": 0, "pool": 0, "held": 0}
        for hour in range(24):
            now = datetime.combine(day, time(hour, 30), tzinfo=zone)
            for name, share in mix.items():
                due = round(daily * share * (n - 1 + (hour + 1) / 24))
                volume, sent_by[name] = due - sent_by[name], due
                if volume <= 0:
                    continue
                plan = await router.route(volume, now, None if name == OTHER else name)
                for part in plan.parts:
                    if isinstance(part, Hold):
                        counts["held"] += part.count
                    elif part.reason is RouteReason.WARMUP:
                        counts["warming"] += part.count
                    else:
                        counts["pool"] += part.count
        noon = datetime.combine(day, time(12), tzinfo=zone)
        statuses = [router.status(ip, noon) for ip in warming_ips]
        result.append(
            SimDay(
                n,
                day,
                "/".join(
                    str(s.day)
                    if s.state is WarmupState.WARMING
                    else ("warm" if s.state is WarmupState.WARM else "-")
                    for s in statuses
                ),
                sum(s.cap or 0 for s in statuses if s.state is WarmupState.WARMING),
                counts["warming"],
                counts["pool"],
                counts["held"],
            )
        )
    return result


def completion_day(config: Config, start: date) -> int | None:
    """The simulated day (1-based) that is the last warming day of the slowest IP."""
    last = None
    for ip in config.ips:
        if ip.warmup is not None:
            first = ip.warmup.start or start  # no start: first used on the first day
            end = first + timedelta(days=ip.warmup.schedule.days - 1)
            last = end if last is None else max(last, end)
    return None if last is None else (last - start).days + 1


def table(rows: Sequence[SimDay]) -> str:
    head = ("day", "date", "warmup day", "cap", "via warming", "via pool", "held", "warming %")
    lines = [head]
    for r in rows:
        share = f"{100 * r.warming / r.total:.1f}" if r.total else "-"
        lines.append(
            (
                str(r.n),
                r.date.isoformat(),
                r.warmup_days,
                f"{r.cap:,}",
                f"{r.warming:,}",
                f"{r.pool:,}",
                f"{r.held:,}",
                share,
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    return "\n".join(
        "  ".join(
            c.rjust(w) if i != 1 else c.ljust(w)
            for i, (c, w) in enumerate(zip(line, widths, strict=True))
        )
        for line in lines
    )


def svg_chart(rows: Sequence[SimDay], title: str) -> str:
    """A line chart of recipients per day via the warming IPs and via the pool."""
    width, height, left, right, top, bottom = 800, 430, 70, 20, 62, 50
    peak = max([max(r.warming, r.pool, r.held) for r in rows] + [1])
    pw, ph = width - left - right, height - top - bottom

    def xy(i: int, v: int) -> str:
        x = left + (pw * i / max(1, len(rows) - 1))
        return f"{x:.1f},{top + ph - ph * v / peak:.1f}"

    series = [
        ("via warming IPs", "#d9480f", [r.warming for r in rows]),
        ("via pool", "#1971c2", [r.pool for r in rows]),
    ]
    if any(r.held for r in rows):
        series.append(("held", "#868e96", [r.held for r in rows]))
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'font-family="sans-serif" font-size="12">',
        f'<rect width="{width}" height="{height}" fill="white"/>',
        f'<text x="{left}" y="22" font-size="15">{html.escape(title)}</text>',
        f'<line x1="{left}" y1="{top + ph}" x2="{left + pw}" y2="{top + ph}" stroke="#333"/>',
        f'<line x1="{left}" y1="{top}" x2="{left}" y2="{top + ph}" stroke="#333"/>',
    ]
    for k in range(5):
        v = peak * k / 4
        y = top + ph - ph * k / 4
        out.append(f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{v:,.0f}</text>')
        out.append(f'<line x1="{left}" y1="{y:.1f}" x2="{left + pw}" y2="{y:.1f}" stroke="#eee"/>')
    step = max(1, len(rows) // 10)
    for i in range(0, len(rows), step):
        x = left + pw * i / max(1, len(rows) - 1)
        out.append(f'<text x="{x:.1f}" y="{top + ph + 18}" text-anchor="middle">{rows[i].n}</text>')
    out.append(f'<text x="{left + pw / 2}" y="{height - 10}" text-anchor="middle">day</text>')
    warm_at = next(
        (
            i
            for i, r in enumerate(rows)
            if r.warmup_days and all(d == "warm" for d in r.warmup_days.split("/"))
        ),
        None,
    )
    if warm_at:
        x = left + pw * (warm_at - 0.5) / max(1, len(rows) - 1)
        out.append(
            f'<line x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{top + ph}" '
            'stroke="#2b8a3e" stroke-dasharray="4 3"/>'
        )
        out.append(
            f'<text x="{x - 4:.1f}" y="{top + 14}" text-anchor="end" fill="#2b8a3e">'
            f"warmup complete (day {rows[warm_at].n - 1})</text>"
        )
    for k, (label, color, values) in enumerate(series):
        points = " ".join(xy(i, v) for i, v in enumerate(values))
        out.append(f'<polyline fill="none" stroke="{color}" stroke-width="2" points="{points}"/>')
        out.append(
            f'<rect x="{left + 10 + 170 * k}" y="{top - 22}" width="12" height="4" fill="{color}"/>'
        )
        out.append(f'<text x="{left + 26 + 170 * k}" y="{top - 16}">{label}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"
