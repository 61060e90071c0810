"""Which mail may use a warming IP: the best-engaged traffic first, everything else via the pool.

Pure rules over what the scheduler knows of a delivery (the ``Traffic``).
Every criterion given must match; within one criterion any pattern may.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from fnmatch import fnmatchcase


@dataclass(frozen=True)
class Traffic:
    """What a delivery is, for eligibility: envelope sender, recipient domain, headers."""

    sender: str = ""
    domain: str = ""
    headers: Mapping[str, str] = field(default_factory=dict)  # lower-case names


@dataclass(frozen=True)
class Eligibility:
    senders: tuple[str, ...] = ()  # "news@example.com", "*@news.example.com", "example.com"
    header: tuple[str, str] | None = None  # ("x-warmup", "engaged"), value compared case-blind
    recipient_domains: tuple[str, ...] = ()  # "gmail.com", "*.example.com"

    @classmethod
    def parse_header(cls, text: str) -> tuple[str, str]:
        name, sep, value = text.partition(":")
        if not sep or not name.strip() or not value.strip():
            raise ValueError(f"{text!r} is not 'Header-Name: value'")
        return name.strip().lower(), value.strip()

    def admits(self, t: Traffic) -> bool:
        if self.senders and not any(sender_matches(t.sender, p) for p in self.senders):
            return False
        if self.header is not None:
            got = t.headers.get(self.header[0])
            if got is None or got.strip().lower() != self.header[1].lower():
                return False
        return not self.recipient_domains or any(
            fnmatchcase(t.domain.lower(), p.lower()) for p in self.recipient_domains
        )


def sender_matches(sender: str, pattern: str) -> bool:
    """ "a@b.c" exactly, "*@b.c" by glob, or "b.c" for the domain and its subdomains."""
    sender, pattern = sender.lower(), pattern.lower()
    if "@" in pattern:
        return fnmatchcase(sender, pattern)
    domain = sender.rpartition("@")[2]
    return fnmatchcase(domain, pattern) or domain.endswith("." + pattern)


def header_block(data: bytes, names: set[str]) -> dict[str, str]:
    """The values of the named headers (lower-case names) in a message's header block."""
    found: dict[str, str] = {}
    end = data.find(b"\r\n\r\n")
    block = data[: end if end >= 0 else len(data)].decode("utf-8", "replace")
    current: str | None = None
    for line in block.split("\r\n"):
        if line[:1] in (" ", "\t") and current is not None:
            found[current] += " " + line.strip()
            continue
        name, sep, value = line.partition(":")
        key = name.strip().lower()
        current = key if sep and key in names and key not in found else None
        if current is not None:
            found[current] = value.strip()
    return found
