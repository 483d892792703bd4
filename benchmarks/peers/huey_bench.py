"""Huey (SqliteHuey) end to end: N no-op tasks, W consumer worker processes.

Run with the peers' virtualenv (setup.sh):  .venv/bin/python huey_bench.py --tasks 100000
Prints one JSON line. Timed from the first enqueue until every result is stored.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

here = Path(__file__).parent


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tasks", type=int, default=100_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--kind", default="process", choices=["process", "thread"])
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="huey-bench-"))
    os.environ["HUEY_DB"] = str(tmp / "huey.db")
    sys.path.insert(0, str(here))
    import huey_tasks

    consumer = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "huey_consumer"),
            "huey_tasks.huey",
            "-w",
            str(args.workers),
            "-k",
            args.kind,
            "-q",
        ],
        cwd=here,
        env={**os.environ, "PYTHONPATH": str(here)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        time.sleep(2)  # consumer start-up, not timed
        started = time.perf_counter()
        for n in range(args.tasks):
            huey_tasks.noop(n)
        enqueued = time.perf_counter() - started
        while huey_tasks.huey.result_count() < args.tasks:
            time.sleep(0.1)
        elapsed = time.perf_counter() - started
    finally:
        consumer.terminate()
        consumer.wait(30)
    storage = huey_tasks.huey.storage
    conn = storage.conn
    sync = conn.execute("pragma synchronous").fetchone()[0]
    journal = conn.execute("pragma journal_mode").fetchone()[0]
    print(
        json.dumps(
            {
                "system": "huey",
                "storage": "sqlite",
                "tasks": args.tasks,
                "workers": f"{args.workers} {args.kind}",
                "enqueue_per_s": round(args.tasks / enqueued),
                "tasks_per_s": round(args.tasks / elapsed),
                "seconds": round(elapsed, 2),
                "durability": f"journal_mode={journal}, synchronous={sync} (0 off, 2 full)",
            }
        )
    )


if __name__ == "__main__":
    main()
