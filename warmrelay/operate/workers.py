"""What a supervisor of ``serve --workers`` and its workers share: the state.dir lock, the
configuration frames on a worker's stdin, and a worker's view of its place (index, count,
ports) from its environment.

One instance per ``state.dir``: ``serve`` (single or supervisor) holds a lock file there
before it creates or deletes anything, so a second one cannot wipe the first one's metrics
or fight its workers for their spools.

The supervisor is the only reader of the configuration file. Workers get the configuration
it runs through their stdin, at start and after each reload it accepted, never from the file:
a worker restarted while the file on disk is broken comes back with the last good
configuration and delivers its spool. The end of that pipe also tells a worker that its
supervisor is gone (killed), so it stops instead of living on as an orphan.

A worker is forked from the supervisor (``operate.supervisor``) or, when it is restarted,
started as ``python -m warmrelay serve`` with ``WARMRELAY_WORKER`` in its environment:
either way it finds its place in that variable and its configuration on stdin. (A forked
worker's /proc/PID/environ is the supervisor's: the log line "worker N started: pid P"
names each worker.)

The relay (``app``) imports this module, never the supervisor's: no cycle.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import pickle
import struct
from collections.abc import Callable
from pathlib import Path

from warmrelay.config.model import Config
from warmrelay.errors import WarmrelayError

WORKER_ENV = "WARMRELAY_WORKER"  # "index/count/port,port": set for worker processes
LOCK_NAME = "warmrelay.lock"  # in state.dir; the spool's own lock is spool*/lock
_FRAME = struct.Struct("!Q")  # length prefix of one pickled Config on a worker's stdin


class StateDirInUse(WarmrelayError):
    """Another ``warmrelay serve`` (or workers of one) holds this state.dir."""


def lock_state_dir(state_dir: Path) -> int:
    """Take state.dir for this instance, before anything in it is created or deleted: an
    exclusive flock on ``state.dir/warmrelay.lock``, with our pid written in it for the
    message the next one gets. Returns the fd; the lock lasts while any process holding it
    lives (the supervisor passes it to its workers). StateDirInUse when taken."""
    state_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(state_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        os.close(fd)
        who = f" (pid {holder}, or its workers)" if holder.isdigit() else ""
        raise StateDirInUse(
            f"state.dir {state_dir} is in use by another warmrelay{who}; "
            "stop it first, or give this one its own state.dir"
        ) from None
    except OSError:
        os.close(fd)
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def config_frame(config: Config) -> bytes:
    """One configuration for a worker's stdin. Pickle, because the Config object (parsed
    schedules, zones, addresses) does not survive a JSON round trip; the pipe runs only
    from the supervisor to its own child, so nobody else can write to it."""
    data = pickle.dumps(config, protocol=pickle.HIGHEST_PROTOCOL)
    return _FRAME.pack(len(data)) + data


def _decode(data: bytes) -> Config:
    config = pickle.loads(data)
    if not isinstance(config, Config):
        raise WarmrelayError(f"the supervisor sent a {type(config).__name__}, not a Config")
    return config


def _read_exactly(fd: int, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = os.read(fd, size - len(data))
        if not chunk:
            raise WarmrelayError("the supervisor closed stdin before sending the configuration")
        data += chunk
    return data


def receive_config(fd: int = 0) -> Config:
    """A worker's configuration at start: the first frame on stdin, read unbuffered (the
    frames after it are follow_supervisor's)."""
    (size,) = _FRAME.unpack(_read_exactly(fd, _FRAME.size))
    return _decode(_read_exactly(fd, size))


async def follow_supervisor(apply: Callable[[Config], object], fd: int = 0) -> None:
    """In a worker: hand each configuration the supervisor sends (a reload it accepted) to
    ``apply``; return when the pipe closes, i.e. the supervisor is gone."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    # not file I/O: a handle on the inherited pipe, which the transport then reads
    pipe = open(fd, "rb", buffering=0, closefd=False)  # noqa: SIM115, ASYNC230
    transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), pipe)
    try:
        while True:
            try:
                (size,) = _FRAME.unpack(await reader.readexactly(_FRAME.size))
                data = await reader.readexactly(size)
            except asyncio.IncompleteReadError:
                return
            apply(_decode(data))
    finally:
        transport.close()


def worker_env(index: int, count: int, ports: tuple[int, ...]) -> str:
    """The value of WARMRELAY_WORKER for worker ``index`` of ``count`` ("index/count/ports")."""
    return f"{index}/{count}/" + ",".join(map(str, ports))


def worker_from_env() -> tuple[int, int, tuple[int, ...]] | None:
    value = os.environ.get(WORKER_ENV)
    if not value:
        return None
    index, count, ports = value.split("/")
    return int(index), int(count), tuple(int(p) for p in ports.split(",") if p)
