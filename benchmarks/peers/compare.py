"""One call per task, side by side: tq, Huey and Dramatiq in one sitting.

    bash benchmarks/peers/setup.sh        # the peers' virtualenv and redis-server
    .venv/bin/python -m benchmarks.peers.compare --rounds 3

Each round runs every system once (the order rotates from round to round, so
no system always runs first or last), each through its documented
one-call-per-task API with its client in a process of its own
(one_call_client.py):

- enqueue: one producer, ``--calls`` enqueues one at a time, no workers
  running: rate, p50, p99, and the producer process's CPU per call;
- producers: ``--producers`` concurrent one-at-a-time producers, each with its
  own connection, ``--per-process`` threads to a process, ``--calls`` enqueues
  in all: aggregate rate and its ratio to the one producer above, and the
  busiest load generator's CPU (a saturated one would cap the figure);
- end to end: a fresh store, two worker processes of the system's own running
  the no-op task, one producer making ``--calls`` enqueues one at a time: from
  the first enqueue until every task has finished.

Systems: Huey (SqliteHuey, WAL, synchronous=FULL), Dramatiq on Redis with
``appendonly yes, appendfsync always`` (durable) and with no persistence at
all, and tq (``tq broker`` as shipped: TLS, API keys, SQLite
``synchronous=full``; ``BlockingClient.submit``; two ``tq worker`` processes
running the built-in async ``echo``). The 1-minute load average is recorded
before and after each round. Prints each round, then the medians and the
tq/peer ratios of the same run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tq.testing import BrokerProcess

here = Path(__file__).resolve().parent
CLIENT = here / "one_call_client.py"
SYSTEMS = {
    "huey": "Huey, SQLite WAL, synchronous=FULL",
    "dramatiq-aof": "Dramatiq, Redis AOF appendfsync always",
    "dramatiq-mem": "Dramatiq, Redis, no persistence",
    "tq": "tq, SQLite WAL, synchronous=full",
}
DURABLE = ("huey", "dramatiq-aof")
WORKERS = 2


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the process group this driver started (a worker pool and its
    children), then SIGKILL what is left."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # any straggling child


class Run:
    """One system's store and workers, and its clients' command lines."""

    def __init__(self, system: str, peers_python: str, tmp: Path) -> None:
        self.system = system
        self.peers_python = peers_python
        self.tmp = tmp
        self.procs: list[subprocess.Popen[bytes]] = []
        self.broker: BrokerProcess | None = None

    def _fresh(self) -> Path:
        return Path(tempfile.mkdtemp(prefix=f"{self.system}-", dir=self.tmp))

    @contextlib.contextmanager
    def store(self, workers: bool) -> Iterator[list[str]]:
        """A fresh store (and ``WORKERS`` worker processes if asked): the client's
        command line against it."""
        path = self._fresh()
        started: list[subprocess.Popen[bytes]] = []
        broker: BrokerProcess | None = None
        quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
        try:
            if self.system == "tq":
                broker = BrokerProcess(path / "data").start()
                if workers:
                    for _ in range(WORKERS):
                        broker.start_worker("--concurrency", "64")
                    broker.wait_for_workers(WORKERS)
                command = [sys.executable, str(CLIENT), "--system", "tq"]
                command += ["--broker", broker.address, "--ca", str(broker.ca)]
                command += ["--key", broker.key] if broker.key else []
            elif self.system == "huey":
                db = str(path / "huey.db")
                env = {**os.environ, "HUEY_DB": db, "PYTHONPATH": str(here)}
                if workers:
                    consumer = Path(self.peers_python).parent / "huey_consumer"
                    started.append(
                        subprocess.Popen(
                            [
                                str(consumer),
                                "huey_tasks.huey",
                                "-w",
                                str(WORKERS),
                                "-k",
                                "process",
                                "-q",
                            ],
                            cwd=here,
                            env=env,
                            start_new_session=True,
                            **quiet,
                        )
                    )
                command = [self.peers_python, str(CLIENT), "--system", "huey", "--db", db]
            else:
                port = _free_port()
                persistence = (
                    ["--appendonly", "yes", "--appendfsync", "always"]
                    if self.system == "dramatiq-aof"
                    else ["--appendonly", "no"]
                )
                started.append(
                    subprocess.Popen(
                        [
                            "redis-server",
                            "--port",
                            str(port),
                            "--bind",
                            "127.0.0.1",
                            "--dir",
                            str(path),
                            "--save",
                            "",
                            *persistence,
                        ],
                        start_new_session=True,
                        **quiet,
                    )
                )
                url = f"redis://127.0.0.1:{port}/0"
                deadline = time.monotonic() + 10
                address = ("127.0.0.1", port)
                while True:
                    with contextlib.suppress(OSError), socket.create_connection(address):
                        break
                    if time.monotonic() > deadline:
                        raise RuntimeError("redis-server did not start")
                    time.sleep(0.05)
                if workers:
                    env = {**os.environ, "REDIS_URL": url, "PYTHONPATH": str(here)}
                    dramatiq = Path(self.peers_python).parent / "dramatiq"
                    started.append(
                        subprocess.Popen(
                            [str(dramatiq), "dramatiq_tasks", "-p", str(WORKERS), "-t", "8"],
                            cwd=here,
                            env=env,
                            start_new_session=True,
                            **quiet,
                        )
                    )
                command = [self.peers_python, str(CLIENT), "--system", "dramatiq"]
                command += ["--redis", url]
            yield command
        finally:
            for proc in reversed(started):  # workers before the redis they use
                _stop(proc)
            if broker is not None:
                broker.close()


def clients(command: list[str], processes: int, threads: int, calls: int, wait: bool) -> Any:
    """Start ``processes`` clients, each ``threads`` producers of ``calls`` enqueues;
    go once all are connected; their JSON results."""
    args = [*command, "--threads", str(threads), "--calls", str(calls)]
    args += ["--wait-done"] if wait else []
    procs = [
        subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        for _ in range(processes)
    ]
    try:
        for proc in procs:
            assert proc.stdout is not None
            line = proc.stdout.readline().strip()
            if line != b"ready":
                raise RuntimeError(f"{command[3]} client not ready: {line!r} (exit {proc.wait()})")
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write(b"go\n")
            proc.stdin.flush()
        results = []
        for proc in procs:
            assert proc.stdout is not None
            out = proc.stdout.read()
            if proc.wait(600) != 0:
                raise RuntimeError(f"{command[3]} client failed (exit {proc.returncode})")
            results.append(json.loads(out.splitlines()[-1]))
        return results
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def summarise(results: list[dict[str, Any]]) -> dict[str, float]:
    samples = [s for r in results for s in r["samples"]]
    started = min(r["started"] for r in results)
    enqueued = max(r["enqueued"] for r in results)
    done = max(r["done"] for r in results)
    return {
        "per_s": len(samples) / (enqueued - started),
        "done_per_s": len(samples) / (done - started),
        "p50_ms": _quantile(samples, 0.5) * 1e3,
        "p99_ms": _quantile(samples, 0.99) * 1e3,
        "client_cpu": max(100 * r["cpu_s"] / (r["enqueued"] - r["started"]) for r in results),
        "client_cpu_us": sum(r["cpu_s"] for r in results) / len(samples) * 1e6,
    }


def one_round(run: Run, args: argparse.Namespace) -> dict[str, float]:
    out: dict[str, float] = {}
    with run.store(workers=False) as command:
        one = summarise(clients(command, 1, 1, args.calls, False))
        per_process = args.per_process
        processes = max(1, args.producers // per_process)
        each = max(1, args.calls // args.producers)
        many = summarise(clients(command, processes, per_process, each, False))
    with run.store(workers=True) as command:
        e2e = summarise(clients(command, 1, 1, args.calls, True))
    out.update(
        enqueue_per_s=one["per_s"],
        p50_ms=one["p50_ms"],
        p99_ms=one["p99_ms"],
        client_cpu_us=one["client_cpu_us"],
        producers_per_s=many["per_s"],
        x_one=many["per_s"] / one["per_s"],
        producers_p50_ms=many["p50_ms"],
        generator_cpu=many["client_cpu"],
        e2e_per_s=e2e["done_per_s"],
        e2e_enqueue_per_s=e2e["per_s"],
    )
    return out


ECHO_SERVER = """
import socket, sys
with socket.create_server(("127.0.0.1", 0)) as server:
    print(server.getsockname()[1], flush=True)
    conn, _ = server.accept()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    while data := conn.recv(65536):
        conn.sendall(data)
