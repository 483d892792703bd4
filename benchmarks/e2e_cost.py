"""End to end, one call per task: the rate and what each task costs.

    python -m benchmarks.e2e_cost --tasks 2000 --rounds 3

A fresh ``tq broker`` as shipped (TLS, API key, SQLite ``synchronous=full``) and
``--workers`` ``tq worker --concurrency 64`` processes running the built-in
``echo``; one ``BlockingClient`` submits ``--tasks`` tasks one call at a time,
then the run ends when every task has succeeded. Prints per round: the rate,
the broker's and the workers' CPU per task (user + system, psutil) and the
store's commits per task (``tq_store_commits_total`` from /metrics). To compare
two checkouts, run it from each (their own virtualenvs), alternating.
"""

from __future__ import annotations

import argparse
import re
import statistics
import tempfile
import time
from pathlib import Path

import httpx
import psutil

from tq.client import BlockingClient
from tq.testing import BrokerProcess

WARM_UP = 50  # tasks run before the timed ones
POLL = 0.05  # seconds between looks at the succeeded count (a stats read each)


def _metric(broker: BrokerProcess, name: str) -> float:
    headers = {"Authorization": f"Bearer {broker.key}"} if broker.key else {}
    page = httpx.get(f"{broker.http}/metrics", headers=headers, verify=str(broker.ca)).text
    found = re.search(rf"^{name} ([0-9.e+]+)$", page, re.M)
    return float(found.group(1)) if found else float("nan")


def _cpu(process: psutil.Process) -> float:
    times = process.cpu_times()
    return float(times.user + times.system)


def one_round(tasks: int, workers: int) -> dict[str, float]:
    with (
        tempfile.TemporaryDirectory(prefix="tq-e2e-") as tmp,
        BrokerProcess(Path(tmp) / "data") as broker,  # leaving stops its workers too
    ):
        started = [broker.start_worker("--concurrency", "64") for _ in range(workers)]
        broker.wait_for_workers(workers)
        broker_proc = psutil.Process(broker.proc.pid)
        worker_procs = [psutil.Process(w.pid) for w in started]
        with BlockingClient(broker.address, ca=broker.ca, key=broker.key) as client:
            for n in range(WARM_UP):
                client.submit("echo", n)
            time.sleep(1.0)
            commits = _metric(broker, "tq_store_commits_total")
            broker_cpu = _cpu(broker_proc)
            workers_cpu = sum(map(_cpu, worker_procs))
            began = time.perf_counter()
            for n in range(tasks):
                client.submit("echo", n)
            while client.stats()["queues"]["default"].get("succeeded", 0) < tasks + WARM_UP:
                time.sleep(POLL)
            took = time.perf_counter() - began
            return {
                "per_s": tasks / took,
                "broker_us": 1e6 * (_cpu(broker_proc) - broker_cpu) / tasks,
                "workers_us": 1e6 * (sum(map(_cpu, worker_procs)) - workers_cpu) / tasks,
                "commits": (_metric(broker, "tq_store_commits_total") - commits) / tasks,
            }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    rounds = []
    for n in range(args.rounds):
        load = psutil.getloadavg()[0]
        row = one_round(args.tasks, args.workers)
        rounds.append(row)
        print(
            f"round {n + 1}: {row['per_s']:,.0f} tasks/s, broker CPU {row['broker_us']:,.0f} us"
            f"/task, workers {row['workers_us']:,.0f} us/task, {row['commits']:.2f} commits"
            f"/task (load {load:.2f})",
            flush=True,
        )
    medians = {key: statistics.median(r[key] for r in rounds) for key in rounds[0]}
    print(
        f"median: {medians['per_s']:,.0f} tasks/s, broker {medians['broker_us']:,.0f} us, "
        f"workers {medians['workers_us']:,.0f} us, {medians['commits']:.2f} commits per task"
    )


if __name__ == "__main__":
    main()
