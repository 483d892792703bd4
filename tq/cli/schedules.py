"""`tq schedule add|list|show|pause|resume|remove|run-now`: recurring schedules.

A schedule submits its task at each tick of a cron expression (five fields,
evaluated the way Debian's cron does, in the schedule's time zone). It lives
in the store, keyed by name: `add` is an upsert, so a deploy can declare its
schedules on every run without resetting them. Each tick fires exactly once,
across broker restarts and brokers sharing a store. Changing needs an admin
key; `list` and `show` a reader's.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from tq.cli import exits
from tq.cli.admin import _client
from tq.cli.common import (
    BrokerOpt,
    CaOpt,
    InsecureOpt,
    JsonOpt,
    KeyOpt,
    Output,
    OutputOpt,
    cell,
    compact,
    emit,
    emit_text,
    fail,
    fmt_time,
    kv_table,
    output_mode,
    parse_json,
    run_guarded,
    say,
    text_mode,
)

schedule_app = typer.Typer(
    help="Recurring schedules: submit a task at each tick of a cron expression.",
    no_args_is_help=True,
)
NameArg = Annotated[str, typer.Argument(help="Schedule name.")]


def _at(ts: float | None, zone: str) -> str:
    """A time in the schedule's own time zone, with its UTC offset."""
    if ts is None:
        return ""
    from datetime import datetime
    from zoneinfo import ZoneInfo

    try:
        return datetime.fromtimestamp(ts, ZoneInfo(zone)).isoformat(sep=" ", timespec="minutes")
    except (ValueError, OSError, OverflowError, KeyError):
        return fmt_time(ts)


def _next(schedule: dict[str, Any]) -> str:
    if schedule["paused"]:
        return "paused"
    return _at(schedule["next_at"], schedule["timezone"])


def _summary(schedule: dict[str, Any]) -> list[str]:
    zone = schedule["timezone"]
    runs = ", ".join(_at(at, zone) for at in schedule.get("next_runs") or [])
    return [
        f"schedule {schedule['name']}: {schedule['description']} ({schedule['timezone']}), "
        f"submits {schedule['task']['type']} to queue {schedule['task']['queue']}",
        "paused" if schedule["paused"] else f"next runs: {runs}",
    ]


@schedule_app.command("add")
def add(
    name: NameArg,
    cron: Annotated[
        str,
        typer.Option(
            "--cron",
            help="Cron expression, five fields: minute hour day-of-month month day-of-week "
            "(e.g. '*/5 * * * *', '0 9 * * MON-FRI').",
        ),
    ],
    task_type: Annotated[str, typer.Option("--type", help="Task type to submit at each tick.")],
    payload: Annotated[
        str | None, typer.Option("--payload", "-p", help="Payload as JSON.", show_default=False)
    ] = None,
    payload_file: Annotated[
        Path | None,
        typer.Option(
            "--payload-file", "-f", help="Payload JSON from this file.", show_default=False
        ),
    ] = None,
    timezone: Annotated[
        str | None,
        typer.Option(
            "--timezone",
            help="IANA time zone the expression is read in, e.g. Europe/Berlin (default UTC).",
            show_default=False,
        ),
    ] = None,
    missed: Annotated[
        str | None,
        typer.Option(
            "--missed",
            help="Ticks missed while no broker ran: skip (default), once (one task for them "
            "all) or all (one each, at most 100).",
            show_default=False,
        ),
    ] = None,
    queue: Annotated[
        str | None,
        typer.Option("--queue", "-q", help="Queue (default: default).", show_default=False),
    ] = None,
    priority: Annotated[
        str | None,
        typer.Option("--priority", help="0..255 or high, normal, low.", show_default=False),
    ] = None,
    max_retries: Annotated[
        int | None, typer.Option("--max-retries", min=0, help="Retries.", show_default=False)
    ] = None,
    timeout: Annotated[
        float | None,
        typer.Option("--timeout", min=0.001, help="Seconds a run may take.", show_default=False),
    ] = None,
    broker: BrokerOpt = None,
    ca: CaOpt = None,
    insecure: InsecureOpt = None,
    api_key: KeyOpt = None,
    as_json: JsonOpt = False,
    output: OutputOpt = None,
) -> None:
    """Add a schedule, or redeclare one by the same name (admin).

    Redeclaring keeps its history, and its next tick unless --cron or --timezone
    changed. Example:

      tq schedule add nightly-export --cron '0 3 * * *' --timezone Europe/Berlin --type export
    """
    if payload is not None and payload_file is not None:
        fail("give --payload or --payload-file, not both", exits.USAGE)
    value = None
    if payload is not None:
        value = parse_json(payload, "--payload")
    elif payload_file is not None:
        from tq.cli.tasks import _read_payload_file

        value = _read_payload_file(payload_file)

    def body() -> None:
        from tq.client._api import schedule_task

        task = schedule_task(
            task_type,
            value,
            queue=queue,
            priority=priority,
            max_retries=max_retries,
            timeout=timeout,
        )
        with _client(broker, ca, insecure, api_key) as client:
            answer = client.schedule(
                "add", name=name, cron=cron, timezone=timezone, task=task, missed=missed
            )
        schedule = answer["schedule"]
        mode = text_mode(output, as_json)
        if mode is not Output.table:
            emit_text(answer, mode, None)
            return
        verb = "added" if answer["created"] else "updated"
        first, second = _summary(schedule)
        say(f"{first} ({verb})")
        say(second)

    run_guarded(body)


