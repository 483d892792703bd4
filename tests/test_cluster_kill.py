"""PostgreSQL only, slow: three brokers on one database lose two of them to kill -9.

Three broker processes share one PostgreSQL store; two workers (in this
process, so that their handlers can record every run) and a producer are each
given all three addresses. The producer submits 20,000 tasks with idempotency
keys, staying a few thousand ahead of the workers, so both kills land while it
submits and while the workers claim and report. The broker in use is killed
with SIGKILL a third of the way through, the next one two thirds through.

What the test proves, from what it recorded:

- every task the producer was answered for is stored once and succeeded (a
  resend after a kill carries the same key: no duplicate);
- no task ran under two leases at once: every run records the lease it ran
  under (task id, fencing token, attempt, worker, start, end); two runs of
  one task never overlap in time, each new lease of a task has a higher
  attempt than the last and starts after the previous run ended, and the
  stored result names the token of the task's last lease (the report the
  fence let through);
- the workers carried on after each kill: runs of tasks claimed through a
  surviving broker start after it (the time from the kill to the first one is
  printed, not asserted: the machine is shared).
"""

from __future__ import annotations

import contextvars
import dataclasses
import itertools
import shutil
from collections import defaultdict
from pathlib import Path
from typing import Any

import msgpack
import psycopg
import pytest
import trio

from tq.client import Client
from tq.config import Settings
from tq.core.task import Lease
from tq.testing import BrokerProcess
from tq.worker.handlers import HandlerRegistry
from tq.worker.runner import Running, Worker

pytestmark = pytest.mark.slow

TOTAL = 20_000
BATCH = 250  # tasks per submit request
AHEAD = 3_000  # the producer stays at most this many tasks ahead of the workers
LEASE_TTL = "5"  # seconds: a claim answer lost with a broker comes back after this


@dataclasses.dataclass
class Run:
    task: str
    token: int
    attempt: int
    worker: str
    broker: str  # the broker the lease was claimed through
    start: float
    end: float = -1.0


