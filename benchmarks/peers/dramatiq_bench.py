"""Dramatiq on Redis end to end: N no-op tasks, W worker processes x T threads.

Run with the peers' virtualenv (setup.sh):  .venv/bin/python dramatiq_bench.py --tasks 100000
Starts its own redis-server on 127.0.0.1:6399 with Redis's default persistence
(RDB snapshots, no AOF) unless --aof is given. Prints one JSON line.
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
PORT = 6399


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tasks", type=int, default=100_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--aof", choices=["no", "everysec", "always"], default="no")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="dramatiq-bench-"))
    persistence = (
        ["--appendonly", "no"]
        if args.aof == "no"
        else ["--appendonly", "yes", "--appendfsync", args.aof]
    )
    redis_proc = subprocess.Popen(
        [
            "redis-server",
            "--port",
            str(PORT),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(tmp),
            *persistence,
        ],
        stdout=subprocess.DEVNULL,
    )
    os.environ["REDIS_URL"] = f"redis://127.0.0.1:{PORT}/0"
    sys.path.insert(0, str(here))
    time.sleep(0.5)
    import dramatiq_tasks

    dramatiq_tasks.counter.flushall()
    workers = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "dramatiq"),
            "dramatiq_tasks",
            "-p",
            str(args.workers),
            "-t",
            str(args.threads),
        ],
        cwd=here,
        env={**os.environ, "PYTHONPATH": str(here)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        time.sleep(3)  # worker start-up, not timed
        started = time.perf_counter()
        for n in range(args.tasks):
            dramatiq_tasks.noop.send(n)
        enqueued = time.perf_counter() - started
        while int(dramatiq_tasks.counter.get("tq-bench-done") or 0) < args.tasks:
            time.sleep(0.1)
        elapsed = time.perf_counter() - started
    finally:
        workers.terminate()
        workers.wait(60)
        redis_proc.terminate()
        redis_proc.wait(30)
    durability = {
        "no": "Redis default: RDB snapshots only; acknowledged messages since the last "
        "snapshot are lost on a crash",
        "everysec": "AOF fsync every second: up to ~1 s of acknowledged messages lost on a crash",
        "always": "AOF fsync on every write",
    }[args.aof]
    print(
        json.dumps(
            {
                "system": "dramatiq",
                "storage": "redis",
                "tasks": args.tasks,
                "workers": f"{args.workers} processes x {args.threads} threads",
                "enqueue_per_s": round(args.tasks / enqueued),
                "tasks_per_s": round(args.tasks / elapsed),
                "seconds": round(elapsed, 2),
                "durability": durability,
            }
        )
    )


if __name__ == "__main__":
    main()
