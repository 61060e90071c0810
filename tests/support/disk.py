"""Real disk faults: a small tmpfs mounted where the relay writes, filled (ENOSPC) or
remounted read-only (EROFS). Mounting needs root; without it these tests skip, except
under CI=true where they must run."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() not in ("", "0", "false", "no")


class Disk:
    """A small tmpfs at ``path``: ``fill`` for ENOSPC, ``read_only`` for EROFS."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.filler = path / "filler"

    def fill(self) -> None:
        """Take every free page (a write that needs a new page then fails with ENOSPC)."""
        chunk = b"\0" * 65536
        with open(self.filler, "ab", buffering=0) as f:
            try:
                while True:
                    f.write(chunk)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
            try:
                while True:  # the last partial chunk: page by page
                    f.write(chunk[:4096])
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc

    def free(self) -> None:
        self.filler.unlink()

    async def remount(self, mode: str) -> None:
        """``ro`` fails with EBUSY while a file on it is open for writing (a spool write in
        flight): retried a bounded number of times."""
        last = b""
        for _ in range(100):
            proc = await asyncio.create_subprocess_exec(
                "mount",
                "-o",
                f"remount,{mode}",
                str(self.path),
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
            _, last = await proc.communicate()
            if proc.returncode == 0:
                return
            await asyncio.sleep(0.02)
        raise AssertionError(f"cannot remount {self.path} {mode}: {last.decode()}")

    async def read_only(self) -> None:
        await self.remount("ro")

    async def writable(self) -> None:
        await self.remount("rw")


@contextlib.contextmanager
def mount_tmpfs(path: Path, size: str, *, read_only: bool = False) -> Iterator[Disk]:
    """Skips (fails under CI=true) where mounting is not permitted; always unmounts."""
    path.mkdir(parents=True, exist_ok=True)
    reason = ""
    options = f"size={size}" + (",ro" if read_only else "")
    if os.geteuid() != 0:
        reason = "mounting a tmpfs needs root"
    else:
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
            capture_output=True,
            check=False,
        )
        if done.returncode != 0:
            reason = f"cannot mount a tmpfs: {done.stderr.decode().strip()}"
    if reason:
        if in_ci():
            pytest.fail(f"{reason} (CI=true: disk fault tests must run)")
        pytest.skip(reason)
    try:
        yield Disk(path)
    finally:
        subprocess.run(["mount", "-o", "remount,rw", str(path)], capture_output=True, check=False)
        if subprocess.run(["umount", str(path)], capture_output=True, check=False).returncode:
            subprocess.run(["umount", "--lazy", str(path)], check=False)  # files still open


Tmpfs = Callable[..., Disk]  # the tmpfs fixture
