"""Random tokens for ids that must be unique, not secret (Message-IDs, release ids).

``secrets.token_hex`` is one getrandom() system call per token; a relay makes one or two
per message. These come from 4 KiB of the same kernel randomness drawn at a time. A
child process forgets its parent's buffer at fork, so two workers never hand out the
same bytes. Secrets (keys, passwords) still use ``secrets`` directly.
"""

from __future__ import annotations

import os
import threading

_REFILL_BYTES = 4096


class _Pool:
    def __init__(self) -> None:
        self._forget()

    def _forget(self) -> None:
        # anew in a child too: a thread of the parent may have held it at the fork
        self._lock = threading.Lock()  # the event loop and worker threads both take
        self._buffer = b""
        self._offset = 0

    def take(self, n: int) -> bytes:
        with self._lock:
            if self._offset + n > len(self._buffer):
                self._buffer = os.urandom(max(_REFILL_BYTES, n))
                self._offset = 0
            start = self._offset
            self._offset = start + n
            return self._buffer[start : self._offset]


_POOL = _Pool()
os.register_at_fork(after_in_child=_POOL._forget)


def token_hex(nbytes: int) -> str:
    """``nbytes`` random bytes as hex, like ``secrets.token_hex`` (same kernel source)."""
    return _POOL.take(nbytes).hex()
