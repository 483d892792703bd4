"""`tq cancel` (one id, ids from stdin, or every task matching --state/--queue/--type)
and `tq priority` (one id or ids from stdin).

The broker's requests stay one task each (``cancel``, ``set_priority``); bulk
forms are built from them: ``--state`` lists the matching ids page by page
first (a count, then a confirmation unless ``--yes``), then every request is
pipelined on one trio connection (``IN_FLIGHT`` at once). A task that
finished between the listing and its cancel is counted, not an error.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
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
    emit,
    emit_text,
    fail,
    interactive,
    progress,
    run_guarded,
    say,
    settings,
    text_mode,
)

if TYPE_CHECKING:
    from tq.client import Client
    from tq.core.errors import TQError
    from tq.core.task import Task

IN_FLIGHT = 64  # requests pipelined at once
PAGE = 1000  # ids per list request while counting
CANCELLABLE = ("pending", "failed", "running")


def _stdin_ids() -> list[str]:
    from tq.cli.admin import _stdin_ids

    return list(_stdin_ids())


def error_line(task_id: str, exc: TQError) -> str:
    """One stderr line for a refused id: the id once, whether or not the message has it."""
    message = exc.message or str(exc)
    return message if task_id in message else f"{task_id}: {message}"


def pipelined(
    conf: Any, ids: list[str], call: Callable[[Client, str], Awaitable[Task]], what: str
) -> list[tuple[str, Task | TQError]]:
    """``call(client, id)`` for each id, ``IN_FLIGHT`` at a time; results in input order.
    Connection errors propagate; a refusal for one id is that id's result."""
    import trio

    from tq.client import Client
    from tq.core.errors import ConnectionFailed, TQError, Unauthorized

    results: dict[int, Task | TQError] = {}

    async def main() -> None:
        async with Client.from_settings(conf) as client, trio.open_nursery() as nursery:
            limit = trio.Semaphore(IN_FLIGHT)
            with progress(what, len(ids)) as bar:

                async def one(index: int, task_id: str) -> None:
                    try:
                        results[index] = await call(client, task_id)
                    except (ConnectionFailed, Unauthorized):
                        raise
                    except TQError as exc:
                        results[index] = exc
                    finally:
                        limit.release()
                        bar.advance()

                for index, task_id in enumerate(ids):
                    await limit.acquire()
                    nursery.start_soon(one, index, task_id)

    trio.run(main)
    return [(task_id, results[i]) for i, task_id in enumerate(ids)]


def _report(
    results: list[tuple[str, Task | TQError]], mode: Output, verb: str, row: Callable[[Task], Any]
) -> None:
    """Rows for the tasks done, a stderr line per refusal; the exit status of the worst."""
    from tq.core.errors import InvalidTransition, TQError

    rows, refused, finished, worst = [], 0, 0, exits.OK
    for task_id, result in results:
        if isinstance(result, TQError):
            if isinstance(result, InvalidTransition) and verb == "cancelled":
                finished += 1  # it ended meanwhile (or already had): nothing to cancel
                say(f"tq: {error_line(task_id, result)}", err=True)
                continue
            refused += 1
            worst = max(worst, exits.for_code(result.code))
            say(f"tq: error: {error_line(task_id, result)}", err=True)
            continue
        rows.append(row(result))
    if mode is Output.table:
        extra = f"; {finished} had already finished" if finished else ""
        typer.echo(f"{verb} {len(rows)} task(s){extra}")
    else:
        emit(rows, mode)
    if refused:
        fail(f"{refused} of {len(results)} task(s) were refused (see above)", worst)


def _matching(conf: Any, states: list[str], queue: str | None, type: str | None) -> list[str]:
    """Every id in ``states`` (and queue, type), listed page by page."""
    from tq.client import BlockingClient

    ids: list[str] = []
    with BlockingClient.from_settings(conf) as client:
        for state in states:
            after = None
            while True:
                page = client.list(state=state, queue=queue, type=type, limit=PAGE, after=after)
                ids += [t.id for t in page.tasks]
                if not page.next:
                    break
                after = page.next
    return ids


