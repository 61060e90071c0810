"""What a preflight run found, and how it is told: the result types (``Outcome``,
``Check``, ``Report``), the JSON of ``--json`` and ``GET /preflight``, the table for
people, and one note per kind of skipped check.

Kept apart from the checks so that the command line, the relay's log lines, metrics and
status page all read the same results the same way, and so that one subject skipped for
one reason is said once, not once per check.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from warmrelay.mail.preflight.dns import DnsStats


class Outcome(enum.Enum):
    """What a check found. Unknown (no answer, a refused query) never fails a run:
    only what is known to hurt delivery does."""

    PASS = "pass"
    FAIL = "fail"
    UNKNOWN = "unknown"

    @property
    def gauge(self) -> int | None:
        """The value of warmrelay_preflight_ok: 1 pass, 0 fail; None (unknown): no series,
        warmrelay_preflight_unknown says so instead."""
        return {Outcome.PASS: 1, Outcome.FAIL: 0, Outcome.UNKNOWN: None}[self]


class Skip(enum.Enum):
    """Why a check was not made at all (its subject means nothing to public DNS). The
    operator needs that once per run, not once per check: ``Report.notes``."""

    NOT_PUBLIC = ("is not a public address", "are not public addresses")
    SPECIAL_USE = (
        "is under a special-use top-level domain",
        "are under special-use top-level domains",
    )

    def says(self, subjects: Sequence[str]) -> str:
        one, many = self.value
        return f"{subjects[0]} {one}" if len(subjects) == 1 else f"{', '.join(subjects)} {many}"


@dataclass(frozen=True)
class Check:
    """One check of one subject (an IP address or a signing domain), with its reason.

    ``check`` names: ``bind``, ``ptr``, ``helo``, ``fcrdns``, ``dnsbl:ZONE`` (per IP);
    ``spf:IP``, ``dkim:SELECTOR``, ``dmarc`` (per signing domain). ``skip``: the check was
    not made (unknown) because of what its subject is, not because DNS did not answer."""

    subject: str
    check: str
    outcome: Outcome
    reason: str
    skip: Skip | None = None

    @classmethod
    def skipped(cls, subject: str, check: str, skip: Skip) -> Check:
        """The check not made because of what its subject is (unknown, with the skip)."""
        return cls(
            subject,
            check,
            Outcome.UNKNOWN,
            f"{skip.says([subject])}: not looked up in public DNS (set dns.nameservers to "
            "ask your own)",
            skip,
        )

    def to_json(self) -> dict[str, str]:
        return {
            "subject": self.subject,
            "check": self.check,
            "result": self.outcome.value,
            "reason": self.reason,
        }


# how the notes name a check: "PTR, helo, FCrDNS and DNSBL checks skipped"
_FAMILIES = {
    "ptr": "PTR",
    "helo": "helo",
    "fcrdns": "FCrDNS",
    "dnsbl": "DNSBL",
    "spf": "SPF",
    "dkim": "DKIM",
    "dmarc": "DMARC",
}


def _and(words: Sequence[str]) -> str:
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} and {words[-1]}"


def skip_notes(checks: Sequence[Check]) -> list[str]:
    """One line per kind of skip, naming every subject and the checks skipped for it; the
    checks' own rows say the same thing a dozen times."""
    subjects: dict[Skip, dict[str, None]] = {}
    families: dict[Skip, dict[str, None]] = {}
    for c in checks:
        if c.skip is not None:
            subjects.setdefault(c.skip, {})[c.subject] = None
            family = c.check.partition(":")[0]
            families.setdefault(c.skip, {})[_FAMILIES.get(family, family)] = None
    notes = []
    for skip, names in subjects.items():
        them = "it" if len(names) == 1 else "them"
        notes.append(
            f"{skip.says(list(names))}: {_and(list(families[skip]))} checks skipped (public "
            f"DNS knows nothing of {them}; set dns.nameservers to ask your own)"
        )
    return notes


@dataclass(frozen=True)
class Report:
    """The results of one run. Every failed check hurts delivery (a receiver would hold it
    against the IP or the domain); ``ok`` is false as soon as one failed, or when no DNS
    answer arrived at all (nothing in DNS was checked: ``unchecked`` says why)."""

    started: datetime
    finished: datetime
    checks: tuple[Check, ...]
    paused: tuple[str, ...] = ()  # warming IPs this run paused (the relay only)
    dns: DnsStats | None = None

    @property
    def ok(self) -> bool:
        return not self.failed and self.unchecked is None

    @property
    def failed(self) -> list[Check]:
        return [c for c in self.checks if c.outcome is Outcome.FAIL]

    @property
    def unchecked(self) -> str | None:
        return None if self.dns is None else self.dns.error

    def counts(self) -> dict[str, int]:
        return {o.value: sum(c.outcome is o for c in self.checks) for o in Outcome}

    def notes(self) -> list[str]:
        return skip_notes(self.checks)

    def shown(self) -> list[Check]:
        """The checks worth a row (or a log line) of their own: not the skipped ones (a note
        says it once), nor, when no DNS answer arrived at all, every "no answer" (one line
        says it)."""
        return [
            c
            for c in self.checks
            if c.skip is None and not (self.unchecked and c.outcome is Outcome.UNKNOWN)
        ]

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "started": self.started.isoformat(),
            "finished": self.finished.isoformat(),
            "counts": self.counts(),
            "checks": [c.to_json() for c in self.checks],
            "paused": list(self.paused),
            "dns": None if self.dns is None else self.dns.to_json(),
        }

    def table(self) -> str:
        """For people: one row per check made, a note per kind of skipped check, then what
        to make of it."""
        rows = [("SUBJECT", "CHECK", "RESULT", "REASON")]
        rows += [(c.subject, c.check, c.outcome.value, c.reason) for c in self.shown()]
        widths = [max(len(r[i]) for r in rows) for i in range(3)]
        lines = [
            "  ".join([*(c.ljust(w) for c, w in zip(r[:3], widths, strict=True)), r[3]])
            for r in rows
        ]
        lines += ["", *self.notes()] if self.notes() else []
        n = self.counts()
        fix = ": each failure hurts delivery; fix it before warming"
        if self.unchecked:
            lines += ["", f"preflight: {self.unchecked}"]
            if n["fail"]:
                lines.append(f"{n['fail']} failed{fix}")
            return "\n".join(lines)
        skipped = sum(c.skip is not None for c in self.checks)
        advice = ""
        if n["fail"]:
            advice = fix
        elif n["unknown"] > skipped:  # asking again changes nothing for a skipped check
            advice = ": unknown is not a failure (no answer, or not asked); check again later"
        unknown = f"{n['unknown']} unknown" + (f" ({skipped} skipped)" if skipped else "")
        lines += ["", f"{n['fail']} failed, {unknown}, {n['pass']} passed{advice}"]
        return "\n".join(lines)
