"""What the queue tools show: one view per queued message, filters, and a qshape summary.

Pure functions over plain data, so the running relay (scheduler state: next retry,
router holds, replies) and the offline tools (the spool alone) render the same way.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from warmrelay.queue.messages import PastAttempt


class QueueState(enum.StrEnum):
    """Where a message stands (the most urgent of its deliveries: active first)."""

    ACTIVE = "active"  # due now, routing, waiting for a connection or being sent
    DEFERRED = "deferred"  # waits for its next retry (``next_retry``)
    HELD = "held"  # the router holds it: no IP may take it before ``held_until``
    ON_HOLD = "on-hold"  # an operator holds it (`warmrelay queue hold`) until released
    QUEUED = "queued"  # offline: no relay runs, so nothing is scheduled


def attempt_json(a: PastAttempt) -> dict[str, Any]:
    return {"at": _iso(a.at), "ip": a.ip, "result": a.disposition, "reply": a.reply}


@dataclass(frozen=True)
class RecipientView:
    address: str
    status: str  # pending, or the final disposition
    attempts: tuple[PastAttempt, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "address": self.address,
            "status": self.status,
            "attempts": [attempt_json(a) for a in self.attempts],
        }


@dataclass(frozen=True)
class MessageView:
    queue_id: str
    mail_from: str
    received_at: float
    size: int
    state: QueueState
    recipients: tuple[RecipientView, ...]
    attempts: int = 0
    next_retry: float | None = None
    held_until: float | None = None
    last_ip: str | None = None
    last_reply: str | None = None
    worker: int | None = None
    headers: tuple[tuple[str, str], ...] = field(default=())

    @property
    def pending(self) -> list[RecipientView]:
        return [r for r in self.recipients if r.status == "pending"]

    @property
    def domains(self) -> list[str]:
        return sorted({r.address.rpartition("@")[2].lower() for r in self.pending})

    def age_s(self, now: float) -> float:
        return max(0.0, now - self.received_at)

    def to_json(self, now: float, detail: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = {
            "queue_id": self.queue_id,
            "from": self.mail_from,
            "received_at": _iso(self.received_at),
            "age_s": round(self.age_s(now), 1),
            "size": self.size,
            "state": self.state.value,
            "pending": [r.address for r in self.pending],
            "recipients": len(self.recipients),
            "domains": self.domains,
            "attempts": self.attempts,
            "next_retry": _iso(self.next_retry) if self.next_retry else None,
            "held_until": _iso(self.held_until) if self.held_until else None,
            "last_ip": self.last_ip,
            "last_reply": self.last_reply,
        }
        if self.worker is not None:
            out["worker"] = self.worker
        if detail:
            out["recipients"] = [r.to_json() for r in self.recipients]
            out["headers"] = [list(h) for h in self.headers]
        return out


@dataclass(frozen=True)
class Filter:
    """`queue list` filters; every given one must match."""

    domain: str | None = None  # a pending recipient at this domain
    ip: str | None = None  # last tried from this source IP
    state: QueueState | None = None
    min_age_s: float | None = None

    @classmethod
    def from_query(cls, query: dict[str, str]) -> Filter:
        """From the admin API's query string; ValueError names the bad parameter."""
        state = query.get("state")
        try:
            parsed_state = QueueState(state) if state else None
        except ValueError:
            names = ", ".join(s.value for s in QueueState)
            raise ValueError(f"state={state!r}: one of {names}") from None
        age = query.get("min_age_s")
        try:
            min_age = float(age) if age else None
        except ValueError:
            raise ValueError(f"min_age_s={age!r}: a number of seconds") from None
        return cls(query.get("domain") or None, query.get("ip") or None, parsed_state, min_age)

    def matches(self, view: MessageView, now: float) -> bool:
        if self.domain is not None and self.domain.lower() not in view.domains:
            return False
        if self.ip is not None and view.last_ip != self.ip:
            return False
        if self.state is not None and view.state is not self.state:
            return False
        return self.min_age_s is None or view.age_s(now) >= self.min_age_s


@dataclass
class ActionResult:
    """What a queue action did: the messages it changed, those it could not change (with
    why: nothing of them changed), and for flush the messages an operator holds, which it
    leaves alone."""

    queue_ids: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    left_on_hold: int = 0

    def to_json(self, action: str, asked: Sequence[str] = ()) -> dict[str, Any]:
        touched = set(self.queue_ids) | set(self.failed)
        return {
            "action": action,
            "count": len(self.queue_ids),
            "queue_ids": self.queue_ids,
            "not_done": [q for q in asked if q not in touched],
            "failed": self.failed,
            "left_on_hold": self.left_on_hold,
        }