@schedule_app.command("list")
def list_schedules(
    broker: BrokerOpt = None,
    ca: CaOpt = None,
    insecure: InsecureOpt = None,
    api_key: KeyOpt = None,
    as_json: JsonOpt = False,
    output: OutputOpt = None,
) -> None:
    """Every schedule: its cron expression, task, next run and last one."""

    def body() -> None:
        with _client(broker, ca, insecure, api_key) as client:
            schedules = client.schedule("list")["schedules"]
        emit(schedules, output_mode(output, as_json), _table)

    run_guarded(body)


def _table(schedules: list[dict[str, Any]]) -> Any:
    from rich.table import Table

    table = Table()
    for column in ("name", "cron", "timezone", "task", "queue", "next run", "last run", "fired"):
        table.add_column(column, justify="right" if column == "fired" else "left")
    for s in schedules:
        table.add_row(
            cell(s["name"]),
            cell(s["cron"]),
            cell(s["timezone"]),
            cell(s["task"]["type"]),
            cell(s["task"]["queue"]),
            cell(_next(s)),
            cell(_at(s["last_fired_at"], s["timezone"])),
            str(s["fired"]),
        )
    if not schedules:
        table.add_row("(no schedules: tq schedule add NAME --cron ... --type ...)", *[""] * 7)
    return table


@schedule_app.command("show")
def show(
    name: NameArg,
    broker: BrokerOpt = None,
    ca: CaOpt = None,
    insecure: InsecureOpt = None,
    api_key: KeyOpt = None,
    as_json: JsonOpt = False,
    output: OutputOpt = None,
) -> None:
    """One schedule, with its next five runs."""

    def body() -> None:
        with _client(broker, ca, insecure, api_key) as client:
            schedule = client.schedule("get", name=name)["schedule"]
        emit(schedule, output_mode(output, as_json), _details)

    run_guarded(body)


def _details(s: dict[str, Any]) -> Any:
    rows: list[tuple[str, Any]] = [
        ("name", s["name"]),
        ("cron", f"{s['cron']}  ({s['description']})"),
        ("timezone", s["timezone"]),
        ("task", compact(s["task"], 100)),
        ("missed ticks", s["missed"]),
        ("state", "paused" if s["paused"] else "active"),
        ("next runs", "\n".join(_at(at, s["timezone"]) for at in s["next_runs"]) or "-"),
        ("last run", _at(s["last_fired_at"], s["timezone"]) or "-"),
        ("last task", s["last_task"] or "-"),
        ("fired", str(s["fired"])),
    ]
    return kv_table(rows)


def _switch(op: str, name: str, args: tuple[Any, ...]) -> None:
    broker, ca, insecure, api_key, as_json, output = args

    def body() -> None:
        with _client(broker, ca, insecure, api_key) as client:
            answer = client.schedule(op, name=name)
        if op == "remove":
            text = f"schedule {name} removed" if answer["removed"] else f"no schedule {name}"
        elif op == "run_now":
            text = answer["task"]
        else:
            done = "paused" if op == "pause" else "resumed"
            already = "was already paused" if op == "pause" else "was not paused"
            text = f"schedule {name} {done if answer['changed'] else already}"
            if op == "resume" and answer["changed"]:
                text += f"; next run {_next(answer['schedule'])}"
        emit_text(answer, text_mode(output, as_json), text)

    run_guarded(body)


def _command(op: str, summary: str) -> Callable[..., None]:
    """One of the commands that only name a schedule: the same options, one request."""

    def command(
        name: NameArg,
        broker: BrokerOpt = None,
        ca: CaOpt = None,
        insecure: InsecureOpt = None,
        api_key: KeyOpt = None,
        as_json: JsonOpt = False,
        output: OutputOpt = None,
    ) -> None:
        _switch(op, name, (broker, ca, insecure, api_key, as_json, output))

    command.__doc__ = summary
    return command


for _op, _name, _help in (
    ("pause", "pause", "Stop firing the schedule (admin); ticks while paused are not fired later."),
    ("resume", "resume", "Fire the schedule again from its next tick (admin)."),
    ("remove", "remove", "Delete the schedule (admin); tasks it already submitted stay."),
    (
        "run_now",
        "run-now",
        "Submit the schedule's task once now (admin); prints its id. Its ticks go on.",
    ),
):
    schedule_app.command(_name)(_command(_op, _help))


def register(app: typer.Typer) -> None:
    app.add_typer(schedule_app, name="schedule", rich_help_panel="Operations")
