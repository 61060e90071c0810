"""The status page at ``GET /``: what ``Relay.status()`` says, as one HTML page for people.

A pure function of the status dict: server-rendered HTML5, inline CSS, no script and no
external asset (it works on a host without internet, and without JavaScript), reloaded by
the browser every ``refresh_s`` seconds. Every value from the dict goes through
``html.escape``: HELO names, suspension reasons and receiver replies come from config files
and from remote servers.

Numbers a program may want to read off the page carry ``data-field`` attributes inside the
element of their IP (``data-ip``); ``/status`` stays the interface for programs.
"""

from __future__ import annotations

import html
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any

REFRESH_S = 15

# role (from status()) -> (label, badge colour class)
ROLES: dict[str, tuple[str, str]] = {
    "warming": ("warming", "warn"),
    "not_started": ("not started", "muted"),
    "paused": ("paused", "bad"),
    "completed": ("completed (warm)", "ok"),
    "finished": ("schedule done (warm)", "ok"),
    "pool": ("warm pool", "ok"),
}

CSS = """
:root{--bg:#f5f6f8;--card:#fff;--ink:#1d2330;--muted:#667085;--line:#e3e6ec;
--ok:#1a7f37;--warn:#9a6700;--bad:#c62828;--accent:#3457d5}
*{box-sizing:border-box}
body{margin:0;background:var(--bg);color:var(--ink);
font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif}
header{background:#1d2330;color:#fff;padding:14px 24px}
header h1{margin:0;font-size:20px}
header .meta{margin:4px 0 0;color:#c9cfdb}
main{padding:16px 24px;max-width:1400px}
h2{font-size:16px;margin:22px 0 10px}
.ips{display:grid;grid-template-columns:repeat(auto-fit,minmax(min(100%,290px),1fr));gap:14px}
.card{background:var(--card);border:1px solid var(--line);border-radius:8px;padding:14px 16px;
min-width:0}
.card h3{margin:0 0 2px;font-size:16px;display:flex;gap:8px;align-items:center;flex-wrap:wrap}
.helo{color:var(--muted);margin:0 0 8px;word-break:break-all}
.badge{display:inline-block;font-size:12px;font-weight:600;padding:1px 8px;border-radius:10px;
border:1px solid currentColor}
.ok{color:var(--ok)}.warn{color:var(--warn)}.bad{color:var(--bad)}.muted{color:var(--muted)}
.day{margin:6px 0 2px}
progress{width:100%;height:10px;accent-color:var(--accent)}
.counts{display:grid;grid-template-columns:repeat(auto-fit,minmax(105px,1fr));gap:8px;
margin:10px 0 4px}
.counts div{background:var(--bg);border-radius:6px;padding:6px 8px}
.counts dt{color:var(--muted);font-size:12px}
.counts dd{margin:0;font-size:20px;font-weight:600;font-variant-numeric:tabular-nums}
.bar{position:relative;height:8px;background:var(--line);border-radius:4px;overflow:hidden;
margin:4px 0 10px}
.bar .released{position:absolute;inset:0 auto 0 0;background:#c7d2f5}
.bar .sent{position:absolute;inset:0 auto 0 0;background:var(--accent)}
table{border-collapse:collapse;width:100%;margin:6px 0 10px;font-size:13px}
th,td{text-align:left;padding:4px 6px;border-bottom:1px solid var(--line);vertical-align:top}
th{color:var(--muted);font-weight:600}
ul.suspensions{list-style:none;padding:6px 8px;margin:6px 0 10px;background:#fdecea;
border-radius:6px}
ul.suspensions li+li{margin-top:6px}
ul.checks{list-style:none;padding:0;margin:2px 0 8px;display:flex;flex-wrap:wrap;gap:4px}
ul.issues{list-style:none;padding:0;margin:2px 0 8px}
ul.issues li+li{margin-top:4px}
td.n,th.n{text-align:right;font-variant-numeric:tabular-nums}
.note{color:var(--muted);margin:4px 0}
.today{margin:4px 0}
.scroll{overflow-x:auto}
code,.reply{font-family:ui-monospace,"DejaVu Sans Mono",monospace;font-size:12px;
overflow-wrap:break-word}
.shared{background:var(--card);border:1px solid var(--line);border-radius:8px;
padding:8px 16px;margin:14px 0 0}
section.wide{background:var(--card);border:1px solid var(--line);border-radius:8px;
padding:6px 16px 10px;margin-top:14px}
footer{padding:10px 24px 24px;color:var(--muted)}
footer a{color:var(--accent)}
"""


