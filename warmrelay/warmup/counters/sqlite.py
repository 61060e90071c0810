"""SQLite counters: the embedded default.

Survives restarts and is shared by every relay process on one host. Blocking
calls run on threads of their own (one writing, one reading, each with its
connection) so the event loop keeps serving SMTP; in WAL mode reads never
wait for a writer.

Scaling with processes (``serve --workers N``) without giving up exactness:

* Coalescing: the reservations and releases waiting in one process go to the
  database as ONE ``BEGIN IMMEDIATE`` transaction (``Coalescer``): each
  operation is evaluated in arrival order against the running counts, so two
  operations of one batch can never together exceed a cap, the sums are
  written, one COMMIT, and every caller gets its own grant. SQLite's write
  lock still serialises the batches of all processes: read-check-increment
  cannot race. A failure fails every operation of the batch (CounterError);
  none is granted.
* No busy-handler convoy: SQLite's busy handler sleeps 1, 2, 5 ... 100 ms
  whatever the moment the lock frees, so waiting writers pile up. Every write
  transaction of ours first takes ``WriterLock``, a first-come-first-served
  lock across processes on the sidecar file ``<database>.lock``: the kernel
  wakes the next writer as soon as the previous one is done, so ``BEGIN
  IMMEDIATE`` normally finds the database free. It only orders our writers:
  SQLite's lock alone guarantees exactness, and its busy timeout stays the
  safety net (another writer, e.g. the sqlite3 shell). A process that dies
  holding either lock loses it at once (the kernel drops both); one stuck
  while holding it (stopped, a hung disk) makes the others' writes fail
  after the busy timeout (CounterError), as SQLite would, and a write that
  failed that way never commits later.
* Checkpoints (copying the log into the database, with an fsync) run on the
  reading thread every ``CHECKPOINT_EVERY`` commits, not inside a commit
  where every other writer would wait for them.

Durability: WAL with ``synchronous=NORMAL`` — a committed count survives a
crash of the process (kill -9); a power cut may lose the last few
milliseconds of counts.

Failures are visible as with Redis: a call that fails (corrupt or unreadable
file, disk full, locked past the busy timeout) sets ``healthy`` to false and
logs once; the connection is dropped so the next try opens the file afresh,
and for a short back-off every call raises ``CounterError`` at once (a dead
store is not hammered, and warming IPs pause while mail goes via the pool).
The first call that succeeds again logs the recovery.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import queue
import sqlite3
import threading
import time
import weakref
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

from warmrelay.errors import CounterError
from warmrelay.warmup.counters.base import (
    RELEASE_ID_TTL_S,
    Answer,
    Coalescer,
    CounterKey,
    Limit,
    Pending,
    grantable,
)

T = TypeVar("T")

log = logging.getLogger("warmrelay.counters")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS counters (
    key TEXT PRIMARY KEY,
    count INTEGER NOT NULL,
    updated REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS state (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS released (
    id TEXT PRIMARY KEY,
    at REAL NOT NULL
) WITHOUT ROWID;
"""
_UPSERT = (
    "INSERT INTO counters(key, count, updated) VALUES(?, ?, ?) "
    "ON CONFLICT(key) DO UPDATE SET count = excluded.count, updated = excluded.updated"
)
_IN_MAX = 500  # keys per SELECT ... IN (...) (older SQLite allow 999 parameters)
CHECKPOINT_EVERY = 1000  # our commits between two checkpoints of the log (off the lock)
_KEEP_S = 8 * 86400.0  # rows untouched for this long belong to windows long past
BACKOFF_S = 1.0  # after a failure, do not touch the file again before this
PRUNE_EVERY_S = 3600.0  # applied release ids older than RELEASE_ID_TTL_S go this often


