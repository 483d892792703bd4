"""The operator CLI against a real broker process: every command, every output format.

JSON and YAML outputs are parsed back and checked; the pipe of the issue,
``tq list --state dead --output jsonl | jq -r .id | tq retry -``, runs in a
real shell. One broker (and one worker) serves the whole module.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tq.testing import BrokerProcess, tq_command

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerProcess]:
    with BrokerProcess(tmp_path_factory.mktemp("admin") / "broker", "--lease-ttl", "5") as proc:
        queues = "default,doomed,other,piped,purgeable"  # not "parked", "keep": those wait
        proc.start_worker(
            "--concurrency", "8", "--queues", queues, "--log-format", "json", log_name="worker.log"
        )  # fmt: skip
        proc.wait_for_workers(1)
        yield proc


def tq(broker: BrokerProcess, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        tq_command(*args, *broker.client_args()),
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
    )


def ok(broker: BrokerProcess, *args: str, stdin: str | None = None) -> str:
    out = tq(broker, *args, stdin=stdin)
    assert out.returncode == 0, f"tq {' '.join(args)}: {out.stderr}"
    return str(out.stdout)


def parsed(broker: BrokerProcess, *args: str) -> dict[str, Any]:
    """The command's data in json, yaml and jsonl, parsed back: all three must agree."""
    as_json = json.loads(ok(broker, *args, "--output", "json"))
    as_yaml = yaml.safe_load(ok(broker, *args, "--output", "yaml"))
    lines = [json.loads(line) for line in ok(broker, *args, "--output", "jsonl").splitlines()]
    as_jsonl = lines if isinstance(as_json, list) else lines[0]
    assert _stable(as_yaml) == _stable(as_json) == _stable(as_jsonl)
    assert ok(broker, *args, "--output", "table").strip()
    return {"data": as_json}


def _stable(data: Any) -> Any:
    """Drop what changes between two calls (clocks)."""
    volatile = {"uptime", "heartbeat_age", "last_seen", "latency", "size", "wal", "cpu", "memory"}
    volatile |= {"history"}  # per-minute rows: a minute may turn between two calls
    if isinstance(data, dict):
        return {k: _stable(v) for k, v in data.items() if k not in volatile}
    if isinstance(data, list):
        return [_stable(v) for v in data]
    return data


def wait_state(broker: BrokerProcess, state: str, n: int, seconds: float = 30) -> list[str]:
    deadline = time.monotonic() + seconds
    while True:
        rows = ok(broker, "list", "--state", state, "--output", "jsonl").splitlines()
        if len(rows) >= n or time.monotonic() > deadline:
            return [json.loads(row)["id"] for row in rows]
        time.sleep(0.2)


def test_submit_payload_file_and_wait_on_many(broker: BrokerProcess, tmp_path: Path) -> None:
    payload = tmp_path / "job.json"
    payload.write_text('{"image": "a.png", "sizes": [1, 2]}')
    first = ok(broker, "submit", "echo", "--payload-file", str(payload)).strip()
    second = json.loads(ok(broker, "submit", "echo", "-f", str(payload), "--json"))["id"]
    rows = [json.loads(line) for line in ok(broker, "wait", first, second).splitlines()]
    assert {row["id"] for row in rows} == {first, second}
    assert all(row["state"] == "succeeded" for row in rows)
    assert rows[0]["result"] == {"image": "a.png", "sizes": [1, 2]}
    from_stdin = ok(broker, "wait", "-", stdin=f"{first}\n{second}\n").splitlines()
    assert len(from_stdin) == 2
    assert json.loads(ok(broker, "wait", first)) == {"image": "a.png", "sizes": [1, 2]}


def test_workers_stats_queue_depth_in_every_format(broker: BrokerProcess) -> None:
    workers = parsed(broker, "workers")["data"]
    assert len(workers) == 1 and workers[0]["concurrency"] == 8
    assert {"id", "host", "pid", "queues", "running", "cpu", "memory", "heartbeat_age"} <= set(
        workers[0]
    )
    ok(broker, "submit", "sleep", "--payload", "60", "--queue", "parked", "--priority", "high")
    ok(broker, "submit", "sleep", "--payload", "60", "--queue", "parked", "--priority", "low")
    stats = parsed(broker, "stats")["data"]
    assert stats["queues"]["parked"] == {"pending": 2}
    assert {"throughput", "failure_rate", "total", "queues"} <= set(stats["last_minute"])
    depth = parsed(broker, "queue-depth")["data"]
    parked = next(q for q in depth["queues"] if q["queue"] == "parked")
    assert parked["priorities"] == [
        {"priority": 200, "state": "pending", "count": 1},
        {"priority": 50, "state": "pending", "count": 1},
    ]
    only = json.loads(ok(broker, "queue-depth", "--queue", "parked", "--json"))
    assert [q["queue"] for q in only["queues"]] == ["parked"]
    table = ok(broker, "queue-depth", "--output", "table")
    assert "parked" in table and "█" in table


def test_queue_depth_watch_refreshes(broker: BrokerProcess) -> None:
    command = tq_command("queue-depth", "--watch", "--interval", "0.3", *broker.client_args())
    with subprocess.Popen(command, stdout=subprocess.PIPE, text=True) as proc:
        assert proc.stdout is not None
        lines = [proc.stdout.readline() for _ in range(3)]
        proc.terminate()
    assert all("queues" in json.loads(line) for line in lines)


