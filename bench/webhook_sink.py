#!/usr/bin/env python3
"""Counting webhook receiver for ``bench.py --events`` (loopback only).

A minimal aiohttp server on 127.0.0.1 (port 0: the kernel picks a free one). It
answers 200 to every POST on ``--path`` (default ``/events``) and counts what it got:

  * posts, bytes, events, events per name (processed, delivered, ...)
  * distinct ``event_id``s; copies of an id beyond the first are duplicates
  * the arrival time (CLOCK_MONOTONIC ns, shared by all processes, as sink.py's) of
    the first and the last POST
  * with ``--secret-env NAME``: POSTs whose ``X-Warmrelay-Signature`` does not verify
    with that variable's secret (they are still answered 200 and counted)

``GET /stats`` answers the counts as JSON, ``POST /reset`` zeroes them. When it
listens it prints ``webhook sink listening port=PORT pid=PID`` on stdout; on SIGTERM
(or SIGINT, or after ``--max-lifetime-s``) it prints one JSON line with the counts and
exits.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import hmac
import ipaddress
import json
import os
import signal
import sys
import time
from collections import Counter
from typing import Any

from aiohttp import web


class Stats:
    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.posts = 0
        self.bytes = 0
        self.events = 0
        self.by_event: Counter[str] = Counter()
        self.ids: set[str] = set()
        self.duplicates = 0
        self.bad_json = 0
        self.bad_signature = 0
        self.first_ns: int | None = None
        self.last_ns: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "posts": self.posts,
            "bytes": self.bytes,
            "events": self.events,
            "distinct_ids": len(self.ids),
            "duplicates": self.duplicates,
            "by_event": dict(self.by_event),
            "bad_json": self.bad_json,
            "bad_signature": self.bad_signature,
            "first_ns": self.first_ns,
            "last_ns": self.last_ns,
            "now_ns": time.monotonic_ns(),
        }


def signature_ok(secret: bytes, header: str, body: bytes) -> bool:
    """What a consumer checks: v1 = HMAC-SHA256(secret, "<t>." + body) (no clock check)."""
    fields = dict(part.split("=", 1) for part in header.split(",") if "=" in part)
    mac = hmac.new(secret, fields.get("t", "").encode() + b"." + body, hashlib.sha256)
    return hmac.compare_digest(mac.hexdigest(), fields.get("v1", ""))


def make_app(stats: Stats, path: str, secret: bytes | None) -> web.Application:
    async def events(request: web.Request) -> web.Response:
        body = await request.read()
        now = time.monotonic_ns()
        stats.posts += 1
        stats.bytes += len(body)
        if stats.first_ns is None:
            stats.first_ns = now
        stats.last_ns = now
        if secret is not None and not signature_ok(
            secret, request.headers.get("X-Warmrelay-Signature", ""), body
        ):
            stats.bad_signature += 1
        try:
            batch = json.loads(body)
        except ValueError:
            stats.bad_json += 1
            return web.Response(status=200)
        for event in batch if isinstance(batch, list) else [batch]:
            stats.events += 1
            stats.by_event[str(event.get("event"))] += 1
            eid = str(event.get("event_id"))
            if eid in stats.ids:
                stats.duplicates += 1
            else:
                stats.ids.add(eid)
        return web.Response(status=200)

    async def get_stats(request: web.Request) -> web.Response:
        return web.json_response(stats.as_dict())

    async def reset(request: web.Request) -> web.Response:
        stats.reset()
        return web.json_response({"reset": True})

    app = web.Application(client_max_size=64 << 20)
    app.router.add_post(path, events)
    app.router.add_get("/stats", get_stats)
    app.router.add_post("/reset", reset)
    return app


async def amain(a: argparse.Namespace) -> None:
    secret = None
    if a.secret_env:
        value = os.environ.get(a.secret_env, "").strip()
        if not value:
            sys.exit(f"webhook sink: {a.secret_env} is not set")
        secret = value.encode()
    stats = Stats()
    runner = web.AppRunner(make_app(stats, a.path, secret), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, a.host, a.port)
    await site.start()
    port = runner.addresses[0][1]  # the bound port (port 0: the kernel's choice)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.call_later(a.max_lifetime_s, stop.set)
    print(f"webhook sink listening port={port} pid={os.getpid()}", flush=True)
    await stop.wait()
    await runner.cleanup()
    print(json.dumps(stats.as_dict(), sort_keys=True), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--path", default="/events")
    ap.add_argument("--secret-env", default="", help="verify signatures with this variable")
    ap.add_argument("--no-uvloop", action="store_true")
    ap.add_argument(
        "--max-lifetime-s",
        type=float,
        default=3600.0,
        help="exit by itself after this long (a bound if the parent dies)",
    )
    a = ap.parse_args()
    if not ipaddress.ip_address(a.host).is_loopback:
        sys.exit(f"refusing non-loopback address {a.host}")
    factory = None
    if not a.no_uvloop:
        try:
            import uvloop  # type: ignore[import-not-found,unused-ignore]

            factory = uvloop.new_event_loop
        except ImportError:
            pass
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(amain(a))


if __name__ == "__main__":
    main()
