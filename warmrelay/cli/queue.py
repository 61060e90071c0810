"""`warmrelay queue list|summary|show|flush|hold|release|delete|bounce`.

Through the running relay's admin API when one answers (its scheduler knows the next
retry, router holds and replies, and acts at once); otherwise straight on the spool,
under the state.dir lock so no relay can start meanwhile (the views then show what the
spool records: recipients done, attempts, the operator's hold).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import urllib.parse
from datetime import UTC, datetime
from typing import Any

from warmrelay.cli.client import Refused, RelayDown, call, operator
from warmrelay.cli.common import load_or_exit
from warmrelay.config import Config
from warmrelay.errors import SpoolError
from warmrelay.operate.queueview import (
    ActionResult,
    Filter,
    MessageView,
    QueueState,
    RecipientView,
    format_summary,
    operator_bounce,
    summary,
)

ACTIONS = ("flush", "hold", "release", "delete", "bounce")
COMMANDS = ("list", "summary", "show", *ACTIONS)


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "queue",
        help="list, inspect and act on queued mail (through the running relay, else offline)",
    )
    p.add_argument("command", choices=COMMANDS)
    p.add_argument("queue_ids", nargs="*", metavar="QUEUE_ID")
    p.add_argument("-c", "--config", required=True)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--domain", help="list: pending at DOMAIN; actions: the recipients there")
    p.add_argument("--all", action="store_true", help="actions: every queued message")
    p.add_argument("--reason", help="bounce: the reason given to the sender in the DSN")
    p.add_argument("--ip", help="list: last tried from this source IP")
    p.add_argument("--state", choices=[s.value for s in QueueState], help="list: in this state")
    p.add_argument("--min-age", type=float, metavar="SECONDS", help="list: at least this old")
    p.set_defaults(func=cmd_queue)


def cmd_queue(args: argparse.Namespace) -> int:
    config = load_or_exit(args.config)
    body: dict[str, Any] = {}
    if args.command in ACTIONS:
        chosen = sum(map(bool, (args.queue_ids, args.domain, args.all)))
        if chosen != 1:
            print(f"queue {args.command}: give QUEUE_ID..., --domain D or --all", file=sys.stderr)
            return 2
        if args.command == "bounce" and not (args.reason or "").strip():
            print("queue bounce: give --reason (the sender reads it in the DSN)", file=sys.stderr)
            return 2
        body = {"queue_ids": args.queue_ids} if args.queue_ids else {}
        body |= {"domain": args.domain} if args.domain else {}
        body |= {"all": True} if args.all else {}
        body |= {"reason": args.reason} if args.command == "bounce" else {}
    elif args.command == "show" and len(args.queue_ids) != 1:
        print("queue show: give one QUEUE_ID", file=sys.stderr)
        return 2
    try:
        result, where = _online(config, args, body), "by the running relay"
    except RelayDown:
        from warmrelay.operate.workers import StateDirInUse

        try:
            result, where = (
                asyncio.run(_offline(config, args, body)),
                "on the spool (no relay runs)",
            )
        except (StateDirInUse, SpoolError) as exc:
            print(
                f"queue {args.command}: no relay answers on admin.listen, and {exc}",
                file=sys.stderr,
            )
            return 1
        except Refused as exc:
            print(f"queue {args.command}: {exc}", file=sys.stderr)
            return 1
    except Refused as exc:
        print(f"queue {args.command}: {exc}", file=sys.stderr)
        return 1
    return _print(args, result, where)


def _online(config: Config, args: argparse.Namespace, body: dict[str, Any]) -> dict[str, Any]:
    if args.command == "list":
        query = {"domain": args.domain, "ip": args.ip, "state": args.state}
        query |= {"min_age_s": str(args.min_age) if args.min_age is not None else None}
        params = urllib.parse.urlencode({k: v for k, v in query.items() if v})
        return call(config, "GET", "/queue" + (f"?{params}" if params else ""))
    if args.command == "summary":
        return call(config, "GET", "/queue/summary")
    if args.command == "show":
        return call(config, "GET", f"/queue/{urllib.parse.quote(args.queue_ids[0])}")
    return call(config, "POST", f"/queue/{args.command}", body)


# -- offline: the spool itself ---------------------------------------------------------------


async def _offline(
    config: Config, args: argparse.Namespace, body: dict[str, Any]
) -> dict[str, Any]:
    import os

    from warmrelay.operate.workers import lock_state_dir

    lock_fd = lock_state_dir(config.state.dir)  # no relay may start while we change its spool
    try:
        return await _on_spools(config, args, body)
    finally:
        os.close(lock_fd)


async def _on_spools(
    config: Config, args: argparse.Namespace, body: dict[str, Any]
) -> dict[str, Any]:
    from warmrelay.operate.queueapi import headers_of
    from warmrelay.queue.spool import RecoveredMessage, Spool

    spools: list[tuple[Spool, dict[str, RecoveredMessage]]] = []
    for path in sorted(p for p in config.state.dir.glob("spool*") if p.is_dir()):
        spool = Spool(path)
        recovered = await spool.open()
        spools.append((spool, {r.message.queue_id: r for r in recovered}))
    try:
        now = datetime.now(UTC).timestamp()
        views = sorted(
            (_view(r) for _, found in spools for r in found.values()),
            key=lambda v: v.received_at,
        )
        if args.command == "list":
            wanted = Filter(
                args.domain, args.ip, QueueState(args.state) if args.state else None, args.min_age
            )
            chosen = [v for v in views if wanted.matches(v, now)]
            return {"count": len(chosen), "messages": [v.to_json(now) for v in chosen]}
        if args.command == "summary":
            return summary(views, now)
        if args.command == "show":
            for spool, found in spools:
                if args.queue_ids[0] in found:
                    out = _view(found[args.queue_ids[0]]).to_json(now, detail=True)
                    out["headers"] = [
                        list(h) for h in headers_of(spool.read_data(args.queue_ids[0]))
                    ]
                    return out
            raise Refused(f"no message {args.queue_ids[0]} in the queue")
        if args.command == "flush":
            return {
                "action": "flush",
                "count": 0,
                "queue_ids": [],
                "not_done": [],
                "note": "no relay runs: everything queued is tried as soon as it starts",
            }
        result = ActionResult()
        for spool, found in spools:
            for queue_id, item in found.items():
                indices = _chosen(item, body)
                if not indices:
                    continue
                try:
                    if await _act(spool, item, indices, args, config):
                        result.queue_ids.append(queue_id)
                except SpoolError as exc:  # before anything changed
                    result.failed[queue_id] = f"cannot store the DSN ({exc}): nothing changed"
        return result.to_json(args.command, body.get("queue_ids", []))
    finally:
        for spool, _ in spools:
            await spool.close()


def _view(item: Any) -> MessageView:
    m = item.message
    recipients = tuple(
        RecipientView(address, item.done.get(i, "pending")) for i, address in enumerate(m.rcpt_tos)
    )
    state = QueueState.ON_HOLD if item.on_hold else QueueState.QUEUED
    return MessageView(
        m.queue_id, m.mail_from, m.received_at, m.size, state, recipients, item.attempts
    )


def _chosen(item: Any, body: dict[str, Any]) -> list[int]:
    m = item.message
    pending = [i for i in range(len(m.rcpt_tos)) if i not in item.done]
    if body.get("all") or m.queue_id in body.get("queue_ids", []):
        return pending
    domain = body.get("domain")
    if domain:
        return [i for i in pending if m.rcpt_tos[i].rpartition("@")[2].lower() == domain.lower()]
    return []


async def _act(
    spool: Any, item: Any, indices: list[int], args: argparse.Namespace, config: Config
) -> bool:
    import logging

    log = logging.getLogger("warmrelay.queue")
    m = item.message
    who = f"{operator()} (offline)"
    every = len(indices) + len(item.done) == len(m.rcpt_tos)
    if args.command in ("hold", "release"):
        on = args.command == "hold"
        if item.on_hold == on:
            return False
        spool.record_hold(m.queue_id, on)
        log.warning("operator: queue %s %s by %s", args.command, m.queue_id, who)
        return True
    if args.command == "bounce" and m.mail_from:
        from warmrelay.delivery.dsn import FailedRecipient, build_dsn

        now = datetime.now(UTC)
        failed = [
            FailedRecipient(m.rcpt_tos[i], "5.0.0", operator_bounce(args.reason), None, now)
            for i in indices
        ]
        try:
            dsn = build_dsn(
                reporting_mta=config.smtp.hostname,
                queue_id=m.queue_id,
                sender=m.mail_from,
                recipients=failed,
                original=spool.read_data(m.queue_id),
                arrival=datetime.fromtimestamp(m.received_at, UTC),
                now=now,
            )
        except ValueError as exc:
            raise SpoolError(str(exc)) from exc
        await spool.store("", [m.mail_from], dsn, received_at=now.timestamp())  # sent at start
    disposition = "bounced" if args.command == "bounce" else "deleted"
    for i in indices:
        log.warning("%s: to=<%s> %s by %s", m.queue_id, m.rcpt_tos[i], disposition, who)
    if every:
        spool.remove(m.queue_id)
    else:
        spool.mark_done(m.queue_id, indices, disposition)
    return True


# -- output ----------------------------------------------------------------------------------


def _print(args: argparse.Namespace, result: dict[str, Any], where: str) -> int:
    """The answer, then (on stderr, exit 1) the workers of ``--workers`` it lacks."""
    code = _print_result(args, result, where)
    missing = result.get("missing_workers") or []
    if missing:
        names = ", ".join(str(m) for m in missing)
        print(
            f"queue {args.command}: worker {names} did not answer: its mail is not in this "
            "answer (and not acted on)",
            file=sys.stderr,
        )
        return 1
    return code


def _print_result(args: argparse.Namespace, result: dict[str, Any], where: str) -> int:
    if args.json:
        print(json.dumps(result, indent=2))
        return 1 if result.get("failed") or result.get("not_done") else 0
    if args.command == "list":
        print(f"{'QUEUE ID':16} {'STATE':9} {'AGE':>7} {'SIZE':>8}  FROM -> PENDING")
        for m in result["messages"]:
            pending = ", ".join(m["pending"][:3]) + (" ..." if len(m["pending"]) > 3 else "")
            print(
                f"{m['queue_id']:16} {m['state']:9} {_age(m['age_s']):>7} {m['size']:>8}  "
                f"<{m['from']}> -> {pending}"
            )
            if m.get("next_retry") or m.get("last_reply"):
                retry = f"next retry {m['next_retry']}" if m.get("next_retry") else ""
                held = f"held until {m['held_until']}" if m.get("held_until") else ""
                last = f"last: {m['last_reply']}" if m.get("last_reply") else ""
                print("    " + "; ".join(x for x in (retry, held, last) if x))
        print(f"{result['count']} message(s) ({where})")
    elif args.command == "summary":
        print(format_summary(result))
    elif args.command == "show":
        _print_show(result)
    else:
        return _print_action(args.command, result, where)
    return 0


def _print_action(action: str, result: dict[str, Any], where: str) -> int:
    """One line for what was done, one per message that failed; exit 1 if any failed or a
    named message was not found."""
    if result.get("note"):
        print(f"queue {action}: {result['note']}")
    ids = " ".join(result["queue_ids"])
    print(f"queue {action}: {result['count']} message(s) {where}" + (f": {ids}" if ids else ""))
    if result.get("left_on_hold"):
        print(
            f"queue {action}: left {result['left_on_hold']} message(s) on hold alone "
            "(`warmrelay queue release` sends them)"
        )
    for queue_id, why in (result.get("failed") or {}).items():
        print(f"queue {action}: {queue_id}: {why}", file=sys.stderr)
    if result.get("not_done"):
        print(f"not found or nothing to do: {' '.join(result['not_done'])}", file=sys.stderr)
    return 1 if result.get("failed") or result.get("not_done") else 0


def _print_show(m: dict[str, Any]) -> None:
    worker = f"  (worker {m['worker']})" if "worker" in m else ""
    print(f"queue id:  {m['queue_id']}{worker}")
    print(
        f"state:     {m['state']}"
        + (f", next retry {m['next_retry']}" if m.get("next_retry") else "")
    )
    print(f"received:  {m['received_at']} ({_age(m['age_s'])} ago), {m['size']} bytes")
    print(f"from:      <{m['from']}>   attempts: {m['attempts']}")
    for r in m["recipients"]:
        print(f"to:        <{r['address']}>  {r['status']}")
        for a in r["attempts"]:
            print(f"           {a['at']} ip={a['ip']} {a['result']}: {a['reply']}")
    for name, value in m.get("headers", []):
        print(f"  {name}: {value}")


def _age(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h" if seconds < 172800 else f"{seconds / 86400:.1f}d"
