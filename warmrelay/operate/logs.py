"""Logging set-up, in a module of its own: the supervisor must configure logging before
anything imports prometheus_client (which reads PROMETHEUS_MULTIPROC_DIR on import).

Two formats (``log.format``): ``text``, one line per event
(``2026-11-27 04:42:01,123 INFO warmrelay.delivery: ...``), and ``json``, one object per
line (python-json-logger): ``time`` (ISO 8601, UTC), ``level``, ``logger``, ``message``,
then any ``extra`` fields of the call (and ``worker`` in a worker of ``--workers``).
"""

from __future__ import annotations

import logging
import sys
import time
from datetime import UTC, datetime
from typing import Literal

from pythonjsonlogger.json import JsonFormatter

LogFormat = Literal["text", "json"]

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
HANDLER_NAME = "warmrelay"  # our handler on the root logger: found again to switch format


class TextFormatter(logging.Formatter):
    """``TEXT_FORMAT``, its local date and time formatted once per second: strftime for
    every record (two per message) was ~1 % of the event loop. The same text as
    logging.Formatter's."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)
        self._second: tuple[int, str] = (-1, "")  # one tuple: threads log too

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        if datefmt is not None:
            return super().formatTime(record, datefmt)
        second, text = self._second
        if second != int(record.created):
            second = int(record.created)
            text = time.strftime(self.default_time_format, self.converter(record.created))
            self._second = (second, text)
        return f"{text},{int(record.msecs):03d}"  # logging's default_msec_format "%s,%03d"


class UtcJsonFormatter(JsonFormatter):
    """One JSON object per record, its time in ISO 8601 UTC with milliseconds."""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        moment = datetime.fromtimestamp(record.created, UTC)
        return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def formatter(fmt: LogFormat, worker: int | None = None) -> logging.Formatter:
    if fmt == "text":
        return TextFormatter()
    return UtcJsonFormatter(
        "%(asctime)s %(levelname)s %(name)s %(message)s",
        rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
        static_fields={} if worker is None else {"worker": worker},
        json_ensure_ascii=False,
    )


def _handler() -> logging.Handler | None:
    return next((h for h in logging.getLogger().handlers if h.get_name() == HANDLER_NAME), None)


def setup_logging(fmt: LogFormat = "text", *, worker: int | None = None) -> None:
    """Events on stderr, in ``fmt``. aiosmtpd logs every command at INFO ("mail.log"):
    that is a debugging aid costing a fifth of the CPU under load, so only its warnings
    pass. Called again, it changes the format of the handler it installed."""
    root = logging.getLogger()
    handler = _handler()
    if handler is None:
        handler = logging.StreamHandler(sys.stderr)
        handler.set_name(HANDLER_NAME)
        root.addHandler(handler)
    handler.worker = worker  # type: ignore[attr-defined]
    handler.setFormatter(formatter(fmt, worker))
    root.setLevel(logging.INFO)
    logging.getLogger("mail.log").setLevel(logging.WARNING)
    logging.logThreads = False  # fields no format shows: skip collecting them
    logging.logProcesses = False
    logging.logMultiprocessing = False
    # nor the caller's file, line and function: finding them walks the stack for every
    # record (the logging HOWTO's "Optimization" section names this switch)
    logging._srcfile = None


def apply_log_format(fmt: LogFormat) -> bool:
    """Switch the format of the handler ``setup_logging`` installed (a reload changed
    ``log.format``); False when there is none (a relay run inside tests)."""
    handler = _handler()
    if handler is None:
        return False
    handler.setFormatter(formatter(fmt, getattr(handler, "worker", None)))
    return True


def pass_worker_line(line: str, index: int, fmt: LogFormat) -> None:
    """A line worker ``index`` wrote on its stderr, onto ours (the supervisor's). As text it
    is prefixed ``[wN]``; as json a worker's own objects pass as they are (they carry
    ``worker``), anything else (a traceback) goes out as one object of its own."""
    if fmt == "text":
        sys.stderr.write(f"[w{index}] {line}")
    elif line.startswith("{"):
        sys.stderr.write(line)
    elif line.strip():
        logging.getLogger("warmrelay.supervisor").warning(
            "worker %d: %s", index, line.rstrip("\n"), extra={"worker": index}
        )
