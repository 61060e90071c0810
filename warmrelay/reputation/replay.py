"""Replay a file of daily signals through the warmup controller (``warmrelay simulate
--signals``): what ``progress: reputation`` would have done with them, day by day.

Pure: the CSV text comes in, rows come out. Each day is judged by the real controller
(``judge``) and each cap comes from the real plan (``caps_at``), so the replay shows the
relay's policy, not a copy of it.

The CSV: ``date,ip,provider,signal,value``, one value per line; a rate is a fraction
(``0.0024``) or a percentage (``0.24%``), ``snds_filter`` is GREEN, YELLOW or RED. A day
without a line for a pair is judged on nothing: healthy by absence, as a quiet feed is.
"""

from __future__ import annotations

import csv
import io
import ipaddress
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import date, datetime, time, timedelta
from decimal import Decimal, InvalidOperation
from typing import Any

from warmrelay.config import Config, IPConfig
from warmrelay.reputation.controller import LADDERS, PairState, judge
from warmrelay.reputation.signals import OTHER, Signals
from warmrelay.warmup.plan import WarmupPlan, caps_at, status_for_day
from warmrelay.warmup.providers import provider_map

COLUMNS = ("date", "ip", "provider", "signal", "value")
RATES: tuple[str, ...] = LADDERS  # the signals that are rates (each has its ladder)
SNDS = "snds_filter"
SIGNALS: tuple[str, ...] = (*RATES, SNDS)
SNDS_VALUES = ("GREEN", "YELLOW", "RED")
MAX_DAYS = 400  # the default replay: through the last date + TAIL_DAYS, never longer
TAIL_DAYS = 3  # after the last date: the days a pause needs to be seen recovering
_ISO_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")

Pair = tuple[str, str]  # (ip, provider)
SignalTable = dict[Pair, dict[date, Signals]]


class SignalsFileError(ValueError):
    """What is wrong with the file: (line, message) each, in file order."""

    def __init__(self, problems: Sequence[tuple[int, str]]) -> None:
        super().__init__("; ".join(f"line {n}: {m}" for n, m in problems))
        self.problems = list(problems)


@dataclass(frozen=True)
class ReplayRow:
    """One pair's day: its day and cap in force that day, and what the controller decided
    of it (the day and cap of the next day follow from the decision)."""

    date: date
    ip: str
    provider: str
    day: int
    cap: int | None  # None: past the schedule, warm; 0: paused, sends nothing
    action: str  # Decision.label: advance, hold, back N, pause
    reason: str
    values: Mapping[str, float | str] = field(default_factory=dict)  # the signals judged
    paused: bool = False  # the pair was paused on this day (before the decision)
    schedule_cap: int | None = None  # the cap had every day advanced (calendar)

    def to_json(self) -> dict[str, Any]:
        return {
            "date": self.date.isoformat(),
            "ip": self.ip,
            "provider": self.provider,
            "day": self.day,
            "cap": self.cap,
            "action": self.action,
            "reason": self.reason,
        }


# -- the file --------------------------------------------------------------------------------


def providers_of(config: Config) -> list[str]:
    """The provider labels a pair can have: the configured and built-in ones, "other"."""
    known = provider_map({n: (p.mx, p.domains) for n, p in config.providers.items()})
    return [*known.names, OTHER]


def parse_signals(text: str, config: Config) -> SignalTable:
    """The file's values per (ip, provider) and date, as the controller's ``Signals``
    (rates in ``given``, SNDS in ``feeds``); SignalsFileError lists every bad line."""
    warming = {str(ip.address): ip for ip in config.ips if ip.warmup is not None}
    others = {str(ip.address) for ip in config.ips if ip.warmup is None}
    providers = {p.lower(): p for p in providers_of(config)}
    problems: list[tuple[int, str]] = []
    found: dict[Pair, dict[date, dict[str, float | str]]] = {}
    seen: dict[tuple[Pair, date, str], int] = {}
    reader = csv.reader(io.StringIO(text.removeprefix("\ufeff")))
    header: list[str] | None = None
    for row in _rows(reader):
        line = reader.line_num
        if not any(cell.strip() for cell in row):
            continue
        cells = [cell.strip() for cell in row]
        if header is None:
            header = [c.lower() for c in cells]
            problem = _header_problem(header)
            if problem:
                raise SignalsFileError([(line, problem)])
            continue
        if len(cells) != len(COLUMNS):
            expected = f"expected {len(COLUMNS)}: {','.join(COLUMNS)}"
            problems.append((line, f"{len(cells)} field(s), {expected}"))
            continue
        values = dict(zip(header, cells, strict=True))
        try:
            on = _date(values["date"])
            ip = _ip(values["ip"], warming, others)
            provider = _provider(values["provider"], providers)
            signal, value = _signal(values["signal"], values["value"])
        except ValueError as exc:
            problems.append((line, str(exc)))
            continue
        key = ((ip, provider), on, signal)
        if key in seen:
            twice = f"{signal} of {ip} {provider} on {on} given twice"
            problems.append((line, f"{twice} (first on line {seen[key]})"))
            continue
        seen[key] = line
        found.setdefault((ip, provider), {}).setdefault(on, {})[signal] = value
    if header is None:
        raise SignalsFileError([(1, f"empty: expected the header {','.join(COLUMNS)}")])
    if problems:
        raise SignalsFileError(problems)
    if not found:
        raise SignalsFileError([(reader.line_num, "no signal lines after the header")])
    return {
        pair: {on: _as_signals(values) for on, values in sorted(days.items())}
        for pair, days in sorted(found.items())
    }


