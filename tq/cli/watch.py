"""`tq watch`: the broker's event stream as JSON lines, for scripts and ``jq``.

One line per thing that happened, flattened from the ``event`` messages of
docs/PROTOCOL.md §5 so that a line needs no context:

* ``{"topic": "task", "time", "id", "type", "queue", "from", "to"}`` per task
  change (``from`` null for a new task);
* ``{"topic": "tasks", "time", "more", "totals"}`` when the broker summed an
  interval's changes instead of listing them (more than 100 at once, bulk
  operations): ``totals`` rows ``{"queue", "from", "to", "n"}``;
* ``{"topic": "worker", "time", "kind", "worker_id", "worker"}``;
* ``{"topic": "counts", "time", "queues"}``;
* ``{"topic": "progress", "time", "id", "progress", "message"}`` per task whose
  handler reported progress (``--topic progress``; the broker sends the latest per
  task at most once a second; the line carries no queue or type, so ``--queue``,
  ``--type`` and ``--state`` do not filter it);
* ``{"topic": "lagged", "time", "dropped"}``: this watcher fell behind and
  the broker dropped that many events for it (also said on stderr);
* ``{"topic": "reconnected", "time"}`` after the broker came back (events
  while it was away are not replayed; a ``counts`` line follows).

Filters (``--queue``, ``--type``, ``--state``, each repeatable) keep the lines
that match: ``--state`` matches the state a task moved *to*. A summed
``tasks`` line carries no types: with ``--type`` it is left out, with
``--queue`` / ``--state`` only its matching ``totals`` rows are kept (none
left: no line). ``counts`` lines keep only the ``--queue`` queues. Worker lines
are filtered by ``--queue`` (the worker serves one of them).

Once subscribed it says so on stderr (``tq: watching tasks at HOST:PORT``).
On a terminal (or ``--output table``) each line is short text instead. The
command runs until Ctrl-C (exit 0), ``--count`` lines were printed, or
``--timeout`` seconds passed with the broker away.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any

import typer

from tq.cli.common import (
    BrokerOpt,
    CaOpt,
    InsecureOpt,
    KeyOpt,
    Output,
    OutputOpt,
    dumps,
    fail,
    output_mode,
    run_guarded,
    say,
    settings,
)
from tq.core.text import inert

TOPICS = ("tasks", "workers", "counts", "progress")


@dataclass(frozen=True)
class Filters:
    queues: frozenset[str] = frozenset()
    types: frozenset[str] = frozenset()
    states: frozenset[str] = frozenset()

    def row(self, queue: Any, state: Any) -> bool:
        return (not self.queues or queue in self.queues) and (
            not self.states or state in self.states
        )


def lines(topic: str, when: float, data: Mapping[str, Any], keep: Filters) -> Iterator[dict]:
    """The output lines for one event (pure: no I/O)."""
    if topic == "tasks":
        for change in data.get("changes") or ():
            if keep.row(change.get("queue"), change.get("to")) and (
                not keep.types or change.get("type") in keep.types
            ):
                yield {"topic": "task", "time": when, **_change(change)}
        more = data.get("more") or 0
        if more and not keep.types:
            totals = [
                row for row in data.get("totals") or () if keep.row(row.get("queue"), row.get("to"))
            ]
            if totals:
                yield {"topic": "tasks", "time": when, "more": more, "totals": totals}
    elif topic == "workers":
        worker = data.get("worker")
        served = set((worker or {}).get("queues") or ())
        if not keep.queues or (served & keep.queues) or worker is None:
            yield {
                "topic": "worker",
                "time": when,
                "kind": data.get("kind"),
                "worker_id": data.get("worker_id"),
                "worker": worker,
            }
    elif topic == "counts":
        queues = data.get("queues") or {}
        if keep.queues:
            queues = {name: counts for name, counts in queues.items() if name in keep.queues}
        yield {"topic": "counts", "time": when, "queues": queues}
    elif topic == "progress":
        for item in data.get("tasks") or ():
            yield {
                "topic": "progress",
                "time": when,
                "id": item.get("id"),
                "progress": item.get("progress"),
                "message": item.get("message"),
            }
    elif topic == "lagged":
        yield {"topic": "lagged", "time": when, "dropped": data.get("dropped", 0)}


def _change(change: Mapping[str, Any]) -> dict[str, Any]:
    return {key: change.get(key) for key in ("id", "type", "queue", "from", "to")}


def text(line: Mapping[str, Any]) -> str:
    """One short line for a terminal; every value the broker sent is made inert."""
    clock = datetime.fromtimestamp(line["time"]).strftime("%H:%M:%S.%f")[:-3]
    topic = line["topic"]
    if topic == "task":
        was = line["from"] or "new"
        what = f"{line['id']}  {line['type']}  [{line['queue']}]  {was} -> {line['to']}"
    elif topic == "tasks":
        moves = ", ".join(f"{row.get('n')} {_move(row)}" for row in line["totals"])
        what = f"{line['more']} changes: {moves}"
    elif topic == "worker":
        what = f"worker {line['worker_id']} {line['kind']}"
    elif topic == "counts":
        what = "counts " + "; ".join(
            f"{queue}: " + ", ".join(f"{state} {n}" for state, n in sorted(counts.items()))
            for queue, counts in sorted(line["queues"].items())
        )
    elif topic == "progress":
        value = line["progress"] if isinstance(line["progress"], int | float) else 0.0
        what = f"{line['id']}  {100 * value:.0f}%  {line['message'] or ''}".rstrip()
    elif topic == "lagged":
        what = f"fell behind: the broker dropped {line['dropped']} events"
    else:
        what = "reconnected to the broker (events while it was away are not replayed)"
    return inert(f"{clock}  {what}")


def _move(row: Mapping[str, Any]) -> str:
    """A totals row's move in words: a nil ``to`` is a purge (the tasks are gone); a
    nil ``from`` is a new task, unless the broker did not know it (a bulk operation,
    which names no queue, or a purge)."""
    queue, old, new = row.get("queue"), row.get("from"), row.get("to")
    was = old or ("?" if queue is None or new is None else "new")
    return f"[{queue or '?'}] {was} -> {new or 'deleted'}"


def _topics(wanted: Sequence[str]) -> list[str]:
    chosen = [part.strip() for one in wanted for part in one.split(",") if part.strip()]
    unknown = [topic for topic in chosen if topic not in TOPICS]
    if unknown:
        fail(
            f"unknown topic {unknown[0]!r} for --topic: choose from {', '.join(TOPICS)}",
            status=2,
        )
    return sorted(set(chosen)) or ["tasks"]


def watch(
    topic: Annotated[
        list[str],
        typer.Option(
            "--topic",
            help="Events to show: tasks, workers, counts, progress (repeat or comma-separate) "
            "(default: tasks).",
            show_default=False,
        ),
    ] = [],  # noqa: B006 - typer reads the default, never mutates it
    queue: Annotated[
        list[str], typer.Option("--queue", "-q", help="Only this queue (repeatable).")
    ] = [],  # noqa: B006
    task_type: Annotated[
        list[str], typer.Option("--type", help="Only tasks of this type (repeatable).")
    ] = [],  # noqa: B006
    state: Annotated[
        list[str],
        typer.Option("--state", help="Only tasks moving to this state (repeatable)."),
    ] = [],  # noqa: B006
    count: Annotated[
        int | None,
        typer.Option(
            "--count", "-n", min=1, help="Stop after this many lines.", show_default=False
        ),
    ] = None,
    timeout: Annotated[
        float | None,
        typer.Option(
            "--timeout",
            "-t",
            min=0,
            help="If the broker goes away, give up after this many seconds (exit 6) "
            "(default: reconnect forever).",
            show_default=False,
        ),
    ] = None,
    broker: BrokerOpt = None,
    ca: CaOpt = None,
    insecure: InsecureOpt = None,
    api_key: KeyOpt = None,
    output: OutputOpt = None,
) -> None:
    """Follow the broker's events live: task state changes, workers, counts.

    One JSON line per change in a pipe (`tq watch --state dead | jq .id`), short
    text on a terminal. Filters: --queue, --type, --state (the state a task moves
    to), each repeatable. Lines: topic "task" (one change), "tasks" (a bulk summary
    with totals), "worker", "counts", "progress" (a running task's reported
    progress, with --topic progress), "lagged" (this watcher fell behind), and
    "reconnected" (the broker came back). Runs until Ctrl-C or --count lines.
    """
    from tq.core.states import State

    states = [one.value for one in State]
    bad = [one for one in state if one not in states]
    if bad:
        fail(f"unknown state {bad[0]!r} for --state: choose from {', '.join(states)}", status=2)
    topics = _topics(topic)
    keep = Filters(frozenset(queue), frozenset(task_type), frozenset(state))
    conf = run_guarded(lambda: settings(broker=broker, ca=ca, insecure=insecure, key=api_key))
    mode = output_mode(output, False)
    if mode not in (Output.table, Output.jsonl, Output.json):
        fail(f"--output {mode.value} is not a stream: use jsonl (or table on a terminal)", 2)
    try:
        run_guarded(lambda: _follow(conf, topics, keep, count, timeout, mode))
    except KeyboardInterrupt:
        raise typer.Exit(0) from None


def _follow(
    conf: Any,
    topics: list[str],
    keep: Filters,
    count: int | None,
    timeout: float | None,
    mode: Output,
) -> None:
    from tq.cli.waiting import Reconnect, lost
    from tq.client import BlockingClient

    again = Reconnect(timeout)
    printed = 0
    while True:
        try:
            with (
                BlockingClient.from_settings(conf) as client,
                client.subscribe(topics) as events,
            ):
                came_back = again.down is not None
                if not again.connected:
                    say(f"tq: watching {', '.join(topics)} at {client.address}", err=True)
                again.up()
                pending: Iterable[dict] = (
                    [{"topic": "reconnected", "time": time.time()}] if came_back else []
                )
                for event in _chain(pending, events, keep):
                    _print(event, mode)
                    printed += 1
                    if count is not None and printed >= count:
                        return
        except Exception as exc:
            error = lost(exc)
            if error is None:
                raise
            time.sleep(again.failed(error))


def _chain(first: Iterable[dict], events: Iterable[Any], keep: Filters) -> Iterator[dict]:
    yield from first
    for event in events:
        if event.topic == "lagged":
            say(
                f"tq: watch fell behind; the broker dropped {event.data.get('dropped')} events",
                err=True,
            )
        yield from lines(event.topic, event.time, event.data, keep)


def _print(line: Mapping[str, Any], mode: Output) -> None:
    """One line, flushed at once: a pipe (``| jq``) sees each event as it happens."""
    sys.stdout.write((text(line) if mode is Output.table else dumps(line)) + "\n")
    sys.stdout.flush()
