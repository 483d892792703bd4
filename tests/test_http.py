"""The REST API against a real broker on loopback (TLS, API keys), with httpx.

In-process brokers (tq.testing.running_broker) for the endpoint tests; the
schemathesis run uses a broker process, as a client in another program would.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tq.testing import BrokerProcess, running_broker

API = "/api/v1"
PROBLEM = "application/problem+json"


def problem(response: Any, status: int, code: str) -> dict[str, Any]:
    """The response is an RFC 9457 problem document with this status and tq code."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == PROBLEM
    body: dict[str, Any] = response.json()
    assert body["status"] == status and body["code"] == code
    assert body["type"] == f"urn:tq:problem:{code}" and body["title"] and body["detail"]
    return body


@pytest.mark.trio
async def test_task_lifecycle_over_rest(tmp_path: Path) -> None:
    async with running_broker(tmp_path) as broker, broker.http_client() as http:
        one = await http.post(f"{API}/tasks", json={"type": "sleep", "payload": 30})
        assert one.status_code == 201, one.text
        task_id = one.json()["id"]
        assert one.headers["location"] == f"{API}/tasks/{task_id}"
        many = await http.post(
            f"{API}/tasks",
            json=[{"type": "echo", "queue": "q2", "priority": "high"}, {"type": "echo"}],
        )
        assert many.status_code == 201 and [t["created"] for t in many.json()["tasks"]] == [1, 1]
        again = await http.post(f"{API}/tasks", json={"type": "echo", "idempotency_key": "k"})
        same = await http.post(f"{API}/tasks", json={"type": "echo", "idempotency_key": "k"})
        assert (again.status_code, same.status_code) == (201, 200)
        assert same.json()["id"] == again.json()["id"] and same.json()["created"] is False
        # no worker is connected here: the broker says so, and stores the task anyway
        assert "no connected worker handles task type 'echo'" in same.json()["warning"]

        task = (await http.get(f"{API}/tasks/{task_id}")).json()
        assert (task["type"], task["state"], task["payload"]) == ("sleep", "pending", 30)
        page = await http.get(f"{API}/tasks", params={"queue": "q2"})
        assert [t["priority"] for t in page.json()["tasks"]] == [200]
        assert page.json()["next_cursor"] is None
        ids: list[str] = []
        cursor = None
        while True:
            params: dict[str, Any] = {"limit": 2, **({"cursor": cursor} if cursor else {})}
            body = (await http.get(f"{API}/tasks", params=params)).json()
            ids += [t["id"] for t in body["tasks"]]
            cursor = body["next_cursor"]
            if cursor is None:
                break
        assert len(ids) == 4 and ids[0] == task_id

        cancelled = await http.delete(f"{API}/tasks/{task_id}")
        assert cancelled.status_code == 200 and cancelled.json()["state"] == "cancelled"
        problem(await http.delete(f"{API}/tasks/{task_id}"), 409, "invalid_transition")
        retried = await http.post(f"{API}/tasks/{task_id}/retry")
        assert retried.status_code == 200 and retried.json()["state"] == "pending"
        problem(await http.post(f"{API}/tasks/{task_id}/retry"), 409, "invalid_transition")


