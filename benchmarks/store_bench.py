"""Throughput of a store: python benchmarks/store_bench.py [--tasks N] [--normal] [--store URL].

With --history-ab R: the cost of the task history instead, in one process on one
store: R rounds of submit / claim / complete / concurrent submits with the history
triggers off, then on (the order alternating per round), medians and their ratio.

Prints rows/s for submit (batches of 1000), claim (batches of 100), complete
(batches of 100), and for many concurrent one-task submits (group commit);
then the cost of one claim (of 1 task) at --pending tasks pending (p50/p99).
Runs against a fresh SQLite file in a temporary directory, or with
``--store postgresql://...`` in a fresh schema of that database (dropped
afterwards), with synchronous=full unless --normal is given.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio

from tq.core.task import Lease, Outcome, TaskSpec
from tq.store import open_store


def report(what: str, rows: int, seconds: float) -> None:
    print(f"{what:<44} {rows:>8} rows in {seconds:6.2f} s = {rows / seconds:>9,.0f} rows/s")


async def bench_submit(store: Any, total: int, batch: int) -> None:
    specs = [TaskSpec(type="bench", payload={"i": i, "name": "x" * 40}) for i in range(batch)]
    start = time.perf_counter()
    for _ in range(total // batch):
        await store.submit(specs, time.time())
    report(f"submit, batches of {batch}", total // batch * batch, time.perf_counter() - start)


async def bench_claim(store: Any, batch: int) -> list[Lease]:
    leases: list[Lease] = []
    start = time.perf_counter()
    while got := await store.claim("w", ["default"], None, batch, time.time(), 300.0):
        leases += got
    report(f"claim, batches of {batch}", len(leases), time.perf_counter() - start)
    return leases


async def bench_complete(store: Any, leases: list[Lease], batch: int) -> None:
    outcomes = [Outcome(lease.id, lease.token, "ok", result={"ok": True}) for lease in leases]
    start = time.perf_counter()
    for i in range(0, len(outcomes), batch):
        results = await store.complete(outcomes[i : i + batch], time.time())
        assert all(r.accepted for r in results)
    report(f"complete, batches of {batch}", len(outcomes), time.perf_counter() - start)


async def bench_concurrent_submits(store: Any, callers: int) -> None:
    spec = [TaskSpec(type="bench", queue="concurrent")]
    commits = store.commits
    start = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for _ in range(callers):
            nursery.start_soon(store.submit, spec, time.time())
    seconds = time.perf_counter() - start
    report(f"submit, {callers} concurrent calls of 1 task", callers, seconds)
    print(f"{'':<44} ({store.commits - commits} commits for {callers} calls)")


async def bench_claim_cost(store: Any, pending: int, samples: int = 300) -> None:
    """Single claims of one task with ``pending`` tasks waiting (kept topped up)."""
    specs = [TaskSpec(type="bench", queue="cost", priority=i % 8) for i in range(1000)]
    for _ in range(pending // 1000):
        await store.submit(specs, time.time())
    await store.submit(specs[: samples % 1000 or 0], time.time())
    times = []
    for _ in range(samples):
        start = time.perf_counter()
        [_lease] = await store.claim("w", ["cost"], None, 1, time.time(), 300.0)
        times.append(time.perf_counter() - start)
    times.sort()
    p50, p99 = statistics.median(times) * 1000, times[int(0.99 * len(times))] * 1000
    print(f"claim of 1 task at {pending:,} pending: p50 {p50:.2f} ms, p99 {p99:.2f} ms")


@asynccontextmanager
async def fresh_store(url: str, synchronous: str) -> AsyncIterator[Any]:
    if not url:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "bench.db"
            async with open_store(f"sqlite://{path}", synchronous=synchronous) as store:
                yield store
        return
    import psycopg

    name = f"tq_store_bench_{os.getpid()}"
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {name}")
    try:
        sep = "&" if "?" in url else "?"
        schema_url = f"{url}{sep}options=-csearch_path%3D{name}"
        async with open_store(schema_url, synchronous=synchronous) as store:
            yield store
    finally:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {name} CASCADE")


async def set_history(store: Any, on: bool) -> None:
    """Switch the task history triggers (tq.store.history_sql) off or on."""
    from tq.store import history_sql

    sqlite = store.cluster is None and hasattr(store, "path")

    def toggle(conn: Any) -> None:
        if sqlite:
            for name in history_sql.SQLITE_TRIGGERS:
                conn.execute(f"DROP TRIGGER IF EXISTS temp.{name}").fetchall()
            if on:
                conn.execute(history_sql.SQLITE_WRITER_TRIGGERS).fetchall()
        else:
            for name in history_sql.PG_TRIGGERS:
                conn.execute(f"ALTER TABLE tasks {'ENABLE' if on else 'DISABLE'} TRIGGER {name}")

    await store._write(toggle)


async def history_ab(store: Any, tasks: int, rounds: int) -> None:
    rates: dict[tuple[str, bool], list[float]] = {}

    def note(what: str, on: bool, rows: int, seconds: float) -> None:
        rates.setdefault((what, on), []).append(rows / seconds)

    for r in range(rounds):
        for on in (False, True) if r % 2 == 0 else (True, False):
            await set_history(store, on)
            specs = [TaskSpec(type="bench", payload={"i": i}) for i in range(1000)]
            start = time.perf_counter()
            for _ in range(tasks // 1000):
                await store.submit(specs, time.time())
            note("submit, batches of 1000", on, tasks // 1000 * 1000, time.perf_counter() - start)
            leases: list[Lease] = []
            start = time.perf_counter()
            while got := await store.claim("w", ["default"], None, 100, time.time(), 300.0):
                leases += got
            note("claim, batches of 100", on, len(leases), time.perf_counter() - start)
            outcomes = [Outcome(x.id, x.token, "ok", result={"ok": True}) for x in leases]
            start = time.perf_counter()
            for i in range(0, len(outcomes), 100):
                await store.complete(outcomes[i : i + 100], time.time())
            note("complete, batches of 100", on, len(outcomes), time.perf_counter() - start)
            start = time.perf_counter()
            async with trio.open_nursery() as nursery:
                for _ in range(500):
                    nursery.start_soon(store.submit, [TaskSpec(type="x", queue="c")], time.time())
            note("submit, 500 concurrent calls of 1 task", on, 500, time.perf_counter() - start)
    for what in dict.fromkeys(w for w, _ in rates):
        off, on_ = statistics.median(rates[(what, False)]), statistics.median(rates[(what, True)])
        print(
            f"{what:<40} history off {off:>9,.0f}/s  on {on_:>9,.0f}/s  "
            f"ratio {on_ / off:.2f}  (medians of {rounds})"
        )


async def main(tasks: int, synchronous: str, url: str, pending: int, ab_rounds: int = 0) -> None:
    async with fresh_store(url, synchronous) as store:
        where = (await store.probe()).details["location"]
        print(f"tq store benchmark: {tasks} tasks, synchronous={synchronous}, {where}")
        if ab_rounds:
            await history_ab(store, tasks, ab_rounds)
            return
        await bench_submit(store, tasks, 1000)
        leases = await bench_claim(store, 100)
        await bench_complete(store, leases, 100)
        await bench_concurrent_submits(store, 2000)
        await bench_claim_cost(store, pending)
        stats = await store.stats()
        print(f"database {stats.size_bytes / 1e6:.1f} MB ({stats.details['backend']})")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=100_000)
    parser.add_argument("--normal", action="store_true", help="synchronous=normal")
    parser.add_argument("--store", default="", help="postgresql://... (default: SQLite)")
    parser.add_argument("--pending", type=int, default=10_000, help="backlog for the claim cost")
    parser.add_argument(
        "--history-ab", type=int, default=0, metavar="R", help="A/B of the task history: R rounds"
    )
    args = parser.parse_args()
    synchronous = "normal" if args.normal else "full"
    trio.run(main, args.tasks, synchronous, args.store, args.pending, args.history_ab)