def test_cluster_status_and_its_exit_status(broker: BrokerProcess, tmp_path: Path) -> None:
    status = parsed(broker, "cluster-status")["data"]
    assert status["healthy"] is True and status["checks"]["store"]["ok"] is True
    assert status["store"]["path"].endswith("tq.db") and status["workers"]["connected"] == 1
    assert status["listen"]["http"] == broker.http
    table = ok(broker, "cluster-status")
    assert "healthy" in table and "tq.db" in table
    gone = subprocess.run(
        tq_command("cluster-status", "--broker", "127.0.0.1:1", "--ca", str(broker.ca)),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert gone.returncode == 4 and "cannot connect" in gone.stderr and not gone.stdout


def test_retry_one_many_and_by_state(broker: BrokerProcess) -> None:
    dead = [
        ok(broker, "submit", "fail", "--max-retries", "0", "--queue", "doomed").strip()
        for _ in range(3)
    ]
    ok(broker, "submit", "fail", "--max-retries", "0", "--queue", "other")
    assert set(dead) <= set(wait_state(broker, "dead", 4))
    one = json.loads(ok(broker, "retry", dead[0], "--json"))
    assert (one["id"], one["state"]) == (dead[0], "pending")
    assert ok(broker, "retry", dead[1], "-o", "table").strip() == f"{dead[1]} pending"
    missing = tq(broker, "retry", "01a21f99-0000-7000-8000-000000000000")
    assert missing.returncode == 3 and "no task" in missing.stderr
    usage = tq(broker, "retry")
    assert usage.returncode == 2 and "--state" in usage.stderr
    wait_state(broker, "dead", 4)
    by_state = yaml.safe_load(ok(broker, "retry", "--state", "dead", "--output", "yaml"))
    assert {row["id"] for row in by_state} >= set(dead)
    assert all(row["state"] == "pending" for row in by_state)
    bad = tq(broker, "retry", "--state", "running")
    assert bad.returncode == 2 and "retry takes" in bad.stderr


def test_the_pipe_from_list_to_retry(broker: BrokerProcess) -> None:
    """tq list --state dead --output jsonl | jq -r .id | tq retry -"""
    ids = [
        ok(broker, "submit", "fail", "--max-retries", "0", "--queue", "piped").strip()
        for _ in range(2)
    ]
    wait_state(broker, "dead", 2)
    jq = shutil.which("jq")
    if jq is None and os.environ.get("CI"):
        pytest.fail("jq is missing: .ci/run installs it")
    pick = (
        "jq -r .id"
        if jq
        else "python3 -c 'import json,sys;[print(json.loads(l)[\"id\"]) for l in sys.stdin]'"
    )
    args = " ".join(shlex.quote(a) for a in broker.client_args())
    tq_ = " ".join(shlex.quote(a) for a in tq_command())
    pipeline = (
        f"{tq_} list --state dead --queue piped --output jsonl {args} | {pick} | "
        f"{tq_} retry - {args}"
    )
    out = subprocess.run(
        ["bash", "-o", "pipefail", "-c", pipeline], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert {row["id"] for row in rows} == set(ids) and not out.stderr
    bad = tq(broker, "retry", "-", stdin=f"{ids[0]}\nnope\n")
    assert bad.returncode == 3 and "nope" in bad.stderr and "1 of 2" in bad.stderr


def test_purge_dry_run_then_purge(broker: BrokerProcess) -> None:
    ids = [ok(broker, "submit", "echo", "--queue", "purgeable").strip() for _ in range(3)]
    ok(broker, "wait", *ids)
    ok(broker, "submit", "sleep", "--payload", "60", "--queue", "keep")  # newest: never purged
    before = json.loads(ok(broker, "list", "--state", "succeeded", "--json"))
    assert len(before) >= 3
    dry = json.loads(
        ok(broker, "purge", "--state", "succeeded", "--older-than", "0s", "--dry-run", "--json")
    )
    assert dry == {"purged": 0, "matched": len(before), "dry_run": True}
    too_new = yaml.safe_load(
        ok(broker, "purge", "--state", "succeeded", "--older-than", "7d", "--output", "yaml")
    )
    assert too_new == {"purged": 0, "matched": 0, "dry_run": False}
    done = ok(broker, "purge", "-s", "succeeded", "--older-than", "0", "-s", "dead", "-o", "table")
    assert done.startswith("purged ")
    assert json.loads(ok(broker, "list", "--state", "succeeded", "--json")) == []
    missing = tq(broker, "status", ids[0])
    assert missing.returncode == 3
    for bad_args, words in (
        (("--state", "pending", "--older-than", "1d"), "only finished"),
        (("--state", "succeeded", "--older-than", "soon"), "not a duration"),
    ):
        bad = tq(broker, "purge", *bad_args)
        assert bad.returncode == 2 and words in bad.stderr and not bad.stdout


def test_list_status_in_yaml(broker: BrokerProcess) -> None:
    task_id = ok(broker, "submit", "echo", "--payload", '{"y": [1, "two"]}').strip()
    ok(broker, "wait", task_id)
    task = yaml.safe_load(ok(broker, "status", task_id, "--output", "yaml"))
    assert task["id"] == task_id and task["result"] == {"y": [1, "two"]}
    listed = yaml.safe_load(ok(broker, "list", "--output", "yaml", "--limit", "10000"))
    assert task_id in {t["id"] for t in listed}


def test_worker_logs_in_json(broker: BrokerProcess) -> None:
    lines = (broker.data / "worker.log").read_text().splitlines()
    records = [json.loads(line) for line in lines if line.startswith("{")]
    assert records and all({"ts", "level", "logger", "message"} <= set(r) for r in records)
