"""Task commands: submit, status, list, cancel, stats, workers (wait, retry: admin.py).

Each one-shot command uses the blocking client (no trio start-up cost);
`tq submit -` uses the trio client to pipeline batches from stdin.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from tq.cli import exits
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
    interactive,
    kv_table,
    output_mode,
    parse_json,
    run_guarded,
    say,
    settings,
    task_rows,
    text_mode,
)
from tq.core.limits import MAX_PAYLOAD_BYTES

# the states a task can be in
LISTED_STATES = (
    "pending", "scheduled", "blocked", "running", "succeeded", "failed", "dead", "cancelled",
)  # fmt: skip
_DUE_STATES = ("scheduled", "failed")  # a due time (run_at) in the listing: when it runs

if TYPE_CHECKING:
    from tq.client import BlockingClient


def _client(
    broker: str | None, ca: Path | None, insecure: bool | None, key: str | None
) -> BlockingClient:
    from tq.client import BlockingClient

    return BlockingClient.from_settings(settings(broker=broker, ca=ca, insecure=insecure, key=key))


SHORT_ID = 13  # "…" and the id's last 12 characters (its random part)


def short_id(task_id: str) -> str:
    return task_id if len(task_id) <= SHORT_ID else "…" + task_id[-(SHORT_ID - 1) :]


def _width_needed(tasks: list[dict[str, Any]], errors: bool) -> int:
    """Columns a table with whole ids needs: ids, the short columns at their width (at
    most 20), some payload (and error) text, 3 per column for borders and padding."""
    short = sum(min(20, max((len(str(t[k])) for t in tasks), default=0)) for k in LABELS)
    columns = 8 + errors
    return 36 + short + 4 + 3 + 19 + 12 + (24 if errors else 0) + 3 * columns + 1


LABELS = ("type", "queue", "state")


def _tasks_table(tasks: list[dict[str, Any]], wide: bool | None = None) -> Any:
    """Ids on one line, never wrapped: whole ones with --wide or on a wide terminal,
    else shortened (say so in the caption). An error column for failed and dead tasks."""
    from rich.console import Console
    from rich.table import Table

    errors = any(t.get("error") for t in tasks)
    due = any(t.get("run_at") is not None and t["state"] in _DUE_STATES for t in tasks)
    whole = wide if wide is not None else Console().width >= _width_needed(tasks, errors)
    table = Table(
        caption=None if whole else "ids shortened: --wide or --output jsonl for whole ids"
    )
    table.add_column("id", no_wrap=True, min_width=36 if whole else SHORT_ID)
    # names are cut (with an ellipsis) only when the terminal is too narrow for them
    names = None if wide or Console().width >= 160 else 20
    for column in ("type", "queue", "state"):
        table.add_column(column, overflow="ellipsis", no_wrap=True, max_width=names)
    table.add_column("prio", justify="right")
    table.add_column("att", justify="right")
    table.add_column("created", no_wrap=True)
    if due:
        table.add_column("due", no_wrap=True)
    table.add_column("payload", overflow="ellipsis", no_wrap=True, ratio=1)
    if errors:
        table.add_column("error", overflow="ellipsis", no_wrap=True, ratio=2)
    for t in tasks:
        row = [
            cell(t["id"] if whole else short_id(t["id"])),
            cell(t["type"]),
            cell(t["queue"]),
            cell(t["state"]),
            str(t["priority"]),
            str(t["attempts"]),
            fmt_time(t["created_at"]),
        ]
        if due:
            run_at = t.get("run_at")
            row.append(fmt_time(run_at) if run_at is not None and t["state"] in _DUE_STATES else "")
        row += [cell(compact(t["payload"], 30))]
        if errors:
            error = t.get("error") or {}
            row.append(cell(f"{error['type']}: {error['message']}" if error else ""))
        table.add_row(*row)
    return table


def submit(
    type: Annotated[
        str | None,
        typer.Argument(
            help="Task type (handler name), or - to read JSON "
            "lines from stdin, one task map per line (not with --workflow).",
            show_default=False,
        ),
    ] = None,
    payload: Annotated[
        str | None, typer.Option("--payload", "-p", help="Payload as JSON.", show_default=False)
    ] = None,
    payload_file: Annotated[
        Path | None,
        typer.Option(
            "--payload-file",
            "-f",
            help="Read the payload JSON from this file (- for stdin).",
            show_default=False,
        ),
    ] = None,
    priority: Annotated[
        str | None,
        typer.Option(
            "--priority",
            help="0..255 (255 highest) or high, normal, low (default normal=100).",
            show_default=False,
        ),
    ] = None,
    queue: Annotated[
        str | None,
        typer.Option("--queue", "-q", help="Queue (default: default).", show_default=False),
    ] = None,
    max_retries: Annotated[
        int | None,
        typer.Option(
            "--max-retries",
            min=0,
            help="Retries after the first attempt (default 3).",
            show_default=False,
        ),
    ] = None,
    timeout: Annotated[
        float | None,
        typer.Option(
            "--timeout", min=0.001, help="Seconds a run may take (default 300).", show_default=False
        ),
    ] = None,
    key: Annotated[
        str | None,
        typer.Option(
            "--idempotency-key",
            help="Submitting the same key again returns the first task instead of a new one.",
            show_default=False,
        ),
    ] = None,
    depends_on: Annotated[
        list[str] | None,
        typer.Option(
            "--depends-on",
            help="Id of a task this one waits for (repeatable): it stays blocked until "
            "every one succeeded.",
            show_default=False,
        ),
    ] = None,
    on_dependency_failure: Annotated[
        str | None,
        typer.Option(
            "--on-dependency-failure",
            help="When a dependency ends dead or cancelled: cancel (this task too, the "
            "default), run (once all have finished) or wait (stay blocked until it is "
            "retried and succeeds).",
            show_default=False,
        ),
    ] = None,
    delay: Annotated[
        str | None,
        typer.Option(
            "--delay",
            help="Run no earlier than this long from now: 30s, 5m, 2h, 1d, 1h30m or seconds. "
            "The task waits in state scheduled.",
            show_default=False,
        ),
    ] = None,
    at: Annotated[
        str | None,
        typer.Option(
            "--at",
            help="Run no earlier than this time, RFC 3339 with a zone: "
            "2026-12-01T09:00:00Z or 2026-12-01T10:00:00+01:00 (with --delay: the later).",
            show_default=False,
        ),
    ] = None,
    unique_for: Annotated[
        str | None,
        typer.Option(
            "--unique-for",
            help="A unique task: while a task of the same type and payload (or --unique-key) "
            "in the queue is unfinished, or for this long after it was submitted (1h, 30m, "
            "7d, seconds), submitting again prints that task's id instead of adding one.",
            show_default=False,
        ),
    ] = None,
    unique_key: Annotated[
        str | None,
        typer.Option(
            "--unique-key",
            help="With --unique-for: the key that makes tasks the same (default: the "
            "type and the payload).",
            show_default=False,
        ),
    ] = None,
    workflow: Annotated[
        Path | None,
        typer.Option(
            "--workflow",
            "-w",
            help="Submit a workflow: a JSON document of chains, groups and chords "
            "(docs/CLI.md), all its tasks or none; - reads stdin. Prints every task's id.",
            show_default=False,
        ),
    ] = None,
    listed: Annotated[
        bool,
        typer.Option(
            "--from-list",
            help="With -: lines may be tasks as `tq list --output jsonl` prints them; "
            "read-only fields (id, state, attempts, times, result, error...) are dropped.",
        ),
    ] = False,
    broker: BrokerOpt = None,
    ca: CaOpt = None,
    insecure: InsecureOpt = None,
    api_key: KeyOpt = None,
    as_json: JsonOpt = False,
    output: OutputOpt = None,
) -> None:
    """Submit a task; print its id once the broker has stored it durably.

    Examples:

      tq submit echo --payload '{"x": 1}'

      cat jobs.jsonl | tq submit - | jq -r .id

      tq submit notify --depends-on ID1 --depends-on ID2

      tq submit report --delay 30m    tq submit report --at 2026-12-01T09:00:00Z

      tq submit export --payload '{"day": "2026-12-05"}' --unique-for 1d

      tq submit --workflow thumbnails.json

    With -, one JSON line out per input line (whatever --output says); a batch goes
    out at 250 lines or 0.2 s after its first line; Ctrl-C prints the ids of every
    stored task and the input line it stopped after (exit 130).
    """
    if workflow is not None:
        given = (type, payload, payload_file, delay, at)
        if any(v is not None for v in given) or depends_on:
            fail(
                "--workflow takes the whole workflow from its file: give no task type, "
                "payload, --depends-on, --delay or --at with it",
                exits.USAGE,
            )
        file = workflow
        run_guarded(lambda: _submit_workflow(file, broker, ca, insecure, api_key, output, as_json))
        return
    if type is None:
        fail("give a task type (or - for task lines on stdin, or --workflow FILE)", exits.USAGE)
    if listed and type != "-":
        fail("--from-list goes with `tq submit -` (task lines on stdin)", exits.USAGE)
    if type == "-":
        if payload is not None or payload_file is not None or delay is not None or at is not None:
            fail(
                "with `tq submit -` each stdin line is a whole task map; put the payload "
                '(and "delay" seconds or "run_at" epoch seconds) inside it',
                exits.USAGE,
            )
        run_guarded(lambda: _submit_stdin(broker, ca, insecure, api_key, listed))
        return
    if payload is not None and payload_file is not None:
        fail("give --payload or --payload-file, not both", exits.USAGE)
    value = None
    if payload is not None:
        value = parse_json(payload, "--payload")
    elif payload_file is not None:
        value = _read_payload_file(payload_file)
    if unique_key is not None and unique_for is None:
        fail("--unique-key goes with --unique-for (how long the key is held)", exits.USAGE)
    options: dict[str, Any] = {
        "queue": queue,
        "priority": priority,
        "max_retries": max_retries,
        "timeout": timeout,
        "idempotency_key": key,
        "depends_on": depends_on or None,
        "on_dependency_failure": on_dependency_failure,
        **_due_options(delay, at),
        "unique_for": None if unique_for is None else _duration(unique_for, "--unique-for"),
        "unique_key": unique_key,
    }

    def body() -> None:
        from tq.client._api import task_spec

        with _client(broker, ca, insecure, api_key) as client:
            [answer] = client.submit_items([task_spec(type, value, **options)])
        task_id = answer["id"]
        if "warning" in answer:
            say(f"tq: warning: {answer['warning']}", err=True)
        if not answer.get("created", True):
            say(
                f"tq: not submitted again: task {task_id} holds the same "
                f"{'unique key' if unique_for is not None else 'idempotency key'}",
                err=True,
            )
        data = {"id": task_id, "created": bool(answer.get("created", True))}
        emit_text(data, text_mode(output, as_json), task_id)

    run_guarded(body)


def _due_options(delay: str | None, at: str | None) -> dict[str, Any]:
    """--delay and --at as the wire's delay and run_at (refused here when malformed)."""
    from tq.core.errors import InvalidRequest
    from tq.core.when import parse_duration, parse_time

    out: dict[str, Any] = {}
    for flag, text, parse, field in (
        ("--delay", delay, parse_duration, "delay"),
        ("--at", at, parse_time, "run_at"),
    ):
        if text is not None:
            try:
                out[field] = parse(text)
            except InvalidRequest as exc:
                fail(f"{flag}: {exc}", exits.USAGE)
    return out


