"""The OpenAPI 3.1 document of the REST API, served at /api/v1/openapi.json.

The paths are written by hand next to the routes (app.py); the component
schemas of the request bodies (``TaskSpec``, ``PurgeBody``, ...) and of the
maps REST answers share with the wire (``Task``, ``Worker``, ``Stats``, ...)
are generated from the msgspec declarations when this module is imported
(tq.http.schemas), so the served document is never stale; ``_WRITTEN`` holds
the few shapes REST alone has (a page with ``next_cursor``, a problem, ...).
tests/test_http.py runs schemathesis against a live broker: every response
must match what is documented here (status, media type, schema).
Schemas say what the server accepts: where the server is stricter than a
JSON Schema can say (a task ``type`` must not contain whitespace, a
priority string must name a level or a number), the server answers 400 with
a problem document, which every operation documents.
"""

from __future__ import annotations

from typing import Any

from tq import __version__
from tq.core.limits import MAX_AUDIT_PAGE, MAX_EPOCH, MAX_SEQ
from tq.core.states import State
from tq.core.task import (
    MAX_SUBMIT,
    MAX_WARNINGS,
)
from tq.http.schemas import components

_NUMBER_OR_NULL = {"type": ["number", "null"]}
_STATE = {"type": "string", "enum": [s.value for s in State]}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _problems(*statuses: int) -> dict[str, Any]:
    text = {
        400: "Invalid request: the problem's detail names the field.",
        401: "No API key, or a bad, revoked or expired one.",
        403: "The key's role or queues do not allow this.",
        404: "No such task.",
        409: "The task's state does not allow this (invalid_transition).",
        413: "The body, or a task payload in it, is too large.",
        415: "The body is not JSON.",
        429: "The key submits faster than the broker allows; see Retry-After.",
        503: "The broker is shutting down or its store is unavailable; retry later.",
    }
    return {
        str(s): {
            "description": text[s],
            "content": {"application/problem+json": {"schema": _ref("Problem")}},
        }
        for s in statuses
    }


_AUTH = (401, 403)
_TASK_ID = {
    "name": "task_id",
    "in": "path",
    "required": True,
    "description": "A task id (UUIDv7 text).",
    "schema": {"type": "string"},
}

_QUEUE = {
    "name": "queue",
    "in": "path",
    "required": True,
    "description": "A queue name (no spaces or commas, at most 200 characters).",
    "schema": {"type": "string"},
}

_WRITTEN: dict[str, Any] = {  # REST's own shapes; the others are generated (tq.http.schemas)
    "SubmitResult": {
        "type": "object",
        "required": ["id", "created"],
        "properties": {
            "id": {"type": "string"},
            "created": {
                "type": "boolean",
                "description": "false: an existing task had the same idempotency_key, "
                "or holds the same unique key (unique_for)",
            },
            "warning": {
                "type": "string",
                "description": "Present when no connected worker handles the task's type: "
                "the task is stored and waits (pending, or scheduled until due) until one "
                "connects.",
            },
        },
    },
    "TaskPage": {
        "type": "object",
        "required": ["tasks", "next_cursor"],
        "properties": {
            "tasks": {"type": "array", "items": _ref("Task")},
            "next_cursor": {
                "type": ["string", "null"],
                "description": "Pass as `cursor` for the next page; null at the end.",
            },
        },
    },
    "Problem": {
        "type": "object",
        "description": "RFC 9457 problem details; `code` is tq's stable error code.",
        "required": ["type", "title", "status", "detail", "code"],
        "properties": {
            "type": {"type": "string", "format": "uri"},
            "title": {"type": "string"},
            "status": {"type": "integer", "minimum": 400, "maximum": 599},
            "detail": {"type": "string"},
            "code": {"type": "string"},
            "instance": {"type": "string"},
        },
    },
    "Session": {
        "type": "object",
        "required": ["auth", "broker", "key_id", "name", "role", "queues", "may", "csrf"],
        "properties": {
            "auth": {"type": "boolean", "description": "false: the broker runs --no-auth."},
            "broker": {"type": "string"},
            "key_id": {"type": ["string", "null"]},
            "name": {"type": ["string", "null"]},
            "role": {"type": "string"},
            "queues": {"type": ["array", "null"], "items": {"type": "string"}},
            "may": {"type": "object", "additionalProperties": {"type": "boolean"}},
            "csrf": {"type": ["string", "null"]},
            "expires_at": {"type": ["integer", "null"]},
        },
    },
    "Cap": {
        "type": "object",
        "required": ["kind", "name", "concurrency", "rate", "burst"],
        "properties": {
            "kind": {"enum": ["queue", "type"]},
            "name": {"type": "string"},
            "concurrency": {"type": ["integer", "null"]},
            "rate": _NUMBER_OR_NULL,
            "burst": _NUMBER_OR_NULL,
            "running": {
                "type": "integer",
                "minimum": 0,
                "description": "GET /caps only: its tasks running now (counted up to 100000)",
            },
        },
    },
    "QueueSwitch": {
        "type": "object",
        "required": ["queue", "paused", "changed"],
        "properties": {
            "queue": {"type": "string"},
            "paused": {"type": "boolean"},
            "changed": {"type": "boolean", "description": "false: it already was"},
        },
    },
    "Health": {
        "type": "object",
        "required": ["status"],
        "properties": {"status": {"type": "string"}},
    },
}
_GENERATED = components()
assert not _GENERATED.keys() & _WRITTEN.keys(), "a schema both generated and written"
SCHEMAS: dict[str, Any] = {**_GENERATED, **_WRITTEN}


