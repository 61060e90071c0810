"""Microsoft SNDS (Smart Network Data Services), automated data access: the "data" CSV of
the IPs of an account, fetched with the account's key in the URL (so the URL is a secret:
it never appears in an error or a log line, only its redacted form does).

The body has no header line; one line per IP and activity period, comma separated::

    IP address, activity start ("12/5/2026 12:00 AM"), activity end, RCPT commands,
    DATA commands, message recipients, filter result (GREEN|YELLOW|RED),
    complaint rate ("< 0.1%", "0.3%"), trap message period start, trap message period end,
    trap hits, sample HELO, JMR P1 sender, comments

``parse_snds`` is pure; ``fetch_snds`` is the only I/O (aiohttp, imported when called: a
relay without SNDS never loads it).
"""

from __future__ import annotations

import csv
import ipaddress
import os
import re
from collections.abc import Collection
from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal, InvalidOperation
from urllib.parse import quote, quote_plus, unquote_plus, urlsplit, urlunsplit

from warmrelay.reputation.feeds import FeedError, FeedValue

PROVIDER = "microsoft"
MAX_BODY_BYTES = 32 * 1024 * 1024  # ~300 000 lines: far more IPs than one account has

_TIME_FORMAT = "%m/%d/%Y %I:%M %p"  # "12/5/2026 12:00 AM"
_MIN_FIELDS = 11  # up to trap hits; sample HELO, JMR P1 sender and comments may be cut
_FILTERS = ("GREEN", "YELLOW", "RED")  # better to worse
_RATE = re.compile(r"\s*(<)?\s*(\d+(?:\.\d+)?)\s*%\s*")
_HTML = re.compile(r"<\s*(?:!doctype|html|head|body|form|script)\b", re.IGNORECASE)


@dataclass
class _Day:
    """What the lines of one IP on one day say (several activity periods merge)."""

    filter: str | None = None
    complaint_rate: float | None = None
    trap_hits: int | None = None


def parse_snds(text: str, ips: Collection[str]) -> tuple[list[FeedValue], list[str]]:
    """The values of SNDS data ``text`` for our ``ips`` only, and what could not be read.

    Per IP and day (the date of the activity start): ``snds_filter`` ("GREEN", "YELLOW",
    "RED"), ``snds_complaint_rate`` (a fraction: "0.3%" is 0.003; SNDS writes "< 0.1%"
    for any rate under 0.1 %, which becomes 0.001, an upper bound, not a measurement) and
    ``snds_trap_hits`` (a count, as a float; blank trap columns on a line mean none).
    Several lines of one IP on one day merge: the worst filter, the highest complaint rate,
    the sum of trap hits.

    Lines of other IPs are skipped silently. A line that cannot be read is skipped and
    named in the second list (``line 4: ...``); a day with no line for an IP gives no
    value for it (the caller treats absent as unknown). An empty body gives no value and
    no problem. A body that is not SNDS data at all (an HTML page: SNDS answers its login
    page for a wrong or expired key) raises FeedError.
    """
    if not text.strip():
        return [], []
    if _HTML.search(text[:4096]) or text.lstrip().startswith("<"):
        raise FeedError(
            "SNDS answered an HTML page, not CSV data (its login page: is the key in the "
            "URL wrong or expired?)"
        )
    ours = _our_addresses(ips)
    days: dict[tuple[str, date], _Day] = {}
    problems: list[str] = []
    data_lines = 0
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        fields = [f.strip() for f in next(csv.reader([line]))]
        try:
            address = ipaddress.ip_address(fields[0])
        except ValueError:
            problems.append(f"line {number}: no IP address in the first field")
            continue
        if len(fields) < _MIN_FIELDS:
            if address in ours:
                problems.append(
                    f"line {number} ({ours[address]}): {len(fields)} fields, "
                    f"SNDS data lines have 14"
                )
            continue
        data_lines += 1
        ip = ours.get(address)
        if ip is None:
            continue
        _read_line(number, ip, fields, days, problems)
    if data_lines == 0 and problems:
        raise FeedError(
            f"SNDS answered something that is not its CSV data: {problems[0]}"
            + (f" (and {len(problems) - 1} more lines)" if len(problems) > 1 else "")
        )
    values: list[FeedValue] = []
    for (ip, day), seen in days.items():
        if seen.filter is not None:
            values.append(FeedValue(ip, PROVIDER, day, "snds_filter", seen.filter))
        if seen.complaint_rate is not None:
            values.append(FeedValue(ip, PROVIDER, day, "snds_complaint_rate", seen.complaint_rate))
        if seen.trap_hits is not None:
            values.append(FeedValue(ip, PROVIDER, day, "snds_trap_hits", float(seen.trap_hits)))
    return values, problems


