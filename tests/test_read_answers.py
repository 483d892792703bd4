"""The read handlers build their declared Structs (tq/protocol/answers.py) themselves.

The service methods behind ``hello`` and the ``query`` reads (stats, workers,
depth, health, explain, workflow, history) return the answers' entries as
Structs, and the wire's handlers wrap them in their answer: a live broker is
driven through every one of them, over the wire and over REST, with each
service method's return values and every message the sessions send recorded.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest

from tq.broker import server
from tq.broker.service import BrokerService
from tq.protocol import answers
from tq.testing import running_broker

API = "/api/v1"
# service method -> what each of its calls must return
READS: dict[str, Callable[[Any], bool]] = {
    "hello": lambda v: type(v) is answers.HelloAnswer,
    "stats": lambda v: (
        type(v) is answers.Stats
        and type(v.last_minute) is answers.LastMinute
        and all(type(row) is answers.MinuteRow for row in v.history.rows)
        and all(type(cap) is answers.CapMap for cap in v.caps)
    ),
    "list_workers": lambda v: (
        type(v) is list and bool(v) and all(type(w) is answers.WorkerMap for w in v)
    ),
    "queue_depth": lambda v: (
        type(v) is answers.Depth
        and bool(v.queues)
        and all(type(q) is answers.QueueDepth for q in v.queues)
        and all(type(p) is answers.PriorityCount for q in v.queues for p in q.priorities)
    ),
    "cluster_status": lambda v: (
        type(v) is answers.Health
        and v.brokers is not None
        and all(type(b) is answers.BrokerMap for b in v.brokers)
    ),
    "explain": lambda v: type(v) is answers.Explanation,
    "workflow": lambda v: (
        type(v) is answers.Workflow and all(type(t) is answers.TaskMap for t in v.tasks)
    ),
    "history": lambda v: (
        type(v) is list and bool(v) and all(type(row) is answers.Transition for row in v)
    ),
}
READ_ANSWERS = {
    answers.HelloAnswer,
    answers.StatsAnswer,
    answers.WorkersAnswer,
    answers.DepthAnswer,
    answers.HealthAnswer,
    answers.ExplainAnswer,
    answers.WorkflowAnswer,
    answers.HistoryAnswer,
}


def _spy(monkeypatch: pytest.MonkeyPatch, name: str, returned: dict[str, list[Any]]) -> None:
    original = getattr(BrokerService, name)
    if inspect.iscoroutinefunction(original):

        @functools.wraps(original)
        async def spy(self: BrokerService, *args: Any, **kwargs: Any) -> Any:
            value = await original(self, *args, **kwargs)
            returned.setdefault(name, []).append(value)
            return value

        monkeypatch.setattr(BrokerService, name, spy)
    else:

        @functools.wraps(original)
        def spy_sync(self: BrokerService, *args: Any, **kwargs: Any) -> Any:
            value = original(self, *args, **kwargs)
            returned.setdefault(name, []).append(value)
            return value

        monkeypatch.setattr(BrokerService, name, spy_sync)


@pytest.mark.trio
async def test_read_handlers_return_their_declared_structs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    returned: dict[str, list[Any]] = {}
    for name in READS:
        _spy(monkeypatch, name, returned)
    sent: list[type] = []
    real_reply = server.Session._reply

    async def watched_reply(self: server.Session, message: Any, *args: Any) -> None:
        sent.append(type(message))
        await real_reply(self, message, *args)

    monkeypatch.setattr(server.Session, "_reply", watched_reply)
    hello = {"worker_id": "w1", "queues": [f"q{i}" for i in range(12)] + ["default"]}
    async with (
        running_broker(tmp_path) as broker,
        broker.client() as client,
        broker.client(kind="worker", hello=hello) as worker,
        broker.http_client() as http,
    ):
        first, then = await client.submit_many(
            [{"type": "echo", "payload": b"\x00\xff"}, {"type": "echo", "depends_on": ["#0"]}]
        )
        await client.set_cap("queue", "default", concurrency=5, rate=2.0)
        [lease] = (await worker.request({"t": "claim", "n": 1, "queues": ["default"]}))["tasks"]
        assert lease["id"] == first
        for q in ("stats", "workers", "depth", "health"):
            await client.request({"t": "query", "q": q})
        for q in ("explain", "workflow", "history"):
            await client.request({"t": "query", "q": q, "task": then})
        for path in ("stats", "workers", "queues", "cluster"):
            assert (await http.get(f"{API}/{path}")).status_code == 200
        for path in ("explain", "workflow", "history"):
            assert (await http.get(f"{API}/tasks/{then}/{path}")).status_code == 200
        # the public client still hands out plain data
        assert type(await client.stats()) is dict and type(await client.workers()) is list
    assert set(returned) == set(READS), "every read was called"
    for name, values in returned.items():
        bad = [type(v).__name__ for v in values if not READS[name](v)]
        assert not bad, f"BrokerService.{name} returned {bad}, not its declared Struct"
    assert set(sent) >= READ_ANSWERS, f"answers sent: {sent}"
    maps = [kind.__name__ for kind in sent if not issubclass(kind, msgspec.Struct)]
    assert not maps, f"the broker sent maps, not declared Structs: {maps}"
