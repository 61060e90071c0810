"""Connection shaping per (source IP, provider): how many connections at once, how many
messages each carries, how long one waits idle. Pure policy, no I/O.

A warming IP that opens many parallel connections to one provider, or sends a thousand
messages down one connection, looks like a spammer. The built-in values are KumoMTA's
shaping defaults for the big providers; a provider no rule recognises gets the
``delivery`` values per next hop. ``providers.NAME.connections`` overrides a provider's,
and a warming IP's ``warmup.connections`` caps every provider while it warms.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass

from warmrelay.config import Config, ConnectionsConfig, IPConfig

# provider: (max_connections or None for the default, max_messages_per_connection)
BUILTIN: dict[str, tuple[int | None, int]] = {
    "gmail": (5, 50),
    "microsoft": (5, 50),
    "yahoo": (None, 20),
    "apple": (10, 5),
}


@dataclass(frozen=True)
class Lane:
    """Where one send's connection comes from, and its limits. ``key`` groups the
    connections the limits count: (IP, provider) for a recognised provider, (IP, next
    hops) for any other domain."""

    key: Hashable
    ip: str
    provider: str  # a provider's name, or "other"
    max_connections: int
    max_messages: int
    idle_s: float


def lane(
    config: Config,
    ip: IPConfig | None,
    provider: str,
    hops: Hashable,
    warming: bool,
) -> Lane:
    """The lane of a send from ``ip`` (None: the smarthost) to ``provider`` (a known
    provider's name, else "other") through ``hops``."""
    d = config.delivery
    conns, messages, idle = (
        d.connections_per_destination,
        d.max_messages_per_connection,
        (d.idle_connection_s),
    )
    if provider in BUILTIN:
        builtin_conns, messages = BUILTIN[provider]
        conns = builtin_conns or conns
    own = config.providers.get(provider)
    layers: list[ConnectionsConfig | None] = [own.connections if own is not None else None]
    if warming and ip is not None and ip.warmup is not None:
        layers.append(ip.warmup.connections)
    for i, layer in enumerate(layers):
        if layer is None:
            continue
        tighter = i > 0  # the warming IP's values only ever narrow
        if layer.max_connections is not None:
            conns = min(conns, layer.max_connections) if tighter else layer.max_connections
        if layer.max_messages_per_connection is not None:
            n = layer.max_messages_per_connection
            messages = min(messages, n) if tighter else n
        if layer.idle_timeout_s is not None:
            idle = min(idle, layer.idle_timeout_s) if tighter else layer.idle_timeout_s
    address = str(ip.address) if ip is not None else "smarthost"
    key: Hashable = (address, provider) if provider != "other" else (address, hops)
    return Lane(key, address, provider, conns, messages, idle)
