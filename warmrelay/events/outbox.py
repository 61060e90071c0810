"""The outbox: events written down before they are posted, removed only after the
receiver's 2xx (at least once).

One SQLite file per relay process (``state.dir/events/outbox.sqlite3``; worker i of
``--workers``: ``outbox-i.sqlite3``): a process posts only what it wrote, in the order it
wrote it, so a message's ``processed`` goes before its ``delivered`` (the process that
accepted a message delivers it). WAL with ``synchronous=NORMAL``: a written event
survives a crash of the process (SIGKILL); a power cut may lose the last few
milliseconds, as the counters may. An insert is one short transaction in the caller's
thread (tens of microseconds): the data path never waits for the webhook, only for the
local disk, and a disk that refuses costs events (counted), never mail.
"""

from __future__ import annotations

import enum
import logging
import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("warmrelay.events")

SCHEMA = (
    "CREATE TABLE IF NOT EXISTS events ("
    "id INTEGER PRIMARY KEY AUTOINCREMENT, created REAL NOT NULL, body TEXT NOT NULL)"
)


class Put(enum.Enum):
    STORED = "stored"
    FULL = "outbox_full"  # events.webhook.max_events reached: counted lost
    FAILED = "outbox_error"  # the disk refused: counted lost


@dataclass(frozen=True)
class Row:
    id: int
    created: float
    body: str  # the event's JSON


def checkpoint(path: Path) -> None:
    """Copy the WAL back into the database (PASSIVE: never waits for the writer), on its
    own connection: called from a thread while the relay writes on."""
    db = sqlite3.connect(path, isolation_level=None, timeout=5.0)
    try:
        db.execute("PRAGMA wal_checkpoint(PASSIVE)")
    finally:
        db.close()


def outbox_path(state_dir: Path, index: int) -> Path:
    """Worker 0 (and a single process): events/outbox.sqlite3; worker i: outbox-i."""
    return state_dir / "events" / ("outbox.sqlite3" if index == 0 else f"outbox-{index}.sqlite3")


class Outbox:
    def __init__(self, path: Path, max_events: Callable[[], int]) -> None:
        self.path = path
        self._max = max_events  # a reload may change the bound
        self._db: sqlite3.Connection | None = None
        self.count = 0
        self.oldest: float | None = None  # the creation time of the first event

    def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = _connect(self.path)
        row = self._db.execute("SELECT count(*), min(created) FROM events").fetchone()
        self.count, self.oldest = int(row[0]), row[1]

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    def put(self, created: float, bodies: Sequence[str]) -> list[Put]:
        """Write events (one transaction for all: a message's recipients cost one commit);
        what became of each, in order (those past the bound are FULL)."""
        room = max(0, self._max() - self.count)
        taken = list(bodies[:room])
        if self._db is None:
            return [Put.FAILED] * len(bodies)
        try:
            with self._db:  # autocommit connection: BEGIN makes it one transaction
                self._db.execute("BEGIN")
                self._db.executemany(
                    "INSERT INTO events (created, body) VALUES (?, ?)",
                    [(created, b) for b in taken],
                )
        except sqlite3.Error as exc:
            log.debug("outbox: cannot write: %s", exc)
            return [Put.FAILED] * len(bodies)
        self.count += len(taken)
        if taken and self.oldest is None:
            self.oldest = created
        return [Put.STORED] * len(taken) + [Put.FULL] * (len(bodies) - len(taken))

    def peek(self, n: int) -> list[Row]:
        """The first ``n`` events, oldest first."""
        assert self._db is not None
        rows = self._db.execute(
            "SELECT id, created, body FROM events ORDER BY id LIMIT ?", (n,)
        ).fetchall()
        return [Row(int(i), float(c), str(b)) for i, c, b in rows]

    def remove(self, ids: Sequence[int]) -> None:
        """Forget events the receiver took (or that expired)."""
        if not ids:
            return
        assert self._db is not None
        with self._db:  # one transaction
            self._db.execute("BEGIN")
            gone = self._db.executemany("DELETE FROM events WHERE id = ?", [(i,) for i in ids])
        self.count = max(0, self.count - max(0, gone.rowcount))
        # by time, not id: a former worker's adopted events are older than ours, behind them
        first = self._db.execute("SELECT min(created) FROM events").fetchone()
        self.oldest = float(first[0]) if first and first[0] is not None else None

    def adopt(self, other: Path) -> int:
        """Move the events of a former worker's outbox to the end of this one (kept there
        until they are here), then remove its files. The number moved."""
        assert self._db is not None
        source = _connect(other)
        try:
            rows = source.execute("SELECT created, body FROM events ORDER BY id").fetchall()
        finally:
            source.close()
        with self._db:
            self._db.execute("BEGIN")
            self._db.executemany("INSERT INTO events (created, body) VALUES (?, ?)", rows)
        for suffix in ("", "-wal", "-shm"):
            Path(f"{other}{suffix}").unlink(missing_ok=True)
        row = self._db.execute("SELECT count(*), min(created) FROM events").fetchone()
        self.count, self.oldest = int(row[0]), row[1]
        return len(rows)


def _connect(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=5.0)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    # no checkpoint inside a write (it stalled puts by ~4 ms): ``checkpoint`` does it, on a
    # connection of its own off the event loop
    db.execute("PRAGMA wal_autocheckpoint=0")
    db.execute(SCHEMA)
    db.execute("CREATE INDEX IF NOT EXISTS events_created ON events (created)")
    return db
