"""Throughput of the SQLite store: python benchmarks/store_bench.py [--tasks N] [--normal].

Prints rows/s for submit (batches of 1000), claim (batches of 100), complete
(batches of 100), and for many concurrent one-task submits (group commit).
Runs against a fresh file in a temporary directory with synchronous=full
unless --normal is given.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import trio

from tq.core.task import Lease, Outcome, TaskSpec
from tq.store.sqlite import SQLiteStore, open_sqlite_store


def report(what: str, rows: int, seconds: float) -> None:
    print(f"{what:<44} {rows:>8} rows in {seconds:6.2f} s = {rows / seconds:>9,.0f} rows/s")


async def bench_submit(store: SQLiteStore, total: int, batch: int) -> None:
    specs = [TaskSpec(type="bench", payload={"i": i, "name": "x" * 40}) for i in range(batch)]
    start = time.perf_counter()
    for _ in range(total // batch):
        await store.submit(specs, time.time())
    report(f"submit, batches of {batch}", total // batch * batch, time.perf_counter() - start)


async def bench_claim(store: SQLiteStore, batch: int) -> list[Lease]:
    leases: list[Lease] = []
    start = time.perf_counter()
    while got := await store.claim("w", ["default"], None, batch, time.time(), 300.0):
        leases += got
    report(f"claim, batches of {batch}", len(leases), time.perf_counter() - start)
    return leases


async def bench_complete(store: SQLiteStore, leases: list[Lease], batch: int) -> None:
    outcomes = [Outcome(lease.id, lease.token, "ok", result={"ok": True}) for lease in leases]
    start = time.perf_counter()
    for i in range(0, len(outcomes), batch):
        results = await store.complete(outcomes[i : i + batch], time.time())
        assert all(r.accepted for r in results)
    report(f"complete, batches of {batch}", len(outcomes), time.perf_counter() - start)


async def bench_concurrent_submits(store: SQLiteStore, callers: int) -> None:
    spec = [TaskSpec(type="bench", queue="concurrent")]
    commits = store.commits
    start = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for _ in range(callers):
            nursery.start_soon(store.submit, spec, time.time())
    seconds = time.perf_counter() - start
    report(f"submit, {callers} concurrent calls of 1 task", callers, seconds)
    print(f"{'':<44} ({store.commits - commits} commits for {callers} calls)")


async def main(tasks: int, synchronous: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.db"
        print(f"tq store benchmark: {tasks} tasks, synchronous={synchronous}, {path}")
        async with open_sqlite_store(path, synchronous=synchronous) as store:
            await bench_submit(store, tasks, 1000)
            leases = await bench_claim(store, 100)
            await bench_complete(store, leases, 100)
            await bench_concurrent_submits(store, 2000)
            stats = await store.stats()
            print(f"database {stats.size_bytes / 1e6:.1f} MB, wal {stats.wal_bytes / 1e6:.1f} MB")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=100_000)
    parser.add_argument("--normal", action="store_true", help="synchronous=normal")
    args = parser.parse_args()
    trio.run(main, args.tasks, "normal" if args.normal else "full")
