"""The events' shape: SendGrid's Event Webhook field names where one exists (``email``,
``timestamp``, ``event``, ``smtp-id``, ``reason``, ``status``, ``response``,
``attempt``, ``ip``, ``type``, ``tls``; ``sg_event_id`` is ``event_id``), ours beside
them (``queue_id``, ``provider``, ``warming``, ``async``), and the application's custom
arguments as top-level fields, as SendGrid puts its ``custom_args``. Pure: no I/O.

An event's id is derived from what it is about (message, recipient, event, attempt), not
drawn at random: an outcome written twice (a crash between the receiver's 250 and our
record of it, then a resend) carries the same id, so a consumer that de-duplicates by
``event_id`` sees it once.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

EventName = Literal["processed", "delivered", "deferred", "bounce", "dropped", "spamreport"]
EVENTS: tuple[EventName, ...] = (
    "processed", "delivered", "deferred", "bounce", "dropped", "spamreport",
)  # fmt: skip
# the fields we set: an application's argument may not take one of these names
RESERVED = frozenset(
    {
        "email", "timestamp", "event", "smtp-id", "event_id", "sg_event_id",
        "sg_message_id", "reason", "status", "response", "attempt", "ip", "type", "tls",
        "queue_id", "provider", "warming", "async", "category",
    }
)  # fmt: skip
MAX_ARGS_BYTES = 10_000  # the header's JSON; more is refused at DATA


class ArgsError(ValueError):
    """Why the custom-arguments header cannot be used (the DATA reply says it)."""


def parse_args(text: str) -> dict[str, Any]:
    """The application's custom arguments: a JSON object of names to strings, numbers,
    booleans or null (flat, as SendGrid's custom_args), none of them a field of ours."""
    if len(text.encode()) > MAX_ARGS_BYTES:
        raise ArgsError(f"longer than {MAX_ARGS_BYTES} bytes")
    try:
        value = json.loads(text, parse_constant=_no_constant)
    except json.JSONDecodeError as exc:
        raise ArgsError(f"not JSON ({exc.msg} at {exc.pos})") from None
    if not isinstance(value, dict):
        raise ArgsError("not a JSON object")
    for name, item in value.items():
        if name in RESERVED:
            raise ArgsError(f"{name!r} is a field of the event itself")
        if not (item is None or isinstance(item, str | int | float | bool)):
            raise ArgsError(f"{name!r}: only strings, numbers, true/false and null")
    return value


def _no_constant(name: str) -> Any:
    """NaN and Infinity are Python's, not JSON's (RFC 8259): a strict consumer would
    refuse every batch that carried one."""
    raise ArgsError(f"not JSON ({name} is not a JSON number)")


def event_id(*about: object) -> str:
    """A stable id for what the event is about (32 hex digits)."""
    text = "\x1f".join(str(a) for a in about)
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()[:32]


@dataclass(frozen=True)
class Origin:
    """What every event of one message shares."""

    queue_id: str | None
    smtp_id: str | None = None  # the Message-ID header, as SendGrid's smtp-id
    args: Mapping[str, Any] = field(default_factory=dict)


def build(
    name: EventName,
    email: str,
    timestamp: float,
    origin: Origin,
    key: str,
    fields: Mapping[str, Any],
) -> dict[str, Any]:
    """One event. ``key`` tells this event apart from the message's others of the same
    name (the recipient's index, and the attempt for a deferral); fields that are None
    are left out."""
    event: dict[str, Any] = dict(origin.args)
    event.update(
        {
            "email": email,
            "timestamp": int(timestamp),
            "event": name,
            "event_id": event_id(origin.queue_id or "", email, name, key),
            "smtp-id": origin.smtp_id,
            "queue_id": origin.queue_id,
        }
    )
    event.update(fields)
    return {k: v for k, v in event.items() if v is not None}
