"""The command line as a real process (``python -m warmrelay ...``), always bounded in
time: a hung command fails its test instead of hanging the suite."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the repository: `python -m warmrelay` finds it
TIMEOUT_S = 60.0


def warmrelay(
    *args: str,
    env: Mapping[str, str] | None = None,
    timeout_s: float = TIMEOUT_S,
    prefix: Sequence[str] = (),
    stdin: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``warmrelay ARGS`` and wait (``prefix``: a command that runs it, e.g. with fewer
    rights). For tests without a relay in their own event loop."""
    return subprocess.run(
        [*prefix, sys.executable, "-m", "warmrelay", *args],
        capture_output=True,
        text=True,
        check=False,
        env=None if env is None else dict(env),
        timeout=timeout_s,
        input=stdin,
        cwd=ROOT,
    )


async def warmrelay_async(
    *args: str,
    env: Mapping[str, str] | None = None,
    timeout_s: float = TIMEOUT_S,
    stdin: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """``warmrelay`` for tests whose relay runs in their own event loop (a blocking run
    would stop it from answering)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "warmrelay",
        *args,
        stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=None if env is None else dict(env),
        cwd=ROOT,
    )
    try:
        out, err = await asyncio.wait_for(
            proc.communicate(None if stdin is None else stdin.encode()), timeout_s
        )
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return subprocess.CompletedProcess(list(args), proc.returncode, out.decode(), err.decode())
