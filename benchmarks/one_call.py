"""One call at a time, before and after: broker CPU and round trip per call, A/B.

    python -m benchmarks.one_call --before /path/to/other/checkout [--calls 2000] [--rounds 3]

Starts brokers as shipped (``python -m tq broker``: TLS, API keys,
``synchronous=full``, a fresh data directory each), alternately from the
checkout given with ``--before`` (its ``tq`` package first on PYTHONPATH) and
from this one, ``--rounds`` times each, so both see the same machine load.
Against each, a ``BlockingClient`` of this checkout makes ``--calls``
sequential ``get``, ``depth`` and durable ``submit`` calls (after 200 warm-up
calls each). Reported per call: the broker process's CPU time (user +
system, all its threads, from psutil) over the calls, and the client's p50
and p99 round trip; then the median of the rounds and after/before ratios.
With ``--e2e N``, each round also runs one call per task end to end on
another fresh broker with two ``tq worker --concurrency 64`` processes (the
scenario of ``benchmarks/peers/compare.py``): N sequential durable submits
(after 200 warm-up ones, run), until every task has succeeded; reported per
task: the rate, the broker's and the workers' CPU, and the store's commits and
write operations (``/metrics``), the figures that move less with the
machine's other load than the rate does.
Without ``--before`` only this checkout is measured. The brokers start in a
temporary directory: ``python -m`` puts its working directory first on
``sys.path``, which would hide the ``--before`` checkout behind this one. Each
side prints the ``tq`` package its brokers import.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

from tq.testing import BrokerProcess

CALLS = ("get", "depth", "submit")
WARMUP = 200


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def measure(env: dict[str, str], calls: int) -> dict[str, dict[str, float]]:
    """One broker: per call kind, broker CPU (us), p50 and p99 (ms)."""
    out: dict[str, dict[str, float]] = {}
    with (
        tempfile.TemporaryDirectory() as tmp,
        contextlib.chdir(tmp),  # not this checkout first on the broker's sys.path
        BrokerProcess(Path(tmp) / "data", env=env) as broker,
    ):
        assert broker.proc is not None
        proc = psutil.Process(broker.proc.pid)
        with broker.client() as client:
            task_id = client.submit("echo", {"n": 0})
            kinds: dict[str, Callable[[], Any]] = {
                "get": lambda: client.get(task_id),
                "depth": client.queue_depth,
                "submit": lambda: client.submit("echo", {"n": 1}),
            }
            for name in CALLS:
                call = kinds[name]
                for _ in range(WARMUP):
                    call()
                samples = []
                cpu = sum(proc.cpu_times()[:2])
                for _ in range(calls):
                    begun = time.perf_counter()
                    call()
                    samples.append(time.perf_counter() - begun)
                cpu = sum(proc.cpu_times()[:2]) - cpu
                out[name] = {
                    "cpu_us": cpu / calls * 1e6,
                    "p50_ms": _quantile(samples, 0.5) * 1e3,
                    "p99_ms": _quantile(samples, 0.99) * 1e3,
                }
    return out


def _store_counters(broker: BrokerProcess) -> tuple[float, float]:
    """The store's commits and committed write operations so far (``/metrics``)."""
    with broker.http_client() as http:
        text = http.get("/metrics").text
    found = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name in ("tq_store_commits_total", "tq_store_committed_operations_total"):
            found[name] = float(value)
    return found["tq_store_commits_total"], found["tq_store_committed_operations_total"]


def measure_e2e(env: dict[str, str], tasks: int) -> dict[str, float]:
    """One broker and two workers: one producer's ``tasks`` submits, run to the end."""
    with (
        tempfile.TemporaryDirectory() as tmp,
        contextlib.chdir(tmp),
        BrokerProcess(Path(tmp) / "data", env=env) as broker,
    ):
        assert broker.proc is not None
        workers = [broker.start_worker("--concurrency", "64") for _ in range(2)]
        broker.wait_for_workers(len(workers))
        procs = [psutil.Process(broker.proc.pid), *(psutil.Process(w.pid) for w in workers)]
        with broker.client() as client:
            last = ""
            for n in range(WARMUP):
                last = client.submit("echo", {"n": n})
            client.wait(last, timeout=120)
            cpu = [sum(proc.cpu_times()[:2]) for proc in procs]
            commits, ops = _store_counters(broker)
            begun = time.perf_counter()
            for n in range(tasks):
                last = client.submit("echo", {"n": n})
            client.wait(last, timeout=300)
            while client.stats()["queues"]["default"].get("succeeded", 0) < WARMUP + tasks:
                time.sleep(0.005)
            elapsed = time.perf_counter() - begun
            used = [
                sum(proc.cpu_times()[:2]) - before for proc, before in zip(procs, cpu, strict=True)
            ]
            commits_after, ops_after = _store_counters(broker)
    return {
        "per_s": tasks / elapsed,
        "broker_us": used[0] / tasks * 1e6,
        "workers_us": sum(used[1:]) / tasks * 1e6,
        "commits": (commits_after - commits) / tasks,
        "ops": (ops_after - ops) / tasks,
    }


