"""`tq workflow show ID`: the tasks linked to a task by dependencies, with their states.

On a terminal a tree: the tasks that depend on nothing at the top, each task's
dependents under it, a straight run of a chain at one indentation, a task
reached a second time (a chord's callback, under each member of its group)
named but not expanded again, at most MAX_LINES lines. Elsewhere (or with
--json / --output) the broker's answer: ``{"tasks", "edges", "truncated"}``.
"""

from __future__ import annotations

from typing import Annotated, Any

import typer

from tq.cli.admin import _client
from tq.cli.common import (
    BrokerOpt,
    CaOpt,
    InsecureOpt,
    JsonOpt,
    KeyOpt,
    OutputOpt,
    cell,
    emit,
    output_mode,
    run_guarded,
)

MAX_LINES = 500
STYLES = {
    "succeeded": "green",
    "running": "cyan",
    "pending": "white",
    "blocked": "yellow",
    "scheduled": "blue",
    "failed": "magenta",
    "dead": "red",
    "cancelled": "dim",
}

workflow_app = typer.Typer(
    help="Workflows: tasks linked by dependencies (chains, groups, chords).",
    no_args_is_help=True,
)


@workflow_app.command("show")
def show(
    task_id: Annotated[str, typer.Argument(help="Id of any task of the workflow.")],
    broker: BrokerOpt = None,
    ca: CaOpt = None,
    insecure: InsecureOpt = None,
    api_key: KeyOpt = None,
    as_json: JsonOpt = False,
    output: OutputOpt = None,
) -> None:
    """Draw the workflow around a task: every task linked to it by dependencies, with states.

    A tree on a terminal; JSON in a pipe or with --json: "tasks" (task maps), "edges"
    (pairs: a task's id, the id of a task it depends on) and "truncated".
    """

    def body() -> None:
        with _client(broker, ca, insecure, api_key) as client:
            graph = client.workflow(task_id)
        emit(graph, output_mode(output, as_json), render)

    run_guarded(body)


def dependency_links(client: Any, task_id: str) -> dict[str, list[dict[str, Any]]]:
    """The task's dependencies and dependents with their states (``links``), the
    keys present only when not empty."""
    from tq.core.errors import InvalidRequest
    from tq.core.workflow import links

    try:
        graph = client.workflow(task_id)
    except InvalidRequest:  # a broker older than workflows: no links to show
        return {}
    found = links(graph, task_id)
    return {key: value for key, value in found.items() if value}


def render(graph: dict[str, Any]) -> Any:
    """The graph as a rich Tree (see the module docstring)."""
    from rich.tree import Tree

    tasks = {t["id"]: t for t in graph["tasks"]}
    deps: dict[str, list[str]] = {task_id: [] for task_id in tasks}
    dependents: dict[str, list[str]] = {task_id: [] for task_id in tasks}
    for task, dep in graph["edges"]:
        deps.setdefault(task, []).append(dep)
        dependents.setdefault(dep, []).append(task)
    counts: dict[str, int] = {}
    for t in tasks.values():
        counts[t["state"]] = counts.get(t["state"], 0) + 1
    summary = ", ".join(f"{n} {state}" for state, n in sorted(counts.items()))
    more = " (cut short: the workflow is larger)" if graph.get("truncated") else ""
    tree = Tree(f"workflow of {len(tasks)} task(s): {summary}{more}")
    shown: set[str] = set()
    lines = [0]

    def label(task_id: str, again: bool) -> str:
        task = tasks.get(task_id)
        if task is None:
            return f"[dim]{task_id} (not visible: purged, or another queue)[/dim]"
        style = STYLES.get(task["state"], "white")
        text = f"[{style}]{task['state']:<9}[/{style}] {cell(task['type'])} {task_id}"
        return text + (" [dim](shown above)[/dim]" if again else "")

    def add(parent: Any, node: str) -> None:
        while True:
            if lines[0] >= MAX_LINES:
                return
            lines[0] += 1
            again = node in shown
            branch = parent.add(label(node, again))
            if again:
                return
            shown.add(node)
            kids = dependents.get(node, [])
            if len(kids) == 1 and len(deps.get(kids[0], [])) == 1:
                node = kids[0]  # a chain: its next step at the same indentation
                continue
            for kid in kids:
                add(branch, kid)
            return

    roots = [task_id for task_id in tasks if not deps.get(task_id)]
    roots += [dep for dep in dependents if dep not in tasks]  # purged or hidden sources
    for root in dict.fromkeys(roots):
        add(tree, root)
    if lines[0] >= MAX_LINES:
        tree.add(f"[dim]... the first {MAX_LINES} lines only; --json gives every task[/dim]")
    return tree


def register(app: typer.Typer) -> None:
    app.add_typer(workflow_app, name="workflow", rich_help_panel="Tasks")
