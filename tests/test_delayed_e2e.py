"""Delayed tasks end to end: a real broker process (TLS, SQLite file), the CLI, the
blocking client, REST, a worker; kill -9 of the broker while tasks wait."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from tq.testing import BrokerProcess, tq_command

pytestmark = pytest.mark.slow

DELAY = 8.0  # seconds: long enough for a restart in between, short for a test


def tq(broker: BrokerProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        tq_command(*args, *broker.client_args()), capture_output=True, text=True, timeout=60
    )


def test_delayed_tasks_survive_kill_9_and_never_run_early(tmp_path: Path) -> None:
    broker = BrokerProcess(tmp_path / "b", "--lease-ttl", "2").start()
    try:
        sent = time.time()
        cli = tq(broker, "submit", "echo", "--delay", f"{DELAY:g}s", "--payload", '"cli"')
        assert cli.returncode == 0, cli.stderr
        cli_id = cli.stdout.strip()
        with broker.client() as client:
            ids = client.submit_many(
                [
                    {"type": "echo", "payload": "delay", "delay": DELAY},
                    {"type": "echo", "payload": "run_at", "run_at": sent + DELAY},
                    {"type": "echo", "payload": "cancelled", "delay": DELAY},
                ]
            )
            client.cancel(ids[2])
        with broker.http_client() as http:
            answer = http.post("/api/v1/tasks", json={"type": "echo", "delay": DELAY})
            assert answer.status_code == 201, answer.text
            rest_id = answer.json()["id"]
            assert http.get(f"/api/v1/tasks/{rest_id}").json()["state"] == "scheduled"
        waiting = [cli_id, ids[0], ids[1], rest_id]
        listed = tq(broker, "list", "--state", "scheduled", "--wide", "--output", "table")
        assert listed.returncode == 0, listed.stderr
        assert "due" in listed.stdout and all(i in listed.stdout for i in waiting)
        explained = tq(broker, "explain", ids[0])
        assert "scheduled: it becomes pending" in explained.stdout, explained.stdout
        early = broker.start_worker("--concurrency", "4")  # would take them if it could
        broker.wait_for_workers(1)
        time.sleep(0.5)
        with broker.client() as client:
            states = [client.get(i).state for i in waiting]
        if time.time() < sent + DELAY - 0.5:  # a loaded machine may take longer to get here
            assert states == ["scheduled"] * len(waiting), states
        broker.kill()  # kill -9, tasks still waiting
        early.kill()
        early.wait(10)
        broker.start()  # on a new port: a new worker
        broker.start_worker("--concurrency", "4")
        with broker.client() as client:
            done = [client.wait(i, timeout=60) for i in waiting]
            assert all(t.state == "succeeded" for t in done), [t.state for t in done]
            for t in done:  # never started before its due time
                assert t.run_at is not None and t.started_at is not None
                assert t.started_at >= t.run_at, (t.id, t.started_at, t.run_at)
                assert t.started_at >= sent + DELAY - 0.001
            assert client.get(ids[2]).state == "cancelled"
            assert client.get(ids[2]).started_at is None
    finally:
        broker.close()


def test_bad_delays_are_refused_with_the_reason(tmp_path: Path) -> None:
    broker = BrokerProcess(tmp_path / "b").start()
    try:
        naive = tq(broker, "submit", "echo", "--at", "2026-12-01T09:00:00")
        assert naive.returncode != 0 and "--at: time '2026-12-01T09:00:00' has no zone" in (
            naive.stderr
        ), naive.stderr
        bad = tq(broker, "submit", "echo", "--delay", "soon")
        assert bad.returncode != 0 and "--delay: 'soon' is not a duration" in bad.stderr
        far = tq(broker, "submit", "echo", "--at", "2999-01-01T00:00:00Z")
        assert far.returncode != 0 and "at most 10 years" in far.stderr, far.stderr
        with broker.http_client() as http:
            answer = http.post("/api/v1/tasks", json={"type": "echo", "delay": -1})
            assert answer.status_code == 400 and "delay must be" in answer.text
    finally:
        broker.close()
