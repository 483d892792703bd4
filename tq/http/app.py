"""The REST routes: decode, authenticate, call one service method, encode.

    GET    /health                      liveness (no key, no store)
    GET    /ready                       readiness: store reachable (no key)
    GET    /metrics                     Prometheus text exposition
    GET    /api/v1/openapi.json         the OpenAPI 3.1 document (no key)
    POST   /api/v1/tasks                submit one task (object) or many (array)
    GET    /api/v1/tasks                list: state, type, queue, limit, cursor
    GET    /api/v1/tasks/{id}           one task
    DELETE /api/v1/tasks/{id}           cancel
    POST   /api/v1/tasks/{id}/retry     back to pending
    GET    /api/v1/tasks/{id}/explain   why it is not running right now
    GET    /api/v1/tasks/{id}/workflow  the tasks linked to it by dependencies, and the edges
    GET    /api/v1/tasks/{id}/history   every transition of the task, oldest first
    POST   /api/v1/workflows            submit a workflow document (chains, groups, chords)
    POST   /api/v1/tasks/{id}/priority  {"priority"}: change a waiting task's priority
    POST   /api/v1/purge                delete finished tasks (states, older_than, limit)
    POST   /api/v1/retry-many           failed/dead/cancelled tasks back to pending
    GET    /api/v1/stats | workers | queues | cluster
    POST   /api/v1/queues/{queue}/pause | resume   stop or restart handing a queue out
    GET    /api/v1/schedules            recurring schedules
    PUT    /api/v1/schedules/{name}     add or redeclare {"cron", "task", "timezone"?, "missed"?}
    GET | DELETE /api/v1/schedules/{name}, POST .../pause | resume | run-now
    GET    /api/v1/caps                 concurrency and rate caps, with their running counts
    PUT | DELETE /api/v1/caps/{kind}/{name}  set {"concurrency"?, "rate"?, "burst"?} or lift a cap
    GET    /api/v1/keys | audit         API keys, the audit log (admin)
    GET    /api/v1/events               live events as server-sent events (web.py)
    GET    /  and  /ui/...              the web dashboard (web.py)

Bodies: a JSON body is decoded straight into the wire's declaration
(tq/protocol/schema.py): a submit's into ``TaskSpecIn`` (an object or an array
of them), the others into ``schema.body_of`` the request they amount to, and
the route calls the service with the same typed request the wire's handler
passes; errors are the wire's NACK sentences (field, rule, value sent).
A workflow document is decoded into its own declaration (tq.core.workflow), which
the CLI and the clients use too, then compiled into typed task specs.

Authentication: ``Authorization: Bearer <API key>``, checked by
``authenticate`` through ``BrokerService.authorize`` against the same key
table and role table (tq.security.roles) as the wire; each route names the
wire action it amounts to, so a key may do over HTTP exactly what it may do
over the wire. With ``--no-auth`` every request is allowed. Every 401 and
403 is logged as the wire logs its refusals (``PEER: WHAT refused (CODE):
MESSAGE``). A request
without that header may use the dashboard's session cookie instead
(tq.http.web: signed cookie, CSRF token on state-changing requests).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

import msgspec
import trio
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tq.broker.operations import HISTORY_LIMIT
from tq.core.errors import Forbidden, InvalidRequest, PayloadTooLarge, TQError, Unauthorized
from tq.core.limits import MAX_BODY, MAX_LIST
from tq.core.states import State
from tq.core.task import TaskSpecIn
from tq.core.typed import explain, type_name
from tq.http import problems, web
from tq.http.metrics import MetricsPage
from tq.http.openapi import document
from tq.protocol.answers import Answer, ScheduleAddAnswer, task_map
from tq.protocol.frames import CONTAINER_BASE, INLINE_DECODE
from tq.protocol.parse import typed
from tq.protocol.schema import (
    BODY_OF,
    Audit,
    CapOp,
    Keys,
    Purge,
    Query,
    QueueOp,
    RetryMany,
    Schedule,
    SetPriority,
    body_of,
)
from tq.protocol.schema import (
    Request as WireRequest,
)

if TYPE_CHECKING:
    from tq.broker.service import BrokerService
    from tq.security.roles import Principal

log = logging.getLogger("tq.http")

API = "/api/v1"
JSON_BYTES_PER_CONTAINER = 4  # a body holds at most one array or object per 4 bytes
JSON_TYPES = ("application/json", "application/problem+json")
LIST_FILTERS = ("state", "type", "queue", "search")
Handler = Callable[[Request], Awaitable[Response]]
B = TypeVar("B", bound=msgspec.Struct)
R = TypeVar("R", bound=WireRequest)
# the JSON bodies: fields of the wire's requests (tq/protocol/schema.py); the path names
# the rest (a task id, a schedule's name, a cap's kind and name)
PRIORITY_BODY = body_of(SetPriority, "priority")
PURGE_BODY = body_of(Purge, "states", "older_than", "limit", "dry_run")
RETRY_MANY_BODY = body_of(RetryMany, "state", "limit")
SCHEDULE_BODY = body_of(Schedule, "cron", "timezone", "task", "missed")
CAP_BODY = body_of(CapOp, "concurrency", "rate", "burst")


def _json(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return JSONResponse(data, status_code=status, headers=headers)


def _answer_json(data: Any, status: int = 200) -> Response:
    """Declared answer maps (tq/protocol/answers.py) as JSON, encoded by msgspec: bytes
    as base64 text and non-finite numbers as null."""
    return Response(msgspec.json.encode(data), status_code=status, media_type="application/json")


def _fields_json(answer: Answer, status: int = 200) -> Response:
    """A wire answer's fields as JSON, its envelope (``t``, ``id``) left out: what the
    operation routes answer (the same declaration, the same rendering as ``_answer_json``)."""
    fields = {name: getattr(answer, name) for name in answer.__struct_fields__ if name != "id"}
    return _answer_json(fields, status)


def _service(request: Request) -> BrokerService:
    service: BrokerService = request.app.state.service
    return service


async def authenticate(request: Request, action: str) -> Principal | None:
    """The principal a request acts as (None with --no-auth): its bearer key, checked.

    The one hook between HTTP and tq's keys: Unauthorized (401) without a
    good key, Forbidden (403) when the key's role may not do ``action``.
    """
    header = request.headers.get("authorization")
    if header is None and web.SESSION_COOKIE in request.cookies:
        return await web.cookie_principal(request, action)
    key = None
    if header is not None:
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "bearer" or not value.strip():
            raise Unauthorized("send the API key as 'Authorization: Bearer <key>'")
        key = value.strip()
    try:
        return await _service(request).authorize(key, action)
    except Unauthorized:
        if key is not None:
            raise
        raise Unauthorized(  # the keys' own message speaks to tq's command line (--key)
            "this broker requires an API key: send it as 'Authorization: Bearer <key>'; "
            "an admin creates one with `tq keys create`"
        ) from None


async def _bytes_of(request: Request) -> bytes:
    """The request's JSON body as bytes, its media type, size and nesting budget checked."""
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media not in JSON_TYPES:
        raise HTTPException(415, f"send JSON (Content-Type: application/json), not {media!r}")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_BODY:
        raise PayloadTooLarge(f"the body is larger than {MAX_BODY} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY:
            raise PayloadTooLarge(f"the body is larger than {MAX_BODY} bytes")
        chunks.append(chunk)
    data = b"".join(chunks)
    # what parsing may cost is bounded by the size: an array or object can be 3 bytes
    # of JSON ("[],") and ~70 as a Python object (brackets inside strings count too)
    budget = CONTAINER_BASE + len(data) // JSON_BYTES_PER_CONTAINER
    if data.count(b"[") + data.count(b"{") > budget:
        raise InvalidRequest(
            f"the body holds more than {budget} arrays and objects in {len(data)} bytes "
            f"(at most {CONTAINER_BASE} plus one per {JSON_BYTES_PER_CONTAINER} bytes); "
            "send larger values or fewer of them"
        )
    return data


async def _typed_body(request: Request, body: type[B]) -> B:
    """The request's JSON body decoded straight into its declaration (``schema.body_of``);
    InvalidRequest naming the field, the rule and the value sent, in the wire's words."""
    data = await _bytes_of(request)
    if len(data) <= INLINE_DECODE:
        return _decode_body(data, body)
    limiter = _service(request).decode_limiter  # off the event loop, one at a time
    return await trio.to_thread.run_sync(_decode_body, data, body, limiter=limiter)


def _decode_body(data: bytes, body: type[B]) -> B:
    try:
        return msgspec.json.decode(data, type=body, strict=True)
    except msgspec.ValidationError as exc:
        plain = _plain_json(data, exc)  # the value sent, for the error
        if not isinstance(plain, dict):
            what = type_name(plain)
            raise InvalidRequest(f"the body must be a JSON object, got {what}") from None
        raise InvalidRequest(explain(exc, BODY_OF[body], plain)) from None
    except (msgspec.DecodeError, RecursionError) as exc:
        raise InvalidRequest(f"the body is not valid JSON: {exc}") from None


def _decode_workflow(data: bytes) -> Any:
    """A workflow body as its declaration (tq.core.workflow.WorkflowNodeIn)."""
    from tq.core.workflow import WorkflowNodeIn

    try:
        return msgspec.json.decode(data, type=WorkflowNodeIn, strict=True)
    except msgspec.ValidationError as exc:
        plain = _plain_json(data, exc)
        raise InvalidRequest(explain(exc, WorkflowNodeIn, plain, what="workflow")) from None
    except RecursionError:
        raise InvalidRequest("the workflow is nested too deeply to decode") from None
    except msgspec.DecodeError as exc:
        raise InvalidRequest(f"the body is not valid JSON: {exc}") from None


def _plain_json(data: bytes, typed_error: Exception) -> Any:
    """The body as plain data, to say what was wrong with it (``typed_error``: why the
    typed decode refused it)."""
    try:
        return msgspec.json.decode(data)
    except msgspec.ValidationError:  # 1e400, or an integer beyond 64 bits
        at = _AT.search(str(typed_error))
        where = f", at {at.group(1).lstrip('.')}" if at and at.group(1) else ""
        raise InvalidRequest(
            f"the body holds a number too large for a 64-bit integer or float{where}"
        ) from None
    except (msgspec.DecodeError, RecursionError) as exc:
        raise InvalidRequest(f"the body is not valid JSON: {exc}") from None


_AT = re.compile(r" - at `\$([^`]*)`$")


def _request(struct: type[R], body: msgspec.Struct | None = None, **fields: Any) -> R:
    """The wire's typed request for a REST call: a decoded body and the fields the path
    names (checked by the same declaration: ``schedule message: field 'name' ...``)."""
    data = msgspec.structs.asdict(body) if body is not None else {}
    return typed(struct, {**data, **fields, "id": 0})


def _query(request: Request) -> Query:
    """The list filters of a GET /tasks as the service's typed list request."""
    params = request.query_params
    msg: dict[str, Any] = {}
    for key in LIST_FILTERS:
        if key in params:
            msg[key] = params[key]
    state = msg.get("state")
    if state is not None and state not in {s.value for s in State}:
        known = ", ".join(s.value for s in State)
        raise InvalidRequest(f"unknown state {state!r}; known states: {known}")
    if "limit" in params:
        text = params["limit"]
        if not (text.isascii() and text.isdigit()):
            raise InvalidRequest(f"limit must be a whole number 1..{MAX_LIST}, not {text!r}")
        msg["limit"] = int(text)
    for bound in ("since", "until"):  # Unix seconds; the service checks the range
        if bound in params:
            try:
                msg[bound] = float(params[bound])
            except ValueError:
                raise InvalidRequest(f"{bound} must be Unix time in seconds") from None
    if "cursor" in params:
        msg["after"] = params["cursor"]
    if "order" in params:
        msg["order"] = params["order"]
    return typed(Query, {**msg, "id": 0, "q": "list"}, "list")


# -- routes --------------------------------------------------------------------------


async def health(request: Request) -> Response:
    return _json(_service(request).health())


async def ready(request: Request) -> Response:
    return _json(await _service(request).ready())


async def metrics(request: Request) -> Response:
    principal = await authenticate(request, "query:stats")
    page: MetricsPage = request.app.state.metrics
    body, media = await page.render(principal)
    return Response(body, media_type=media)


async def openapi(request: Request) -> Response:
    return _json(document())


async def submit(request: Request) -> Response:
    principal = await authenticate(request, "submit")
    data = await _bytes_of(request)
    large = len(data) > INLINE_DECODE  # decoded, then checked, off the event loop
    if large:
        limiter = _service(request).decode_limiter
        body = await trio.to_thread.run_sync(_decode_tasks, data, limiter=limiter)
    else:
        body = _decode_tasks(data)
    if isinstance(body, list):
        return _json(await _service(request).submit(body, principal, large=large), 201)
    answer = await _service(request).submit([body], principal, large=large)
    [result] = answer["tasks"]
    if answer["warnings"]:
        result["warning"] = answer["warnings"][0]["message"]
    headers = {"Location": f"{API}/tasks/{result['id']}"}
    return _json(result, 201 if result["created"] else 200, headers)


def _decode_tasks(data: bytes) -> TaskSpecIn | list[TaskSpecIn]:
    """A submit's body decoded straight into the wire's task declaration (an object, or
    an array of them); InvalidRequest in the wire's words ("task 3: task queue must be
    ...; nothing was submitted") otherwise."""
    try:
        return msgspec.json.decode(data, type=TaskSpecIn | list[TaskSpecIn], strict=True)
    except msgspec.ValidationError as exc:
        raise InvalidRequest(_task_fault(_plain_json(data, exc))) from None
    except (msgspec.DecodeError, RecursionError) as exc:
        raise InvalidRequest(f"the body is not valid JSON: {exc}") from None


def _task_fault(plain: Any) -> str:
    """What is wrong with the first bad task of a body (plain data), as the wire says it."""
    items = plain if isinstance(plain, list) else [plain] if isinstance(plain, dict) else None
    if items is None:
        return f"the body must be a task object or an array of task objects, got {type_name(plain)}"
    for index, item in enumerate(items):
        try:
            typed(TaskSpecIn, item, "task")
        except InvalidRequest as exc:  # an array's task is named by its index, as on the wire
            prefix = f"task {index}: " if items is plain else ""
            return f"{prefix}{exc.message}; nothing was submitted"
    return "the body's tasks do not fit the task declaration; nothing was submitted"


async def submit_workflow(request: Request) -> Response:
    """A workflow document (tq.core.workflow) as one submit: every task or none. The
    body is decoded straight into the document's declaration (``WorkflowNodeIn``, the
    one the CLI and the clients use), so a bad node or task field is named as they name
    it: "workflow chain[1].max_retries must be ..."."""
    from tq.core.workflow import compile_nodes

    principal = await authenticate(request, "submit")
    data = await _bytes_of(request)
    if len(data) <= INLINE_DECODE:
        document = _decode_workflow(data)
    else:
        limiter = _service(request).decode_limiter  # off the event loop, one at a time
        document = await trio.to_thread.run_sync(_decode_workflow, data, limiter=limiter)
    tasks = compile_nodes(document)
    answer = await _service(request).submit(tasks, principal)
    ids = [t["id"] for t in answer["tasks"]]
    return _json({"id": ids[-1], **answer}, 201, {"Location": f"{API}/tasks/{ids[-1]}/workflow"})


async def workflow_of(request: Request) -> Response:
    principal = await authenticate(request, "query:workflow")
    task_id = request.path_params["task_id"]
    return _answer_json(await _service(request).workflow(task_id, principal))


async def history_of(request: Request) -> Response:
    principal = await authenticate(request, "query:history")
    task_id = request.path_params["task_id"]
    rows = await _service(request).history(task_id, principal)
    return _answer_json({"task": task_id, "history": rows, "limit": HISTORY_LIMIT})


async def list_tasks(request: Request) -> Response:
    principal = await authenticate(request, "query:list")
    tasks, cursor = await _service(request).list_tasks(_query(request), principal)
    return _answer_json({"tasks": [task_map(t) for t in tasks], "next_cursor": cursor})


async def get_task(request: Request) -> Response:
    principal = await authenticate(request, "query:get")
    task = await _service(request).get(request.path_params["task_id"], principal)
    return _answer_json(task_map(task))


async def explain_task(request: Request) -> Response:
    principal = await authenticate(request, "query:explain")
    return _answer_json(await _service(request).explain(request.path_params["task_id"], principal))


async def cancel_task(request: Request) -> Response:
    principal = await authenticate(request, "cancel")
    task = await _service(request).cancel(request.path_params["task_id"], principal)
    return _answer_json(task_map(task))


async def retry_task(request: Request) -> Response:
    principal = await authenticate(request, "retry")
    task = await _service(request).retry(request.path_params["task_id"], principal)
    return _answer_json(task_map(task))


async def set_priority(request: Request) -> Response:
    principal = await authenticate(request, "set_priority")
    body = await _typed_body(request, PRIORITY_BODY)
    msg = _request(SetPriority, body, task=request.path_params["task_id"])
    task = await _service(request).set_priority(msg.task, msg.priority, principal)
    return _answer_json(task_map(task))


async def purge(request: Request) -> Response:
    principal = await authenticate(request, "purge")
    msg = _request(Purge, await _typed_body(request, PURGE_BODY))
    return _fields_json(await _service(request).purge(msg, principal))


async def retry_many(request: Request) -> Response:
    principal = await authenticate(request, "retry_many")
    msg = _request(RetryMany, await _typed_body(request, RETRY_MANY_BODY))
    return _fields_json(await _service(request).retry_many(msg, principal))


async def keys(request: Request) -> Response:
    await authenticate(request, "keys:list")
    return _fields_json(await _service(request).auth.request(None, Keys(id=0, op="list")))


async def audit(request: Request) -> Response:
    await authenticate(request, "audit")
    msg: dict[str, Any] = {}
    for name in ("limit", "before"):
        text = request.query_params.get(name)
        if text is not None:
            if not (text.isascii() and text.isdigit()):
                raise InvalidRequest(f"{name} must be a whole number, not {text!r}")
            msg[name] = int(text)
    page = typed(Audit, {**msg, "id": 0}, "audit")
    return _fields_json(await _service(request).auth.audit_page(page))


async def stats(request: Request) -> Response:
    principal = await authenticate(request, "query:stats")
    return _answer_json(await _service(request).stats(principal))


async def workers(request: Request) -> Response:
    principal = await authenticate(request, "query:workers")
    return _answer_json({"workers": _service(request).list_workers(principal)})


async def queues(request: Request) -> Response:
    principal = await authenticate(request, "query:depth")
    return _answer_json(await _service(request).queue_depth(principal))


def _queue_op(op: str) -> Handler:
    async def handler(request: Request) -> Response:
        principal = await authenticate(request, f"queue:{op}")
        msg = QueueOp(id=0, op=op, queue=request.path_params["queue"])  # checked by the service
        return _fields_json(await _service(request).pause_queue(msg, principal))

    return handler


async def list_schedules(request: Request) -> Response:
    principal = await authenticate(request, "schedule:list")
    msg = Schedule(id=0, op="list")
    return _fields_json(await _service(request).schedule_request(msg, principal))


async def put_schedule(request: Request) -> Response:
    principal = await authenticate(request, "schedule:add")
    body = await _typed_body(request, SCHEDULE_BODY)
    msg = _request(Schedule, body, op="add", name=request.path_params["name"])
    answer = await _service(request).schedule_request(msg, principal)
    assert isinstance(answer, ScheduleAddAnswer)
    return _fields_json(answer, status=201 if answer.created else 200)


def _schedule_op(op: str, action: str) -> Handler:
    async def handler(request: Request) -> Response:
        principal = await authenticate(request, action)
        msg = _request(Schedule, op=op, name=request.path_params["name"])
        return _fields_json(await _service(request).schedule_request(msg, principal))

    return handler


async def list_caps(request: Request) -> Response:
    principal = await authenticate(request, "cap:list")
    return _fields_json(await _service(request).cap_request(CapOp(id=0, op="list"), principal))


async def put_cap(request: Request) -> Response:
    principal = await authenticate(request, "cap:set")
    body = await _typed_body(request, CAP_BODY)
    msg = _request(CapOp, body, op="set", **request.path_params)
    return _fields_json(await _service(request).cap_request(msg, principal))


async def delete_cap(request: Request) -> Response:
    principal = await authenticate(request, "cap:remove")
    msg = _request(CapOp, op="remove", **request.path_params)
    return _fields_json(await _service(request).cap_request(msg, principal))


async def cluster(request: Request) -> Response:
    principal = await authenticate(request, "query:health")
    return _answer_json(await _service(request).cluster_status(principal))


# -- errors as problem documents -----------------------------------------------------


async def _tq_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, TQError)
    if isinstance(exc, Unauthorized | Forbidden):  # logged like the wire's refusals
        peer = "?" if request.client is None else f"{request.client.host}:{request.client.port}"
        log.warning(
            "%s: %s %s refused (%s): %s", peer, request.method, request.url.path, exc.code, exc
        )
    return problems.from_error(exc, request)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    code = {404: "not_found", 405: "method_not_allowed", 415: "unsupported_media_type"}.get(
        exc.status_code, "invalid" if exc.status_code < 500 else "error"
    )
    detail = exc.detail
    if exc.status_code == 404:
        detail = f"no such resource {request.url.path}; the API lives under {API}"
    elif exc.status_code == 405:
        detail = f"{request.method} is not allowed on {request.url.path}"
    return problems.problem(
        code,
        detail,
        status=exc.status_code,
        instance=request.url.path,
        headers=dict(exc.headers or {}),
    )


