"""What several commands share: loading the file or exiting with its errors, printing problems."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from warmrelay.config import (
    Config,
    config_error_lines,
    load_config,
)
from warmrelay.errors import ConfigError, ConfigProblem

if TYPE_CHECKING:
    pass


def fmt_hostport(hp: tuple[str, int]) -> str:
    host, port = hp
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def print_problems(path: str, kind: str, problems: Sequence[ConfigProblem]) -> None:
    print(f"{path}: {len(problems)} {kind}(s)", file=sys.stderr)
    for problem in problems:
        print(f"  {problem}", file=sys.stderr)


def pending_in_relay(subject: str | None, action: str) -> int:
    """The running relay took the change but its state store did not (yet): exit 1."""
    print(
        f"{subject}: {action} is in force in the running relay, but its state store failed: "
        "other relay processes (workers, a fleet) see it only once the store answers again",
        file=sys.stderr,
    )
    return 1


def load_or_exit(path: str) -> Config:
    """The configuration, or exit 1 having printed what check-config prints for it."""
    try:
        return load_config(path)
    except ConfigError as exc:
        for line in config_error_lines(path, exc):
            print(line, file=sys.stderr)
        raise SystemExit(1) from None
