#!/usr/bin/env python3
"""CPU per message of DKIM signing at acceptance (warmrelay.mail.dkim.Signer.sign).

For each mode it signs ``-n`` messages of ``--size`` bytes (realistic headers, a
text body) in this process and reads the process CPU time (user+system) around
the loop; ``-r`` repeats, the median is reported with [min-max]:

- none: no key for the From domain (the header parse, the From lookup and the
  Message-ID/Date hygiene every message gets);
- rsa: one RSA-2048 signature; ed25519: one Ed25519 signature;
- dual: RSA-2048 + Ed25519 (RFC 8463), as a dual-signing domain is configured;
- dual as the listener runs it (``sign_off_loop``: inline below
  OFF_LOOP_BYTES, the signing pool's threads above), 16 messages at a time;
  reported as the event-loop thread's CPU per message and the whole process's
  (threads and hand-off included).

The line "dual adds" is dual minus none: the budget issue 12 set is 0.5 ms per
4 KB message. ``bench.py --dkim dual`` measures the same on a running relay.

- dual+bounces: the same keys with a bounce domain (issue 20): acceptance only checks
  the key (``defer``), delivery adds the IP's Feedback-ID and signs, then makes one
  recipient's return path and sealed trace header. "bounces add" is dual+bounces minus
  dual: what taking reports home costs per message.

Keys are made fresh in a temp dir. Nothing touches the network.

    python bench/dkim_cpu.py                 # 2000 x 4 KB, 5 repeats
    python bench/dkim_cpu.py -n 200 --size 1048576 -r 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from warmrelay.config import parse_config
from warmrelay.feedback.outbound import Marks
from warmrelay.feedback.token import Tokens
from warmrelay.mail.dkim import Signer, generate_key, write_key
from warmrelay.queue.spool import SpooledMessage, new_queue_id

MODES = ("none", "rsa", "ed25519", "dual")


def message(size: int, i: int) -> bytes:
    head = (
        "From: Example Shop <orders@shop.example>\r\n"
        f"To: customer{i}@mail.example\r\n"
        f"Subject: Your order #{100000 + i} has shipped\r\n"
        "MIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        "Content-Transfer-Encoding: 8bit\r\n"
        "List-Unsubscribe: <mailto:unsub@shop.example>\r\n\r\n"
    ).encode()
    line = b"Thank you for your order. It left our warehouse today  \r\n"
    body = line * max(1, (size - len(head)) // len(line))
    return head + body


def signers(tmp: Path) -> dict[str, Signer]:
    rsa, ed = tmp / "rsa.pem", tmp / "ed.pem"
    write_key(rsa, generate_key("rsa"))
    write_key(ed, generate_key("ed25519"))
    keys: dict[str, list[dict[str, str]]] = {
        "none": [],
        "rsa": [{"selector": "r", "key_file": str(rsa)}],
        "ed25519": [{"selector": "e", "key_file": str(ed), "algorithm": "ed25519-sha256"}],
    }
    keys["dual"] = keys["rsa"] + keys["ed25519"]
    out = {}
    for mode, entries in keys.items():
        domains = {"shop.example": {"keys": entries}} if entries else {}
        config = parse_config(
            {
                "smtp": {"hostname": "relay.bench.test"},
                "ips": [{"address": "127.0.0.2", "helo": "mta.bench.test"}],
                "dkim": {"domains": domains},
            }
        )
        out[mode] = Signer.load(config)
    return out


def run(signer: Signer, messages: list[bytes]) -> float:
    """CPU seconds per message."""
    now = time.time()
    start = time.process_time()
    for data in messages:
        signer.sign(data, now)
    return (time.process_time() - start) / len(messages)


def run_bounces(signer: Signer, messages: list[bytes]) -> float:
    """CPU seconds per message: acceptance (defer) + delivery from one IP to one recipient
    (Feedback-ID, DKIM, return path, trace header), as a relay with ``bounces`` does."""
    config = parse_config(
        {
            "smtp": {"hostname": "relay.bench.test"},
            "ips": [{"address": "127.0.0.2", "helo": "mta.bench.test"}],
            "bounces": {"domain": "bounces.shop.example", "secret_env": "UNUSED"},
        }
    )
    tokens = Tokens(b"0123456789abcdef0123456789abcdef", "bounces.shop.example")
    marks = Marks(tokens, lambda: config, lambda: signer)
    now = time.time()
    start = time.process_time()
    for i, data in enumerate(messages):
        accepted = signer.sign(data, now, defer=True).data
        msg = SpooledMessage(
            new_queue_id(), "orders@shop.example", (f"c{i}@mail.example",), now, {}, len(data)
        )
        marks.transactions(msg, [0], "127.0.0.2", "gmail", accepted)
    return (time.process_time() - start) / len(messages)


def run_off_loop(signer: Signer, messages: list[bytes]) -> tuple[float, float]:
    """(loop-thread CPU, process CPU) seconds per message, 16 signings in flight."""

    async def sign_all() -> tuple[float, float]:
        now = time.time()
        sem = asyncio.Semaphore(16)

        async def one(data: bytes) -> None:
            async with sem:
                await signer.sign_off_loop(data, now)

        loop_start, start = time.thread_time(), time.process_time()
        await asyncio.gather(*(one(m) for m in messages))
        return time.thread_time() - loop_start, time.process_time() - start

    loop_cpu, cpu = asyncio.run(sign_all())
    return loop_cpu / len(messages), cpu / len(messages)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("-n", type=int, default=2000, help="messages per run (default 2000)")
    p.add_argument("--size", type=int, default=4096, help="bytes per message (default 4096)")
    p.add_argument("-r", "--repeats", type=int, default=5, help="runs per mode (default 5)")
    a = p.parse_args()
    messages = [message(a.size, i) for i in range(a.n)]
    with tempfile.TemporaryDirectory() as tmp:
        by_mode = signers(Path(tmp))
        for signer in by_mode.values():  # warm caches and lazy imports
            run(signer, messages[:20])
        samples: dict[str, list[float]] = {
            m: [] for m in (*MODES, "dual+bounces", "loop", "process")
        }
        run_off_loop(by_mode["dual"], messages[:20])
        for _ in range(a.repeats):
            for mode in MODES:  # interleaved: a noisy moment hits every mode alike
                samples[mode].append(run(by_mode[mode], messages))
            samples["dual+bounces"].append(run_bounces(by_mode["dual"], messages))
            loop_cpu, cpu = run_off_loop(by_mode["dual"], messages)
            samples["loop"].append(loop_cpu)
            samples["process"].append(cpu)
    size = len(messages[0])
    print(f"DKIM signing CPU per message ({size} bytes, n={a.n}, {a.repeats} repeats)")
    result: dict[str, Any] = {"size": size, "n": a.n, "repeats": a.repeats}
    labels = {
        "loop": "dual in the listener: loop thread",
        "process": "dual in the listener: process",
    }
    for mode in (*MODES, "dual+bounces", "loop", "process"):
        ms = [s * 1e3 for s in samples[mode]]
        med = statistics.median(ms)
        print(f"  {labels.get(mode, mode):33} {med:7.3f} ms  [{min(ms):.3f}-{max(ms):.3f}]")
        result[mode + "_ms"] = round(med, 4)
    added = result["dual_ms"] - result["none_ms"]
    print(f"  dual adds {added:.3f} ms per message (median dual - median none)")
    result["dual_adds_ms"] = round(added, 4)
    bounces = result["dual+bounces_ms"] - result["dual_ms"]
    print(f"  bounces add {bounces:.3f} ms per message (median dual+bounces - median dual)")
    result["bounces_add_ms"] = round(bounces, 4)
    print("JSON " + json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
