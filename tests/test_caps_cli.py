"""Caps at the edges: `tq cap` and `tq explain` against a real broker process and worker
on loopback TLS (a real SQLite file), and the explain reasons for caps as a pure
function."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tq.broker.explain import explain
from tq.core.states import State
from tq.core.task import Task
from tq.store.claimplan import Cap
from tq.testing import BrokerProcess, tq_command

NOW = 1_800_000_000.0


def tq(
    broker: BrokerProcess, *args: str, key: str | None = None
) -> subprocess.CompletedProcess[str]:
    creds = broker.client_args()
    if key is not None:
        creds = [*creds[: creds.index("--key")], "--key", key]
    env = {**os.environ, "COLUMNS": "160"}  # tables as wide as a terminal might be
    return subprocess.run(
        tq_command(*args, *creds), capture_output=True, text=True, timeout=60, env=env
    )


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[BrokerProcess]:
    with BrokerProcess(tmp_path / "broker") as proc:
        yield proc


def until(check: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def _state(broker: BrokerProcess, task_id: str) -> str:
    with broker.client() as client:
        return str(client.get(task_id).state)


def test_cap_commands_and_explain_against_a_broker(broker: BrokerProcess) -> None:
    made = tq(broker, "cap", "set", "type", "sleep", "--concurrency", "1")
    assert made.returncode == 0, made.stderr
    assert made.stdout.strip() == "type sleep capped: at most 1 running"
    rated = tq(broker, "cap", "set", "queue", "slowq", "--rate", "1/h", "--burst", "1", "--json")
    assert rated.returncode == 0, rated.stderr
    assert json.loads(rated.stdout) == {
        "kind": "queue",
        "name": "slowq",
        "concurrency": None,
        "rate": 1 / 3600,
        "burst": 1.0,
    }
    shown = tq(broker, "cap", "set", "queue", "shown", "-c", "3", "-r", "10/s")
    assert shown.stdout.strip() == (
        "queue shown capped: at most 3 running, at most 10/s started (bursts of 10)"
    )

    broker.start_worker("--queues", "default,slowq", "--concurrency", "4")
    broker.wait_for_workers(1)
    with broker.client() as client:
        first, second = (client.submit("sleep", 60) for _ in range(2))
        echo_first, echo_second = (client.submit("echo", i, queue="slowq") for i in range(2))
        assert client.wait(echo_first, timeout=30).state == "succeeded"
    until(lambda: _state(broker, first) == "running")
    time.sleep(0.5)  # the worker has free slots: only the cap keeps `second` pending
    assert _state(broker, second) == "pending"
    assert _state(broker, echo_second) == "pending"

    said = tq(broker, "explain", second)
    assert said.returncode == 0, said.stderr
    assert "concurrency cap of type 'sleep' is full: 1 running of 1 at most" in said.stdout
    assert "a free worker claims it next" not in said.stdout
    answer = json.loads(tq(broker, "explain", echo_second, "--json").stdout)
    [rate] = [r for r in answer["reasons"] if r["code"] == "rate_capped"]
    assert (rate["kind"], rate["name"], rate["rate"]) == ("queue", "slowq", 1 / 3600)
    assert 3000 < rate["due"] - time.time() <= 3600
    assert (
        "rate cap of queue 'slowq' (1/h) has no token left: the next one is due in"
        in (rate["message"])
    )

    listed = json.loads(tq(broker, "cap", "list", "--output", "json").stdout)
    assert [(c["kind"], c["name"], c["running"]) for c in listed] == [
        ("queue", "shown", 0),
        ("queue", "slowq", 0),
        ("type", "sleep", 1),
    ]
    table = tq(broker, "cap", "list", "--output", "table")
    assert "sleep" in table.stdout and "1/h" in table.stdout, table.stdout
    queues = {q["queue"]: q for q in json.loads(tq(broker, "queue", "list", "--json").stdout)}
    assert queues["shown"]["cap"] == {"concurrency": 3, "rate": 10.0, "burst": 10.0}  # empty
    assert queues["slowq"]["cap"]["rate"] == 1 / 3600 and queues["default"]["cap"] is None
    shown_table = tq(broker, "queue", "list", "--output", "table").stdout
    assert "3 at once, 10/s" in shown_table and "1/h" in shown_table, shown_table
    stats = json.loads(tq(broker, "stats", "--json").stdout)
    assert [(c["kind"], c["name"]) for c in stats["caps"]] == [
        ("queue", "shown"),
        ("queue", "slowq"),
        ("type", "sleep"),
    ]
    caption = " ".join(tq(broker, "stats", "-o", "table").stdout.split())
    assert "caps: queue shown 3 at once, 10/s; queue slowq 1/h; type sleep 1 at once" in caption

    lifted = tq(broker, "cap", "remove", "type", "sleep")
    assert lifted.stdout.strip() == "type sleep cap removed", lifted.stderr
    until(lambda: _state(broker, second) == "running")  # the worker took it at once
    again = tq(broker, "cap", "remove", "type", "sleep", "--json")
    assert again.returncode == 0
    assert json.loads(again.stdout) == {"kind": "type", "name": "sleep", "removed": False}


def test_bad_cap_commands_are_clear(broker: BrokerProcess) -> None:
    cases = [
        (("cap", "set", "queue", "q"), 2, "needs a concurrency, a rate or both"),
        (("cap", "set", "worker", "q", "-c", "1"), 2, "'worker' is not one of"),
        (
            ("cap", "set", "queue", "q", "--rate", "fast"),
            2,
            "field 'rate' must be a number of tasks per",
        ),
        (("cap", "set", "queue", "q", "-c", "0"), 2, "greater than or"),
        (("cap", "set", "queue", "q", "-c", "1", "--burst", "3"), 2, "field 'burst' needs a rate"),
        (("cap", "set", "queue", "a b", "-c", "1"), 2, "spaces or commas"),
    ]
    for args, status, words in cases:
        bad = tq(broker, *args)
        assert bad.returncode == status and words in bad.stderr, (args, bad)
        assert "Traceback" not in bad.stderr
    made = tq(broker, "keys", "create", "--role", "producer", "--name", "app", "--output", "json")
    producer = json.loads(made.stdout)["key"]
    refused = tq(broker, "cap", "set", "queue", "q", "-c", "1", key=producer)
    assert refused.returncode == 7 and "Traceback" not in refused.stderr, refused
    reader_list = tq(broker, "cap", "list", "--json", key=producer)
    assert reader_list.returncode == 0 and json.loads(reader_list.stdout) == []


def test_caps_over_rest(broker: BrokerProcess) -> None:
    api = "/api/v1/caps"
    with broker.http_client() as http:
        made = http.put(f"{api}/queue/rest-q", json={"concurrency": 2, "rate": "30/m"})
        assert made.status_code == 200, made.text
        assert made.json() == {
            "cap": {"kind": "queue", "name": "rest-q", "concurrency": 2, "rate": 0.5, "burst": 1.0}
        }
        assert http.put(f"{api}/type/resize", json={"rate": 5, "burst": 2}).status_code == 200
        listed = http.get(api).json()["caps"]
        assert [(c["kind"], c["name"], c["running"]) for c in listed] == [
            ("queue", "rest-q", 0),
            ("type", "resize", 0),
        ]
        queues = {q["queue"]: q for q in http.get("/api/v1/queues").json()["queues"]}
        assert queues["rest-q"]["cap"] == {"concurrency": 2, "rate": 0.5, "burst": 1.0}
        assert [c["name"] for c in http.get("/api/v1/stats").json()["caps"]] == [
            "rest-q",
            "resize",
        ]
        metrics = http.get("/metrics").text
        assert 'tq_queue_cap_concurrency{queue="rest-q"} 2.0' in metrics, metrics
        for path, body, words in [
            (f"{api}/worker/x", {"concurrency": 1}, "field 'kind' must be one of queue, type"),
            (f"{api}/queue/x", {}, "needs a concurrency, a rate or both"),
            (f"{api}/queue/x", {"concurrency": True}, "integer 1..1000000, got bool True"),
            (f"{api}/queue/x", {"rate": "soon"}, "field 'rate' must be a number of tasks"),
            (f"{api}/queue/a%20b", {"concurrency": 1}, "spaces or commas"),
        ]:
            bad = http.put(path, json=body)
            assert bad.status_code == 400 and words in bad.json()["detail"], (path, bad.text)
        assert http.put(f"{api}/queue/x", content=b"[1]").status_code in (400, 415)
        gone = http.delete(f"{api}/queue/rest-q")
        assert gone.json() == {"kind": "queue", "name": "rest-q", "removed": True}
        assert http.delete(f"{api}/queue/rest-q").json()["removed"] is False
        entries = http.get("/api/v1/audit").json()["entries"]
    audit = [(e["action"], e["target"]) for e in entries if e["action"].startswith("cap.")]
    assert audit == [
        ("cap.remove", "queue:rest-q"),
        ("cap.set", "type:resize"),
        ("cap.set", "queue:rest-q"),
    ]
    made_key = tq(broker, "keys", "create", "--role", "producer", "--name", "p", "--json")
    producer = json.loads(made_key.stdout)["key"]
    with broker.http_client() as http:
        headers = {"Authorization": f"Bearer {producer}"}
        refused = http.put(f"{api}/queue/q", json={"concurrency": 1}, headers=headers)
        assert refused.status_code == 403, refused.text
        assert http.get(api, headers=headers).status_code == 200


def _task(**fields: Any) -> Task:
    base: dict[str, Any] = {
        "id": "t1",
        "type": "resize",
        "queue": "images",
        "payload": None,
        "priority": 100,
        "state": State("pending"),
        "attempts": 0,
        "max_retries": 3,
        "timeout": 60.0,
        "retry_base": 1.0,
        "retry_cap": 60.0,
        "created_at": NOW - 100,
    }
    return Task(**{**base, **fields})


def test_explain_names_a_full_cap_and_an_empty_bucket() -> None:
    full = Cap("type", "resize", concurrency=2)
    roomy = Cap("queue", "images", concurrency=5)
    empty = Cap("queue", "images", rate=0.5, burst=1.0, tokens=0.25, refilled_at=NOW - 0.5)
    answer = explain(_task(), (0, 0), 10_000, [], NOW, 30, caps=[(full, 2), (roomy, 2), (empty, 0)])
    reasons = {r["code"]: r for r in answer.reasons}
    assert [r["code"] for r in answer.reasons] == ["capped", "rate_capped", "no_worker"]
    assert reasons["capped"]["message"] == (
        "concurrency cap of type 'resize' is full: 2 running of 2 at most; "
        "it is claimed when one of them ends"
    )
    assert (reasons["capped"]["running"], reasons["capped"]["concurrency"]) == (2, 2)
    # 0.25 + 0.5 * 0.5 = 0.5 tokens now: a whole one in 1 s at 0.5/s
    assert reasons["rate_capped"]["due"] == pytest.approx(NOW + 1.0)
    assert (
        "(30/m) has no token left: the next one is due in 1s" in reasons["rate_capped"]["message"]
    )
    full_bucket = Cap("queue", "images", rate=0.5, burst=1.0, tokens=1.0, refilled_at=NOW)
    free = explain(_task(), (0, 0), 10_000, [], NOW, 30, caps=[(full_bucket, 0), (roomy, 4)])
    assert [r["code"] for r in free.reasons] == ["no_worker"]
