"""Spool: durability across reopen and kill -9, group commit, quarantine, real disk faults."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import json
import logging
import os
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from support.disk import Disk

from warmrelay.errors import SpoolError
from warmrelay.queue.spool import RecoveredMessage, Spool, new_queue_id

ROOT = Path(__file__).resolve().parents[2]
WRITER = Path(__file__).resolve().parents[1] / "support" / "spool_writer.py"
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
WRITER_TIMEOUT_S = 120.0  # the spool writer is a helper, not the CLI: bounded here


@pytest.fixture
async def spool(tmp_path: Path) -> AsyncIterator[Spool]:
    s = Spool(tmp_path / "spool")
    await s.open()
    yield s
    await s.close()


async def reopen(directory: Path) -> tuple[Spool, dict[str, RecoveredMessage]]:
    s = Spool(directory)
    recovered = await s.open()
    return s, {r.message.queue_id: r for r in recovered}


def test_queue_ids_are_time_ordered_unique_and_filename_safe() -> None:
    ids = [new_queue_id() for _ in range(10_000)]
    assert len(set(ids)) == len(ids)
    assert ids == sorted(ids)
    assert all(re.fullmatch(r"[0-9A-Z]{16}", i) for i in ids)


async def test_store_survives_reopen_with_identical_bytes_and_envelope(tmp_path: Path) -> None:
    directory = tmp_path / "spool"
    s = Spool(directory)
    assert await s.open() == []
    data = b"Subject: hi\r\n\r\n" + bytes(range(256)) * 40 + b"\r\n.\r\n\x00\xff"
    msg = await s.store(
        "a@example.test",
        ["b@example.test", "c@example.test", "d@example.test"],
        data,
        meta={"client": "127.0.0.1:40000", "helo": "app"},
        received_at=1764288000.123456,
    )
    assert msg.size == len(data) and len(s) == 1
    s.mark_done(msg.queue_id, [0, 2], "delivered")
    s.record_attempt(msg.queue_id, 1)
    s.record_attempt(msg.queue_id, 2)
    await s.close()

    s2 = Spool(directory)
    [rec] = await s2.open()
    assert rec.message == msg
    assert rec.message.meta == {"client": "127.0.0.1:40000", "helo": "app"}
    assert rec.done == {0: "delivered", 2: "delivered"}
    assert rec.attempts == 2
    assert s2.read_data(msg.queue_id) == data
    assert len(s2) == 1
    s2.remove(msg.queue_id)
    assert len(s2) == 0
    await s2.close()  # the unlink runs on the spool's threads: done once it is closed
    with pytest.raises(SpoolError):
        s2.read_data(msg.queue_id)

    s3 = Spool(directory)
    assert await s3.open() == []
    assert os.listdir(directory / "queue") == []
    await s3.close()


async def test_open_returns_oldest_first(tmp_path: Path) -> None:
    s = Spool(tmp_path, fsync=False)
    await s.open()
    for t in (300.0, 100.0, 200.0):
        await s.store("", ["x@example.test"], b"x", received_at=t)
    await s.close()
    s2 = Spool(tmp_path)
    assert [r.message.received_at for r in await s2.open()] == [100.0, 200.0, 300.0]
    await s2.close()


async def test_concurrent_stores_are_group_committed(spool: Spool) -> None:
    datas = [f"Subject: {i}\r\n\r\n".encode() + os.urandom(4000) for i in range(500)]
    msgs = await asyncio.gather(
        *(spool.store("a@example.test", [f"r{i}@example.test"], d) for i, d in enumerate(datas))
    )
    assert len({m.queue_id for m in msgs}) == 500 == len(spool)
    assert 1 <= spool.batches_committed <= 10
    assert all(spool.read_data(m.queue_id) == d for m, d in zip(msgs, datas, strict=True))
    assert os.listdir(spool.incoming) == []


async def test_removals_go_in_batches_and_all_happen_even_at_close(tmp_path: Path) -> None:
    """Removals made while a batch of them is on a thread go in the next batch: every file
    goes, including removals made in the same moment as close(), and a message with a
    .state file loses both."""
    s = Spool(tmp_path / "spool")
    await s.open()
    msgs = await asyncio.gather(
        *(s.store("a@example.test", [f"r{i}@example.test"], b"x\r\n") for i in range(300))
    )
    s.record_attempt(msgs[0].queue_id, 1)  # a .state file beside its .msg
    assert (s.queue / f"{msgs[0].queue_id}.state").exists()
    for m in msgs[:200]:
        s.remove(m.queue_id)
        if m is msgs[100]:
            await asyncio.sleep(0)  # a batch leaves: the next removals wait for it
    assert len(s) == 100
    for m in msgs[200:]:
        s.remove(m.queue_id)
    await s.close()  # right away: the removals still pending are done before it returns
    assert sorted(os.listdir(s.queue)) == []
    assert s.unrecorded == 0


async def test_bad_usage_is_refused(spool: Spool, tmp_path: Path) -> None:
    with pytest.raises(SpoolError):  # a second relay on the same spool would double-deliver
        await Spool(spool.directory).open()
    with pytest.raises(ValueError):
        await spool.store("a@example.test", [], b"x")
    msg = await spool.store("a@example.test", ["b@example.test"], b"x")
    with pytest.raises(ValueError):
        spool.mark_done(msg.queue_id, [1], "delivered")
    with pytest.raises(ValueError):
        spool.mark_done(msg.queue_id, [0], "two words")
    with pytest.raises(SpoolError):
        spool.record_attempt("0123456789ABCDEF", 1)
    with pytest.raises(SpoolError):
        spool.read_data("../../etc/passwd")
    with pytest.raises(SpoolError):
        await Spool(tmp_path / "never-opened").store("a@example.test", ["b@example.test"], b"x")


@pytest.mark.parametrize("yields", [1, 2])
async def test_cancelled_store_leaves_nothing_behind(spool: Spool, yields: int) -> None:
    """A store whose caller gave up (client gone, no 250) must not stay in the spool.

    One yield: cancelled while queued. Two yields: the committer already handed the batch to
    its thread (asyncio runs ready callbacks in FIFO order), so the file gets written and must
    be taken back."""
    task = asyncio.create_task(spool.store("a@example.test", ["b@example.test"], b"x"))
    for _ in range(yields):
        await asyncio.sleep(0)  # a scheduling step, not a wait for readiness
    task.cancel()
    kept = await spool.store("a@example.test", ["c@example.test"], b"y")
    with pytest.raises(asyncio.CancelledError):
        await task
    await spool.close()  # finishes the batch the cancelled store was in
    assert len(spool) == 1
    assert os.listdir(spool.queue) == [f"{kept.queue_id}.msg"]
    assert os.listdir(spool.incoming) == []


async def test_corrupt_entries_are_quarantined_and_others_recovered(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    directory = tmp_path / "spool"
    s = Spool(directory, fsync=False)
    await s.open()
    m = [await s.store("a@example.test", ["b@example.test"], b"body %d" % i) for i in range(5)]
    s.mark_done(m[2].queue_id, [0], "bounced")
    s.mark_done(m[4].queue_id, [0], "delivered")
    await s.close()
    q = directory / "queue"
    path = [q / f"{x.queue_id}.msg" for x in m]
    raw = path[0].read_bytes()
    path[0].write_bytes(raw[:-1] + bytes([raw[-1] ^ 1]))  # CRC mismatch
    path[1].write_bytes(
        path[1].read_bytes()[:-3]
    )  # truncated (as if a torn write had been renamed)
    lines = path[2].read_bytes().split(b"\n", 2)
    path[2].write_bytes(lines[0] + b"\n{not json\n" + lines[2])
    path[3].write_bytes(b"GARBAGE" + path[3].read_bytes())
    state = q / f"{m[4].queue_id}.state"  # + a bad record and a torn last line
    state.write_bytes(state.read_bytes() + b"nonsense 1\nattempts 3\ndone 0,1 deliv")
    (q / "junk.tmp").write_bytes(b"?")
    (q / f"{new_queue_id()}.state").write_bytes(b"attempts 1\n")  # orphan of an old remove()
    (directory / "incoming" / f"{new_queue_id()}.msg").write_bytes(b"half")

    caplog.set_level(logging.INFO, logger="warmrelay.spool")
    s2 = Spool(directory)
    [rec] = await s2.open()
    assert rec.message == m[4] and rec.done == {0: "delivered"} and rec.attempts == 3
    assert s2.read_data(m[4].queue_id) == b"body 4"
    assert len(s2) == 1
    await s2.close()
    assert os.listdir(directory / "incoming") == []
    assert sorted(os.listdir(q)) == sorted([f"{m[4].queue_id}.msg", f"{m[4].queue_id}.state"])
    expected = {p.name for p in path[:4]} | {"junk.tmp", f"{m[2].queue_id}.state"}
    assert set(os.listdir(directory / "quarantine")) == expected
    text = caplog.text
    assert sum(r.getMessage().startswith("quarantined") for r in caplog.records) == 6
    assert "CRC mismatch" in text and "data length" in text and "bad JSON" in text
    assert "bad magic" in text and "discarded 1" in text


async def test_corrupt_file_under_a_known_id_fails_read_data(spool: Spool) -> None:
    msg = await spool.store("a@example.test", ["b@example.test"], b"hello")
    path = spool.queue / f"{msg.queue_id}.msg"
    path.write_bytes(path.read_bytes().replace(b"hello", b"jello"))
    with pytest.raises(SpoolError, match="CRC"):
        spool.read_data(msg.queue_id)


async def test_every_acknowledged_message_survives_kill_9(tmp_path: Path) -> None:
    directory = tmp_path / "spool"
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(WRITER),
        "crash",
        str(directory),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=ENV,
    )
    assert proc.stdout is not None and proc.stderr is not None
    acked: list[bytes] = []
    try:
        async with asyncio.timeout(WRITER_TIMEOUT_S):
            while len(acked) < 1500:  # each line: that store() had returned (the 250 moment)
                line = await proc.stdout.readline()
                assert line, (await proc.stderr.read()).decode()
                acked.append(line)
            proc.send_signal(signal.SIGKILL)  # mid-run: other stores are in flight right now
            # printed before the kill
            acked += (await proc.stdout.read()).splitlines(keepends=True)
            assert await proc.wait() == -signal.SIGKILL
    finally:
        if proc.returncode is None:  # the test failed first: the writer never stops by itself
            proc.kill()
            await proc.wait()

    s, found = await reopen(directory)
    try:
        for line in acked:
            if not line.endswith(b"\n"):
                continue  # a torn line was never fully reported
            queue_id, n, digest, fate = line.decode().split()
            if fate == "removed":  # removals skip fsync: it may come back, or not
                continue
            assert found[queue_id].message.rcpt_tos == (f"r{n}@example.test",)
            assert hashlib.sha256(s.read_data(queue_id)).hexdigest() == digest
        assert os.listdir(directory / "quarantine") == []
        assert os.listdir(directory / "incoming") == []
        assert any(n.endswith(".removed") for n in os.listdir(directory / "queue"))
        assert len(found) == Spool.count_on_disk([directory])
    finally:
        await s.close()


async def test_kill_in_the_middle_of_a_write_leaves_no_half_file_in_queue(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    directory = tmp_path / "spool"
    proc = await asyncio.create_subprocess_exec(
        *(sys.executable, str(WRITER), "die", str(directory), "65536"),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=ENV,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), WRITER_TIMEOUT_S)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == -signal.SIGXFSZ, err.decode()
    [line] = out.decode().splitlines()  # the second store never returned
    assert len(os.listdir(directory / "incoming")) == 1  # the half-written file

    caplog.set_level(logging.INFO, logger="warmrelay.spool")
    s, found = await reopen(directory)
    assert list(found) == [line.split()[0]]
    assert os.listdir(directory / "incoming") == os.listdir(directory / "quarantine") == []
    assert "discarded 1" in caplog.text
    await s.close()


def run_fault_writer(directory: Path, limit: int) -> Any:
    result = subprocess.run(
        [sys.executable, str(WRITER), "fault", str(directory), str(limit)],
        capture_output=True,
        env=ENV,
        check=True,
        timeout=WRITER_TIMEOUT_S,
    )
    return json.loads(result.stdout)


async def test_write_failure_raises_spool_error_and_later_stores_work(tmp_path: Path) -> None:
    directory = tmp_path / "spool"
    out = run_fault_writer(directory, 65536)  # a real EFBIG from the kernel (RLIMIT_FSIZE)
    assert out["big"] == ["error", errno.EFBIG, "OSError"]
    assert out["small"][0] == "stored"
    big, small = out["mixed"]
    assert out["mixed_batches"] == 1  # one batch: only the failing store fails
    assert big == ["error", errno.EFBIG, "OSError"] and small[0] == "stored"
    assert out["incoming"] == []

    s, found = await reopen(directory)
    assert set(found) == {out["small"][1], small[1]}
    assert os.listdir(directory / "quarantine") == []
    await s.close()


async def test_disk_full_raises_enospc_and_recovers(
    tmp_path: Path, tmpfs: Callable[..., Disk]
) -> None:
    disk = tmpfs(tmp_path / "tmpfs", "512k")
    s = Spool(disk.path / "spool")
    await s.open()
    try:
        with pytest.raises(SpoolError) as info:
            await s.store("a@example.test", ["b@example.test"], b"x" * 2_000_000)
        assert info.value.errno == errno.ENOSPC
        assert isinstance(info.value.__cause__, OSError)
        assert os.listdir(s.incoming) == [] and os.listdir(s.queue) == []
        msg = await s.store("a@example.test", ["b@example.test"], b"small")
        assert s.read_data(msg.queue_id) == b"small"
    finally:
        await s.close()
