"""Command line: ``warmrelay serve | check-config | schedule | simulate | queue | ip |
suppression | preflight | dkim keygen | hash-password``, one module per command."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from datetime import date

from warmrelay import __version__
from warmrelay.cli import queue as queuecli
from warmrelay.cli.check import cmd_check_config
from warmrelay.cli.ip import cmd_ip
from warmrelay.cli.keys import cmd_dkim_keygen, cmd_hash_password
from warmrelay.cli.preflight import cmd_preflight
from warmrelay.cli.schedule import cmd_schedule
from warmrelay.cli.serve import cmd_serve
from warmrelay.cli.simulate import cmd_simulate
from warmrelay.cli.suppression import cmd_suppression
from warmrelay.errors import WarmrelayError
from warmrelay.warmup.control import IP_ACTIONS


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="warmrelay", description="SMTP relay that warms up new sending IPs."
    )
    parser.add_argument("--version", action="version", version=f"warmrelay {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("serve", help="run the relay")
    p.add_argument("-c", "--config", required=True, help="YAML configuration file")
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        help="relay processes sharing the listening ports (default 1; one per core)",
    )
    p.add_argument(
        "--log-format",
        choices=["text", "json"],
        default=None,
        help="log lines as text or JSON objects (overrides log.format, also after reloads)",
    )
    p.set_defaults(func=cmd_serve)

    queuecli.add_parser(sub)
    p = sub.add_parser("check-config", help="validate a configuration file")
    p.add_argument("-c", "--config", required=True)
    p.set_defaults(func=cmd_check_config)
    p = sub.add_parser("schedule", help="show the warmup plan of each warming IP")
    p.add_argument("-c", "--config", required=True)
    p.add_argument("--days", type=int, default=None, help="rows to show (default: until warm)")
    p.set_defaults(func=cmd_schedule)
    p = sub.add_parser("hash-password", help="print a password hash for smtp.users")
    p.set_defaults(func=cmd_hash_password)
    p = sub.add_parser("dkim", help="DKIM signing keys")
    dkim_sub = p.add_subparsers(dest="dkim_command", required=True)
    p = dkim_sub.add_parser("keygen", help="write a new key and print its DNS TXT record")
    p.add_argument("--domain", required=True, help="signing domain (d=)")
    p.add_argument("--selector", required=True, help="selector (s=), e.g. s2026")
    p.add_argument(
        "--algorithm",
        choices=["rsa", "ed25519"],
        default="rsa",
        help="rsa (2048-bit, verified everywhere; default) or ed25519 (RFC 8463, beside rsa)",
    )
    p.add_argument("--out", default=None, help="key file (default DOMAIN.SELECTOR.pem)")
    p.set_defaults(func=cmd_dkim_keygen)
    p = sub.add_parser(
        "ip", help="pause, resume, complete (or uncomplete) the warmup of a source IP"
    )
    p.add_argument("action", choices=IP_ACTIONS)
    p.add_argument("address")
    p.add_argument("-c", "--config", required=True)
    p.set_defaults(func=cmd_ip)
    p = sub.add_parser(
        "suppression", help="list, add or remove addresses refused after a hard bounce"
    )
    p.add_argument("action", choices=["list", "add", "remove"])
    p.add_argument("address", nargs="?", help="for add and remove (list: show only this one)")
    p.add_argument("-c", "--config", required=True)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_suppression)
    p = sub.add_parser(
        "preflight", help="check PTR, FCrDNS, blocklists, SPF, DKIM and DMARC before warming"
    )
    p.add_argument("-c", "--config", required=True)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_preflight)
    p = sub.add_parser(
        "simulate",
        help="project a steady daily volume through the warmup, or replay daily signals "
        "through the reputation controller",
    )
    p.add_argument("-c", "--config", required=True)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--daily", type=int, default=None, help="recipients per day")
    what.add_argument(
        "--signals",
        default=None,
        metavar="FILE.csv",
        help="replay daily signals (date,ip,provider,signal,value) through progress: "
        "reputation's controller",
    )
    p.add_argument(
        "--days",
        type=int,
        default=None,
        help="days to simulate (default: until warm; --signals: through the file's last date + 3)",
    )
    p.add_argument(
        "--start",
        type=date.fromisoformat,
        default=None,
        help="first simulated day (default: the earliest warmup start)",
    )
    p.add_argument("--mix", default=None, help="provider shares, e.g. gmail=0.4,microsoft=0.3")
    p.add_argument("--plot", default=None, help="write a chart of both series to FILE.svg")
    p.add_argument("--json", action="store_true", help="--signals: the rows as a JSON list")
    p.set_defaults(func=cmd_simulate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except BrokenPipeError:  # output piped into head & co.
        return 0
    except WarmrelayError as exc:  # our own, deliberate failures: their message, no traceback
        for line in str(exc).splitlines() or [type(exc).__name__]:
            print(f"warmrelay: {line}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
