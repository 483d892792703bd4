"""hello, keys, schedule and cap as typed requests (tq/protocol/schema.py): a wrong type,
a bool for an integer, NaN or infinity, a value out of range and a missing field are
refused with the field, the rule and the value sent, over the real wire (TLS, a live
broker) and over REST in the same words; a refused request changes nothing."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
from protodoc import connect
from protodoc import session as raw_session

from tq.core import limits
from tq.core.auth import ROLES
from tq.protocol import schema
from tq.store import claimplan
from tq.testing import running_broker

API = "/api/v1"
INT31 = "an integer 0..2147483647"
LONG = "x" * (limits.MAX_WORKER_TEXT + 1)
RATE = f"field 'rate' must be {schema.RATE_RULE}"
CAP_N = f"field 'concurrency' must be an integer 1..{limits.MAX_CAP_CONCURRENCY}"
SCHEDULE = {"op": "add", "name": "s", "cron": "* * * * *", "task": {"type": "t"}}
TASK = "field 'task': task "
CAP = {"op": "set", "kind": "queue", "name": "q"}

HELLO_CASES: list[tuple[dict[str, Any], str]] = [
    ({"pid": True}, f"field 'pid' must be {INT31}, got bool True"),
    ({"pid": -1}, f"field 'pid' must be {INT31}, got int -1"),
    ({"concurrency": math.nan}, f"field 'concurrency' must be {INT31}, got float nan"),
    ({"concurrency": 2**31}, f"field 'concurrency' must be {INT31}, got int 2147483648"),
    ({"queues": "a"}, "field 'queues' must be an array of strings of 1..200 characters"),
    ({"queues": ["a"] * 257}, "(0..256 items), got array"),
    ({"types": ["ok", ""]}, "field 'types'[1] must be a string of 1..200 characters"),
    ({"name": LONG}, "field 'name' must be a string of 0..255 characters"),
    ({"host": 7}, "field 'host' must be a string of 0..255 characters, got int 7"),
    ({"worker_id": LONG}, "field 'worker_id' must be a string of 0..255 characters"),
    ({"kind": None}, "field 'kind' must be a string; it is required (nil or missing)"),
    ({"v": True}, "field 'v' must be an integer, got bool True"),
]
KEYS_CASES: list[tuple[dict[str, Any], str]] = [
    (
        {"op": "create"},
        f"field 'role' must be one of {', '.join(sorted(ROLES))}; op create requires it",
    ),
    ({"op": "create", "role": True}, "field 'role' must be one of admin, "),
    ({"op": "create", "role": "boss"}, "got str 'boss'"),
    (
        {"op": "create", "role": "reader", "expires_at": math.nan},
        f"field 'expires_at' must be a finite number 0..{limits.MAX_EPOCH:.0f}, got float nan",
    ),
    ({"op": "create", "role": "reader", "expires_at": -math.inf}, "got float -inf"),
    ({"op": "create", "role": "reader", "name": "x" * 201}, "field 'name' must be a string of"),
    ({"op": "create", "role": "reader", "queues": []}, "(1..1000 items), got array"),
    ({"op": "create", "role": "reader", "queues": ["a b"]}, "field 'queues'[0] must be"),
    ({"op": "revoke"}, "field 'key_id' must be a string of 1..64 characters; op revoke requires"),
    ({"op": "revoke", "key_id": 12}, "field 'key_id' must be a string of 1..64 characters, got"),
    ({"op": "frobnicate"}, "field 'op' must be one of create, list, revoke, got str 'frobnicate'"),
    ({"op": 5}, "field 'op' must be one of create, list, revoke, got int 5"),
    ({}, "field 'op' must be one of create, list, revoke; it is required (nil or missing)"),
]
SCHEDULE_CASES: list[tuple[dict[str, Any], str]] = [
    ({**SCHEDULE, "cron": None}, "field 'cron' must be a string of 1..200 characters; op add"),
    ({**SCHEDULE, "task": None}, "field 'task' must be a map; op add requires it"),
    ({**SCHEDULE, "task": ["t"]}, "field 'task' must be a map, got array"),
    ({**SCHEDULE, "name": "a b"}, "field 'name' must be a non-empty string of at most 200"),
    ({**SCHEDULE, "name": True}, "no spaces or commas, got bool True"),
    ({"op": "get"}, "field 'name' must be a non-empty string"),
    ({**SCHEDULE, "missed": "sometimes"}, "field 'missed' must be one of all, once, skip"),
    ({**SCHEDULE, "timezone": ""}, "field 'timezone' must be a string of 1..64 characters"),
    ({**SCHEDULE, "cron": "*" * 201}, "field 'cron' must be a string of 1..200 characters, got"),
    ({**SCHEDULE, "op": "explode"}, "field 'op' must be one of add, list, get, remove, pause"),
    # the task: declared like a submit's task spec, named like a submit's task
    ({**SCHEDULE, "task": {"type": "t", "priority": math.nan}}, f"{TASK}priority must be an"),
    ({**SCHEDULE, "task": {"type": "t", "priority": True}}, "or a string, got bool True"),
    (
        {**SCHEDULE, "task": {"type": "t", "max_retries": True}},
        f"{TASK}max_retries must be an integer 0..{limits.MAX_RETRIES}, got bool True",
    ),
    ({**SCHEDULE, "task": {"type": "t", "timeout": math.inf}}, f"{TASK}timeout must be a finite"),
    ({**SCHEDULE, "task": {"type": "t", "retry_cap": -1}}, f"{TASK}retry_cap must be a finite"),
    ({**SCHEDULE, "task": {}}, f"{TASK}type must be a non-empty string of at most 200"),
    ({**SCHEDULE, "task": {"type": "a b"}}, "no spaces or commas, got str 'a b'"),
    (
        {**SCHEDULE, "task": {"type": "t", "idempotency_key": "k"}},
        "field 'task': unknown task field idempotency_key; known: max_retries, payload, ",
    ),
    ({**SCHEDULE, "task": {"type": "t", "colour": 1}}, "field 'task': unknown task field colour"),
]
CAP_CASES: list[tuple[dict[str, Any], str]] = [
    ({**CAP, "concurrency": True}, f"{CAP_N}, got bool True"),
    ({**CAP, "concurrency": 0}, f"{CAP_N}, got int 0"),
    ({**CAP, "concurrency": limits.MAX_CAP_CONCURRENCY + 1}, f"{CAP_N}, got int 1000001"),
    ({**CAP, "concurrency": 1.5}, f"{CAP_N}, got float 1.5"),
    ({**CAP, "rate": 0}, f"{RATE}, got int 0"),
    ({**CAP, "rate": math.nan}, f"{RATE}, got float nan"),
    ({**CAP, "rate": math.inf}, f"{RATE}, got float inf"),
    ({**CAP, "rate": True}, f"{RATE}, got bool True"),
    ({**CAP, "rate": "fast"}, f"{RATE}, got str 'fast'"),
    ({**CAP, "rate": "0/s"}, f"{RATE}, got str '0/s'"),
    ({**CAP, "rate": "2000000/s"}, f"{RATE}, got str '2000000/s'"),
    ({**CAP, "rate": "nan/s"}, f"{RATE}, got str 'nan/s'"),
    ({**CAP, "rate": 1, "burst": 0.5}, "field 'burst' must be a finite number 1..1000000"),
    ({**CAP, "rate": 1, "burst": math.nan}, "got float nan"),
    ({**CAP, "concurrency": 1, "burst": 3}, "field 'burst' needs a rate"),
    ({**CAP}, "a cap needs a concurrency, a rate or both"),
    ({**CAP, "kind": None, "concurrency": 1}, "field 'kind' must be one of queue, type; op set"),
    ({**CAP, "kind": "worker", "concurrency": 1}, "one of queue, type, got str 'worker'"),
    ({"op": "remove", "kind": "queue"}, "field 'name' must be a non-empty string"),
]
WIRE_CASES = (
    [("keys", fields, words) for fields, words in KEYS_CASES]
    + [("schedule", fields, words) for fields, words in SCHEDULE_CASES]
    + [("cap", fields, words) for fields, words in CAP_CASES]
)


def test_the_declared_limits_are_the_ones_in_force() -> None:
    """The cap kinds the store knows and the key roles the declarations allow are one."""
    assert claimplan.KINDS == ("queue", "type")
    roles = schema.Keys.__annotations__["role"]
    assert all(role in roles for role in ROLES)
    assert schema.OP_RULES[schema.Keys] == (
        ("create", "list", "revoke"),
        {"role": ("create",), "key_id": ("revoke",)},
    )


@pytest.mark.trio
async def test_bad_hellos_are_refused_naming_the_field_and_the_session_stays_open(
    tmp_path: Path,
) -> None:
    async with running_broker(tmp_path) as broker:
        raw = await connect(broker)
        base = {"t": "hello", "v": 1, "kind": "worker", "key": broker.key}
        for rid, (fields, words) in enumerate(HELLO_CASES, start=1):
            answer = await raw.ask({**base, "id": rid, **fields})
            assert answer is not None and answer["t"] == "nack", (fields, answer)
            assert answer["code"] == "invalid" and answer["id"] == rid
            message = answer["message"]
            assert message.startswith("hello message: ") and words in message, message
        wrong = await raw.ask({**base, "id": 90, "v": 2})
        assert wrong is not None and "protocol version 2 is not supported" in wrong["message"]
        # none of them registered a worker or closed the connection: a good hello passes
        ok = await raw.ask({**base, "id": 99, "worker_id": "w1", "queues": [], "pid": 0})
        assert ok is not None and ok["t"] == "ack" and ok["worker_id"] == "w1"
        workers = await raw.ask({"t": "query", "id": 100, "q": "workers"})
        assert workers is not None
        [worker] = workers["workers"]
        assert (worker["id"], worker["queues"], worker["pid"]) == ("w1", ["default"], 0)
        await raw.aclose()


@pytest.mark.trio
async def test_bad_keys_schedule_and_cap_requests_name_the_field(tmp_path: Path) -> None:
    async with running_broker(tmp_path) as broker:
        raw = await raw_session(broker)
        before = await raw.ask({"t": "keys", "id": 1, "op": "list"})
        assert before is not None
        failures = []
        for rid, (kind, fields, words) in enumerate(WIRE_CASES, start=2):
            answer = await raw.ask({"t": kind, "id": rid, **fields})
            if not (
                answer is not None
                and (answer["t"], answer["code"], answer["id"]) == ("nack", "invalid", rid)
                and answer["message"].startswith(f"{kind} message: ")
                and words in answer["message"]
            ):
                failures.append(f"{kind} {fields}: {answer}")
        assert not failures, "\n".join(failures)
        # nothing of them was kept
        for rid, (kind, op, field) in enumerate(
            [("keys", "list", "keys"), ("schedule", "list", "schedules"), ("cap", "list", "caps")],
            start=1000,
        ):
            answer = await raw.ask({"t": kind, "id": rid, "op": op})
            assert answer is not None and answer["t"] == "ack", answer
            if kind == "keys":
                assert answer[field] == before["keys"]
            else:
                assert answer[field] == []
        # and the same requests, well formed, pass
        for rid, msg in enumerate(
            [
                {"t": "keys", "op": "create", "role": "reader", "expires_at": 4e9},
                {"t": "schedule", **SCHEDULE, "missed": "once", "timezone": "Europe/Berlin"},
                {"t": "cap", **CAP, "rate": "30/m", "burst": 2},
                {"t": "cap", **CAP, "kind": "type", "concurrency": 3, "rate": 2},
            ],
            start=2000,
        ):
            answer = await raw.ask({**msg, "id": rid})
            assert answer is not None and answer["t"] == "ack", answer
        await raw.aclose()


@pytest.mark.trio
async def test_a_reader_is_forbidden_an_admin_op_before_its_fields_are_read(
    tmp_path: Path,
) -> None:
    """The role is checked against the op first: a reader sending a bad keys create gets
    forbidden, not a lesson in the fields; an unknown op is forbidden too (fail closed)."""
    async with running_broker(tmp_path) as broker:
        admin = await raw_session(broker)
        made = await admin.ask({"t": "keys", "id": 2, "op": "create", "role": "reader"})
        assert made is not None and made["t"] == "ack"
        reader = await raw_session(broker, key=made["key"])
        for rid, msg in enumerate(
            [
                {"t": "keys", "op": "create"},
                {"t": "cap", "op": "set", "kind": "queue", "name": "q"},
                {"t": "schedule", "op": "explode"},
            ],
            start=2,
        ):
            answer = await reader.ask({**msg, "id": rid})
            assert answer is not None and answer["code"] == "forbidden", answer
        listed = await reader.ask({"t": "cap", "id": 9, "op": "list"})
        assert listed is not None and listed["t"] == "ack"
        await reader.aclose()
        await admin.aclose()


def _nan(value: Any) -> bool:
    """Whether plain data holds NaN or an infinity (JSON has neither)."""
    if isinstance(value, dict):
        return any(_nan(v) for v in value.values())
    return isinstance(value, float) and not math.isfinite(value)


def problem_detail(response: Any) -> str:
    assert response.status_code == 400, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body = response.json()
    assert body["code"] == "invalid"
    return str(body["detail"])


@pytest.mark.trio
async def test_rest_bodies_are_refused_in_the_wires_words(tmp_path: Path) -> None:
    async with running_broker(tmp_path) as broker, broker.http_client() as http:
        failures = []

        async def expect(method: str, path: str, body: Any, words: str) -> None:
            content = body if isinstance(body, bytes) else json.dumps(body).encode()
            response = await http.request(
                method,
                f"{API}{path}",
                content=content,
                headers={"content-type": "application/json"},
            )
            try:
                detail = problem_detail(response)
            except AssertionError as exc:
                failures.append(f"{method} {path} {body!r}: {exc}")
                return
            if words not in detail:
                failures.append(f"{method} {path} {body!r}: {detail}")

        for fields, words in CAP_CASES:
            if fields.get("op") != "set" or fields.get("kind") != "queue" or "name" not in fields:
                continue
            body = {k: v for k, v in fields.items() if k in ("concurrency", "rate", "burst")}
            if any(isinstance(v, float) and not math.isfinite(v) for v in body.values()):
                continue  # JSON has no NaN: below
            await expect("PUT", "/caps/queue/q", body, words)
        await expect("PUT", "/caps/worker/q", {"concurrency": 1}, "field 'kind' must be one of")
        await expect("PUT", "/caps/queue/a%20b", {"concurrency": 1}, "field 'name' must be a non")
        await expect("DELETE", "/caps/worker/q", b"", "field 'kind' must be one of queue, type")
        await expect("PUT", "/caps/queue/q", b'{"rate": NaN}', "the body is not valid JSON")
        await expect("PUT", "/caps/queue/q", b'{"rate": 1e400}', "a number too large")
        await expect("PUT", "/caps/queue/q", [1], "the body must be a JSON object, got array")
        for fields, words in SCHEDULE_CASES:
            if fields.get("op") != "add" or fields.get("name") != "s" or _nan(fields):
                continue
            body = {k: v for k, v in fields.items() if k not in ("op", "name")}
            await expect("PUT", "/schedules/s", body, words)
        await expect("PUT", "/schedules/a%20b", SCHEDULE, "field 'name' must be a non-empty")
        await expect("POST", "/schedules/a%20b/pause", b"", "field 'name' must be a non-empty")
        await expect("PUT", "/schedules/s", {"cron": 5, "task": {}}, "field 'cron' must be a")
        await expect(
            "POST", "/purge", {"states": ["dead"], "older_than": True}, "field 'older_than'"
        )
        await expect("POST", "/purge", {"states": ["dead"]}, "field 'older_than' must be a")
        await expect("POST", "/retry-many", {"state": "dead", "limit": 0}, "field 'limit'")
        task = (await http.post(f"{API}/tasks", json={"type": "t"})).json()["id"]
        await expect("POST", f"/tasks/{task}/priority", {}, "field 'priority' must be")
        await expect("POST", f"/tasks/{task}/priority", {"priority": [1]}, "got array")
        assert not failures, "\n".join(failures)
        # nothing was kept; the well-formed bodies pass
        assert (await http.get(f"{API}/caps")).json() == {"caps": []}
        assert (await http.get(f"{API}/schedules")).json() == {"schedules": []}
        put = await http.put(f"{API}/caps/queue/q", json={"rate": "30/m", "burst": 2})
        assert put.status_code == 200 and put.json()["cap"]["rate"] == 0.5, put.text
        added = await http.put(
            f"{API}/schedules/s", json={"cron": "0 3 * * *", "task": {"type": "t"}}
        )
        assert added.status_code == 201, added.text
        gone = await http.delete(f"{API}/caps/queue/q")
        assert gone.json() == {"kind": "queue", "name": "q", "removed": True}


@pytest.mark.trio
async def test_a_rest_submit_is_refused_in_the_wires_words(tmp_path: Path) -> None:
    """POST /tasks decodes its body straight into the wire's task declaration: the same
    task refused over REST and over the wire gets the same sentence."""
    bad_tasks: list[dict[str, Any]] = [
        {"type": "a", "max_retries": True},
        {"type": "a", "priority": None, "timeout": 0},
        {"queue": "q"},
        {"type": "a b"},
        {"type": "a", "colour": 1},
        {"type": "a", "delay": -1},
        {"type": "a", "unique_key": "k"},  # needs unique_for: checked by the service
    ]
    async with running_broker(tmp_path) as broker, broker.http_client() as http:
        raw = await raw_session(broker)
        for rid, task in enumerate(bad_tasks, start=2):
            said = []
            for tasks in ([task], [{"type": "ok"}, task]):
                wire = await raw.ask({"t": "submit", "id": rid, "tasks": tasks})
                assert wire is not None and wire["t"] == "nack", wire
                rest = await http.post(f"{API}/tasks", json=tasks)
                assert problem_detail(rest) == wire["message"], (task, rest.text, wire)
                said.append(wire["message"])
                if len(tasks) > 1:
                    assert wire["message"].startswith("task 1: ")
            # one task object, not in an array: the same sentence without an index
            one = await http.post(f"{API}/tasks", json=task)
            assert problem_detail(one) == said[0].removeprefix("task 0: "), one.text
        await raw.aclose()
        headers = {"content-type": "application/json"}
        for content, words in [
            (b'{"type": "a", "timeout": NaN}', "the body is not valid JSON"),
            (b'{"type": "a", "timeout": 1e400}', "too large for a 64-bit integer or float, at"),
            (b'"echo"', "the body must be a task object or an array of task objects, got str"),
            (b"[]", "at least one task"),
        ]:
            response = await http.post(f"{API}/tasks", content=content, headers=headers)
            assert words in problem_detail(response), response.text
        assert (await http.get(f"{API}/tasks")).json()["tasks"] == []


@pytest.mark.trio
async def test_a_schedules_task_is_refused_as_a_submits_task_is(tmp_path: Path) -> None:
    """A schedule's task is a task spec (fewer fields): the same bad task gets the same
    sentence in a submit and in a schedule add, over the wire and over REST, and nothing
    is stored; its priority's text forms are a submit's too."""
    bad_tasks: list[dict[str, Any]] = [
        {"type": "t", "max_retries": True},
        {"type": "t", "priority": 1.5},
        {"type": "t", "timeout": 0},
        {"queue": "q"},
        {"type": "t", "priority": 256},
        {"type": "t", "priority": "urgent"},
        {"type": "t", "priority": "1_0"},
    ]
    async with running_broker(tmp_path) as broker, broker.http_client() as http:
        raw = await raw_session(broker)
        for rid, task in enumerate(bad_tasks, start=2):
            submit = await raw.ask({"t": "submit", "id": rid, "tasks": [task]})
            add = await raw.ask({"t": "schedule", "id": rid, **SCHEDULE, "task": task})
            assert submit is not None and add is not None
            assert (submit["t"], add["t"], add.get("code")) == ("nack", "nack", "invalid"), add
            said = (
                submit["message"].removeprefix("task 0: ").removesuffix("; nothing was submitted")
            )
            assert add["message"] in (said, f"schedule message: field 'task': {said}"), (
                task,
                add,
                submit,
            )
            rest = await http.put(f"{API}/schedules/s", json={"cron": "0 3 * * *", "task": task})
            assert problem_detail(rest) == add["message"], (task, rest.text)
        listed = await raw.ask({"t": "schedule", "id": 99, "op": "list"})
        assert listed is not None and listed["schedules"] == []
        # the well-formed one, with a named priority: stored with the submit's defaults
        added = await raw.ask(
            {"t": "schedule", "id": 100, **SCHEDULE, "task": {"type": "t", "priority": "high"}}
        )
        assert added is not None and added["t"] == "ack", added
        assert added["schedule"]["task"] == {"type": "t", "queue": "default", "priority": 200}
        await raw.aclose()