def _our_addresses(
    ips: Collection[str],
) -> dict[ipaddress.IPv4Address | ipaddress.IPv6Address, str]:
    """Our IPs by address (so "2001:db8::1" matches however SNDS writes it), each with the
    caller's spelling, which the values carry."""
    ours: dict[ipaddress.IPv4Address | ipaddress.IPv6Address, str] = {}
    for ip in ips:
        try:
            ours[ipaddress.ip_address(ip)] = ip
        except ValueError:
            continue  # not an address: no SNDS line can be about it
    return ours


def _read_line(
    number: int,
    ip: str,
    fields: list[str],
    days: dict[tuple[str, date], _Day],
    problems: list[str],
) -> None:
    where = f"line {number} ({ip})"
    try:
        day = datetime.strptime(fields[1], _TIME_FORMAT).date()
    except ValueError:
        problems.append(f"{where}: activity start {_shown(fields[1])} is not a date")
        return
    seen = days.setdefault((ip, day), _Day())
    verdict = fields[6].upper()
    if verdict in _FILTERS:
        if seen.filter is None or _FILTERS.index(verdict) > _FILTERS.index(seen.filter):
            seen.filter = verdict
    else:
        problems.append(f"{where}: filter result {_shown(fields[6])} is not GREEN/YELLOW/RED")
    rate = _complaint_rate(fields[7])
    if rate is None:
        problems.append(f"{where}: complaint rate {_shown(fields[7])} is not a percentage")
    elif seen.complaint_rate is None or rate > seen.complaint_rate:
        seen.complaint_rate = rate
    hits = fields[10]
    if hits == "" or hits.isdigit():
        seen.trap_hits = (seen.trap_hits or 0) + int(hits or 0)
    else:
        problems.append(f"{where}: trap hits {_shown(hits)} is not a count")


def _complaint_rate(text: str) -> float | None:
    """ "0.3%" -> 0.003; "< 0.1%" -> 0.001 (the bound); None if not a percentage."""
    match = _RATE.fullmatch(text)
    if match is None:
        return None
    try:
        return float(Decimal(match.group(2)) / 100)
    except InvalidOperation:
        return None


def _shown(field: str) -> str:
    return repr(field if len(field) <= 40 else field[:40] + "...")


# -- fetching ---------------------------------------------------------------------------


def redact(url: str) -> str:
    """``url`` as it may be shown: query values (the key) and any password replaced."""
    parts = urlsplit(url)
    query = "&".join(
        f"{item.partition('=')[0]}=<redacted>" if "=" in item else "<redacted>"
        for item in parts.query.split("&")
        if item
    )
    netloc = parts.netloc
    if parts.password is not None:
        netloc = netloc.replace(f":{parts.password}@", ":<redacted>@")
    return urlunsplit((parts.scheme, netloc, parts.path, query, ""))


def _scrub(text: str, url: str) -> str:
    """``text`` (a library's message) without any secret part of ``url``."""
    parts = urlsplit(url)
    secrets = [url, parts.query]
    for item in parts.query.split("&"):
        value = unquote_plus(item.partition("=")[2] or item)
        secrets += [value, quote(value, safe=""), quote_plus(value)]
    if parts.password:
        secrets.append(parts.password)
    for secret in sorted((s for s in secrets if len(s) >= 4), key=len, reverse=True):
        text = text.replace(secret, "<redacted>")
    return " ".join(text.split())


async def fetch_snds(url: str, timeout_s: float) -> str:
    """The body of SNDS's data URL (GET, at most ``timeout_s`` in all).

    Anything but a 200 with a readable body raises FeedError: a status, a timeout, a
    connection error. Its message shows the URL redacted (``?key=<redacted>``) and never
    the key, and it chains no library exception (whose text may hold the URL).
    """
    import aiohttp

    shown = redact(url)
    reason: str
    try:
        timeout = aiohttp.ClientTimeout(total=timeout_s)
        async with aiohttp.ClientSession(timeout=timeout) as session, session.get(url) as resp:
            if resp.status != 200:
                reason = f"HTTP {resp.status} {_scrub(resp.reason or '', url)}".rstrip()
            else:
                body = bytearray()
                async for chunk in resp.content.iter_chunked(64 * 1024):
                    body += chunk
                    if len(body) > MAX_BODY_BYTES:
                        raise FeedError(
                            f"SNDS {shown}: the body is larger than {MAX_BODY_BYTES} bytes"
                        )
                return body.decode("utf-8", "replace")  # SNDS data is ASCII
    except TimeoutError:
        reason = f"no answer within {timeout_s:g}s"
    except aiohttp.ClientConnectorError as exc:
        error = exc.os_error
        said = os.strerror(error.errno) if error.errno else type(error).__name__
        reason = f"cannot connect to {exc.host}:{exc.port}: {said.lower()}"
    except aiohttp.ClientError as exc:
        reason = _scrub(f"{type(exc).__name__}: {exc}", url)
    raise FeedError(f"SNDS {shown}: {reason}") from None
