"""`warmrelay serve`: the relay (one process, or a supervisor of ``--workers``)."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from warmrelay.cli.common import load_or_exit
from warmrelay.config import (
    start_problems,
)

if TYPE_CHECKING:
    pass


def cmd_serve(args: argparse.Namespace) -> int:
    """Run the relay. A worker (started by a supervisor) takes its configuration from the
    supervisor, never from the file, which may be broken by now; anything else first takes
    state.dir for itself, so a second instance on it stops here, having touched nothing."""
    # imported late: check-config needs none of the I/O stack
    from warmrelay.operate.supervisor import supervise
    from warmrelay.operate.workers import (
        StateDirInUse,
        lock_state_dir,
        receive_config,
        worker_from_env,
    )

    worker = worker_from_env()
    if worker is not None:  # started by a supervisor
        from warmrelay.app import Worker, run

        return run(receive_config(), Worker(*worker))
    config = load_or_exit(args.config)
    # refused before anything starts (supervisor, workers): a broken key or an unwritable
    # state.dir must not become a worker restart loop; check-config runs the same checks
    problems = start_problems(config)
    if problems:
        for problem in problems:
            print(f"{args.config}: cannot start: {problem}", file=sys.stderr)
        return 1
    try:
        lock_fd = lock_state_dir(config.state.dir)
    except StateDirInUse as exc:
        print(f"{args.config}: cannot start: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        where = config.state.dir
        print(f"{args.config}: cannot start: cannot lock {where}: {exc}", file=sys.stderr)
        return 1
    if args.workers > 1:
        from warmrelay.errors import StartError
        from warmrelay.operate.logs import setup_logging

        setup_logging(args.log_format or config.log.format)
        try:
            return supervise(config, args.config, args.workers, lock_fd, args.log_format)
        except StartError as exc:
            print(f"{args.config}: cannot start: {exc}", file=sys.stderr)
            return 1
    from warmrelay.app import run

    return run(config, path=args.config, log_format=args.log_format)
