"""Caps end to end: a real broker and several racing workers over loopback TLS, a real
SQLite file. The caps hold (checked by the handlers and by the stored started_at /
finished_at of every task), capped claims are woken by finishing tasks and by the
rate bucket, and the ``cap`` request refuses bad input clearly."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trio

from tq.core.errors import InvalidRequest
from tq.testing import running_broker, running_worker
from tq.worker.handlers import builtin_registry

pytestmark = pytest.mark.trio


def most_overlapping(intervals: list[tuple[float, float]]) -> int:
    """The most half-open [start, end) intervals that hold at one instant."""
    edges = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals])
    most = now = 0
    for _, step in edges:  # at equal times an end (-1) sorts before a start
        now += step
        most = max(most, now)
    return most


async def test_a_type_cap_holds_with_three_workers_racing(tmp_path: Path) -> None:
    registry = builtin_registry()
    running = {"now": 0, "most": 0}

    @registry.handler("capped")
    async def capped(payload: Any) -> Any:
        running["now"] += 1
        running["most"] = max(running["most"], running["now"])
        await trio.sleep(0.02)
        running["now"] -= 1
        return payload

    async with running_broker(tmp_path) as broker, broker.client() as client:
        stored = await client.set_cap("type", "capped", concurrency=2)
        assert stored == {
            "kind": "type",
            "name": "capped",
            "concurrency": 2,
            "rate": None,
            "burst": None,
        }
        ids = [await client.submit("capped", i) for i in range(30)]
        async with (
            running_worker(broker, registry, concurrency=4, name="w1"),
            running_worker(broker, registry, concurrency=4, name="w2"),
            running_worker(broker, registry, concurrency=4, name="w3"),
        ):
            with trio.fail_after(60):  # woken by finishing tasks, never a long-poll timeout
                tasks = [await client.wait(task_id, timeout=60) for task_id in ids]
        [listed] = await client.list_caps()
    assert all(task.state == "succeeded" for task in tasks)
    assert running["most"] == 2
    spans = [(t.started_at, t.finished_at) for t in tasks]
    assert most_overlapping([(s, e) for s, e in spans if s is not None and e is not None]) <= 2
    assert listed["running"] == 0 and listed["concurrency"] == 2


async def test_a_rate_cap_spaces_the_starts(tmp_path: Path) -> None:
    async with running_broker(tmp_path) as broker, broker.client() as client:
        stored = await client.set_cap("queue", "slow", rate="4/s", burst=2)
        assert stored["rate"] == 4.0 and stored["burst"] == 2.0
        ids = [await client.submit("echo", i, queue="slow") for i in range(14)]
        async with (
            running_worker(broker, concurrency=8, name="w1", queues=("slow",)),
            running_worker(broker, concurrency=8, name="w2", queues=("slow",)),
        ):
            with trio.fail_after(60):
                tasks = [await client.wait(task_id, timeout=60) for task_id in ids]
    starts = sorted(t.started_at for t in tasks if t.started_at is not None)
    assert len(starts) == 14
    for start in starts:  # any window of w seconds: at most burst + rate * w starts
        for width in (0.5, 1.0, 2.0):
            inside = sum(1 for s in starts if start <= s < start + width)
            assert inside <= 2 + 4 * width, (width, starts)


async def test_bad_cap_requests_say_what_is_wrong(tmp_path: Path) -> None:
    async with running_broker(tmp_path) as broker, broker.client() as client:
        cases: list[tuple[dict[str, Any], str]] = [
            (
                {"kind": "worker", "name": "x", "concurrency": 1},
                "field 'kind' must be one of queue, type, got str 'worker'",
            ),
            ({"kind": "queue", "name": "x"}, "needs a concurrency, a rate or both"),
            (
                {"kind": "queue", "name": "x", "concurrency": 0},
                "field 'concurrency' must be an integer 1..1000000, got int 0",
            ),
            ({"kind": "queue", "name": "x", "rate": "fast"}, r"field 'rate' .* got str 'fast'"),
            ({"kind": "queue", "name": "x", "rate": float("inf")}, r"rate' must be .* > 0"),
            ({"kind": "queue", "name": "x", "concurrency": 1, "burst": 3}, "needs a rate"),
            ({"kind": "queue", "name": "a b", "concurrency": 1}, "spaces or commas"),
        ]
        for fields, words in cases:
            with pytest.raises(InvalidRequest, match=words):
                await client.set_cap(**fields)
        assert await client.remove_cap("queue", "none") is False
        assert await client.list_caps() == []
