"""Stages 4 and 5, warmup: the pure policy (the warmup plan, the router, eligibility,
providers) and the state it keeps (per-IP control records, the counters and the
reservations that hold recipients under a warming IP's caps)."""
