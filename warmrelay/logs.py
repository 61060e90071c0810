"""Logging set-up, in a module of its own: the supervisor must configure logging before
anything imports prometheus_client (which reads PROMETHEUS_MULTIPROC_DIR on import)."""

from __future__ import annotations

import logging
import sys


def setup_logging() -> None:
    """One line per event on stderr. aiosmtpd logs every command at INFO ("mail.log"): that
    is a debugging aid costing a fifth of the CPU under load, so only its warnings pass."""
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("mail.log").setLevel(logging.WARNING)
    logging.logThreads = False  # fields our format does not show: skip collecting them
    logging.logProcesses = False
    logging.logMultiprocessing = False
