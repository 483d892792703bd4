"""Shared by the worker tests: a Worker object run in this trio run, a real-time limit."""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from collections.abc import AsyncIterator
from typing import Any

import pytest
import trio

from tq.core.task import Lease
from tq.testing import RunningBroker
from tq.worker.handlers import HandlerRegistry
from tq.worker.runner import Worker


@contextlib.asynccontextmanager
async def real_time_limit(seconds: float) -> AsyncIterator[None]:
    """Fail the body if it runs longer than ``seconds`` of wall-clock time.

    For tests under a frozen ``MockClock``, where ``trio.fail_after`` never fires.
    """
    done = threading.Event()
    expired = False
    async with trio.open_nursery() as nursery:

        async def guard() -> None:
            nonlocal expired
            if not await trio.to_thread.run_sync(done.wait, seconds):
                expired = True
                nursery.cancel_scope.cancel()

        nursery.start_soon(guard)
        try:
            yield
        finally:
            done.set()
    if expired:
        pytest.fail(f"still running after {seconds:g}s of real time")


@dataclasses.dataclass
class WorkerRun:
    worker: Worker
    stop: trio.Event
    stopped: trio.Event
    stopped_at: float | None = None


@contextlib.asynccontextmanager
async def worker_in(
    broker: RunningBroker, registry: HandlerRegistry, **overrides: Any
) -> AsyncIterator[WorkerRun]:
    """A Worker connected to ``broker``; stopped (if the test did not) on exit."""
    settings = dataclasses.replace(broker.settings, **overrides)
    run = WorkerRun(Worker(settings, registry), trio.Event(), trio.Event())

    async def serve(task_status: trio.TaskStatus[str]) -> None:
        try:
            await run.worker.run(run.stop, task_status=task_status)
        finally:
            run.stopped_at = trio.current_time()
            run.stopped.set()

    async with trio.open_nursery() as nursery:
        await nursery.start(serve)
        yield run
        run.stop.set()


def make_lease(task_id: str, token: int, type: str = "hold") -> Lease:
    """A lease as a claim would bring it (payload: the task id)."""
    return Lease(
        id=task_id,
        type=type,
        queue="default",
        payload=task_id,
        priority=100,
        attempt=1,
        max_retries=5,
        timeout=60.0,
        token=token,
        expires_at=0.0,
    )
