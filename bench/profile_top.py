#!/usr/bin/env python3
"""Top functions by own and cumulative samples from ``py-spy record --format raw`` output.

    py-spy record -f raw --nolineno -o /tmp/prof.txt --pid PID --duration 20
    python bench/profile_top.py /tmp/prof.txt [-n 15] [--by-module]

Each input line is ``frame;frame;...;leaf COUNT`` (root first). Own = samples
where the function is the leaf; cumulative = samples where it is anywhere on
the stack (counted once per stack). Percentages are of all samples. With
``--by-module`` the own samples are also summed per source file. Frames found on
>=97% of the stacks (thread root, runpy, the event loop) are left out of the
cumulative table unless ``--keep-common``.
"""

from __future__ import annotations

import argparse
import re
from collections import Counter

FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::\d+)?\)$")


def short(frame: str) -> str:
    m = FRAME.match(frame.strip())
    if not m:
        return frame.strip()
    f = m.group("file")
    for marker in ("site-packages/", "lib/python3.11/", "/work/main/"):
        if marker in f:
            f = f.split(marker, 1)[1]
            break
    return f"{m.group('func')} ({f})"


def module(frame: str) -> str:
    m = FRAME.match(frame.strip())
    return short(frame).split(" (", 1)[1].rstrip(")") if m else "?"


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("file")
    ap.add_argument("-n", type=int, default=15)
    ap.add_argument("--by-module", action="store_true")
    ap.add_argument("--thread", help="only stacks whose first frame contains this text")
    ap.add_argument(
        "--keep-common",
        action="store_true",
        help="keep frames on >=97%% of stacks (loop, runpy) in the cumulative table",
    )
    a = ap.parse_args()
    own: Counter[str] = Counter()
    cum: Counter[str] = Counter()
    mod: Counter[str] = Counter()
    total = 0
    with open(a.file) as f:
        for line in f:
            line = line.rstrip("\n")
            if not line:
                continue
            stack, _, count = line.rpartition(" ")
            n = int(count)
            frames = stack.split(";")
            if a.thread and a.thread not in frames[0]:
                continue
            total += n
            names = [short(x) for x in frames]
            own[names[-1]] += n
            mod[module(frames[-1])] += n
            for name in set(names):
                cum[name] += n
    if not a.keep_common:
        cum = Counter({k: v for k, v in cum.items() if v < 0.97 * total})
    print(f"{total} samples")
    for title, c in (("own", own), ("cumulative", cum)) + (
        (("own by file", mod),) if a.by_module else ()
    ):
        print(f"\n| # | {title} % | samples | function |")
        print("|---|---|---|---|")
        for i, (name, n) in enumerate(c.most_common(a.n), 1):
            print(f"| {i} | {100.0 * n / max(1, total):.1f} | {n} | `{name}` |")


if __name__ == "__main__":
    main()
