"""The chart of a replay (``warmrelay simulate --signals ... --plot FILE.svg``): per (IP,
provider) pair its cap day by day, where the controller held, stepped back or paused, and
the signals it judged. Hand-written SVG like ``warmup.simulate.svg_chart``: no plotting
library to install for one chart, and the file diffs as text."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from datetime import date, timedelta
from html import escape

from warmrelay.config import ThresholdsConfig
from warmrelay.reputation.replay import RATES, SNDS, ReplayRow

WIDTH, LEFT, RIGHT = 900, 80, 80
TOP = 104  # below the title and the legend
CAP_H, STRIP_H = 170, 56  # a panel: the caps (log scale), then the signals
PANEL_H = 24 + CAP_H + 18 + STRIP_H + 40

CAP, SCHEDULE = "#1971c2", "#adb5bd"
HOLD, BACK, PAUSE = "#f59f00", "#e8590c", "#e03131"
PAUSED_BAND, WARM_BAND, WARM = "#ffe3e3", "#ebfbee", "#2b8a3e"
RATE_COLORS = {
    "spam_rate": "#862e9c",
    "complaint_rate": "#c2255c",
    "hard_bounce_rate": "#5f3dc4",
    "throttle_rate": "#0b7285",
    "deferral_rate": "#5c940d",
    "delivery_error_rate": "#364fc7",
}
SNDS_COLORS = {"GREEN": "#2f9e44", "YELLOW": "#fab005", "RED": "#e03131"}


def svg_replay(rows: Sequence[ReplayRow], title: str, t: ThresholdsConfig) -> str:
    """The whole chart: a panel per pair, in the rows' order."""
    pairs: dict[tuple[str, str], list[ReplayRow]] = {}
    for r in rows:
        pairs.setdefault((r.ip, r.provider), []).append(r)
    first = min((r.date for r in rows), default=date.today())
    last = max((r.date for r in rows), default=first)
    n = (last - first).days + 1
    pw = WIDTH - LEFT - RIGHT
    height = TOP + PANEL_H * max(1, len(pairs)) + 10

    def x0(on: date) -> float:
        return LEFT + pw * (on - first).days / n

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" '
        f'font-family="sans-serif" font-size="12">',
        f'<rect width="{WIDTH}" height="{height}" fill="white"/>',
        f'<text x="{LEFT}" y="24" font-size="15">{escape(title)}</text>',
        *_legend(),
    ]
    for k, ((ip, provider), days) in enumerate(pairs.items()):
        top = TOP + PANEL_H * k
        out += _panel(ip, provider, days, top, x0, pw / n, t)
        out += _date_axis(first, n, top + 24 + CAP_H + 18 + STRIP_H, x0, pw / n)
    out.append("</svg>")
    return "\n".join(out) + "\n"


