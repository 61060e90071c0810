"""The outbox (warmrelay.events.outbox.Outbox) on real SQLite files: order and counts
across a reopen, the max_events bound, removal, a former worker's outbox adopted, and a
disk that refuses (a tiny tmpfs, full or read-only): a refused write is Put.FAILED, never
an exception, and what the outbox says it holds is what its file holds."""

from __future__ import annotations

import errno
import os
import sqlite3
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from support.disk import Disk

from warmrelay.events.outbox import Outbox, Put, outbox_path

Tmpfs = Callable[..., Disk]
UNBOUNDED = 1_000_000


def opened(path: Path, bound: Callable[[], int] = lambda: UNBOUNDED) -> Outbox:
    box = Outbox(path, bound)
    box.open()
    return box


@pytest.fixture
def outboxes() -> Iterator[Callable[..., Outbox]]:
    """``outboxes(path, bound)``: an opened Outbox, closed at the end."""
    made: list[Outbox] = []

    def make(path: Path, bound: Callable[[], int] = lambda: UNBOUNDED) -> Outbox:
        box = opened(path, bound)
        made.append(box)
        return box

    yield make
    for box in made:
        box.close()


def rows_in(path: Path) -> list[tuple[float, str]]:
    """What the file holds, read by a connection of its own, in outbox order."""
    db = sqlite3.connect(path)
    try:
        return [
            (float(c), str(b))
            for c, b in db.execute("SELECT created, body FROM events ORDER BY id")
        ]
    finally:
        db.close()


def bodies(box: Outbox) -> list[str]:
    return [r.body for r in box.peek(UNBOUNDED)]