@pytest.mark.trio
async def test_bad_ids_filters_and_bodies_get_problem_documents(tmp_path: Path) -> None:
    missing = "01a21f99-0000-7000-8000-000000000000"
    async with running_broker(tmp_path) as broker, broker.http_client() as http:
        # bad ids
        problem(await http.get(f"{API}/tasks/{missing}"), 404, "not_found")
        problem(await http.get(f"{API}/tasks/not-an-id"), 404, "not_found")
        problem(await http.delete(f"{API}/tasks/{missing}"), 404, "not_found")
        problem(await http.post(f"{API}/tasks/{missing}/retry"), 404, "not_found")
        # bad filters
        for params in (
            {"state": "zombie"},
            {"limit": "0"},
            {"limit": "10001"},
            {"limit": "many"},
            {"cursor": "not-a-task"},
        ):
            body = problem(await http.get(f"{API}/tasks", params=params), 400, "invalid")
            assert body["instance"] == f"{API}/tasks"
        # bad bodies
        post = f"{API}/tasks"
        bad_json = await http.post(
            post, content=b"{nope", headers={"content-type": "application/json"}
        )
        assert "not valid JSON" in problem(bad_json, 400, "invalid")["detail"]
        problem(await http.post(post, content=b"type=echo"), 415, "unsupported_media_type")
        unknown = problem(await http.post(post, json={"type": "echo", "colour": 1}), 400, "invalid")
        assert "colour" in unknown["detail"]
        problem(await http.post(post, json={"type": "echo", "priority": "urgent"}), 400, "invalid")
        for huge in ({"max_retries": 2**63}, {"timeout": 10**400}, {"payload": 10**30}):
            problem(await http.post(post, json={"type": "echo", **huge}), 400, "invalid")
        problem(await http.post(post, json=[]), 400, "invalid")
        problem(await http.post(post, json="echo"), 400, "invalid")
        indexed = problem(await http.post(post, json=[{"type": "a"}, {"queue": 1}]), 400, "invalid")
        assert indexed["detail"].startswith("task 1:")
        too_big = {"type": "echo", "payload": "x" * (11 * 1024 * 1024)}
        problem(await http.post(post, json=too_big), 413, "payload_too_large")
        # routes and methods
        problem(await http.get("/api/v2/tasks"), 404, "not_found")
        wrong = await http.patch(f"{API}/stats")
        problem(wrong, 405, "method_not_allowed")
        assert "GET" in wrong.headers["allow"]
    assert not list(tmp_path.glob("**/*.core"))


@pytest.mark.trio
async def test_bearer_keys_and_roles(tmp_path: Path) -> None:
    async with running_broker(tmp_path) as broker:
        async with broker.client() as admin:
            reader = (await admin.request({"t": "keys", "op": "create", "role": "reader"}))["key"]
        async with broker.http_client(headers={"Authorization": ""}) as anonymous:
            body = problem(await anonymous.get(f"{API}/stats"), 401, "unauthorized")
            assert "API key" in body["detail"]
            assert (await anonymous.get("/health")).status_code == 200  # probes need no key
            assert (await anonymous.get(f"{API}/openapi.json")).status_code == 200
        async with broker.http_client(headers={"Authorization": "Basic eDp5"}) as basic:
            problem(await basic.get(f"{API}/stats"), 401, "unauthorized")
        async with broker.http_client(headers={"Authorization": f"Bearer {reader}"}) as http:
            assert (await http.get(f"{API}/stats")).status_code == 200
            problem(await http.post(f"{API}/tasks", json={"type": "echo"}), 403, "forbidden")
        async with broker.http_client(headers={"Authorization": "Bearer tq_00_x"}) as bad:
            response = await bad.get(f"{API}/stats")
            problem(response, 401, "unauthorized")
            assert response.headers["www-authenticate"].startswith("Bearer")


@pytest.mark.trio
async def test_health_ready_stats_workers_queues_cluster(tmp_path: Path) -> None:
    async with running_broker(tmp_path) as broker, broker.http_client() as http:
        assert broker.info.http is not None and broker.info.http.startswith("https://127.0.0.1:")
        async with broker.client(kind="worker") as worker:  # holds two leases, runs nothing
            await http.post(f"{API}/tasks", json=[{"type": "sleep", "payload": 30}] * 3)
            claim = {"t": "claim", "n": 2, "queues": ["default"], "wait": 1.0}
            assert len((await worker.request(claim))["tasks"]) == 2
            assert (await http.get("/health")).json()["status"] == "ok"
            assert (await http.get("/ready")).json()["status"] == "ready"
            queues = (await http.get(f"{API}/queues")).json()["queues"]
            assert queues == [
                {
                    "queue": "default",
                    "total": 3,
                    "states": {"pending": 1, "running": 2},
                    "priorities": [
                        {"priority": 100, "state": "pending", "count": 1},
                        {"priority": 100, "state": "running", "count": 2},
                    ],
                    "paused": False,
                    "cap": None,
                }
            ]
            stats = (await http.get(f"{API}/stats")).json()
            assert stats["queues"] == {"default": {"pending": 1, "running": 2}}
            assert stats["last_minute"]["total"]["submitted"] == 3
            cluster = (await http.get(f"{API}/cluster")).json()
            assert cluster["healthy"] is True and cluster["workers"]["connected"] == 1
            assert cluster["listen"]["http"] == broker.info.http
            assert cluster["store"]["path"].endswith("tq.db")