class RecordingWorker(Worker):
    """A worker that records each run with the lease it runs under."""

    def __init__(self, *args: Any, runs: list[Run], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.runs = runs
        self.claimed_via: dict[tuple[str, int], str] = {}

    def accept(self, lease: Lease, tasks: trio.Nursery) -> None:
        self.claimed_via[(lease.id, lease.token)] = self._rotation.order()[0]
        super().accept(lease, tasks)

    async def _run(self, entry: Running) -> None:
        lease = entry.lease
        run = Run(
            lease.id,
            lease.token,
            lease.attempt,
            self.id,
            self.claimed_via.pop((lease.id, lease.token), "?"),
            trio.current_time(),
        )
        self.runs.append(run)
        CURRENT.set(run)
        try:
            await super()._run(entry)
        finally:
            if run.end < 0:
                run.end = trio.current_time()


CURRENT: contextvars.ContextVar[Run] = contextvars.ContextVar("run")


async def work(payload: dict[str, int]) -> list[Any]:
    run = CURRENT.get()
    n = payload["n"]
    await trio.sleep(0.001 * (n % 3))
    run.end = trio.current_time()
    return [n, run.token, run.worker]


def _broker(data: Path, store: str, tls_from: Path | None) -> BrokerProcess:
    if tls_from is not None:  # the brokers of a cluster share one CA
        data.mkdir(mode=0o700)
        shutil.copytree(tls_from / "tls", data / "tls")
    args = ("--store", store, "--lease-ttl", LEASE_TTL, "--http", "off")
    return BrokerProcess(data, *args).start()


def _stored(url: str) -> list[tuple[str, str, str | None, bytes | None]]:
    with psycopg.connect(url, autocommit=True) as conn:
        rows = conn.execute("SELECT id, state, idempotency_key, result FROM tasks").fetchall()
    return [(str(a), str(b), c, d) for a, b, c, d in rows]


@pytest.mark.trio
async def test_three_brokers_lose_two_to_kill_9_and_no_task_is_lost_or_leased_twice_at_once(
    tmp_path: Path, pg_url: str
) -> None:
    brokers: list[BrokerProcess] = []
    for name in "abc":
        tls_from = None if not brokers else tmp_path / "a"
        brokers.append(await trio.to_thread.run_sync(_broker, tmp_path / name, pg_url, tls_from))
    a = brokers[0]
    every = ",".join(b.address for b in brokers)
    runs: list[Run] = []
    registry = HandlerRegistry()
    registry.register("work", work)
    settings = Settings(data=tmp_path / "w", broker=every, ca=a.ca, key=a.key, concurrency=32)
    workers = [
        RecordingWorker(dataclasses.replace(settings, name=f"w{i}"), registry, runs=runs)
        for i in range(2)
    ]
    acknowledged: dict[str, str] = {}  # idempotency key -> task id, as answered
    kills: list[tuple[float, str, int]] = []  # (trio time, address, tasks submitted then)
    stop = trio.Event()

    def finished() -> int:
        return sum(run.end >= 0 for run in runs)

    async def produce(producer: Client) -> None:
        for start in range(0, TOTAL, BATCH):
            while start - finished() > AHEAD:
                await trio.sleep(0.02)
            keys = [f"job-{n}" for n in range(start, min(start + BATCH, TOTAL))]
            specs = [
                {"type": "work", "payload": {"n": int(key[4:])}, "idempotency_key": key}
                for key in keys
            ]
            ids = await producer.submit_many(specs)
            acknowledged.update(zip(keys, ids, strict=True))

    async def killer() -> None:
        for victim, at in ((brokers[0], TOTAL // 3), (brokers[1], 2 * TOTAL // 3)):
            while finished() < at:
                await trio.sleep(0.01)
            kills.append((trio.current_time(), victim.address, len(acknowledged)))
            await trio.to_thread.run_sync(victim.kill)

    try:
        with trio.fail_after(300):
            async with trio.open_nursery() as nursery:
                for worker in workers:
                    await nursery.start(worker.run, stop)
                async with Client.connect(every, ca=a.ca, key=a.key) as producer:
                    nursery.start_soon(killer)
                    await produce(producer)
                    assert producer.address == brokers[2].address
                    while (await producer.stats())["queues"]["default"].get("succeeded", 0) < TOTAL:
                        await trio.sleep(0.2)
                stop.set()
    finally:
        for broker in brokers:
            await trio.to_thread.run_sync(broker.close)
    stored = await trio.to_thread.run_sync(_stored, pg_url)

    # every acknowledged task stored once, and succeeded
    assert len(acknowledged) == TOTAL
    assert len(stored) == TOTAL  # resends after the kills were deduplicated
    by_id = {task_id: (state, key, result) for task_id, state, key, result in stored}
    assert {acknowledged[key] for key in acknowledged} == set(by_id)
    assert {state for state, _, _ in by_id.values()} == {"succeeded"}

    # never leased to two at once: runs of a task do not overlap, attempts grow, and
    # the stored result is the last lease's
    per_task: dict[str, list[Run]] = defaultdict(list)
    for run in runs:
        per_task[run.task].append(run)
    assert set(per_task) == set(by_id)
    for task_id, task_runs in per_task.items():
        task_runs.sort(key=lambda run: run.start)
        for before, after in itertools.pairwise(task_runs):
            assert before.token != after.token, (task_id, task_runs)
            assert before.end <= after.start, ("overlapping runs", task_id, task_runs)
            assert before.attempt < after.attempt, ("attempts must grow", task_id, task_runs)
        n, token, worker = msgpack.unpackb(by_id[task_id][2])
        assert f"job-{n}" == by_id[task_id][1]
        assert (token, worker) == (task_runs[-1].token, task_runs[-1].worker), task_runs

    # both kills came mid-run, and the workers carried on through a survivor
    assert [address for _, address, _ in kills] == [brokers[0].address, brokers[1].address]
    assert all(0 < submitted < TOTAL for _, _, submitted in kills), kills
    dead: set[str] = set()
    for killed_at, address, submitted in kills:
        dead.add(address)
        after = [run.start for run in runs if run.start > killed_at and run.broker not in dead]
        assert after, f"no task ran through a surviving broker after killing {address}"
        print(
            f"kill -9 of {address} (after {submitted} submits): first task claimed "
            f"through a survivor started {min(after) - killed_at:.2f} s later"
        )
    again = sum(len(task_runs) - 1 for task_runs in per_task.values())
    print(f"{len(runs)} runs for {TOTAL} tasks ({again} runs again after a lost lease)")
