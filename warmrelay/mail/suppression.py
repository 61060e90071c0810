"""Suppression of dead addresses: a hard bounce keeps later mail to the address out.

Sending again to an address that does not exist is what mailbox providers
count against a sender's reputation, and a warming IP has little of it to
lose. So a final bounce whose enhanced status says "no such mailbox or
domain" (``suppression.statuses``: 5.1.1, 5.1.2, 5.1.10, 5.2.1) puts the
address on a list, and the listener refuses it at RCPT with ``550 5.1.1
<addr>: suppressed since DATE after "REPLY"``, so the application learns the
address is dead, since when and why. Entries expire after
``suppression.ttl_s`` (mailboxes come back); an expired one is accepted again
and deleted from the store.

What counts: a receiver's own reply to the recipient's RCPT, and our own
verdict that the domain has a null MX or does not exist. Never throttling,
blocks (those are about the IP), expiry, or a refusal at MAIL, DATA or
connect time (those answer for every recipient of the transaction, so they
cannot say which address is dead). The enhanced status decides, not the
wording, which varies between receivers; only a bare ``550`` without one
falls back to the usual "user unknown" phrases.

Addresses are compared lower-cased as a whole: the domain part is
case-insensitive by RFC 5321, and in practice no provider hands two mailboxes
out by the case of their local part.

Store layout (the counters' value store: SQLite, or Redis for a fleet):

- ``suppressed:{address}``: ``{"since": ISO time, "reply": "...", "by":
  "bounce"|"async bounce"|"complaint"|"operator"}``, one record per address, listed by key prefix
  (``Counters.list_values``); expiry is computed from ``since`` and the
  configured ``ttl_s``, so a changed ``ttl_s`` applies to every entry;
- ``suppression:changed``: a random token rewritten after every add or remove.

Cache: handle_RCPT runs for every recipient, and a store read there would be
an executor round trip (SQLite) or a network one (Redis). Each process keeps
the stored values in a dict (one lookup per RCPT, no I/O) and a follower task
reads the change token every ``suppression.refresh_s`` (5 s; a reload's new
value applies from the next interval); only when it changed is the list read
again, so a fleet converges within seconds for one small read per interval.
Local adds and removes change the dict at once. A change the store cannot
take stays in force here and is written at the next refresh.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import logging
import re
import secrets
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from warmrelay.config import SuppressionConfig
from warmrelay.delivery.replies import Reply, Stage
from warmrelay.errors import CounterError
from warmrelay.operate.metrics import Metrics
from warmrelay.warmup.control import Persisted
from warmrelay.warmup.counters import Counters

log = logging.getLogger("warmrelay.suppression")

KEY_PREFIX = "suppressed:"
CHANGED_KEY = "suppression:changed"
SWEEP_S = 3600.0  # how often each process deletes expired entries nobody asked for
SWEEP_BATCH = 500  # entries judged between two yields to the event loop
REPLY_MAX = 160  # characters of the reason quoted at RCPT (the line stays under 512 octets)

# A bare "550" without an enhanced status: only these phrases mean "no such mailbox".
_UNKNOWN_USER = re.compile(
    r"\b(user unknown|unknown user|no such (user|mailbox|recipient|address)|"
    r"(user|mailbox|recipient|address) (does not|doesn't) exist|"
    r"invalid (recipient|mailbox))\b",
    re.IGNORECASE,
)
_UNPRINTABLE = re.compile(r"[^\x20-\x7e]")


class Event(enum.Enum):
    """Label values of ``warmrelay_suppressed_total``."""

    ADDED = "added"  # a hard bounce or the operator put an address on the list
    REFUSED = "refused"  # a RCPT refused because its address is on the list
    EXPIRED = "expired"  # an entry past ttl_s, deleted from the store by this process
    REMOVED = "removed"  # the operator took an address off the list


def normalize(address: str) -> str:
    """The one spelling an address is stored and looked up under."""
    return address.strip().removeprefix("<").removesuffix(">").lower()


def hard_status(reply: Reply, statuses: Sequence[str]) -> str | None:
    """The enhanced status that makes ``reply`` say the address is dead, or None."""
    if not 500 <= reply.code < 600:
        return None
    receiver = reply.stage is Stage.RCPT and bool(reply.hop)
    ours = reply.stage is Stage.LOCAL and not reply.hop  # null MX, no such domain
    if not (receiver or ours):
        return None
    status = reply.status
    if status == "5.0.0" and reply.code == 550 and _UNKNOWN_USER.search(reply.text):
        status = "5.1.1"
    return status if status in statuses else None


def _stamp(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class Entry:
    """One suppressed address: since when and why (the reply that bounced, or a note)."""

    address: str
    since: datetime
    reply: str
    by: str  # "bounce", "async bounce", "complaint" or "operator"

    def until(self, ttl_s: float) -> datetime:
        return self.since + timedelta(seconds=ttl_s)

    def expired(self, now: datetime, ttl_s: float) -> bool:
        return now >= self.until(ttl_s)

    def refusal(self, address: str) -> str:
        """The RCPT reply: the address as the client wrote it, since when, and why."""
        why = _UNPRINTABLE.sub("?", self.reply).replace('"', "'")
        if len(why) > REPLY_MAX:
            why = why[: REPLY_MAX - 3] + "..."
        shown = address.replace("\r", "").replace("\n", "")
        return f'550 5.1.1 <{shown}>: suppressed since {_stamp(self.since)} after "{why}"'

    def to_json(self, ttl_s: float) -> dict[str, str]:
        return {
            "address": self.address,
            "since": _stamp(self.since),
            "until": _stamp(self.until(ttl_s)),
            "by": self.by,
            "reply": self.reply,
        }

    def dumps(self) -> str:
        data = {"since": self.since.astimezone(UTC).isoformat(), "reply": self.reply, "by": self.by}
        return json.dumps(data, sort_keys=True, separators=(",", ":"))

    @classmethod
    def loads(cls, address: str, text: str) -> Entry | None:
        """None for a record this version cannot read (it is then treated as absent)."""
        try:
            data = json.loads(text)
            since = datetime.fromisoformat(str(data["since"]))
            if since.tzinfo is None:
                since = since.replace(tzinfo=UTC)
            return cls(address, since, str(data.get("reply", "")), str(data.get("by", "bounce")))
        except (ValueError, KeyError, TypeError):
            return None


@dataclass(frozen=True)
class Added:
    entry: Entry
    persisted: Persisted  # PENDING: refused here, written once the store answers


@dataclass(frozen=True)
class Removed:
    address: str
    entry: Entry | None  # None: it was not on the list
    persisted: Persisted


class SuppressionList:
    """This process's view of the list (for RCPT) and the one way to change the stored one."""

    def __init__(
        self,
        counters: Counters,
        metrics: Metrics,
        settings: Callable[[], SuppressionConfig],
        clock: Callable[[], datetime],
    ) -> None:
        self._counters = counters
        self._metrics = metrics
        self._settings = settings  # the running configuration's: follows reloads
        self._clock = clock
        self._entries: dict[str, str] = {}  # address -> stored value (parsed only on a hit)
        self._pending: dict[str, str | None] = {}  # writes the store has not taken yet
        self._seen: str | None = None  # the change token the cache reflects
        self._loaded = False
        self._loading: list[tuple[str, str | None]] | None = None  # local changes meanwhile
        self._swept_at = time.monotonic()  # the first sweep an hour after start
        self._follower: asyncio.Task[None] | None = None
        self._stopping = False
        self._chores: set[asyncio.Task[None]] = set()

    # -- lifecycle ------------------------------------------------------------------

    async def start(self) -> None:
        """Load the list, then follow the store. A store that fails now leaves the list
        empty here (nothing is refused) until it answers."""
        try:
            await self.refresh()
        except CounterError as exc:
            log.error("suppression list not loaded (%s): loaded when the store answers", exc)
        self._follower = asyncio.create_task(self._follow(), name="suppression")

    async def stop(self) -> None:
        self._stopping = True
        tasks = [*self._chores, *([self._follower] if self._follower else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._follower = None

    async def _follow(self) -> None:
        me = asyncio.current_task()
        while not self._stopping:
            await asyncio.sleep(self._settings().refresh_s)  # read each time: follows reloads
            try:
                await self.refresh()
            except CounterError:
                pass  # the store logged its failure once; the cache stays as it is
            except Exception:  # a bug must not end the following for good
                log.exception("suppression list: refresh failed")
            if me is not None and me.cancelling():
                # redis-py (8.1) may swallow a cancellation that arrives during a command
                # and return normally: without this, stop() would wait forever
                return

    # -- the RCPT path: no I/O --------------------------------------------------------

    def check(self, address: str) -> Entry | None:
        """The entry that refuses ``address`` now, or None. An expired entry is dropped here
        and deleted from the store in the background."""
        settings = self._settings()
        if not settings.enabled or not self._entries:
            return None
        key = normalize(address)
        raw = self._entries.get(key)
        if raw is None:
            return None
        entry = Entry.loads(key, raw)
        if entry is None or entry.expired(self._clock(), settings.ttl_s):
            self._entries.pop(key, None)
            self._spawn(self._expire(key, raw))
            return None
        self._metrics.suppressed.labels(Event.REFUSED.value).inc()
        return entry

    # -- changes ----------------------------------------------------------------------

    async def bounced(
        self, address: str, reply: Reply, now: datetime, queue_id: str = ""
    ) -> Added | None:
        """A recipient's final bounce: suppress the address if the reply says it is dead."""
        settings = self._settings()
        if not settings.enabled:
            return None
        status = hard_status(reply, settings.statuses)
        if status is None:
            return None
        added = await self._put(Entry(normalize(address), now, reply.line, "bounce"))
        log.info(
            "%s: <%s> suppressed for %.0f days after %s (%s)",
            queue_id or "-",
            added.entry.address,
            settings.ttl_s / 86400,
            status,
            reply.line[:200],
        )
        return added

    async def reported(
        self, address: str, by: str, status: str, text: str, now: datetime, queue_id: str = ""
    ) -> Added | None:
        """A report that came back after the handover: a complaint always suppresses the
        address (``by`` "complaint"); an out-of-band bounce (``by`` "async bounce") when its
        status is one of ``suppression.statuses``, as an in-band bounce would."""
        settings = self._settings()
        if not settings.enabled:
            return None
        if by != "complaint" and status not in settings.statuses:
            return None
        added = await self._put(Entry(normalize(address), now, text[:REPLY_MAX], by))
        log.info(
            "%s: <%s> suppressed for %.0f days after a %s (%s)",
            queue_id or "-",
            added.entry.address,
            settings.ttl_s / 86400,
            by,
            text[:200],
        )
        return added

    async def add(self, address: str, now: datetime, note: str = "added by the operator") -> Added:
        return await self._put(Entry(normalize(address), now, note, "operator"))

    async def remove(self, address: str) -> Removed:
        key = normalize(address)
        local = self._entries.pop(key, None)
        self._noted(key, None)
        known = Entry.loads(key, local) if local is not None else None
        try:
            await self._flush()
            stored = await self._counters.get_value(KEY_PREFIX + key)
            if stored is None:
                return Removed(key, None, Persisted.STORED)
            await self._counters.set_value(KEY_PREFIX + key, None)
            await self._touch()
        except CounterError as exc:
            log.error("cannot remove <%s> from the stored list now (%s); retried", key, exc)
            self._pending[key] = None
            return Removed(key, known, Persisted.PENDING)
        self._metrics.suppressed.labels(Event.REMOVED.value).inc()
        return Removed(key, Entry.loads(key, stored) or known, Persisted.STORED)

    async def entries(self) -> list[Entry]:
        """Every entry in force, read from the store (what the whole fleet refuses), by
        address. Raises CounterError when the store cannot answer."""
        await self._flush()
        stored = await self._counters.list_values(KEY_PREFIX)
        now, ttl_s = self._clock(), self._settings().ttl_s
        found = []
        for name, text in sorted(stored.items()):
            entry = Entry.loads(name.removeprefix(KEY_PREFIX), text)
            if entry is not None and not entry.expired(now, ttl_s):
                found.append(entry)
        return found

    async def _put(self, entry: Entry) -> Added:
        value = entry.dumps()
        self._entries[entry.address] = value  # refused here from now on
        self._noted(entry.address, value)
        self._metrics.suppressed.labels(Event.ADDED.value).inc()
        try:
            await self._flush()
            await self._counters.set_value(KEY_PREFIX + entry.address, value)
            await self._touch()
        except CounterError as exc:
            log.error("cannot store the suppression of <%s> now (%s); retried", entry.address, exc)
            self._pending[entry.address] = value
            return Added(entry, Persisted.PENDING)
        return Added(entry, Persisted.STORED)

    async def _touch(self) -> None:
        """Tell the other processes the list changed. Our own token is not taken as seen:
        changes others made before it must still be read."""
        await self._counters.set_value(CHANGED_KEY, secrets.token_hex(8))

    async def _flush(self) -> None:
        """Write the changes the store missed (each record on its own: order across
        addresses does not matter)."""
        if not self._pending:
            return
        for key, value in list(self._pending.items()):
            await self._counters.set_value(KEY_PREFIX + key, value)
            if self._pending.get(key) == value:
                del self._pending[key]
        await self._touch()
        log.warning("suppression list: changes kept while the store failed are stored now")

    def _noted(self, key: str, value: str | None) -> None:
        """A local change during a reload is applied again on top of what was read."""
        if self._loading is not None:
            self._loading.append((key, value))

    # -- following the store --------------------------------------------------------

    async def refresh(self) -> None:
        """Write what the store missed; read the list again if anyone changed it since the
        last read, and delete expired entries every SWEEP_S."""
        await self._flush()
        token = await self._counters.get_value(CHANGED_KEY)
        sweep = time.monotonic() - self._swept_at >= SWEEP_S
        if self._loaded and token == self._seen and not sweep:
            return
        self._loading = []
        try:
            stored = await self._counters.list_values(KEY_PREFIX)
            entries = {name.removeprefix(KEY_PREFIX): text for name, text in stored.items()}
            for key, value in self._loading:
                if value is None:
                    entries.pop(key, None)
                else:
                    entries[key] = value
        finally:
            self._loading = None
        self._entries, self._seen, self._loaded = entries, token, True
        if sweep:
            self._swept_at = time.monotonic()
            await self._sweep()

    async def _sweep(self) -> None:
        """Delete expired entries (a fleet's processes may race: compare-and-set lets one
        win), yielding to the event loop between batches."""
        ttl_s = self._settings().ttl_s
        now = self._clock()
        for n, (key, raw) in enumerate(list(self._entries.items()), 1):
            entry = Entry.loads(key, raw)
            if entry is None or entry.expired(now, ttl_s):
                if self._entries.get(key) == raw:
                    del self._entries[key]
                await self._expire(key, raw)
            if n % SWEEP_BATCH == 0:
                await asyncio.sleep(0)

    async def _expire(self, key: str, raw: str) -> None:
        """Delete an expired entry unless someone stored a new one meanwhile."""
        with contextlib.suppress(CounterError):  # the next sweep tries again
            if await self._counters.compare_and_set(KEY_PREFIX + key, raw, None):
                self._metrics.suppressed.labels(Event.EXPIRED.value).inc()
                log.info("<%s>: suppression expired; accepted again", key)

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._chores.add(task)
        task.add_done_callback(self._chores.discard)
