"""What the broker spends parsing and validating one message, before any I/O.

    python benchmarks/decode_bench.py [--rounds N]

For each typical message (a hello, a get, a single submit, a 250-task submit,
a claim, a 250-result report, a heartbeat) it times the broker's own path
from frame body to checked request: ``Connection.parse_request`` (msgpack
decoded straight into the request's Struct, tq/protocol/schema.py: envelope,
field types and ranges) plus what the service still does with the fields (task
specs joined and defaulted by ``TaskSpec.of``, outcomes made ``Outcome``). It
prints microseconds per message and per task, the
median of ``--rounds`` runs, so that a change to the protocol layer (typed
messages, another decoder) can be compared with the figures before it on the
same machine in the same sitting.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import msgpack

from tq.broker.service import parse_outcome
from tq.core.task import TaskSpec
from tq.protocol import Connection
from tq.protocol.schema import Heartbeat, Request, Result, Submit

TOKEN = 2**61 + 12345
TASK_ID = "01937a2e-5b7c-7d1e-9f00-0123456789ab"


def _spec(n: int) -> dict[str, Any]:
    return {"type": "resize", "queue": "images", "payload": {"n": n, "path": f"/data/{n}.png"}}


MESSAGES: dict[str, dict[str, Any]] = {
    "hello": {"t": "hello", "id": 1, "v": 1, "kind": "client", "key": "tq_" + "x" * 60},
    "query get": {"t": "query", "id": 2, "q": "get", "task": TASK_ID},
    "submit 1": {"t": "submit", "id": 3, "tasks": [_spec(0)]},
    "submit 250": {"t": "submit", "id": 4, "tasks": [_spec(n) for n in range(250)]},
    "claim": {"t": "claim", "id": 5, "n": 64, "queues": ["images"], "types": ["resize"]},
    "result 250": {
        "t": "result",
        "id": 6,
        "results": [
            {"id": TASK_ID, "token": TOKEN, "status": "ok", "result": {"ok": True}}
            for _ in range(250)
        ],
    },
    "heartbeat 64": {
        "t": "heartbeat",
        "id": 7,
        "leases": [[TASK_ID, TOKEN]] * 64,
        "stats": {"cpu": 12.5, "memory": 123456789, "running": 64},
    },
}


def _checks(msg: Request) -> int:
    """What the service layer still does with ``msg``; how many tasks it carries."""
    if isinstance(msg, Submit):
        for spec in msg.tasks:
            TaskSpec.of(spec)
        return len(msg.tasks)
    if isinstance(msg, Result):
        for item in msg.results:
            parse_outcome(item)
        return len(msg.results)
    if isinstance(msg, Heartbeat):
        return len(msg.leases)  # the pairs are checked by the declaration
    return 1


def _time(fn: Callable[[], object], seconds: float = 0.2) -> float:
    """Seconds per call, timed over about ``seconds``."""
    n = 1
    while True:
        started = time.perf_counter()
        for _ in range(n):
            fn()
        elapsed = time.perf_counter() - started
        if elapsed >= seconds:
            return elapsed / n
        n *= 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    conn = Connection()
    print(f"{'message':<14} {'bytes':>7} {'us/message':>11} {'us/task':>8}")
    for name, msg in MESSAGES.items():
        body = msgpack.packb(msg, use_bin_type=True)
        tasks = _checks(conn.parse_request(body))

        def one(body: bytes = body) -> None:
            _checks(conn.parse_request(body))

        per = statistics.median(_time(one) for _ in range(args.rounds))
        print(f"{name:<14} {len(body):>7} {per * 1e6:>11.1f} {per * 1e6 / tasks:>8.2f}")


if __name__ == "__main__":
    main()
