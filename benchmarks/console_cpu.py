"""The console's CPU use: idle, with failures listed, and under a steady event rate.

    .venv/bin/python -m benchmarks.console_cpu                 # 80x24, 45 s per phase
    .venv/bin/python -m benchmarks.console_cpu --rate 1000 --seconds 60 --size 160x48

Starts a broker and one worker (``tq broker``/``tq worker`` processes in a
temporary directory, TLS and keys on), then ``tq tui`` in a pseudo-terminal of
the given size, exactly as an operator runs it (its output is read and thrown
away, as a terminal would). The console process's CPU time is measured with
psutil over each phase, after a warm-up:

* **idle**: nothing happens;
* **failures**: 100 dead tasks were just listed in the Failures panel, then
  nothing happens;
* **load** (``--repeat`` windows one after another, to see whether the
  cost grows with time): a producer submits ``echo`` tasks (one in 50 a ``fail`` task that
  dies at once) so that the broker publishes about ``--rate`` task changes
  (events) a second: each task is three changes (submitted, claimed,
  finished).

Prints one line per phase: CPU % of one core (user + system time over wall
time), the console's resident memory at the end, and the task changes seen.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import pty
import struct
import subprocess
import sys
import tempfile
import termios
import threading
import time
from pathlib import Path

import psutil

from tq.testing import BrokerProcess, tq_command

CHANGES_PER_TASK = 3  # pending, running, succeeded/dead


def start_console(
    broker: BrokerProcess, cols: int, rows: int
) -> tuple[subprocess.Popen[bytes], int]:
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
    env = {**os.environ, "TERM": "xterm-256color", "COLORTERM": "truecolor"}
    proc = subprocess.Popen(
        [*tq_command(), "tui", *broker.client_args()],
        stdin=slave,
        stdout=slave,
        stderr=slave,
        env=env,
        start_new_session=True,
    )
    os.close(slave)
    return proc, master


def drain(master: int, stop: threading.Event) -> None:
    """Read and discard what the console writes (a terminal that keeps up)."""
    while not stop.is_set():
        try:
            if not os.read(master, 65536):
                return
        except OSError:
            return


def produce(
    broker: BrokerProcess, rate: float, stop: threading.Event, submitted: list[int]
) -> None:
    """Submit tasks at ``rate`` changes/s in 10 batches a second."""
    per_second = rate / CHANGES_PER_TASK
    tick = 0.1
    with broker.client() as client:
        start = time.monotonic()
        owed = 0.0
        n = ticks = 0
        while not stop.is_set():
            ticks += 1
            owed += per_second * tick
            count = int(owed)
            owed -= count
            specs = []
            for _ in range(count):
                n += 1
                if n % 50 == 0:
                    specs.append({"type": "fail", "queue": "bench", "max_retries": 0})
                else:
                    specs.append({"type": "echo", "queue": "bench", "payload": n})
            if specs:
                client.submit_many(specs)
                submitted[0] += len(specs)
            time.sleep(max(0.0, start + ticks * tick - time.monotonic()))


def measure(proc: psutil.Process, seconds: float) -> tuple[float, int]:
    before = proc.cpu_times()
    t0 = time.monotonic()
    time.sleep(seconds)
    after = proc.cpu_times()
    wall = time.monotonic() - t0
    used = (after.user - before.user) + (after.system - before.system)
    return 100.0 * used / wall, proc.memory_info().rss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=1000.0, help="task changes per second")
    parser.add_argument("--seconds", type=float, default=45.0, help="length of each phase")
    parser.add_argument("--warmup", type=float, default=5.0)
    parser.add_argument("--size", default="80x24", help="terminal COLSxROWS")
    parser.add_argument("--phases", default="idle,failures,load")
    parser.add_argument(
        "--repeat", type=int, default=1, help="load windows measured one after another"
    )
    parser.add_argument(
        "--screen", choices=("dashboard", "tasks"), default="dashboard", help="the screen shown"
    )
    args = parser.parse_args()
    cols, rows = (int(v) for v in args.size.split("x"))
    phases = args.phases.split(",")

    with tempfile.TemporaryDirectory(prefix="tq-console-bench-") as tmp:
        broker = BrokerProcess(Path(tmp) / "broker")
        with broker:
            broker.start_worker("--concurrency", "16", "--queues", "bench")
            broker.wait_for_workers(1)
            proc, master = start_console(broker, cols, rows)
            stop = threading.Event()
            reader = threading.Thread(target=drain, args=(master, stop), daemon=True)
            reader.start()
            console = psutil.Process(proc.pid)
            print(
                f"console pid {proc.pid}, {cols}x{rows}, {args.screen}, "
                f"{args.seconds:g} s per phase"
            )
            try:
                time.sleep(args.warmup)
                if args.screen == "tasks":
                    os.write(master, b"t")
                    time.sleep(1.0)
                if "idle" in phases:
                    cpu, rss = measure(console, args.seconds)
                    print(f"idle      : {cpu:5.1f} % of a core, rss {rss / 2**20:.0f} MiB")
                if "failures" in phases:
                    with broker.client() as client:
                        ids = client.submit_many(
                            [{"type": "fail", "queue": "bench", "max_retries": 0}] * 100
                        )
                        for task_id in ids:
                            client.wait(task_id, timeout=60)
                    time.sleep(args.warmup)
                    cpu, rss = measure(console, args.seconds)
                    print(f"failures  : {cpu:5.1f} % of a core, rss {rss / 2**20:.0f} MiB")
                if "load" in phases:
                    submitted = [0]
                    producer = threading.Thread(
                        target=produce, args=(broker, args.rate, stop, submitted), daemon=True
                    )
                    producer.start()
                    time.sleep(args.warmup)
                    for window in range(args.repeat):
                        start = submitted[0]
                        t0 = time.monotonic()
                        cpu, rss = measure(console, args.seconds)
                        elapsed = time.monotonic() - t0
                        changes = (submitted[0] - start) * CHANGES_PER_TASK / elapsed
                        name = "load" if args.repeat == 1 else f"load {window + 1:>3}"
                        print(
                            f"{name:<10}: {cpu:5.1f} % of a core, rss {rss / 2**20:.0f} MiB, "
                            f"{changes:,.0f} task changes/s",
                            flush=True,
                        )
            finally:
                stop.set()
                if proc.poll() is None:
                    proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                os.close(master)
                if proc.returncode not in (0, -15, None):
                    print(f"console exited with {proc.returncode}", file=sys.stderr)


if __name__ == "__main__":
    main()
