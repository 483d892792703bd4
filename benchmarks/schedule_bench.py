"""Recurring schedules: what they cost an idle broker, and how late their ticks fire.

    python benchmarks/schedule_bench.py [--schedules 1000] [--seconds 30]

Starts a broker as shipped (TLS, keys, SQLite synchronous=full) in a temporary
directory and measures its process CPU (all threads) over ``--seconds`` while
idle, then again after adding ``--schedules`` schedules whose next tick is
months away (the cost of having them), then makes every schedule fire at the
next minute (``* * * * *``) and reports, for the tasks of that one tick, the
delay from the tick to the task's ``created_at`` (p50 / p99 / max). The broker
looks at its schedules at least once a second, so a delay under ~1 s is the
design; what the figures add is the cost of firing them all at once.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import psutil

from tq.client import BlockingClient
from tq.testing import BrokerProcess


def cpu_seconds(proc: psutil.Process) -> float:
    times = proc.cpu_times()
    return float(times.user + times.system)


def measure(proc: psutil.Process, seconds: float) -> float:
    """CPU used over ``seconds`` of wall time, as a percentage of one core."""
    before = cpu_seconds(proc)
    time.sleep(seconds)
    return 100 * (cpu_seconds(proc) - before) / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--schedules", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=30.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, BrokerProcess(Path(tmp) / "broker") as broker:
        assert broker.proc is not None
        proc = psutil.Process(broker.proc.pid)
        time.sleep(2)  # start-up done
        client: BlockingClient
        with broker.client() as client:
            idle = measure(proc, args.seconds)
            print(f"broker CPU, idle, no schedules:        {idle:6.2f} % of a core")
            for i in range(args.schedules):
                task = {"type": "tick", "payload": {"i": i}}
                client.schedule("add", name=f"s{i}", cron="0 0 1 1 *", task=task)
            loaded = measure(proc, args.seconds)
            print(
                f"broker CPU, {args.schedules} schedules waiting: {loaded:6.2f} % of a core "
                f"({loaded - idle:+.2f})"
            )
            for i in range(args.schedules):  # now every one ticks at the next minute
                task = {"type": "tick", "payload": {"i": i}}
                client.schedule("add", name=f"s{i}", cron="* * * * *", task=task)
            tick = (time.time() // 60 + 1) * 60
            if tick - time.time() < 5:  # too close: some were added after it
                tick += 60
            time.sleep(max(0.0, tick - time.time()) + 5)
            fired = []
            after = None
            while True:
                page = client.list(type="tick", limit=1000, after=after)
                fired += [t.created_at - tick for t in page.tasks if t.created_at >= tick]
                if page.next is None:
                    break
                after = page.next
        fired.sort()
        if len(fired) < args.schedules:
            print(f"only {len(fired)} of {args.schedules} schedules fired at the tick")
            return
        p99 = fired[int(0.99 * (len(fired) - 1))]
        print(
            f"{len(fired)} ticks fired: delay from the tick to the task p50 "
            f"{statistics.median(fired) * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms, "
            f"max {fired[-1] * 1000:.0f} ms"
        )


if __name__ == "__main__":
    main()
