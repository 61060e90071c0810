"""TLS for the listeners: one SSLContext, certificate reloaded in place.

``load_cert_chain`` on the same context swaps the certificate for new
handshakes only, so renewing a certificate (files changed, or SIGHUP) never
drops a session. A bad new file is logged and the old certificate stays.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from pathlib import Path

log = logging.getLogger("warmrelay.tls")

POLL_S = 5.0


class TlsFiles:
    def __init__(self, cert: Path, key: Path) -> None:
        self.cert, self.key = cert, key
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.context.minimum_version = ssl.TLSVersion.TLSv1_2
        self.context.load_cert_chain(cert, key)
        self._stamp = self._mtimes()
        self._task: asyncio.Task[None] | None = None

    def _mtimes(self) -> tuple[float, float]:
        try:
            return (self.cert.stat().st_mtime, self.key.stat().st_mtime)
        except OSError:
            return (0.0, 0.0)

    def reload(self) -> bool:
        try:
            self.context.load_cert_chain(self.cert, self.key)
        except (OSError, ssl.SSLError) as exc:
            log.error("TLS certificate %s not reloaded, keeping the old one: %s", self.cert, exc)
            return False
        self._stamp = self._mtimes()
        log.info("TLS certificate reloaded from %s", self.cert)
        return True

    def watch(self) -> None:
        """Reload when the files change (polled; certbot & co. replace them in place)."""

        async def poll() -> None:
            while True:
                await asyncio.sleep(POLL_S)
                if self._mtimes() != self._stamp:
                    self.reload()

        self._task = asyncio.create_task(poll(), name="tls-watch")

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
