"""Delayed tasks: what a backlog of scheduled tasks costs a broker, and how late due
tasks start.

    .venv/bin/python -m benchmarks.delay_bench [--scheduled 1000000] [--seconds 20]
                                               [--due 5000] [--spread 10]
                                               [--store sqlite|postgresql]

Starts a broker as shipped (``tq broker`` in its own process, TLS and keys on,
SQLite synchronous=full; or ``--store postgresql``: a throwaway PostgreSQL
cluster of its own, fsync on) in a temporary directory, then:

1. its process CPU (all threads) over ``--seconds`` while idle, and the time of
   one ``stats`` call (median of 5);
2. the same after submitting ``--scheduled`` tasks delayed by 30 days (1,000
   per request): the cost of having them waiting; then, on a read connection
   of the store, counting them by walking their index (what stats did before
   the ``due_counts`` counters) against reading the counters;
3. with one ``tq worker`` (``echo`` tasks, 32 at once) connected, three runs of
   ``--due`` tasks each, in queues of their own, reporting for each task the
   delay from its due time (or, for the floor, its submit) to its
   ``started_at`` (the broker's claim time), p50 / p99 / max:

   * ``floor``: undelayed tasks, submitted ``--due / --spread`` per second:
     submit to start, what the claim path costs without any delay;
   * ``spread``: delayed tasks whose due times are spread evenly over
     ``--spread`` seconds (a steady stream of due tasks);
   * ``burst``: delayed tasks all due at the same instant (promoted 250 per
     transaction, batch after batch); also when the last of them left
     ``scheduled`` (``stats`` polled every 5 ms), which separates the promotion
     from the worker's pace of running them.

Due to start is an upper bound of due to pending: it adds the worker's claim.
Broker and benchmark share this machine's clock (``started_at`` and the due
times are both wall-clock seconds).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

from tq.testing import BrokerProcess

BATCH = 1000  # tasks per submit request
MONTH = 30 * 86400.0


def cpu_seconds(proc: psutil.Process) -> float:
    times = proc.cpu_times()
    return float(times.user + times.system)


def measure(proc: psutil.Process, seconds: float, url: str | None = None) -> str:
    """CPU used over ``seconds`` of wall time by the broker (and, with ``url``, by the
    PostgreSQL server's processes), as a percentage of one core."""
    server = postgres_processes(url) if url else []
    before = cpu_seconds(proc), sum(cpu_seconds(p) for p in server)
    time.sleep(seconds)
    broker = 100 * (cpu_seconds(proc) - before[0]) / seconds
    if not url:
        return f"{broker:6.2f} % of a core"
    used = sum(cpu_seconds(p) for p in server if p.is_running())
    return f"{broker:6.2f} % of a core (PostgreSQL {100 * (used - before[1]) / seconds:.2f} %)"


def postgres_processes(url: str) -> list[psutil.Process]:
    """The PostgreSQL server's processes now: its postmaster and every child."""
    import psycopg

    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT pg_backend_pid()").fetchone()
    assert row is not None
    postmaster = psutil.Process(row[0]).parent()
    assert postmaster is not None
    return [postmaster, *postmaster.children()]


def stats_ms(client: Any) -> float:
    took = []
    for _ in range(5):
        started = time.perf_counter()
        client.stats()
        took.append(time.perf_counter() - started)
    return statistics.median(took) * 1000


# what stats, queue depth and metrics read for failed/scheduled tasks before due_counts
WALK = (
    "SELECT queue, priority, state, count(*) FROM tasks INDEXED BY tasks_due "
    "WHERE state IN ('failed', 'scheduled') GROUP BY queue, priority, state"
)


def count_costs(db: Path, url: str | None) -> tuple[float, float]:
    """Median ms of counting the scheduled tasks by walking their index, and of reading
    the counters (``DUE_COUNTS`` of tq.store.schema_ops / pg_ops), on a connection of
    the live store (the SQLite file, or the PostgreSQL schema at ``url``)."""
    conn: Any
    if url is None:
        import apsw

        from tq.store.schema_ops import DUE_COUNTS

        conn = apsw.Connection(str(db), flags=apsw.SQLITE_OPEN_READONLY)
        walk = WALK
    else:
        import psycopg

        from tq.store.pg_ops import DUE_COUNTS

        conn = psycopg.connect(url, autocommit=True)
        walk = WALK.replace(" INDEXED BY tasks_due", "")
    out = []
    for statement in (walk, DUE_COUNTS):
        took = []
        for _ in range(5):
            started = time.perf_counter()
            conn.execute(statement).fetchall()
            took.append(time.perf_counter() - started)
        out.append(statistics.median(took) * 1000)
    conn.close()
    return out[0], out[1]


def started_minus(client: Any, queue: str, n: int, key: str) -> list[float]:
    """For every task of ``queue`` once all ``n`` ran: started_at - ``key`` (seconds)."""
    deadline = time.monotonic() + 600
    while client.stats()["queues"].get(queue, {}).get("succeeded", 0) < n:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{queue}: not all {n} tasks ran within 600 s")
        time.sleep(0.2)
    found: list[float] = []
    after = None
    while True:
        page = client.list(queue=queue, limit=1000, after=after)
        found += [t.started_at - getattr(t, key) for t in page.tasks]
        if page.next is None:
            return sorted(found)
        after = page.next


def show(name: str, delays: list[float]) -> None:
    p99 = delays[int(0.99 * (len(delays) - 1))]
    print(
        f"{name:7} {len(delays):6d} tasks: p50 {statistics.median(delays) * 1000:7.1f} ms, "
        f"p99 {p99 * 1000:7.1f} ms, max {delays[-1] * 1000:7.1f} ms"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scheduled", type=int, default=1_000_000)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--due", type=int, default=5000)
    parser.add_argument("--spread", type=float, default=10.0)
    parser.add_argument(
        "--store",
        choices=("sqlite", "postgresql"),
        default="sqlite",
        help="postgresql: a throwaway cluster of its own (benchmarks/cluster_bench.py's)",
    )
    args = parser.parse_args()
    with contextlib.ExitStack() as stack:
        url = None
        if args.store == "postgresql":
            from benchmarks.cluster_bench import fresh_schema, postgres

            url = fresh_schema(stack.enter_context(postgres()))
        run(args, url)


def run(args: argparse.Namespace, url: str | None) -> None:
    store = [] if url is None else ["--store", url]
    with (
        tempfile.TemporaryDirectory() as tmp,
        BrokerProcess(Path(tmp) / "broker", *store) as broker,
    ):
        assert broker.proc is not None
        proc = psutil.Process(broker.proc.pid)
        time.sleep(2)  # start-up done
        with broker.client() as client:
            idle = measure(proc, args.seconds, url)
            idle_stats = stats_ms(client)
            print(f"idle:               CPU {idle}, stats {idle_stats:6.1f} ms")
            started = time.monotonic()
            for start in range(0, args.scheduled, BATCH):
                size = min(BATCH, args.scheduled - start)
                client.submit_many([{"type": "later", "delay": MONTH, "queue": "later"}] * size)
            took = time.monotonic() - started
            print(f"submitted {args.scheduled} delayed tasks in {took:.1f} s")
            time.sleep(2)  # the checkpointer and the promoter settle
            loaded = measure(proc, args.seconds, url)
            loaded_stats = stats_ms(client)
            print(f"{args.scheduled} scheduled: CPU {loaded}, stats {loaded_stats:6.1f} ms")
            walk, counters = count_costs(Path(tmp) / "broker" / "tq.db", url)
            print(
                f"counting them: a walk of tasks_due {walk:7.1f} ms, "
                f"due_counts {counters * 1000:5.0f} us ({walk / counters:.0f}x)"
            )
            broker.start_worker("--concurrency", "32", "--queues", "floor,spread,burst")
            broker.wait_for_workers(1)
            n, gap = args.due, args.spread / args.due
            for start in range(0, n, 10):  # 10 per request, paced like the spread run
                client.submit_many([{"type": "echo", "queue": "floor"}] * min(10, n - start))
                time.sleep(gap * 10)
            show("floor", started_minus(client, "floor", n, "created_at"))
            first = time.time() + 10  # every request is in before the first is due
            specs = [
                {"type": "echo", "queue": "spread", "run_at": first + i * gap} for i in range(n)
            ]
            for start in range(0, n, BATCH):
                client.submit_many(specs[start : start + BATCH])
            show("spread", started_minus(client, "spread", n, "run_at"))
            due = time.time() + 10
            for start in range(0, n, BATCH):
                size = min(BATCH, n - start)
                client.submit_many([{"type": "echo", "queue": "burst", "run_at": due}] * size)
            time.sleep(max(0.0, due - time.time() - 0.5))
            while client.stats()["queues"].get("burst", {}).get("scheduled", 0):
                time.sleep(0.005)
            promoted = time.time() - due
            show("burst", started_minus(client, "burst", n, "run_at"))
            print(
                f"burst: every one of the {n} promoted (none scheduled) {promoted * 1000:.0f} ms "
                "after the due time"
            )


if __name__ == "__main__":
    main()
