"""Task commands: submit, status, list, cancel, stats, workers (wait, retry: admin.py).

Each one-shot command uses the blocking client (no trio start-up cost);
`tq submit -` uses the trio client to pipeline batches from stdin.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
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
    dumps,
    emit,
    fail,
    fmt_time,
    interactive,
    kv_table,
    output_mode,
    parse_json,
    progress,
    run_guarded,
    say,
    settings,
    task_rows,
)
from tq.core.text import inert

if TYPE_CHECKING:
    from tq.client import BlockingClient

STDIN_BATCH = 250  # tasks per request: one request is one transaction (see OPERATIONS.md)
STDIN_IN_FLIGHT = 8


def _client(
    broker: str | None, ca: Path | None, insecure: bool | None, key: str | None
) -> BlockingClient:
    from tq.client import BlockingClient

    return BlockingClient.from_settings(settings(broker=broker, ca=ca, insecure=insecure, key=key))


def _tasks_table(tasks: list[dict[str, Any]]) -> Any:
    from rich.table import Table

    table = Table()
    for column in ("id", "type", "queue", "state", "prio", "att", "created", "payload"):
        table.add_column(column, overflow="fold" if column == "id" else "ellipsis")
    for t in tasks:
        table.add_row(
            cell(t["id"]),
            cell(t["type"]),
            cell(t["queue"]),
            cell(t["state"]),
            str(t["priority"]),
            str(t["attempts"]),
            fmt_time(t["created_at"]),
            cell(compact(t["payload"], 30)),
        )
    return table


def submit(
    type: Annotated[
        str,
        typer.Argument(
            help="Task type (handler name), or - to read JSON "
            "lines from stdin, one task map per line."
        ),
    ],
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
    broker: BrokerOpt = None,
    ca: CaOpt = None,
    insecure: InsecureOpt = None,
    api_key: KeyOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Submit a task; print its id once the broker has stored it durably.

    Examples:

      tq submit echo --payload '{"x": 1}'

      cat jobs.jsonl | tq submit - | jq -r .id
    """
    if type == "-":
        if payload is not None or payload_file is not None:
            fail(
                "with `tq submit -` each stdin line is a whole task map; put the payload inside it",
                exits.USAGE,
            )
        run_guarded(lambda: _submit_stdin(broker, ca, insecure, api_key))
        return
    if payload is not None and payload_file is not None:
        fail("give --payload or --payload-file, not both", exits.USAGE)
    value = None
    if payload is not None:
        value = parse_json(payload, "--payload")
    elif payload_file is not None:
        value = _read_payload_file(payload_file)
    options: dict[str, Any] = {
        "queue": queue,
        "priority": priority,
        "max_retries": max_retries,
        "timeout": timeout,
        "idempotency_key": key,
    }

    def body() -> None:
        from tq.client._api import task_spec

        with _client(broker, ca, insecure, api_key) as client:
            [answer] = client.submit_items([task_spec(type, value, **options)])
        task_id = answer["id"]
        if "warning" in answer:
            say(f"tq: warning: {answer['warning']}", err=True)
        if as_json:
            typer.echo(dumps({"id": task_id}))
        else:
            typer.echo(task_id)

    run_guarded(body)


def _read_payload_file(path: Path) -> Any:
    try:
        text = sys.stdin.read() if str(path) == "-" else path.read_text(encoding="utf-8")
    except OSError as exc:
        fail(f"cannot read payload file {path}: {exc.strerror}", exits.USAGE)
    except UnicodeDecodeError:
        fail(f"payload file {path} is not UTF-8 text", exits.USAGE)
    return parse_json(text, f"payload file {path}")


