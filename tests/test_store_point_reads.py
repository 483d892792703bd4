"""Small reads on the event loop's own SQLite connection (``SQLiteStore._read_here``):
``get``, ``depth``, caps and paused queues run there while they stay within
POINT_STEPS VM steps; a read that runs over is interrupted and answered, exactly,
by the reader thread, and that read goes straight to the thread for a while. A claim
looks at the pending heads there first: nothing pending, no write transaction."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trio

import tq.store.sqlite as sqlite_module
from tq.core.task import TaskSpec
from tq.store import schema_ops
from tq.store.sqlite import SQLiteStore, open_sqlite_store

NOW = 1_800_000_000.0


def _count_hops(store: SQLiteStore) -> list[str]:
    """Record the name of every read that hops to the reader thread."""
    hops: list[str] = []
    read = store._read

    async def counted(fn: Any, *args: Any) -> Any:
        hops.append(fn.__name__)
        return await read(fn, *args)

    store._read = counted  # type: ignore[method-assign]
    return hops


def _rows(depth: list[Any]) -> list[tuple[str, int, str, int]]:
    return [(d.queue, d.priority, d.state, d.count) for d in depth]


@pytest.mark.trio
async def test_small_reads_never_leave_the_event_loops_thread(tmp_path: Path) -> None:
    async with open_sqlite_store(tmp_path / "tq.db") as store:
        [first] = await store.submit([TaskSpec(type="t", queue="a", priority=1)], NOW)
        await store.submit([TaskSpec(type="t", queue="b", priority=3) for _ in range(20)], NOW)
        hops = _count_hops(store)
        # many times over: a cached statement's step count carries over between runs,
        # and must not add up to the budget of a later run
        for _ in range(3000):
            assert (await store.get(str(first.id))).queue == "a"
        for _ in range(300):
            assert _rows(await store.queue_depth()) == [
                ("a", 1, "pending", 1),
                ("b", 3, "pending", 20),
            ]
            assert await store.list_caps() == []
            assert await store.paused_queues() == {}
        assert hops == []
        assert store._over_budget == {}


@pytest.mark.trio
async def test_a_read_over_its_budget_is_answered_exactly_by_the_reader_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sqlite_module, "POINT_STEPS", 3 * sqlite_module.POINT_STEP_GRAIN)
    async with open_sqlite_store(tmp_path / "tq.db") as store:
        specs = [TaskSpec(type="t", queue=f"q{i % 3}", priority=i % 4) for i in range(1200)]
        await store.submit(specs, NOW)
        hops = _count_hops(store)
        depth = _rows(await store.queue_depth())
        assert hops == ["queue_depth"], "interrupted on the event loop, run on the reader"
        assert sum(row[3] for row in depth) == 1200
        assert depth == _rows(schema_ops.queue_depth(store._reader))
        assert schema_ops.queue_depth in store._over_budget
        # straight to the thread meanwhile: no second wasted budget
        assert _rows(await store.queue_depth()) == depth
        assert hops == ["queue_depth", "queue_depth"]
        # a point read stays within any budget and keeps its own way
        [one] = await store.submit([TaskSpec(type="t", queue="x")], NOW)
        assert (await store.get(str(one.id))).queue == "x"
        assert hops == ["queue_depth", "queue_depth"]


@pytest.mark.trio
async def test_a_read_over_its_budget_tries_the_event_loop_again_later(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sqlite_module, "POINT_STEPS", 3 * sqlite_module.POINT_STEP_GRAIN)
    async with open_sqlite_store(tmp_path / "tq.db") as store:
        await store.submit([TaskSpec(type="t", priority=5) for _ in range(1200)], NOW)
        await store.queue_depth()
        assert schema_ops.queue_depth in store._over_budget
        monkeypatch.setattr(sqlite_module, "POINT_STEPS", 10**9)
        hops = _count_hops(store)
        await trio.sleep(sqlite_module.OVER_BUDGET_PAUSE)
        assert _rows(await store.queue_depth()) == [("default", 5, "pending", 1200)]
        assert hops == [], "the pause over, the read ran on the event loop again"


@pytest.mark.trio
async def test_a_claim_that_finds_nothing_pending_writes_nothing(tmp_path: Path) -> None:
    async with open_sqlite_store(tmp_path / "tq.db") as store:
        commits, ops = store.commits, store.committed_ops
        assert await store.claim("w", ["default"], None, 10, NOW, 30.0) == []
        assert await store.claim("w", ["default"], ["t"], 10, NOW, 30.0) == []
        assert (store.commits, store.committed_ops) == (commits, ops)
        [other] = await store.submit([TaskSpec(type="u")], NOW)  # another type, pending
        ops = store.committed_ops
        assert await store.claim("w", ["default"], ["t"], 10, NOW, 30.0) == []
        assert store.committed_ops == ops
        [lease] = await store.claim("w", ["default"], None, 10, NOW, 30.0)
        assert lease.id == other.id


@pytest.mark.trio
async def test_claims_racing_for_one_task_make_one_write(tmp_path: Path) -> None:
    async with open_sqlite_store(tmp_path / "tq.db") as store:
        [task] = await store.submit([TaskSpec(type="t")], NOW)
        ops = store.committed_ops
        got: list[list[Any]] = []

        async def claim(worker: str) -> None:
            got.append(await store.claim(worker, ["default"], ["t"], 64, NOW, 30.0))

        async with trio.open_nursery() as nursery:  # every long-polling worker woken at once
            for worker in ("w1", "w2", "w3"):
                nursery.start_soon(claim, worker)
        assert sorted(len(leases) for leases in got) == [0, 0, 1]
        assert [lease.id for leases in got for lease in leases] == [task.id]
        assert store.committed_ops == ops + 1, "the others looked after it committed"


@pytest.mark.trio
async def test_claims_with_enough_pending_for_each_share_the_writer(tmp_path: Path) -> None:
    async with open_sqlite_store(tmp_path / "tq.db") as store:
        await store.submit([TaskSpec(type="t") for _ in range(30)], NOW)
        got: list[int] = []

        async def claim(worker: str) -> None:
            got.append(len(await store.claim(worker, ["default"], None, 10, NOW, 30.0)))

        commits = store.commits
        async with trio.open_nursery() as nursery:
            for worker in ("w1", "w2", "w3"):
                nursery.start_soon(claim, worker)
        assert got == [10, 10, 10]
        assert store.commits - commits <= 2, "none waited for another's commit to look"
