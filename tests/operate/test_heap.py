"""settle_heap: after start-up, start-up's garbage is collected, the rest frozen, and the
young generation collected less often (run in a fresh interpreter: it changes the
process's collector for good)."""

from __future__ import annotations

import json
import subprocess
import sys

from warmrelay.operate.heap import YOUNG_THRESHOLD

SCRIPT = """
import gc, json, weakref
from warmrelay.operate.heap import settle_heap

class Node:
    pass

garbage = Node(); garbage.me = garbage  # a cycle nobody holds: start-up's leftovers
gone = weakref.ref(garbage); del garbage
kept = [Node() for _ in range(1000)]  # what the relay keeps
before = gc.get_freeze_count()
settle_heap()
print(json.dumps({"before": before, "frozen": gc.get_freeze_count(),
                  "threshold": gc.get_threshold(), "leftover_collected": gone() is None}))
"""


def test_start_up_garbage_is_collected_the_rest_frozen_and_young_collections_rarer() -> None:
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, check=True, timeout=60
    )
    got = json.loads(out.stdout)
    assert got["leftover_collected"]  # collected before the freeze, not frozen for good
    assert got["before"] == 0 and got["frozen"] > 1000  # the kept objects and the modules
    assert got["threshold"][0] == YOUNG_THRESHOLD > 700
