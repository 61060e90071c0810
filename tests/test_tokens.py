"""warmrelay.tokens: unique ids from kernel randomness drawn 4 KiB at a time."""

from __future__ import annotations

import os
import re
import threading

from warmrelay.tokens import token_hex


def test_tokens_are_hex_of_the_size_asked_and_never_repeat() -> None:
    seen = [token_hex(16) for _ in range(2000)]  # ~8 refills of the buffer
    assert all(re.fullmatch(r"[0-9a-f]{32}", t) for t in seen)
    assert len(set(seen)) == len(seen)
    assert len(token_hex(9)) == 18 and len(token_hex(5000)) == 10000  # more than a buffer


def test_threads_never_get_the_same_bytes() -> None:
    got: list[list[str]] = [[] for _ in range(4)]

    def take(out: list[str]) -> None:
        out.extend(token_hex(16) for _ in range(1000))

    threads = [threading.Thread(target=take, args=(out,)) for out in got]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    every = [t for out in got for t in out]
    assert len(set(every)) == len(every) == 4000


def test_a_forked_child_does_not_hand_out_its_parents_bytes() -> None:
    """A worker forked from the supervisor starts with a buffer of its own: the next token
    of parent and child differ (they would be equal if the child kept the copy)."""
    token_hex(16)  # the parent's buffer is filled, most of it unused
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: send its next token and leave at once
        try:
            os.write(write_end, token_hex(16).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    mine = token_hex(16)
    with os.fdopen(read_end, "rb") as pipe:
        child = pipe.read().decode()
    os.waitpid(pid, 0)
    assert re.fullmatch(r"[0-9a-f]{32}", child)
    assert child != mine
