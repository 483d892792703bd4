"""Worker shutdown: every unrun task goes back at once, and a stop lasts only as long
as the running tasks need (at most the grace).

A real broker and a real worker in one trio run, under a frozen MockClock: time
moves only when a test jumps it, so a duration measured in trio time is exact
(sockets and the store's thread still work in real time).
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import trio
import trio.testing

from tests.worker_helpers import WorkerRun, make_lease, real_time_limit, worker_in
from tq.config import Settings
from tq.testing import running_broker
from tq.worker.handlers import HandlerRegistry
from tq.worker.runner import CLAIM_WAIT, Worker


async def stop_and_wait_for_drain(run: WorkerRun) -> None:
    """Ask the worker to stop and let it notice (no trio time passes)."""
    run.stop.set()
    while not run.worker.draining:
        await trio.sleep(0)


def _registry(started: trio.Event, seconds: float, runs: list[str]) -> HandlerRegistry:
    registry = HandlerRegistry()

    async def slow(payload: object) -> str:
        runs.append("slow")
        started.set()
        await trio.sleep(seconds)
        return "done"

    registry.register("slow", slow)
    return registry


@pytest.mark.trio
async def test_stop_lasts_as_long_as_the_running_task_needs(
    tmp_path: Path, mock_clock: trio.testing.MockClock
) -> None:
    started, runs = trio.Event(), []
    async with real_time_limit(30), running_broker(tmp_path, http="off") as broker:
        # one slot, so no claim is in flight while the task runs
        async with worker_in(
            broker, _registry(started, 3.0, runs), concurrency=1, shutdown_grace=30.0
        ) as run:
            async with broker.client() as client:
                task_id = await client.submit("slow")
                await started.wait()
                t0 = trio.current_time()
                await stop_and_wait_for_drain(run)
                mock_clock.jump(3.0)  # the task's own time; nothing more is allowed to pass
                await run.stopped.wait()
                assert run.stopped_at == t0 + 3.0
                task = await client.get(task_id)
    assert task.state == "succeeded" and task.result == "done"
    assert runs == ["slow"]


@pytest.mark.trio
async def test_stop_is_bounded_by_the_grace_and_releases_the_rest(
    tmp_path: Path, mock_clock: trio.testing.MockClock
) -> None:
    started, runs = trio.Event(), []
    async with real_time_limit(30), running_broker(tmp_path, http="off") as broker:
        async with worker_in(
            broker, _registry(started, 100.0, runs), concurrency=1, shutdown_grace=2.0
        ) as run:
            async with broker.client() as client:
                task_id = await client.submit("slow", max_retries=0)
                await started.wait()
                t0 = trio.current_time()
                await stop_and_wait_for_drain(run)
                mock_clock.jump(2.0)  # the grace, not the task's 100 s
                await run.stopped.wait()
                assert run.stopped_at == t0 + 2.0
                task = await client.get(task_id)
    # released: back to pending, the attempt not counted (max_retries=0 would make it dead)
    assert task.state == "pending" and task.attempts == 0, task
    assert runs == ["slow"]


@pytest.mark.trio
async def test_stop_with_nothing_running_waits_only_for_the_claim_in_flight(
    tmp_path: Path, mock_clock: trio.testing.MockClock
) -> None:
    runs: list[str] = []
    async with real_time_limit(30), running_broker(tmp_path, http="off") as broker:
        async with worker_in(broker, _registry(trio.Event(), 1.0, runs), concurrency=2) as run:
            t0 = trio.current_time()
            await stop_and_wait_for_drain(run)
            # The claim in flight long-polls until its wait (CLAIM_WAIT) ends at the
            # broker, which may have read it a moment after it was sent: step time on.
            while not run.stopped.is_set():
                mock_clock.jump(0.25)
                await trio.to_thread.run_sync(time.sleep, 0.02)
            assert run.stopped_at is not None
            assert run.stopped_at - t0 <= CLAIM_WAIT + 0.5
    assert runs == []


@pytest.mark.trio
async def test_tasks_claimed_during_the_stop_are_released_unrun(
    tmp_path: Path, mock_clock: trio.testing.MockClock
) -> None:
    """A claim long-polls; a submit wakes it as the stop begins: its task goes back."""
    runs: list[str] = []
    async with real_time_limit(30), running_broker(tmp_path, http="off") as broker:
        async with worker_in(broker, _registry(trio.Event(), 1.0, runs), concurrency=4) as run:
            async with broker.client() as client:
                t0 = trio.current_time()
                ids = await client.submit_many([{"type": "slow", "max_retries": 0}] * 3)
                run.stop.set()  # the broker is claiming them right now
                await run.stopped.wait()
                assert run.stopped_at == t0  # no time passed: nothing waited for a timer
                tasks = [await client.get(i) for i in ids]
    assert runs == []
    assert [(t.state, t.attempts) for t in tasks] == [("pending", 0)] * 3


@pytest.mark.trio
async def test_a_task_claimed_but_not_started_when_the_stop_comes_is_released(
    tmp_path: Path,
) -> None:
    runs: list[str] = []
    worker = Worker(Settings(data=tmp_path), _registry(trio.Event(), 1.0, runs))
    async with trio.open_nursery() as tasks:
        worker.accept(make_lease("A", 7, type="slow"), tasks)  # its run starts soon ...
        worker.draining = True  # ... but the stop comes first
    assert runs == []
    assert worker.outbox == [{"id": "A", "token": 7, "status": "release"}]
    assert worker.running == {}