@pytest.mark.trio
async def test_http_can_be_turned_off(tmp_path: Path) -> None:
    async with running_broker(tmp_path, http="off") as broker:
        assert broker.info.http is None


@pytest.mark.trio
async def test_a_taken_http_port_is_a_config_error(tmp_path: Path) -> None:
    from tq.core.errors import ConfigError

    async with running_broker(tmp_path / "a") as first:
        port = first.info.http.rsplit(":", 1)[1]  # type: ignore[union-attr]
        with pytest.raises(BaseException) as caught:
            async with running_broker(tmp_path / "b", http=f"127.0.0.1:{port}"):
                pass
    leaves = caught.value.exceptions if isinstance(caught.value, BaseExceptionGroup) else []
    while leaves and isinstance(leaves[0], BaseExceptionGroup):
        leaves = leaves[0].exceptions
    error = leaves[0] if leaves else caught.value
    assert isinstance(error, ConfigError) and "--http" in str(error)


# -- the OpenAPI document, checked against a live broker ---------------------------------


def test_openapi_document_is_valid_3_1() -> None:
    from tq.http.openapi import document

    doc = document()
    assert doc["openapi"] == "3.1.0"
    json.dumps(doc)  # plain JSON
    refs = {
        value.rsplit("/", 1)[1]
        for value in _walk(doc)
        if isinstance(value, str) and value.startswith("#/components/schemas/")
    }
    assert refs <= set(doc["components"]["schemas"])


def _walk(node: Any) -> Any:
    if isinstance(node, dict):
        for value in node.values():
            yield value
            yield from _walk(value)
    elif isinstance(node, list):
        for value in node:
            yield value
            yield from _walk(value)


@pytest.mark.slow
def test_schemathesis_against_a_live_broker(tmp_path: Path) -> None:
    """schemathesis over every operation of the served document, positive and negative
    data, every check but two: no 5xx, every response as documented (status, media
    type, headers, schema), invalid input refused with a 4xx, 405s list the methods.

    Excluded, on purpose: ``positive_data_acceptance`` (the server refuses some
    schema-valid input a JSON Schema cannot describe, e.g. an unknown cursor or a
    priority string that names no level, with a documented 400 problem) and
    ``use_after_free`` (DELETE cancels a task, which stays readable as cancelled).
    Not run: GET /api/v1/events, a server-sent event stream that stays open until the
    client goes (tests/test_web.py reads it).
    """
    examples = os.environ.get("TQ_SCHEMATHESIS_EXAMPLES", "25")
    with BrokerProcess(tmp_path / "broker") as broker:
        broker.start_worker("--concurrency", "4")
        command = [
            *[sys.executable, "-m", "schemathesis.cli", "run"],
            f"{broker.http}{API}/openapi.json",
            *["-H", f"Authorization: Bearer {broker.key}", "--tls-verify", str(broker.ca)],
            *["--checks", "all", "--exclude-checks", "positive_data_acceptance,use_after_free"],
            *["--exclude-path", f"{API}/events"],
            *["--max-examples", examples, "--generation-database", "none", "--no-color"],
            *["--report-dir", str(tmp_path / "report"), "--request-timeout", "30"],
        ]
        out = subprocess.run(  # in tmp_path: schemathesis keeps a cache in its working dir
            command, capture_output=True, text=True, timeout=300, cwd=tmp_path
        )
    assert out.returncode == 0, out.stdout[-20000:] + out.stderr[-5000:]


@pytest.mark.slow
def test_the_cli_and_the_worker_never_import_the_http_side() -> None:
    code = (
        "import sys, tq.cli.main, tq.broker.server, tq.worker.runner; "
        "heavy = ('starlette', 'hypercorn', 'prometheus_client', 'yaml', 'httpx', 'tq.http'); "
        "print([m for m in heavy if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "[]", out.stderr