def cancel(
    task_id: Annotated[
        str | None,
        typer.Argument(
            help="Task id, or - to read ids from stdin (one per line, bare or JSON with id).",
            show_default=False,
        ),
    ] = None,
    states: Annotated[
        list[str] | None,
        typer.Option(
            "--state",
            "-s",
            help="Cancel every task in this state instead: pending, failed or running "
            "(repeatable; default with --queue/--type: all three).",
            show_default=False,
        ),
    ] = None,
    queue: Annotated[
        str | None,
        typer.Option("--queue", "-q", help="With --state: only this queue.", show_default=False),
    ] = None,
    type: Annotated[
        str | None,
        typer.Option("--type", "-t", help="With --state: only this task type.", show_default=False),
    ] = None,
    yes: Annotated[
        bool, typer.Option("--yes", "-y", help="Do not ask before a bulk cancel.")
    ] = False,
    broker: BrokerOpt = None,
    ca: CaOpt = None,
    insecure: InsecureOpt = None,
    api_key: KeyOpt = None,
    as_json: JsonOpt = False,
    output: OutputOpt = None,
) -> None:
    """Cancel tasks that have not finished (a running one is stopped on its worker).

    Examples: tq cancel ID; tq list --state pending --output jsonl | jq -r .id | tq cancel -;
    tq cancel --state pending --queue emails --yes
    """
    bulk = bool(states) or queue is not None or type is not None
    if (task_id is None) == (not bulk):
        fail("give a task id, - (ids on stdin) or --state/--queue/--type", exits.USAGE)
    for state in states or ():
        if state not in CANCELLABLE:
            fail(f"cancel takes --state {', '.join(CANCELLABLE)}, not {state!r}", exits.USAGE)
    conf = run_guarded(lambda: settings(broker=broker, ca=ca, insecure=insecure, key=api_key))
    row: Callable[[Task], Any] = lambda t: {"id": t.id, "state": t.state.value}  # noqa: E731

    async def call(client: Client, one: str) -> Task:
        return await client.cancel(one)

    if task_id is not None and task_id != "-":
        mode = text_mode(output, as_json)

        def body() -> None:
            from tq.client import BlockingClient

            with BlockingClient.from_settings(conf) as client:
                task = client.cancel(task_id).to_dict()
            emit_text(task, mode, f"{task_id} {task['state']}")

        run_guarded(body)
        return
    mode = text_mode(output, as_json) if interactive() or output or as_json else Output.jsonl

    def bulk_body() -> None:
        if task_id == "-":
            ids = _stdin_ids()
        else:
            wanted = list(states or CANCELLABLE)
            ids = _matching(conf, wanted, queue, type)
            where = ", ".join(
                [f"state {'/'.join(wanted)}"]
                + ([f"queue {queue}"] if queue else [])
                + ([f"type {type}"] if type else [])
            )
            say(f"{len(ids)} task(s) match ({where})", err=True)
            if not ids:
                emit_text([], mode, "cancelled 0 task(s)")
                return
            if not yes:
                if not interactive():
                    fail(f"add --yes to cancel these {len(ids)} task(s)", exits.USAGE)
                if not typer.confirm(f"cancel {len(ids)} task(s)?", err=True):
                    fail("nothing cancelled", exits.ERROR)
        _report(pipelined(conf, ids, call, "cancelling"), mode, "cancelled", row)

    run_guarded(bulk_body)


def priority(
    task_id: Annotated[
        str, typer.Argument(help="Task id, or - to read ids from stdin.", show_default=False)
    ],
    value: Annotated[
        str,
        typer.Argument(help="0..255 (255 highest) or high, normal, low.", show_default=False),
    ],
    broker: BrokerOpt = None,
    ca: CaOpt = None,
    insecure: InsecureOpt = None,
    api_key: KeyOpt = None,
    as_json: JsonOpt = False,
    output: OutputOpt = None,
) -> None:
    """Change the priority of a pending (or failed) task: it moves up or down its queue.

    Example: tq list --state pending --queue emails --output jsonl | jq -r .id |
    tq priority - high
    """
    level: int | str = int(value) if value.strip().isdigit() else value.strip().lower()
    conf = run_guarded(lambda: settings(broker=broker, ca=ca, insecure=insecure, key=api_key))
    row: Callable[[Task], Any] = lambda t: {"id": t.id, "priority": t.priority}  # noqa: E731
    if task_id != "-":
        mode = text_mode(output, as_json)

        def body() -> None:
            from tq.client import BlockingClient

            with BlockingClient.from_settings(conf) as client:
                task = client.set_priority(task_id, level).to_dict()
            emit_text(task, mode, f"{task_id} priority {task['priority']}")

        run_guarded(body)
        return
    mode = text_mode(output, as_json) if interactive() or output or as_json else Output.jsonl

    async def call(client: Client, one: str) -> Task:
        return await client.set_priority(one, level)

    run_guarded(lambda: _report(pipelined(conf, _stdin_ids(), call, "reprioritising"), mode,
                                "reprioritised", row))  # fmt: skip
