"""The OpenAPI document's component schemas, generated from the msgspec declarations.

Contract: a schema here is never written by hand. ``msgspec.json.schema_components``
renders the Structs (JSON Schema 2020-12, which OpenAPI 3.1 takes as is): field
names, types, required fields, ranges, descriptions (``tq.core.typed.doc``). The
document (tq.http.openapi) is built from them when the module is first imported,
so the served document can never be stale; tests/test_http.py's schemathesis run
checks it against a live broker.

Bodies: REST takes JSON, the wire msgpack, and most bodies are the wire request
itself without its envelope (``t``, ``id``) and without the fields the route
takes from its path or sets itself (``op``; a task id, a schedule's or cap's
name): ``BODIES`` says which, and fields ``required_for`` the route's op become
required. A task spec is ``TaskSpecIn`` unchanged (named ``TaskSpec``), a workflow
document ``WorkflowNodeIn`` (named ``Workflow``, ``DOCUMENTS``). A body
whose JSON shape has no wire counterpart (the dashboard login) stays in the
document (tq.http.openapi).

Answers: the maps a REST answer holds are the wire's (tq/protocol/answers.py:
a task, a worker, the stats, a schedule, ...), under the document's names
(``SAME``); maps nested in them keep their Struct's name.

May import: msgspec, tq.core, tq.protocol.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import msgspec

from tq.core.task import TaskSpec, TaskSpecIn
from tq.core.workflow import WorkflowNodeIn
from tq.protocol import answers
from tq.protocol.docgen import fields_of
from tq.protocol.schema import CapOp, Purge, Request, RetryMany, Schedule, SetPriority

REF = "#/components/schemas/{name}"


@dataclasses.dataclass(frozen=True)
class Body:
    """A REST body that is a wire request without its envelope and path fields."""

    request: type[Request]
    op: str | None = None  # the op the route sends: fields required for it are required
    path: tuple[str, ...] = ()  # fields the route takes from its path or sets itself


BODIES: dict[str, Body] = {
    "PriorityBody": Body(SetPriority, path=("task",)),
    "PurgeBody": Body(Purge),
    "RetryManyBody": Body(RetryMany),
    "ScheduleBody": Body(Schedule, op="add", path=("op", "name")),
    "CapBody": Body(CapOp, op="set", path=("op", "kind", "name")),
}
# component name -> a Struct whose JSON shape is its msgpack shape: the task spec, and
# the maps the REST answers share with the wire's (tq/protocol/answers.py)
SAME: dict[str, type[msgspec.Struct]] = {
    "TaskSpec": TaskSpecIn,
    "Task": answers.TaskMap,
    "TaskError": answers.TaskErrorMap,
    "Transition": answers.Transition,
    "Stats": answers.Stats,
    "History": answers.ActivityHistory,
    "ApiKey": answers.KeyInfo,
    "AuditEntry": answers.AuditEntry,
    "Worker": answers.WorkerMap,
    "QueueDepth": answers.QueueDepth,
    "Schedule": answers.ScheduleMap,
    "CapLimits": answers.CapLimits,
    "ClusterStatus": answers.Health,
    "Broker": answers.BrokerMap,
}


# component name -> a REST body that is its own declaration (no wire request): the
# workflow document the CLI and the clients compile too (tq.core.workflow)
DOCUMENTS: dict[str, Any] = {"Workflow": WorkflowNodeIn}


def components() -> dict[str, Any]:
    """Every generated component schema, by name, in a stable order."""
    structs = [*SAME.values(), *DOCUMENTS.values(), *(b.request for b in BODIES.values())]
    _, found = msgspec.json.schema_components(structs, ref_template=REF)
    named = {**SAME, **DOCUMENTS}
    names = {struct.__name__: name for name, struct in named.items()}
    out: dict[str, Any] = {}
    for name, struct in named.items():
        out[name] = {**found[struct.__name__], "title": name}
        out[name].pop("$ref", None)
    for name, body in BODIES.items():
        out[name] = _body(found[body.request.__name__], body)
    for name, struct in SAME.items():
        if issubclass(struct, TaskSpecIn):
            _spec_defaults(out[name])
    for name in out:
        out[name] = _renamed(out[name], names)
    # components the Structs refer to (nested Structs), under their own names
    for name, schema in sorted(found.items()):
        if name not in names and name not in {b.request.__name__ for b in BODIES.values()}:
            out.setdefault(name, _renamed(schema, names))
    return out


def _body(schema: dict[str, Any], body: Body) -> dict[str, Any]:
    out = copy.deepcopy(schema)
    dropped = {"t", "id", *body.path}
    out.pop("title", None)
    out["properties"] = {k: v for k, v in out["properties"].items() if k not in dropped}
    required = [r for r in out.get("required", ()) if r not in dropped]
    if body.op is not None:
        for f in fields_of(body.request):
            needed = body.op in f.extra.get("required_for", ())
            if needed and f.name not in required and f.name not in dropped:
                required.append(f.name)
    if required:
        out["required"] = required
    else:
        out.pop("required", None)
    return out


def _spec_defaults(schema: dict[str, Any]) -> None:
    """A task spec's defaults (``TaskSpec``'s) as each property's ``default``."""
    for f in dataclasses.fields(TaskSpec):
        prop = schema["properties"].get(f.name)
        if prop is not None and f.default is not None and f.default is not dataclasses.MISSING:
            prop["default"] = f.default


def _renamed(node: Any, names: dict[str, str]) -> Any:
    """``$ref``s to a Struct's own name rewritten to its component name."""
    if isinstance(node, dict):
        out = {k: _renamed(v, names) for k, v in node.items()}
        ref = out.get("$ref")
        if isinstance(ref, str):
            target = ref.rsplit("/", 1)[1]
            out["$ref"] = REF.format(name=names.get(target, target))
        return out
    if isinstance(node, list):
        return [_renamed(v, names) for v in node]
    return node
