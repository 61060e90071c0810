"""`warmrelay preflight`: the DNS identity checks, exit 1 when one that hurts delivery fails,
2 when nothing could be checked."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from warmrelay.cli.common import load_or_exit

if TYPE_CHECKING:
    pass


def cmd_preflight(args: argparse.Namespace) -> int:
    """Check each IP's and signing domain's DNS identity (meant to run on the sending host).
    Exit 1 when a check that hurts delivery fails; unknown (no answer) does not fail, but
    no DNS answer at all is exit 2 (could not check): a green run must mean "checked".
    Changes nothing: the running relay pauses a listed warming IP itself."""
    import asyncio
    import json

    from warmrelay.mail.preflight import Preflight

    config = load_or_exit(args.config)
    report = asyncio.run(Preflight(config).run())
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
        if report.unchecked:  # the JSON says so too ("dns": {"error"}); this is for people
            print(f"preflight: {report.unchecked}", file=sys.stderr)
    else:
        print(report.table())
    if report.failed:
        return 1
    return 2 if report.unchecked else 0
