"""Durable message spool: a segment file per group commit, quarantine of corrupt entries.

``await store()`` returns only once the message survives kill -9 and a power cut. One committer
task hands each batch of pending stores to a thread, and the next batch accumulates meanwhile.
A batch of several messages becomes one *segment* ``queue/<first id>-<count>.seg`` (their
records back to back: one create, one writev, one fdatasync, one rename, one fsync of queue/):
per message, the kernel work and the thread hand-offs of a file of its own were a sixth of the
relay's CPU. A finished message of a segment is written to its ``.removed`` list; the segment
goes when its last message does; one still holding messages after ``SEGMENT_KEEP_S`` (they
were deferred or held: delivery takes seconds) gives each a ``.msg`` of its own, so that a
few deferred messages do not keep their batches' delivered mail on disk for days. A batch
of one message, and a batch whose segment could not
be written (its messages are then tried one by one, so that one message too big for the disk
fails alone), are stored the older way: ``queue/<id>.msg`` per message, written and synced on
``sync_threads`` (stores/s on a 2-vCPU ext4 VM, 5000 concurrent: 1 thread 1300-1460, 8
2290-2500). ``.state`` appends and ``.removed`` lines skip fsync: losing one can only cause a
duplicate delivery, never a loss.

A disk that is full or read-only: a failed store is followed by a probe (a small write + fsync
beside the stores) that tells a sick disk from a message that is too big; then ``writable`` is
false (one ERROR line), and progress that cannot be written (``mark_done``,
``record_attempt``, the unlinks of ``remove``) is kept in memory, never raised: what was
delivered must not be sent again because it could not be written down. A watcher probes every
``PROBE_INTERVAL_S`` (and at once after a store that works) and writes that backlog when it
can. A read-only spool refuses to open: nothing delivered from it could be recorded, so every
later start would deliver it again.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import itertools
import json
import logging
import os
import re
import secrets
import time
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from warmrelay.errors import SpoolError

log = logging.getLogger("warmrelay.spool")

MAGIC = b"WARMRELAY-SPOOL 1\n"
MAX_BATCH = 512  # bounds one commit's latency when thousands of stores pile up
PROBE_INTERVAL_S = 1.0  # while not writable: how often to try again (a small write + fsync)
SEGMENT_KEEP_S = 300.0  # a segment still holding messages this long: each gets a .msg file
RETIRE_MAX = 1000  # messages moved out of old segments per round (one thread trip)
PROBE_BYTES = 4096  # one page: a full disk refuses it, an almost full one may not
REPORT_MAX_IDS = 200  # queue ids named in the one line about progress lost at a stop
_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"  # Crockford base32: sorts like the numbers
_ID_RE = re.compile(r"[0-9A-HJKMNP-TV-Z]{16}")
_SEGMENT_RE = re.compile(r"([0-9A-HJKMNP-TV-Z]{16})-([1-9][0-9]*)")  # <first queue id>-<count>
_TOKEN_RE = re.compile(r"[A-Za-z0-9_.-]+")
_TYPES: dict[str, Any] = {"mail_from": str, "rcpt_tos": list, "received_at": int | float}
_TYPES |= {"size": int, "crc32": int, "meta": dict}
_counter = itertools.count(secrets.randbits(35))
_probes = itertools.count()
_IOV_MAX = 1024  # buffers per writev (Linux's IOV_MAX)


def _reseed() -> None:  # a forked relay must not repeat its parent's ids
    global _counter
    _counter = itertools.count(secrets.randbits(35))


os.register_at_fork(after_in_child=_reseed)


def new_queue_id() -> str:
    """9 base32 chars of unix ms (time order) + 7 of a per-process counter from a random start:
    unique within a process; across processes a clash needs the same millisecond and
    overlapping 35-bit counter ranges."""
    value = (int(time.time() * 1000) << 35) | (next(_counter) & (2**35 - 1))
    return "".join(_ALPHABET[(value >> (5 * i)) & 31] for i in reversed(range(16)))


def queue_id_floor(when: float) -> str:
    """The smallest queue id of time ``when``: ids below it are older (they sort by time)."""
    value = int(when * 1000) << 35
    return "".join(_ALPHABET[(value >> (5 * i)) & 31] for i in reversed(range(16)))


@dataclass(frozen=True)
class SpooledMessage:
    """Envelope and size of a spooled message; the bytes stay on disk (``read_data``)."""

    queue_id: str
    mail_from: str
    rcpt_tos: tuple[str, ...]
    received_at: float
    meta: Mapping[str, str]
    size: int


@dataclass(frozen=True)
class RecoveredMessage:
    """A message found by ``open()``, with the progress recorded before the restart."""

    message: SpooledMessage
    done: Mapping[int, str]
    attempts: int
    on_hold: bool = False  # an operator holds it (`warmrelay queue hold`) until released


@dataclass
class _Progress:
    """Records of one message the spool could not write yet (merged: ``done`` records are
    a set, ``attempts`` a maximum, so their order on disk never mattered; ``hold`` is the
    operator's latest word)."""

    done: dict[int, str] = field(default_factory=dict)
    attempts: int = 0
    hold: bool | None = None

    def merge(self, other: _Progress) -> None:
        self.done.update(other.done)
        self.attempts = max(self.attempts, other.attempts)
        if other.hold is not None:
            self.hold = other.hold

    def lines(self) -> str:
        by_disposition: dict[str, list[int]] = {}
        for i, disposition in sorted(self.done.items()):
            by_disposition.setdefault(disposition, []).append(i)
        text = "".join(f"done {','.join(map(str, idx))} {d}\n" for d, idx in by_disposition.items())
        text += f"attempts {self.attempts}\n" if self.attempts else ""
        return text + ("" if self.hold is None else "hold\n" if self.hold else "release\n")


@dataclass(eq=False)
class _Pending:
    message: SpooledMessage
    data: bytes
    future: asyncio.Future[None]
    error: OSError | None = None
    segment: str | None = None  # stored in this segment (its stem), at offset, length bytes
    offset: int = 0
    length: int = 0


@dataclass(frozen=True)
class _Removal:
    """What finished messages leave to delete: a ``.msg`` of its own (``segment`` None), or
    lines in their segment's ``.removed`` list, or (``last``) the segment itself; then the
    ``.state`` files some of them have."""

    queue_ids: tuple[str, ...]
    segment: str | None
    last: bool
    states: tuple[str, ...]


def _trip(removals: list[_Removal]) -> list[_Removal]:
    """One thread trip's removals, one per segment: a segment that ends in this trip takes
    its members' lines along (no appends to a file about to go), the others get one append."""
    out: list[_Removal] = []
    by_segment: dict[str, list[_Removal]] = {}
    for r in removals:
        if r.segment is None:
            out.append(r)
        else:
            by_segment.setdefault(r.segment, []).append(r)
    for segment, group in by_segment.items():
        ids = tuple(q for r in group for q in r.queue_ids)
        states = tuple(q for r in group for q in r.states)
        out.append(_Removal(ids, segment, any(r.last for r in group), states))
    return out


def _encode(msg: SpooledMessage, data: bytes) -> bytes:
    h: dict[str, Any] = {"queue_id": msg.queue_id, "mail_from": msg.mail_from}
    h |= {"rcpt_tos": msg.rcpt_tos, "received_at": msg.received_at, "size": len(data)}
    h |= {"crc32": zlib.crc32(data), "meta": dict(msg.meta)}
    return MAGIC + json.dumps(h, separators=(",", ":")).encode() + b"\n"


def _header(raw: bytes, start: int = 0) -> tuple[dict[str, Any], int]:
    """The header of the record at ``start`` and where its data begins; ValueError says what
    is wrong (the quarantine reason)."""
    end = raw.find(b"\n", start + len(MAGIC))
    if not raw.startswith(MAGIC, start) or end < 0:
        raise ValueError("truncated header" if raw.startswith(MAGIC, start) else "bad magic line")
    try:
        h: Any = json.loads(raw[start + len(MAGIC) : end])
    except ValueError as exc:
        raise ValueError(f"bad JSON header: {exc}") from None
    if not (
        isinstance(h, dict)
        and isinstance(h.get("queue_id"), str)
        and _ID_RE.fullmatch(h["queue_id"])
        and all(isinstance(h.get(k), t) for k, t in _TYPES.items())
        and all(isinstance(v, str) for v in (*h["rcpt_tos"], *h["meta"].values()))
        and h["size"] >= 0
    ):
        raise ValueError("header fields missing or of the wrong type")
    return h, end + 1


def _decode(raw: bytes, queue_id: str) -> tuple[SpooledMessage, bytes]:
    """Validate one whole record (a .msg file, or a slice of a segment)."""
    h, start = _header(raw)
    if h["queue_id"] != queue_id:
        raise ValueError("header fields missing or of the wrong type")
    data = raw[start:]
    if len(data) != h["size"]:
        raise ValueError(f"data length {len(data)} != {h['size']}")
    if zlib.crc32(data) != h["crc32"]:
        raise ValueError("data CRC mismatch")
    rcpts, when = tuple(h["rcpt_tos"]), float(h["received_at"])
    return SpooledMessage(queue_id, h["mail_from"], rcpts, when, h["meta"], len(data)), data


def _unlink(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.unlink()


def _reason(exc: OSError) -> str:
    return exc.strerror or str(exc)


class Spool:
    """The durable store between the listener and the scheduler."""

    def __init__(
        self,
        directory: Path,
        *,
        fsync: bool = True,
        sync_threads: int = 8,
        segment_keep_s: float = SEGMENT_KEEP_S,
    ) -> None:
        self.directory = Path(directory)
        self.incoming, self.queue = self.directory / "incoming", self.directory / "queue"
        self.quarantine = self.directory / "quarantine"
        self.batches_committed = 0  # observability: far below the message count under load
        self._fsync, self._sync_threads = fsync, sync_threads
        self._segment_keep_s = segment_keep_s
        self._messages: dict[str, SpooledMessage] = {}
        self._pending: list[_Pending] = []
        self._committer: asyncio.Task[None] | None = None
        self._pool: ThreadPoolExecutor | None = None  # set while open
        self._lock_fd = self._queue_fd = -1
        self._closed = False
        self.writable = True  # false while stores and progress records fail (see probe)
        self.fault: str | None = None  # why not writable, for /healthz
        self.on_change: Callable[[], None] | None = None  # writable or backlog changed
        self._located: dict[str, tuple[str, int, int]] = {}  # id -> segment, offset, length
        self._segments: dict[str, set[str]] = {}  # segment -> the ids in it not yet removed
        self._retirer: asyncio.TimerHandle | None = None
        self._retiring: asyncio.Future[list[tuple[str, str]]] | None = None  # on a thread
        self._stated: set[str] = set()  # ids that have (or may have) a .state file
        self._unwritten: dict[str, _Progress] = {}  # progress known only in memory
        self._unremoved: set[_Removal] = set()  # finished, but their files are still there
        self._to_unlink: list[_Removal] = []  # finished, to be removed by the next batch
        self._unlinking: asyncio.Future[list[_Removal]] | None = None  # the batch on a thread
        self._watcher: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._fault_since = 0.0

    def __len__(self) -> int:
        return len(self._messages)

    @property
    def unrecorded(self) -> int:
        """Messages whose progress is known only in memory: a restart now would deliver
        them (or their finished recipients) again."""
        return len(self._unwritten) + sum(len(r.queue_ids) for r in self._unremoved)

    async def open(self) -> list[RecoveredMessage]:
        """Create the layout, drop unacknowledged files, load ``queue/`` oldest first."""
        if self._lock_fd >= 0 or self._closed:
            raise SpoolError("spool already opened")
        try:
            recovered, problem = await asyncio.to_thread(self._recover)
        except OSError as exc:
            self._release_fds()
            raise SpoolError(exc.errno, f"cannot open spool {self.directory}: {exc}") from exc
        self._messages = {r.message.queue_id: r.message for r in recovered}
        # One thread runs the batch (never two at once), the others write and sync its files;
        # not the loop's default executor, so other to_thread() users cannot hold up commits.
        self._pool = ThreadPoolExecutor(1 + self._sync_threads, thread_name_prefix="spool")
        if problem is not None:  # full, say: delivering frees it, so start anyway
            self._set_writable(problem)
        self._schedule_retire()
        return recovered

    def _recover(self) -> tuple[list[RecoveredMessage], OSError | None]:
        for d in (self.incoming, self.queue, self.quarantine):
            d.mkdir(parents=True, exist_ok=True)
        # Two relays on one spool would deliver each other's mail: refuse the second one.
        # Read-only: flock needs no write access, and a file held open for writing would
        # stop an operator from remounting the file system read-only.
        self._lock_fd = os.open(self.directory / "lock", os.O_RDONLY | os.O_CREAT, 0o600)
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        problem = self._probe()
        if problem is not None and problem.errno == errno.EROFS:
            raise OSError(
                problem.errno,
                f"{problem.strerror} (what it delivers could not be recorded: every later "
                "start would deliver it again)",
            )
        self._queue_fd = os.open(self.queue, os.O_RDONLY | os.O_DIRECTORY)
        if self._fsync:  # the layout's own directory entries must be durable too
            top = os.open(self.directory, os.O_RDONLY)
            os.fsync(top)
            os.close(top)
            os.fsync(self._queue_fd)
        stray = list(self.incoming.iterdir())
        for path in stray:
            _unlink(path)
        if stray:
            log.info("discarded %d unacknowledged file(s) from %s", len(stray), self.incoming)
        found: list[RecoveredMessage] = []
        before = sorted(p.name for p in self.queue.iterdir())
        for name in before:  # segments before .msg
            stem, _, ext = name.partition(".")
            if ext == "seg" and _SEGMENT_RE.fullmatch(stem):
                found += self._load_segment(stem, set(before))
        names = {p.name for p in self.queue.iterdir()}  # salvaged records are .msg files now
        for name in names:
            stem, _, ext = name.partition(".")
            if ext == "msg" and _ID_RE.fullmatch(stem):
                try:
                    msg, _ = _decode((self.queue / name).read_bytes(), stem)
                    found.append(self._progress_of(msg))
                except (OSError, ValueError) as exc:
                    self._quarantine(name, str(exc))
            elif ext not in ("state", "seg", "removed"):
                self._quarantine(name, "unexpected file name")
        loaded = {r.message.queue_id for r in found}
        for name in names - {f"{q}.state" for q in loaded}:
            stem, _, ext = name.partition(".")
            if ext == "state" and f"{stem}.msg" in names:
                self._quarantine(name, "its message was quarantined")
            elif ext == "state" or (ext == "removed" and f"{stem}.seg" not in names):
                _unlink(self.queue / name)  # a removal was interrupted between its unlinks
        found.sort(key=lambda r: (r.message.received_at, r.message.queue_id))
        return found, problem

    def _load_segment(self, stem: str, names: set[str]) -> list[RecoveredMessage]:
        """The messages of a segment that are not on its ``.removed`` list, nor moved to a
        ``.msg`` of their own (``names``: a retirement stopped before the list got them). A
        segment that is not whole (a disk that rotted it: it was synced before any 250) is
        quarantined, and the records still readable from it are stored as ``.msg`` files
        first."""
        path = self.queue / f"{stem}.seg"
        removed = _removed_ids(self.queue / f"{stem}.removed")
        records: list[tuple[SpooledMessage, bytes, int, int]] = []
        problems: list[str] = []
        start = 0
        try:
            raw = path.read_bytes()
            while start < len(raw):
                try:  # a bad header: nothing after it can be found
                    h, body = _header(raw, start)
                except ValueError as exc:
                    problems.append(f"record at byte {start}: {exc}")
                    break
                end = body + h["size"]
                try:  # bad data under a good header: the next record is still found
                    msg, data = _decode(raw[start:end], h["queue_id"])
                    records.append((msg, data, start, end - start))
                except ValueError as exc:
                    problems.append(f"record at byte {start}: {exc}")
                start = end
            count = int(stem.rpartition("-")[2])
            if not problems and len(records) != count:
                problems.append(f"{len(records)} records, its name says {count}")
        except OSError as exc:
            problems.append(_reason(exc))
        problem = "; ".join(problems) or None
        live = [
            r
            for r in records
            if r[0].queue_id not in removed and f"{r[0].queue_id}.msg" not in names
        ]
        if problem is not None:
            for msg, data, _, _ in live:  # the same ids: their .state files still apply
                self._write_file(self.queue / f"{msg.queue_id}.msg", _encode(msg, data), data)
            if live and self._fsync:
                os.fsync(self._queue_fd)
            self._quarantine(f"{stem}.seg", f"{problem}; {len(live)} message(s) kept")
            if (self.queue / f"{stem}.removed").exists():
                self._quarantine(f"{stem}.removed", "its segment was quarantined")
            return []  # the .msg files written above are loaded with the others
        if not live:  # removed all, but the unlink did not happen (a crash, a sick disk)
            _unlink(path)
            _unlink(self.queue / f"{stem}.removed")
            return []
        self._segments[stem] = {msg.queue_id for msg, _, _, _ in live}
        for msg, _, offset, length in live:
            self._located[msg.queue_id] = (stem, offset, length)
        return [self._progress_of(msg) for msg, _, _, _ in live]

    def _progress_of(self, msg: SpooledMessage) -> RecoveredMessage:
        """A message found on disk, with what its ``.state`` file says."""
        queue_id = msg.queue_id
        done: dict[int, str] = {}
        attempts = 0
        on_hold = False
        with contextlib.suppress(FileNotFoundError):
            text = (self.queue / f"{queue_id}.state").read_bytes().decode(errors="replace")
            self._stated.add(queue_id)
            for line in text.splitlines(keepends=True):
                kind, *args = line.split() or [""]
                try:
                    if not line.endswith("\n"):  # torn by a crash: the record never happened
                        raise ValueError("torn last line")
                    if kind == "done" and len(args) == 2 and _TOKEN_RE.fullmatch(args[1]):
                        idx = [int(i) for i in args[0].split(",")]
                        if any(not 0 <= i < len(msg.rcpt_tos) for i in idx):
                            raise ValueError("recipient index out of range")
                        done.update(dict.fromkeys(idx, args[1]))
                    elif kind == "attempts" and len(args) == 1:
                        attempts = max(attempts, int(args[0]))
                    elif kind in ("hold", "release") and not args:
                        on_hold = kind == "hold"
                    else:
                        raise ValueError("unknown record")
                except ValueError as exc:
                    log.warning("%s.state: ignored line %r: %s", queue_id, line, exc)
        return RecoveredMessage(msg, done, attempts, on_hold)

    def _quarantine(self, name: str, reason: str) -> None:
        target = self.quarantine / name
        if target.exists():  # keep the earlier evidence too
            target = target.with_name(f"{name}.{time.time_ns()}")
        try:
            os.replace(self.queue / name, target)
            log.warning("quarantined %s: %s", name, reason)
        except OSError as exc:
            log.error("cannot quarantine %s (%s): %s", name, reason, exc)

    async def store(
        self,
        mail_from: str,
        rcpt_tos: Sequence[str],
        data: bytes,
        *,
        meta: Mapping[str, str] | None = None,
        received_at: float | None = None,
    ) -> SpooledMessage:
        """Return once the message is durable; SpoolError (errno kept) if it cannot be."""
        if self._pool is None or self._closed:
            raise SpoolError("spool is not open")
        extra = dict(meta or {})
        if not rcpt_tos or not all(isinstance(v, str) for v in (*rcpt_tos, *extra.values())):
            raise ValueError("need at least one recipient, and str recipients and meta")
        when = time.time() if received_at is None else received_at
        msg = SpooledMessage(new_queue_id(), mail_from, tuple(rcpt_tos), when, extra, len(data))
        item = _Pending(msg, data, asyncio.get_running_loop().create_future())
        self._pending.append(item)
        if self._committer is None:
            self._committer = asyncio.create_task(self._commit_loop())
        try:
            await item.future
        except asyncio.CancelledError:  # stored, but too late for its caller: take it back
            if item.future.done() and not item.future.cancelled() and not item.future.exception():
                with contextlib.suppress(SpoolError):
                    self._discard(msg.queue_id)
            raise
        self._messages[msg.queue_id] = msg
        return msg

    async def _commit_loop(self) -> None:
        """One batch at a time, so the next batch fills up while this one syncs. The
        removals waiting meanwhile ride along on the batch's thread trip (each trip is a
        thread wake-up and a wake-up of the loop: under load they were a third of the
        spool's CPU)."""
        loop = asyncio.get_running_loop()
        try:
            while self._pending and self._pool is not None:
                batch = [i for i in self._pending[:MAX_BATCH] if not i.future.cancelled()]
                del self._pending[:MAX_BATCH]
                trip: list[_Removal] = []
                if self._unlinking is None:
                    trip, self._to_unlink = _trip(self._to_unlink), []
                try:
                    work = partial(self._commit_and_remove, batch, trip)
                    future = loop.run_in_executor(self._pool, work)
                    if trip:
                        self._unlinking = future
                        future.add_done_callback(partial(self._unlinked, trip))
                    await future
                    self.batches_committed += 1
                except Exception as exc:  # a bug, not a disk error: fail this batch, go on
                    log.exception("spool commit failed")
                    for item in batch:
                        item.error = item.error or OSError(f"spool commit failed: {exc!r}")
                await self._judge(batch)
                for item in batch:  # before any caller hears: a cancelled one is discarded
                    if item.error is None and item.segment is not None:
                        queue_id = item.message.queue_id
                        self._located[queue_id] = (item.segment, item.offset, item.length)
                        self._segments.setdefault(item.segment, set()).add(queue_id)
                for item in batch:
                    if item.future.done():  # its caller was cancelled: nobody acked it
                        if item.error is None:
                            with contextlib.suppress(SpoolError):
                                self._discard(item.message.queue_id)
                    elif item.error is None:
                        item.future.set_result(None)
                    else:
                        code, text = item.error.errno, f"cannot spool message: {item.error}"
                        err = SpoolError(text) if code is None else SpoolError(code, text)
                        err.__cause__ = item.error
                        item.future.set_exception(err)
        finally:
            self._committer = None
            if self._to_unlink and self._unlinking is None and self._pool is not None:
                self._unlink_next()  # removals made during the last batch

    def _commit_and_remove(self, batch: list[_Pending], trip: list[_Removal]) -> list[_Removal]:
        """Blocking: the batch, then the removals (the removals not done, as _unlink_all)."""
        self._commit(batch)
        return self._unlink_all(trip)

    def _commit(self, batch: list[_Pending]) -> None:
        """Blocking: several messages go into one segment; one message, or a batch whose
        segment failed: write+fdatasync each file, rename into queue/, fsync queue/ once.

        A file's own write or fsync error fails only its store; a failed directory fsync
        fails (and takes back) every store of the batch."""
        assert self._pool is not None
        if len(batch) > 1 and self._write_segment(batch):
            return
        if len(batch) == 1:  # on this thread: a hand-off to another costs more than it saves
            self._write(batch[0])
        else:
            list(self._pool.map(self._write, batch))
        renamed: list[_Pending] = []
        for item in batch:
            name = f"{item.message.queue_id}.msg"
            try:
                if item.error is None:
                    os.rename(self.incoming / name, self.queue / name)
                    renamed.append(item)
            except OSError as exc:
                item.error = exc
                _unlink(self.incoming / name)
        try:
            if renamed and self._fsync:
                os.fsync(self._queue_fd)
        except OSError as exc:  # not durable: take the files back, the clients will retry
            for item in renamed:
                item.error = exc
                _unlink(self.queue / f"{item.message.queue_id}.msg")

    async def _judge(self, batch: list[_Pending]) -> None:
        """After a batch: a store that worked means the disk takes writes again (write the
        backlog now); a failed one while writable is probed, before its caller hears of
        it, so that ``writable`` already says whether the disk or the message was at fault."""
        if not batch:
            return
        if any(item.error is None for item in batch):
            if not self.writable or self._unwritten or self._unremoved:
                self._wake_watcher()
        elif self.writable and self._pool is not None:
            problem = await asyncio.get_running_loop().run_in_executor(self._pool, self._probe)
            if problem is not None:
                self._set_writable(problem)

    def _write_segment(self, batch: list[_Pending]) -> bool:
        """Blocking: the whole batch in one file, synced, renamed into queue/, queue/ synced.
        False (and nothing left behind) if any step failed: the caller then tries the
        messages one by one, which tells a message too big from a sick disk."""
        stem = f"{batch[0].message.queue_id}-{len(batch)}"
        name = f"{stem}.seg"
        parts: list[bytes] = []
        offset = 0
        for item in batch:
            head = _encode(item.message, item.data)
            parts += (head, item.data)
            item.offset, item.length = offset, len(head) + len(item.data)
            offset += item.length
        renamed = False
        try:
            self._write_file(self.incoming / name, *parts)
            os.rename(self.incoming / name, self.queue / name)
            renamed = True
            if self._fsync:
                os.fsync(self._queue_fd)
        except OSError as exc:
            log.debug("segment %s not stored (%s): one file per message", name, _reason(exc))
            _unlink((self.queue if renamed else self.incoming) / name)
            return False
        for item in batch:
            item.segment = stem
        return True

    def _write(self, item: _Pending) -> None:
        path = self.incoming / f"{item.message.queue_id}.msg"
        try:
            self._write_file(path, _encode(item.message, item.data), item.data)
        except OSError as exc:
            item.error = exc

    def _write_file(self, path: Path, *parts: bytes) -> None:
        """Blocking: a new file with these bytes, synced; removed again if that fails."""
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o640)
            try:
                done = 0
                for at in range(0, len(parts), _IOV_MAX):  # one call for all, as a rule
                    chunk = parts[at : at + _IOV_MAX]
                    wrote = os.writev(fd, chunk)
                    done += wrote
                    if wrote < sum(map(len, chunk)):
                        break
                if done < sum(map(len, parts)):  # a short write: the rest
                    rest = memoryview(b"".join(parts))[done:]
                    while rest:
                        rest = rest[os.write(fd, rest) :]
                if self._fsync:
                    os.fdatasync(fd)
            finally:
                os.close(fd)
        except OSError:
            _unlink(path)
            raise

    def read_data(self, queue_id: str) -> bytes:
        """The raw message bytes, checked against the header's length and CRC."""
        if not _ID_RE.fullmatch(queue_id):
            raise SpoolError(f"invalid queue id {queue_id!r}")
        try:
            where = self._located.get(queue_id)
            if where is None:
                return _decode((self.queue / f"{queue_id}.msg").read_bytes(), queue_id)[1]
            segment, offset, length = where
            fd = os.open(self.queue / f"{segment}.seg", os.O_RDONLY | os.O_CLOEXEC)
            try:
                return _decode(os.pread(fd, length, offset), queue_id)[1]
            finally:
                os.close(fd)
        except OSError as exc:
            raise SpoolError(exc.errno, f"cannot read {queue_id}: {exc.strerror}") from exc
        except ValueError as exc:
            raise SpoolError(f"{queue_id} is corrupt: {exc}") from exc

    def mark_done(self, queue_id: str, indices: Iterable[int], disposition: str) -> None:
        """Record final dispositions so that a restart does not deliver to them again. A disk
        that refuses the record does not make this fail: it is kept and written later."""
        idx, n = sorted(set(indices)), len(self._known(queue_id).rcpt_tos)
        if not _TOKEN_RE.fullmatch(disposition) or any(not 0 <= i < n for i in idx):
            raise ValueError(f"bad disposition {disposition!r} or index in {idx} (0..{n - 1})")
        if idx:
            self._record(queue_id, _Progress(done=dict.fromkeys(idx, disposition)))

    def record_attempt(self, queue_id: str, attempts: int) -> None:
        """Record the attempt count so that backoff and lifetime go on after a restart."""
        self._known(queue_id)
        self._record(queue_id, _Progress(attempts=int(attempts)))

    def record_hold(self, queue_id: str, on_hold: bool) -> None:
        """Record an operator's hold (or its release): a held message stays held across
        restarts until released."""
        self._known(queue_id)
        self._record(queue_id, _Progress(hold=on_hold))

    def remove(self, queue_id: str) -> None:
        """Forget a message whose recipients are all final; its .msg (or its line in the
        segment's .removed) goes first, since an orphan .state is cleaned up on open while
        an orphan .msg would be delivered again."""
        self._known(queue_id)
        self._discard(queue_id)

    def _record(self, queue_id: str, progress: _Progress) -> None:
        """Append now; while the spool is not writable, or this message already waits, or the
        append fails: keep it in memory for the watcher (no log line per record)."""
        if self.writable and queue_id not in self._unwritten:
            self._stated.add(queue_id)
            try:
                self._append(queue_id, progress.lines())
                return
            except OSError:
                self._suspect()
        self._unwritten.setdefault(queue_id, _Progress()).merge(progress)
        self._changed()

    def _discard(self, queue_id: str) -> None:
        """Unlink on the spool's threads, off the event loop: nothing waits for a delete, and
        one that a crash undoes only means a duplicate delivery, never a loss. Removals
        made while a batch of them is on a thread go together in the next (one thread
        hand-off per batch, not per message). One the disk refuses (read-only) is
        remembered and done again when it can be."""
        self._messages.pop(queue_id, None)
        if self._unwritten.pop(queue_id, None) is not None:
            self._changed()
        self._queue_removal(self._removal(queue_id))

    def _queue_removal(self, removal: _Removal) -> None:
        if self._pool is not None and not self._closed:
            self._to_unlink.append(removal)
            if self._unlinking is None and self._committer is None:  # else: with its batch
                self._unlink_next()
        elif self._remove_files(removal) is not None:
            self._unremoved.add(removal)
            self._changed()

    def _removal(self, queue_id: str) -> _Removal:
        """What removing this message deletes; its segment's bookkeeping is done here, on
        the loop, so that the threads only ever touch files."""
        states = (queue_id,) if queue_id in self._stated else ()
        self._stated.discard(queue_id)
        where = self._located.pop(queue_id, None)
        if where is None:
            return _Removal((queue_id,), None, False, states)
        segment = where[0]
        live = self._segments.get(segment, set())
        live.discard(queue_id)
        if not live:
            self._segments.pop(segment, None)
        return _Removal((queue_id,), segment, not live, states)

    # -- old segments: their remaining messages get files of their own ----------------------

    def _schedule_retire(self) -> None:
        if self._pool is None or self._closed:
            return
        delay = min(60.0, max(1.0, self._segment_keep_s / 5))
        self._retirer = asyncio.get_running_loop().call_later(delay, self._retire_soon)

    def _retire_soon(self) -> None:
        task = asyncio.get_running_loop().create_task(self.retire_segments())
        task.add_done_callback(self._retired)

    def _retired(self, task: asyncio.Task[int]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("spool: retiring old segments failed", exc_info=task.exception())
        self._schedule_retire()

    async def retire_segments(self) -> int:
        """Segments stored ``segment_keep_s`` ago (a restart does not reset their age) that
        still hold messages: write each of those (up to ``RETIRE_MAX``) as a ``.msg`` of its
        own, synced, then strike it from its segment (whose file goes with its last
        message). A segment is kept on disk until its last message is finished; deferred or
        held mail would keep its batch's delivered mail there for days. How many were
        moved. A crash between the two steps leaves both: at the next start the ``.msg``
        counts and the record is skipped."""
        if self._pool is None or self._closed or self._retiring is not None:
            return 0
        if not self.writable:  # a full disk: the watcher's probes say when it takes writes
            return 0
        # a segment's name begins with its first message's queue id, which begins with the
        # time it was stored (ms): those named below this were stored segment_keep_s ago
        due = queue_id_floor(time.time() - self._segment_keep_s + 0.001)
        jobs: list[tuple[str, list[tuple[str, int, int]]]] = []
        count = 0
        for stem, live in self._segments.items():
            if stem[:16] >= due or count >= RETIRE_MAX:
                continue
            ids = sorted(live)[: RETIRE_MAX - count]
            members = [(q, *self._located[q][1:]) for q in ids if q in self._located]
            if members:
                jobs.append((stem, members))
                count += len(members)
        if not jobs:
            return 0
        loop = asyncio.get_running_loop()
        self._retiring = loop.run_in_executor(self._pool, self._copy_out, jobs)
        try:
            copied = await self._retiring
        finally:
            self._retiring = None
        moved: dict[str, list[str]] = {}
        for stem, queue_id in copied:
            where = self._located.get(queue_id)
            if where is not None and where[0] == stem:  # still spooled: now a .msg file
                del self._located[queue_id]
                self._segments.get(stem, set()).discard(queue_id)
                moved.setdefault(stem, []).append(queue_id)
            else:  # finished while it was copied: the copy goes too
                self._queue_removal(_Removal((queue_id,), None, False, ()))
        for stem, ids in moved.items():
            last = not self._segments.get(stem)
            if last:
                self._segments.pop(stem, None)
            self._queue_removal(_Removal(tuple(ids), stem, last, ()))
        if copied:
            log.info("spool: %d deferred message(s) moved out of old segments", len(copied))
        return len(copied)

    def _copy_out(
        self, jobs: list[tuple[str, list[tuple[str, int, int]]]]
    ) -> list[tuple[str, str]]:
        """Blocking: each record, checked, as a ``.msg`` in incoming/, renamed into queue/,
        then queue/ synced. A record that does not check is left in its segment; any other
        error takes every copy back (nothing was struck from a segment yet)."""
        copied: list[tuple[str, str]] = []
        try:
            for stem, members in jobs:
                fd = os.open(self.queue / f"{stem}.seg", os.O_RDONLY | os.O_CLOEXEC)
                try:
                    for queue_id, offset, length in members:
                        record = os.pread(fd, length, offset)
                        try:
                            _decode(record, queue_id)
                        except ValueError as exc:
                            log.warning("spool: %s in %s does not check: %s", queue_id, stem, exc)
                            continue
                        name = f"{queue_id}.msg"
                        self._write_file(self.incoming / name, record)
                        try:
                            os.rename(self.incoming / name, self.queue / name)
                        except OSError:  # left in incoming/, it would block every next round
                            _unlink(self.incoming / name)
                            raise
                        copied.append((stem, queue_id))
                finally:
                    os.close(fd)
            if copied and self._fsync:
                os.fsync(self._queue_fd)
        except OSError as exc:
            log.warning("spool: old segments not retired now: %s", _reason(exc))
            for _, queue_id in copied:
                _unlink(self.queue / f"{queue_id}.msg")
            return []
        return copied

    def _unlink_next(self) -> None:
        assert self._pool is not None
        trip, self._to_unlink = _trip(self._to_unlink), []
        future = asyncio.get_running_loop().run_in_executor(self._pool, self._unlink_all, trip)
        self._unlinking = future
        future.add_done_callback(partial(self._unlinked, trip))

    def _unlinked(self, trip: list[_Removal], future: asyncio.Future[list[_Removal]]) -> None:
        self._unlinking = None
        failed = future.cancelled() or future.exception() is not None
        left = trip if failed else future.result()
        if left:
            self._unremoved.update(left)
            self._changed()
            self._suspect()
        if self._to_unlink and self._pool is not None and self._committer is None:
            self._unlink_next()  # else they go with the committer's next batch, or after it

    def _unlink_all(self, trip: list[_Removal]) -> list[_Removal]:
        """Blocking; the removals not done: from the first error on (a disk that refuses
        one refuses the next; the watcher tries again)."""
        for i, removal in enumerate(trip):
            if self._remove_files(removal) is not None:
                return trip[i:]
        return []

    def _remove_files(self, removal: _Removal) -> OSError | None:
        """Blocking; the first error, if any (the .state files are kept while the message
        is still there)."""
        try:
            if removal.segment is None:
                for queue_id in removal.queue_ids:
                    (self.queue / f"{queue_id}.msg").unlink(missing_ok=True)
            elif removal.last:
                (self.queue / f"{removal.segment}.seg").unlink(missing_ok=True)
                (self.queue / f"{removal.segment}.removed").unlink(missing_ok=True)
            else:
                lines = "".join(f"{q}\n" for q in removal.queue_ids)
                self._append_to(self.queue / f"{removal.segment}.removed", lines)
            for queue_id in removal.states:
                (self.queue / f"{queue_id}.state").unlink(missing_ok=True)
        except OSError as exc:
            return exc
        return None

    def _known(self, queue_id: str) -> SpooledMessage:
        if queue_id not in self._messages:
            raise SpoolError(f"no message {queue_id!r} in the spool")
        return self._messages[queue_id]

    def _append(self, queue_id: str, lines: str) -> None:
        self._append_to(self.queue / f"{queue_id}.state", lines)

    @staticmethod
    def _append_to(path: Path, lines: str) -> None:
        """Append records. A line that a full disk tore earlier is ended first, so that it
        cannot swallow the next one (a torn record either lacks its disposition and is
        ignored, or has all its indices: either way safe; a torn id is no id)."""
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        try:
            data = lines.encode()
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":
                data = b"\n" + data
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
        finally:
            os.close(fd)

    # -- a disk that cannot be written ------------------------------------------------------

    def _probe(self) -> OSError | None:
        """Blocking: write and sync one page where stores write, then remove it. None if the
        disk took it; else its error (ENOSPC, EROFS, EIO...)."""
        path = self.incoming / f"probe-{os.getpid()}-{next(_probes)}"
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                os.write(fd, b"\0" * PROBE_BYTES)
                if self._fsync:
                    os.fdatasync(fd)
            finally:
                os.close(fd)
            os.unlink(path)
        except OSError as exc:
            _unlink(path)
            return exc
        return None

    def _set_writable(self, problem: OSError | None) -> None:
        """Log each transition once (not once per message or retry) and start the watcher."""
        if problem is None:
            if not self.writable:
                self.writable, self.fault = True, None
                log.warning(
                    "spool %s writable again after %.0fs; progress kept in memory is written",
                    self.directory,
                    time.monotonic() - self._fault_since,
                )
                self._changed()
            return
        if self.writable:
            self.writable, self.fault = False, _reason(problem)
            self._fault_since = time.monotonic()
            log.error(
                "spool %s not writable (%s): new mail is answered 451; deliveries go on and "
                "what they finish is kept in memory until it can be written (%d message(s) "
                "now); probing every %.0fs",
                self.directory,
                self.fault,
                self.unrecorded,
                PROBE_INTERVAL_S,
            )
            self._changed()
        self._start_watcher()

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change()

    def _suspect(self) -> None:
        """A write or unlink failed: news while writable (probe at once), else the watcher
        already probes on its own time (no probe per failed record)."""
        if self.writable:
            self._wake_watcher()
        else:
            self._start_watcher()

    def _wake_watcher(self) -> None:
        """Probe and write the backlog now: start the watcher, or end its sleep."""
        self._wake.set()
        self._start_watcher()

    def _start_watcher(self) -> None:
        if self._watcher is None and self._pool is not None and not self._closed:
            self._watcher = asyncio.get_running_loop().create_task(self._watch())

    async def _watch(self) -> None:
        """Until the disk takes writes and nothing waits in memory: probe, write the backlog,
        then sleep ``PROBE_INTERVAL_S`` (or until woken by a store that worked)."""
        loop = asyncio.get_running_loop()
        try:
            while self._pool is not None and not self._closed:
                self._wake.clear()
                problem = await loop.run_in_executor(self._pool, self._probe)
                if problem is None:
                    problem = await self._flush()
                self._set_writable(problem)
                if problem is None:
                    if not (self._unwritten or self._unremoved):
                        return
                    continue  # more arrived meanwhile
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), PROBE_INTERVAL_S)
        finally:
            self._watcher = None

    async def _flush(self) -> OSError | None:
        """Write what waits in memory (on a thread); what fails goes back, with the error."""
        if not (self._unwritten or self._unremoved) or self._pool is None:
            return None
        unwritten, self._unwritten = self._unwritten, {}
        unremoved, self._unremoved = self._unremoved, set()
        self._stated.update(unwritten)
        loop = asyncio.get_running_loop()
        left, problem = await loop.run_in_executor(
            self._pool, self._write_backlog, unwritten, unremoved
        )
        for queue_id, progress in left.items():
            if queue_id in self._messages:  # not removed meanwhile
                self._unwritten.setdefault(queue_id, _Progress()).merge(progress)
        self._unremoved |= unremoved
        self._changed()
        return problem

    def _write_backlog(
        self, unwritten: dict[str, _Progress], unremoved: set[_Removal]
    ) -> tuple[dict[str, _Progress], OSError | None]:
        """Blocking: removals first (the unlinks free room), then appends; stops at the
        first error (the disk is still sick: no thousand failing calls). ``unremoved``
        keeps what is left; returns the progress left and the error."""
        for removal in sorted(unremoved, key=lambda r: (not r.last, r.queue_ids)):
            problem = self._remove_files(removal)
            if problem is not None:
                return unwritten, problem
            unremoved.discard(removal)
        left = dict(unwritten)
        for queue_id, progress in unwritten.items():
            try:
                self._append(queue_id, progress.lines())
            except OSError as exc:
                return left, exc
            del left[queue_id]
        return left, None

    def _report_unrecorded(self) -> None:
        """At close: progress that never reached the disk, named in one line, since the next
        start delivers these again (the operator may remove them, or expect duplicates)."""
        ids = [f"{q}(finished)" for q in sorted(q for r in self._unremoved for q in r.queue_ids)]
        ids += [  # attempt counts alone are left out: losing them only restarts the backoff
            f"{q}(done {','.join(map(str, sorted(p.done)))})"
            for q, p in sorted(self._unwritten.items())
            if p.done
        ]
        if not ids:
            return
        more = f" and {len(ids) - REPORT_MAX_IDS} more" if len(ids) > REPORT_MAX_IDS else ""
        log.error(
            "spool %s: the progress of %d message(s) could not be written (%s); the next start "
            "delivers them again unless they are removed: %s%s",
            self.directory,
            len(ids),
            self.fault or "not writable",
            " ".join(ids[:REPORT_MAX_IDS]),
            more,
        )

    async def close(self) -> None:
        """Finish the pending batches and removals, try the backlog a last time, then stop
        the threads and release the spool lock."""
        self._closed = True
        if self._retirer is not None:
            self._retirer.cancel()
        while self._retiring is not None:
            await asyncio.wait([self._retiring])
        while self._committer is not None:
            await asyncio.shield(self._committer)
        if self._watcher is not None:  # ends after its probe or write (not cut in half)
            self._wake.set()
            await self._watcher
        while self._unlinking is not None:  # a batch ending starts the next, if any waits
            await asyncio.wait([self._unlinking])
        if self._pool is not None:
            await self._flush()
            self._report_unrecorded()
            self._pool.shutdown()
            self._pool = None
        self._release_fds()

    def _release_fds(self) -> None:
        for fd in (self._queue_fd, self._lock_fd):
            if fd >= 0:
                os.close(fd)
        self._queue_fd = self._lock_fd = -1

    def oldest_received_at(self) -> float | None:
        """When the oldest message still spooled was received (its 250), seconds since the
        epoch; None when the spool holds none. In memory: no disk access."""
        return min((m.received_at for m in self._messages.values()), default=None)

    @staticmethod
    def oldest_on_disk(directories: Iterable[Path]) -> float | None:
        """The same for spools this process has not opened (the supervisor of ``--workers``
        reads its workers'): from the queue file names alone, since a queue id begins with
        the time it was stored in ms and sorts by it (a segment: its first message's)."""
        names = (p.stem[:16] for p in _queue_files(directories) if _stored(p.name))
        oldest = min(names, default=None)
        if oldest is None:
            return None
        ms = 0
        for char in oldest[:9]:  # the top 45 of 80 bits
            ms = ms * 32 + _ALPHABET.index(char)
        return ms / 1000

    @staticmethod
    def count_on_disk(directories: Iterable[Path]) -> int:
        """How many messages spools this process has not opened hold: a .msg each, a
        segment the count in its name less its ``.removed`` list."""
        total = 0
        for p in _queue_files(directories):
            if not _stored(p.name):
                continue
            count = p.stem.partition("-")[2]
            gone = _removed_ids(p.with_suffix(".removed")) if count else ()
            total += int(count) - len(gone) if count else 1
        return total


def _queue_files(directories: Iterable[Path]) -> Iterable[Path]:
    """The files in the queue/ of each spool directory (one not made yet has none)."""
    for d in directories:
        with contextlib.suppress(FileNotFoundError, NotADirectoryError):
            yield from (d / "queue").iterdir()


def _stored(name: str) -> bool:
    """A name of a spooled file: ``<id>.msg`` or ``<id>-<count>.seg``."""
    stem, _, ext = name.partition(".")
    return (ext == "msg" and bool(_ID_RE.fullmatch(stem))) or (
        ext == "seg" and bool(_SEGMENT_RE.fullmatch(stem))
    )


def _removed_ids(path: Path) -> set[str]:
    """The ids on a segment's ``.removed`` list (none if it has none); a line torn by a crash
    is no id."""
    try:
        text = path.read_bytes().decode(errors="replace")
    except FileNotFoundError:
        return set()
    return {line[:-1] for line in text.splitlines(keepends=True) if _ID_RE.fullmatch(line[:-1])}