"""


def floors(directory: Path, samples: int = 2000) -> dict[str, float]:
    """The physical floors of one durable call, p50 in ms: a 4 KiB write + fsync
    on this disk, a one-row SQLite WAL commit at synchronous=FULL, and a 64-byte
    round trip over loopback TCP between two processes (no TLS, no Python work)."""
    import sqlite3

    def p50(call: Any) -> float:
        times = []
        for _ in range(samples):
            begun = time.perf_counter()
            call()
            times.append(time.perf_counter() - begun)
        return _quantile(times, 0.5) * 1e3

    out: dict[str, float] = {}
    fd = os.open(directory / "fsync.bin", os.O_WRONLY | os.O_CREAT, 0o600)
    block = b"x" * 4096
    try:
        out["fsync_ms"] = p50(lambda: (os.pwrite(fd, block, 0), os.fsync(fd)))
    finally:
        os.close(fd)
    db = sqlite3.connect(directory / "floor.db", isolation_level=None)
    db.execute("pragma journal_mode=wal")
    db.execute("pragma synchronous=full")
    db.execute("create table t (id integer primary key, data blob)")
    out["sqlite_commit_ms"] = p50(
        lambda: db.execute("insert into t (data) values (?)", (block[:64],))
    )
    db.close()
    server = subprocess.Popen([sys.executable, "-c", ECHO_SERVER], stdout=subprocess.PIPE)
    try:
        assert server.stdout is not None
        port = int(server.stdout.readline())
        with socket.create_connection(("127.0.0.1", port)) as conn:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            message = b"m" * 64

            def echo() -> None:
                conn.sendall(message)
                got = 0
                while got < len(message):
                    got += len(conn.recv(65536))

            out["loopback_rtt_ms"] = p50(echo)
    finally:
        server.kill()
        server.wait()
    return out


COLUMNS = (
    ("enqueue_per_s", "enqueue/s", "{:,.0f}"),
    ("p50_ms", "p50 ms", "{:.2f}"),
    ("p99_ms", "p99 ms", "{:.2f}"),
    ("client_cpu_us", "client us", "{:.0f}"),
    ("e2e_per_s", "e2e/s", "{:,.0f}"),
    ("producers_per_s", "N prod/s", "{:,.0f}"),
    ("x_one", "x one", "{:.1f}"),
    ("producers_p50_ms", "N p50 ms", "{:.1f}"),
    ("generator_cpu", "gen CPU%", "{:.0f}"),
)


def _row(name: str, figures: dict[str, float]) -> str:
    cells = [fmt.format(figures[key]).rjust(10) for key, _, fmt in COLUMNS]
    return f"{name:<13}" + "".join(cells)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--calls", type=int, default=2000, help="enqueues per phase")
    parser.add_argument("--producers", type=int, default=50)
    parser.add_argument("--per-process", type=int, default=10, help="producers per process")
    parser.add_argument("--systems", default=",".join(SYSTEMS))
    parser.add_argument(
        "--peers-python", default=str(here / ".venv" / "bin" / "python"), help="setup.sh's venv"
    )
    parser.add_argument("--json", type=Path, help="also write every round's figures here")
    args = parser.parse_args()
    systems = [s for s in args.systems.split(",") if s]
    runs: dict[str, list[dict[str, float]]] = {s: [] for s in systems}
    loads: list[tuple[float, float]] = []
    floor_runs: list[dict[str, float]] = []
    header = f"{'system':<13}" + "".join(title.rjust(10) for _, title, _ in COLUMNS)
    print(f"N = {args.producers} producers, {args.per_process} per process", flush=True)
    with tempfile.TemporaryDirectory(prefix="peers-compare-") as tmp:
        for number in range(args.rounds):
            order = systems[number % len(systems) :] + systems[: number % len(systems)]
            before = os.getloadavg()[0]
            floor = floors(Path(tempfile.mkdtemp(dir=tmp)))
            floor_runs.append(floor)
            print(
                f"\nround {number + 1} (load {before:.2f}); floors, p50: 4 KiB write+fsync "
                f"{floor['fsync_ms']:.3f} ms, SQLite FULL one-row commit "
                f"{floor['sqlite_commit_ms']:.3f} ms, loopback TCP round trip "
                f"{floor['loopback_rtt_ms']:.3f} ms\n{header}",
                flush=True,
            )
            for system in order:
                figures = one_round(Run(system, args.peers_python, Path(tmp)), args)
                runs[system].append(figures)
                print(_row(system, figures), flush=True)
            after = os.getloadavg()[0]
            loads.append((before, after))
            print(f"round {number + 1} load average before {before:.2f}, after {after:.2f}")
    medians = {
        s: {key: statistics.median(r[key] for r in rs) for key, _, _ in COLUMNS}
        for s, rs in runs.items()
    }
    print(f"\nmedians of {args.rounds} rounds, {args.calls} enqueues per phase\n{header}")
    for system, figures in medians.items():
        print(_row(system, figures))
    if "tq" in medians:
        print("\ntq / peer (medians):")
        for peer in (s for s in medians if s != "tq"):
            t, p = medians["tq"], medians[peer]
            print(
                f"  {peer:<13} enqueue {t['enqueue_per_s'] / p['enqueue_per_s']:.2f}x, "
                f"end to end {t['e2e_per_s'] / p['e2e_per_s']:.2f}x, "
                f"{args.producers} producers {t['producers_per_s'] / p['producers_per_s']:.2f}x, "
                f"submit p50 {t['p50_ms'] / p['p50_ms']:.2f}x"
            )
    floor = {key: statistics.median(f[key] for f in floor_runs) for key in floor_runs[0]}
    print("floors, medians:", ", ".join(f"{key} {value:.3f}" for key, value in floor.items()))
    print("loads (before, after) per round:", ", ".join(f"{a:.2f}/{b:.2f}" for a, b in loads))
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "rounds": runs,
                    "medians": medians,
                    "loads": loads,
                    "floors": floor_runs,
                    "calls": args.calls,
                    "producers": args.producers,
                }
            )
        )


if __name__ == "__main__":
    main()
