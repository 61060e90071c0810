"""Helper process for tests/test_spool.py, so faults hit a real process and real files.

``crash DIR``: stores messages from many concurrent writers forever and prints
``<queue_id> <n> <sha256 of data> <kept|removed>`` right after each ``store()`` returned (the
test's signal that the message is acknowledged), until the test kills it with SIGKILL. Every
third message is removed right after its store (as if delivered at once), so that segments die
with some of their messages removed and some not.

``fault DIR LIMIT``: limits the file size of this process to LIMIT bytes (RLIMIT_FSIZE, with
SIGXFSZ ignored so writes fail with EFBIG instead of killing us), tries a large message, a
small one, then both in one batch, and prints one JSON line with the outcomes.

``die DIR LIMIT``: stores one small message and prints its line, then lets the kernel kill the
process (SIGXFSZ, default action) in the middle of writing a message larger than LIMIT: a
crash at a known point, with a half-written file on disk.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import resource
import signal
import sys
from pathlib import Path

from warmrelay.errors import SpoolError
from warmrelay.queue.spool import Spool

WRITERS = 32


def message(n: int) -> bytes:
    """Deterministic bytes for message n; every 10th is 256 KB, so kills also hit long writes."""
    head = f"From: a@example.test\r\nSubject: message {n}\r\n\r\n".encode()
    size = 262144 if n % 10 == 0 else 4096
    return head + (hashlib.sha256(head).digest() * (size // 32))[: size - len(head)]


async def crash(directory: Path) -> None:
    spool = Spool(directory)
    await spool.open()

    async def writer(first: int) -> None:
        n = first
        while True:
            data = message(n)
            msg = await spool.store("a@example.test", [f"r{n}@example.test"], data)
            fate = "removed" if n % 3 == 1 else "kept"
            if fate == "removed":
                spool.remove(msg.queue_id)
            sys.stdout.write(f"{msg.queue_id} {n} {hashlib.sha256(data).hexdigest()} {fate}\n")
            sys.stdout.flush()
            n += WRITERS

    await asyncio.gather(*(writer(w) for w in range(WRITERS)))


async def die(directory: Path, limit: int) -> None:
    spool = Spool(directory)
    await spool.open()
    data = message(1)
    msg = await spool.store("a@example.test", ["r1@example.test"], data)
    print(f"{msg.queue_id} 1 {hashlib.sha256(data).hexdigest()}", flush=True)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    signal.signal(signal.SIGXFSZ, signal.SIG_DFL)  # Python ignores it by default
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    await spool.store("a@example.test", ["b@example.test"], b"x" * (4 * limit))
    print("still alive", flush=True)


async def outcome(spool: Spool, size: int) -> list[object]:
    try:
        msg = await spool.store("a@example.test", ["b@example.test"], b"x" * size)
    except SpoolError as exc:
        return ["error", exc.errno, type(exc.__cause__).__name__]
    return ["stored", msg.queue_id]


async def fault(directory: Path, limit: int) -> None:
    spool = Spool(directory)
    await spool.open()
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    big = await outcome(spool, 4 * limit)
    small = await outcome(spool, 100)
    before = spool.batches_committed
    mixed = await asyncio.gather(outcome(spool, 4 * limit), outcome(spool, 100))
    result = {
        "big": big,
        "small": small,
        "mixed": mixed,
        "mixed_batches": spool.batches_committed - before,
        "incoming": sorted(p.name for p in spool.incoming.iterdir()),
    }
    await spool.close()
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    mode, directory = sys.argv[1], Path(sys.argv[2])
    if mode == "crash":
        asyncio.run(crash(directory))
    else:
        asyncio.run((die if mode == "die" else fault)(directory, int(sys.argv[3])))