def _legend() -> list[str]:
    """Two rows: what the cap lines and markers mean, then the signals."""
    items: list[tuple[str, str]] = [
        (_hline(0, 0, 22, CAP, 2), "cap per day (the pair's day)"),
        (_hline(0, 0, 22, SCHEDULE, 2, dashed=True), "schedule without holds"),
        (_circle(11, 0, HOLD), "hold"),
        (_triangle(11, 6, BACK), "back N days"),
        (_square(11, 0, PAUSE), "pause"),
        (f'<rect x="0" y="-7" width="22" height="14" fill="{PAUSED_BAND}"/>', "paused"),
        (_hline(0, 0, 22, RATE_COLORS["spam_rate"], 1.5), "a rate, its limits dashed"),
        (
            "".join(_square(4 + 7 * i, 0, c, 6) for i, c in enumerate(SNDS_COLORS.values())),
            "SNDS filter",
        ),
    ]
    out = []
    for i, (mark, label) in enumerate(items):
        x, y = LEFT + 205 * (i % 4), 52 + 22 * (i // 4)
        out.append(f'<g class="legend" transform="translate({x},{y})">{mark}')
        out.append(f'<text x="28" y="4">{escape(label)}</text></g>')
    return out


def _panel(
    ip: str,
    provider: str,
    days: Sequence[ReplayRow],
    top: int,
    x0: Callable[[date], float],
    bw: float,
    t: ThresholdsConfig,
) -> list[str]:
    cap_top, cap_bottom = top + 24, top + 24 + CAP_H
    right = LEFT + bw * len(days)
    held = sum(r.action == "hold" for r in days)
    back = sum(r.action.startswith("back") for r in days)
    paused = sum(r.action == "pause" and not r.paused for r in days)  # pauses begun
    out = [
        f'<g class="pair" id="{escape(f"{ip}-{provider}")}">',
        f'<text x="{LEFT}" y="{top + 12}" font-size="13" font-weight="bold">'
        f"{escape(ip)} \u00b7 {escape(provider)}</text>",
        f'<text x="{LEFT + 200}" y="{top + 12}" fill="#495057">'
        f"{held} hold(s), {back} step(s) back, {paused} pause(s)</text>",
    ]
    caps = [v for r in days for v in (r.cap, r.schedule_cap) if v]
    lo = math.floor(math.log10(min(caps)) - 1e-9) if caps else 0  # below the lowest cap
    hi = max(lo + 1, math.ceil(math.log10(max(caps)))) if caps else 1

    def y(cap: int) -> float:
        if cap <= 0:
            return cap_bottom
        return cap_bottom - CAP_H * (math.log10(cap) - lo) / (hi - lo)

    for r in days:  # bands under everything: paused days, warm days
        if r.paused or r.cap is None:
            color, cls = (PAUSED_BAND, "paused") if r.paused else (WARM_BAND, "warm")
            out.append(
                f'<rect class="{cls}" x="{x0(r.date):.1f}" y="{cap_top}" width="{bw:.1f}" '
                f'height="{CAP_H}" fill="{color}"/>'
            )
    for i, r in enumerate(days):  # each run of paused days: its label
        if r.paused and (i == 0 or not days[i - 1].paused):
            out.append(
                f'<text x="{x0(r.date) + 3:.1f}" y="{cap_top + 14}" fill="{PAUSE}">paused</text>'
            )
    first_warm = next((r for r in days if r.cap is None and not r.paused), None)
    if first_warm is not None:
        out.append(
            f'<text x="{x0(first_warm.date) + 3:.1f}" y="{cap_top + 14}" fill="{WARM}">warm</text>'
        )
    for p in range(lo, hi + 1):
        v = 10**p
        out.append(_hline(LEFT, y(v), right, "#eee", 1))
        out.append(f'<text x="{LEFT - 6}" y="{y(v) + 4:.1f}" text-anchor="end">{v:,}</text>')
    out.append(
        f'<text x="{LEFT - 62}" y="{(cap_top + cap_bottom) / 2:.1f}" fill="#495057" '
        f'transform="rotate(-90 {LEFT - 62} {(cap_top + cap_bottom) / 2:.1f})" '
        'text-anchor="middle">cap (log)</text>'
    )
    out.append(_hline(LEFT, cap_bottom, right, "#333", 1))
    out.append(f'<line x1="{LEFT}" y1="{cap_top}" x2="{LEFT}" y2="{cap_bottom}" stroke="#333"/>')
    out.append(_steps([(r.date, r.schedule_cap) for r in days], x0, bw, y, SCHEDULE, "schedule"))
    sends = [(r.date, None if r.paused else r.cap) for r in days]  # paused: the band says it
    out.append(_steps(sends, x0, bw, y, CAP, "cap"))
    if len(days) <= 45:  # the pair's day on each step, while there is room for it
        for r in days:
            if r.cap and not r.action.startswith("back"):  # there: "back N" says it
                out.append(
                    f'<text x="{x0(r.date) + bw / 2:.1f}" y="{y(r.cap) - 9:.1f}" font-size="9" '
                    f'fill="{CAP}" text-anchor="middle">{r.day}</text>'
                )
    for r in days:  # a tooltip per day, under the markers
        out.append(
            f'<rect class="day" x="{x0(r.date):.1f}" y="{cap_top}" width="{bw:.1f}" '
            f'height="{CAP_H}" fill="white" fill-opacity="0"><title>{escape(_tip(r))}</title>'
            "</rect>"
        )
    for r in days:  # a paused day's marker: mid-band (it has no cap line)
        at = cap_top + CAP_H / 2 if r.paused else y(r.cap or 0)
        if not (r.paused and r.action == "pause"):  # the band says it too
            out += _marker(r, x0(r.date) + bw / 2, at)
    out += _strip(provider, days, cap_bottom + 18, x0, bw, right, t)
    out.append("</g>")
    return out


def _steps(
    values: Sequence[tuple[date, int | None]],
    x0: Callable[[date], float],
    bw: float,
    y: Callable[[int], float],
    color: str,
    cls: str,
) -> str:
    """A step line: flat across each day, vertical at day changes, broken where warm."""
    path: list[str] = []
    drawing = False
    for on, v in values:
        if v is None:
            drawing = False
            continue
        path.append(f"{'L' if drawing else 'M'}{x0(on):.1f},{y(v):.1f}")
        path.append(f"L{x0(on) + bw:.1f},{y(v):.1f}")
        drawing = True
    dash = ' stroke-dasharray="5 3"' if cls == "schedule" else ""
    width = 2.5 if cls == "cap" else 1.5
    return (
        f'<path class="{cls}" d="{" ".join(path)}" fill="none" stroke="{color}" '
        f'stroke-width="{width}"{dash}/>'
    )


def _marker(r: ReplayRow, x: float, y: float) -> list[str]:
    """The decision of the day where it stopped the ramp (an advance has none)."""
    tip = f"<title>{escape(_tip(r))}</title>"
    if r.action == "hold":
        resumed = r.reason.startswith("resumed")
        out = [f'<g class="marker hold{" resumed" if resumed else ""}">{tip}{_circle(x, y, HOLD)}']
        if resumed:
            out.append(
                f'<text x="{x:.1f}" y="{y - 20:.1f}" fill="{WARM}" text-anchor="middle">'
                "resumed</text>"
            )
        return [*out, "</g>"]
    if r.action.startswith("back"):
        return [
            f'<g class="marker back">{tip}{_triangle(x, y, BACK)}',
            f'<text x="{x:.1f}" y="{y - 20:.1f}" fill="{BACK}" text-anchor="middle" '
            f'font-weight="bold">{escape(r.action)}</text></g>',
        ]
    if r.action == "pause":
        return [f'<g class="marker pause">{tip}{_square(x, y, PAUSE)}</g>']
    return []


def _strip(
    provider: str,
    days: Sequence[ReplayRow],
    top: float,
    x0: Callable[[date], float],
    bw: float,
    right: float,
    t: ThresholdsConfig,
) -> list[str]:
    """The signals judged each day: each rate as a thin line with its hold and back
    limits, SNDS as coloured squares."""
    bottom = top + STRIP_H
    out = [
        _hline(LEFT, bottom, right, "#333", 1),
        f'<text x="{LEFT - 6}" y="{top + STRIP_H / 2 + 4:.1f}" text-anchor="end" '
        'fill="#495057">signals</text>',
    ]
    rates = [n for n in RATES if any(isinstance(r.values.get(n), float) for r in days)]
    limits = {
        (n, step): v
        for n in rates
        for step, v in (("hold", t.ladder(n, provider).hold), ("back", t.ladder(n, provider).back))
        if v is not None
    }
    values = [float(v) for r in days for n in rates if isinstance(v := r.values.get(n), float)]
    peak = max([*values, *limits.values(), 1e-6]) * 1.15
    snds = any(SNDS in r.values for r in days)
    area_top = top + (12 if snds else 0)

    def y(v: float) -> float:
        return bottom - (bottom - area_top) * v / peak

    label_at = bottom + 12.0  # the limits' labels, bottom up, never on top of each other
    for (n, step), v in sorted(limits.items(), key=lambda kv: kv[1]):
        out.append(_hline(LEFT, y(v), right, RATE_COLORS[n], 1, dashed=True, opacity=0.5))
        label_at = min(y(v) + 4, label_at - 11)
        out.append(
            f'<text x="{right + 4:.1f}" y="{label_at:.1f}" font-size="10" '
            f'fill="{RATE_COLORS[n]}">{step} {_pct(v)}</text>'
        )
    for n in rates:
        points = [(r.date, v) for r in days if isinstance(v := r.values.get(n), float)]
        line = " ".join(f"{x0(on) + bw / 2:.1f},{y(v):.1f}" for on, v in points)
        out.append(
            f'<polyline class="signal {n}" fill="none" stroke="{RATE_COLORS[n]}" '
            f'stroke-width="1.5" points="{line}"/>'
        )
        hold = t.ladder(n, provider).hold
        for on, v in points:
            x = x0(on) + bw / 2
            out.append(
                f'<circle class="signal {n}" cx="{x:.1f}" cy="{y(v):.1f}" r="2.5" '
                f'fill="{RATE_COLORS[n]}"><title>{on} {n} {_pct(v)}</title></circle>'
            )
            if hold is not None and v >= hold:  # a value that stopped the ramp: written out
                out.append(
                    f'<text x="{x + 6:.1f}" y="{y(v) + 4:.1f}" font-size="10" '
                    f'fill="{RATE_COLORS[n]}">{_pct(v)}</text>'
                )
    for r in days:
        value = r.values.get(SNDS)
        if isinstance(value, str):
            out.append(
                f'<rect class="snds {escape(value)}" x="{x0(r.date) + bw / 2 - 4:.1f}" '
                f'y="{top:.1f}" width="8" height="8" fill="{SNDS_COLORS.get(value, "#868e96")}">'
                f"<title>{r.date} SNDS {escape(value)}</title></rect>"
            )
    return out


def _date_axis(first: date, n: int, y: float, x0: Callable[[date], float], bw: float) -> list[str]:
    step = max(1, math.ceil(n / 15))
    out = []
    for i in range(0, n, step):
        on = first + timedelta(days=i)
        out.append(
            f'<text x="{x0(on) + bw / 2:.1f}" y="{y + 16:.1f}" font-size="10" '
            f'text-anchor="middle">{on.strftime("%m-%d")}</text>'
        )
    return out


def _tip(r: ReplayRow) -> str:
    cap = "warm" if r.cap is None else f"cap {r.cap:,}"
    used = ", ".join(
        f"{k} {_pct(v) if isinstance(v, float) else v}" for k, v in sorted(r.values.items())
    )
    text = f"{r.date} {r.ip} {r.provider} day {r.day}, {cap}: {r.action} ({r.reason})"
    return f"{text}; signals: {used}" if used else text


def _pct(value: float) -> str:
    return f"{value * 100:.2g} %"


def _hline(
    x1: float,
    y: float,
    x2: float,
    color: str,
    width: float,
    dashed: bool = False,
    opacity: float = 1.0,
) -> str:
    dash = ' stroke-dasharray="5 3"' if dashed else ""
    alpha = f' stroke-opacity="{opacity}"' if opacity < 1 else ""
    return (
        f'<line x1="{x1:.1f}" y1="{y:.1f}" x2="{x2:.1f}" y2="{y:.1f}" stroke="{color}" '
        f'stroke-width="{width}"{dash}{alpha}/>'
    )


def _circle(x: float, y: float, color: str) -> str:
    return f'<circle cx="{x:.1f}" cy="{y:.1f}" r="5" fill="{color}" stroke="white"/>'


def _triangle(x: float, y: float, color: str) -> str:
    return (
        f'<path d="M{x - 6:.1f},{y - 11:.1f} L{x + 6:.1f},{y - 11:.1f} L{x:.1f},{y:.1f} Z" '
        f'fill="{color}" stroke="white"/>'
    )


def _square(x: float, y: float, color: str, size: float = 10) -> str:
    return (
        f'<rect x="{x - size / 2:.1f}" y="{y - size / 2:.1f}" width="{size}" height="{size}" '
        f'fill="{color}" stroke="white"/>'
    )
