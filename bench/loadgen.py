#!/usr/bin/env python3
"""Minimal, cheap SMTP load generator for bench.py (loopback only).

One process runs ``--sessions`` concurrent client sessions (a small
asyncio.Protocol client; uvloop when importable). Sessions take message
numbers from a shared counter over ``--first, --first + --step, ...`` below
``--count-total`` (so several processes split one run), like ``smtp-source -N``: each message has
its own recipient ``rcpt-<n>@<domain>`` and a header ``X-Bench-Id: <run>-<n>``.

By default every message uses its own connection (connect, EHLO, MAIL, RCPT,
DATA, QUIT: smtp-source's default). ``--reuse`` keeps each session's
connection for up to ``--reuse-max`` messages; ``--pipelining`` sends
MAIL+RCPT+DATA in one write.

Protocol with the parent: prints ``READY`` once set up, waits for a line on
stdin (``GO``), runs, then prints one JSON line: first send time, per-message
250 times (CLOCK_MONOTONIC ns), failures. Bounded by the message count and by
``--timeout-s`` (whole run) and ``--cmd-timeout-s`` (per reply).
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import os
import sys
import time
from collections import deque


def build_body(size: int) -> bytes:
    line = b"x" * 78 + b"\r\n"
    return (line * (size // 80 + 1))[:size]


class Client(asyncio.Protocol):
    """One SMTP client connection: complete replies are queued, ``reply()`` awaits the next."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.replies: deque[bytes] = deque()
        self.waiter: asyncio.Future[None] | None = None
        self.lost = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self.t = transport

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        while True:
            nl = buf.find(b"\r\n")
            if nl < 0:
                break
            if buf[3:4] != b"-":  # the last line of a reply
                self.replies.append(bytes(buf[:nl]))
            del buf[: nl + 2]
        if self.replies and self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    async def reply(self, expect: bytes) -> bytes:
        while not self.replies:
            if self.lost:
                raise ConnectionError("connection closed by the server")
            self.waiter = asyncio.get_running_loop().create_future()
            await self.waiter
        line = self.replies.popleft()
        if not line.startswith(expect):
            raise RuntimeError(f"unexpected reply {line[:200]!r}")
        return line


class Gen:
    def __init__(self, a: argparse.Namespace) -> None:
        self.a = a
        self.host, self.port = a.host, a.port
        self.numbers = iter(range(a.first, a.count_total, a.step))
        self.acks: list[tuple[int, int]] = []  # (message number, 250 time ns)
        self.failed: list[tuple[int, str]] = []
        self.connections = 0
        self.t_first_send: int | None = None
        self.domain = a.domain.encode()
        self.run = a.run.encode()
        head_len = len(self._head(10**6))
        body_len = max(2, a.size - head_len)
        self.body = build_body(body_len - 2) + b"\r\n.\r\n"
        self.helo = b"EHLO loadgen.bench.test\r\n"
        self.mail = f"MAIL FROM:<bench@{a.domain}>\r\n".encode()

    def _head(self, n: int) -> bytes:
        return (
            b"From: <bench@%s>\r\nTo: <rcpt-%d@%s>\r\nX-Bench-Id: %s-%d\r\n"
            b"Subject: bench %d\r\n\r\n" % (self.domain, n, self.domain, self.run, n, n)
        )

    async def _open(self) -> Client:
        _, c = await asyncio.get_running_loop().create_connection(Client, self.host, self.port)
        self.connections += 1
        await c.reply(b"220")
        c.t.write(self.helo)
        await c.reply(b"250")
        return c

    async def _transaction(self, c: Client, n: int) -> None:
        rcpt = b"RCPT TO:<rcpt-%d@%s>\r\n" % (n, self.domain)
        w = c.t.write
        if self.a.pipelining:
            w(self.mail + rcpt + b"DATA\r\n")
            await c.reply(b"250")
            await c.reply(b"250")
            await c.reply(b"354")
        else:
            w(self.mail)
            await c.reply(b"250")
            w(rcpt)
            await c.reply(b"250")
            w(b"DATA\r\n")
            await c.reply(b"354")
        w(self._head(n) + self.body)
        await c.reply(b"250")
        self.acks.append((n, time.monotonic_ns()))

    @staticmethod
    async def _quit(c: Client) -> None:
        try:
            async with asyncio.timeout(5):
                c.t.write(b"QUIT\r\n")
                await c.reply(b"221")
        except (OSError, RuntimeError, TimeoutError):
            pass
        c.t.close()

    async def session(self) -> None:
        conn: Client | None = None
        used = 0
        for n in self.numbers:
            if self.t_first_send is None:
                self.t_first_send = time.monotonic_ns()
            try:
                async with asyncio.timeout(self.a.cmd_timeout_s):
                    if conn is None:
                        conn = await self._open()
                        used = 0
                    await self._transaction(conn, n)
                used += 1
            except (OSError, RuntimeError, TimeoutError) as exc:
                self.failed.append((n, f"{type(exc).__name__}: {exc}"[:200]))
                if conn is not None:
                    conn.t.close()
                conn = None
                continue
            if not self.a.reuse or used >= self.a.reuse_max:
                await self._quit(conn)
                conn = None
        if conn is not None:
            await self._quit(conn)

    async def main(self) -> dict[str, object]:
        print("READY", flush=True)
        loop = asyncio.get_running_loop()
        go = await loop.run_in_executor(None, sys.stdin.readline)
        if go.strip() != "GO":
            return {"error": "no GO from the parent"}
        t0 = time.monotonic_ns()
        tasks = [asyncio.ensure_future(self.session()) for _ in range(self.a.sessions)]
        _, pending = await asyncio.wait(tasks, timeout=self.a.timeout_s)
        for t in pending:
            t.cancel()
        timed_out = bool(pending)
        t1 = time.monotonic_ns()
        ru = os.times()
        return {
            "t_go": t0,
            "t_end": t1,
            "t_first_send": self.t_first_send,
            "t_last_ack": max((t for _, t in self.acks), default=None),
            "acks": self.acks,
            "failed": self.failed,
            "connections": self.connections,
            "timed_out": timed_out,
            "cpu_s": round(ru.user + ru.system, 3),
        }


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--sessions", type=int, default=16)
    ap.add_argument("--count-total", type=int, required=True)
    ap.add_argument("--first", type=int, default=0)
    ap.add_argument("--step", type=int, default=1)
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--run", default="r")
    ap.add_argument("--domain", default="bench.test")
    ap.add_argument("--reuse", action="store_true")
    ap.add_argument("--reuse-max", type=int, default=1000)
    ap.add_argument("--pipelining", action="store_true")
    ap.add_argument("--timeout-s", type=float, default=600)
    ap.add_argument("--cmd-timeout-s", type=float, default=60)
    ap.add_argument("--no-uvloop", action="store_true")
    a = ap.parse_args()
    if not ipaddress.ip_address(a.host).is_loopback:
        sys.exit(f"refusing non-loopback target {a.host}")
    if a.count_total > 10_000_000 or a.sessions > 5000:
        sys.exit("refusing: count or sessions beyond the bench's bounds")
    factory = None
    if not a.no_uvloop:
        try:
            import uvloop

            factory = uvloop.new_event_loop
        except ImportError:
            pass
    with asyncio.Runner(loop_factory=factory) as runner:
        res = runner.run(Gen(a).main())
    sys.stdout.write(json.dumps(res) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
