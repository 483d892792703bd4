"""Workers and producers across a broker killed with kill -9, as separate processes.

One broker on SQLite, killed and started again on the same address; and two
brokers on one PostgreSQL database, one of them killed for good, with a worker
and a producer given both addresses.
"""

from __future__ import annotations

import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tq.client import BlockingClient
from tq.client.failover import AUTO_KEY_PREFIX
from tq.core.task import Task
from tq.testing import BrokerProcess, tq_command

pytestmark = pytest.mark.slow


def _wait_states(client: BlockingClient, ids: list[str], timeout: float = 60) -> list[Task]:
    deadline = time.monotonic() + timeout
    while True:
        tasks = [client.get(i) for i in ids]
        if all(t.state in ("succeeded", "dead", "cancelled") for t in tasks):
            return tasks
        if time.monotonic() > deadline:
            raise AssertionError([(t.id, t.state) for t in tasks])
        time.sleep(0.1)


def _wait_running(client: BlockingClient, ids: list[str], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not all(client.get(i).state == "running" for i in ids):
        assert time.monotonic() < deadline, "the tasks did not start"
        time.sleep(0.05)


def _wait_leased_in(worker_log: Path, ids: list[str], timeout: float = 30) -> None:
    """Until the worker (``--log-level debug``) logged each task as leased: its claim's
    answer arrived. A claim the broker committed whose answer a kill -9 cut off
    leaves a lease nobody holds, which only its expiry ends (a second attempt)."""
    deadline = time.monotonic() + timeout
    while not all(f"task {i} " in worker_log.read_text() for i in ids):
        assert time.monotonic() < deadline, "the worker did not receive every lease"
        time.sleep(0.05)


def test_a_worker_carries_on_across_a_kill_and_restart_of_its_only_broker(
    tmp_path: Path,
) -> None:
    """kill -9 while tasks run (their leases outlast the outage): the broker comes back on
    the same address, the worker reconnects and reports what finished meanwhile; every
    task succeeds on its first attempt, and new work runs."""
    with BrokerProcess(tmp_path / "broker", "--lease-ttl", "6", "--http", "off") as broker:
        broker.start_worker("--concurrency", "4", "--log-level", "debug")
        broker.wait_for_workers()
        with broker.client() as client:
            ids = [client.submit("sleep", 1.5) for _ in range(4)]
            _wait_running(client, ids)
        _wait_leased_in(tmp_path / "broker" / "worker0.log", ids)
        broker.kill()
        time.sleep(0.5)
        broker.start(broker.address)  # the same address; the tasks finish meanwhile
        with BlockingClient(broker.address, ca=broker.ca, key=broker.key) as client:
            tasks = _wait_states(client, ids)
            after = client.submit("echo", "after")
            [again] = _wait_states(client, [after])
        log = (tmp_path / "broker" / "worker0.log").read_text()
    assert [(t.state, t.attempts) for t in tasks] == [("succeeded", 1)] * 4, log
    assert again.state == "succeeded" and again.result == "after"
    assert "reconnecting in" in log


def _cluster_broker(data: Path, store: str, tls_from: Path | None) -> BrokerProcess:
    if tls_from is not None:  # the brokers of a cluster share one CA
        data.mkdir(mode=0o700)
        shutil.copytree(tls_from / "tls", data / "tls")
    return BrokerProcess(data, "--store", store, "--lease-ttl", "2", "--http", "off").start()


def test_workers_and_producers_fail_over_when_one_of_two_brokers_is_killed(
    tmp_path: Path, pg_url: str
) -> None:
    a = _cluster_broker(tmp_path / "a", pg_url, None)
    b = _cluster_broker(tmp_path / "b", pg_url, tmp_path / "a")
    both = f"{a.address},{b.address}"
    key = a.key
    assert key is not None
    worker_log = tmp_path / "worker.log"
    try:
        with open(worker_log, "ab") as log:
            worker = subprocess.Popen(
                tq_command("worker", "--broker", both, "--ca", str(a.ca), "--key", key, "-c", "4"),
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        a.wait_for_workers()  # on A, the first of its list
        submitted: list[str] = []
        errors: list[BaseException] = []
        halfway = threading.Event()

        def produce() -> None:
            try:
                with BlockingClient(both, ca=a.ca, key=key) as producer:
                    for i in range(300):
                        submitted.append(producer.submit("echo", i))
                        if i == 100:
                            halfway.set()
            except BaseException as exc:
                errors.append(exc)
                halfway.set()

        with BlockingClient(both, ca=a.ca, key=key) as client:
            long = client.submit("sleep", 4)  # outlives a lease: kept by heartbeats to B
            _wait_running(client, [long])
            thread = threading.Thread(target=produce)
            thread.start()
            halfway.wait(60)
            a.kill()  # kill -9 mid-run
            thread.join(120)
            assert not errors, errors
            tasks = _wait_states(client, [long, *submitted], timeout=90)
            total = len(client.list(limit=1000).tasks)
            assert client.address == b.address
        worker.terminate()
        worker.wait(30)
    finally:
        for broker in (a, b):
            broker.close()
        if worker.poll() is None:
            worker.kill()
    text = worker_log.read_text()
    assert len(submitted) == 300 and len(set(submitted)) == 300
    assert total == 301  # every submit stored once: resends were deduplicated
    assert all(t.state == "succeeded" for t in tasks), [(t.id, t.state) for t in tasks]
    assert sorted(t.result for t in tasks[1:]) == list(range(300))
    assert tasks[0].attempts == 1, text  # the lease moved with the worker to broker B
    assert all((t.idempotency_key or "").startswith(AUTO_KEY_PREFIX) for t in tasks)
    assert f"connected to {b.address}" in text