def e(value: object) -> str:
    """Escaped text of any value (None: an em dash)."""
    return "\u2014" if value is None else html.escape(str(value), quote=True)


def _when(text: object) -> str:
    """An ISO timestamp or date as a <time> element, shown shorter (no microseconds)."""
    if not isinstance(text, str) or not text:
        return e(text)
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return e(text)
    if "T" not in text:
        shown = moment.date().isoformat()
    else:
        zone = moment.tzname() or ""
        shown = moment.strftime("%Y-%m-%d %H:%M:%S") + (f" {zone}" if zone else "")
    return f'<time datetime="{e(text)}">{e(shown)}</time>'


def _clock(text: object) -> str:
    """An ISO timestamp of today as a <time> element showing the time of day only."""
    try:
        moment = datetime.fromisoformat(str(text))
    except ValueError:
        return e(text)
    zone = moment.tzname() or ""
    shown = moment.strftime("%H:%M:%S") + (f" {zone}" if zone else "")
    return f'<time datetime="{e(text)}">{e(shown)}</time>'


def _in(until: object, now: object) -> str:
    """The text ' (in 1 h 5 min)' from ``now`` to ``until``, both ISO timestamps; "" if unknown."""
    try:
        seconds = (
            datetime.fromisoformat(str(until)) - datetime.fromisoformat(str(now))
        ).total_seconds()
    except (TypeError, ValueError):
        return ""
    if seconds <= 0:
        return ""
    minutes = int(seconds // 60)
    if minutes < 1:
        return " (in &lt;1 min)"
    hours, minutes = divmod(minutes, 60)
    return f" (in {hours} h {minutes} min)" if hours else f" (in {minutes} min)"


def _num(value: object, field: str) -> str:
    return f'<dd data-field="{field}">{e(value)}</dd>'


def _pct(part: object, whole: object) -> float:
    if not isinstance(part, int | float) or not isinstance(whole, int | float) or whole <= 0:
        return 0.0
    return max(0.0, min(100.0, 100.0 * part / whole))


def _table(head: Iterable[str], rows: Iterable[Iterable[str]], cls: str, numeric: int = 0) -> str:
    """A table of already-escaped cells; the last ``numeric`` columns are right-aligned."""
    names = list(head)
    first_n = len(names) - numeric

    def cells(tag: str, values: Iterable[str]) -> str:
        return "".join(
            f'<{tag} class="n">{v}</{tag}>' if i >= first_n else f"<{tag}>{v}</{tag}>"
            for i, v in enumerate(values)
        )

    body = "".join(f"<tr>{cells('td', row)}</tr>" for row in rows)
    head_row = f"<thead><tr>{cells('th', names)}</tr></thead>"
    return f'<table class="{cls}">{head_row}<tbody>{body}</tbody></table>'


# -- one IP --------------------------------------------------------------------------------


def _warmup(ip: Mapping[str, Any]) -> str:
    role, day, days = ip.get("role"), ip.get("warmup_day"), ip.get("schedule_days")
    if role == "pool" or day is None:
        return '<p class="day note">No warmup: a warm pool IP, no daily cap.</p>'
    if role == "completed":  # the operator's word: the day no longer means anything
        return (
            '<p class="day">Warmup complete: warm, no daily cap</p>'
            '<progress data-field="progress" max="1" value="1">done</progress>'
        )
    out = []
    if role == "finished":
        out.append(
            f'<p class="day">Schedule done on day <b data-field="days">{e(days)}</b>: '
            f'warm, no daily cap (day <span data-field="day">{e(day)}</span>)</p>'
        )
    elif isinstance(day, int) and day < 1 and role != "paused":
        wait = 1 - day
        out.append(
            f'<p class="day">Warmup starts in <b>{wait}</b> day{"s" if wait != 1 else ""} '
            f'(day <span data-field="day">{e(day)}</span> of '
            f'<span data-field="days">{e(days)}</span>)</p>'
        )
    else:
        out.append(
            f'<p class="day">Warmup day <b data-field="day">{e(day)}</b> of '
            f'<b data-field="days">{e(days)}</b></p>'
        )
    if isinstance(day, int) and isinstance(days, int) and days > 0:
        value = max(0, min(day, days))
        out.append(
            f'<progress data-field="progress" max="{days}" value="{value}">'
            f"{value}/{days}</progress>"
        )
    return "".join(out)


def _box(label: str, value: object, field: str) -> str:
    return f"<div><dt>{label}</dt>{_num(value, field)}</div>"


def _routed(ip: Mapping[str, Any]) -> str:
    """What an IP in the pool carried today: all of it, and how much was overflow (recipients
    a warming IP refused) beside its own pool traffic ("" before /status had the numbers)."""
    routed = ip.get("routed_today")
    if not isinstance(routed, Mapping):
        return ""
    total = sum(n for n in routed.values() if isinstance(n, int))
    return (
        _box("Routed today", total, "routed")
        + _box("Overflow taken", routed.get("overflow", 0), "routed-overflow")
        + _box("Pool traffic", routed.get("pool", 0), "routed-pool")
    )


def _counts(ip: Mapping[str, Any]) -> str:
    """The numbers of today: a warming IP's cap, what is released of it (only where
    smoothing releases it hour by hour), what it sent and what it refused (overflow); what
    an IP in the pool carried."""
    role = ip.get("role")
    if role == "pool" or ip.get("warmup_day") is None:
        routed = _routed(ip)
        return f'<dl class="counts">{routed}</dl>' if routed else ""
    if role in ("completed", "finished"):
        return f'<dl class="counts">{_box("Sent today", ip.get("sent"), "sent")}{_routed(ip)}</dl>'
    cap, released, sent = ip.get("cap"), ip.get("cap_now", ip.get("cap")), ip.get("sent")
    smoothing = isinstance(released, int) and released != cap
    overflow = ip.get("overflow_today")
    counts = (
        '<dl class="counts">'
        + _box("Today's cap", "no cap" if cap is None else cap, "cap")
        + (_box("Released so far", released, "cap_now") if smoothing else "")
        + _box("Sent today", sent, "sent")
        + (_box("Overflow today", overflow, "overflow") if isinstance(overflow, int) else "")
        + "</dl>"
    )
    if not isinstance(cap, int) or cap <= 0:
        return counts + _reached(ip)
    title = f"sent {e(sent)} of {e(cap)}" + (f", {e(released)} released" if smoothing else "")
    return (
        counts
        + f'<div class="bar" title="{title}">'
        + (
            f'<span class="released" style="width:{_pct(released, cap):.1f}%"></span>'
            if smoothing
            else ""
        )
        + f'<span class="sent" style="width:{_pct(sent, cap):.1f}%"></span></div>'
        + _reached(ip)
    )


def _reached(ip: Mapping[str, Any]) -> str:
    """Whether and when the day's cap was reached, and why mail went elsewhere today."""
    out = []
    if ip.get("cap_reached"):
        at = ip.get("cap_reached_at")
        cap, sent = ip.get("cap"), ip.get("sent")
        full = isinstance(cap, int) and isinstance(sent, int) and sent >= cap
        when = (
            f" at {_clock(at)}" + (": it takes no more mail today" if full else "")
            if at
            else f" (sent {e(sent)} of {e(cap)}; when is not known: "
            "before this relay started counting)"
        )
        out.append(
            f'<p class="today"><b class="bad" data-field="cap-reached" '
            f'data-at="{e(at or "")}">Cap reached</b>{when}.</p>'
        )
    reasons = ip.get("overflow_today_reasons")
    if isinstance(reasons, Mapping) and reasons:
        why = ", ".join(
            f'{e(k)} <b data-field="overflow-{e(str(k).replace(" ", "-"))}">{e(v)}</b>'
            for k, v in reasons.items()
        )
        out.append(f'<p class="note">Overflow today by reason: {why}.</p>')
    return "".join(out)


def _providers(ip: Mapping[str, Any]) -> str:
    """Per provider: its cap, what is released of it (with smoothing only), what was sent,
    and when its cap was first reached today."""
    providers = ip.get("providers")
    if not isinstance(providers, Mapping) or not providers:
        return ""
    known = [p for p in providers.values() if isinstance(p, Mapping)]
    smoothing = any(p.get("cap_now") != p.get("cap") for p in known)
    times = ip.get("provider_caps_reached_at")
    at = times if isinstance(times, Mapping) else {}
    reached = any(at.values())
    rows = [
        [
            e(name),
            f'<span data-field="provider-cap">{e(p.get("cap"))}</span>',
            *([f'<span data-field="provider-cap_now">{e(p.get("cap_now"))}</span>'] * smoothing),
            f'<span data-field="provider-sent">{e(p.get("sent"))}</span>',
            *([_clock(at[name]) if at.get(name) else ""] * reached),
        ]
        for name, p in providers.items()
        if isinstance(p, Mapping)
    ]
    head = ["Provider", "Cap today", *(["Released"] * smoothing), "Sent"]
    head += ["Cap first reached"] * reached
    return _table(head, rows, "providers", numeric=len(head) - 1)


def _suspensions(ip: Mapping[str, Any], now: object) -> str:
    suspended = ip.get("suspended")
    if not isinstance(suspended, Mapping) or not suspended:
        return ""
    items = "".join(
        f'<li data-provider="{e(provider)}"><b class="bad">{e(provider)}</b>: suspended until '
        f"{_when(s.get('until'))}{_in(s.get('until'), now)}"
        f'<br><span class="reply">{e(s.get("reason"))}</span></li>'
        for provider, s in suspended.items()
        if isinstance(s, Mapping)
    )
    return f'<ul class="suspensions">{items}</ul>'


def _since(ip: Mapping[str, Any]) -> str:
    out = []
    if ip.get("paused_since"):
        out.append(
            f'<p class="note paused">Paused since {_when(ip["paused_since"])}: '
            "sends nothing, does not advance.</p>"
        )
    if ip.get("completed"):
        since = ip.get("completed_since")
        when = f" since {_when(since)}" if since else ""
        out.append(f'<p class="note completed">Warmup completed by the operator{when}.</p>')
    if ip.get("up") is False:
        out.append(
            '<p class="note bad">Down: this address cannot be bound on this host; '
            "its mail leaves from the other IPs.</p>"
        )
    return "".join(out)


_RESULT = {"pass": "ok", "fail": "bad"}


def _result(outcome: object) -> str:
    cls = _RESULT.get(str(outcome), "muted")
    return f'<span class="badge {cls}">{e(outcome)}</span>'


def _checks(checks: Iterable[Mapping[str, Any]], cls: str, subject: bool = False) -> str:
    rows = [
        [
            *([e(c.get("subject"))] if subject else []),
            e(c.get("check")),
            _result(c.get("result")),
            f'<span class="reply">{e(c.get("reason"))}</span>',
        ]
        for c in checks
    ]
    head = [*(["Subject"] if subject else []), "Preflight check", "Result", "Reason"]
    return f'<div class="scroll">{_table(head, rows, cls)}</div>' if rows else ""


# (result, reason with the IP's address as "the IP") -> the checks, and one reason as given
Issues = dict[tuple[str, str], tuple[list[str], str]]


def _issues(checks: Iterable[Mapping[str, Any]], address: str) -> Issues:
    """An IP's checks that did not pass, grouped by what they say: six checks unknown for
    one reason are one line, and the same reason for several IPs can be told once."""
    groups: Issues = {}
    for c in checks:
        if c.get("result") == "pass":
            continue
        reason = str(c.get("reason") or "")
        key = (str(c.get("result")), reason.replace(address, "the IP") if address else reason)
        groups.setdefault(key, ([], reason))[0].append(str(c.get("check")))
    return groups


def _issue(result: str, names: Iterable[str], reason: str) -> str:
    """One line for the checks that say the same: their names once, then the reason."""
    return (
        f'<li>{_result(result)} <span class="checks-named">{e(", ".join(names))}</span>: '
        f"{e(reason)}</li>"
    )


def _chips(checks: list[Mapping[str, Any]], issues: Issues) -> str:
    """An IP's preflight checks on one line (each reason as its tooltip); below it, those
    that did not pass, one line per reason (``issues``: what is not told once for all IPs):
    what needs a look stands out."""
    if not checks:
        return ""
    chips = "".join(
        f'<li class="badge {_RESULT.get(str(c.get("result")), "muted")}" '
        f'data-check="{e(c.get("check"))}" data-result="{e(c.get("result"))}" '
        f'title="{e(c.get("reason"))}">{e(c.get("check"))}</li>'
        for c in checks
    )
    lines = "".join(
        _issue(result, names, reason) for (result, _), (names, reason) in issues.items()
    )
    return f'<p class="note">Preflight</p><ul class="checks">{chips}</ul>' + (
        f'<ul class="issues preflight">{lines}</ul>' if lines else ""
    )


def _shared(per_ip: Mapping[str, Issues]) -> tuple[str, set[tuple[str, str]]]:
    """Reasons that several IPs share (e.g. "not a public address" for every loopback IP):
    one note below the cards, and the keys the cards then leave out."""
    seen: dict[tuple[str, str], list[str]] = {}
    for address, groups in per_ip.items():
        for key in groups:
            seen.setdefault(key, []).append(address)
    shared = {key for key, addresses in seen.items() if len(addresses) > 1}
    lines = []
    for key in sorted(shared, key=list(seen).index):
        result, generic = key
        names = dict.fromkeys(n for a in seen[key] for n in per_ip[a][key][0])
        lines.append(
            f"<li>{_result(result)} {e(' and '.join(seen[key]))} \u00b7 "
            f'<span class="checks-named">{e(", ".join(names))}</span>: '
            f"{e(generic[:1].upper() + generic[1:])}</li>"
        )
    if not lines:
        return "", shared
    note = (
        '<div class="shared" id="preflight-shared"><p class="note">Preflight, the same for '
        f'several IPs</p><ul class="issues">{"".join(lines)}</ul></div>'
    )
    return note, shared


def _rate(value: object) -> str:
    return f"{value * 100:.2f} %" if isinstance(value, int | float) else "\u2013"


def _feedback(ip: Mapping[str, Any]) -> str:
    """What came back after the handover, per provider (bounces: configured): hard bounces
    and complaints over what this IP handed over, today and over 7 days."""
    feedback = ip.get("feedback")
    if not isinstance(feedback, Mapping) or not feedback:
        return ""
    rows = []
    for name, spans in feedback.items():
        if not isinstance(spans, Mapping):
            continue
        today = spans.get("today") if isinstance(spans.get("today"), Mapping) else {}
        week = spans.get("week") if isinstance(spans.get("week"), Mapping) else {}
        assert isinstance(today, Mapping) and isinstance(week, Mapping)
        rows.append(
            [
                e(name),
                e(week.get("handed", 0)),
                f'<span data-field="hard-rate">{_rate(week.get("hard_rate"))}</span>',
                f'<span data-field="complaint-rate">{_rate(week.get("complaint_rate"))}</span>',
                f"{e(today.get('hard', 0))} / {e(today.get('complaints', 0))}",
            ]
        )
    head = ["Came back", "Handed over (7 d)", "Hard bounces", "Complaints", "Today (b / c)"]
    return _table(head, rows, "feedback", numeric=4)


def _pairs(ip: Mapping[str, Any]) -> str:
    """progress: reputation: per provider its own day and cap, the controller's last
    decision with its reason, and the signal values it used."""
    pairs = ip.get("pairs")
    if not isinstance(pairs, Mapping) or not pairs:
        return ""
    rows = []
    for name, pair in pairs.items():
        if not isinstance(pair, Mapping):
            continue
        last = pair.get("last") if isinstance(pair.get("last"), Mapping) else None
        decision = f"{e(last.get('action'))}: {e(last.get('reason'))}" if last else "\u2013"
        if pair.get("paused_since"):
            decision = (
                f'<span class="bad">paused since {e(pair["paused_since"])}</span> ' + decision
            )
        rows.append(
            [
                e(name),
                f'<span data-field="pair-day">{e(pair.get("day"))}</span>',
                e(pair.get("cap")) if pair.get("cap") is not None else "warm",
                f'<span data-field="pair-decision">{decision}</span>',
                f'<span data-field="pair-signals">{_signals(last)}</span>',
            ]
        )
    return _table(["Provider", "Day", "Cap", "Last decision", "Signals"], rows, "pairs", numeric=0)


def _signals(last: Mapping[str, Any] | None) -> str:
    """The values a decision used: rates as percentages, feed labels as they are."""
    values = last.get("values") if last else None
    if not isinstance(values, Mapping) or not values:
        return "\u2013"
    shown = []
    for name, value in sorted(values.items()):
        if isinstance(value, int | float) and not isinstance(value, bool):
            text = f"{value * 100:.2g} %" if value < 0.01 else f"{value * 100:.1f} %"
        else:
            text = str(value)
        shown.append(f"{e(str(name).replace('_', ' '))} {e(text)}")
    return ", ".join(shown)


def _ip(ip: Mapping[str, Any], now: object, checks: list[Mapping[str, Any]], issues: Issues) -> str:
    address = str(ip.get("address", ""))
    label, colour = ROLES.get(str(ip.get("role")), (str(ip.get("role") or ip.get("state")), ""))
    down = '<span class="badge bad">down</span>' if ip.get("up") is False else ""
    if ip.get("cap_reached"):
        down += '<span class="badge bad">cap reached</span>'
    return (
        f'<article class="card ip" id="ip-{e(address)}" data-ip="{e(address)}" '
        f'data-role="{e(ip.get("role"))}">'
        f'<h3><span class="address">{e(address)}</span>'
        f'<span class="badge role {colour}">{e(label)}</span>{down}</h3>'
        f'<p class="helo">EHLO <span data-field="helo">{e(ip.get("helo"))}</span></p>'
        + _warmup(ip)
        + _counts(ip)
        + _since(ip)
        + _providers(ip)
        + _pairs(ip)
        + _feedback(ip)
        + _suspensions(ip, now)
        + _chips(checks, issues)
        + "</article>"
    )


# -- the rest of the page ------------------------------------------------------------------


def _queue(status: Mapping[str, Any]) -> str:
    """Counts (the scheduler's ready/deferred, the summary's messages, recipients and oldest
    age), messages by state, then the qshape table: pending recipients per destination
    domain and age bucket (what `warmrelay queue summary` prints)."""
    spool = status.get("spool") if isinstance(status.get("spool"), Mapping) else {}
    queue = status.get("queue") if isinstance(status.get("queue"), Mapping) else {}
    assert isinstance(spool, Mapping) and isinstance(queue, Mapping)
    counts = {
        "messages": queue.get("messages", spool.get("messages")),
        "recipients": queue.get("recipients"),
        "ready": spool.get("ready"),
        "deferred": spool.get("deferred"),
        "oldest": _age(queue.get("oldest_age_s")),
    }
    cells = "".join(
        f"<div><dt>{e(k)}</dt>{_num(v, f'queue-{e(k)}')}</div>"
        for k, v in counts.items()
        if v is not None
    )
    parts = [f'<dl class="counts">{cells}</dl>']
    states = queue.get("states")
    if isinstance(states, Mapping) and any(states.values()):
        parts.append(
            '<p class="note">'
            + ", ".join(f"{e(k)} <b>{e(v)}</b>" for k, v in states.items() if v)
            + "</p>"
        )
    buckets, domains = queue.get("buckets"), queue.get("domains")
    if isinstance(buckets, list) and isinstance(domains, list) and domains:
        head = "".join(f'<th class="n">{e(b)}</th>' for b in buckets)
        rows = "".join(
            f'<tr data-domain="{e(d.get("domain"))}"><td>{e(d.get("domain"))}</td>'
            f'<td class="n">{e(d.get("total"))}</td>'
            + "".join(f'<td class="n">{e(c) if c else ""}</td>' for c in d.get("buckets", []))
            + "</tr>"
            for d in domains
            if isinstance(d, Mapping)
        )
        parts.append(
            '<div class="scroll"><table class="qshape" id="qshape"><thead><tr><th>domain</th>'
            f'<th class="n">total</th>{head}</tr></thead><tbody>{rows}</tbody></table></div>'
        )
    elif queue:
        parts.append('<p class="note">Nothing queued.</p>')
    return '<section class="wide queue" id="queue"><h2>Queue</h2>' + "".join(parts) + "</section>"


def _age(seconds: object) -> str | None:
    if not isinstance(seconds, int | float):
        return None
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _reasons(reasons: Any, now: object) -> str:
    if not isinstance(reasons, Mapping):
        return ""
    rows = []
    for provider, kinds in reasons.items():
        if not isinstance(kinds, Mapping):
            continue
        for kind, r in kinds.items():
            if not isinstance(r, Mapping):
                continue
            colour = "bad" if kind == "bounced" else "warn"
            rows.append(
                [
                    e(provider),
                    f'<span class="{colour}">{e(kind)}</span>',
                    _when(r.get("time")),
                    e(r.get("ip")),
                    f"<code>{e(r.get('queue_id'))}</code>",
                    f'<span class="reply">{e(r.get("reply"))}</span>',
                ]
            )
    table = (
        '<div class="scroll">'
        + _table(["Provider", "", "When", "From IP", "Queue id", "Reply"], rows, "reasons")
        + "</div>"
        if rows
        else '<p class="note">No deferral or bounce yet.</p>'
    )
    return (
        '<section class="wide reasons" id="reasons">'
        "<h2>Latest deferral and bounce reasons per provider</h2>" + table + "</section>"
    )


def _preflight(report: Any, addresses: set[str]) -> str:
    if report is None:
        return (
            '<section class="wide preflight" id="preflight"><h2>Preflight</h2>'
            '<p class="note">No results yet (GET /preflight runs the checks).</p></section>'
        )
    if not isinstance(report, Mapping):
        return ""
    counts = report.get("counts") or {}
    summary = (
        f'<p class="note">Finished {_when(report.get("finished"))}: '
        f'<span class="bad">{e(counts.get("fail", 0))} failed</span>, '
        f"{e(counts.get('unknown', 0))} unknown, "
        f'<span class="ok">{e(counts.get("pass", 0))} passed</span>'
        + (f"; paused: {e(', '.join(map(str, report['paused'])))}" if report.get("paused") else "")
        + ". IP checks are shown with each IP.</p>"
    )
    checks = [c for c in report.get("checks") or () if isinstance(c, Mapping)]
    others = [c for c in checks if c.get("subject") not in addresses]
    return (
        '<section class="wide preflight" id="preflight"><h2>Preflight</h2>'
        + summary
        + _checks(others, "preflight-domains", subject=True)
        + "</section>"
    )


def _today(today: object) -> str:
    """Which day "today" is, and when the numbers of today only count since this relay
    started (a restart today forgets what was routed before it)."""
    if not isinstance(today, Mapping):
        return ""
    since = today.get("counted_since")
    if not since:
        return ""
    return (
        f'<p class="note" data-field="counted-since" data-since="{e(since)}">Today\'s '
        f"({e(today.get('date'))}) routed and overflow numbers count since {_clock(since)}, "
        "when this relay started.</p>"
    )


def render(status: Mapping[str, Any], refresh_s: int = REFRESH_S) -> bytes:
    """The whole page, UTF-8."""
    now = status.get("time")
    ips = [ip for ip in status.get("ips") or () if isinstance(ip, Mapping)]
    report = status.get("preflight")
    checks: list[Mapping[str, Any]] = []
    if isinstance(report, Mapping):
        checks = [c for c in report.get("checks") or () if isinstance(c, Mapping)]
    counters = status.get("counters") or {}
    store = (
        f"{e(counters.get('backend'))} "
        + ('<span class="ok">up</span>' if counters.get("up") else '<span class="bad">DOWN</span>')
        if isinstance(counters, Mapping) and counters
        else ""
    )
    per_ip = {
        str(ip.get("address")): [c for c in checks if c.get("subject") == ip.get("address")]
        for ip in ips
    }
    issues = {a: _issues(mine, a) for a, mine in per_ip.items()}
    shared_note, shared = _shared(issues)
    cards = "".join(
        _ip(
            ip,
            now,
            per_ip[str(ip.get("address"))],
            {k: v for k, v in issues[str(ip.get("address"))].items() if k not in shared},
        )
        for ip in ips
    )
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f'<meta http-equiv="refresh" content="{int(refresh_s)}">',
        "<title>warmrelay status</title>",
        f"<style>{CSS}</style></head><body>",
        f'<header><h1>warmrelay <span class="version">{e(status.get("version"))}</span></h1>',
        f'<p class="meta">As of {_when(now)}'
        + (f" \u00b7 counters: {store}" if store else "")
        + f" \u00b7 refreshes every {int(refresh_s)} s</p></header>",
        "<main><h2>Sending IPs</h2>",
        _today(status.get("today")),
        f'<section class="ips">{cards}</section>',
        shared_note,
        _queue(status),
    ]
    if "reasons" in status:
        parts.append(_reasons(status["reasons"], now))
    if "preflight" in status:
        parts.append(_preflight(report, {str(ip.get("address")) for ip in ips}))
    parts.append(
        "</main><footer>For programs: "
        '<a href="/status">/status</a> (JSON) \u00b7 <a href="/metrics">/metrics</a> \u00b7 '
        '<a href="/preflight">/preflight</a> \u00b7 <a href="/healthz">/healthz</a></footer>'
        "</body></html>\n"
    )
    return "".join(parts).encode()
