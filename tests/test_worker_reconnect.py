"""The worker across broker outages: leases re-granted to a run still going, backoff.

Real brokers in this trio run, stopped and started again on the same SQLite file
and port while one worker keeps running.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import random
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.worker_helpers import make_lease
from tq.config import Settings
from tq.testing import RunningBroker, running_broker
from tq.tui.link import BrokerLink
from tq.worker.handlers import HandlerRegistry
from tq.worker.runner import RECONNECT, Worker


@contextlib.asynccontextmanager
async def broker_on(data: Path, port: int, **overrides: Any) -> AsyncIterator[RunningBroker]:
    async with running_broker(data, listen=f"127.0.0.1:{port}", http="off", **overrides) as b:
        yield b


def reconnect_delays(caplog: pytest.LogCaptureFixture) -> list[list[float]]:
    """The worker's reconnect delays, one list per outage (split by its connects)."""
    outages: list[list[float]] = []
    for record in caplog.records:
        if record.name != "tq.worker":
            continue
        if record.getMessage().startswith("worker ") and " connected to " in record.getMessage():
            outages.append([])
        elif "reconnecting in" in record.msg and outages:
            outages[-1].append(float(record.args[-1]))  # type: ignore[index]
    return [o for o in outages if o]


@pytest.mark.trio
async def test_a_task_leased_again_while_it_runs_is_not_run_twice(tmp_path: Path) -> None:
    """Outage longer than the lease: the broker gives the task out again, to this same
    worker (it has free slots). The run adopts the new lease; the task succeeds once."""
    starts: list[str] = []
    gate = trio.Event()
    registry = HandlerRegistry()

    async def hold(payload: Any) -> str:
        starts.append(payload)
        await gate.wait()
        return f"done {payload}"

    registry.register("hold", hold)
    stop = trio.Event()
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            async with running_broker(tmp_path, http="off", lease_ttl=1.0) as broker:
                port = broker.info.port
                worker = Worker(dataclasses.replace(broker.settings, concurrency=4), registry)
                await nursery.start(worker.run, stop)
                async with broker.client() as client:
                    task_id = await client.submit("hold", "a", max_retries=5)
                while not starts:
                    await trio.sleep(0.01)
                (first,) = [e.lease.token for e in worker.running.values()]
            await trio.sleep(1.5)  # the broker is away longer than the lease
            # back (the lease expired: the reaper puts the task back to pending at once)
            async with broker_on(tmp_path, port, lease_ttl=3.0) as broker:
                while {e.lease.token for e in worker.running.values()} in ({first}, set()):
                    await trio.sleep(0.01)  # until the worker holds the new lease
                gate.set()
                async with broker.client() as client:
                    task = await client.wait(task_id, timeout=20)
                    assert task.state == "succeeded", task
                    assert task.result == "done a"
                    assert task.attempts == 2  # the expiry counted one
                stop.set()
    assert starts == ["a"]
    assert not worker.running and not worker.outbox


@pytest.mark.trio
async def test_the_reconnect_backoff_starts_over_after_each_outage(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="tq.worker")
    stop = trio.Event()
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            async with running_broker(tmp_path, http="off") as broker:
                port = broker.info.port
                worker = Worker(broker.settings, HandlerRegistry())
                await nursery.start(worker.run, stop)
            for _ in range(3):
                await trio.sleep(1.0)  # an outage: several failed attempts in a row
                async with broker_on(tmp_path, port):
                    while not worker.connected:
                        await trio.sleep(0.01)
            stop.set()
    outages = reconnect_delays(caplog)
    assert len(outages) >= 3, outages  # (the last broker's stop makes a fourth)
    for delays in outages[:3]:
        assert len(delays) >= 2, outages  # the backoff grew during the outage ...
        assert delays[0] <= RECONNECT.base, outages  # ... and started from the bottom


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.trio
async def test_reconnect_delays_never_exceed_the_cap(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, autojump_clock: trio.testing.MockClock
) -> None:
    """An hour (of trio time) without a broker: hundreds of attempts, none waits past the cap."""
    caplog.set_level(logging.WARNING, logger="tq.worker")
    settings = Settings(data=tmp_path, broker=f"127.0.0.1:{_closed_port()}", insecure=True)
    worker = Worker(settings, HandlerRegistry())
    with trio.move_on_after(3600):
        await worker.run(trio.Event())
    (delays,) = [
        [float(r.args[-1]) for r in caplog.records if "reconnecting in" in r.msg]  # type: ignore[index]
    ]
    assert len(delays) > 300
    assert max(delays) <= RECONNECT.cap
    assert max(delays) >= RECONNECT.cap / 2  # the cap was reached


# -- the bookkeeping behind it, without a broker ------------------------------


@pytest.mark.trio
async def test_a_lease_on_a_task_already_here_never_starts_a_second_run(tmp_path: Path) -> None:
    starts: list[str] = []
    gates = {"A": trio.Event(), "B": trio.Event()}
    registry = HandlerRegistry()

    async def hold(payload: Any) -> str:
        starts.append(payload)
        await gates[payload].wait()
        return payload

    registry.register("hold", hold)
    worker = Worker(Settings(data=tmp_path), registry)
    async with trio.open_nursery() as tasks:
        # running here: the run adopts the new lease (keyed by it), nothing starts again
        worker.accept(make_lease("A", 1), tasks)
        await trio.testing.wait_all_tasks_blocked()
        worker.accept(make_lease("A", 2), tasks)
        assert list(worker.running) == [("A", 2)]
        # a heartbeat answer about the old lease (sent before the adoption) stops nothing
        worker.lost([("A", 1)], ["A"])
        assert not worker.running[("A", 2)].stopping
        gates["A"].set()
        await trio.testing.wait_all_tasks_blocked()
        assert [(o["id"], o["token"], o["status"]) for o in worker.outbox] == [("A", 2, "ok")]
        # its outcome is not sent yet: it goes under the newest lease, nothing runs
        worker.accept(make_lease("A", 3), tasks)
        assert [(o["id"], o["token"], o["status"]) for o in worker.outbox] == [("A", 3, "ok")]
        # a run being stopped (its lease lost): a new lease goes straight back, unrun
        worker.accept(make_lease("B", 1), tasks)
        await trio.testing.wait_all_tasks_blocked()
        worker.lost([("B", 1)], ["B"])
        worker.accept(make_lease("B", 2), tasks)
        await trio.testing.wait_all_tasks_blocked()
        assert worker.outbox[1:] == [{"id": "B", "token": 2, "status": "release"}]
        # stopping: whatever a claim brings goes back
        worker.draining = True
        worker.accept(make_lease("C", 1), tasks)
        assert worker.outbox[2:] == [{"id": "C", "token": 1, "status": "release"}]
    assert starts == ["A", "B"]
    assert worker.running == {}


@settings(max_examples=300, deadline=None)
@given(st.integers(min_value=1, max_value=10**9), st.integers())
def test_worker_and_console_backoffs_never_exceed_their_cap(failures: int, seed: int) -> None:
    """One formula (tq.core.retry) for the worker's reconnects and the console's."""
    console = BrokerLink(lambda: None).backoff  # type: ignore[arg-type,return-value]
    for policy in (RECONNECT, console):
        delay = policy.delay(failures, random.Random(seed))
        assert policy.base / 2 <= delay <= policy.cap
        assert delay >= policy.ceiling(failures) / 2  # jittered below, never above
