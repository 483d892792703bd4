"""Queue pause and resume (`tq queue`, the `queue` request, REST): a paused queue
accepts submits and hands nothing out, across a broker restart, and is shown
wherever queues are. A real broker process and a real worker on loopback TLS."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tq.core.errors import Forbidden
from tq.testing import BrokerProcess, tq_command


def tq(broker: BrokerProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        tq_command(*args, *broker.client_args()), capture_output=True, text=True, timeout=60
    )


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[BrokerProcess]:
    with BrokerProcess(tmp_path / "broker") as proc:
        yield proc


def _state(broker: BrokerProcess, task_id: str) -> str:
    with broker.client() as client:
        return str(client.get(task_id).state)


def test_a_paused_queue_accepts_submits_and_hands_nothing_out(broker: BrokerProcess) -> None:
    paused = tq(broker, "queue", "pause", "work")
    assert paused.returncode == 0, paused.stderr
    assert paused.stdout.strip() == "queue work paused"
    again = tq(broker, "queue", "pause", "work", "--json")
    assert json.loads(again.stdout) == {"queue": "work", "paused": True, "changed": False}

    broker.start_worker("--queues", "work,other")
    broker.wait_for_workers(1)
    with broker.client() as client:
        held = client.submit("echo", {"n": 1}, queue="work")  # accepted while paused
        free = client.submit("echo", {"n": 2}, queue="other")
        assert client.wait(free, timeout=30).state == "succeeded"  # the worker is working
        explained = client.explain(held)
        depth = {q["queue"]: q for q in client.queue_depth()["queues"]}
        stats = client.stats()
    assert _state(broker, held) == "pending"
    assert explained["reasons"][0]["code"] == "paused"
    assert depth["work"]["paused"] is True and depth["work"]["states"] == {"pending": 1}
    assert stats["paused"] == ["work"]
    listing = tq(broker, "queue", "list", "--output", "json")
    assert {row["queue"]: row["paused"] for row in json.loads(listing.stdout)}["work"] is True

    with broker.http_client() as http:
        metrics = http.get("/metrics").text
    assert 'tq_queue_paused{queue="work"} 1.0' in metrics

    resumed = tq(broker, "queue", "resume", "work")
    assert resumed.stdout.strip() == "queue work resumed", resumed.stderr
    with broker.client() as client:
        assert client.wait(held, timeout=30).state == "succeeded"


def test_a_pause_survives_a_broker_restart(broker: BrokerProcess) -> None:
    with broker.client() as client:
        assert client.pause_queue("sleepy")["changed"] is True
        task_id = client.submit("echo", {}, queue="sleepy")
    address = broker.address
    assert broker.stop() == 0
    broker.start(listen=address)
    broker.start_worker("--queues", "sleepy")
    broker.wait_for_workers(1)
    with broker.client() as client:
        assert client.stats()["paused"] == ["sleepy"]
        time.sleep(1.5)  # the worker's claims have come and gone: nothing was handed out
        assert client.get(task_id).state == "pending"
        assert client.resume_queue("sleepy") == {
            "queue": "sleepy",
            "paused": False,
            "changed": True,
        }
        assert client.wait(task_id, timeout=30).state == "succeeded"


def test_pause_over_rest_and_who_may_pause(broker: BrokerProcess) -> None:
    with broker.http_client() as http:
        answer = http.post("/api/v1/queues/rest-q/pause")
        assert answer.status_code == 200, answer.text
        assert answer.json() == {"queue": "rest-q", "paused": True, "changed": True}
        queues = {q["queue"]: q for q in http.get("/api/v1/queues").json()["queues"]}
        assert queues["rest-q"]["paused"] is True and queues["rest-q"]["total"] == 0
        bad = http.post("/api/v1/queues/a%20b/pause")
        assert bad.status_code == 400 and "spaces or commas" in bad.text
        assert http.post("/api/v1/queues/rest-q/resume").json()["changed"] is True
    made = tq(broker, "keys", "create", "--role", "producer", "--name", "app", "--output", "json")
    assert made.returncode == 0, made.stderr
    secret = json.loads(made.stdout)["key"]
    from tq.client import BlockingClient

    with BlockingClient(broker.address, ca=broker.ca, key=secret) as producer:
        with pytest.raises(Forbidden):
            producer.pause_queue("rest-q")
    with broker.http_client() as http:
        entries = http.get("/api/v1/audit").json()["entries"]
    audit = [entry for entry in entries if entry["action"].startswith("queue.")]
    assert [(entry["action"], entry["target"]) for entry in audit] == [
        ("queue.resume", "rest-q"),
        ("queue.pause", "rest-q"),
    ]


def test_bad_queue_commands_are_clear(broker: BrokerProcess) -> None:
    bad = tq(broker, "queue", "pause", "has space")
    assert bad.returncode == 2 and "must not contain spaces or commas" in bad.stderr, bad
    assert "Traceback" not in bad.stderr
