"""What caps and priority aging cost a claim, against no caps, in one run.

    python benchmarks/caps_bench.py [--pending 20000] [--running 200] [--samples 400]
                                    [--batch 10] [--normal] [--store postgresql://...]

A fresh store (SQLite in a temporary directory, synchronous=full unless
--normal: with full, an fsync a claim hides the planning's cost; or a fresh
schema of the PostgreSQL database given) with ``--pending`` tasks waiting in one
queue (8 priorities, 4 types) and ``--running`` tasks leased and never finished
(so a concurrency cap has running tasks to count). Each scenario then times
``--samples`` claims of ``--batch`` tasks (completed after each claim, untimed,
so the backlog and the running count stay put) and prints p50 / p99 per claim
and the ratio of its p50 to the baseline's, measured in the same run:

  none         no cap, aging off (the plain claim)
  queue cap    a concurrency and a rate cap on the queue, both too high to bind
  type caps    a concurrency cap on each type, too high to bind (a claim of any
               type reads each pending type of the queue: a skip scan)
  aging        aging_rate 1 point a minute, aging_cap 50, no cap
  binding      a queue concurrency cap of running + batch/2: every claim is cut
               short by the cap (it takes batch/2 tasks)

The caps leave every claim's result unchanged except in ``binding``; the
figures are the cost of reading the caps, counting, and (aging) walking the
priority levels.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # python benchmarks/...

from benchmarks.store_bench import fresh_store
from tq.core.task import Outcome, TaskSpec
from tq.store.claimplan import Aging, Cap

TYPES = ("a", "b", "c", "d")
QUEUE = "capped"


async def fill(store: Any, pending: int) -> None:
    specs = [
        TaskSpec(type=TYPES[i % len(TYPES)], queue=QUEUE, priority=100 + i % 8) for i in range(1000)
    ]
    for _ in range(max(1, pending // 1000)):
        await store.submit(specs, time.time())


async def timed_claims(
    store: Any, samples: int, batch: int, aging: Aging | None
) -> tuple[list[float], int]:
    times: list[float] = []
    taken = 0
    for _ in range(samples):
        start = time.perf_counter()
        leases = await store.claim("bench", [QUEUE], None, batch, time.time(), 300.0, aging)
        times.append(time.perf_counter() - start)
        taken += len(leases)
        outcomes = [Outcome(lease.id, lease.token, "ok") for lease in leases]
        await store.complete(outcomes, time.time())
        await store.submit(  # top the backlog up again
            [TaskSpec(type=lease.type, queue=QUEUE, priority=lease.priority) for lease in leases],
            time.time(),
        )
    return sorted(times), taken


async def main(
    pending: int, running: int, samples: int, batch: int, url: str, synchronous: str
) -> None:
    async with fresh_store(url, synchronous) as store:
        where = (await store.probe()).details["location"]
        await fill(store, pending)
        held = await store.claim("holder", [QUEUE], None, running, time.time(), 86400.0)
        print(
            f"caps benchmark: {pending:,} pending in 8 priorities and {len(TYPES)} types, "
            f"{len(held)} running, {samples} claims of {batch}, {where} ({synchronous}), "
            f"load {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores"
        )
        huge = 1_000_000
        scenarios: list[tuple[str, list[Cap], Aging | None]] = [
            ("none", [], None),
            ("queue cap", [Cap("queue", QUEUE, concurrency=huge, rate=1e6, burst=1e6)], None),
            ("type caps", [Cap("type", t, concurrency=huge) for t in TYPES], None),
            ("aging", [], Aging(rate=1 / 60, cap=50)),
            ("binding", [Cap("queue", QUEUE, concurrency=len(held) + batch // 2)], None),
            ("none (again)", [], None),
        ]
        baseline = None
        for name, caps, aging in scenarios:
            for cap in caps:
                await store.set_cap(cap, time.time())
            times, taken = await timed_claims(store, samples, batch, aging)
            for cap in caps:
                await store.remove_cap(cap.kind, cap.name)
            p50 = statistics.median(times) * 1000
            p99 = times[int(0.99 * len(times))] * 1000
            baseline = baseline or p50
            print(
                f"{name:<14} p50 {p50:6.3f} ms  p99 {p99:6.3f} ms  x{p50 / baseline:4.2f}  "
                f"({taken / samples:.1f} tasks a claim)"
            )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pending", type=int, default=20_000)
    parser.add_argument("--running", type=int, default=200)
    parser.add_argument("--samples", type=int, default=400)
    parser.add_argument("--batch", type=int, default=10)
    parser.add_argument("--normal", action="store_true", help="synchronous=normal")
    parser.add_argument("--store", default="", help="postgresql://... (default: SQLite)")
    args = parser.parse_args()
    sync = "normal" if args.normal else "full"
    trio.run(main, args.pending, args.running, args.samples, args.batch, args.store, sync)
