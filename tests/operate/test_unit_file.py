"""deploy/warmrelay.service: Type=notify as the relay speaks it, and a sandbox that
``systemd-analyze security`` rates "OK" or better (exposure below 5.0)."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
from pathlib import Path

import pytest

UNIT = Path(__file__).resolve().parents[2] / "deploy" / "warmrelay.service"


def settings() -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if line.strip() and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            found.setdefault(key.strip(), []).append(value.strip())
    return found


def test_notify_protocol_and_what_the_relay_needs() -> None:
    s = settings()
    assert s["Type"] == ["notify"] and s["NotifyAccess"] == ["main"]
    assert s["ExecReload"] == ["/bin/kill -HUP $MAINPID"]  # answered by RELOADING=1/READY=1
    assert s["AmbientCapabilities"] == s["CapabilityBoundingSet"] == ["CAP_NET_BIND_SERVICE"]
    families = s["RestrictAddressFamilies"][0].split()
    assert {"AF_INET", "AF_INET6", "AF_UNIX"} <= set(families)  # SMTP, DNS, sd_notify
    assert s["StateDirectory"] == ["warmrelay"]  # writable /var/lib/warmrelay
    assert "PrivateNetwork" not in s and "IPAddressDeny" not in s  # mail goes anywhere
    assert "PrivateUsers" not in s  # it would void CAP_NET_BIND_SERVICE on the host's ports
    # the documentation named is the one the install steps in the header put there
    (doc,) = s["Documentation"]
    path = doc.removeprefix("file://")
    assert re.search(rf"install -Dm0644 \S*README\.md {re.escape(path)}$", UNIT.read_text(), re.M)


async def test_systemd_analyze_rates_the_sandbox_ok() -> None:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        if os.environ.get("CI"):
            pytest.fail("systemd-analyze is missing (CI needs the Debian package systemd)")
        pytest.skip("systemd-analyze is not installed")
    proc = await asyncio.create_subprocess_exec(
        tool,
        "security",
        "--offline=true",
        "--no-pager",
        str(UNIT),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), 60)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    text = out.decode(errors="replace")
    found = re.search(r"Overall exposure level for warmrelay\.service: (\d+\.\d+) (\w+)", text)
    assert found, text
    assert float(found.group(1)) < 5.0, text
    assert found.group(2) in ("OK", "SAFE"), text