async def _internal_error(request: Request, exc: Exception) -> Response:
    import logging

    logging.getLogger("tq.http").exception("internal error on %s %s", request.method, request.url)
    return problems.problem("error", "internal broker error; see the broker's log", status=500)


def _resource(path: str, **handlers: Handler) -> Route:
    """One route for every method of a path, so a 405 lists them all in ``Allow``."""

    async def endpoint(request: Request) -> Response:
        method = "GET" if request.method == "HEAD" else request.method
        return await handlers[method](request)

    return Route(path, endpoint, methods=list(handlers))


def build_app(service: BrokerService) -> Starlette:
    """The ASGI app over ``service``, with its own metrics registry."""
    routes = [
        Route("/health", health, methods=["GET"]),
        Route("/ready", ready, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),  # a Route: a Mount would answer 307
        Route(f"{API}/openapi.json", openapi, methods=["GET"]),
        _resource(f"{API}/tasks", GET=list_tasks, POST=submit),
        _resource(f"{API}/tasks/{{task_id}}", GET=get_task, DELETE=cancel_task),
        Route(f"{API}/tasks/{{task_id}}/retry", retry_task, methods=["POST"]),
        Route(f"{API}/tasks/{{task_id}}/explain", explain_task, methods=["GET"]),
        Route(f"{API}/tasks/{{task_id}}/workflow", workflow_of, methods=["GET"]),
        Route(f"{API}/tasks/{{task_id}}/history", history_of, methods=["GET"]),
        Route(f"{API}/workflows", submit_workflow, methods=["POST"]),
        Route(f"{API}/tasks/{{task_id}}/priority", set_priority, methods=["POST"]),
        Route(f"{API}/purge", purge, methods=["POST"]),
        Route(f"{API}/retry-many", retry_many, methods=["POST"]),
        Route(f"{API}/stats", stats, methods=["GET"]),
        Route(f"{API}/workers", workers, methods=["GET"]),
        Route(f"{API}/queues", queues, methods=["GET"]),
        Route(f"{API}/queues/{{queue}}/pause", _queue_op("pause"), methods=["POST"]),
        Route(f"{API}/caps", list_caps, methods=["GET"]),
        _resource(f"{API}/caps/{{kind}}/{{name}}", PUT=put_cap, DELETE=delete_cap),
        Route(f"{API}/schedules", list_schedules, methods=["GET"]),
        _resource(
            f"{API}/schedules/{{name}}",
            GET=_schedule_op("get", "schedule:get"),
            PUT=put_schedule,
            DELETE=_schedule_op("remove", "schedule:remove"),
        ),
        Route(
            f"{API}/schedules/{{name}}/pause",
            _schedule_op("pause", "schedule:pause"),
            methods=["POST"],
        ),
        Route(
            f"{API}/schedules/{{name}}/resume",
            _schedule_op("resume", "schedule:resume"),
            methods=["POST"],
        ),
        Route(
            f"{API}/schedules/{{name}}/run-now",
            _schedule_op("run_now", "schedule:run_now"),
            methods=["POST"],
        ),
        Route(f"{API}/queues/{{queue}}/resume", _queue_op("resume"), methods=["POST"]),
        Route(f"{API}/cluster", cluster, methods=["GET"]),
        Route(f"{API}/keys", keys, methods=["GET"]),
        Route(f"{API}/audit", audit, methods=["GET"]),
        Route(f"{API}/events", web.events, methods=["GET"]),
        *web.routes(),
    ]
    app = Starlette(
        routes=routes,
        exception_handlers={
            TQError: _tq_error,
            HTTPException: _http_error,
            Exception: _internal_error,
        },
    )
    app.state.service = service
    app.state.metrics = MetricsPage(service)
    web.install(app)  # the dashboard's session secret and event streams
    return app
