"""`warmrelay suppression list|add|remove`: through the running relay, else on the store."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any

from warmrelay.cli.common import load_or_exit, pending_in_relay

if TYPE_CHECKING:
    pass


def cmd_suppression(args: argparse.Namespace) -> int:
    """List, add or remove suppressed addresses: through the running relay's admin endpoint
    (its own list changes at once), else straight on the state store (relays, workers and a
    fleet on that store read it within seconds)."""
    import asyncio
    import json
    import urllib.error
    import urllib.parse
    import urllib.request

    config = load_or_exit(args.config)
    address: str | None = args.address
    if args.action != "list" and not address:
        print(f"suppression {args.action}: give the ADDRESS", file=sys.stderr)
        return 2
    from warmrelay.cli.client import Refused, RelayDown, call

    result: dict[str, Any] | None = None
    try:
        if args.action == "list":
            result = call(config, "GET", "/suppression")
        else:
            assert address is not None
            quoted = urllib.parse.quote(address, safe="@+")
            result = call(config, "POST", f"/suppression/{quoted}/{args.action}")
        where = "by the running relay"
    except Refused as exc:
        print(f"suppression {args.action}: {exc}", file=sys.stderr)
        return 1
    except RelayDown:
        pass  # no relay running: read or change the store it will read at start
    if result is None:
        from warmrelay.app import Relay

        async def offline() -> dict[str, Any]:
            relay = Relay(config)
            try:
                if args.action == "list":
                    return await relay.suppression_list()
                assert address is not None
                return await relay.suppression_action(address, args.action)
            finally:
                await relay.counters.close()

        try:
            result = asyncio.run(offline())
        except KeyError:
            print(f"{address}: not on the suppression list", file=sys.stderr)
            return 1
        except ValueError as exc:
            print(f"{address}: {exc}", file=sys.stderr)
            return 1
        where = "in the state store (no relay running)"
        if result.get("persisted") == "pending":  # this process ends now: nothing will store it
            print(f"{address}: {args.action} NOT recorded: the state store failed", file=sys.stderr)
            return 1
    elif result.get("persisted") == "pending":
        return pending_in_relay(address, args.action)
    if args.action == "list":
        return _print_suppressed(result, address, args.json)
    if args.json:
        print(json.dumps(result, indent=2))
    elif args.action == "add":
        print(f"{result['address']}: suppressed until {result['until']} ({where})")
    else:
        print(f"{result['address']}: removed from the suppression list ({where})")
    return 0


def _print_suppressed(listing: dict[str, Any], address: str | None, as_json: bool) -> int:
    """The list (or the one entry of ``address``: exit 1 if it is not suppressed)."""
    import json

    entries: list[dict[str, str]] = listing["entries"]
    if address is not None:
        wanted = address.strip().removeprefix("<").removesuffix(">").lower()
        entries = [e for e in entries if e["address"] == wanted]
        listing = {**listing, "count": len(entries), "entries": entries}
    if as_json:
        print(json.dumps(listing, indent=2))
    elif address is not None and not entries:
        print(f"{address}: not suppressed", file=sys.stderr)
    else:
        days = float(listing["ttl_s"]) / 86400
        state = "" if listing["enabled"] else " (suppression.enabled is false: none refused)"
        print(f"{len(entries)} suppressed address(es), each for {days:g} days{state}")
        rows = [("ADDRESS", "SINCE", "UNTIL", "BY", "REPLY")]
        rows += [(e["address"], e["since"], e["until"], e["by"], e["reply"]) for e in entries]
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        for r in rows:
            print("  ".join(c.ljust(w) for c, w in zip(r[:4], widths, strict=True)) + "  " + r[4])
    return 1 if address is not None and not entries else 0
