"""The raw SMTP client side the tests share: one reply off a stream, as the wire has it."""

from __future__ import annotations

import asyncio


async def read_reply(reader: asyncio.StreamReader, timeout_s: float) -> bytes:
    """One (possibly multi-line) reply, its lines as sent; b"" once the peer closed the
    connection (a reset raises). Each line must come within ``timeout_s``."""
    lines = b""
    while True:
        line = await asyncio.wait_for(reader.readline(), timeout_s)
        lines += line
        if not line or line[3:4] != b"-":
            return lines