def _rows(reader: Any) -> Iterator[list[str]]:
    """The reader's rows; a line the csv module cannot split is a SignalsFileError."""
    try:
        yield from reader
    except csv.Error as exc:
        raise SignalsFileError([(reader.line_num, f"not CSV ({exc})")]) from None


def _header_problem(header: list[str]) -> str | None:
    unknown = [c for c in header if c not in COLUMNS]
    if unknown:
        return f"unknown column {unknown[0]!r} (the header is {','.join(COLUMNS)})"
    missing = [c for c in COLUMNS if c not in header]
    if missing:
        return f"no column {missing[0]!r} (the header is {','.join(COLUMNS)})"
    if len(header) != len(set(header)):
        return f"a column is named twice (the header is {','.join(COLUMNS)})"
    return None


def _date(text: str) -> date:
    if _ISO_DATE.fullmatch(text):
        try:
            return date.fromisoformat(text)
        except ValueError:
            pass
    raise ValueError(f"date {text!r} is not a date written YYYY-MM-DD")


def _ip(text: str, warming: Mapping[str, IPConfig], others: set[str]) -> str:
    try:
        address = str(ipaddress.ip_address(text))
    except ValueError:
        raise ValueError(f"ip {text!r} is not an IP address") from None
    if address in warming:
        return address
    if address in others:
        raise ValueError(f"ip {address} has no warmup block in the config: it is warm")
    known = ", ".join(warming) or "none"
    raise ValueError(f"ip {address} is not an IP of the config (warming: {known})")


def _provider(text: str, providers: Mapping[str, str]) -> str:
    found = providers.get(text.lower())
    if found is None:
        raise ValueError(f"provider {text!r} is unknown (known: {', '.join(providers.values())})")
    return found


def _signal(name: str, text: str) -> tuple[str, float | str]:
    name = name.lower()
    if name == SNDS:
        value = text.upper()
        if value not in SNDS_VALUES:
            raise ValueError(f"{SNDS} {text!r}: expected GREEN, YELLOW or RED")
        return name, value
    if name not in RATES:
        raise ValueError(f"unknown signal {name!r} (known: {', '.join(SIGNALS)})")
    return name, _rate(name, text)


def _rate(name: str, text: str) -> float:
    """'0.0024' or '0.24%' -> 0.0024 (decimal arithmetic: 0.1% is exactly the 0.001 of
    a ladder's limit)."""
    percent = text.endswith("%")
    try:
        value = Decimal(text.removesuffix("%").strip())
    except InvalidOperation:
        value = Decimal("NaN")
    if not value.is_finite():
        raise ValueError(f"{name} {text!r} is not a number (e.g. 0.0024 or 0.24%)")
    if percent:
        value /= 100
    if not 0 <= value <= 1:
        raise ValueError(f"{name} {text!r} is not a rate between 0 and 1 (0 % and 100 %)")
    return float(value)


def _as_signals(values: Mapping[str, float | str]) -> Signals:
    given = {k: float(v) for k, v in values.items() if k in RATES}
    feeds = {k: v for k, v in values.items() if k == SNDS}
    return Signals(feeds=feeds, given=given)


# -- the replay ------------------------------------------------------------------------------


def first_day(ip: IPConfig, signals: SignalTable) -> date:
    """Day 1 of the IP: its configured start, else its first date in the file."""
    assert ip.warmup is not None
    if ip.warmup.start is not None:
        return ip.warmup.start
    address = str(ip.address)
    return min(on for (a, _), days in signals.items() if a == address for on in days)


