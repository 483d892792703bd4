"""Chaos: the broker is killed (kill -9) again and again for longer than the lease
while one worker with free slots runs long tasks through it all.

The broker is a real process restarted on the same SQLite file and port; the worker
runs in this trio run so the test can watch every handler call. Nothing may end
dead or stay unfinished, and no task may run twice at once in the worker.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any

import pytest
import trio

from tq.client import Client
from tq.config import Settings
from tq.testing import BrokerProcess
from tq.worker.handlers import HandlerRegistry
from tq.worker.runner import Worker

pytestmark = pytest.mark.slow

LEASE_TTL = 1.0
OUTAGE = 1.6  # longer than the lease: every lease held at the kill expires
ROUNDS = 3


@pytest.mark.trio
async def test_outages_longer_than_the_lease_lose_nothing_and_run_nothing_twice_at_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="tq.worker")
    rng = random.Random(7)
    running: set[str] = set()
    overlaps: list[str] = []  # a task started while this worker was still running it
    starts: dict[str, int] = {}
    registry = HandlerRegistry()
    chaos_over = trio.Event()

    async def work(payload: Any) -> Any:
        key = payload["k"]
        if key in running:
            overlaps.append(key)
        running.add(key)
        starts[key] = starts.get(key, 0) + 1
        try:
            if payload.get("long"):
                await chaos_over.wait()  # runs through every outage
            await trio.sleep(payload["s"])
        finally:
            running.discard(key)
        return key

    registry.register("work", work)
    broker = BrokerProcess(tmp_path / "broker", "--lease-ttl", str(LEASE_TTL), "--http", "off")
    await trio.to_thread.run_sync(broker.start)
    try:
        address = broker.address
        port = address.rsplit(":", 1)[1]
        settings = Settings(
            data=tmp_path / "worker", broker=address, ca=broker.ca, key=broker.key, concurrency=8
        )
        # long tasks (outlive an outage) and short ones (keep claims and reports flowing)
        specs = [
            {"type": "work", "payload": {"k": f"long{i}", "s": 0.2, "long": True}} for i in range(5)
        ]
        specs += [
            {"type": "work", "payload": {"k": f"short{i}", "s": rng.uniform(0.05, 0.4)}}
            for i in range(60)
        ]
        for spec in specs:
            spec["max_retries"] = 10  # at most one expiry per outage: never dead
        async with Client.connect(address, ca=broker.ca, key=broker.key) as client:
            ids = await client.submit_many(specs)
        stop = trio.Event()
        worker = Worker(settings, registry)
        with trio.fail_after(50):
            async with trio.open_nursery() as nursery:
                await nursery.start(worker.run, stop)
                for _ in range(ROUNDS):
                    while not worker.connected:  # back, with free slots: it claims at once
                        await trio.sleep(0.01)
                    await trio.sleep(rng.uniform(0.5, 1.0))
                    await trio.to_thread.run_sync(broker.kill)
                    await trio.sleep(OUTAGE)
                    await trio.to_thread.run_sync(broker.start, f"127.0.0.1:{port}")
                while not worker.connected:
                    await trio.sleep(0.01)
                await trio.sleep(0.5)
                chaos_over.set()
                async with Client.connect(address, ca=broker.ca, key=broker.key) as client:
                    tasks = [await client.wait(i, timeout=30) for i in ids]
                stop.set()
    finally:
        await trio.to_thread.run_sync(broker.close)
    assert overlaps == []
    states = {t.payload["k"]: (t.state, t.attempts) for t in tasks}
    assert all(t.state == "succeeded" for t in tasks), states
    assert sorted(t.result for t in tasks) == sorted(starts)
    # leases expired during the outages and came back to this worker, runs still going
    assert max(t.attempts for t in tasks) >= 2, states
    assert any("leased again while running here" in r.getMessage() for r in caplog.records)
    assert not worker.running and not worker.outbox
