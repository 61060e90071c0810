"""A relay started in the test's own event loop, the configuration it runs, and the
client calls tests make to it (SMTP, admin HTTP)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiosmtplib

from warmrelay.app import Relay
from warmrelay.config import Config, parse_config


def relay_doc(tmp_path: Path, sink_port: int, cap: int = 10, **over: Any) -> dict[str, Any]:
    """The YAML document of a test relay: warming 127.0.0.2 (``cap`` a day), pool 127.0.0.3."""
    doc: dict[str, Any] = {
        "smtp": {
            "listen": ["127.0.0.1:0"],
            "hostname": "relay.test",
            "allow_networks": ["127.0.0.0/8"],
        },
        "admin": {"listen": "127.0.0.1:0"},
        "state": {"dir": str(tmp_path / "state"), "counters": "sqlite"},
        "ips": [
            {
                "address": "127.0.0.2",
                "helo": "mta1.example.test",
                "warmup": {"start": "2026-01-01", "schedule": [cap] * 3650},
            },
            {"address": "127.0.0.3", "helo": "mta2.example.test"},
        ],
        "routes": {"*": f"127.0.0.1:{sink_port}"},
        "delivery": {"retry_first_s": 0.2, "retry_max_s": 1.0, "drain_timeout_s": 5},
    }
    for key, value in over.items():
        if key != "routes" and isinstance(value, dict) and isinstance(doc.get(key), dict):
            doc[key] = {**doc[key], **value}
        else:
            doc[key] = value
    return doc


def relay_config(tmp_path: Path, sink_port: int, **over: Any) -> Config:
    return parse_config(relay_doc(tmp_path, sink_port, **over))


def mx_config(tmp_path: Path, sink_port: int, dns_port: int, mx_port: int, **over: Any) -> Config:
    """A test relay that finds next hops by MX in the loopback DNS server on ``dns_port``
    (no routes), delivers to port ``mx_port`` of what they name, and retries only after an
    hour (so a test sees the first attempt and any re-route, nothing else)."""
    delivery = {"mx_port": mx_port, "retry_first_s": 3600, **over.pop("delivery", {})}
    return relay_config(
        tmp_path,
        sink_port,
        cap=1000,
        routes={},
        dns={"nameservers": [f"127.0.0.1:{dns_port}"]},
        delivery=delivery,
        **over,
    )


@contextlib.asynccontextmanager
async def running(config: Config, **kwargs: Any) -> AsyncIterator[Relay]:
    relay = Relay(config, **kwargs)
    await relay.start()
    try:
        yield relay
    finally:
        await relay.stop()


async def send(
    relay: Relay,
    rcpts: list[str],
    *,
    sender: str = "app@sender.test",
    body: str = "hello",
    source: str = "127.0.0.1",
    subject: str = "test",
) -> tuple[dict[str, Any], str]:
    message = (
        f"From: <{sender}>\r\nTo: <{rcpts[0]}>\r\nSubject: {subject}\r\n\r\n{body}\r\n"
    ).encode()
    client = aiosmtplib.SMTP(
        hostname="127.0.0.1", port=relay.smtp_ports[0], source_address=(source, 0)
    )
    async with client:
        return await client.sendmail(sender, rcpts, message)


async def http(port: int, method: str, path: str, token: str | None = None) -> tuple[int, bytes]:
    """One HTTP/1.1 request to the admin endpoint: (status code, body)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    writer.write(
        f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n"
        f"{auth}\r\n".encode()
    )
    raw = await reader.read()
    writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


async def http_get(port: int, path: str) -> tuple[int, bytes]:
    return await http(port, "GET", path)


async def status(relay: Relay) -> dict[str, Any]:
    code, body = await http_get(relay.admin.port, "/status")
    assert code == 200
    result: dict[str, Any] = json.loads(body)
    return result
