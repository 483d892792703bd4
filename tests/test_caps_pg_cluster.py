"""PostgreSQL only: caps hold across brokers. Two broker processes on one database
(loopback TLS), four workers racing claims through both; a type's concurrency cap
and a rate cap hold cluster-wide (checked by the leases the workers held at once and
by the start times the store recorded)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from tq.client import Client
from tq.testing import BrokerProcess

pytestmark = pytest.mark.trio
RUN = 0.1  # seconds each capped task runs
SLACK = 0.02  # seconds a recorded start may precede the claim's check (see below)


@contextlib.contextmanager
def brokers(tmp_path: Path, pg_url: str, *names: str) -> Iterator[list[BrokerProcess]]:
    with contextlib.ExitStack() as stack:
        yield [
            stack.enter_context(BrokerProcess(tmp_path / name, "--store", pg_url)) for name in names
        ]


@contextlib.asynccontextmanager
async def connect(
    broker: BrokerProcess, key: str | None, worker: str | None = None
) -> AsyncIterator[Client]:
    options: dict[str, Any] = {"ca": broker.ca, "key": key}
    if worker is not None:
        options.update(kind="worker", hello={"worker_id": worker, "queues": ["default"]})
    async with Client.connect(broker.address, **options) as client:
        yield client


def most_overlapping(intervals: list[tuple[float, float]]) -> int:
    edges = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals])
    most = now = 0
    for _, step in edges:  # at equal times an end (-1) sorts before a start
        now += step
        most = max(most, now)
    return most


async def test_a_concurrency_cap_and_a_rate_cap_hold_across_two_brokers(
    tmp_path: Path, pg_url: str
) -> None:
    with brokers(tmp_path, pg_url, "a", "b") as (a, b):
        key = a.key
        async with connect(a, key) as admin:
            await admin.set_cap("type", "capped", concurrency=3)
            await admin.set_cap("type", "paced", rate=20, burst=2)
            capped = await admin.submit_many([{"type": "capped"} for _ in range(60)])
            paced = await admin.submit_many([{"type": "paced"} for _ in range(24)])
        held = {"now": 0, "most": 0}
        done: list[str] = []

        async def worker(broker: BrokerProcess, name: str) -> None:
            async with connect(broker, key, name) as client:
                while len(done) < len(capped) + len(paced):
                    claim = {"t": "claim", "n": 5, "queues": ["default"], "wait": 0.5}
                    leases = (await client.request(claim))["tasks"]
                    mine = [lease for lease in leases if lease["type"] == "capped"]
                    held["now"] += len(mine)
                    held["most"] = max(held["most"], held["now"])
                    await trio.sleep(RUN)  # running
                    held["now"] -= len(mine)  # before the report: a lower bound of the store's
                    results = [
                        {"id": lease["id"], "token": lease["token"], "status": "ok"}
                        for lease in leases
                    ]
                    if results:
                        reply = await client.request({"t": "result", "results": results})
                        assert all(r["accepted"] for r in reply["results"])
                        done.extend(lease["id"] for lease in leases)

        with trio.fail_after(120):
            async with trio.open_nursery() as nursery:
                for i, broker in enumerate((a, b, a, b)):
                    nursery.start_soon(worker, broker, f"w{i}")
        async with connect(b, key) as client:
            tasks = [await client.get(task_id) for task_id in capped + paced]
            [listed_capped, listed_paced] = sorted(
                await client.list_caps(), key=lambda cap: cap["name"]
            )
    assert sorted(done) == sorted(capped + paced)  # each leased once, all succeeded
    assert {task.state for task in tasks} == {"succeeded"}
    assert held["most"] == 3  # the first claim takes the cap's allowance, never more
    spans = [
        (t.started_at, t.finished_at)
        for t in tasks
        if t.type == "capped" and t.started_at is not None and t.finished_at is not None
    ]
    # started_at / finished_at are their transactions' start times (the database's now()),
    # a little earlier than the moment the lease was taken or dropped: SLACK absorbs that;
    # more than 3 tasks running at once would overlap by most of a run (RUN)
    trimmed = [(s + SLACK, e) for s, e in spans]
    assert len(spans) == 60 and most_overlapping(trimmed) <= 3, sorted(spans)
    starts = sorted(t.started_at for t in tasks if t.type == "paced" and t.started_at)
    assert len(starts) == 24
    for start in starts:  # the store's clock: any window of w s holds <= burst + rate * w
        for width in (0.1, 0.25, 0.5, 1.0):
            inside = sum(1 for s in starts if start <= s < start + width)
            assert inside <= 2 + 20 * (width + SLACK), (width, starts)
    assert listed_capped["running"] == 0 and listed_paced["rate"] == 20.0