def _duration(text: str, what: str) -> float:
    from tq.core.units import seconds

    try:
        return seconds(text, what)
    except ValueError as exc:
        fail(str(exc), exits.USAGE)


def _submit_workflow(
    path: Path,
    broker: str | None,
    ca: Path | None,
    insecure: bool | None,
    api_key: str | None,
    output: Any,
    as_json: bool,
) -> None:
    """`tq submit --workflow FILE`: one submit of the document's tasks; their ids."""
    from tq.core.workflow import compile_workflow

    try:
        text = sys.stdin.read() if str(path) == "-" else path.read_text(encoding="utf-8")
    except OSError as exc:
        fail(f"cannot read workflow file {path}: {exc.strerror}", exits.USAGE)
    except UnicodeDecodeError:
        fail(f"workflow file {path} is not UTF-8 text", exits.USAGE)
    tasks = compile_workflow(parse_json(text, f"workflow file {path}"))
    with _client(broker, ca, insecure, api_key) as client:
        answers = client.submit_items(tasks)
    ids = [answer["id"] for answer in answers]
    for message in dict.fromkeys(a["warning"] for a in answers if "warning" in a):
        say(f"tq: warning: {message}", err=True)
    data = {"id": ids[-1], "tasks": ids}
    text = "\n".join(ids) + f"\n(tq workflow show {ids[-1]} draws it)"
    emit_text(data, text_mode(output, as_json), text)


