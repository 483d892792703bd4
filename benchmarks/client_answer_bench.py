"""What a client spends turning one answer frame into what its method returns.

    python -m benchmarks.client_answer_bench [--rounds N]

For each typical answer (the broker's frames of benchmarks/answer_bench.py: a
``get``'s task, a claim of 1 and of 100 leases, a 250-result report, a 250-task
submit) it times the client's path from the frame's bytes to the declared
answer Struct, two ways in the same run: as the client core reads it (the
envelope ``t``/``id`` only, then the bytes decoded straight into the request's
declaration: ``ClientCore.next_received``, ``result``, ``api.read_reply``) and
as it read it before (the frame decoded to a map and its envelope checked,
``Connection.parse``, then the map converted into the declaration). Events too
(a ``tasks`` event of 1 and of 100 changes, to what ``parse_event`` returns): the
body decoded into its topic's declaration, or the map converted. Both ways give
equal results (checked); it prints microseconds per answer, the median of
``--rounds`` runs, the ratio and the load average.
"""

from __future__ import annotations

import argparse
import os
import statistics
from collections.abc import Callable
from typing import Any

from benchmarks.answer_bench import _time, cases
from tq.client import _api as api
from tq.client.core import ClientCore
from tq.protocol import Connection, answers
from tq.protocol.session import Answer, EventReceived

# the request each answer of answer_bench.cases() belongs to, and its declaration
REQUESTS: dict[str, tuple[str, type[answers.Answer]]] = {
    "get (1 task)": ("query", answers.TaskAnswer),
    "claim (1 lease)": ("claim", answers.ClaimAnswer),
    "claim (100 leases)": ("claim", answers.ClaimAnswer),
    "result (250 reports)": ("result", answers.ResultAnswer),
    "submit (250 tasks)": ("submit", answers.SubmitAnswer),
}
RID = 7  # the id of every frame of answer_bench.cases()


def _core() -> ClientCore:
    core = ClientCore("127.0.0.1:7470", 1 << 24, api.hello("worker", "bench"))
    hello_id, _ = core.hello_frame()
    ack = {"t": "ack", "id": hello_id, "v": 1, "server": "tq/0", "broker": "b"}
    ack.update(lease_ttl=30.0, worker_id="w", key_id=None, role=None)
    core.receive_data(Connection().send(ack))
    assert isinstance(core.next_received(), Answer)
    return core


def paths(
    frame: bytes, request: str, kind: type[answers.Answer]
) -> tuple[Callable[[], Any], Callable[[], Any]]:
    """(declared, maps): each reads ``frame`` as the answer to an outstanding request."""
    core, old_core = _core(), _core()

    def declared() -> Any:
        core.session._outstanding[RID] = request
        core.receive_data(frame)
        item = core.next_received()
        assert isinstance(item, Answer)
        return api.read_reply(core.result(item), kind)

    def maps() -> Any:
        old_core.session._outstanding[RID] = request
        item = _received_as_map(old_core, frame)
        assert isinstance(item, Answer)
        return answers.convert_answer(api.raise_for_nack(item.reply), kind)

    return declared, maps


def _received_as_map(core: ClientCore, frame: bytes) -> Any:
    """``frame`` as the session received it before the core read envelopes: the whole
    body decoded as a map."""
    conn = core.conn
    conn.receive_data(frame)
    body = conn.next_body()
    assert body is not None
    return core.session.receive(conn.parse(body))


def _tasks_event(n: int) -> bytes:
    change = answers.TaskChange(id=f"t{n}", type="resize", queue="images", from_=None, to="pending")
    total = answers.TaskTotal(queue="images", from_=None, to="pending", n=n)
    event = answers.TasksEvent(
        id=RID,
        seq=9,
        topic="tasks",
        time=1795826478.4,
        changes=[change] * n,
        more=0,
        totals=[total],
    )
    return Connection().send(event)


def event_paths(frame: bytes) -> tuple[Callable[[], Any], Callable[[], Any]]:
    """(declared, maps): each reads ``frame`` as an event of the subscription, through
    ``parse_event`` (what a subscriber's iteration returns)."""
    core, old_core = _core(), _core()
    for one in (core, old_core):
        one.session.subscription = RID

    def declared() -> Any:
        core.receive_data(frame)
        item = core.next_received()
        assert isinstance(item, EventReceived) and type(item.message) is api.CheckedEvent
        return api.parse_event(item.message)

    def maps() -> Any:
        item = _received_as_map(old_core, frame)
        assert isinstance(item, EventReceived)
        return api.parse_event(item.message)

    return declared, maps


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"{'answer':<24} {'declared us':>12} {'maps us':>10} {'declared/maps':>14}")
    runs = {name: paths(build(), *REQUESTS[name]) for name, (build, _) in cases().items()}
    runs["event tasks (1 change)"] = event_paths(_tasks_event(1))
    runs["event tasks (100)"] = event_paths(_tasks_event(100))
    for name, (declared, maps) in runs.items():
        assert declared() == maps(), name  # the same answer either way
        new, old = [], []
        for _ in range(args.rounds):
            new.append(_time(declared))
            old.append(_time(maps))
        a, b = statistics.median(new), statistics.median(old)
        print(f"{name:<24} {a:>12.2f} {b:>10.2f} {a / b:>14.2f}")
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
