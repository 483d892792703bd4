"""`tq wait` (one task, several, or ids from stdin) and the reconnect rule it shares
with `tq queue-depth --watch`.

Reconnecting: once a command has reached the broker, a lost connection or a
broker that answers "shutting down" is not the end: the command says so once
on stderr, retries with a growing pause (``RETRY_FIRST`` .. ``RETRY_MAX``
seconds) and carries on where it was, until its ``--timeout`` (exit 6, naming
the last connection error). A broker that cannot be reached at the very start
is still exit 4 at once: a wrong address should not hang.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer

from tq.cli import exits
from tq.cli.admin import _stdin_ids
from tq.cli.common import (
    BrokerOpt,
    CaOpt,
    InsecureOpt,
    JsonOpt,
    KeyOpt,
    Output,
    OutputOpt,
    dumps,
    emit,
    emit_text,
    fail,
    interactive,
    output_mode,
    progress,
    run_guarded,
    say,
    settings,
    text_mode,
)

if TYPE_CHECKING:
    from tq.client import BlockingClient
    from tq.config import ClientSettings
    from tq.core.errors import TQError

T = TypeVar("T")
RETRY_FIRST = 0.2
RETRY_MAX = 2.0


def lost(exc: BaseException) -> TQError | None:
    """The connection error if ``exc`` (or every leaf of an exception group) means the
    broker went away (lost connection, refused reconnect, shutting down); else None."""
    from tq.core.errors import ConnectionFailed, Unavailable

    if isinstance(exc, BaseExceptionGroup):
        leaves = [lost(e) for e in exc.exceptions]
        return leaves[0] if leaves and all(leaves) else None
    return exc if isinstance(exc, ConnectionFailed | Unavailable) else None


class Reconnect:
    """Pauses between attempts, one stderr line per outage, the deadline."""

    def __init__(self, timeout: float | None) -> None:
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self.timeout = timeout
        self.connected = False  # reached the broker at least once
        self.down: TQError | None = None  # the error of the current outage
        self.pause = RETRY_FIRST

    def remaining(self) -> float | None:
        return None if self.deadline is None else max(0.0, self.deadline - time.monotonic())

    def up(self) -> None:
        if self.down is not None:
            say("tq: reconnected to the broker", err=True)
        self.connected, self.down, self.pause = True, None, RETRY_FIRST

    def failed(self, exc: TQError) -> float:
        """After a connection error: the seconds to pause, or raise it (never connected)
        or a Timeout (past the deadline)."""
        from tq.core.errors import Timeout

        if not self.connected:
            raise exc
        if self.down is None:
            say(f"tq: {exc.message or exc}; reconnecting", err=True)
        self.down = exc
        left = self.remaining()
        if left is not None and left <= 0:
            raise Timeout(
                f"gave up after {self.timeout:g}s: the broker did not come back "
                f"({exc.message or exc})"
            )
        pause = self.pause if left is None else min(self.pause, left)
        self.pause = min(RETRY_MAX, self.pause * 2)
        return pause


def _said_timeout(exc: TQError, timeout: float | None) -> TQError:
    """A Timeout from a wait given the remaining seconds, told with the --timeout given."""
    import re

    from tq.core.errors import Timeout

    if not isinstance(exc, Timeout) or timeout is None:
        return exc
    return Timeout(re.sub(r"after [0-9.e+-]+s", f"after {timeout:g}s", exc.message, count=1))


def with_reconnect(conf: ClientSettings, timeout: float | None, body: Callable[..., T]) -> T:
    """``body(client, remaining_seconds)`` on a blocking client, again on a new
    connection after the broker went away, until it returns."""
    from tq.client import BlockingClient

    again = Reconnect(timeout)
    while True:
        try:
            client: BlockingClient
            with BlockingClient.from_settings(conf) as client:
                again.up()
                return body(client, again.remaining())
        except Exception as exc:
            error = lost(exc)
            if error is None:
                raise
            time.sleep(again.failed(error))


def wait(
    task_ids: Annotated[list[str], typer.Argument(help="Task id(s), or - to read ids from stdin.")],
    timeout: Annotated[
        float | None,
        typer.Option(
            "--timeout",
            "-t",
            min=0,
            help="Give up after this many seconds (exit 6) (default: wait forever).",
            show_default=False,
        ),
    ] = None,
    show_progress: Annotated[
        bool,
        typer.Option(
            "--progress",
            "-p",
            help="Follow one task's reported progress: a progress bar on a terminal, "
            "JSON lines in a pipe.",
        ),
    ] = False,
    broker: BrokerOpt = None,
    ca: CaOpt = None,
    insecure: InsecureOpt = None,
    api_key: KeyOpt = None,
    as_json: JsonOpt = False,
    output: OutputOpt = None,
) -> None:
    """Wait for tasks to finish; print the result (exit 5 if one ended dead or cancelled).

    One task: its result (--output json|jsonl|yaml: the whole task). Several (or -
    for ids on stdin): one JSON line per task as it ends (a progress bar on a
    terminal; --output json or yaml: all of them at the end). If the broker
    restarts meanwhile, it reconnects and waits on (within --timeout).

    --progress (one task): the progress its handler reports, as a bar with its
    message on a terminal, or in a pipe one JSON line per change
    ({"id", "state", "progress", "message"}) and a last line with the result.
    """
    ids = list(_stdin_ids()) if task_ids == ["-"] else task_ids
    conf = run_guarded(lambda: settings(broker=broker, ca=ca, insecure=insecure, key=api_key))
    if show_progress:
        if len(ids) != 1 or task_ids == ["-"]:
            fail("--progress follows one task: give exactly one task id", exits.USAGE)
        _wait_progress(ids[0], timeout, conf, output_mode(output, as_json))
        return
    if len(ids) == 1 and task_ids != ["-"]:
        _wait_one(ids[0], timeout, conf, text_mode(output, as_json))
        return
    mode = output_mode(output, as_json)
    run_guarded(lambda: _wait_many(ids, timeout, conf, mode))


def _wait_one(task_id: str, timeout: float | None, conf: ClientSettings, mode: Output) -> None:
    def body() -> dict[str, Any]:
        def one(client: BlockingClient, remaining: float | None) -> dict[str, Any]:
            from tq.core.errors import Timeout

            try:
                return client.wait(task_id, timeout=remaining).to_dict()
            except Timeout as exc:
                raise _said_timeout(exc, timeout) from None

        return with_reconnect(conf, timeout, one)

    task = run_guarded(body)
    if task["state"] == "succeeded" or mode is not Output.table:
        emit_text(task, mode, dumps(task["result"]))
    if task["state"] != "succeeded":
        error = task.get("error") or {}
        detail = f": {error.get('type')}: {error.get('message')}" if error else ""
        fail(f"task {task_id} ended {task['state']}{detail}", exits.TASK_FAILED)


PROGRESS_POLL = 0.5  # seconds between looks at a task's progress


def _wait_progress(task_id: str, timeout: float | None, conf: ClientSettings, mode: Output) -> None:
    """Wait for one task, showing its progress as it changes (a bar on a terminal,
    JSON lines otherwise). Progress is read from the task itself (every
    PROGRESS_POLL seconds, and the end at once through a wait), so it works
    whichever broker of a cluster the worker reports to."""
    bar = mode is Output.table and interactive()
    shown: list[Any] = [None]  # the last (state, progress, message) shown
    view: dict[str, Any] = {}

    def line(task: dict[str, Any], last: bool) -> None:
        row = {
            "id": task["id"],
            "state": task["state"],
            "progress": task.get("progress"),
            "message": task.get("progress_message"),
        }
        if last:
            row["result"] = task["result"]
            if task.get("error"):
                row["error"] = task["error"]
        now = (row["state"], row["progress"], row["message"])
        if not last and now == shown[0]:
            return
        shown[0] = now
        if bar:
            _bar_update(view, row)
            return
        sys.stdout.write(dumps(row) + "\n")
        sys.stdout.flush()

    def follow(client: BlockingClient, remaining: float | None) -> dict[str, Any]:
        from tq.core.errors import Timeout
        from tq.core.states import is_terminal

        deadline = None if remaining is None else time.monotonic() + remaining
        while True:
            task = client.get(task_id).to_dict()
            if is_terminal(task["state"]):
                return task
            line(task, last=False)
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise _said_timeout(
                    Timeout(f"task {task_id} is still {task['state']} after {timeout:g}s"),
                    timeout,
                )
            try:
                return client.wait(
                    task_id, timeout=PROGRESS_POLL if left is None else min(PROGRESS_POLL, left)
                ).to_dict()
            except Timeout:
                continue

    try:
        task = run_guarded(lambda: with_reconnect(conf, timeout, follow))
    finally:
        _bar_close(view)
    if bar:
        if task["state"] == "succeeded":
            emit_text(task, mode, dumps(task["result"]))
    else:
        line(task, last=True)
    if task["state"] != "succeeded":
        error = task.get("error") or {}
        detail = f": {error.get('type')}: {error.get('message')}" if error else ""
        fail(f"task {task_id} ended {task['state']}{detail}", exits.TASK_FAILED)


def _bar_update(view: dict[str, Any], row: dict[str, Any]) -> None:
    """The rich progress bar on stderr: started on the first update, the task's
    message (made inert) as its description."""
    from rich.console import Console
    from rich.markup import escape
    from rich.progress import BarColumn, Progress, TaskProgressColumn, TimeElapsedColumn

    from tq.core.text import inert

    if "bar" not in view:
        bar = Progress(
            "[progress.description]{task.description}",
            BarColumn(),
            TaskProgressColumn(),
            TimeElapsedColumn(),
            console=Console(stderr=True),
            transient=True,
        )
        bar.start()
        view["bar"], view["task"] = bar, bar.add_task("", total=1.0)
    fraction = row["progress"] or 0.0
    text = escape(inert(row["message"] or row["state"])[:60])  # never parsed as markup
    view["bar"].update(view["task"], completed=fraction, description=text)


def _bar_close(view: dict[str, Any]) -> None:
    if "bar" in view:
        view.pop("bar").stop()


def _wait_many(ids: list[str], timeout: float | None, conf: ClientSettings, mode: Output) -> None:
    """Pipelined waits on one trio connection; a line per task in the order they end.
    After a lost connection, the tasks not yet ended are waited on over a new one."""
    import trio

    from tq.client import Client

    ended: dict[str, int] = {}
    rows: list[dict[str, Any]] = []
    pending = dict.fromkeys(ids)
    again = Reconnect(timeout)
    lines = mode is Output.jsonl and not interactive()

    async def one(client: Client, limit: trio.Semaphore, task_id: str, bar: Any) -> None:
        from tq.core.errors import Timeout

        async with limit:
            try:
                task = (await client.wait(task_id, timeout=again.remaining())).to_dict()
            except Timeout as exc:
                raise _said_timeout(exc, timeout) from None
        pending.pop(task_id, None)
        ended[task["state"]] = ended.get(task["state"], 0) + 1
        row = {"id": task_id, "state": task["state"], "result": task["result"]}
        if task["error"]:
            row["error"] = task["error"]
        bar.advance()
        if lines:
            sys.stdout.write(dumps(row) + "\n")
            sys.stdout.flush()
        else:
            rows.append(row)

    async def main() -> None:
        with progress("waiting", len(pending)) as bar:
            while pending:
                try:
                    async with Client.from_settings(conf) as client:
                        again.up()
                        limit = trio.Semaphore(256)
                        async with trio.open_nursery() as nursery:
                            for task_id in list(pending):
                                nursery.start_soon(one, client, limit, task_id, bar)
                except Exception as exc:
                    error = lost(exc)
                    if error is None:
                        raise
                    await trio.sleep(again.failed(error))

    trio.run(main)
    failed = sum(n for state, n in ended.items() if state != "succeeded")
    if not lines:
        if mode is Output.table:
            summary = ", ".join(f"{n} {state}" for state, n in sorted(ended.items()))
            typer.echo(summary or "nothing")
        else:
            emit(rows, mode)
    if failed:
        total = sum(ended.values())
        fail(f"{failed} of {total} task(s) did not succeed", exits.TASK_FAILED)
