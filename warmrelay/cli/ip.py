"""`warmrelay ip pause|resume|complete|uncomplete`: through the running relay, else on the store."""

from __future__ import annotations

import argparse
import sys
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from warmrelay.cli.common import load_or_exit, pending_in_relay
from warmrelay.warmup.plan import WarmupState

if TYPE_CHECKING:
    pass


def cmd_ip(args: argparse.Namespace) -> int:
    """Ask the running relay (admin endpoint); if none runs, write the state store directly."""
    import asyncio

    config = load_or_exit(args.config)
    if args.address not in {str(ip.address) for ip in config.ips}:
        print(f"{args.address} is not listed under ips in {args.config}", file=sys.stderr)
        return 1
    from warmrelay.cli.client import Refused, RelayDown, call

    try:
        state = call(config, "POST", f"/ips/{args.address}/{args.action}")
    except Refused as exc:
        print(f"ip {args.action}: {exc}", file=sys.stderr)
        return 1
    except RelayDown:
        pass  # no relay running: change the store it will read at start
    else:
        if state.get("persisted") == "pending":
            return pending_in_relay(args.address, args.action)
        print(f"{args.address}: {args.action} done by the running relay; state {state['state']}")
        _still_warm(args.action, state)
        return 0

    from warmrelay.app import Relay

    async def offline() -> dict[str, object]:
        relay = Relay(config)
        try:
            await relay.router.refresh(datetime.now(UTC))
            return await relay.ip_action(args.address, args.action)
        finally:
            await relay.counters.close()

    state = asyncio.run(offline())
    if state["persisted"] == "pending":  # this process ends now: nothing will store it
        print(
            f"{args.address}: {args.action} NOT recorded: the state store failed (see the log)",
            file=sys.stderr,
        )
        return 1
    print(
        f"{args.address}: {args.action} recorded in {config.state.dir} (no relay running); "
        f"state {state['state']}"
    )
    _still_warm(args.action, state)
    return 0


def _still_warm(action: str, state: dict[str, Any]) -> None:
    """``uncomplete`` of an IP whose schedule is over: it stays warm; say why."""
    if action == "uncomplete" and state.get("state") == WarmupState.WARM.value:
        print(
            f"{state.get('address')}: its schedule is over (day {state.get('warmup_day')} of "
            f"{state.get('schedule_days')}): it stays warm; give it a later warmup.start or a "
            "longer schedule to warm it again",
            file=sys.stderr,
        )