def operator_bounce(reason: str) -> str:
    """The diagnostic a sender reads in the DSN of `warmrelay queue bounce` (status 5.0.0:
    nothing the receiver said; the operator's decision), on one line, bounded."""
    return "Returned by the relay's operator: " + " ".join(reason.split())[:200]


# qshape's age buckets (minutes): how long mail has waited, per destination
BUCKETS_MIN = (5, 10, 20, 40, 80, 160, 320, 640, 1280)


def bucket_names() -> list[str]:
    return [f"<{m}m" for m in BUCKETS_MIN] + [f">={BUCKETS_MIN[-1]}m"]


def summary(views: Iterable[MessageView], now: float, top: int = 50) -> dict[str, Any]:
    """Pending recipients by destination domain and age bucket, as Postfix's qshape; the
    ``top`` domains with the most recipients first, the rest as "(other)"."""
    names = bucket_names()
    rows: dict[str, list[int]] = {}
    states: dict[str, int] = {s.value: 0 for s in QueueState}
    messages = 0
    oldest: float | None = None
    for view in views:
        messages += 1
        states[view.state.value] += 1
        age_min = view.age_s(now) / 60
        slot = next((i for i, m in enumerate(BUCKETS_MIN) if age_min < m), len(BUCKETS_MIN))
        oldest = view.received_at if oldest is None else min(oldest, view.received_at)
        for r in view.pending:
            row = rows.setdefault(r.address.rpartition("@")[2].lower(), [0] * len(names))
            row[slot] += 1
    ranked = sorted(rows.items(), key=lambda kv: (-sum(kv[1]), kv[0]))
    shown, rest = ranked[:top], ranked[top:]
    if rest:
        other = [sum(col) for col in zip(*(r for _, r in rest), strict=True)]
        shown.append(("(other)", other))
    total = [sum(col) for col in zip(*rows.values(), strict=True)] if rows else [0] * len(names)
    return {
        "messages": messages,
        "recipients": sum(total),
        "states": states,
        "oldest_age_s": round(now - oldest, 1) if oldest is not None else None,
        "buckets": names,
        "total": total,
        "domains": [{"domain": d, "total": sum(r), "buckets": r} for d, r in shown],
    }


def merge_summaries(parts: Sequence[dict[str, Any]], top: int = 50) -> dict[str, Any]:
    """One summary from several processes' (``serve --workers``: a spool each)."""
    names = bucket_names()
    rows: dict[str, list[int]] = {}
    states: dict[str, int] = {s.value: 0 for s in QueueState}
    for part in parts:
        for state, count in part["states"].items():
            states[state] = states.get(state, 0) + count
        for d in part["domains"]:
            row = rows.setdefault(d["domain"], [0] * len(names))
            rows[d["domain"]] = [a + b for a, b in zip(row, d["buckets"], strict=True)]
    ranked = sorted(rows.items(), key=lambda kv: (-sum(kv[1]), kv[0]))
    shown, rest = ranked[:top], ranked[top:]
    if rest:
        shown.append(("(other)", [sum(col) for col in zip(*(r for _, r in rest), strict=True)]))
    ages = [p["oldest_age_s"] for p in parts if p["oldest_age_s"] is not None]
    total = [sum(col) for col in zip(*(p["total"] for p in parts), strict=True)]
    return {
        "messages": sum(p["messages"] for p in parts),
        "recipients": sum(p["recipients"] for p in parts),
        "states": states,
        "oldest_age_s": max(ages, default=None),
        "buckets": names,
        "total": total or [0] * len(names),
        "domains": [{"domain": d, "total": sum(r), "buckets": r} for d, r in shown],
    }


def format_summary(s: dict[str, Any]) -> str:
    """The qshape table for a terminal."""
    names: Sequence[str] = s["buckets"]
    width = max([6, *(len(d["domain"]) for d in s["domains"])])
    head = f"{'domain':<{width}} {'total':>6} " + " ".join(f"{n:>6}" for n in names)
    lines = [head, f"{'TOTAL':<{width}} {sum(s['total']):>6} " + _cells(s["total"])]
    for d in s["domains"]:
        lines.append(f"{d['domain']:<{width}} {d['total']:>6} " + _cells(d["buckets"]))
    states = ", ".join(f"{n} {c}" for n, c in s["states"].items() if c)
    lines.append(f"{s['messages']} message(s): {states or 'none'}")
    return "\n".join(lines)


def _cells(values: Sequence[int]) -> str:
    return " ".join(f"{v:>6}" for v in values)


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds")
