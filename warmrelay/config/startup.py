"""What serve refuses at start, beyond a valid file: ``start_problems`` (listening
addresses it cannot bind, an unset admin token, DKIM keys it cannot use, TLS files it
cannot load, a state.dir it cannot create or write). These are the checks it runs
before anything starts; check-config runs the same function, because the systemd
unit's ExecStartPre relies on it: a file check-config passes must not fail to start.
``admin_token`` is also how the running relay reads its token (failing closed)."""

from __future__ import annotations

import errno
import os
import re
import socket
import ssl
from pathlib import Path

from warmrelay.config.events import webhook_secret
from warmrelay.config.feedback import bounce_secret
from warmrelay.config.model import Config
from warmrelay.config.service import AdminConfig
from warmrelay.config.smtp import TlsConfig
from warmrelay.errors import ConfigError, ConfigProblem


def admin_token(admin: AdminConfig) -> str | None:
    """The bearer token the admin endpoint requires (None: none configured, or no endpoint).

    Fails closed: if ``token_env`` names a variable that is unset or blank, this raises
    instead of returning None, so a missing secret never means an open endpoint."""
    if admin.token_env is None or admin.listen is None:
        return None
    token = os.environ.get(admin.token_env, "").strip()
    if not token:  # an empty or blank secret is as good as none
        raise ConfigError(
            [
                ConfigProblem(
                    "admin.token_env",
                    f"the environment variable {admin.token_env} is not set or empty; "
                    "refusing to run with an open admin endpoint (set it to a long random "
                    "secret, or remove admin.token_env)",
                )
            ]
        )
    return token


def _write_probe(directory: Path) -> OSError | None:
    """Why a file cannot be created in ``directory``, or None. An unnamed O_TMPFILE file
    (gone at close, never seen by a relay that runs there) tells it exactly, for root too
    (read-only file system, immutable directory); os.access where O_TMPFILE is missing."""
    flag = getattr(os, "O_TMPFILE", 0)
    if flag:
        try:
            os.close(os.open(directory, flag | os.O_WRONLY, 0o600))
            return None
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
                return exc
    if os.access(directory, os.W_OK | os.X_OK):
        return None
    read_only = os.statvfs(directory).f_flag & os.ST_RDONLY
    code = errno.EROFS if read_only else errno.EACCES
    return OSError(code, os.strerror(code))


def state_dir_problem(state_dir: Path) -> ConfigProblem | None:
    """Why serve could not create or write ``state.dir`` (its lock, counters and spool live
    there), or None. Creates nothing: a missing directory is judged by its nearest
    existing parent, which serve would create it in."""
    try:
        return _state_dir_problem(state_dir)
    except OSError as exc:  # not even a look: a parent directory that may not be entered
        return ConfigProblem("state.dir", f"{state_dir} cannot be reached: {exc.strerror}")


def _state_dir_problem(state_dir: Path) -> ConfigProblem | None:
    where = "state.dir"
    if not state_dir.exists():
        parent = state_dir.parent
        while not parent.exists() and not parent.is_symlink() and parent != parent.parent:
            parent = parent.parent
        if parent.is_symlink() and not parent.exists():
            reason = f"{parent} is a symbolic link to nothing"
        elif state_dir.is_symlink():
            reason = f"it is a symbolic link to nothing ({os.readlink(state_dir)})"
        elif not parent.is_dir():
            reason = f"{parent} is not a directory"
        elif (exc := _write_probe(parent)) is not None:
            reason = f"{parent}: {exc.strerror}"
        else:
            return None
        return ConfigProblem(where, f"{state_dir} cannot be created: {reason}")
    if not state_dir.is_dir():
        return ConfigProblem(where, f"{state_dir} is not a directory")
    # the directory itself, and the spools a relay (or a worker of --workers) left there:
    # a start on a read-only spool is refused (its deliveries could not be recorded)
    spools = sorted(
        d for d in state_dir.glob("spool*") if re.fullmatch(r"spool(-\d+)?", d.name) and d.is_dir()
    )
    for directory in [state_dir, *spools]:
        exc = _write_probe(directory)
        if exc is not None:
            return ConfigProblem(where, f"{directory} is not writable: {exc.strerror}")
    from warmrelay.operate.workers import LOCK_NAME  # (workers imports warmrelay.config)

    lock = state_dir / LOCK_NAME
    if lock.exists():
        try:
            os.close(os.open(lock, os.O_RDWR))  # no flock: a running relay keeps its lock
        except OSError as exc:
            return ConfigProblem(where, f"{lock} cannot be opened for writing: {exc.strerror}")
    return None