# JSON text read at most for a payload: a payload is at most MAX_PAYLOAD_BYTES once
# encoded, and its JSON text (escapes, spaces) a few times that at most
PAYLOAD_FILE_LIMIT = 4 * MAX_PAYLOAD_BYTES


def _read_payload_file(path: Path) -> Any:
    try:
        if str(path) == "-":
            data = sys.stdin.buffer.read(PAYLOAD_FILE_LIMIT + 1)
        else:
            with path.open("rb") as file:  # bounded: /dev/zero or a huge file never ends
                data = file.read(PAYLOAD_FILE_LIMIT + 1)
        if len(data) > PAYLOAD_FILE_LIMIT:
            fail(
                f"payload file {path} is over {PAYLOAD_FILE_LIMIT // (1024 * 1024)} MiB; a "
                f"payload is at most {MAX_PAYLOAD_BYTES // (1024 * 1024)} MiB once encoded: "
                "store large data elsewhere and pass a reference",
                exits.USAGE,
            )
        text = data.decode("utf-8")
    except OSError as exc:
        fail(f"cannot read payload file {path}: {exc.strerror}", exits.USAGE)
    except UnicodeDecodeError:
        fail(f"payload file {path} is not UTF-8 text", exits.USAGE)
    return parse_json(text, f"payload file {path}")


