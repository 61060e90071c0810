"""One error root for everything warmrelay raises on purpose.

Callers catch ``WarmrelayError`` to handle any of our failures; each subclass
names the stage of the data path it comes from.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


class WarmrelayError(Exception):
    """Root of all errors warmrelay raises deliberately."""


@dataclass(frozen=True)
class ConfigProblem:
    """One mistake in a configuration file: where (key path) and what."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


class ConfigError(WarmrelayError, ValueError):
    """A configuration file is invalid; carries every problem found, not only the first."""

    def __init__(self, problems: list[ConfigProblem]) -> None:
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


class StartError(WarmrelayError):
    """The relay cannot start: the text names the configuration key and what went wrong
    (``smtp.listen[0] 127.0.0.1:2525: address already in use``)."""

    @classmethod
    def bind(cls, where: str, host: str, port: int, exc: OSError) -> StartError:
        reason = os.strerror(exc.errno).lower() if exc.errno else str(exc)
        shown = f"[{host}]" if ":" in host else host
        return cls(f"{where} {shown}:{port}: {reason}")


class CounterError(WarmrelayError):
    """The counter store could not answer (locked, unreachable, corrupt)."""


class SpoolError(WarmrelayError, OSError):
    """The spool could not store or read a message durably."""


class NextHopError(WarmrelayError):
    """The next hop of a domain could not be found.

    ``permanent`` is true when retrying cannot help (null MX, no such domain),
    so the recipients bounce instead of waiting; ``status`` is the enhanced
    status code (RFC 3463) the recipients get.
    """

    def __init__(self, message: str, *, permanent: bool, status: str | None = None) -> None:
        super().__init__(message)
        self.permanent = permanent
        self.status = status or ("5.1.2" if permanent else "4.4.3")
