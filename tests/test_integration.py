"""End to end on loopback with TLS: brokers and workers as real processes."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tq.core.errors import TQError
from tq.testing import BrokerProcess

pytestmark = pytest.mark.slow


def _all_tasks(broker: BrokerProcess) -> list:
    tasks, after = [], None
    with broker.client() as client:
        while True:
            page = client.list(limit=1000, after=after)
            tasks += page.tasks
            if page.next is None:
                return tasks
            after = page.next


def _wait_all(broker: BrokerProcess, ids: list[str], timeout: float = 60) -> list:
    with broker.client() as client:
        return [client.wait(i, timeout=timeout) for i in ids]


def test_two_workers_run_2000_tasks_exactly_once(broker_proc: BrokerProcess) -> None:
    for _ in range(2):
        broker_proc.start_worker("--concurrency", "16")
    broker_proc.wait_for_workers(2)  # both must be there to share the work
    with broker_proc.client() as client:
        ids = []
        for start in range(0, 2000, 500):
            ids += client.submit_many(
                [{"type": "echo", "payload": {"n": n}} for n in range(start, start + 500)]
            )
    assert len(set(ids)) == 2000
    done = _wait_all(broker_proc, ids)
    assert all(t.state == "succeeded" for t in done)
    assert [t.result["n"] for t in done] == list(range(2000))
    tasks = _all_tasks(broker_proc)
    assert len(tasks) == 2000
    assert all(t.state == "succeeded" and t.attempts == 1 for t in tasks)
    workers = {t.worker for t in tasks}
    assert len(workers) == 2, "both workers should have taken part"
    with broker_proc.client() as client:
        assert client.stats()["queues"]["default"]["succeeded"] == 2000


def test_kill_9_worker_holding_leases_another_worker_completes(
    broker_proc: BrokerProcess,
) -> None:
    victim = broker_proc.start_worker("--concurrency", "4", "--name", "victim")
    with broker_proc.client() as client:
        ids = client.submit_many([{"type": "sleep", "payload": 1.5} for _ in range(4)])
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if all(client.get(i).state == "running" for i in ids):
                break
            time.sleep(0.05)
        assert all(client.get(i).worker == "victim" for i in ids)
    victim.kill()
    victim.wait(10)
    broker_proc.start_worker("--concurrency", "4", "--name", "rescuer")
    done = _wait_all(broker_proc, ids, timeout=30)
    assert all(t.state == "succeeded" for t in done)
    assert all(t.worker == "rescuer" and t.attempts == 2 for t in done)


def test_kill_9_broker_after_acknowledged_submits_loses_nothing(tmp_path: Path) -> None:
    broker = BrokerProcess(tmp_path / "b").start()
    try:
        with broker.client() as client:
            ids = client.submit_many([{"type": "echo", "payload": i} for i in range(300)])
            ids += [client.submit("echo", {"single": i}) for i in range(50)]
        broker.kill()  # the instant after the last ACK
        broker.start()
        broker.start_worker("--concurrency", "32")
        done = _wait_all(broker, ids)
        assert all(t.state == "succeeded" for t in done)
        assert len(_all_tasks(broker)) == 350
    finally:
        broker.close()


def test_broker_sigterm_exits_zero_and_restart_recovers_running_tasks(tmp_path: Path) -> None:
    broker = BrokerProcess(tmp_path / "b", "--lease-ttl", "1").start()
    try:
        worker = broker.start_worker("--concurrency", "2", "--name", "w1")
        with broker.client() as client:
            ids = client.submit_many([{"type": "sleep", "payload": 30} for _ in range(2)])
            deadline = time.monotonic() + 20
            while not all(client.get(i).state == "running" for i in ids):
                assert time.monotonic() < deadline
                time.sleep(0.05)
        worker.kill()
        assert broker.stop() == 0
        time.sleep(1.2)  # the leases expire while the broker is down
        broker.start()
        with broker.client() as client:
            deadline = time.monotonic() + 10
            while not all(client.get(i).state == "pending" for i in ids):
                assert time.monotonic() < deadline, [client.get(i).state for i in ids]
                time.sleep(0.05)
            assert all(client.get(i).attempts == 1 for i in ids)
    finally:
        broker.close()


def test_worker_sigterm_releases_unfinished_tasks(broker_proc: BrokerProcess) -> None:
    worker = broker_proc.start_worker("--concurrency", "2", "--grace", "0.5")
    with broker_proc.client() as client:
        ids = client.submit_many([{"type": "sleep", "payload": 60} for _ in range(2)])
        deadline = time.monotonic() + 20
        while not all(client.get(i).state == "running" for i in ids):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        worker.terminate()
        assert worker.wait(20) == 0
        tasks = [client.get(i) for i in ids]
    assert all(t.state == "pending" and t.attempts == 0 for t in tasks)


def test_client_errors_are_clear(tmp_path: Path, broker_proc: BrokerProcess) -> None:
    from tq.client import BlockingClient
    from tq.core.errors import ConnectionFailed, TLSFailure

    other = BrokerProcess(tmp_path / "other").start()
    try:
        with pytest.raises(TLSFailure, match="not signed by CA"):
            BlockingClient(broker_proc.address, ca=other.ca)
    finally:
        other.close()
    port = broker_proc.address.rsplit(":", 1)[1]
    broker_proc.stop()
    with pytest.raises(ConnectionFailed, match="cannot connect to the broker") as info:
        BlockingClient(f"127.0.0.1:{port}", ca=broker_proc.ca)
    assert "is `tq broker` (or `tq up`) running there?" in str(info.value)
    assert isinstance(info.value, TQError)
