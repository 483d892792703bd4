"""What the broker spends turning one answer into its frame, before any I/O.

    python -m benchmarks.answer_bench [--rounds N]

For each typical answer (a ``get``'s task, a claim of 1 and of 100 leases, a
250-result report, a 250-task submit) it times the broker's path from what the
store returned to frame bytes two ways, in the same run: as the broker answers
(the declared Struct of tq/protocol/answers.py built and encoded by msgspec,
``Connection.send``), and as it answered before the declarations (a map built
per answer and per entry, encoded by msgpack-python). Both give the same
bytes (checked); it prints microseconds per answer, the median of
``--rounds`` runs, and the ratio.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

from tq.core.states import State
from tq.core.task import Lease, Task, TaskError
from tq.protocol import Connection, answers
from tq.store.base import OutcomeResult

TASK_ID = "01937a2e-5b7c-7d1e-9f00-0123456789ab"
TOKEN = 2**61 + 12345


def _task() -> Task:
    return Task(
        id=TASK_ID,
        type="resize",
        queue="images",
        payload={"n": 1, "path": "/data/1.png"},
        priority=100,
        state=State("dead"),
        attempts=2,
        max_retries=3,
        timeout=300.0,
        retry_base=1.0,
        retry_cap=300.0,
        created_at=1795826476.92,
        started_at=1795826477.01,
        finished_at=1795826477.35,
        worker="w1",
        error=TaskError("OSError", "disk full", "Traceback ..."),
    )


def _lease(n: int) -> Lease:
    payload = {"n": n, "path": f"/data/{n}.png"}
    return Lease(TASK_ID, "resize", "images", payload, 100, 1, 3, 300.0, TOKEN, 1795826478.4)


def _legacy(body: dict[str, object]) -> Callable[[], bytes]:
    return lambda: Connection().send({"t": "ack", "id": 7, **body})


def cases() -> dict[str, tuple[Callable[[], bytes], Callable[[], bytes]]]:
    """name -> (declared, legacy): each builds one answer from store results and encodes."""
    conn = Connection()
    task = _task()
    one, hundred = [_lease(0)], [_lease(n) for n in range(100)]
    reports = [OutcomeResult(TASK_ID, True, "succeeded", "") for _ in range(250)]
    submitted = [(TASK_ID, True)] * 250
    return {
        "get (1 task)": (
            lambda: conn.send(answers.TaskAnswer(id=7, task=answers.task_map(task))),
            lambda: conn.send({"t": "ack", "id": 7, "task": task.to_dict()}),
        ),
        "claim (1 lease)": (
            lambda: conn.send(answers.ClaimAnswer(id=7, tasks=[answers.lease_map(x) for x in one])),
            lambda: conn.send({"t": "ack", "id": 7, "tasks": [x.to_dict() for x in one]}),
        ),
        "claim (100 leases)": (
            lambda: conn.send(
                answers.ClaimAnswer(id=7, tasks=[answers.lease_map(x) for x in hundred])
            ),
            lambda: conn.send({"t": "ack", "id": 7, "tasks": [x.to_dict() for x in hundred]}),
        ),
        "result (250 reports)": (
            lambda: conn.send(
                answers.ResultAnswer(
                    id=7,
                    results=[
                        answers.Reported(id=r.id, accepted=r.accepted, state=r.state, reason="")
                        for r in reports
                    ],
                )
            ),
            lambda: conn.send(
                {
                    "t": "ack",
                    "id": 7,
                    "results": [
                        {"id": r.id, "accepted": r.accepted, "state": r.state, "reason": ""}
                        for r in reports
                    ],
                }
            ),
        ),
        "submit (250 tasks)": (
            lambda: conn.send(
                answers.SubmitAnswer(
                    id=7,
                    tasks=[answers.Submitted(id=i, created=c) for i, c in submitted],
                    warnings=[],
                )
            ),
            lambda: conn.send(
                {
                    "t": "ack",
                    "id": 7,
                    "tasks": [{"id": i, "created": c} for i, c in submitted],
                    "warnings": [],
                }
            ),
        ),
    }


def _time(fn: Callable[[], object], seconds: float = 0.2) -> float:
    """Microseconds per call, over about ``seconds``."""
    n, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        for _ in range(20):
            fn()
        n += 20
    return elapsed / n * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    print(f"{'answer':<22} {'declared us':>12} {'maps us':>10} {'declared/maps':>14}")
    for name, (declared, legacy) in cases().items():
        assert declared() == legacy(), name  # the same bytes either way
        new, old = [], []
        for _ in range(args.rounds):
            new.append(_time(declared))
            old.append(_time(legacy))
        a, b = statistics.median(new), statistics.median(old)
        print(f"{name:<22} {a:>12.2f} {b:>10.2f} {a / b:>14.2f}")


if __name__ == "__main__":
    main()
