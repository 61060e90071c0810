"""Spool segments: a group commit of several messages is one file; its messages are removed
one by one (its ``.removed`` list) and the file goes with the last; a segment a disk rotted
gives back every record still whole."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
from pathlib import Path

import pytest

from warmrelay.queue.spool import Spool


async def store_many(s: Spool, n: int, tag: str = "") -> list[tuple[str, bytes]]:
    """n concurrent stores (one group commit, as a rule): their (queue id, data)."""
    datas = [f"Subject: {tag}{i}\r\n\r\n".encode() + os.urandom(300 + i) for i in range(n)]
    msgs = await asyncio.gather(
        *(s.store("a@example.test", [f"r{i}@example.test"], d) for i, d in enumerate(datas))
    )
    return [(m.queue_id, d) for m, d in zip(msgs, datas, strict=True)]


def names(directory: Path, ext: str) -> list[str]:
    return sorted(n for n in os.listdir(directory) if n.endswith(ext))


async def test_a_group_commit_is_one_segment_file_that_reopens_whole(tmp_path: Path) -> None:
    s = Spool(tmp_path / "spool")
    await s.open()
    stored = await store_many(s, 40)
    assert s.batches_committed == 1
    [segment] = names(s.queue, ".seg")  # not 40 files
    assert segment == f"{stored[0][0]}-40.seg" and names(s.queue, ".msg") == []
    assert all(s.read_data(q) == d for q, d in stored)
    assert Spool.count_on_disk([s.directory]) == 40
    await s.close()

    again = Spool(tmp_path / "spool")
    found = {r.message.queue_id: r for r in await again.open()}
    assert set(found) == {q for q, _ in stored}
    assert all(again.read_data(q) == d for q, d in stored)
    assert [found[q].message.rcpt_tos for q, _ in stored] == [
        (f"r{i}@example.test",) for i in range(40)
    ]
    await again.close()


async def test_removed_messages_stay_removed_and_the_last_takes_the_segment(
    tmp_path: Path,
) -> None:
    directory = tmp_path / "spool"
    s = Spool(directory)
    await s.open()
    stored = await store_many(s, 10)
    s.record_attempt(stored[0][0], 2)  # a .state file: it goes with its message
    s.mark_done(stored[5][0], [0], "deferred-not-final")  # and one that stays
    for q, _ in stored[:4]:
        s.remove(q)
    await s.close()
    queue = directory / "queue"
    [removed] = names(queue, ".removed")
    assert (queue / removed).read_text().split() == sorted(q for q, _ in stored[:4])
    assert names(queue, ".state") == [f"{stored[5][0]}.state"]
    assert Spool.count_on_disk([directory]) == 6

    s = Spool(directory)
    found = {r.message.queue_id: r for r in await s.open()}
    assert set(found) == {q for q, _ in stored[4:]}
    assert found[stored[5][0]].done == {0: "deferred-not-final"}
    assert all(s.read_data(q) == d for q, d in stored[4:])
    for q, _ in stored[4:]:
        s.remove(q)
    await s.close()
    assert os.listdir(queue) == []  # the segment, its list and the .state files
    assert s.unrecorded == 0


async def test_a_segment_whose_messages_were_all_removed_goes_at_open(tmp_path: Path) -> None:
    """A crash after the last line was written but before the unlink: nothing to deliver."""
    directory = tmp_path / "spool"
    s = Spool(directory)
    await s.open()
    stored = await store_many(s, 3)
    await s.close()
    [segment] = names(directory / "queue", ".seg")
    lines = "".join(f"{q}\n" for q, _ in stored) + "0123"  # + a line torn by the crash
    (directory / "queue" / segment.replace(".seg", ".removed")).write_text(lines)
    s = Spool(directory)
    assert await s.open() == []
    await s.close()
    assert os.listdir(directory / "queue") == os.listdir(directory / "quarantine") == []


@pytest.mark.parametrize("damage", ["crc", "truncated", "header"])
async def test_a_rotted_segment_gives_back_every_whole_record(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, damage: str
) -> None:
    directory = tmp_path / "spool"
    s = Spool(directory, fsync=False)
    await s.open()
    stored = await store_many(s, 6)
    s.mark_done(stored[4][0], [0], "delivered")  # its .state still applies after the rescue
    s.remove(stored[1][0])
    await s.close()
    queue = directory / "queue"
    [segment] = names(queue, ".seg")
    raw = bytearray((queue / segment).read_bytes())
    third = raw.index(stored[2][0].encode()) - 30  # inside the third record's header
    if damage == "crc":
        raw[raw.index(stored[2][1][-50:])] ^= 1  # a bit of the third message's data
        lost = {stored[2][0]}
    elif damage == "truncated":
        raw = raw[:-7]  # the last record is short
        lost = {stored[5][0]}
    else:
        raw[third : third + 6] = b"{{{{{{"  # the third header: nothing after it can be found
        lost = {q for q, _ in stored[2:]}
    (queue / segment).write_bytes(bytes(raw))

    caplog.set_level(logging.WARNING, logger="warmrelay.spool")
    s = Spool(directory)
    found = {r.message.queue_id: r for r in await s.open()}
    kept = {q for q, _ in stored} - lost - {stored[1][0]}
    assert set(found) == kept
    assert all(s.read_data(q) == d for q, d in stored if q in kept)
    if stored[4][0] in kept:
        assert found[stored[4][0]].done == {0: "delivered"}
    await s.close()
    assert names(queue, ".seg") == [] and names(queue, ".msg") == sorted(f"{q}.msg" for q in kept)
    assert sorted(os.listdir(directory / "quarantine")) == [
        segment.replace(".seg", ".removed"),
        segment,
    ]
    [line] = [r.getMessage() for r in caplog.records if r.getMessage().startswith("quarantined")][
        :1
    ]
    assert f"{len(kept)} message(s) kept" in line


async def test_legacy_files_and_segments_live_side_by_side(tmp_path: Path) -> None:
    """A batch of one is a .msg file (as every message was before segments): both kinds
    are read, counted, dated and removed alike."""
    directory = tmp_path / "spool"
    s = Spool(directory)
    await s.open()
    alone = await s.store("a@example.test", ["x@example.test"], b"alone\r\n")
    stored = await store_many(s, 5)
    assert names(s.queue, ".msg") == [f"{alone.queue_id}.msg"]
    assert len(names(s.queue, ".seg")) == 1
    assert Spool.count_on_disk([directory]) == 6
    oldest = Spool.oldest_on_disk([directory])
    assert oldest is not None and abs(oldest - alone.received_at) < 0.002
    s.remove(alone.queue_id)
    await s.close()
    assert Spool.count_on_disk([directory]) == 5
    never = tmp_path / "spool-9"  # a worker's spool not made yet: counted as empty
    assert Spool.count_on_disk([never, directory]) == 5
    assert Spool.oldest_on_disk([never]) is None
    s = Spool(directory)
    assert {r.message.queue_id for r in await s.open()} == {q for q, _ in stored}
    await s.close()


async def test_an_old_segment_gives_its_deferred_messages_files_of_their_own(
    tmp_path: Path,
) -> None:
    """Two of ten messages are still spooled (deferred) when the segment is old: each gets
    a .msg, the segment and its list go, the two keep their progress and reopen once."""
    directory = tmp_path / "spool"
    s = Spool(directory, segment_keep_s=3600.0)
    await s.open()
    stored = await store_many(s, 10)
    deferred = [stored[3], stored[7]]
    s.record_attempt(stored[3][0], 2)
    for q, _ in stored:
        if (q, _) not in deferred:
            s.remove(q)
    assert await s.retire_segments() == 0  # not old yet
    s._segment_keep_s = 0.0  # the clock moved on (its age is measured from the store)
    assert await s.retire_segments() == 2
    assert await s.retire_segments() == 0  # nothing left in segments
    assert all(s.read_data(q) == d for q, d in deferred)
    s.remove(stored[7][0])  # a moved message finishes: its own file goes
    await s.close()
    queue = directory / "queue"
    assert sorted(os.listdir(queue)) == [f"{stored[3][0]}.msg", f"{stored[3][0]}.state"]
    assert Spool.count_on_disk([directory]) == 1

    again = Spool(directory)
    [found] = await again.open()
    assert found.message.queue_id == stored[3][0] and found.attempts == 2
    assert again.read_data(stored[3][0]) == stored[3][1]
    await again.close()


async def test_a_retirement_cut_short_by_a_crash_delivers_each_message_once(
    tmp_path: Path,
) -> None:
    """A crash after the .msg files were synced but before the segment's list got them: the
    next start takes each message once, from its .msg, and drops the segment."""
    directory = tmp_path / "spool"
    s = Spool(directory)
    await s.open()
    stored = await store_many(s, 6)
    s.remove(stored[0][0])
    await s.close()
    queue = directory / "queue"
    [segment] = names(queue, ".seg")
    raw = (queue / segment).read_bytes()
    # what the retirement's copy step leaves: each live record as a .msg of its own
    loader = Spool(directory)
    await loader.open()
    for q, _ in stored[1:]:
        _, offset, length = loader._located[q]
        (queue / f"{q}.msg").write_bytes(raw[offset : offset + length])
    await loader.close()

    again = Spool(directory)
    found = [r.message.queue_id for r in await again.open()]
    assert sorted(found) == sorted(q for q, _ in stored[1:])  # once each
    assert all(again.read_data(q) == d for q, d in stored[1:])
    assert names(queue, ".seg") == [] and names(queue, ".removed") == []
    for q in found:
        again.remove(q)
    await again.close()
    assert os.listdir(queue) == []


async def test_a_message_finished_while_it_is_moved_out_leaves_no_file(tmp_path: Path) -> None:
    """The operator or a delivery finishes a message while the retirement copies it (on a
    thread): whichever comes first, nothing of it is left, so no restart sends it again."""
    directory = tmp_path / "spool"
    s = Spool(directory, segment_keep_s=0.0)
    await s.open()
    stored = await store_many(s, 5)
    retiring = asyncio.create_task(s.retire_segments())
    await asyncio.sleep(0)  # the copy is on its thread now
    for q, _ in stored[:3]:
        s.remove(q)
    await retiring
    for q, _ in stored[3:]:
        assert s.read_data(q)
        s.remove(q)
    await s.close()
    assert os.listdir(directory / "queue") == []
    again = Spool(directory)
    assert await again.open() == []
    await again.close()


async def test_a_retirement_that_fails_leaves_nothing_behind_and_the_next_one_works(
    tmp_path: Path,
) -> None:
    """Something in the way of one message's .msg (here a directory of that name): the round
    takes back every copy it made, leaves nothing in incoming/, and the next round, with the
    obstacle gone, moves them all."""
    directory = tmp_path / "spool"
    s = Spool(directory, segment_keep_s=0.0)
    await s.open()
    stored = await store_many(s, 3)
    blocker = s.queue / f"{stored[1][0]}.msg"
    blocker.mkdir()
    (blocker / "in-the-way").write_text("x")
    assert await s.retire_segments() == 0
    assert os.listdir(s.incoming) == []
    assert names(s.queue, ".msg") == [blocker.name] and len(names(s.queue, ".seg")) == 1
    shutil.rmtree(blocker)
    assert await s.retire_segments() == 3
    await s.close()
    assert names(directory / "queue", ".seg") == []
    again = Spool(directory)
    found = await again.open()
    assert sorted(r.message.queue_id for r in found) == sorted(q for q, _ in stored)
    assert all(again.read_data(q) == d for q, d in stored)
    await again.close()
