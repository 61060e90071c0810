"""SQLite counters: the embedded default.

Survives restarts and is shared by every relay process on one host: each
reservation is one ``BEGIN IMMEDIATE`` transaction, which SQLite serialises
across processes, so read-check-increment cannot race. Blocking calls run on
one dedicated thread per process so the event loop keeps serving SMTP.

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
import logging
import sqlite3
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from warmrelay.counters.base import CounterKey, Limit, grantable
from warmrelay.errors import CounterError

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
"""
_KEEP_S = 8 * 86400.0  # rows untouched for this long belong to windows long past
BACKOFF_S = 1.0  # after a failure, do not touch the file again before this


class SqliteCounters:
    def __init__(self, path: Path, *, busy_timeout_s: float = 30.0) -> None:
        self.path = path
        self._busy_timeout_s = busy_timeout_s
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="counters")
        self._db: sqlite3.Connection | None = None
        self.healthy = True
        self._failed_at = float("-inf")

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(
                self.path,
                timeout=self._busy_timeout_s,
                isolation_level=None,
                check_same_thread=False,
            )
            try:
                db.execute("PRAGMA journal_mode=WAL")
                db.execute("PRAGMA synchronous=NORMAL")
                db.executescript(_SCHEMA)
                db.execute("DELETE FROM counters WHERE updated < ?", (time.time() - _KEEP_S,))
            except BaseException:
                db.close()
                raise
            self._db = db
        return self._db

    def _drop(self) -> None:
        """After a failure: the next try opens the file again (a connection that saw a
        damaged file may keep failing after the file was repaired)."""
        db, self._db = self._db, None
        if db is not None:
            with contextlib.suppress(sqlite3.Error):
                db.close()

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        if not self.healthy and time.monotonic() - self._failed_at < BACKOFF_S:
            raise CounterError(f"counters database {self.path} is failing")

        def call() -> T:
            try:
                return fn(self._conn())
            except (sqlite3.Error, OSError) as exc:
                self._drop()
                raise CounterError(f"counters database {self.path}: {exc}") from exc

        try:
            result = await asyncio.get_running_loop().run_in_executor(self._executor, call)
        except CounterError as exc:
            if self.healthy:
                log.error(
                    "counters database %s failing (%s): warming IPs pause, mail goes via the pool",
                    self.path,
                    exc.__cause__,
                )
            self.healthy, self._failed_at = False, time.monotonic()
            raise
        if not self.healthy:
            log.warning("counters database %s answering again", self.path)
            self.healthy = True
        return result

    async def reserve(self, limits: Sequence[Limit], n: int) -> int:
        if n <= 0 or not limits:
            return 0
        keys = [lim.key.encode() for lim in limits]
        caps = [lim.cap for lim in limits]

        def tx(db: sqlite3.Connection) -> int:
            db.execute("BEGIN IMMEDIATE")
            try:
                counts = [_count(db, k) for k in keys]
                granted = grantable(counts, caps, n)
                if granted:
                    now = time.time()
                    db.executemany(
                        "INSERT INTO counters(key, count, updated) VALUES(?, ?, ?) "
                        "ON CONFLICT(key) DO UPDATE SET count = count + excluded.count, "
                        "updated = excluded.updated",
                        [(k, granted, now) for k in keys],
                    )
                db.execute("COMMIT")
                return granted
            except BaseException:
                db.execute("ROLLBACK")
                raise

        return await self._run(tx)

    async def release(self, keys: Sequence[CounterKey], n: int) -> None:
        if n <= 0 or not keys:
            return
        encoded = [(n, k.encode()) for k in keys]

        def tx(db: sqlite3.Connection) -> None:
            db.executemany("UPDATE counters SET count = MAX(0, count - ?) WHERE key = ?", encoded)

        await self._run(tx)

    async def get(self, key: CounterKey) -> int:
        encoded = key.encode()
        return await self._run(lambda db: _count(db, encoded))

    async def get_value(self, key: str) -> str | None:
        def read(db: sqlite3.Connection) -> str | None:
            row = db.execute("SELECT value FROM state WHERE key = ?", (key,)).fetchone()
            return str(row[0]) if row else None

        return await self._run(read)

    async def set_value(self, key: str, value: str | None) -> None:
        def write(db: sqlite3.Connection) -> None:
            if value is None:
                db.execute("DELETE FROM state WHERE key = ?", (key,))
            else:
                db.execute(
                    "INSERT INTO state(key, value) VALUES(?, ?) "
                    "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                    (key, value),
                )

        await self._run(write)

    async def compare_and_set(self, key: str, expected: str | None, new: str | None) -> bool:
        def tx(db: sqlite3.Connection) -> bool:
            db.execute("BEGIN IMMEDIATE")  # the write lock first: nobody writes in between
            try:
                row = db.execute("SELECT value FROM state WHERE key = ?", (key,)).fetchone()
                stored = (None if row is None else str(row[0])) == expected
                if stored:
                    if new is None:
                        db.execute("DELETE FROM state WHERE key = ?", (key,))
                    else:
                        db.execute(
                            "INSERT INTO state(key, value) VALUES(?, ?) "
                            "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                            (key, new),
                        )
                db.execute("COMMIT")
                return stored
            except BaseException:
                db.execute("ROLLBACK")
                raise

        return await self._run(tx)

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

        return await self._run(read)

    async def close(self) -> None:
        await asyncio.get_running_loop().run_in_executor(self._executor, self._drop)
        self._executor.shutdown(wait=True)


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
