#!/usr/bin/env python3
"""Make deploy/status-page.png, the README's picture of the status page (GET /).

Runs a real relay with config.example.yaml as shipped (only its listening ports, its
state.dir and the port of its next hop are moved, to a temporary directory and free
ports), so the picture shows what an operator trying the example sees: the warming IP on
day 1 and the warm pool IP on 127.0.0.2-3, the preflight of loopback addresses. A receiver
on loopback takes most mail, throttles Gmail at the warming IP, greylists one domain and
refuses one address. The traffic is more than the day-1 cap, so the page shows the cap
reached, the overflow and what the pool carried. Then headless Chromium takes the
screenshot. Nothing leaves the host.

    . .venv/bin/activate && python deploy/status-screenshot.py [OUT.png]

Needs the dev extras (aiosmtpd) and Debian's ``chromium``.
"""

from __future__ import annotations

import asyncio
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import aiosmtplib
import yaml
from aiosmtpd.smtp import SMTP, Envelope, Session

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from warmrelay.app import Relay  # noqa: E402
from warmrelay.config import parse_config  # noqa: E402

WARMING = "127.0.0.2"  # the example's warming IP; 127.0.0.3 is its pool
WINDOW = "1280,1000"


class Receiver:
    """Accepts mail, except: Gmail throttles the warming IP once, at its 9th recipient from
    it; greylist.example defers everything; gone@ addresses do not exist."""

    def __init__(self, expected: int) -> None:
        self.accepted = 0
        self.expected = expected
        self.done = asyncio.Event()  # set once ``expected`` recipients were taken
        self.gmail_from_warming = 0

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        if address.endswith("@greylist.example"):
            return "451 4.7.1 Greylisted, please try again in 5 minutes"
        if address.startswith("gone"):
            return "550 5.1.1 The email account that you tried to reach does not exist"
        if address.endswith("@gmail.com") and session.peer[0] == WARMING:
            self.gmail_from_warming += 1
            if self.gmail_from_warming == 9:
                return (
                    "421 4.7.28 Gmail has detected an unusual rate of unsolicited mail "
                    "originating from your IP address"
                )
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.accepted += len(envelope.rcpt_tos)
        if self.accepted >= self.expected:
            self.done.set()
        return "250 2.0.0 OK"


def example_doc(state: Path, sink_port: int) -> dict[str, Any]:
    """config.example.yaml, with its ports and state.dir moved (nothing else changed)."""
    doc: dict[str, Any] = yaml.safe_load((ROOT / "config.example.yaml").read_text())
    doc["smtp"]["listen"] = ["127.0.0.1:0"]
    doc["admin"]["listen"] = "127.0.0.1:0"
    doc["state"]["dir"] = str(state)
    doc["routes"] = {"*": f"127.0.0.1:{sink_port}"}
    return doc


async def send_traffic(port: int) -> None:
    """Recipients by domain; more than the warming IP's day-1 cap (50), so some overflow."""
    rcpts = [f"friend{n}@gmail.com" for n in range(20)]
    rcpts += [f"contact{n}@outlook.com" for n in range(25)]
    rcpts += [f"user{n}@example.org" for n in range(40)]
    rcpts += [f"later{n}@greylist.example" for n in range(4)]
    rcpts += [f"gone{n}@example.net" for n in range(2)]

    async def one(rcpt: str) -> None:
        message = f"From: <news@example.com>\r\nTo: <{rcpt}>\r\nSubject: hi\r\n\r\nhello\r\n"
        async with aiosmtplib.SMTP(hostname="127.0.0.1", port=port) as client:
            await client.sendmail("news@example.com", [rcpt], message.encode())

    for start in range(0, len(rcpts), 15):
        await asyncio.gather(*(one(r) for r in rcpts[start : start + 15]))


ACCEPTED = 20 + 25 + 40  # gmail.com (partly via the pool), outlook.com, example.org


async def main(out: Path) -> None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        raise SystemExit("chromium is not installed (apt-get install chromium)")
    receiver = Receiver(ACCEPTED)
    loop = asyncio.get_running_loop()
    sink = await loop.create_server(lambda: SMTP(receiver, hostname="mx.example"), "127.0.0.1", 0)
    with tempfile.TemporaryDirectory() as tmp:
        doc = example_doc(Path(tmp) / "var", sink.sockets[0].getsockname()[1])
        relay = Relay(parse_config(doc))
        await relay.start()
        try:
            await send_traffic(relay.smtp_ports[0])
            await asyncio.wait_for(receiver.done.wait(), 60)
            await relay.preflight.report()
            proc = await asyncio.create_subprocess_exec(
                browser,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--hide-scrollbars",
                "--no-first-run",
                f"--user-data-dir={Path(tmp) / 'chromium'}",
                f"--screenshot={out}",
                f"--window-size={WINDOW}",
                f"http://127.0.0.1:{relay.admin.port}/",
                stderr=asyncio.subprocess.DEVNULL,
            )
            if await proc.wait() != 0:
                raise SystemExit("chromium failed")
        finally:
            await relay.stop()
    sink.close()
    print(f"wrote {out}")


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "deploy" / "status-page.png"
    asyncio.run(main(target.resolve()))
