#!/usr/bin/env python3
"""Counting SMTP sink for bench.py (loopback only), adapted from shared/perf/sink.py.

A minimal SMTP server on asyncio.Protocol (uvloop when importable). It accepts
every message, discards it and records:

  * messages received, bytes, sessions, messages per peer (source) IP
  * per message id (header ``X-Bench-Id: <id>``): the arrival time
    (CLOCK_MONOTONIC ns, shared by all processes) of its first copy;
    further copies of the same id count as duplicates
  * first / last arrival

Control port (one line in, one JSON line out): ``RESET``, ``COUNT`` (counters
only), ``STATS`` (counters plus ``arrivals``: {id: ns}).

On start it prints ``sink listening smtp=HOST:PORT ctl=HOST:PORT pid=PID``;
ports default to 0 (the kernel picks free ones).
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import os
import signal
import sys
import time
from collections import Counter

EOD = b"\r\n.\r\n"
ID_HDR = b"\nX-Bench-Id: "


class Stats:
    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.received = 0
        self.bytes = 0
        self.sessions = 0
        self.peers: Counter[str] = Counter()
        self.arrivals: dict[str, int] = {}
        self.duplicates = 0
        self.no_id = 0
        self.first_ns: int | None = None
        self.last_ns: int | None = None

    def as_dict(self, with_arrivals: bool) -> dict[str, object]:
        d: dict[str, object] = {
            "received": self.received,
            "bytes": self.bytes,
            "sessions": self.sessions,
            "peers": dict(self.peers),
            "distinct_ids": len(self.arrivals),
            "duplicates": self.duplicates,
            "no_id": self.no_id,
            "first_ns": self.first_ns,
            "last_ns": self.last_ns,
            "now_ns": time.monotonic_ns(),
        }
        if with_arrivals:
            d["arrivals"] = self.arrivals
        return d


STATS = Stats()


class SinkProtocol(asyncio.Protocol):
    hostname = b"bench-sink"

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self.t = transport
        peer = transport.get_extra_info("peername")
        self.peer = peer[0] if peer else "?"
        self.buf = bytearray()
        self.in_data = False
        self.nrcpt = 0
        self.closed = False
        STATS.sessions += 1
        transport.write(b"220 " + self.hostname + b" ESMTP bench sink\r\n")

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while not self.closed:
            if self.in_data:
                if self.buf.startswith(b".\r\n"):  # empty body
                    end, skip = 0, 3
                else:
                    end = self.buf.find(EOD)
                    if end < 0:
                        return
                    end += 2  # keep the body's last CRLF
                    skip = 3
                msg = bytes(self.buf[:end])
                del self.buf[: end + skip]
                self.in_data = False
                self.message_done(msg)
                continue
            nl = self.buf.find(b"\r\n")
            if nl < 0:
                if len(self.buf) > 8192:
                    self.t.write(b"500 5.5.2 line too long\r\n")
                    self.t.close()
                return
            line = bytes(self.buf[:nl])
            del self.buf[: nl + 2]
            self.command(line)

    def command(self, line: bytes) -> None:
        verb = line[:4].upper()
        w = self.t.write
        if verb == b"EHLO":
            w(
                b"250-" + self.hostname + b"\r\n250-PIPELINING\r\n250-8BITMIME\r\n"
                b"250-SIZE 104857600\r\n250 ENHANCEDSTATUSCODES\r\n"
            )
        elif verb == b"HELO":
            w(b"250 " + self.hostname + b"\r\n")
        elif verb == b"MAIL":
            self.nrcpt = 0
            w(b"250 2.1.0 Ok\r\n")
        elif verb == b"RCPT":
            self.nrcpt += 1
            w(b"250 2.1.5 Ok\r\n")
        elif verb == b"DATA":
            if not self.nrcpt:
                w(b"554 5.5.1 No valid recipients\r\n")
            else:
                self.in_data = True
                w(b"354 End data with <CR><LF>.<CR><LF>\r\n")
        elif verb in (b"RSET", b"NOOP"):
            self.nrcpt = 0 if verb == b"RSET" else self.nrcpt
            w(b"250 2.0.0 Ok\r\n")
        elif verb == b"QUIT":
            w(b"221 2.0.0 Bye\r\n")
            self.closed = True
            self.t.close()
        else:
            w(b"502 5.5.2 Command not recognized\r\n")

    def message_done(self, msg: bytes) -> None:
        now = time.monotonic_ns()
        s = STATS
        s.received += 1
        s.bytes += len(msg)
        s.peers[self.peer] += 1
        if s.first_ns is None:
            s.first_ns = now
        s.last_ns = now
        head_end = msg.find(b"\r\n\r\n", 0, 16384)
        i = msg.find(ID_HDR, 0, head_end if head_end >= 0 else 16384)
        if i < 0:
            s.no_id += 1
        else:
            j = msg.find(b"\r\n", i + len(ID_HDR))
            mid = msg[i + len(ID_HDR) : j].decode("ascii", "replace")
            if mid in s.arrivals:
                s.duplicates += 1
            else:
                s.arrivals[mid] = now
        self.nrcpt = 0
        self.t.write(b"250 2.0.0 Ok: queued as %X\r\n" % s.received)


async def ctl_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            line = await reader.readline()
            if not line:
                break
            cmd = line.strip().upper()
            if cmd == b"RESET":
                STATS.reset()
                writer.write(b'{"ok": true}\n')
            elif cmd in (b"STATS", b"COUNT"):
                writer.write(json.dumps(STATS.as_dict(cmd == b"STATS")).encode() + b"\n")
            else:
                writer.write(b'{"error": "unknown command"}\n')
            await writer.drain()
    finally:
        writer.close()


async def main(args: argparse.Namespace) -> None:
    if not ipaddress.ip_address(args.host).is_loopback:
        sys.exit(f"refusing to listen on non-loopback address {args.host}")
    loop = asyncio.get_running_loop()
    srv = await loop.create_server(
        SinkProtocol, args.host, args.port, backlog=4096, reuse_address=True
    )
    ctl = await asyncio.start_server(ctl_client, args.host, args.ctl_port)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    sport = srv.sockets[0].getsockname()[1]
    cport = ctl.sockets[0].getsockname()[1]
    print(
        f"sink listening smtp={args.host}:{sport} ctl={args.host}:{cport} pid={os.getpid()} "
        f"loop={type(loop).__module__}",
        flush=True,
    )
    try:
        await asyncio.wait_for(stop.wait(), args.max_lifetime_s)
    except TimeoutError:
        print("sink: max lifetime reached, exiting", flush=True)
    srv.close()
    ctl.close()
    print(json.dumps(STATS.as_dict(False)), flush=True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--ctl-port", type=int, default=0)
    ap.add_argument("--no-uvloop", action="store_true")
    ap.add_argument(
        "--max-lifetime-s",
        type=float,
        default=3600.0,
        help="exit by itself after this long (a bound if the parent dies)",
    )
    a = ap.parse_args()
    factory = None
    if not a.no_uvloop:
        try:
            import uvloop

            factory = uvloop.new_event_loop
        except ImportError:
            pass
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(main(a))
