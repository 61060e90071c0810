#!/usr/bin/env python3
"""Make deploy/status-page.png, the README's picture of the status page (GET /).

Runs a real relay on loopback (warming, paused, completed and pool IPs on 127.0.0.2-5), a
receiver that takes most mail, throttles Gmail at the warming IP, greylists one domain and
refuses one address, and a DNS server for the preflight; sends some traffic, then has
headless Chromium take the screenshot. Nothing leaves the host.

    . .venv/bin/activate && python deploy/status-screenshot.py [OUT.png]

Needs the dev extras (aiosmtpd, dnslib) and Debian's ``chromium``.
"""

from __future__ import annotations

import asyncio
import shutil
import sys
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiosmtplib
from aiosmtpd.smtp import SMTP, Envelope, Session

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from dnsserver import LoopbackDNS  # noqa: E402

from warmrelay.app import Relay  # noqa: E402
from warmrelay.config import parse_config  # noqa: E402

WARMING, POOL, PAUSED, COMPLETED = "127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5"
HELO = {
    WARMING: "mta1.mail.example.com",
    POOL: "mta2.mail.example.com",
    PAUSED: "mta3.mail.example.com",
    COMPLETED: "mta4.mail.example.com",
}


class Receiver:
    """Accepts mail, except: Gmail throttles the warming IP after 12 recipients from it,
    greylist.example defers everything, gone@ addresses do not exist."""

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
            if self.gmail_from_warming > 12:
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


def config_doc(state: Path, sink_port: int, dns_port: int) -> dict[str, object]:
    today = datetime.now(UTC).date()
    ramp = [10 * (n + 1) for n in range(30)]  # day 12: 120 recipients
    warmup = {
        "start": (today - timedelta(days=11)).isoformat(),
        "schedule": ramp,
        "providers": {"gmail": {"share": 0.4}, "microsoft": {"share": 0.3}},
    }
    return {
        "smtp": {"listen": ["127.0.0.1:0"], "hostname": "relay.example.com"},
        "admin": {"listen": "127.0.0.1:0"},
        "state": {"dir": str(state), "counters": "sqlite"},
        "timezone": "UTC",
        "ips": [
            {"address": WARMING, "helo": HELO[WARMING], "warmup": warmup},
            {"address": POOL, "helo": HELO[POOL]},
            {
                "address": PAUSED,
                "helo": HELO[PAUSED],
                "warmup": {"start": (today - timedelta(days=4)).isoformat(), "schedule": ramp},
            },
            {
                "address": COMPLETED,
                "helo": HELO[COMPLETED],
                "warmup": {"start": (today - timedelta(days=20)).isoformat(), "schedule": ramp},
            },
        ],
        "routes": {"*": f"127.0.0.1:{sink_port}"},
        "dns": {"nameservers": [f"127.0.0.1:{dns_port}"], "timeout_s": 2},
        "preflight": {"dnsbl_zones": ["zen.spamhaus.example"], "timeout_s": 2},
        "delivery": {"retry_first_s": 900, "retry_max_s": 3600},
    }


async def send_traffic(port: int) -> None:
    """Recipients by domain: the receiver takes ACCEPTED of them at once."""
    rcpts = [f"user{n}@example.org" for n in range(45)]
    rcpts += [f"friend{n}@gmail.com" for n in range(30)]
    rcpts += [f"contact{n}@outlook.com" for n in range(25)]
    rcpts += [f"later{n}@greylist.example" for n in range(6)]
    rcpts += [f"gone{n}@example.net" for n in range(3)]

    async def one(rcpt: str) -> None:
        message = f"From: <news@example.com>\r\nTo: <{rcpt}>\r\nSubject: hi\r\n\r\nhello\r\n"
        async with aiosmtplib.SMTP(hostname="127.0.0.1", port=port) as client:
            await client.sendmail("news@example.com", [rcpt], message.encode())

    for start in range(0, len(rcpts), 20):
        await asyncio.gather(*(one(r) for r in rcpts[start : start + 20]))


ACCEPTED = 45 + 30 + 25  # example.org, gmail.com (partly via the pool), outlook.com


async def main(out: Path) -> None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        raise SystemExit("chromium is not installed (apt-get install chromium)")
    receiver = Receiver(ACCEPTED)
    loop = asyncio.get_running_loop()
    sink = await loop.create_server(lambda: SMTP(receiver, hostname="mx.example"), "127.0.0.1", 0)
    async with LoopbackDNS() as dns:
        for address, name in HELO.items():
            dns.add_ptr(address, name)
            dns.add_a(name, address)
        with tempfile.TemporaryDirectory() as tmp:
            doc = config_doc(Path(tmp) / "state", sink.sockets[0].getsockname()[1], dns.port)
            relay = Relay(parse_config(doc))
            await relay.start()
            try:
                await relay.ip_action(PAUSED, "pause")
                await relay.ip_action(COMPLETED, "complete")
                await send_traffic(relay.smtp_ports[0])
                await asyncio.wait_for(receiver.done.wait(), 60)
                await relay.preflight.report()
                proc = await asyncio.create_subprocess_exec(
                    browser,
                    "--headless",
                    "--no-sandbox",
                    "--disable-gpu",
                    "--hide-scrollbars",
                    "--no-first-run",
                    f"--user-data-dir={Path(tmp) / 'chromium'}",
                    f"--screenshot={out}",
                    "--window-size=1280,1000",
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