def span(ip: IPConfig, signals: SignalTable, days: int | None) -> tuple[date, int]:
    """The IP's replayed days: from its day 1, ``days`` of them (default: through the
    file's last date plus ``TAIL_DAYS``, at most ``MAX_DAYS``)."""
    start = first_day(ip, signals)
    if days is None:
        last = max(on for given in signals.values() for on in given)
        days = max(1, min(MAX_DAYS, (last - start).days + 1 + TAIL_DAYS))
    return start, days


def replay(config: Config, signals: SignalTable, days: int | None = None) -> list[ReplayRow]:
    """Every pair of the file, judged day by day over its IP's ``span``; rows by IP (in
    config order), provider and date."""
    t = config.reputation.thresholds
    rows: list[ReplayRow] = []
    for ip in _replayed(config, signals):
        assert ip.warmup is not None
        plan, address = ip.warmup.plan(), str(ip.address)
        start, length = span(ip, signals, days)
        for provider in sorted(p for a, p in signals if a == address):
            given = signals[(address, provider)]
            state = PairState(judged_to=start)
            for n in range(length):
                on = start + timedelta(days=n)
                paused = state.paused
                cap = 0 if paused else pair_cap(plan, config, provider, state.day, on)
                before = state.day
                state = judge(state, on, given.get(on, Signals()), provider, t)
                assert state.last is not None
                rows.append(
                    ReplayRow(
                        on,
                        address,
                        provider,
                        before,
                        cap,
                        state.last.label,
                        state.last.reason,
                        dict(state.last.values),
                        paused,
                        pair_cap(plan, config, provider, n + 1, on),
                    )
                )
    return rows


def pair_cap(plan: WarmupPlan, config: Config, provider: str, day: int, on: date) -> int | None:
    """The pair's day cap at its ``day`` (None: past the schedule, warm): what the router
    enforces (``caps_at`` with a provider day), over the whole day (sending hours only
    spread it)."""
    if day > plan.schedule.days:
        return None
    zone = config.zone
    status = status_for_day(plan.schedule, day, on)
    whole_day = replace(plan, sending_hours=None)
    noon = datetime.combine(on, time(12), tzinfo=zone)
    caps = caps_at(whole_day, zone, noon, provider, status, day, provider)
    return next(lim.cap for lim in caps.limits if lim.scope == f"provider:{provider}")


def _replayed(config: Config, signals: SignalTable) -> list[IPConfig]:
    """The warming IPs the file has signals for, in config order."""
    ips = {a for a, _ in signals}
    return [ip for ip in config.ips if ip.warmup is not None and str(ip.address) in ips]


def notes(config: Config, signals: SignalTable, days: int | None = None) -> list[str]:
    """What the table's reader should know per IP: its schedule and day 1, a configured
    progress other than reputation, file lines the replay does not reach."""
    lines = []
    for ip in config.ips:
        if ip.warmup is None:
            continue
        address, w = str(ip.address), ip.warmup
        if not any(a == address for a, _ in signals):
            lines.append(f"{address}: no signals in the file, not replayed")
            continue
        start, length = span(ip, signals, days)
        begins = f"start {start}" if w.start else f"no start: from its first date, {start}"
        providers = sorted(p for a, p in signals if a == address)
        line = (
            f"{address}: schedule {w.schedule.name} ({w.schedule.days} days), {begins}, "
            f"{length} days replayed, providers {', '.join(providers)}"
        )
        if w.progress != "reputation":
            line += f"; its progress is {w.progress}: the rows show what reputation would do"
        lines.append(line)
        end = start + timedelta(days=length)
        outside = sorted(
            {
                on
                for (a, _), given in signals.items()
                if a == address
                for on in given
                if not start <= on < end
            }
        )
        if outside:
            lines.append(
                f"{address}: {len(outside)} date(s) of the file outside the replay "
                f"({outside[0]}...): not judged"
            )
    return lines


def table(rows: Sequence[ReplayRow]) -> str:
    """The rows as aligned text, one per pair and day."""
    head = ("date", "ip", "provider", "day", "cap", "action", "reason")
    lines = [head]
    for r in rows:
        cap = "warm" if r.cap is None else f"{r.cap:,}"
        lines.append((r.date.isoformat(), r.ip, r.provider, str(r.day), cap, r.action, r.reason))
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    right = {3, 4}
    return "\n".join(
        "  ".join(
            c.rjust(w) if i in right else c.ljust(w)
            for i, (c, w) in enumerate(zip(line, widths, strict=True))
        ).rstrip()
        for line in lines
    )
