"""`tq explain`: why a task is not running (tq/broker/explain.py, query explain).

The reasons are a pure function of the task, the count ahead of it and the
workers, tested directly; the whole path (store count, wire query, REST route,
CLI) against a real broker process on loopback TLS."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tq.broker.explain import explain
from tq.broker.registry import WorkerInfo
from tq.core.states import State
from tq.core.task import Task, TaskError
from tq.protocol.answers import Explanation
from tq.testing import BrokerProcess, tq_command

NOW = 1_800_000_000.0


def task(state: str = "pending", **fields: Any) -> Task:
    base: dict[str, Any] = {
        "id": "t1",
        "type": "resize",
        "queue": "images",
        "payload": None,
        "priority": 100,
        "state": State(state),
        "attempts": 0,
        "max_retries": 3,
        "timeout": 60.0,
        "retry_base": 1.0,
        "retry_cap": 60.0,
        "created_at": NOW - 100,
    }
    return Task(**{**base, **fields})


def worker(wid: str = "w1", **fields: Any) -> WorkerInfo:
    base: dict[str, Any] = {
        "id": wid,
        "name": wid,
        "host": "box",
        "queues": ("images",),
        "concurrency": 4,
        "connections": 1,
        "last_seen": NOW - 1,
    }
    return WorkerInfo(**{**base, **fields})


def codes(answer: Explanation | dict[str, Any]) -> list[str]:
    """The reasons' codes of an explanation (``explain``'s, or an answer as plain data)."""
    reasons = answer.reasons if isinstance(answer, Explanation) else answer["reasons"]
    return [reason["code"] for reason in reasons]


def test_a_pending_task_with_no_worker_for_its_queue() -> None:
    answer = explain(task(), (0, 0), 10_000, [worker(queues=("mail",))], NOW, 30)
    assert codes(answer) == ["no_worker"]
    assert "no connected worker takes queue 'images'" in answer.reasons[0]["message"]
    disconnected = worker(connections=0)
    assert codes(explain(task(), (0, 0), 10_000, [disconnected], NOW, 30)) == ["no_worker"]


def test_workers_that_take_the_queue_but_not_the_type() -> None:
    answer = explain(task(), (0, 0), 10_000, [worker(types=("thumbnail",))], NOW, 30)
    assert codes(answer) == ["no_handler"]
    assert answer.reasons[0]["type"] == "resize"


def test_busy_workers_and_tasks_ahead() -> None:
    busy = [worker(running=4), worker("w2", running=2, concurrency=2)]
    answer = explain(task(), (3, 2), 10_000, busy, NOW, 30)
    assert codes(answer) == ["workers_busy", "behind"]
    assert answer.reasons[0]["running"] == 6 and answer.reasons[0]["slots"] == 6
    behind = answer.reasons[1]
    assert (behind["higher"], behind["older"], behind["at_least"]) == (3, 2, False)
    assert "behind 3 pending task(s) of higher priority and 2 older" in behind["message"]
    capped = explain(task(), (10_000, 0), 10_000, [worker()], NOW, 30).reasons[0]
    assert capped["at_least"] is True and "at least 10000" in capped["message"]


def test_a_task_with_nothing_ahead_is_next() -> None:
    assert codes(explain(task(), (0, 0), 10_000, [worker()], NOW, 30)) == ["next"]


def test_running_tasks_name_their_worker_and_a_silent_one() -> None:
    running = task("running", worker="w1", started_at=NOW - 30, attempts=1)
    fresh = explain(running, None, 10_000, [worker()], NOW, 30)
    assert codes(fresh) == ["running"]
    assert "leased to worker w1 on box since 30s ago" in fresh.reasons[0]["message"]
    silent = explain(running, None, 10_000, [worker(last_seen=NOW - 20)], NOW, 30)
    assert codes(silent) == ["running", "worker_silent"]
    unknown = explain(running, None, 10_000, [], NOW, 30)
    assert codes(unknown) == ["running", "worker_silent"]
    assert "not known to this broker" in unknown.reasons[1]["message"]


def test_waiting_states_say_when() -> None:
    later = explain(task("scheduled", run_at=NOW + 120), None, 10_000, [], NOW, 30)
    assert codes(later) == ["scheduled"] and "in 2m" in later.reasons[0]["message"]
    failed = task("failed", run_at=NOW + 5, attempts=2, error=TaskError("Timeout", "slow"))
    retry = explain(failed, None, 10_000, [], NOW, 30).reasons[0]
    assert retry["code"] == "retry_due" and retry["attempts"] == 2
    assert retry["message"] == "attempt 2 failed (Timeout: slow); it is retried in 5s"
    dead = task("dead", finished_at=NOW - 7200, attempts=4, error=TaskError("Boom", "x"))
    gone = explain(dead, None, 10_000, [], NOW, 30).reasons[0]
    assert (
        gone["code"] == "finished" and "ended dead 2.0h ago after 4 attempt(s)" in gone["message"]
    )


# -- the whole path ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerProcess]:
    with BrokerProcess(tmp_path_factory.mktemp("explain") / "broker") as proc:
        yield proc


def cli(broker: BrokerProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        tq_command("explain", *args, *broker.client_args()),
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_explain_over_the_wire_the_cli_and_rest(broker: BrokerProcess) -> None:
    with broker.client() as client:
        for _ in range(2):
            client.submit("resize", {}, queue="explain", priority=200)
        mine = client.submit("resize", {}, queue="explain")
        answer = client.explain(mine)
    assert answer["task"] == mine and answer["state"] == "pending"
    assert codes(answer) == ["no_worker", "behind"]
    assert answer["reasons"][1]["higher"] == 2

    words = cli(broker, mine)
    assert words.returncode == 0, words.stderr
    assert words.stdout.splitlines()[0] == f"task {mine} is pending"
    assert "no connected worker takes queue 'explain'" in words.stdout
    as_json = cli(broker, mine, "--json")
    assert json.loads(as_json.stdout)["reasons"][1]["code"] == "behind"

    with broker.http_client() as http:
        rest = http.get(f"/api/v1/tasks/{mine}/explain")
        missing = http.get("/api/v1/tasks/nope/explain")
    assert rest.status_code == 200 and codes(rest.json()) == ["no_worker", "behind"]
    assert missing.status_code == 404

    unknown = cli(broker, "no-such-task")
    assert unknown.returncode == 3 and "no task with id no-such-task" in unknown.stderr


def test_explain_follows_a_task_to_its_end(broker: BrokerProcess, tmp_path: Path) -> None:
    with broker.client() as client:
        task_id = client.submit("fail", {}, queue="ends", max_retries=0)
        broker.start_worker("--queues", "ends")
        client.wait(task_id, timeout=60)
        answer = client.explain(task_id)
    assert answer["state"] == "dead" and codes(answer) == ["finished"]
