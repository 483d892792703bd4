"""The client side of the side-by-side one-call-per-task comparison (compare.py).

Runs with the interpreter that has the system's own client: the peers'
virtualenv for Huey and Dramatiq, tq's for tq. ``--threads K`` producers, each
with its own connection (Huey: its own SqliteHuey instance, as Huey serialises
one instance's calls on a lock), each making ``--calls`` enqueues one at a
time through the system's documented one-call API and timing each. Prints
``ready`` once every connection is made, starts on a line read from stdin, and
with ``--wait-done`` then waits until the system's workers have finished every
task. The last line printed is JSON: started, enqueued and done times
(monotonic, system-wide), this process's CPU seconds over the calls, and
every call's round trip in seconds.

    --system huey --db PATH
    --system dramatiq --redis redis://127.0.0.1:PORT/0
    --system tq --broker HOST:PORT --ca CA.pem [--key KEY]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

here = Path(__file__).parent
WARMUP = 100  # untimed enqueues first (shared by the producers); with --wait-done the
# workers run them before timing starts: they are up and warm


class System:
    """One system's producer connections and its count of finished tasks."""

    def producer(self) -> Callable[[int], object]:
        raise NotImplementedError

    def done(self) -> int:
        raise NotImplementedError

    def close(self) -> None:
        pass


class Huey(System):
    def __init__(self, db: str) -> None:
        os.environ["HUEY_DB"] = db
        sys.path.insert(0, str(here))
        import huey_tasks

        self.tasks = huey_tasks

    def producer(self) -> Callable[[int], object]:
        return self.tasks.producer()  # a SqliteHuey instance (connection) of its own

    def done(self) -> int:
        return int(self.tasks.huey.result_count())


class Dramatiq(System):
    def __init__(self, url: str) -> None:
        os.environ["REDIS_URL"] = url
        sys.path.insert(0, str(here))
        import dramatiq_tasks

        self.tasks = dramatiq_tasks

    def producer(self) -> Callable[[int], object]:
        return self.tasks.noop.send  # the broker's pool: a connection per thread

    def done(self) -> int:
        return int(self.tasks.counter.get("tq-bench-done") or 0)


class Tq(System):
    def __init__(self, broker: str, ca: str, key: str | None) -> None:
        from tq.client.sync import BlockingClient

        self.connect = lambda: BlockingClient(broker, ca=Path(ca), key=key)
        self.clients: list[Any] = []
        self.admin = self.connect()
        self.last = ""

    def producer(self) -> Callable[[int], object]:
        client = self.connect()
        self.clients.append(client)

        def submit(n: int) -> None:
            self.last = client.submit("echo", {"n": n})

        return submit

    def done(self) -> int:
        counts = self.admin.stats()["queues"].get("default", {})
        return int(counts.get("succeeded", 0))

    def wait_last(self) -> None:
        """Wait on the last task server-side before polling the (table-scanning) stats."""
        if self.last:
            self.admin.wait(self.last, timeout=120)

    def close(self) -> None:
        for client in [*self.clients, self.admin]:
            client.close()


def wait_done(system: System, target: int, timeout: float = 300) -> None:
    if isinstance(system, Tq):
        system.wait_last()
    deadline = time.monotonic() + timeout
    while system.done() < target:
        if time.monotonic() > deadline:
            raise SystemExit(f"only {system.done()} of {target} tasks done after {timeout}s")
        time.sleep(0.01)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--system", required=True, choices=["huey", "dramatiq", "tq"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--calls", type=int, required=True, help="enqueues per thread")
    parser.add_argument("--wait-done", action="store_true")
    parser.add_argument("--db")
    parser.add_argument("--redis")
    parser.add_argument("--broker")
    parser.add_argument("--ca")
    parser.add_argument("--key")
    args = parser.parse_args()
    system: System
    if args.system == "huey":
        system = Huey(args.db)
    elif args.system == "dramatiq":
        system = Dramatiq(args.redis)
    else:
        system = Tq(args.broker, args.ca, args.key)
    producers = [system.producer() for _ in range(args.threads)]
    each = max(2, WARMUP // len(producers))
    for call in producers:
        for n in range(each):
            call(-1 - n)
    if args.wait_done:
        wait_done(system, each * len(producers))
    base = system.done()
    samples: list[list[float]] = [[] for _ in producers]

    def run(index: int) -> None:
        call, out = producers[index], samples[index]
        for n in range(args.calls):
            begun = time.perf_counter()
            call(n)
            out.append(time.perf_counter() - begun)

    print("ready", flush=True)
    sys.stdin.readline()
    cpu = sum(os.times()[:2])
    started = time.monotonic()
    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(producers))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    enqueued = time.monotonic()
    cpu = sum(os.times()[:2]) - cpu
    done = enqueued
    if args.wait_done:
        wait_done(system, base + args.calls * args.threads)
        done = time.monotonic()
    system.close()
    print(
        json.dumps(
            {
                "started": started,
                "enqueued": enqueued,
                "done": done,
                "cpu_s": cpu,
                "samples": [s for part in samples for s in part],
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