def _submit_stdin(
    broker: str | None, ca: Path | None, insecure: bool | None, key: str | None, listed: bool
) -> None:
    """`tq submit -` (tq/cli/stdin_submit.py); the summary and the exit status here."""
    from tq.cli.stdin_submit import submit_stdin

    conf = settings(broker=broker, ca=ca, insecure=insecure, key=key)
    done = submit_stdin(conf, listed)
    if done.interrupted:
        lost = (
            f"; {done.abandoned} request(s) in flight were abandoned by a second signal: "
            "their tasks may be stored without their ids printed"
            if done.abandoned
            else ""
        )
        typer.echo(
            f"tq: interrupted ({done.interrupted}): {done.submitted} task(s) submitted, "
            f"{done.refused} line(s) refused; stopped after input line {done.last_line} "
            f"(resume from line {done.last_line + 1}: tail -n +{done.last_line + 1}){lost}",
            err=True,
        )
        raise typer.Exit(130)
    if interactive():
        typer.echo(f"submitted {done.submitted} task(s)", err=True)
    if done.refused:
        fail(f"{done.refused} line(s) were not submitted (see the error lines above)", exits.USAGE)


def status(
    task_id: Annotated[str, typer.Argument(help="Task id.")],
    broker: BrokerOpt = None,
    ca: CaOpt = None,
    insecure: InsecureOpt = None,
    api_key: KeyOpt = None,
    as_json: JsonOpt = False,
    output: OutputOpt = None,
) -> None:
    """Show one task: state, attempts, payload, result or error, and the tasks it
    depends on and that depend on it, with their states (JSON: "depends_on" and
    "dependents", present when it has any)."""

    def body() -> None:
        from tq.cli.workflows import dependency_links

        with _client(broker, ca, insecure, api_key) as client:
            task = client.get(task_id).to_dict()
            task.update(dependency_links(client, task_id))
        emit(task, output_mode(output, as_json), lambda t: kv_table(task_rows(t)))

    run_guarded(body)