class SqliteCounters:
    def __init__(self, path: Path, *, busy_timeout_s: float = 30.0) -> None:
        self.path = path
        self._busy_timeout_s = busy_timeout_s
        # writes (one transaction at a time, under the writers' lock) and reads (WAL: never wait
        # for a writer) each on a thread and a connection of their own
        self._writer = _Thread("counters-write")
        self._reader = _Thread("counters-read")
        self._write_db: sqlite3.Connection | None = None
        self._read_db: sqlite3.Connection | None = None
        self._lock = WriterLock(path.with_name(path.name + ".lock"))
        self._batches = Coalescer(self._apply)
        self._commits = 0  # since the last checkpoint
        self._pruned_at = time.monotonic()  # (at connect, too)
        self._checkpointing: asyncio.Future[None] | None = None
        self.healthy = True
        self._failed_at = float("-inf")

    def _connect(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        return sqlite3.connect(
            self.path, timeout=self._busy_timeout_s, isolation_level=None, check_same_thread=False
        )

    def _writer_conn(self) -> sqlite3.Connection:
        if self._write_db is None:
            db = self._connect()
            try:
                with self._lock.held():  # creating the file, the schema, pruning: writes
                    db.execute("PRAGMA journal_mode=WAL")
                    db.execute("PRAGMA synchronous=NORMAL")
                    # no checkpoint inside a commit, i.e. under the lock (an fsync that every
                    # other writer would wait for): _checkpoint runs them on the reading thread
                    db.execute("PRAGMA wal_autocheckpoint=0")
                    db.executescript(_SCHEMA)
                    db.execute("DELETE FROM counters WHERE updated < ?", (time.time() - _KEEP_S,))
                    _prune_released(db)
            except BaseException:
                db.close()
                raise
            self._write_db = db
        return self._write_db

    def _reader_conn(self) -> sqlite3.Connection:
        if self._read_db is None:
            db = self._connect()
            try:
                db.execute("PRAGMA synchronous=NORMAL")  # as the writer's, for checkpoints
                db.executescript(_SCHEMA)  # a write only the first time, on a new file
            except BaseException:
                db.close()
                raise
            self._read_db = db
        return self._read_db

    def _drop(self, *, writer: bool) -> None:
        """After a failure: the next try opens the file again (a connection that saw a
        damaged file may keep failing after the file was repaired)."""
        if writer:
            db, self._write_db = self._write_db, None
        else:
            db, self._read_db = self._read_db, None
        if db is not None:
            with contextlib.suppress(sqlite3.Error):
                db.close()

    def _check(self) -> None:
        if not self.healthy and time.monotonic() - self._failed_at < BACKOFF_S:
            raise CounterError(f"counters database {self.path} is failing")

    async def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """``fn`` on the reading thread."""
        self._check()

        def call() -> T:
            try:
                return fn(self._reader_conn())
            except (sqlite3.Error, OSError) as exc:
                self._drop(writer=False)
                raise CounterError(f"counters database {self.path}: {exc}") from exc

        return await self._settle(self._reader.submit(call))

    async def _write(self, fn: Callable[[sqlite3.Connection, Callable[[], None]], T]) -> T:
        """``fn(db, commit)``, a write transaction, on the writing thread under the
        writers' lock; ``fn`` calls ``commit()`` right before its COMMIT.

        Waiting is bounded by the busy timeout, the writers' lock included: past it the call
        fails (CounterError) and is abandoned, and an abandoned transaction never commits
        (it rolls back when it gets to run), unless it was committing already: then its
        answer is awaited. A caller told "failed" can rely on it.
        """
        self._check()
        job = _Job()

        def call() -> T:
            try:
                db = self._writer_conn()
                with self._lock.held():
                    job.start()
                    return fn(db, job.commit)
            except (sqlite3.Error, OSError) as exc:
                self._drop(writer=True)
                raise CounterError(f"counters database {self.path}: {exc}") from exc

        future = self._writer.submit(call)
        timer = asyncio.get_running_loop().call_later(
            self._busy_timeout_s, self._give_up, future, job
        )
        try:
            result = await self._settle(future)
        finally:
            timer.cancel()
        self._commits += 1
        if self._commits >= CHECKPOINT_EVERY and self._checkpointing is None:
            self._commits = 0
            self._checkpointing = self._reader.submit(self._checkpoint)
            self._checkpointing.add_done_callback(self._checkpointed)
        return result

    def _give_up(self, future: asyncio.Future[Any], job: _Job) -> None:
        """The busy timeout passed: fail the call, unless it is committing already."""
        if not future.done() and job.abandon():
            future.set_exception(
                CounterError(
                    f"counters database {self.path}: no write in {self._busy_timeout_s:g} s "
                    f"(locked by another process: {self._lock.path})"
                )
            )

    def _checkpoint(self) -> None:
        """Copy the log into the database (PASSIVE: writers go on meanwhile); on the
        reading thread, so no writer waits for its fsync."""
        try:
            self._reader_conn().execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
        except (sqlite3.Error, OSError):
            self._drop(writer=False)
            raise

    def _checkpointed(self, future: asyncio.Future[None]) -> None:
        self._checkpointing = None
        if not future.cancelled() and future.exception() is not None:
            log.warning(
                "counters database %s: checkpoint failed (%s); retried after %d more writes",
                self.path,
                future.exception(),
                CHECKPOINT_EVERY,
            )

    async def _settle(self, future: Awaitable[T]) -> T:
        """The answer of a call, keeping ``healthy`` and the logs up to date."""
        try:
            result = await future
        except CounterError as exc:
            if self.healthy:
                log.error(
                    "counters database %s failing (%s): warming IPs pause, mail goes via the pool",
                    self.path,
                    exc.__cause__ or exc,
                )
            self.healthy, self._failed_at = False, time.monotonic()
            raise
        if not self.healthy:
            log.warning("counters database %s answering again", self.path)
            self.healthy = True
        return result

    async def _apply(self, batch: list[Pending]) -> list[Answer]:
        """One write transaction for every reservation and release of ``batch``."""
        keys = list(dict.fromkeys(key for op in batch for key in op.keys))
        prune = time.monotonic() - self._pruned_at >= PRUNE_EVERY_S
        if prune:
            self._pruned_at = time.monotonic()
        grants = await self._write(lambda db, commit: _transact(db, batch, keys, commit, prune))
        return list(grants)

    async def reserve(self, limits: Sequence[Limit], n: int) -> int:
        if n <= 0 or not limits:
            return 0
        keys = [lim.key.encode() for lim in limits]
        return await self._batches.submit(keys, [lim.cap for lim in limits], n)

    async def release(self, keys: Sequence[CounterKey], n: int, release_id: str) -> None:
        if n <= 0 or not keys:
            return
        await self._batches.submit([k.encode() for k in keys], None, n, release_id)

    async def get(self, key: CounterKey) -> int:
        encoded = key.encode()
        return await self._read(lambda db: _count(db, encoded))

    async def counts(self, keys: Sequence[CounterKey]) -> list[int]:
        encoded = [k.encode() for k in keys]

        def read(db: sqlite3.Connection) -> list[int]:
            found: dict[str, int] = {}
            for at in range(0, len(encoded), _IN_MAX):
                chunk = encoded[at : at + _IN_MAX]
                marks = ",".join("?" * len(chunk))
                rows = db.execute(f"SELECT key, count FROM counters WHERE key IN ({marks})", chunk)
                found.update((str(k), int(c)) for k, c in rows)
            return [found.get(k, 0) for k in encoded]

        return await self._read(read)

    async def get_value(self, key: str) -> str | None:
        def read(db: sqlite3.Connection) -> str | None:
            row = db.execute("SELECT value FROM state WHERE key = ?", (key,)).fetchone()
            return str(row[0]) if row else None

        return await self._read(read)

    async def set_value(self, key: str, value: str | None) -> None:
        await self._write(lambda db, commit: _store(db, key, value, None, commit))

    async def compare_and_set(self, key: str, expected: str | None, new: str | None) -> bool:
        return await self._write(lambda db, commit: _store(db, key, new, (expected,), commit))

    async def list_values(self, prefix: str) -> dict[str, str]:
        end = _prefix_end(prefix)

        def read(db: sqlite3.Connection) -> dict[str, str]:
            # a range on the primary key (binary collation): the index, not a table scan
            if end is None:
                rows = db.execute("SELECT key, value FROM state WHERE key >= ?", (prefix,))
            else:
                rows = db.execute(
                    "SELECT key, value FROM state WHERE key >= ? AND key < ?", (prefix, end)
                )
            return {str(k): str(v) for k, v in rows}

        return await self._read(read)

    async def close(self) -> None:
        await self._batches.idle()  # queued reservations and releases are made first
        closing = [
            self._writer.submit(lambda: self._drop(writer=True)),
            self._reader.submit(lambda: self._drop(writer=False)),
        ]
        # a writer stuck behind a stopped process's lock is not waited for forever
        done, _ = await asyncio.wait(closing, timeout=self._busy_timeout_s)
        self._writer.stop()
        self._reader.stop()
        if closing[0] in done:  # else the stuck writer still uses the descriptor
            self._lock.close()


def _store(
    db: sqlite3.Connection,
    key: str,
    value: str | None,
    expected: tuple[str | None] | None,
    commit: Callable[[], None],
) -> bool:
    """Store ``value`` (None: delete) under ``key``; with ``expected``, only if the stored
    value is still ``expected[0]``. True if stored."""
    db.execute("BEGIN IMMEDIATE")  # the write lock first: nobody writes in between
    try:
        stored = True
        if expected is not None:
            row = db.execute("SELECT value FROM state WHERE key = ?", (key,)).fetchone()
            stored = (None if row is None else str(row[0])) == expected[0]
        if stored:
            if value is None:
                db.execute("DELETE FROM state WHERE key = ?", (key,))
            else:
                db.execute(
                    "INSERT INTO state(key, value) VALUES(?, ?) "
                    "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                    (key, value),
                )
        commit()
        db.execute("COMMIT")
        return stored
    except BaseException:
        _rollback(db)
        raise


def _transact(
    db: sqlite3.Connection,
    batch: Sequence[Pending],
    keys: Sequence[str],
    commit: Callable[[], None],
    prune: bool = False,
) -> list[int]:
    """Evaluate ``batch`` in order against the running counts inside one write
    transaction (``keys``: every key of the batch, once); write the keys that changed;
    COMMIT. Each operation's grant. Short: the other processes wait meanwhile.

    A release with an id is applied only if the id is new: it is recorded in the same
    transaction as the counts, so a release retried after an unknown outcome (the
    transaction committed, the answer was lost) changes nothing the second time."""
    db.execute("BEGIN IMMEDIATE")
    try:
        if prune:
            _prune_released(db)
        now = time.time()
        counts = dict.fromkeys(keys, 0)
        for at in range(0, len(keys), _IN_MAX):
            chunk = keys[at : at + _IN_MAX]
            marks = ",".join("?" * len(chunk))
            rows = db.execute(f"SELECT key, count FROM counters WHERE key IN ({marks})", chunk)
            counts.update(rows.fetchall())
        changed: set[str] = set()
        grants: list[int] = []
        for op in batch:
            if op.caps is None:  # a release: never below 0, once per id
                if op.release_id and not _first_release(db, op.release_id, now):
                    grants.append(0)
                    continue
                for key in op.keys:
                    left = max(0, counts[key] - op.n)
                    if left != counts[key]:
                        counts[key] = left
                        changed.add(key)
                grants.append(0)
                continue
            granted = grantable([counts[key] for key in op.keys], op.caps, op.n)
            if granted:
                for key in op.keys:
                    counts[key] += granted
                changed.update(op.keys)
            grants.append(granted)
        if changed:
            db.executemany(_UPSERT, [(key, counts[key], now) for key in sorted(changed)])
        commit()
        db.execute("COMMIT")
        return grants
    except BaseException:
        _rollback(db)
        raise


def _first_release(db: sqlite3.Connection, release_id: str, now: float) -> bool:
    """Record ``release_id`` as applied; False if it was before."""
    cursor = db.execute(
        "INSERT INTO released(id, at) VALUES(?, ?) ON CONFLICT(id) DO NOTHING", (release_id, now)
    )
    return cursor.rowcount == 1


def _prune_released(db: sqlite3.Connection) -> None:
    db.execute("DELETE FROM released WHERE at < ?", (time.time() - RELEASE_ID_TTL_S,))


def _rollback(db: sqlite3.Connection) -> None:
    """Undo an open transaction; a connection too broken to roll back is dropped by the
    caller (the error that got us here is the one reported)."""
    with contextlib.suppress(sqlite3.Error):
        db.execute("ROLLBACK")


def _count(db: sqlite3.Connection, key: str) -> int:
    row = db.execute("SELECT count FROM counters WHERE key = ?", (key,)).fetchone()
    return int(row[0]) if row else 0


def _prefix_end(prefix: str) -> str | None:
    """The smallest string above every string that starts with ``prefix`` (None: no bound,
    the prefix is empty or ends in the highest code point)."""
    stripped = prefix.rstrip(chr(0x10FFFF))
    if not stripped:
        return None
    return stripped[:-1] + chr(ord(stripped[-1]) + 1)


class _Abandoned(Exception):
    """The caller stopped waiting for this write: it must not commit."""


class _Job:
    """One write call, between the event loop (which may stop waiting) and the thread."""

    def __init__(self) -> None:
        self._mu = threading.Lock()
        self._state = "waiting"  # -> "committing" (thread) or "abandoned" (event loop)

    def start(self) -> None:
        with self._mu:
            if self._state == "abandoned":
                raise _Abandoned

    def commit(self) -> None:
        with self._mu:
            if self._state == "abandoned":
                raise _Abandoned
            self._state = "committing"

    def abandon(self) -> bool:
        """Give up on the call; False if it commits already (its answer is coming)."""
        with self._mu:
            if self._state == "committing":
                return False
            self._state = "abandoned"
            return True


_Call = tuple[Callable[[], Any], asyncio.AbstractEventLoop, "asyncio.Future[Any]"]


class _Thread:
    """One daemon thread running calls in order, each answering an asyncio future of the
    caller's loop. Daemon: a call stuck behind another process's lock cannot keep the
    interpreter from exiting."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._calls: queue.SimpleQueue[_Call | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def submit(self, fn: Callable[[], T]) -> asyncio.Future[T]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._loop, args=(self._calls,), name=self.name, daemon=True
            )
            self._thread.start()
            weakref.finalize(self, self._calls.put, None)  # not closed: ends when dropped
        self._calls.put((fn, loop, future))
        return future

    def stop(self) -> None:
        if self._thread is not None:
            self._calls.put(None)
            self._thread = None
            self._calls = queue.SimpleQueue()

    @staticmethod
    def _loop(calls: queue.SimpleQueue[_Call | None]) -> None:
        while (item := calls.get()) is not None:
            fn, loop, future = item
            if future.done():  # cancelled meanwhile (a read of its state only)
                continue
            try:
                outcome: tuple[bool, Any] = (True, fn())
            except BaseException as exc:
                outcome = (False, exc)
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
                loop.call_soon_threadsafe(_answer, future, *outcome)


def _answer(future: asyncio.Future[Any], ok: bool, result: Any) -> None:
    """On the caller's loop: unless it stopped waiting (abandoned, cancelled)."""
    if future.done():
        return
    if ok:
        future.set_result(result)
    else:
        future.set_exception(result)


class WriterLock:
    """First come, first served: an exclusive lock across processes, held around the
    write transactions of every process that uses the database.

    A ticket lock made of POSIX record locks (``lockf``) on bytes of a sidecar file:
    under a short lock on byte 0, a writer takes the next ticket (8 bytes stored at the
    start of the file) and locks its own slot byte; then it waits for the slot of the
    ticket before its own. Releasing wakes exactly that one successor, at once, in arrival
    order (``flock`` wakes every waiter and the first to run wins: some wait 10+ rounds).
    The kernel drops the locks of a process that dies, so a crash never blocks the
    others. Waiting is not bounded here (``SqliteCounters._write`` bounds it).

    It only orders writers: SQLite's own lock still guarantees exactness, so a lapse
    (e.g. a waiter that died frees its successor early) costs speed, never a count.
    Record locks belong to the process: one ``SqliteCounters`` per database and process
    (two would not exclude each other here). A file we may not write falls back to a
    whole-file ``flock``.
    """

    SLOTS = 1 << 16  # slot bytes, reused in turn (far more than writers ever wait at once)
    _SLOT0 = 16  # the ticket counter lives in bytes 0..7; byte 0 is also its lock

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None
        self._fifo = True

    def _open(self) -> int:
        if self._fd is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            flags = os.O_CREAT | os.O_CLOEXEC
            try:
                self._fd, self._fifo = os.open(self.path, flags | os.O_RDWR, 0o644), True
            except PermissionError:  # read access is enough to flock
                self._fd, self._fifo = os.open(self.path, flags | os.O_RDONLY), False
        return self._fd

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        fd = self._open()
        if not self._fifo:
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
            return
        mine = self._queue_up(fd)
        try:
            yield
        finally:
            fcntl.lockf(fd, fcntl.LOCK_UN, 1, mine)

    def _queue_up(self, fd: int) -> int:
        """Take a ticket, then wait for the one before it; our slot's offset."""
        fcntl.lockf(fd, fcntl.LOCK_EX, 1, 0)
        try:
            raw = os.pread(fd, 8, 0)
            ticket = int.from_bytes(raw, "little") if len(raw) == 8 else 0
            os.pwrite(fd, ((ticket + 1) % 2**64).to_bytes(8, "little"), 0)
            mine = self._SLOT0 + ticket % self.SLOTS
            fcntl.lockf(fd, fcntl.LOCK_EX, 1, mine)  # before the next ticket is taken
        finally:
            fcntl.lockf(fd, fcntl.LOCK_UN, 1, 0)
        before = self._SLOT0 + (ticket - 1) % self.SLOTS
        try:
            fcntl.lockf(fd, fcntl.LOCK_SH, 1, before)  # until our predecessor is done
            fcntl.lockf(fd, fcntl.LOCK_UN, 1, before)
        except BaseException:
            fcntl.lockf(fd, fcntl.LOCK_UN, 1, mine)
            raise
        return mine

    def close(self) -> None:
        """Only once no write is running (a stuck one keeps the descriptor)."""
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)
