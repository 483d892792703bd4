"""`tq history ID`: every transition of a task, oldest first.

On a terminal a table (number, time, event, new state, who, details); a gap
row counts transitions dropped from the middle of a long history (the broker
keeps the first and the latest). Elsewhere (or with --json / --output) the
broker's rows: JSON lines, one transition a line.
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
    fmt_time,
    output_mode,
    run_guarded,
)
from tq.cli.workflows import STYLES


def history(
    task_id: Annotated[str, typer.Argument(help="Id of the task.")],
    broker: BrokerOpt = None,
    ca: CaOpt = None,
    insecure: InsecureOpt = None,
    api_key: KeyOpt = None,
    as_json: JsonOpt = False,
    output: OutputOpt = None,
) -> None:
    """Show every transition of a task: submitted, leased (worker, token), failed
    (error, retry time), lease lost, succeeded, cancelled (by whom), retried...

    A table on a terminal; JSON lines in a pipe (one transition a line: n, at, event,
    state, actor, worker, token, error, run_at, priority), or --output json.
    """

    def body() -> None:
        with _client(broker, ca, insecure, api_key) as client:
            rows = client.history(task_id)
        emit(rows, output_mode(output, as_json), render)

    run_guarded(body)


def render(rows: list[dict[str, Any]]) -> Any:
    from rich.table import Table

    from tq.core.history import details, gaps, who

    table = Table(box=None, header_style="bold")
    for name in ("#", "time", "event", "state", "by", "details"):
        table.add_column(name)
    for row, dropped in gaps(rows):
        if row is None:
            table.add_row("", "", f"[dim]... {dropped} transition(s) not kept[/dim]", "", "", "")
            continue
        style = STYLES.get(str(row.get("state")), "white")
        table.add_row(
            str(row.get("n")),
            fmt_time(row.get("at")),
            cell(row.get("event")),
            cell(row.get("state"), style=style),
            cell(who(row)),
            cell(details(row, fmt_time)),
        )
    return table
