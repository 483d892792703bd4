"""Task history end to end: a real broker and worker on loopback TLS, the clients, REST,
queue-limited keys, and `tq history` as a process."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tq.core.errors import Forbidden, NotFound
from tq.core.history import details, gaps, who
from tq.testing import BrokerProcess, running_broker, running_worker, tq_command


async def make_key(broker: Any, role: str, **fields: Any) -> str:
    async with broker.client() as admin:
        reply = await admin.request({"t": "keys", "op": "create", "role": role, **fields})
    return str(reply["key"])


@pytest.mark.trio
async def test_history_through_the_client_rest_and_keys(tmp_path: Path) -> None:
    async with running_broker(tmp_path) as broker, broker.client() as admin:
        first = await admin.submit("echo", {"n": 1})
        failing = await admin.submit("fail", {"message": "nope"}, max_retries=0)
        async with running_worker(broker):
            assert (await admin.wait(first, timeout=30)).state.value == "succeeded"
            assert (await admin.wait(failing, timeout=30)).state.value == "dead"
        rows = await admin.history(first)
        assert [r["event"] for r in rows] == ["submitted", "leased", "succeeded"]
        assert rows[0]["actor"].startswith("key:") and rows[0]["n"] == 1
        assert rows[1]["worker"] and isinstance(rows[1]["token"], int)
        assert rows[2]["token"] == rows[1]["token"]
        dead = await admin.history(failing)
        assert [r["event"] for r in dead] == ["submitted", "leased", "dead"]
        assert dead[-1]["error"]["message"]
        await admin.retry(failing)
        retried = (await admin.history(failing))[-1]
        assert (retried["event"], retried["actor"]) == ("retried", rows[0]["actor"])
        with pytest.raises(NotFound):
            await admin.history("no-such-task")
        async with broker.http_client() as http:
            answer = await http.get(f"/api/v1/tasks/{first}/history")
            assert answer.status_code == 200, answer.text
            body = answer.json()
            assert body["task"] == first and body["limit"] == 100
            assert body["history"] == rows
            assert (await http.get("/api/v1/tasks/nope/history")).status_code == 404
        other = await admin.submit("echo", queue="b")
        key = await make_key(broker, "producer", queues=["a"])
        async with broker.client(key=key) as producer:
            mine = await producer.submit("echo", queue="a")
            assert [r["event"] for r in await producer.history(mine)] == ["submitted"]
            with pytest.raises(Forbidden):
                await producer.history(other)


def test_words_for_the_rows() -> None:
    leased = {"n": 2, "event": "leased", "worker": "w1", "token": 42, "actor": None}
    failed = {
        "n": 5,
        "event": "failed",
        "error": {"type": "E", "message": "boom"},
        "run_at": 10.0,
        "worker": "w1",
    }
    assert who(leased) == "worker:w1" and who({"actor": "key:k"}) == "key:k"
    assert details(leased) == "token 42"
    assert details(failed) == "E: boom; retry at 10.000"
    assert [dropped for _, dropped in gaps([{"n": 1}, leased, failed])] == [0, 0, 2, 0]


def test_cli_history_as_a_table_and_json_lines(tmp_path: Path) -> None:
    with BrokerProcess(tmp_path / "broker") as broker:
        with broker.client() as client:
            task_id = client.submit("echo", 1)
            then = client.submit("echo", 2, depends_on=[task_id])
            client.cancel(task_id)

        def tq(*args: str) -> subprocess.CompletedProcess[str]:
            command = tq_command(*args, *broker.client_args())
            return subprocess.run(command, capture_output=True, text=True, timeout=60)

        lines = tq("history", task_id)  # not a terminal: JSON lines
        assert lines.returncode == 0, lines.stderr
        rows = [json.loads(line) for line in lines.stdout.splitlines()]
        assert [(r["n"], r["event"], r["state"]) for r in rows] == [
            (1, "submitted", "pending"),
            (2, "cancelled", "cancelled"),
        ]
        table = tq("history", task_id, "--output", "table")
        assert table.returncode == 0, table.stderr
        assert "submitted" in table.stdout and "cancelled" in table.stdout
        assert "key:" in table.stdout
        after = [json.loads(line) for line in tq("history", then).stdout.splitlines()]
        assert [(r["event"], r["actor"]) for r in after][-1] == (
            "cancelled",
            f"dependency:{task_id}",
        )
        status = tq("status", then, "--json")
        assert status.returncode == 0, status.stderr
        assert json.loads(status.stdout)["depends_on"] == [{"id": task_id, "state": "cancelled"}]
        status = tq("status", task_id, "--json")
        assert json.loads(status.stdout)["dependents"] == [{"id": then, "state": "cancelled"}]
        status = tq("status", task_id, "--output", "table")
        assert "dependents" in status.stdout and then in status.stdout
        missing = tq("history", "no-such-task")
        assert missing.returncode == 3 and "no-such-task" in missing.stderr