def _stdin_batches() -> Iterator[list[tuple[int, Any]]]:
    """(line number, parsed JSON or a string error) in batches."""
    import json

    from tq.core.errors import ProtocolError
    from tq.protocol.frames import pack

    batch: list[tuple[int, Any]] = []
    for number, line in enumerate(sys.stdin, start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            pack(item)  # what cannot be sent (a lone surrogate, a 100-bit int) fails this line only
        except json.JSONDecodeError as exc:
            batch.append((number, f"line {number} is not valid JSON: {exc.msg}"))
        except (ValueError, RecursionError) as exc:  # e.g. 5000 digits, nesting too deep
            batch.append((number, f"line {number} is not valid JSON: {exc}"))
        except ProtocolError as exc:
            batch.append((number, f"line {number}: {exc}"))
        else:
            batch.append((number, item))
        if len(batch) >= STDIN_BATCH:
            yield batch
            batch = []
    if batch:
        yield batch


def _submit_stdin(
    broker: str | None, ca: Path | None, insecure: bool | None, key: str | None
) -> None:
    """Pipeline batches from stdin; one JSON line out per input line, in order.

    On a terminal: a progress bar and a summary instead of the JSON lines.
    """
    import trio

    from tq.client import Client
    from tq.core.errors import TQError
    from tq.core.task import TaskSpec

    conf = settings(broker=broker, ca=ca, insecure=insecure, key=key)
    failures = submitted = 0
    out = sys.stdout
    show = interactive()  # stdout and stderr are terminals: progress bar, not JSON lines

    warned: set[str] = set()

    async def send(client: Client, batch: list[tuple[int, Any]]) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = [{}] * len(batch)
        good: list[int] = []
        for i, (number, item) in enumerate(batch):
            if isinstance(item, str):
                rows[i] = {"line": number, "error": item}
                continue
            try:
                TaskSpec.from_mapping(item)  # name the bad line instead of failing the batch
            except TQError as exc:
                rows[i] = {"line": number, "error": f"line {number}: {exc.message}"}
                continue
            good.append(i)
        if good:
            answers = await client.submit_items([batch[i][1] for i in good])
            for i, answer in zip(good, answers, strict=True):
                rows[i] = {"line": batch[i][0], "id": answer["id"]}
                warning = answer.get("warning")
                if warning and warning not in warned:  # once per task type, on stderr
                    warned.add(warning)
                    print(f"tq: warning: {inert(warning)}", file=sys.stderr)
        return rows

    async def main() -> None:
        nonlocal failures
        with progress("submitting") as bar:
            async with Client.from_settings(conf) as client, trio.open_nursery() as nursery:
                results: list[trio.MemoryReceiveChannel[list[dict[str, Any]]]] = []
                limit = trio.Semaphore(STDIN_IN_FLIGHT)
                send_order, recv_order = trio.open_memory_channel[Any](STDIN_IN_FLIGHT)

                async def one(batch: list[tuple[int, Any]], done: Any) -> None:
                    try:
                        done.send_nowait(await send(client, batch))
                    finally:
                        limit.release()

                async def printer() -> None:
                    nonlocal failures, submitted
                    async for channel in recv_order:
                        rows = await channel.receive()
                        for row in rows:
                            failures += "error" in row
                            submitted += "id" in row
                            if "error" in row:
                                print(f"tq: error: {inert(row['error'])}", file=sys.stderr)
                            if not show:
                                out.write(dumps(row) + "\n")
                        bar.advance(len(rows))
                        out.flush()

                nursery.start_soon(printer)
                async with send_order:
                    for batch in _stdin_batches():
                        await limit.acquire()
                        done_send, done_recv = trio.open_memory_channel[list[dict[str, Any]]](1)
                        results.append(done_recv)
                        await send_order.send(done_recv)
                        nursery.start_soon(one, batch, done_send)

    trio.run(main)
    if show:
        typer.echo(f"submitted {submitted} task(s)")
    if failures:
        fail(f"{failures} line(s) were not submitted (see the error lines above)", exits.USAGE)


def status(
    task_id: Annotated[str, typer.Argument(help="Task id.")],
    broker: BrokerOpt = None,
    ca: CaOpt = None,
    insecure: InsecureOpt = None,
    api_key: KeyOpt = None,
    as_json: JsonOpt = False,
    output: OutputOpt = None,
) -> None:
    """Show one task: state, attempts, payload, result or error."""

    def body() -> None:
        with _client(broker, ca, insecure, api_key) as client:
            task = client.get(task_id).to_dict()
        emit(task, output_mode(output, as_json), lambda t: kv_table(task_rows(t)))

    run_guarded(body)


def list_(
    state: Annotated[
        str | None,
        typer.Option(
            "--state",
            "-s",
            help="pending, running, succeeded, failed, dead, cancelled.",
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
    broker: BrokerOpt = None,
    ca: CaOpt = None,
    insecure: InsecureOpt = None,
    api_key: KeyOpt = None,
    as_json: JsonOpt = False,
    output: OutputOpt = None,
) -> None:
    """List tasks, oldest (or --newest) first, filtered by state, type and queue."""
    from tq.core.states import State

    if state is not None and state not in {s.value for s in State}:
        fail(f"unknown state {state!r}; one of: {', '.join(s.value for s in State)}", exits.USAGE)

    def body() -> None:
        with _client(broker, ca, insecure, api_key) as client:
            page = client.list(
                state=state, type=type, queue=queue, limit=limit, after=after, newest_first=newest
            )
        mode = output_mode(output, as_json)
        emit([t.to_dict() for t in page.tasks], mode, _tasks_table)
        if page.next and mode is Output.table:
            again = " --newest" if newest else ""
            typer.echo(f"more: tq list{again} --after {page.next}", err=True)

    run_guarded(body)


def cancel(
    task_id: Annotated[str, typer.Argument(help="Task id.")],
    broker: BrokerOpt = None,
    ca: CaOpt = None,
    insecure: InsecureOpt = None,
    api_key: KeyOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Cancel a task that has not finished (a running one is stopped on its worker)."""

    def body() -> None:
        with _client(broker, ca, insecure, api_key) as client:
            task = client.cancel(task_id).to_dict()
        typer.echo(dumps(task) if as_json else f"{task_id} {task['state']}")

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

        states = ["pending", "running", "failed", "succeeded", "dead", "cancelled"]
        recent = data.get("last_minute") or {}
        t = Table(
            title=cell(
                f"broker {data['broker']} {data['version']}, "
                f"up {data['uptime']:.0f}s, {data['workers']} worker(s)"
            ),
            caption=cell(_last_minute(recent)),
        )
        t.add_column("queue")
        for s in states:
            t.add_column(s, justify="right")
        t.add_column("done/min", justify="right")
        t.add_column("fail %", justify="right")
        for queue, counts in sorted(data["queues"].items()):
            row = (recent.get("queues") or {}).get(queue) or {}
            done = row.get("succeeded", 0) + row.get("failed", 0)
            rate = f"{100 * row.get('failed', 0) / done:.1f}" if done else ""
            t.add_row(cell(queue), *(str(counts.get(s, 0)) for s in states), str(done), rate)
        return t

    def body() -> None:
        with _client(broker, ca, insecure, api_key) as client:
            data = client.stats()
        emit(data, output_mode(output, as_json), table)

    run_guarded(body)


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
