"""`tq queue pause|resume|list`: queue-wide switches (admin for pause and resume).

`tq queue list` also shows each queue's cap (`tq cap`).

A paused queue accepts submits and hands nothing out: claims skip it on every
broker of the store (each broker re-reads the paused queues at least every
second), tasks already running finish normally. The pause is stored, so it
survives a broker restart; pausing a paused queue (or resuming a running one)
changes nothing and says so.
"""

from __future__ import annotations

from typing import Annotated, Any

import typer

from tq.cli.admin import _client
from tq.cli.caps import brief
from tq.cli.common import (
    BrokerOpt,
    CaOpt,
    InsecureOpt,
    JsonOpt,
    KeyOpt,
    OutputOpt,
    cell,
    emit,
    emit_text,
    output_mode,
    run_guarded,
    text_mode,
)

queue_app = typer.Typer(
    help="Queues: pause, resume, list (a paused queue accepts submits, hands nothing out).",
    no_args_is_help=True,
)
QueueArg = Annotated[str, typer.Argument(help="Queue name.")]


def _switch(
    name: str,
    pause: bool,
    broker: str | None,
    ca: Any,
    insecure: bool | None,
    api_key: str | None,
    as_json: bool,
    output: Any,
) -> None:
    def body() -> None:
        with _client(broker, ca, insecure, api_key) as client:
            answer = client.pause_queue(name) if pause else client.resume_queue(name)
        verb = "paused" if pause else "resumed"
        already = "was already paused" if pause else "was not paused"
        text = f"queue {answer['queue']} {verb if answer['changed'] else already}"
        emit_text(answer, text_mode(output, as_json), text)

    run_guarded(body)


@queue_app.command("pause")
def pause(
    queue: QueueArg,
    broker: BrokerOpt = None,
    ca: CaOpt = None,
    insecure: InsecureOpt = None,
    api_key: KeyOpt = None,
    as_json: JsonOpt = False,
    output: OutputOpt = None,
) -> None:
    """Stop handing out the queue's tasks (admin); submits are still accepted.

    Tasks already running finish. The pause is stored: the queue stays paused
    across broker restarts, on every broker of the store, until resumed.
    """
    _switch(queue, True, broker, ca, insecure, api_key, as_json, output)


@queue_app.command("resume")
def resume(
    queue: QueueArg,
    broker: BrokerOpt = None,
    ca: CaOpt = None,
    insecure: InsecureOpt = None,
    api_key: KeyOpt = None,
    as_json: JsonOpt = False,
    output: OutputOpt = None,
) -> None:
    """Hand out the queue's tasks again (admin); waiting workers claim them at once."""
    _switch(queue, False, broker, ca, insecure, api_key, as_json, output)


@queue_app.command("list")
def list_queues(
    broker: BrokerOpt = None,
    ca: CaOpt = None,
    insecure: InsecureOpt = None,
    api_key: KeyOpt = None,
    as_json: JsonOpt = False,
    output: OutputOpt = None,
) -> None:
    """Queues with unfinished tasks, paused or capped: pause, cap (`tq cap`) and counts."""

    def body() -> None:
        with _client(broker, ca, insecure, api_key) as client:
            depth = client.queue_depth()
        rows = [
            {
                "queue": q["queue"],
                "paused": bool(q.get("paused")),
                "cap": q.get("cap"),
                "total": q["total"],
                **q["states"],
            }
            for q in depth["queues"]
        ]
        emit(rows, output_mode(output, as_json), _table)

    run_guarded(body)


def _table(rows: list[dict[str, Any]]) -> Any:
    from rich.table import Table

    states = ("pending", "scheduled", "failed", "running", "blocked")
    table = Table()
    table.add_column("queue")
    table.add_column("paused")
    table.add_column("cap", no_wrap=True)
    for state in states:
        table.add_column(state, justify="right")
    for row in rows:
        counts = [str(row.get(state, 0)) for state in states]
        cap = row.get("cap")
        limits = "" if cap is None else brief(cap)
        table.add_row(cell(row["queue"]), "paused" if row["paused"] else "", cell(limits), *counts)
    if not rows:
        note = "(no queue has unfinished tasks, is paused or capped)"
        table.add_row(note, "", "", *[""] * len(states))
    return table


def register(app: typer.Typer) -> None:
    app.add_typer(queue_app, name="queue", rich_help_panel="Operations")
