"""Workflows: one JSON document (chains, groups, chords, nested) as one submit.

``compile_workflow(document)`` turns the document into ordinary task maps, in
an order where every task comes after the tasks it depends on, linked by
``depends_on: ["#N"]`` (the N-th task of the same submit) and told with
``input`` how to receive their results. The broker stores them in one
transaction (all or nothing) as tasks plus edges (tq.store.deps_sql), so
``tq list``, the console, ``tq retry`` and ``tq cancel`` work on every step.

A node is one of:

    {"type": "resize", ...}              a task: any task field but depends_on and
                                         input (they come from the document)
    {"chain": [node, node, ...]}         in sequence: each node receives what the
                                         one before produced
    {"group": [node, node, ...]}         in parallel: each receives the same input;
                                         together they produce the list of their
                                         results (in document order)
    {"chord": [node, ...], "callback": node}
                                         a group, then the callback, which
                                         receives the list of the group's results

What a task receives: after a task (or a chain ending in one), that task's
result (a step's ``result_key`` takes one key of it instead); after a group,
the list of the group's results. It becomes the task's payload, or, if the
task has a map payload of its own, that map's key ``"input"``. The first
tasks of the document receive nothing (their own payload).

The document is declared once, ``WorkflowNodeIn`` (a node's kinds and a task
spec's fields, with the task spec's declarations): REST decodes its body straight
into it, the CLI and the clients convert their plain data into it
(``parse_workflow``), so a bad node or field is refused in the same words
everywhere ("workflow chain[1].max_retries must be an integer ..."); the rules
that join fields (one kind per node, a chord's callback, no depends_on or input)
are ``compile_nodes``'s, which gives typed task specs (``compile_workflow``: maps).

Failure: a workflow step's ``on_dependency_failure`` defaults to ``"wait"``: when a
step ends dead (or is cancelled), the steps after it stay blocked, and
``tq retry`` of that step resumes the workflow when it succeeds. A step may say
``"cancel"`` (the default of plain ``depends_on``) or ``"run"`` instead.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any

import msgspec
from msgspec import Meta

from tq.core.errors import InvalidRequest
from tq.core.limits import MAX_LINKS
from tq.core.task import MAX_SUBMIT, TaskSpecIn
from tq.core.typed import doc, explain

WORKFLOW_POLICY = "wait"
MAX_DEPTH = 100  # nodes within nodes (a chord's callback counts as one level down)
_KINDS = ("chain", "group", "chord")
_FROM_DOCUMENT = ("depends_on", "input")
_NODES = Meta(
    min_length=1,
    extra={"rule": "a non-empty array of nodes (tasks, chains, groups or chords)"},
)

# a node's children and a chord's callback: nodes (the declaration below names itself,
# resolved when a decoder is made; typed Any so that mypy does not look it up)
_NODE_LIST: Any = list["WorkflowNodeIn"]
_NODE_OR_NIL: Any = "WorkflowNodeIn | None"

# One node of a document, declared once for REST, the CLI and the clients: the kinds of
# node, then every field of a task spec (``TaskSpecIn``'s declarations, so a task is
# refused in a submit's words; ``type`` optional here, as a chain has none). The rules
# joining them (one kind per node, a chord's callback, no depends_on or input: the
# document's shape says them) are ``compile_nodes``'s.
WorkflowNodeIn: Any = msgspec.defstruct(
    "WorkflowNodeIn",
    [
        (
            "chain",
            Annotated[
                Annotated[_NODE_LIST, _NODES] | None,
                doc("in sequence: each node receives what the one before produced"),
            ],
            None,
        ),
        (
            "group",
            Annotated[
                Annotated[_NODE_LIST, _NODES] | None,
                doc("in parallel: together they produce the list of their results"),
            ],
            None,
        ),
        (
            "chord",
            Annotated[
                Annotated[_NODE_LIST, _NODES] | None,
                doc("a group whose results, as a list, the `callback` receives"),
            ],
            None,
        ),
        (
            "callback",
            Annotated[_NODE_OR_NIL, doc("with `chord`: the node run after it")],
            None,
        ),
        *(
            (f.name, f.type | None if f.required else f.type, None)
            for f in msgspec.structs.fields(TaskSpecIn)
        ),
    ],
    kw_only=True,
    forbid_unknown_fields=True,
    module=__name__,
)
WorkflowNodeIn.__doc__ = (
    "A workflow node: a task (a task spec's fields but depends_on and input, which the "
    'document\'s shape gives), {"chain": [node, ...]}, {"group": [node, ...]} or '
    '{"chord": [node, ...], "callback": node}; nested up to 100 deep, at most 10,000 tasks.'
)
_TASK_FIELDS = tuple(TaskSpecIn.__struct_fields__)

# What a node passes on: the indexes of the tasks whose results it produces, and
# whether it produces one result ("one") or a list of results ("many").
_Output = tuple[list[int], str]


class _Tasks(list[TaskSpecIn]):
    """The compiled tasks, and how many dependencies they name in all so far."""

    links = 0


def parse_workflow(document: object) -> Any:
    """A document given as plain data (a file, a client's map) as its declaration
    (``WorkflowNodeIn``); InvalidRequest naming the field and its rule otherwise."""
    if isinstance(document, WorkflowNodeIn):
        return document
    try:
        return msgspec.convert(document, WorkflowNodeIn, strict=True)
    except msgspec.ValidationError as exc:
        raise InvalidRequest(explain(exc, WorkflowNodeIn, document, what="workflow")) from None
    except RecursionError:
        raise InvalidRequest("the workflow is nested too deeply to decode") from None


def compile_nodes(document: Any) -> list[TaskSpecIn]:
    """A decoded document's tasks as submit task specs, in an order where each comes
    after the tasks it depends on (InvalidRequest naming the bad node)."""
    out = _Tasks()
    _node(document, None, out, "", 0)
    return out


def compile_workflow(document: object) -> list[dict[str, Any]]:
    """A document (plain data or decoded) as submit task maps, nil fields left out."""
    return [
        {k: v for k, v in msgspec.structs.asdict(task).items() if v is not None}
        for task in compile_nodes(parse_workflow(document))
    ]


def _where(path: str) -> str:
    return f"workflow {path}" if path else "workflow"


def _node(node: Any, up: _Output | None, out: _Tasks, path: str, depth: int) -> _Output:
    if depth > MAX_DEPTH:
        raise InvalidRequest(
            f"workflow nodes nest at most {MAX_DEPTH} deep; put steps one after "
            "the other in a chain instead of each inside the one before"
        )
    kinds = [kind for kind in _KINDS if getattr(node, kind) is not None]
    if len(kinds) > 1 or (kinds and node.type is not None):
        raise InvalidRequest(
            f"{_where(path)} must be one of a task, chain, group or chord, not several"
        )
    if not kinds:
        if node.callback is not None:
            raise InvalidRequest(f"{_where(path)}: a callback belongs to a chord, not a task")
        return _task(node, up, out, path)
    kind = kinds[0]
    if kind != "chord" and node.callback is not None:
        raise InvalidRequest(f"{_where(path)}: a callback belongs to a chord, not a {kind}")
    fields = msgspec.structs.asdict(node)
    extra = sorted(k for k in _TASK_FIELDS if fields[k] is not None)
    if extra:
        raise InvalidRequest(f"{_where(path)}: task field(s) {extra} in a {kind}")
    children = fields[kind]
    prefix = f"{path}." if path else ""
    if kind == "chain":
        for i, child in enumerate(children):
            up = _node(child, up, out, f"{prefix}chain[{i}]", depth + 1)
        assert up is not None
        return up
    outputs: list[int] = []
    for i, child in enumerate(children):
        produced, _ = _node(child, up, out, f"{prefix}{kind}[{i}]", depth + 1)
        outputs += produced
    if kind == "group":
        return outputs, "many"
    if node.callback is None:
        raise InvalidRequest(
            f"{_where(path)}: a chord needs a callback (the node run after its group)"
        )
    return _node(node.callback, (outputs, "many"), out, f"{prefix}callback", depth + 1)


def _task(node: Any, up: _Output | None, out: _Tasks, path: str) -> _Output:
    if node.type is None:
        raise InvalidRequest(
            f"{_where(path)} must be a task (with a type) or a chain, group or chord: it has none"
        )
    given = [field for field in _FROM_DOCUMENT if getattr(node, field) is not None]
    if given:
        raise InvalidRequest(
            f"{_where(path)}: {', '.join(given)} come(s) from the workflow's shape; remove it "
            "from the task"
        )
    if len(out) >= MAX_SUBMIT:
        raise InvalidRequest(f"a workflow holds at most {MAX_SUBMIT} tasks")
    task = {k: getattr(node, k) for k in _TASK_FIELDS}
    if up is not None:
        produced, kind = up
        out.links += len(produced)
        if out.links > MAX_LINKS:
            raise InvalidRequest(
                f"a workflow names at most {MAX_LINKS} dependencies in all ({_where(path)} "
                f"waits for {len(produced)} tasks, and more come before it): a group after a "
                "group of N makes N links per task; put one task between them, which waits "
                "for the first group and which the second group waits for"
            )
        task["depends_on"] = [f"#{i}" for i in produced]
        task["input"] = "result" if kind == "one" else "results"
        if task["on_dependency_failure"] is None:
            task["on_dependency_failure"] = WORKFLOW_POLICY
    out.append(TaskSpecIn(**task))
    return [len(out) - 1], "one"


def links(graph: Mapping[str, Any], task_id: str) -> dict[str, list[dict[str, Any]]]:
    """A task's own edges in a ``query workflow`` answer: ``{"depends_on": [{"id",
    "state"}], "dependents": [...]}``, state None for a task not visible (purged, or
    in a queue the key may not see)."""
    states = {t["id"]: t["state"] for t in graph.get("tasks", ())}
    out: dict[str, list[dict[str, Any]]] = {"depends_on": [], "dependents": []}
    for task, dep in graph.get("edges", ()):
        if task == task_id:
            out["depends_on"].append({"id": dep, "state": states.get(dep)})
        elif dep == task_id:
            out["dependents"].append({"id": task, "state": states.get(task)})
    return out