def leave_behind(path: Path, events: list[tuple[float, str]]) -> None:
    """An outbox as a worker killed mid-run leaves it: written, never closed (its -wal and
    -shm files stay). A real process of its own that exits without closing."""
    script = textwrap.dedent(
        f"""
        import os, sys
        from pathlib import Path
        from warmrelay.events.outbox import Outbox
        box = Outbox(Path({str(path)!r}), lambda: 10**6)
        box.open()
        for created, body in {events!r}:
            box.put(created, [body])
        sys.stdout.flush()
        os._exit(0)
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=60)


# -- order, count, oldest --------------------------------------------------------------------


def test_order_is_kept_across_a_reopen(tmp_path: Path) -> None:
    path = tmp_path / "events" / "outbox.sqlite3"
    box = opened(path)
    assert box.put(10.0, ["e0", "e1", "e2"]) == [Put.STORED] * 3
    assert box.put(11.0, ["e3"]) == [Put.STORED]
    assert box.put(12.0, ["e4", "e5"]) == [Put.STORED] * 2
    box.close()
    box = opened(path)
    try:
        assert bodies(box) == [f"e{i}" for i in range(6)]
        box.put(13.0, ["e6"])  # after the reopen: still at the end
        assert bodies(box) == [f"e{i}" for i in range(7)]
        assert box.peek(2) == box.peek(UNBOUNDED)[:2]
    finally:
        box.close()


def test_count_and_oldest_survive_a_reopen(tmp_path: Path) -> None:
    path = tmp_path / "events" / "outbox.sqlite3"
    box = opened(path)
    assert (box.count, box.oldest) == (0, None)
    box.put(100.0, ["a", "b"])
    box.put(105.5, ["c"])
    assert (box.count, box.oldest) == (3, 100.0)
    box.close()
    box = opened(path)
    try:
        assert (box.count, box.oldest) == (3, 100.0)
    finally:
        box.close()


def test_the_max_events_bound_returns_full(tmp_path: Path, outboxes: Callable[..., Outbox]) -> None:
    bound = [3]
    box = outboxes(tmp_path / "outbox.sqlite3", lambda: bound[0])
    assert box.put(1.0, ["a", "b"]) == [Put.STORED, Put.STORED]
    assert box.put(2.0, ["c", "d", "e"]) == [Put.STORED, Put.FULL, Put.FULL]
    assert box.put(3.0, ["f"]) == [Put.FULL]
    assert box.count == 3 and bodies(box) == ["a", "b", "c"]
    box.remove([box.peek(1)[0].id])  # room for one again
    assert box.put(4.0, ["g", "h"]) == [Put.STORED, Put.FULL]
    bound[0] = 5  # a reload raised the bound
    assert box.put(5.0, ["i", "j", "k"]) == [Put.STORED, Put.STORED, Put.FULL]
    assert bodies(box) == ["b", "c", "g", "i", "j"]
    assert rows_in(box.path) == [(1.0, "b"), (2.0, "c"), (4.0, "g"), (5.0, "i"), (5.0, "j")]


def test_remove_updates_count_and_oldest(tmp_path: Path, outboxes: Callable[..., Outbox]) -> None:
    path = tmp_path / "outbox.sqlite3"
    box = outboxes(path)
    box.put(10.0, ["a"])
    box.put(20.0, ["b"])
    box.put(30.0, ["c", "d"])
    ids = [r.id for r in box.peek(10)]
    box.remove(ids[:1])
    assert (box.count, box.oldest) == (3, 20.0)
    box.remove([ids[0], 999_999])  # gone already, never there: nothing changes
    assert (box.count, box.oldest) == (3, 20.0)
    box.remove(ids[2:3])  # from the middle
    assert (box.count, box.oldest, bodies(box)) == (2, 20.0, ["b", "d"])
    box.remove([])
    box.remove([ids[1], ids[3]])
    assert (box.count, box.oldest, bodies(box)) == (0, None, [])
    box.put(40.0, ["e"])
    assert (box.count, box.oldest) == (1, 40.0)
    reopened = outboxes(path)
    assert (reopened.count, reopened.oldest) == (1, 40.0)


# -- a former worker's outbox ----------------------------------------------------------------


def test_adopt_moves_the_rows_after_ours_and_deletes_the_other_files(
    tmp_path: Path, outboxes: Callable[..., Outbox]
) -> None:
    state = tmp_path / "state"
    ours = outboxes(outbox_path(state, 0))
    ours.put(50.0, ["ours-1", "ours-2"])
    other = outbox_path(state, 1)
    leave_behind(other, [(40.0, "theirs-1"), (41.0, "theirs-2"), (42.0, "theirs-3")])
    for suffix in ("", "-wal", "-shm"):  # what a killed worker leaves
        assert Path(f"{other}{suffix}").exists(), suffix
    assert ours.adopt(other) == 3
    assert bodies(ours) == ["ours-1", "ours-2", "theirs-1", "theirs-2", "theirs-3"]
    assert [r.created for r in ours.peek(10)] == [50.0, 50.0, 40.0, 41.0, 42.0]
    assert ours.count == 5
    assert ours.oldest == 40.0  # the oldest event is an adopted one
    for suffix in ("", "-wal", "-shm"):
        assert not Path(f"{other}{suffix}").exists(), suffix
    assert len(rows_in(ours.path)) == 5
    ours.close()
    again = outboxes(ours.path)
    assert bodies(again) == ["ours-1", "ours-2", "theirs-1", "theirs-2", "theirs-3"]
    assert (again.count, again.oldest) == (5, 40.0)


def test_the_oldest_stays_the_oldest_when_adopted_events_are_behind_ours(
    tmp_path: Path, outboxes: Callable[..., Outbox]
) -> None:
    """warmrelay_webhook_oldest_event_age_seconds is the age of the oldest event held; the
    adopted events are older than ours but behind them."""
    state = tmp_path / "state"
    ours = outboxes(outbox_path(state, 0))
    ours.put(100.0, ["ours-1"])
    ours.put(200.0, ["ours-2"])
    other = outbox_path(state, 1)
    leave_behind(other, [(10.0, "theirs-1")])
    ours.adopt(other)
    assert ours.oldest == 10.0
    ours.remove([ours.peek(1)[0].id])  # the receiver took our first event
    assert bodies(ours) == ["ours-2", "theirs-1"]
    assert ours.oldest == 10.0, "the adopted event (10.0) is still held"


# -- a disk that refuses ---------------------------------------------------------------------


def fill_but(disk: Disk, keep: int) -> None:
    """Take every free page but ``keep`` bytes."""
    chunk = b"\0" * 4096
    with open(disk.filler, "ab", buffering=0) as f:
        try:
            while True:
                f.write(chunk)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc
    os.truncate(disk.filler, max(0, disk.filler.stat().st_size - keep))


def test_a_full_disk_is_put_failed_never_an_exception(tmp_path: Path, tmpfs: Tmpfs) -> None:
    disk = tmpfs(tmp_path / "disk", "1m")
    path = disk.path / "events" / "outbox.sqlite3"
    box = opened(path)
    try:
        assert box.put(1.0, ["a", "b"]) == [Put.STORED, Put.STORED]
        disk.fill()
        big = "x" * 8000
        for n in range(20):  # whatever spare page SQLite had is gone soon
            assert box.put(2.0 + n, [big, big]) in ([Put.STORED] * 2, [Put.FAILED] * 2)
        assert box.put(30.0, [big]) == [Put.FAILED]
        assert box.put(31.0, ["c", big, "d"]) == [Put.FAILED] * 3
        assert box.count == len(rows_in(path))  # what it says it holds is what it holds
        held = box.count
        disk.free()  # the disk recovers: so does the outbox
        assert box.put(40.0, ["e"]) == [Put.STORED]
        assert box.count == held + 1 == len(rows_in(path))
        assert bodies(box)[-1] == "e"
    finally:
        box.close()


def test_a_write_the_disk_cuts_short_stores_all_or_nothing(tmp_path: Path, tmpfs: Tmpfs) -> None:
    """A message's events are one transaction: when the disk fills up in the middle of
    them, none is stored, all are FAILED (and counted lost), and the count is the file's."""
    disk = tmpfs(tmp_path / "disk", "1m")
    path = disk.path / "events" / "outbox.sqlite3"
    box = opened(path)
    try:
        assert box.put(1.0, ["a", "b"]) == [Put.STORED, Put.STORED]
        fill_but(disk, 64 * 1024)  # room for some of the events below, not all
        puts = box.put(2.0, [f"{i:04d}" + "x" * 4000 for i in range(40)])
        stored = puts.count(Put.STORED)
        assert puts in ([Put.STORED] * 40, [Put.FAILED] * 40), puts
        assert stored == 0  # the disk cannot hold them all
        held = rows_in(path)
        assert len(held) == box.count == 2, (
            f"put() said {stored} of 40 stored and count says {box.count}, "
            f"but the file holds {len(held)} events"
        )
    finally:
        box.close()


def test_a_read_only_disk_is_put_failed_never_an_exception(tmp_path: Path, tmpfs: Tmpfs) -> None:
    disk = tmpfs(tmp_path / "disk", "1m")
    path = disk.path / "events" / "outbox.sqlite3"
    box = opened(path)
    box.put(1.0, ["a"])
    box.close()
    # read-only under an open outbox cannot be had (remount fails with EBUSY while SQLite
    # holds the file for writing): the outbox is opened again on the read-only disk
    subprocess.run(["mount", "-o", "remount,ro", str(disk.path)], check=True)
    box = Outbox(path, lambda: UNBOUNDED)
    with pytest.raises((OSError, sqlite3.Error)):  # at start: the relay refuses to start
        box.open()
    assert box.put(2.0, ["b", "c"]) == [Put.FAILED, Put.FAILED]  # never an exception
    assert box.count == 0
    box.close()
