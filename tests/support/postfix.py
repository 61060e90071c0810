"""A private Postfix instance on loopback: a real MTA to deliver to. Its own
config_directory and queue_directory in a temporary directory, master.cf with only smtpd
listeners on free 127.0.0.1 ports (plus the internal services a delivery needs), mail
relayed from 127.0.0.0/8 to the discard transport, its log in a file of its own.

Postfix must start as root (its daemons drop to ``mail_owner``); where it cannot run (not
root, not installed) the tests skip, except under CI=true where they fail. The directory
is made under /tmp with mode 755, not under pytest's tmp_path: Postfix daemons run as the
postfix user and must reach their queue.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from support.disk import in_ci
from support.polling import eventually
from support.redisserver import free_port

POSTFIX = "/usr/sbin/postfix"
POSTCONF = "/usr/sbin/postconf"

# The services a delivery through smtpd to discard(8) touches (from Postfix's master.cf).
SERVICES = """\
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
postlog   unix-dgram n  -       n       -       1       postlogd
"""


def missing() -> str | None:
    """Why a private Postfix cannot run here, or None."""
    if not (os.path.exists(POSTFIX) and os.path.exists(POSTCONF)):
        return "Postfix is not installed (apt-get install postfix)"
    if os.geteuid() != 0:
        return "a private Postfix instance must be started as root"
    return None


@dataclass
class Postfix:
    """A running instance: ``ports[name]`` of each smtpd listener, ``log()`` its log."""

    root: Path
    ports: dict[str, int] = field(default_factory=dict)

    @property
    def config_directory(self) -> Path:
        return self.root / "etc"

    @property
    def maillog(self) -> Path:
        return self.root / "maillog"

    def log(self) -> str:
        return self.maillog.read_text(errors="replace") if self.maillog.exists() else ""

    def postfix(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [POSTFIX, "-c", str(self.config_directory), *args],
            capture_output=True,
            text=True,
            check=False,
        )

    async def wait_for_log(self, pattern: str, timeout_s: float = 20.0) -> re.Match[str]:
        """The first match of ``pattern`` in the log, once Postfix has written it (polled:
        postlogd writes the file in its own time, no event announces it)."""
        found: list[re.Match[str]] = []

        def check() -> bool:
            match = re.search(pattern, self.log(), re.MULTILINE)
            if match:
                found.append(match)
            return match is not None

        await eventually(check, timeout_s, f"{pattern!r} in {self.maillog}")
        return found[0]


def _main_cf(root: Path, main: Mapping[str, str]) -> str:
    defaults = subprocess.run(
        [POSTCONF, "-d", "-h", "daemon_directory", "command_directory", "shlib_directory"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    settings = {
        "compatibility_level": "3.6",
        "daemon_directory": defaults[0],
        "command_directory": defaults[1],
        "shlib_directory": defaults[2],
        "queue_directory": str(root / "queue"),
        "data_directory": str(root / "data"),
        "mail_owner": "postfix",
        "setgid_group": "postdrop",
        "myhostname": "postfix.test",
        "mydomain": "postfix.test",
        "mydestination": "",
        "relay_domains": "",
        "inet_interfaces": "127.0.0.1",
        "inet_protocols": "ipv4",
        "mynetworks": "127.0.0.0/8",
        "smtpd_relay_restrictions": "permit_mynetworks, reject",
        "default_transport": "discard:taken by the test postfix",
        "relay_transport": "discard:taken by the test postfix",
        "alias_maps": "",
        "alias_database": "",
        "local_recipient_maps": "",
        "smtputf8_enable": "yes",
        "biff": "no",
        "maillog_file": str(root / "maillog"),
        "maillog_file_prefixes": str(root),
        **main,
    }
    return "".join(f"{key} = {value}\n" for key, value in settings.items())


@contextlib.contextmanager
def postfix_running(
    listeners: Mapping[str, Mapping[str, str]] | None = None,
    main: Mapping[str, str] | None = None,
) -> Iterator[Postfix]:
    """Start a private Postfix; stop it and remove its directory at the end.

    ``listeners``: smtpd services by name, each with its ``-o`` overrides (default: one,
    "smtp", as configured); ``main``: main.cf settings added or replaced.
    """
    reason = missing()
    if reason:
        if in_ci():
            pytest.fail(f"{reason} (CI=true: the Postfix tests must run)")
        pytest.skip(reason)
    root = Path(tempfile.mkdtemp(prefix="warmrelay-postfix-", dir="/tmp"))
    root.chmod(0o755)
    instance = Postfix(root)
    try:
        instance.config_directory.mkdir(mode=0o755)
        _queue(root)
        (instance.config_directory / "main.cf").write_text(_main_cf(root, main or {}))
        master = []
        for name, overrides in (listeners or {"smtp": {}}).items():
            port = instance.ports[name] = free_port()
            options = "".join(f" -o {key}={value}" for key, value in overrides.items())
            master.append(f"127.0.0.1:{port} inet n - n - - smtpd{options}\n")
        (instance.config_directory / "master.cf").write_text("".join(master) + SERVICES)
        for name in ("main.cf", "master.cf"):
            # Postfix reads no file changed within the last second: it naps (300 ms at a
            # time, 2 s per postfix command here) until it is older. Date ours back.
            past = time.time() - 60
            os.utime(instance.config_directory / name, (past, past))
        started = instance.postfix("start")  # master -w: returns once it listens
        if started.returncode != 0:
            raise RuntimeError(f"postfix start failed: {started.stderr}{instance.log()}")
        yield instance
    finally:
        pid = _master_pid(root)
        if pid is not None:
            instance.postfix("stop")
            _wait_gone(pid)  # the master exits after its children
        shutil.rmtree(root, ignore_errors=True)


# The queue layout of postfix-files: (directory, group, mode); owned by mail_owner but pid.
QUEUE = (
    *((name, "root", 0o700) for name in ("active", "bounce", "corrupt", "defer", "deferred")),
    *((name, "root", 0o700) for name in ("flush", "hold", "incoming", "private", "saved")),
    ("trace", "root", 0o700),
    ("maildrop", "postdrop", 0o730),
    ("public", "postdrop", 0o710),
)


def _queue(root: Path) -> None:
    """The queue and data directories, made here: ``postfix start`` would make them
    itself (post-install create-missing, then its integrity checks), but that takes 2.5 s
    where starting takes 0.1 s; ``quick-start`` tells it to skip all that."""
    queue = root / "queue"
    queue.mkdir(mode=0o755)
    (queue / "pid").mkdir(mode=0o755)
    for name, group, mode in QUEUE:
        (queue / name).mkdir()
        shutil.chown(queue / name, "postfix", group)
        (queue / name).chmod(mode)
    (root / "data").mkdir(mode=0o700)
    shutil.chown(root / "data", "postfix", "root")
    (queue / "quick-start").touch()


def _master_pid(root: Path) -> int | None:
    try:
        return int((root / "queue" / "pid" / "master.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _wait_gone(pid: int, timeout_s: float = 10.0) -> None:
    """Until process ``pid`` has exited. It is not our child (the master daemonizes), so
    once dead it may stay a zombie until init reaps it: that counts as gone."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return
        if stat.rsplit(")", 1)[1].split()[0] in ("Z", "X"):
            return
        time.sleep(0.02)