def explain(
    task_id: Annotated[str, typer.Argument(help="Task id.")],
    broker: BrokerOpt = None,
    ca: CaOpt = None,
    insecure: InsecureOpt = None,
    api_key: KeyOpt = None,
    as_json: JsonOpt = False,
    output: OutputOpt = None,
) -> None:
    """Say why a task is not running right now, in words (--json: reasons with codes).

    For example: scheduled for later, a retry due after a failed attempt, no
    connected worker takes its queue or handles its type, every worker that could
    run it busy, its queue's or type's cap full (`tq cap list`) or rate bucket
    empty, waiting behind N tasks of higher priority, leased to a worker
    (with its last heartbeat), or finished.
    """

    def body() -> None:
        with _client(broker, ca, insecure, api_key) as client:
            answer = client.explain(task_id)
        mode = text_mode(output, as_json)
        if mode is not Output.table:
            emit_text(answer, mode, None)
            return
        say(f"task {answer['task']} is {answer['state']}")  # each line inert text
        for reason in answer["reasons"]:
            say(f"  - {reason['message']}")

    run_guarded(body)


def list_(
    state: Annotated[
        str | None,
        typer.Option(
            "--state",
            "-s",
            help=f"{', '.join(LISTED_STATES)}.",
            show_default=False,
        ),
    ] = None,
    type: Annotated[
        str | None, typer.Option("--type", "-t", help="Task type.", show_default=False)
    ] = None,
    queue: Annotated[
        str | None, typer.Option("--queue", "-q", help="Queue.", show_default=False)
    ] = None,
    limit: Annotated[int, typer.Option("--limit", "-n", min=1, max=10000)] = 100,
    after: Annotated[
        str | None,
        typer.Option(
            "--after",
            help="Cursor: list tasks after this id (the last id of the previous page).",
            show_default=False,
        ),
    ] = None,
    newest: Annotated[
        bool, typer.Option("--newest", help="Newest first (default: oldest first).")
    ] = False,
    wide: Annotated[
        bool,
        typer.Option(
            "--wide",
            "-W",
            help="Table: whole ids even on a terminal too narrow for them (there they are "
            "shortened to their last 12 characters).",
        ),
    ] = False,
    broker: BrokerOpt = None,
    ca: CaOpt = None,
    insecure: InsecureOpt = None,
    api_key: KeyOpt = None,
    as_json: JsonOpt = False,
    output: OutputOpt = None,
) -> None:
    """List tasks, oldest (or --newest) first, filtered by state, type and queue."""
    if state is not None and state not in LISTED_STATES:
        fail(f"unknown state {state!r}; one of: {', '.join(LISTED_STATES)}", exits.USAGE)

    def body() -> None:
        with _client(broker, ca, insecure, api_key) as client:
            page = client.list(
                state=state, type=type, queue=queue, limit=limit, after=after, newest_first=newest
            )
        mode = output_mode(output, as_json)
        rows = [t.to_dict() for t in page.tasks]
        emit(rows, mode, lambda data: _tasks_table(data, True if wide else None))
        if page.next and mode is Output.table:
            again = " --newest" if newest else ""
            typer.echo(f"more: tq list{again} --after {page.next}", err=True)

    run_guarded(body)