def _tls_problems(tls: TlsConfig) -> list[ConfigProblem]:
    """Why the listeners' certificate and key cannot be loaded, as serve loads them."""
    problems = []
    for name, path in (("cert", tls.cert), ("key", tls.key)):
        try:
            with path.open("rb"):
                pass
        except OSError as exc:
            problems.append(
                ConfigProblem(f"smtp.tls.{name}", f"cannot read {path}: {exc.strerror}")
            )
    if problems:
        return problems
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_verify_locations(cafile=tls.cert)  # parses the chain alone
    except (ssl.SSLError, ValueError):
        return [ConfigProblem("smtp.tls.cert", f"{tls.cert} is not a PEM certificate chain")]
    asked: list[bool] = []

    def no_passphrase() -> bytes:
        """Without this OpenSSL would prompt on the terminal for an encrypted key."""
        asked.append(True)
        return b""

    try:
        context.load_cert_chain(tls.cert, tls.key, password=no_passphrase)
    except ssl.SSLError as exc:
        if asked:
            message = f"{tls.key} is encrypted with a passphrase; store it without"
        elif exc.reason == "KEY_VALUES_MISMATCH":
            message = f"{tls.key} is not the key of {tls.cert}"
        else:
            message = f"{tls.key} is not a PEM private key for {tls.cert}"
        return [ConfigProblem("smtp.tls.key", message)]
    except OSError as exc:
        return [ConfigProblem("smtp.tls", f"cannot load {tls.cert} and {tls.key}: {exc}")]
    return []


def _listen_problem(where: str, address: tuple[str, int]) -> ConfigProblem | None:
    """Why serve could not listen on ``address`` here: not an address of this host, or a
    port below 1024 without the right to bind it. A port in use is no problem: the relay
    being checked or restarted may hold it right now."""
    host, port = address
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            return None
        hint = " (ports below 1024 need root or CAP_NET_BIND_SERVICE)" if port < 1024 else ""
        text = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        return ConfigProblem(where, f"{text} cannot be bound on this host: {exc.strerror}{hint}")
    return None


def start_problems(config: Config) -> list[ConfigProblem]:
    """Everything ``serve`` refuses to start with, beyond a valid file: an unset admin
    token or bounce secret, DKIM keys it cannot use, TLS files it cannot load, listening
    addresses it cannot bind, a state.dir it cannot create or write, a reputation feed
    without its secret or key file, an event webhook without its secret. check-config reports
    the same list, so it refuses what serve refuses."""
    from warmrelay.mail.dkim import load_keys  # dkim imports warmrelay.config

    problems: list[ConfigProblem] = []
    for i, listener in enumerate(config.smtp.listen):
        problem = _listen_problem(f"smtp.listen[{i}].address", listener.address)
        problems += [problem] if problem is not None else []
    if config.admin.listen is not None:
        problem = _listen_problem("admin.listen", config.admin.listen)
        problems += [problem] if problem is not None else []
    try:
        admin_token(config.admin)
    except ConfigError as exc:
        problems += exc.problems
    try:
        load_keys(config.dkim)
    except ConfigError as exc:
        problems += exc.problems
    if config.smtp.tls is not None:
        problems += _tls_problems(config.smtp.tls)
    if config.bounces is not None:
        try:
            bounce_secret(config.bounces)
        except ConfigError as exc:
            problems += exc.problems
    problems += _reputation_problems(config)
    if config.events.webhook is not None:
        try:
            webhook_secret(config.events.webhook)
        except ConfigError as exc:
            problems += exc.problems
    state = state_dir_problem(config.state.dir)
    if state is not None:
        problems.append(state)
    return problems


def _reputation_problems(config: Config) -> list[ConfigProblem]:
    """A feed configured but unusable: its secret missing, or a key file that could never
    sign in. Without them it would be unknown every day, so the ramp would hold for good."""
    problems = []
    r = config.reputation
    if r.snds is not None and not os.environ.get(r.snds.url_env, "").strip():
        problems.append(
            ConfigProblem(
                "reputation.snds.url_env",
                f"the environment variable {r.snds.url_env} is not set or empty (it holds "
                "the SNDS automated-access URL with its key)",
            )
        )
    if r.gmail_postmaster is not None:
        from warmrelay.reputation.feeds import FeedError
        from warmrelay.reputation.postmaster import load_credentials

        try:
            load_credentials(r.gmail_postmaster.credentials_file)
        except FeedError as exc:
            why = str(exc).removeprefix("gmail postmaster: ")
            problems.append(ConfigProblem("reputation.gmail_postmaster.credentials_file", why))
    return problems
