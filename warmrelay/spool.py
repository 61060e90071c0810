"""Durable message spool: one file per message, group commit, quarantine of corrupt entries.

``await store()`` returns only once the message survives kill -9 and a power cut. One committer
task hands each batch of pending stores to a thread: write + fdatasync every file in incoming/
(fanned out to ``sync_threads``), rename into queue/, fsync queue/ once, resolve the batch; the
next batch accumulates meanwhile. Measured on a 2-vCPU ext4 VM (noisy disk), 4 KB messages,
stores/s for 5000 concurrent / 100 looping sessions: 1 sync thread 1300-1460 / 1450, 2 threads
1850-1970 / -, 4: 2250-2410 / 2140-2170, 8: 2290-2500 / 2340-2650; hence 8. ``.state`` appends
skip fsync: losing one can only cause a duplicate delivery, never a loss.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import itertools
import json
import logging
import os
import re
import secrets
import time
import zlib
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from warmrelay.errors import SpoolError

log = logging.getLogger("warmrelay.spool")

MAGIC = b"WARMRELAY-SPOOL 1\n"
MAX_BATCH = 512  # bounds one commit's latency when thousands of stores pile up
_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"  # Crockford base32: sorts like the numbers
_ID_RE = re.compile(r"[0-9A-HJKMNP-TV-Z]{16}")
_TOKEN_RE = re.compile(r"[A-Za-z0-9_.-]+")
_TYPES: dict[str, Any] = {"mail_from": str, "rcpt_tos": list, "received_at": int | float}
_TYPES |= {"size": int, "crc32": int, "meta": dict}
_counter = itertools.count(secrets.randbits(35))


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


@dataclass(eq=False)
class _Pending:
    message: SpooledMessage
    data: bytes
    future: asyncio.Future[None]
    error: OSError | None = None


def _encode(msg: SpooledMessage, data: bytes) -> bytes:
    h: dict[str, Any] = {"queue_id": msg.queue_id, "mail_from": msg.mail_from}
    h |= {"rcpt_tos": msg.rcpt_tos, "received_at": msg.received_at, "size": len(data)}
    h |= {"crc32": zlib.crc32(data), "meta": dict(msg.meta)}
    return MAGIC + json.dumps(h, separators=(",", ":")).encode() + b"\n"


def _decode(raw: bytes, queue_id: str) -> tuple[SpooledMessage, bytes]:
    """Validate a whole .msg file; the ValueError says what is wrong (the quarantine reason)."""
    end = raw.find(b"\n", len(MAGIC))
    if not raw.startswith(MAGIC) or end < 0:
        raise ValueError("truncated header" if raw.startswith(MAGIC) else "bad magic line")
    try:
        h: Any = json.loads(raw[len(MAGIC) : end])
    except ValueError as exc:
        raise ValueError(f"bad JSON header: {exc}") from None
    if not (
        isinstance(h, dict)
        and h.get("queue_id") == queue_id
        and all(isinstance(h.get(k), t) for k, t in _TYPES.items())
        and all(isinstance(v, str) for v in (*h["rcpt_tos"], *h["meta"].values()))
    ):
        raise ValueError("header fields missing or of the wrong type")
    data = raw[end + 1 :]
    if len(data) != h["size"]:
        raise ValueError(f"data length {len(data)} != {h['size']}")
    if zlib.crc32(data) != h["crc32"]:
        raise ValueError("data CRC mismatch")
    rcpts, when = tuple(h["rcpt_tos"]), float(h["received_at"])
    return SpooledMessage(queue_id, h["mail_from"], rcpts, when, h["meta"], len(data)), data


def _unlink(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.unlink()


class Spool:
    """The durable store between the listener and the scheduler."""

    def __init__(self, directory: Path, *, fsync: bool = True, sync_threads: int = 8) -> None:
        self.directory = Path(directory)
        self.incoming, self.queue = self.directory / "incoming", self.directory / "queue"
        self.quarantine = self.directory / "quarantine"
        self.batches_committed = 0  # observability: far below the message count under load
        self._fsync, self._sync_threads = fsync, sync_threads
        self._messages: dict[str, SpooledMessage] = {}
        self._pending: list[_Pending] = []
        self._committer: asyncio.Task[None] | None = None
        self._pool: ThreadPoolExecutor | None = None  # set while open
        self._lock_fd = self._queue_fd = -1
        self._closed = False

    def __len__(self) -> int:
        return len(self._messages)

    async def open(self) -> list[RecoveredMessage]:
        """Create the layout, drop unacknowledged files, load ``queue/`` oldest first."""
        if self._lock_fd >= 0 or self._closed:
            raise SpoolError("spool already opened")
        try:
            recovered = await asyncio.to_thread(self._recover)
        except OSError as exc:
            self._release_fds()
            raise SpoolError(exc.errno, f"cannot open spool {self.directory}: {exc}") from exc
        self._messages = {r.message.queue_id: r.message for r in recovered}
        # One thread runs the batch (never two at once), the others write and sync its files;
        # not the loop's default executor, so other to_thread() users cannot hold up commits.
        self._pool = ThreadPoolExecutor(1 + self._sync_threads, thread_name_prefix="spool")
        return recovered

    def _recover(self) -> list[RecoveredMessage]:
        for d in (self.incoming, self.queue, self.quarantine):
            d.mkdir(parents=True, exist_ok=True)
        # Two relays on one spool would deliver each other's mail: refuse the second one.
        self._lock_fd = os.open(self.directory / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
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
        names = {p.name for p in self.queue.iterdir()}
        found: list[RecoveredMessage] = []
        for name in names:
            stem, _, ext = name.partition(".")
            if ext == "msg" and _ID_RE.fullmatch(stem):
                try:
                    found.append(self._load(stem))
                except (OSError, ValueError) as exc:
                    self._quarantine(name, str(exc))
            elif ext != "state":
                self._quarantine(name, "unexpected file name")
        loaded = {r.message.queue_id for r in found}
        for name in names - {f"{q}.state" for q in loaded}:
            stem, _, ext = name.partition(".")
            if ext == "state" and f"{stem}.msg" in names:
                self._quarantine(name, "its message was quarantined")
            elif ext == "state":  # remove() was interrupted between its two unlinks
                _unlink(self.queue / name)
        return sorted(found, key=lambda r: (r.message.received_at, r.message.queue_id))

    def _load(self, queue_id: str) -> RecoveredMessage:
        msg, _ = _decode((self.queue / f"{queue_id}.msg").read_bytes(), queue_id)
        done: dict[int, str] = {}
        attempts = 0
        with contextlib.suppress(FileNotFoundError):
            text = (self.queue / f"{queue_id}.state").read_bytes().decode(errors="replace")
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
                    else:
                        raise ValueError("unknown record")
                except ValueError as exc:
                    log.warning("%s.state: ignored line %r: %s", queue_id, line, exc)
        return RecoveredMessage(msg, done, attempts)

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
        """One batch at a time, so the next batch fills up while this one syncs."""
        loop = asyncio.get_running_loop()
        try:
            while self._pending and self._pool is not None:
                batch = [i for i in self._pending[:MAX_BATCH] if not i.future.cancelled()]
                del self._pending[:MAX_BATCH]
                try:
                    await loop.run_in_executor(self._pool, self._commit, batch)
                    self.batches_committed += 1
                except Exception as exc:  # a bug, not a disk error: fail this batch, go on
                    log.exception("spool commit failed")
                    for item in batch:
                        item.error = item.error or OSError(f"spool commit failed: {exc!r}")
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

    def _commit(self, batch: list[_Pending]) -> None:
        """Blocking: write+fdatasync each file, rename into queue/, fsync queue/ once.

        A file's own write or fsync error fails only its store; a failed directory fsync
        fails (and takes back) every store of the batch."""
        assert self._pool is not None
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

    def _write(self, item: _Pending) -> None:
        path = self.incoming / f"{item.message.queue_id}.msg"
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o640)
            try:
                for chunk in (_encode(item.message, item.data), item.data):
                    view = memoryview(chunk)
                    while view:
                        view = view[os.write(fd, view) :]
                if self._fsync:
                    os.fdatasync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            item.error = exc
            _unlink(path)

    def read_data(self, queue_id: str) -> bytes:
        """The raw message bytes, checked against the header's length and CRC."""
        if not _ID_RE.fullmatch(queue_id):
            raise SpoolError(f"invalid queue id {queue_id!r}")
        try:
            return _decode((self.queue / f"{queue_id}.msg").read_bytes(), queue_id)[1]
        except OSError as exc:
            raise SpoolError(exc.errno, f"cannot read {queue_id}: {exc.strerror}") from exc
        except ValueError as exc:
            raise SpoolError(f"{queue_id} is corrupt: {exc}") from exc

    def mark_done(self, queue_id: str, indices: Iterable[int], disposition: str) -> None:
        """Record final dispositions so that a restart does not deliver to them again."""
        idx, n = sorted(set(indices)), len(self._known(queue_id).rcpt_tos)
        if not _TOKEN_RE.fullmatch(disposition) or any(not 0 <= i < n for i in idx):
            raise ValueError(f"bad disposition {disposition!r} or index in {idx} (0..{n - 1})")
        if idx:
            self._append(queue_id, f"done {','.join(map(str, idx))} {disposition}\n")

    def record_attempt(self, queue_id: str, attempts: int) -> None:
        """Record the attempt count so that backoff and lifetime go on after a restart."""
        self._known(queue_id)
        self._append(queue_id, f"attempts {int(attempts)}\n")

    def remove(self, queue_id: str) -> None:
        """Forget a message whose recipients are all final; .msg goes first, since an orphan
        .state is cleaned up on open while an orphan .msg would be delivered again."""
        self._known(queue_id)
        self._discard(queue_id)

    def _discard(self, queue_id: str) -> None:
        """Unlink on the spool's threads, off the event loop: nothing waits for a delete, and
        one that a crash undoes only means a duplicate delivery, never a loss."""
        self._messages.pop(queue_id, None)
        if self._pool is not None and not self._closed:
            self._pool.submit(self._unlink, queue_id)
        else:
            self._unlink(queue_id)

    def _unlink(self, queue_id: str) -> None:
        for ext in ("msg", "state"):
            try:
                (self.queue / f"{queue_id}.{ext}").unlink(missing_ok=True)
            except OSError as exc:
                log.error("cannot remove %s.%s from the spool: %s", queue_id, ext, exc)

    def _known(self, queue_id: str) -> SpooledMessage:
        if queue_id not in self._messages:
            raise SpoolError(f"no message {queue_id!r} in the spool")
        return self._messages[queue_id]

    def _append(self, queue_id: str, line: str) -> None:
        try:
            with open(self.queue / f"{queue_id}.state", "ab") as f:
                f.write(line.encode())
        except OSError as exc:
            raise SpoolError(exc.errno, f"cannot update {queue_id}: {exc.strerror}") from exc

    async def close(self) -> None:
        """Finish the pending batches, then stop the threads and release the spool lock."""
        self._closed = True
        while self._committer is not None:
            await asyncio.shield(self._committer)
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None
        self._release_fds()

    def _release_fds(self) -> None:
        for fd in (self._queue_fd, self._lock_fd):
            if fd >= 0:
                os.close(fd)
        self._queue_fd = self._lock_fd = -1