def stats(
    broker: BrokerOpt = None,
    ca: CaOpt = None,
    insecure: InsecureOpt = None,
    api_key: KeyOpt = None,
    as_json: JsonOpt = False,
    output: OutputOpt = None,
) -> None:
    """Task counts per queue and state, last minute's throughput and failure rate."""

    def table(data: dict[str, Any]) -> Any:
        from rich.table import Table

        states = ["pending", "scheduled", "running", "failed", "succeeded", "dead", "cancelled"]
        recent = data.get("last_minute") or {}
        t = Table(
            title=cell(
                f"broker {data['broker']} {data['version']}, "
                f"up {data['uptime']:.0f}s, {data['workers']} worker(s)"
            ),
            caption=cell("\n".join(filter(None, [_last_minute(recent), _caps(data)]))),
        )
        t.add_column("queue")
        for s in states:
            t.add_column(s, justify="right")
        t.add_column("done/min", justify="right")
        t.add_column("fail %", justify="right")
        paused = set(data.get("paused") or ())
        for queue, counts in sorted(data["queues"].items()):
            row = (recent.get("queues") or {}).get(queue) or {}
            done = row.get("succeeded", 0) + row.get("failed", 0)
            rate = f"{100 * row.get('failed', 0) / done:.1f}" if done else ""
            name = cell(f"{queue} (paused)" if queue in paused else queue)
            t.add_row(name, *(str(counts.get(s, 0)) for s in states), str(done), rate)
        return t

    def body() -> None:
        with _client(broker, ca, insecure, api_key) as client:
            data = client.stats()
        emit(data, output_mode(output, as_json), table)

    run_guarded(body)


def _caps(data: dict[str, Any]) -> str:
    from tq.cli.caps import brief

    caps = data.get("caps") or []
    return "caps: " + "; ".join(f"{c['kind']} {c['name']} {brief(c)}" for c in caps) if caps else ""


def _last_minute(recent: dict[str, Any]) -> str:
    if not recent:
        return ""
    rate = recent.get("failure_rate")
    failures = "no finished attempts" if rate is None else f"failure rate {100 * rate:.1f} %"
    total = recent.get("total") or {}
    return (
        f"last minute: {recent.get('throughput', 0.0):.1f} tasks/s finished, {failures}, "
        f"{total.get('submitted', 0)} submitted"
    )


def workers(
    broker: BrokerOpt = None,
    ca: CaOpt = None,
    insecure: InsecureOpt = None,
    api_key: KeyOpt = None,
    as_json: JsonOpt = False,
    output: OutputOpt = None,
) -> None:
    """Workers known to the broker: host, queues, concurrency, load, last heartbeat."""

    def table(rows: list[dict[str, Any]]) -> Any:
        from rich.table import Table

        t = Table()
        for column in (
            "id",
            "host",
            "pid",
            "queues",
            "conc",
            "running",
            "cpu%",
            "rss MB",
            "heartbeat",
        ):
            t.add_column(column)
        for w in rows:
            mem = "" if w["memory"] is None else f"{w['memory'] / 1e6:.0f}"
            cpu = "" if w["cpu"] is None else f"{w['cpu']:.0f}"
            t.add_row(
                cell(w["id"]),
                cell(w["host"]),
                cell(w["pid"]),
                cell(",".join(w["queues"])),
                cell(w["concurrency"]),
                cell(w["running"]),
                cpu,
                mem,
                f"{w['heartbeat_age']:.0f}s ago",
            )
        return t

    def body() -> None:
        with _client(broker, ca, insecure, api_key) as client:
            rows = client.workers()
        emit(rows, output_mode(output, as_json), table)

    run_guarded(body)
