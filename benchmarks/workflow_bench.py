"""Workflow overhead: chains, groups and chords against the same number of plain tasks.

    .venv/bin/python -m benchmarks.workflow_bench [--chain 1000] [--group 10000]
                                                  [--concurrency 32]

Starts a broker and one worker (``tq broker`` / ``tq worker`` processes in a
temporary directory, TLS and keys on, SQLite store with its defaults), then
for each scenario, in a queue of its own, measures the wall time from the
first submit to the moment every task of it has succeeded (the broker's
per-queue counts, read every 20 ms):

* ``plain N``: N independent ``echo`` tasks, submitted 250 per request;
* ``chain N``: a chain of N ``echo`` steps (each step's result is the next
  one's payload), one workflow submit;
* ``group N``: a group of N ``echo`` tasks, one workflow submit (one
  transaction of N rows);
* ``chord N-1``: a group of N - 1 tasks and a callback receiving their N - 1
  results, one workflow submit.

A chain is sequential by nature (one step at a time, each a claim, a run and
a report), so it is compared with plain tasks to show the price of that
order, not of the bookkeeping. Prints one line per scenario: tasks, seconds,
tasks per second.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

from tq.testing import BrokerProcess


def _done(client: Any, queue: str, n: int, timeout: float = 600.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        counts = client.stats()["queues"].get(queue, {})
        if counts.get("succeeded", 0) >= n:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{queue}: {counts} after {timeout}s")
        time.sleep(0.02)


def _run(client: Any, queue: str, n: int, submit: Any) -> tuple[str, int, float]:
    started = time.monotonic()
    submit()
    _done(client, queue, n)
    return queue, n, time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--chain", type=int, default=1000)
    parser.add_argument("--group", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args()
    chain, group = args.chain, args.group
    queues = ["plain-chain", "chain", "plain-group", "group", "chord"]
    with tempfile.TemporaryDirectory() as tmp, BrokerProcess(Path(tmp) / "b") as broker:
        broker.start_worker("--concurrency", str(args.concurrency), "--queues", ",".join(queues))
        broker.wait_for_workers(1)
        with broker.client() as client:

            def plain(queue: str, n: int) -> None:
                for start in range(0, n, 250):
                    size = min(250, n - start)
                    client.submit_many([{"type": "echo", "payload": 1, "queue": queue}] * size)

            def task(queue: str) -> dict[str, Any]:
                return {"type": "echo", "queue": queue}

            rows = [
                _run(client, "plain-chain", chain, lambda: plain("plain-chain", chain)),
                _run(
                    client,
                    "chain",
                    chain,
                    lambda: client.submit_workflow(
                        {"chain": [{**task("chain"), "payload": 1}] + [task("chain")] * (chain - 1)}
                    ),
                ),
                _run(client, "plain-group", group, lambda: plain("plain-group", group)),
                _run(
                    client,
                    "group",
                    group,
                    lambda: client.submit_workflow(
                        {"group": [{**task("group"), "payload": 1}] * group}
                    ),
                ),
                _run(
                    client,
                    "chord",
                    group,
                    lambda: client.submit_workflow(
                        {
                            "chord": [{**task("chord"), "payload": 1}] * (group - 1),
                            "callback": task("chord"),
                        }
                    ),
                ),
            ]
    for queue, n, seconds in rows:
        print(f"{queue:12} {n:6} tasks {seconds:7.2f} s {n / seconds:8.0f} tasks/s")


if __name__ == "__main__":
    main()