E2E_KEYS = ("per_s", "broker_us", "workers_us", "commits", "ops")


def _e2e_row(f: dict[str, float]) -> str:
    return (
        f"{f['per_s']:>7.0f} /s {f['broker_us']:>7.0f} us {f['workers_us']:>7.0f} us "
        f"{f['commits']:>6.2f} {f['ops']:>6.2f}"
    )


def _package(env: dict[str, str]) -> str:
    """Where ``python -m tq`` run with ``env`` (from a neutral directory) finds tq."""
    with tempfile.TemporaryDirectory() as tmp:
        return subprocess.run(
            [sys.executable, "-c", "import tq; print(tq.__file__)"],
            env={**os.environ, **env},
            cwd=tmp,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", type=Path, help="another tq checkout (its root directory)")
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--e2e", type=int, default=0, help="tasks end to end per round")
    args = parser.parse_args()
    sides: dict[str, dict[str, str]] = {"after": {}}
    if args.before is not None:
        if not (args.before / "tq" / "__init__.py").is_file():
            parser.error(f"--before {args.before}: no tq package there")
        sides = {"before": {"PYTHONPATH": os.fspath(args.before.resolve())}, "after": {}}
    for side, env in sides.items():
        print(f"{side}: brokers import {_package(env)}", flush=True)
    runs: dict[str, list[dict[str, dict[str, float]]]] = {side: [] for side in sides}
    ends: dict[str, list[dict[str, float]]] = {side: [] for side in sides}
    loads = [os.getloadavg()[0]]
    for number in range(args.rounds):
        order = list(sides.items())
        if number % 2:
            order.reverse()  # alternate which side goes first
        for side, env in order:
            figures = measure(env, args.calls)
            runs[side].append(figures)
            row = ", ".join(
                f"{name} {f['cpu_us']:.0f} us / p50 {f['p50_ms']:.3f} ms"
                for name, f in figures.items()
            )
            print(f"round {number + 1} {side:<6} {row}", flush=True)
            if args.e2e:
                end = measure_e2e(env, args.e2e)
                ends[side].append(end)
                print(
                    f"round {number + 1} {side:<6} end to end {end['per_s']:.0f} tasks/s, "
                    f"per task: broker {end['broker_us']:.0f} us, workers "
                    f"{end['workers_us']:.0f} us, {end['commits']:.2f} commits, "
                    f"{end['ops']:.2f} write operations (load {os.getloadavg()[0]:.2f})",
                    flush=True,
                )
        loads.append(os.getloadavg()[0])
    load = os.getloadavg()[0]
    print(f"\nmedians of {args.rounds} rounds, {args.calls} calls each (load average {load:.2f}):")
    print(f"{'call':<7} {'side':<7} {'broker CPU/call':>16} {'p50':>9} {'p99':>9}")
    medians: dict[str, dict[str, dict[str, float]]] = {}
    for side in sides:
        medians[side] = {
            name: {
                key: statistics.median(run[name][key] for run in runs[side])
                for key in ("cpu_us", "p50_ms", "p99_ms")
            }
            for name in CALLS
        }
    for name in CALLS:
        for side in sides:
            m = medians[side][name]
            print(
                f"{name:<7} {side:<7} {m['cpu_us']:>13.0f} us {m['p50_ms']:>6.3f} ms "
                f"{m['p99_ms']:>6.3f} ms"
            )
        if "before" in medians:
            b, a = medians["before"][name], medians["after"][name]
            print(
                f"{name:<7} {'ratio':<7} {a['cpu_us'] / b['cpu_us']:>16.2f} "
                f"{a['p50_ms'] / b['p50_ms']:>9.2f} {a['p99_ms'] / b['p99_ms']:>9.2f}"
            )
    if args.e2e:
        print(f"\nend to end, one call per task, {args.e2e} tasks (medians):")
        print(f"{'side':<7} {'rate':>10} {'broker':>10} {'workers':>10} {'commits':>6} {'ops':>6}")
        e2e = {
            side: {k: statistics.median(r[k] for r in ends[side]) for k in E2E_KEYS}
            for side in sides
        }
        for side in sides:
            print(f"{side:<7} {_e2e_row(e2e[side])}")
        if "before" in e2e:
            b, a = e2e["before"], e2e["after"]
            print(f"{'ratio':<7} " + " ".join(f"{a[k] / b[k]:>9.3f}" for k in E2E_KEYS))
    print(f"load average (1 min) at the start and after each round: {loads}")


if __name__ == "__main__":
    sys.exit(main())
