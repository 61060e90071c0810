"""Run ``warmrelay serve`` as a real OS process (for crash and signal tests)."""

from __future__ import annotations

import asyncio
import re
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import yaml

READY = re.compile(rb"ready: smtp [0-9.]+:(\d+), admin [0-9.]+:(\d+)")


class RelayProcess:
    """Starts the relay, waits for its ready line (an event, not a sleep), keeps its log."""

    def __init__(
        self, config: dict[str, object], workdir: Path, *args: str, name: str = "relay"
    ) -> None:
        self.args = args
        self.config_path = workdir / f"{name}.yaml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.proc: asyncio.subprocess.Process | None = None
        self.smtp_port = 0
        self.admin_port = 0
        self.log: list[str] = []
        self._new_line = asyncio.Event()
        self._reader: asyncio.Task[None] | None = None

    async def start(self, timeout_s: float = 30.0) -> RelayProcess:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "warmrelay",
            "serve",
            "-c",
            str(self.config_path),
            *self.args,
            stderr=asyncio.subprocess.PIPE,
        )
        ready: asyncio.Future[tuple[int, int]] = asyncio.get_running_loop().create_future()
        self._reader = asyncio.create_task(self._read(ready))
        self.smtp_port, self.admin_port = await asyncio.wait_for(ready, timeout_s)
        return self

    async def _read(self, ready: asyncio.Future[tuple[int, int]]) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        async for line in self.proc.stderr:
            self.log.append(line.decode(errors="replace"))
            self._new_line.set()
            m = READY.search(line)
            if m and not ready.done():
                ready.set_result((int(m.group(1)), int(m.group(2))))
        if not ready.done():
            ready.set_exception(RuntimeError("relay exited:\n" + "".join(self.log[-20:])))

    async def wait_for_line(self, text: str, timeout_s: float = 30.0) -> str:
        """Wait (event-driven) until the relay logs a line containing ``text``."""

        async def until() -> str:
            seen = 0
            while True:
                for line in self.log[seen:]:
                    if text in line:
                        return line
                seen = len(self.log)
                self._new_line.clear()
                await self._new_line.wait()

        return await asyncio.wait_for(until(), timeout_s)

    async def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        await self.proc.wait()
        if self._reader:
            await self._reader

    async def terminate(self) -> int:
        assert self.proc is not None
        if self.proc.returncode is None:
            self.proc.terminate()
        return await self.exited()

    async def exited(self, timeout_s: float = 60.0) -> int:
        """The exit code of a relay that is stopping already (a second SIGTERM would make
        it stop at once, not drain); killed, and TimeoutError, past ``timeout_s``."""
        assert self.proc is not None
        try:
            code = await asyncio.wait_for(self.proc.wait(), timeout_s)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()
            raise
        if self._reader:
            await self._reader
        return code


StartRelay = Callable[..., Awaitable["RelayProcess"]]  # the relay_process fixture
