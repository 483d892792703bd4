"""One task's writes one at a time, in a SQLite store alone (no broker), A/B.

    python benchmarks/store_lone_writes.py [--before /path/to/other/checkout]
        [--calls 2000] [--rounds 5] [--synchronous normal]

In one process, on a fresh store: ``--calls`` submits of one task each (the
same API key's actor, as one producer's), then as many claims of one task
each, then as many one-outcome success reports, each call a lone write (its
own transaction). Per call: the process's CPU (all threads) and the wall p50.
With ``--before``, each round runs a process importing that checkout's ``tq``
(its root directory, first on PYTHONPATH) and one importing this one,
alternately (which goes first alternates too); then the medians of the rounds
and the after/before ratios. What a store's writes cost without the broker's
event loop competing for the GIL: compare with ``benchmarks/one_call.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

CALLS = ("submit", "claim", "complete")
WARMUP = 200


def run(calls: int, synchronous: str) -> dict[str, dict[str, float]]:
    import trio

    from tq.core.task import Lease, Outcome, TaskSpec
    from tq.store.sqlite import open_sqlite_store

    out: dict[str, dict[str, float]] = {}

    async def main() -> None:
        with tempfile.TemporaryDirectory() as tmp:
            async with open_sqlite_store(Path(tmp) / "tq.db", synchronous=synchronous) as store:
                now = time.time()

                async def phase(name: str, call: Callable[[int], Awaitable[Any]]) -> None:
                    nonlocal now
                    walls = []
                    cpu = time.process_time()
                    for i in range(calls):
                        now += 0.001  # each write at a time of its own, as in a broker
                        begun = time.perf_counter()
                        await call(i)
                        walls.append(time.perf_counter() - begun)
                    cpu = time.process_time() - cpu
                    out[name] = {
                        "cpu_us": cpu / calls * 1e6,
                        "p50_us": statistics.median(walls) * 1e6,
                    }

                async def submit(i: int) -> None:
                    await store.submit([TaskSpec(type="echo", payload=i)], now, actor="key:k")

                for i in range(WARMUP):
                    await submit(i)
                await store.claim("w", ["default"], None, WARMUP, now, 30.0)
                leases: list[Lease] = []

                async def claim(i: int) -> None:
                    leases.extend(await store.claim("w", ["default"], None, 1, now, 3600.0))

                async def complete(i: int) -> None:
                    lease = leases[i]
                    await store.complete([Outcome(lease.id, lease.token, "ok", result=i)], now)

                await phase("submit", submit)
                await phase("claim", claim)
                await phase("complete", complete)

    trio.run(main)
    return out


def _side(env: dict[str, str], calls: int, synchronous: str) -> dict[str, Any]:
    command = [sys.executable, "-P", __file__, "--child", "--calls", str(calls)]
    command += ["--synchronous", synchronous]
    with tempfile.TemporaryDirectory() as tmp:  # not this checkout first on sys.path
        done = subprocess.run(
            command, env={**os.environ, **env}, cwd=tmp, capture_output=True, text=True, check=True
        )
    figures: dict[str, Any] = json.loads(done.stdout.splitlines()[-1])
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", type=Path, help="another tq checkout (its root directory)")
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--synchronous", default="normal", choices=("normal", "full"))
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        import tq

        print(json.dumps({"tq": tq.__file__, **run(args.calls, args.synchronous)}))
        return
    here = Path(__file__).resolve().parent.parent
    sides: dict[str, dict[str, str]] = {"after": {"PYTHONPATH": os.fspath(here)}}
    if args.before is not None:
        if not (args.before / "tq" / "__init__.py").is_file():
            parser.error(f"--before {args.before}: no tq package there")
        sides = {"before": {"PYTHONPATH": os.fspath(args.before.resolve())}, **sides}
    runs: dict[str, list[dict[str, Any]]] = {side: [] for side in sides}
    loads = [os.getloadavg()[0]]
    for number in range(args.rounds):
        order = list(sides.items())
        if number % 2:
            order.reverse()
        for side, env in order:
            figures = _side(env, args.calls, args.synchronous)
            runs[side].append(figures)
            row = ", ".join(
                f"{name} {figures[name]['cpu_us']:.0f} us / p50 {figures[name]['p50_us']:.0f} us"
                for name in CALLS
            )
            print(f"round {number + 1} {side:<6} {row}  ({figures['tq']})", flush=True)
        loads.append(os.getloadavg()[0])
    print(f"\nmedians of {args.rounds} rounds, {args.calls} calls each, CPU per call / p50:")
    medians = {
        side: {
            name: {
                key: statistics.median(r[name][key] for r in runs[side])
                for key in ("cpu_us", "p50_us")
            }
            for name in CALLS
        }
        for side in sides
    }
    for name in CALLS:
        for side in sides:
            m = medians[side][name]
            print(f"{name:<9} {side:<7} {m['cpu_us']:>6.0f} us {m['p50_us']:>6.0f} us")
        if "before" in medians:
            b, a = medians["before"][name], medians["after"][name]
            ratios = f"{a['cpu_us'] / b['cpu_us']:>9.2f} {a['p50_us'] / b['p50_us']:>9.2f}"
            print(f"{name:<9} {'ratio':<7} {ratios}")
    print(f"load average (1 min) at the start and after each round: {loads}")


if __name__ == "__main__":
    sys.exit(main())
