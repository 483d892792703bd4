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
    args = parser.parse_args()
    sides: dict[str, dict[str, str]] = {"after": {}}
    if args.before is not None:
        if not (args.before / "tq" / "__init__.py").is_file():
            parser.error(f"--before {args.before}: no tq package there")
        sides = {"before": {"PYTHONPATH": os.fspath(args.before.resolve())}, "after": {}}
    for side, env in sides.items():
        print(f"{side}: brokers import {_package(env)}", flush=True)
    runs: dict[str, list[dict[str, dict[str, float]]]] = {side: [] for side in sides}
    for number in range(args.rounds):
        for side, env in sides.items():
            figures = measure(env, args.calls)
            runs[side].append(figures)
            row = ", ".join(
                f"{name} {f['cpu_us']:.0f} us / p50 {f['p50_ms']:.3f} ms"
                for name, f in figures.items()
            )
            print(f"round {number + 1} {side:<6} {row}", flush=True)
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


if __name__ == "__main__":
    sys.exit(main())
