"""Several brokers on one PostgreSQL, next to one broker on SQLite, in one run.

    python benchmarks/cluster_bench.py [--tasks 20000] [--rounds 3] [--pending 1000000]

Starts a throwaway PostgreSQL cluster of its own (initdb in a temporary
directory, its own loopback port, ``fsync`` and ``synchronous_commit`` on:
durable, like SQLite's ``synchronous=full``), then measures, interleaved
round by round so that outside load hits every setup alike:

* end to end: ``--tasks`` durable no-op tasks (echo) submitted in batches of
  250 through every broker (one producer connection per broker) and run by
  two worker processes of 64 slots, each given every broker address (worker
  i starts at broker i), for SQLite (one broker) and 1, 2 and 3 brokers on one
  PostgreSQL database; tasks/s from the first submit to the last success, and
  the brokers' CPU;
* submit latency: 500 single submits, one at a time, p50/p99 (SQLite, and
  PostgreSQL with one broker);
* claim cost at 10k and ``--pending`` pending tasks: the broker's claim
  statement (10 tasks) in a transaction rolled back, p50/p99 over 200, and
  its ``EXPLAIN (ANALYZE, BUFFERS)``;
* kill -9: two brokers, the workers on the first, a producer on the second
  submitting a task every 20 ms; the first is killed; the time from the kill
  to the first task finished after it (the workers moved to the survivor, ran
  it and reported).
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import os
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import psycopg
import trio

from tq.client import BlockingClient, Client
from tq.store import pg_schema
from tq.testing import BrokerProcess

BATCH = 250
WORKERS = 2
CONCURRENCY = 64


# -- a throwaway PostgreSQL cluster ------------------------------------------------------


@contextlib.contextmanager
def postgres() -> Iterator[str]:
    """A PostgreSQL cluster on loopback for this run (trust authentication): its URL."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    if not found:
        raise SystemExit("PostgreSQL's server binaries are not installed (no pg_ctl)")
    bindir = Path(found[-1]).parent
    base = Path(tempfile.mkdtemp(prefix="tq-cluster-bench-"))
    data, sockets = base / "data", base / "run"
    sockets.mkdir()
    owner: list[str] = []
    if os.geteuid() == 0:  # initdb and postgres refuse to run as root
        owner = ["runuser", "-u", "postgres", "--"]
        base.chmod(0o755)
        shutil.chown(base, "postgres")
        shutil.chown(sockets, "postgres")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]

    def run(*args: str) -> None:
        subprocess.run([*owner, *args], check=True, capture_output=True, timeout=120)

    run(str(bindir / "initdb"), "-D", str(data), "-U", "tq", "--auth=trust", "-E", "UTF8")
    options = (
        f"-c listen_addresses=127.0.0.1 -p {port} -k {sockets} -c max_connections=100 "
        "-c shared_buffers=256MB"
    )
    run(
        str(bindir / "pg_ctl"),
        "-D",
        str(data),
        "-o",
        options,
        "-w",
        "-l",
        str(base / "log"),
        "start",
    )
    try:
        run(str(bindir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "tq", "tq")
        yield f"postgresql://tq@127.0.0.1:{port}/tq"
    finally:
        subprocess.run(
            [*owner, str(bindir / "pg_ctl"), "-D", str(data), "stop", "-m", "fast"],
            capture_output=True,
            timeout=120,
        )
        shutil.rmtree(base, ignore_errors=True)


_schemas = 0


def fresh_schema(url: str) -> str:
    """The URL of a new empty schema of the database at ``url``."""
    global _schemas
    _schemas += 1
    name = f"bench_{_schemas}"
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA IF EXISTS {name} CASCADE")
        conn.execute(f"CREATE SCHEMA {name}")
    return f"{url}?options=-csearch_path%3D{name}"


def start_brokers(root: Path, store: str | None, n: int) -> list[BrokerProcess]:
    """``n`` brokers on ``store`` (None: one on SQLite) sharing the first one's CA."""
    brokers: list[BrokerProcess] = []
    for i in range(n):
        data = root / f"broker{i}"
        if brokers:
            data.mkdir(mode=0o700, parents=True)
            shutil.copytree(brokers[0].data / "tls", data / "tls")
        args = ["--http", "off", "--lease-ttl", "10"]
        if store is not None:
            args += ["--store", store]
        brokers.append(BrokerProcess(data, *args).start())
    return brokers


def start_workers(brokers: list[BrokerProcess]) -> list[subprocess.Popen[bytes]]:
    first = brokers[0]
    key = first.key or ""
    procs = []
    for i in range(WORKERS):
        order = [*brokers[i % len(brokers) :], *brokers[: i % len(brokers)]]
        addresses = ",".join(b.address for b in order)
        log = open(first.data / f"worker{i}.log", "ab")  # noqa: SIM115 (the process keeps it)
        procs.append(
            subprocess.Popen(
                [
                    *first.command,
                    "worker",
                    "--broker",
                    addresses,
                    "--ca",
                    str(first.ca),
                    "--key",
                    key,
                    "--concurrency",
                    str(CONCURRENCY),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        )
    return procs


def stop(workers: list[subprocess.Popen[bytes]], brokers: list[BrokerProcess]) -> None:
    for proc in workers:
        proc.terminate()
    for proc in workers:
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
    for broker in brokers:
        broker.close()


async def connected_workers(brokers: list[BrokerProcess]) -> int:
    total = 0
    for broker in brokers:
        async with Client.connect(broker.address, ca=broker.ca, key=brokers[0].key) as c:
            total += sum(1 for w in await c.workers() if w.get("connected"))
    return total


# -- end to end --------------------------------------------------------------------------


async def e2e(root: Path, store: str | None, n: int, tasks: int) -> dict[str, Any]:
    brokers = start_brokers(root, store, n)
    workers = start_workers(brokers)
    key = brokers[0].key
    try:
        with trio.fail_after(60):
            while await connected_workers(brokers) < WORKERS:
                await trio.sleep(0.1)
        procs = [psutil.Process(b.proc.pid) for b in brokers if b.proc is not None]
        for proc in procs:
            proc.cpu_percent(None)
        started = time.monotonic()
        share = tasks // n

        async def produce(broker: BrokerProcess, first: int) -> None:
            limit = trio.Semaphore(4)
            async with (
                Client.connect(broker.address, ca=broker.ca, key=key) as client,
                trio.open_nursery() as nursery,
            ):

                async def one(start: int) -> None:
                    try:
                        specs = [
                            {"type": "echo", "payload": i}
                            for i in range(start, min(start + BATCH, first + share))
                        ]
                        await client.submit_many(specs)
                    finally:
                        limit.release()

                for start in range(first, first + share, BATCH):
                    await limit.acquire()
                    nursery.start_soon(one, start)

        async with trio.open_nursery() as nursery:
            for i, broker in enumerate(brokers):
                nursery.start_soon(produce, broker, i * share)
        submitted = time.monotonic() - started
        async with Client.connect(brokers[0].address, ca=brokers[0].ca, key=key) as client:
            while (await client.stats())["queues"].get("default", {}).get(
                "succeeded", 0
            ) < share * n:
                await trio.sleep(0.05)
        elapsed = time.monotonic() - started
        cpu = [round(proc.cpu_percent(None)) for proc in procs]
    finally:
        stop(workers, brokers)
    return {
        "tasks_per_s": round(share * n / elapsed),
        "submitted_s": round(submitted, 2),
        "broker_cpu": cpu,
    }


# -- submit latency ----------------------------------------------------------------------


def submit_latency(root: Path, store: str | None, count: int = 500) -> dict[str, float]:
    [broker] = start_brokers(root, store, 1)
    try:
        with BlockingClient(broker.address, ca=broker.ca, key=broker.key) as client:
            for i in range(50):  # warm up
                client.submit("echo", i)
            samples = []
            for i in range(count):
                start = time.perf_counter()
                client.submit("echo", i)
                samples.append((time.perf_counter() - start) * 1000)
    finally:
        broker.close()
    samples.sort()
    return {
        "p50_ms": round(statistics.median(samples), 2),
        "p99_ms": round(samples[int(0.99 * len(samples))], 2),
    }


# -- claim cost --------------------------------------------------------------------------

FILL = (
    "INSERT INTO tasks (id, type, queue, payload, priority, state, max_retries, timeout, "
    "retry_base, retry_cap, created_at) SELECT 'fill-' || g, 'echo', 'default', NULL, 100, "
    "'pending', 3, 300, 1, 60, extract(epoch from now()) FROM generate_series(1, %s) AS g"
)


def claim_cost(url: str, pending: int, rounds: int = 200) -> dict[str, Any]:
    store = fresh_schema(url)
    import trio as _trio

    from tq.store.postgres import open_postgres_store

    async def create() -> None:
        async with open_postgres_store(store):
            pass

    _trio.run(create)
    with psycopg.connect(store, autocommit=True) as conn:
        conn.execute(FILL, (pending,))
        conn.execute("VACUUM ANALYZE tasks")
        params = (
            ["default"],
            10,
            10,
            "running",
            time.time(),
            "w",
            list(range(1, 11)),
            time.time() + 30,
        )
        samples = []
        for _ in range(rounds):
            start = time.perf_counter()
            with conn.transaction(force_rollback=True):
                rows = conn.execute(pg_schema.CLAIM, params).fetchall()
            samples.append((time.perf_counter() - start) * 1000)
            assert len(rows) == 10
        with conn.transaction(force_rollback=True):
            plan = conn.execute(
                "EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) " + pg_schema.CLAIM, params
            ).fetchall()
    samples.sort()
    return {
        "p50_ms": round(statistics.median(samples), 3),
        "p99_ms": round(samples[int(0.99 * len(samples))], 3),
        "plan": [row[0] for row in plan],
    }


# -- kill -9 to running again -------------------------------------------------------------


async def kill_to_running(root: Path, url: str) -> float:
    store = fresh_schema(url)
    brokers = start_brokers(root, store, 2)
    a, b = brokers
    key = a.key
    first = a.data / "tls"
    workers = []
    for i in range(WORKERS):  # both on A first
        log = open(a.data / f"worker{i}.log", "ab")  # noqa: SIM115
        workers.append(
            subprocess.Popen(
                [
                    *a.command,
                    "worker",
                    "--broker",
                    f"{a.address},{b.address}",
                    "--ca",
                    str(first / "ca.pem"),
                    "--key",
                    key or "",
                    "--concurrency",
                    "8",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        )
    try:
        with trio.fail_after(60):
            while await connected_workers([a]) < WORKERS:
                await trio.sleep(0.1)
        async with (
            Client.connect(b.address, ca=b.ca, key=key) as producer,
            trio.open_nursery() as nursery,
        ):

            async def feed() -> None:
                while True:
                    await producer.submit("echo", 1)
                    await trio.sleep(0.02)

            nursery.start_soon(feed)
            await trio.sleep(2)
            await trio.to_thread.run_sync(a.kill)
            killed_at = time.time()  # A is gone: it commits nothing after this
            with trio.fail_after(60):
                while True:
                    with psycopg.connect(store, autocommit=True) as conn:
                        row = conn.execute(
                            "SELECT min(finished_at) FROM tasks WHERE finished_at > %s",
                            (killed_at,),
                        ).fetchone()
                    if row and row[0] is not None:
                        break
                    await trio.sleep(0.02)
            nursery.cancel_scope.cancel()
        return float(row[0]) - killed_at
    finally:
        stop(workers, brokers)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--pending", type=int, default=1_000_000)
    args = parser.parse_args()
    print(f"load average at start: {os.getloadavg()}")
    with postgres() as url, tempfile.TemporaryDirectory(prefix="tq-cb-") as tmp:
        root = Path(tmp)
        runs: dict[str, list[Any]] = {}
        for r in range(args.rounds):
            for name, store, n in (
                ("sqlite, 1 broker", None, 1),
                ("postgresql, 1 broker", "pg", 1),
                ("postgresql, 2 brokers", "pg", 2),
                ("postgresql, 3 brokers", "pg", 3),
            ):
                where = root / f"e2e{r}-{name.replace(' ', '').replace(',', '-')}"
                result = trio.run(
                    e2e, where, None if store is None else fresh_schema(url), n, args.tasks
                )
                runs.setdefault(name, []).append(result)
                print(f"round {r + 1}: end to end, {name}: {result}  load {os.getloadavg()[0]:.1f}")
        for r in range(args.rounds):
            for name, store in (("sqlite", None), ("postgresql", "pg")):
                where = root / f"lat{r}-{name}"
                result = submit_latency(where, None if store is None else fresh_schema(url))
                print(f"round {r + 1}: single submit latency, {name}: {result}")
        for pending in (10_000, args.pending):
            result = claim_cost(url, pending)
            print(
                f"claim of 10 at {pending:,} pending: p50 {result['p50_ms']} ms, "
                f"p99 {result['p99_ms']} ms"
            )
            for line in result["plan"]:
                print("    " + line)
        for r in range(args.rounds):
            gap = trio.run(kill_to_running, root / f"kill{r}", url)
            print(
                f"round {r + 1}: kill -9 of the workers' broker to the first task finished "
                f"after it: {gap:.2f} s"
            )
        print(f"load average at end: {os.getloadavg()}")


if __name__ == "__main__":
    main()
