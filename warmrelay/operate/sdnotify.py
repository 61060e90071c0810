"""systemd's notify protocol (``Type=notify``; sd_notify(3)), without libsystemd.

One datagram of ``KEY=VALUE`` lines to the unix socket named by ``$NOTIFY_SOCKET`` (a
leading ``@`` means the abstract namespace). Unset: not run by systemd, nothing is sent.
A failure to send is logged at debug level and never raised: the relay's mail matters more
than its service manager's view of it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time

log = logging.getLogger("warmrelay.sdnotify")


def notify(*fields: str) -> bool:
    """Send ``fields`` (e.g. "READY=1") as one message; True if it was sent."""
    path = os.environ.get("NOTIFY_SOCKET", "")
    if not path.startswith(("/", "@")):  # unset, or a kind of socket we do not speak (vsock)
        return False
    address = "\0" + path[1:] if path.startswith("@") else path
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall("\n".join(fields).encode("utf-8", "replace"))
    except (OSError, ValueError) as exc:
        log.debug("sd_notify to %s failed: %s", path, exc)
        return False
    return True


def ready(status: str) -> bool:
    """Startup, or a reload, is over: the service serves (``systemctl`` shows ``status``)."""
    return notify("READY=1", f"STATUS={status}")


def reloading() -> bool:
    """A reload begins (``Type=notify`` wants the monotonic time with it, systemd >= 253)."""
    usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    return notify("RELOADING=1", f"MONOTONIC_USEC={usec}", "STATUS=reloading the configuration")


def stopping() -> bool:
    return notify("STOPPING=1", "STATUS=stopping: draining deliveries in progress")


def reload_done(task: asyncio.Task[bool]) -> bool:
    """READY=1 after a reload task, whatever its ending: a refused (or failed) reload leaves
    the relay running the configuration it had, which is ready too."""
    applied = not task.cancelled() and task.exception() is None and task.result()
    return ready(
        "serving; configuration reloaded"
        if applied
        else "serving; reload refused, the running configuration stays (see the log)"
    )
