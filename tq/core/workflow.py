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

Failure: a workflow step's ``on_dependency_failure`` defaults to ``"wait"``: when a
step ends dead (or is cancelled), the steps after it stay blocked, and
``tq retry`` of that step resumes the workflow when it succeeds. A step may say
``"cancel"`` (the default of plain ``depends_on``) or ``"run"`` instead.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from tq.core.errors import InvalidRequest
from tq.core.task import MAX_SUBMIT

WORKFLOW_POLICY = "wait"
_KINDS = ("chain", "group", "chord")
_FROM_DOCUMENT = ("depends_on", "input")

# What a node passes on: the indexes of the tasks whose results it produces, and
# whether it produces one result ("one") or a list of results ("many").
_Output = tuple[list[int], str]


def compile_workflow(document: object) -> list[dict[str, Any]]:
    """The document's tasks as submit task maps (InvalidRequest naming the bad node)."""
    out: list[dict[str, Any]] = []
    _node(document, None, out, "workflow")
    return out


def _node(node: object, up: _Output | None, out: list[dict[str, Any]], path: str) -> _Output:
    if not isinstance(node, Mapping):
        raise InvalidRequest(f"{path} must be a map (a task, chain, group or chord)")
    kinds = [kind for kind in _KINDS if kind in node]
    if len(kinds) > 1 or (kinds and "type" in node):
        raise InvalidRequest(f"{path} must be one of a task, chain, group or chord, not several")
    if not kinds:
        return _task(node, up, out, path)
    kind = kinds[0]
    children = node[kind]
    extra = set(node) - {kind, "callback"} if kind == "chord" else set(node) - {kind}
    if extra:
        raise InvalidRequest(f"{path}: unknown field(s) {sorted(map(str, extra))} in a {kind}")
    if not isinstance(children, list) or not children:
        raise InvalidRequest(f"{path}.{kind} must be a non-empty list of nodes")
    if kind == "chain":
        for i, child in enumerate(children):
            up = _node(child, up, out, f"{path}.chain[{i}]")
        assert up is not None
        return up
    outputs: list[int] = []
    for i, child in enumerate(children):
        produced, _ = _node(child, up, out, f"{path}.{kind}[{i}]")
        outputs += produced
    if kind == "group":
        return outputs, "many"
    if "callback" not in node:
        raise InvalidRequest(f"{path}: a chord needs a callback (the node run after its group)")
    return _node(node["callback"], (outputs, "many"), out, f"{path}.callback")


def _task(
    node: Mapping[str, Any], up: _Output | None, out: list[dict[str, Any]], path: str
) -> _Output:
    if "type" not in node:
        raise InvalidRequest(
            f"{path} must be a task (with a type) or a chain, group or chord: it has none"
        )
    given = [field for field in _FROM_DOCUMENT if field in node]
    if given:
        raise InvalidRequest(
            f"{path}: {', '.join(given)} come(s) from the workflow's shape; remove it from the task"
        )
    if len(out) >= MAX_SUBMIT:
        raise InvalidRequest(f"a workflow holds at most {MAX_SUBMIT} tasks")
    task = dict(node)
    if up is not None:
        produced, kind = up
        task["depends_on"] = [f"#{i}" for i in produced]
        task["input"] = "result" if kind == "one" else "results"
        task.setdefault("on_dependency_failure", WORKFLOW_POLICY)
    out.append(task)
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
