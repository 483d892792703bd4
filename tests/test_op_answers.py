"""The operations answer with their declared Structs, not maps (tq/protocol/answers.py).

On a live broker, every service method behind an operation (queue pause and resume,
purge, retry_many, keys, audit, schedules, caps) is watched while the wire and REST
drive every op: each result must be exactly the Answer Struct its request declares,
carrying the request's id (a map converted at the edge would not be). REST answers
the same declaration without the envelope (``t``, ``id``): every declared field, no
other, each of its declared type.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

from tq.broker.auth import Auth
from tq.broker.service import BrokerService
from tq.protocol import answers
from tq.protocol.schema import Request
from tq.testing import running_broker

API = "/api/v1"
# the service methods behind the operations: (owner, method name, the request's position)
WATCHED: list[tuple[type, str, int]] = [
    (BrokerService, "pause_queue", 0),
    (BrokerService, "purge", 0),
    (BrokerService, "retry_many", 0),
    (BrokerService, "schedule_request", 0),
    (BrokerService, "cap_request", 0),
    (Auth, "request", 1),
    (Auth, "audit_page", 0),
]
OPS = {"queue", "purge", "retry_many", "keys", "audit", "schedule", "cap"}


class Results:
    """What the watched methods returned, for which request, in call order."""

    def __init__(self) -> None:
        self.calls: list[tuple[Request, Any]] = []

    def take(self) -> list[tuple[Request, Any]]:
        calls, self.calls = self.calls, []
        return calls


@pytest.fixture
def results(monkeypatch: pytest.MonkeyPatch) -> Iterator[Results]:
    seen = Results()

    def watch(method: Callable[..., Awaitable[Any]], at: int) -> Callable[..., Awaitable[Any]]:
        @functools.wraps(method)
        async def watched(self: Any, *args: Any, **kwargs: Any) -> Any:
            result = await method(self, *args, **kwargs)
            seen.calls.append((args[at], result))
            return result

        return watched

    for owner, name, at in WATCHED:
        monkeypatch.setattr(owner, name, watch(getattr(owner, name), at))
    yield seen


def _key(msg: Request) -> str:
    """The ``ANSWERS`` key of a typed request."""
    tag = msg.__struct_config__.tag
    assert isinstance(tag, str)
    return answers.answer_key(tag, getattr(msg, answers.SUB_FIELD.get(tag, ""), None))


def _check(calls: list[tuple[Request, Any]]) -> set[str]:
    """Every result is its request's declared Answer with the request's id; the keys of
    ``ANSWERS`` seen."""
    for msg, result in calls:
        assert type(result) is answers.ANSWERS[_key(msg)], (msg, result)
        assert result.id == msg.id, (msg, result)
    return {_key(msg) for msg, _ in calls}


def _op_keys() -> set[str]:
    return {key for key in answers.ANSWERS if key.split(".")[0] in OPS}


@pytest.mark.trio
async def test_every_operation_answers_with_its_declared_struct_over_the_wire(
    tmp_path: Path, results: Results
) -> None:
    async with running_broker(tmp_path) as broker, broker.client() as client:
        task = (await client.request({"t": "submit", "tasks": [{"type": "t"}]}))["tasks"][0]
        await client.request({"t": "cancel", "task": task["id"]})
        requests: list[dict[str, Any]] = [
            {"t": "queue", "op": "pause", "queue": "q"},
            {"t": "queue", "op": "resume", "queue": "q"},
            {"t": "retry_many", "state": "cancelled"},
            {"t": "purge", "states": ["succeeded"], "older_than": 0, "dry_run": True},
            {"t": "purge", "states": ["succeeded"], "older_than": 0},
            {"t": "keys", "op": "create", "role": "reader", "name": "r"},
            {"t": "keys", "op": "list"},
            {"t": "audit", "limit": 5},
            {"t": "schedule", "op": "add", "name": "n", "cron": "0 3 * * *", "task": {"type": "t"}},
            {"t": "schedule", "op": "list"},
            *({"t": "schedule", "op": op, "name": "n"} for op in ("get", "pause", "resume")),
            {"t": "schedule", "op": "run_now", "name": "n"},
            {"t": "schedule", "op": "remove", "name": "n"},
            {"t": "cap", "op": "set", "kind": "queue", "name": "q", "concurrency": 2},
            {"t": "cap", "op": "list"},
            {"t": "cap", "op": "remove", "kind": "queue", "name": "q"},
        ]
        created = None
        for msg in requests:
            answer = await client.request(msg)
            created = created or answer.get("info")
        assert created is not None
        await client.request({"t": "keys", "op": "revoke", "key_id": created["id"]})
        calls = results.take()
        assert len(calls) == len(requests) + 1
        assert _check(calls) == _op_keys()


@pytest.mark.trio
async def test_rest_answers_an_operation_with_its_declared_fields(
    tmp_path: Path, results: Results
) -> None:
    async with running_broker(tmp_path) as broker, broker.http_client() as http:
        task = (await http.post(f"{API}/tasks", json={"type": "t"})).json()["id"]
        assert (await http.delete(f"{API}/tasks/{task}")).status_code == 200
        schedule = {"cron": "0 3 * * *", "task": {"type": "t", "payload": {"n": 1}}}
        calls: list[tuple[str, str, Any]] = [
            ("POST", "/queues/q/pause", None),
            ("POST", "/queues/q/resume", None),
            ("POST", "/retry-many", {"state": "cancelled"}),
            ("POST", "/purge", {"states": ["succeeded"], "older_than": 0, "dry_run": True}),
            ("POST", "/purge", {"states": ["succeeded"], "older_than": 0}),
            ("GET", "/keys", None),
            ("GET", "/audit?limit=3", None),
            ("PUT", "/schedules/n", schedule),
            ("GET", "/schedules", None),
            ("GET", "/schedules/n", None),
            ("POST", "/schedules/n/pause", None),
            ("POST", "/schedules/n/resume", None),
            ("POST", "/schedules/n/run-now", None),
            ("DELETE", "/schedules/n", None),
            ("PUT", "/caps/queue/q", {"concurrency": 2, "rate": "30/m"}),
            ("GET", "/caps", None),
            ("DELETE", "/caps/queue/q", None),
        ]
        for method, path, body in calls:
            response = await http.request(method, f"{API}{path}", json=body)
            assert response.status_code in (200, 201), (path, response.text)
            [(msg, result)] = results.take()
            kind = answers.ANSWERS[_key(msg)]
            assert type(result) is kind, (path, result)
            fields = set(kind.__struct_fields__) - {"id"}
            data = response.json()
            assert set(data) == fields, (path, data)
            # each field of its declared type (JSON numbers and text, as REST sends them)
            typed = msgspec.convert({**data, "id": 0}, kind, strict=False)
            assert msgspec.json.decode(msgspec.json.encode(typed)) == {
                "t": "ack",
                "id": 0,
                **data,
            }, path
