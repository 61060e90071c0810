"""The collector, set for a long-running relay once it has started.

Everything start-up made (modules, the configuration, the recovered spool's index) lives
as long as the process. Python's cyclic collector walks all of it in every full
collection: ~45 ms each, nine per 10,000 messages at 16 sessions, on the event loop.
``gc.freeze()`` moves it out of the collector's reach for good (what the supervisor
already does before it forks its workers). Each message then makes many objects that
die young (futures, tasks, transports, records); the first generation is collected every
``YOUNG_THRESHOLD`` net allocations instead of 700, so the older ones are visited a
seventh as often, and each young collection still fits in the CPU's cache.
"""

from __future__ import annotations

import gc

# bench.py at 16 sessions, collector time per 10,500 messages (start-up included): 700
# (Python's default) ~600 ms, 5,000 ~280 ms, 20,000 ~370 ms with pauses of ~10 ms each
YOUNG_THRESHOLD = 5000


def settle_heap() -> None:
    """After start-up: collect what start-up left behind, freeze the rest, and collect the
    young generation less often. Objects frozen here and only later part of a garbage
    cycle are never freed; start-up makes few such objects, once."""
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, middle, old)