_CAP_KIND = {
    "name": "kind",
    "in": "path",
    "required": True,
    "description": "What the cap limits: a queue, or a task type in every queue.",
    "schema": {"enum": ["queue", "type"]},
}
_CAP_NAME = {
    "name": "name",
    "in": "path",
    "required": True,
    "description": "The queue's or task type's name (no spaces or commas).",
    "schema": {"type": "string"},
}
_SCHEDULE = {
    "name": "name",
    "in": "path",
    "required": True,
    "description": "A schedule's name.",
    "schema": {"type": "string"},
}


def _schedule_answer(extra: str | None = None) -> dict[str, Any]:
    """``{"schedule": ...}`` and one more field: created or changed (bool), task (id)."""
    properties: dict[str, Any] = {"schedule": _ref("Schedule")}
    if extra is not None:
        properties[extra] = {"type": "string" if extra == "task" else "boolean"}
    required = ["schedule"] if extra is None else ["schedule", extra]
    return {"type": "object", "required": required, "properties": properties}


def _body(schema: dict[str, Any]) -> dict[str, Any]:
    return {"required": True, "content": {"application/json": {"schema": schema}}}


def _op(summary: str, responses: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"summary": summary, "responses": responses, **extra}


def _paths() -> dict[str, Any]:
    task = _json(_ref("Task"), "The task.")
    return {
        "/health": {
            "get": _op(
                "Liveness: the broker process answers (no key needed).",
                {"200": _json(_ref("Health"), "Alive.")},
                security=[],
            )
        },
        "/ready": {
            "get": _op(
                "Readiness: accepting work and the task store answers (no key needed).",
                {"200": _json(_ref("Health"), "Ready."), **_problems(503)},
                security=[],
            )
        },
        "/metrics": {
            "get": _op(
                "Prometheus text exposition (needs a key that may read stats).",
                {
                    "200": {
                        "description": "Metrics.",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    },
                    **_problems(*_AUTH, 503),
                },
            )
        },
        "/api/v1/openapi.json": {
            "get": _op(
                "This document.",
                {"200": _json({"type": "object"}, "OpenAPI 3.1.")},
                security=[],
            )
        },
        "/api/v1/tasks": {
            "post": _op(
                "Submit one task (an object) or several (an array, all or nothing).",
                {
                    "200": _json(_ref("SubmitResult"), "Not created: same idempotency_key."),
                    "201": _json(
                        {
                            "anyOf": [
                                _ref("SubmitResult"),
                                {
                                    "type": "object",
                                    "required": ["tasks", "warnings"],
                                    "properties": {
                                        "tasks": {
                                            "type": "array",
                                            "items": _ref("SubmitResult"),
                                            "maxItems": MAX_SUBMIT,
                                        },
                                        "warnings": {
                                            "type": "array",
                                            "maxItems": MAX_WARNINGS,
                                            "description": "Once per task type no connected "
                                            "worker handles (at most 20 types).",
                                            "items": {
                                                "type": "object",
                                                "required": ["type", "message"],
                                                "properties": {
                                                    "type": {"type": "string"},
                                                    "message": {"type": "string"},
                                                },
                                            },
                                        },
                                    },
                                },
                            ]
                        },
                        "Stored durably (an object for an object, {tasks} for an array).",
                    ),
                    **_problems(400, *_AUTH, 404, 413, 415, 429, 503),
                },
                requestBody={
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": {
                                "anyOf": [
                                    _ref("TaskSpec"),
                                    {"type": "array", "minItems": 1, "items": _ref("TaskSpec")},
                                ]
                            }
                        }
                    },
                },
            ),
            "get": _op(
                "List tasks in submission order; follow next_cursor for the next page.",
                {"200": _json(_ref("TaskPage"), "A page."), **_problems(400, *_AUTH, 503)},
                parameters=[
                    {"name": "state", "in": "query", "schema": _STATE},
                    {"name": "type", "in": "query", "schema": {"type": "string"}},
                    {"name": "queue", "in": "query", "schema": {"type": "string"}},
                    {
                        "name": "limit",
                        "in": "query",
                        "schema": {"type": "integer", "minimum": 1, "maximum": 10000},
                    },
                    {
                        "name": "cursor",
                        "in": "query",
                        "description": "next_cursor of the previous page.",
                        "schema": {"type": "string"},
                    },
                    {
                        "name": "order",
                        "in": "query",
                        "description": "oldest (default) or newest submitted first.",
                        "schema": {"type": "string", "enum": ["oldest", "newest"]},
                    },
                    {
                        "name": "search",
                        "in": "query",
                        "description": "Text (case-insensitive) to find in the task's error "
                        "(type, message, traceback) or its payload (as JSON). With search, "
                        "since or until the broker scans at most 10000 tasks per request: a "
                        "page may hold fewer than limit tasks, even none, with a next_cursor "
                        "that continues the scan.",
                        "schema": {"type": "string", "maxLength": 200},
                    },
                    {
                        "name": "since",
                        "in": "query",
                        "description": "Only tasks created at or after this Unix time (s).",
                        "schema": {"type": "number", "minimum": 0, "maximum": MAX_EPOCH},
                    },
                    {
                        "name": "until",
                        "in": "query",
                        "description": "Only tasks created at or before this Unix time (s).",
                        "schema": {"type": "number", "minimum": 0, "maximum": MAX_EPOCH},
                    },
                ],
            ),
        },
        "/api/v1/tasks/{task_id}": {
            "parameters": [_TASK_ID],
            "get": _op("One task.", {"200": task, **_problems(*_AUTH, 404, 503)}),
            "delete": _op(
                "Cancel a task that has not finished (a running one stops at its next heartbeat).",
                {"200": task, **_problems(*_AUTH, 404, 409, 503)},
            ),
        },
        "/api/v1/tasks/{task_id}/retry": {
            "parameters": [_TASK_ID],
            "post": _op(
                "Send a failed, dead or cancelled task back to pending (attempts start over).",
                {"200": task, **_problems(*_AUTH, 404, 409, 503)},
            ),
        },
        "/api/v1/tasks/{task_id}/explain": {
            "parameters": [_TASK_ID],
            "get": _op(
                "Why the task is not running right now: reasons with a code and a message, "
                "most telling first (scheduled, retry_due, blocked, no_worker, no_handler, "
                "workers_busy, behind, next, running, worker_silent, finished).",
                {
                    "200": _json(
                        {
                            "type": "object",
                            "required": ["task", "state", "reasons"],
                            "properties": {
                                "task": {"type": "string"},
                                "state": {"type": "string"},
                                "reasons": {
                                    "type": "array",
                                    "items": {
                                        "type": "object",
                                        "required": ["code", "message"],
                                        "properties": {
                                            "code": {"type": "string"},
                                            "message": {"type": "string"},
                                        },
                                        "additionalProperties": True,
                                    },
                                },
                            },
                        },
                        "The task's state and the reasons it is not running.",
                    ),
                    **_problems(*_AUTH, 404, 503),
                },
            ),
        },
        "/api/v1/tasks/{task_id}/workflow": {
            "parameters": [_TASK_ID],
            "get": _op(
                "The tasks linked to this one by dependencies (either way, at most 20,000) "
                "and the edges between them.",
                {
                    "200": _json(
                        {
                            "type": "object",
                            "required": ["tasks", "edges", "truncated"],
                            "properties": {
                                "tasks": {"type": "array", "items": _ref("Task")},
                                "edges": {
                                    "type": "array",
                                    "description": "[task id, id of a task it depends on]",
                                    "items": {
                                        "type": "array",
                                        "items": {"type": "string"},
                                        "minItems": 2,
                                        "maxItems": 2,
                                    },
                                },
                                "truncated": {"type": "boolean"},
                            },
                        },
                        "The workflow around the task.",
                    ),
                    **_problems(*_AUTH, 404, 503),
                },
            ),
        },
        "/api/v1/tasks/{task_id}/history": {
            "parameters": [_TASK_ID],
            "get": _op(
                "Every transition of the task, oldest first (at most 100 kept: the first and "
                "the latest; a gap in n counts the dropped ones).",
                {
                    "200": _json(
                        {
                            "type": "object",
                            "required": ["task", "history", "limit"],
                            "properties": {
                                "task": {"type": "string"},
                                "history": {"type": "array", "items": _ref("Transition")},
                                "limit": {"type": "integer"},
                            },
                        },
                        "The task's history.",
                    ),
                    **_problems(*_AUTH, 404, 503),
                },
            ),
        },
        "/api/v1/workflows": {
            "post": _op(
                "Submit a workflow document (chains, groups, chords): every task or none.",
                {
                    "201": _json(
                        {
                            "type": "object",
                            "required": ["id", "tasks", "warnings"],
                            "properties": {
                                "id": {
                                    "type": "string",
                                    "description": "The last task of the document.",
                                },
                                "tasks": {"type": "array", "items": _ref("SubmitResult")},
                                "warnings": {"type": "array"},
                            },
                        },
                        "Stored durably; the tasks in the document's order.",
                    ),
                    **_problems(400, *_AUTH, 404, 413, 415, 429, 503),
                },
                requestBody=_body(_ref("Workflow")),
            ),
        },
        "/api/v1/tasks/{task_id}/priority": {
            "parameters": [_TASK_ID],
            "post": _op(
                "Change the priority of a task that has not started (pending or scheduled).",
                {"200": task, **_problems(400, *_AUTH, 404, 409, 415, 503)},
                requestBody=_body(_ref("PriorityBody")),
            ),
        },
        "/api/v1/purge": {
            "post": _op(
                "Delete finished tasks (succeeded, dead, cancelled) that finished more than "
                "older_than seconds ago, at most limit per call (the newest task is kept); "
                "dry_run counts them instead.",
                {
                    "200": _json(
                        {
                            "type": "object",
                            "required": ["purged", "matched", "more"],
                            "properties": {
                                "purged": {"type": "integer", "minimum": 0},
                                "matched": {"type": "integer", "minimum": 0},
                                "more": {"type": "boolean"},
                            },
                        },
                        "What was deleted (or, with dry_run, would be).",
                    ),
                    **_problems(400, *_AUTH, 415, 503),
                },
                requestBody=_body(_ref("PurgeBody")),
            )
        },
        "/api/v1/retry-many": {
            "post": _op(
                "Send up to limit tasks in one state (failed, dead or cancelled) back to "
                "pending, oldest first.",
                {
                    "200": _json(
                        {
                            "type": "object",
                            "required": ["retried", "more"],
                            "properties": {
                                "retried": {"type": "array", "items": {"type": "string"}},
                                "more": {"type": "boolean"},
                            },
                        },
                        "The ids sent back to pending.",
                    ),
                    **_problems(400, *_AUTH, 415, 503),
                },
                requestBody=_body(_ref("RetryManyBody")),
            )
        },
        "/api/v1/keys": {
            "get": _op(
                "API keys (admin): public data only, never a secret or its hash.",
                {
                    "200": _json(
                        {
                            "type": "object",
                            "required": ["keys"],
                            "properties": {"keys": {"type": "array", "items": _ref("ApiKey")}},
                        },
                        "Keys.",
                    ),
                    **_problems(*_AUTH, 503),
                },
            )
        },
        "/api/v1/audit": {
            "get": _op(
                "The audit log (admin), newest first; pass next as before for older entries.",
                {
                    "200": _json(
                        {
                            "type": "object",
                            "required": ["entries", "next"],
                            "properties": {
                                "entries": {"type": "array", "items": _ref("AuditEntry")},
                                "next": {"type": ["integer", "null"]},
                            },
                        },
                        "A page of the log.",
                    ),
                    **_problems(400, *_AUTH, 503),
                },
                parameters=[
                    {
                        "name": "limit",
                        "in": "query",
                        "schema": {"type": "integer", "minimum": 1, "maximum": MAX_AUDIT_PAGE},
                    },
                    {
                        "name": "before",
                        "in": "query",
                        "description": "next of the previous page (an entry's seq).",
                        "schema": {"type": "integer", "minimum": 0, "maximum": MAX_SEQ},
                    },
                ],
            )
        },
        "/api/v1/events": {
            "get": _op(
                "Live events as server-sent events (text/event-stream): the wire's "
                "subscribe topics and event bodies (docs/PROTOCOL.md), one message per event "
                "(event: topic, data: JSON, id: sequence), a keepalive comment every 15 s; "
                "the stream ends when the broker shuts down.",
                {
                    "200": {
                        "description": "The stream (open until the client or the broker goes).",
                        "content": {"text/event-stream": {"schema": {"type": "string"}}},
                    },
                    **_problems(400, *_AUTH),
                },
                parameters=[
                    {
                        "name": "topics",
                        "in": "query",
                        "description": "Comma-separated: tasks, counts, workers, progress "
                        "(default all).",
                        "schema": {"type": "string"},
                    }
                ],
            )
        },
        "/ui/login": {
            "post": _op(
                "Dashboard login: check an API key like a bearer key and set the session "
                "cookie tq_session (docs/WEB.md); a form field key is accepted too (303 to /).",
                {
                    "200": _json(_ref("Session"), "Logged in; Set-Cookie: tq_session."),
                    "303": {"description": "Logged in from a form: back to the page."},
                    **_problems(400, 401, 403),
                },
                security=[],
                requestBody=_body(
                    {
                        "type": "object",
                        "required": ["key"],
                        "properties": {"key": {"type": "string"}},
                    }
                ),
            )
        },
        "/ui/logout": {
            "post": _op(
                "Dashboard logout: end the session and clear its cookie.",
                {"204": {"description": "Logged out."}, **_problems(403)},
                security=[],
            )
        },
        "/ui/session": {
            "get": _op(
                "The dashboard session of the tq_session cookie: key, role, what the page may "
                "offer, the CSRF token for X-CSRF-Token.",
                {"200": _json(_ref("Session"), "The session."), **_problems(401)},
                security=[],
            )
        },
        "/api/v1/stats": {
            "get": _op(
                "Counts per queue and state, last minute's throughput and failure rate.",
                {"200": _json(_ref("Stats"), "Statistics."), **_problems(*_AUTH, 503)},
            )
        },
        "/api/v1/workers": {
            "get": _op(
                "Workers the broker knows.",
                {
                    "200": _json(
                        {
                            "type": "object",
                            "required": ["workers"],
                            "properties": {"workers": {"type": "array", "items": _ref("Worker")}},
                        },
                        "Workers.",
                    ),
                    **_problems(*_AUTH),
                },
            )
        },
        "/api/v1/queues": {
            "get": _op(
                "Unfinished tasks per queue, state and priority.",
                {
                    "200": _json(
                        {
                            "type": "object",
                            "required": ["queues"],
                            "properties": {
                                "queues": {"type": "array", "items": _ref("QueueDepth")}
                            },
                        },
                        "Queue depth.",
                    ),
                    **_problems(*_AUTH, 503),
                },
            )
        },
        "/api/v1/queues/{queue}/pause": {
            "parameters": [_QUEUE],
            "post": _op(
                "Pause a queue (admin): it accepts submits and hands nothing out, on every "
                "broker of the store, until resumed; stored, so it survives restarts.",
                {
                    "200": _json(_ref("QueueSwitch"), "The queue's state."),
                    **_problems(400, *_AUTH, 503),
                },
            ),
        },
        "/api/v1/queues/{queue}/resume": {
            "parameters": [_QUEUE],
            "post": _op(
                "Resume a paused queue (admin): its tasks are handed out again.",
                {
                    "200": _json(_ref("QueueSwitch"), "The queue's state."),
                    **_problems(400, *_AUTH, 503),
                },
            ),
        },
        "/api/v1/schedules": {
            "get": _op(
                "Every recurring schedule, by name.",
                {
                    "200": _json(
                        {
                            "type": "object",
                            "required": ["schedules"],
                            "properties": {
                                "schedules": {"type": "array", "items": _ref("Schedule")}
                            },
                        },
                        "The schedules.",
                    ),
                    **_problems(*_AUTH, 503),
                },
            )
        },
        "/api/v1/schedules/{name}": {
            "parameters": [_SCHEDULE],
            "get": _op(
                "One schedule, with its next five runs.",
                {
                    "200": _json(_schedule_answer(), "The schedule."),
                    **_problems(400, *_AUTH, 404, 503),
                },
            ),
            "put": _op(
                "Add a schedule, or redeclare it (admin): history kept, and the next tick "
                "unless cron or timezone changed.",
                {
                    "200": _json(_schedule_answer("created"), "Redeclared."),
                    "201": _json(_schedule_answer("created"), "Added."),
                    **_problems(400, *_AUTH, 415, 503),
                },
                requestBody=_body(_ref("ScheduleBody")),
            ),
            "delete": _op(
                "Remove a schedule (admin); the tasks it submitted stay.",
                {
                    "200": _json(
                        {
                            "type": "object",
                            "required": ["removed"],
                            "properties": {"removed": {"type": "boolean"}},
                        },
                        "Whether it existed.",
                    ),
                    **_problems(400, *_AUTH, 404, 503),
                },
            ),
        },
        "/api/v1/schedules/{name}/pause": {
            "parameters": [_SCHEDULE],
            "post": _op(
                "Pause a schedule (admin): no tick fires until it is resumed.",
                {
                    "200": _json(_schedule_answer("changed"), "Paused."),
                    **_problems(400, *_AUTH, 404, 503),
                },
            ),
        },
        "/api/v1/schedules/{name}/resume": {
            "parameters": [_SCHEDULE],
            "post": _op(
                "Resume a schedule (admin) from its next tick.",
                {
                    "200": _json(_schedule_answer("changed"), "Resumed."),
                    **_problems(400, *_AUTH, 404, 503),
                },
            ),
        },
        "/api/v1/schedules/{name}/run-now": {
            "parameters": [_SCHEDULE],
            "post": _op(
                "Submit the schedule's task once now (admin); its ticks go on.",
                {
                    "200": _json(_schedule_answer("task"), "Submitted."),
                    **_problems(400, *_AUTH, 404, 503),
                },
            ),
        },
        "/api/v1/caps": {
            "get": _op(
                "Every cap (concurrency and rate per queue or task type), by kind then name, "
                "with its running tasks now.",
                {
                    "200": _json(
                        {
                            "type": "object",
                            "required": ["caps"],
                            "properties": {"caps": {"type": "array", "items": _ref("Cap")}},
                        },
                        "The caps.",
                    ),
                    **_problems(*_AUTH, 503),
                },
            )
        },
        "/api/v1/caps/{kind}/{name}": {
            "parameters": [_CAP_KIND, _CAP_NAME],
            "put": _op(
                "Set a queue's or task type's cap (admin), cluster-wide: replaces both limits "
                "(a limit left out is lifted); at least one of concurrency and rate.",
                {
                    "200": _json(
                        {
                            "type": "object",
                            "required": ["cap"],
                            "properties": {"cap": _ref("Cap")},
                        },
                        "The stored cap.",
                    ),
                    **_problems(400, *_AUTH, 415, 503),
                },
                requestBody=_body(_ref("CapBody")),
            ),
            "delete": _op(
                "Lift a queue's or task type's cap (admin).",
                {
                    "200": _json(
                        {
                            "type": "object",
                            "required": ["kind", "name", "removed"],
                            "properties": {
                                "kind": {"enum": ["queue", "type"]},
                                "name": {"type": "string"},
                                "removed": {
                                    "type": "boolean",
                                    "description": "false: it had no cap",
                                },
                            },
                        },
                        "Whether there was a cap.",
                    ),
                    **_problems(400, *_AUTH, 503),
                },
            ),
        },
        "/api/v1/cluster": {
            "get": _op(
                "Broker health, store, uptime, version, workers (what `tq cluster-status` shows).",
                {"200": _json(_ref("ClusterStatus"), "Status."), **_problems(*_AUTH)},
            )
        },
    }


def document() -> dict[str, Any]:
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "tq broker REST API",
            "version": __version__,
            "description": "Operators' and moderate producers' HTTP interface to a tq broker. "
            "High-rate producers and workers use the msgpack wire protocol (docs/PROTOCOL.md). "
            "Errors are RFC 9457 problem documents (application/problem+json).",
        },
        "servers": [{"url": "/"}],
        "security": [{"bearer": []}],
        "paths": _paths(),
        "components": {
            "schemas": SCHEMAS,
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "A tq API key (tq_<id>_<secret>); not needed with --no-auth.",
                }
            },
        },
    }
