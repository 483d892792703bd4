"""Shared CLI plumbing: connection options, settings, output, errors.

Terminal output never obeys what another party chose: table cells are
``cell()``s (``rich.text.Text`` of ``tq.core.text.inert`` text: no markup, no
escape sequences), tables print through a console with markup off, and lines
echoed from the broker (warnings, errors) go through ``inert``. JSON, JSON
lines and YAML stay exact.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer

from tq.cli import exits
from tq.config import ClientSettings, CommonSettings, R, load
from tq.core.errors import TQError
from tq.core.text import inert


class Output(StrEnum):
    table = "table"
    json = "json"
    jsonl = "jsonl"
    yaml = "yaml"


BrokerOpt = Annotated[
    str | None,
    typer.Option(
        "--broker",
        "-b",
        help="Broker address HOST:PORT, or several comma-separated (HOST1:PORT,HOST2:PORT: "
        "tried in turn, failover) (env TQ_BROKER).",
        show_default=False,
    ),
]
CaOpt = Annotated[
    Path | None,
    typer.Option(
        "--ca",
        help="CA certificate that signed the broker's certificate "
        "(env TQ_CA; default: the local broker's <data>/tls/ca.pem).",
        show_default=False,
    ),
]
InsecureOpt = Annotated[
    bool | None,
    typer.Option(
        "--insecure",
        help="Plaintext, no TLS (only for a broker started with --insecure) (env TQ_INSECURE).",
        show_default=False,
    ),
]
DataOpt = Annotated[
    Path | None,
    typer.Option(
        "--data",
        "-d",
        help="Data directory: store and TLS files (env TQ_DATA; default: the platform data dir).",
        show_default=False,
    ),
]
KeyOpt = Annotated[
    str | None,
    typer.Option(
        "--key",
        "-k",
        help="API key tq_<id>_<secret> (env TQ_KEY (better: not visible in `ps`); default: the "
        "local broker's <data>/admin.key).",
        show_default=False,
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Shorthand for --output json.")]
OutputOpt = Annotated[
    Output | None,
    typer.Option(
        "--output",
        "-o",
        help="table (default on a terminal), json, yaml, or jsonl (default in a pipe).",
        show_default=False,
    ),
]


def settings(**flags: Any) -> ClientSettings:
    """A client command's settings: ``flags`` (the options given) over TQ_* and the file."""
    return load(ClientSettings, flags)


def role_settings(role: type[R], **flags: Any) -> R:
    """The settings of ``role`` (``tq.config.BrokerSettings``, ...) for a service command."""
    return load(role, flags)


def log_settings(**flags: Any) -> CommonSettings:
    """Only what every process reads (log level and format), before the role's own."""
    return load(CommonSettings, flags)


def output_mode(output: Output | None, as_json: bool) -> Output:
    if as_json:
        return Output.json
    if output is not None:
        return output
    return Output.table if sys.stdout.isatty() else Output.jsonl


def text_mode(output: Output | None, as_json: bool) -> Output:
    """For commands whose default is a line of text (submit, wait, cancel, version...):
    ``table`` (that text) unless --output or --json says otherwise, terminal or not."""
    if as_json:
        return Output.json
    return output if output is not None else Output.table


def emit_text(data: Any, mode: Output, text: str | None) -> None:
    """``text`` (a line or lines, inert) in table mode, else ``data`` as ``emit`` prints it.
    json is one line here, as the --json of these commands always printed."""
    if mode is Output.table:
        if text is not None:
            say(text)
    elif mode is Output.json:
        typer.echo(dumps(data))
    else:
        emit(data, mode)


def fail(message: str, status: int = exits.ERROR) -> NoReturn:
    typer.echo(f"tq: error: {inert(message)}", err=True)
    raise typer.Exit(status)


def run_guarded(fn: Callable[[], Any]) -> Any:
    """Run a command body; turn TQErrors into one stderr line and an exit status."""
    try:
        return fn()
    except TQError as exc:
        fail(exc.message or str(exc), exits.for_code(exc.code))
    except BaseExceptionGroup as group:  # from a trio nursery
        leaves = _leaves(group)
        if not all(isinstance(e, TQError) for e in leaves):
            raise
        first = leaves[0]
        assert isinstance(first, TQError)
        fail(first.message or str(first), exits.for_code(first.code))


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for sub in exc.exceptions for leaf in _leaves(sub)]
    return [exc]


def dumps(value: Any) -> str:
    return json.dumps(value, default=_json_default, ensure_ascii=False)


def _json_default(value: Any) -> Any:
    if isinstance(value, bytes | bytearray):
        import base64

        return base64.b64encode(value).decode("ascii")
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def emit(data: Any, mode: Output, table: Callable[[Any], Any] | None = None) -> None:
    """Print ``data`` in ``mode``: a rich renderable for tables, JSON otherwise."""
    if mode is Output.json:
        typer.echo(json.dumps(json.loads(dumps(data)), indent=2, ensure_ascii=False))
    elif mode is Output.jsonl:
        rows = data if isinstance(data, list) else [data]
        for row in rows:
            typer.echo(dumps(row))
    elif mode is Output.yaml:
        import yaml

        plain = json.loads(dumps(data))  # bytes as base64, like JSON
        typer.echo(yaml.safe_dump(plain, sort_keys=False, allow_unicode=True), nl=False)
    else:
        from rich.console import Console

        # markup off: a str that reaches a table anyway is shown, never interpreted
        Console(markup=False).print(table(data) if table else data)


def cell(value: Any, multiline: bool = False, **text: Any) -> Any:
    """A table cell for ``value`` (None: empty): a rich Text of ``inert`` text, never
    parsed for markup. ``text``: Text options (style, justify...)."""
    from rich.text import Text

    if isinstance(value, Text):
        return value
    return Text(inert(value, multiline), **text)


def say(message: str, err: bool = False) -> None:
    """One line with text from the broker in it, made inert, on stdout (or stderr)."""
    typer.echo(inert(message), err=err)


def interactive() -> bool:
    """stdout and stderr are both terminals: show progress bars, prompts, colours."""
    return sys.stdout.isatty() and sys.stderr.isatty()


class _NoProgress:
    def advance(self, n: int = 1) -> None:
        pass

    def total(self, n: int | None) -> None:
        pass


class _Progress(_NoProgress):
    def __init__(self, bar: Any, task: Any) -> None:
        self.bar, self.task = bar, task

    def advance(self, n: int = 1) -> None:
        self.bar.advance(self.task, n)

    def total(self, n: int | None) -> None:
        self.bar.update(self.task, total=n)


@contextmanager
def progress(description: str, total: int | None = None) -> Iterator[_NoProgress]:
    """A rich progress bar on stderr for a long operation, only on a terminal (never in a
    pipe or a script); ``advance(n)`` as work completes."""
    if not interactive():
        yield _NoProgress()
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    columns = (
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        yield _Progress(bar, bar.add_task(description, total=total))


def progress_text(task: Mapping[str, Any]) -> str:
    """``40% page 4/10``: a task's last reported progress (the caller makes it inert)."""
    value = task.get("progress")
    if not isinstance(value, int | float) or isinstance(value, bool):
        return ""
    message = task.get("progress_message")
    percent = f"{100 * min(1.0, max(0.0, float(value))):.0f}%"
    return f"{percent} {message}" if isinstance(message, str) and message else percent


def kv_table(rows: Iterable[tuple[str, Any]]) -> Any:
    from rich.table import Table

    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold cyan")
    table.add_column(overflow="fold")
    for key, value in rows:
        table.add_row(cell(key), cell(value, multiline=True))
    return table


def fmt_time(ts: float | None) -> str:
    if ts is None:
        return ""
    import datetime as dt

    try:
        return dt.datetime.fromtimestamp(ts).isoformat(sep=" ", timespec="seconds")
    except (OverflowError, OSError, ValueError):  # e.g. a retry ~1e300 s away
        return f"{ts:.6g} (beyond any date)"


def compact(value: Any, width: int = 60) -> str:
    text = dumps(value)
    return text if len(text) <= width else text[: width - 1] + "…"


def parse_json(text: str, what: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        fail(
            f"{what} is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno}); "
            "quote it for the shell, e.g. --payload '{\"x\": 1}'",
            exits.USAGE,
        )


def task_rows(task: Mapping[str, Any]) -> list[tuple[str, Any]]:
    error = task.get("error")
    rows = [
        ("id", task["id"]),
        ("type", task["type"]),
        ("queue", task["queue"]),
        ("state", task["state"]),
        ("priority", task["priority"]),
        ("attempts", f"{task['attempts']} (max retries {task['max_retries']})"),
        ("created", fmt_time(task["created_at"])),
        ("started", fmt_time(task["started_at"])),
        ("finished", fmt_time(task["finished_at"])),
        ("worker", task["worker"]),
        ("payload", compact(task["payload"], 200)),
        ("result", compact(task["result"], 200) if task["state"] == "succeeded" else None),
    ]
    if task.get("run_at") and task["state"] in ("failed", "scheduled"):
        rows.append(("next run", fmt_time(task["run_at"])))
    if task.get("progress") is not None:
        rows.append(("progress", progress_text(task)))
    if error:
        rows.append(("error", f"{error['type']}: {error['message']}"))
        if error.get("traceback"):
            rows.append(("traceback", error["traceback"].rstrip()))
    for key, label in (("depends_on", "depends on"), ("dependents", "dependents")):
        if task.get(key):
            rows.append((label, linked(task[key])))
    return rows


MAX_LINKED = 20  # linked tasks a status table lists (JSON gives all)


def linked(tasks: Sequence[Mapping[str, Any]]) -> str:
    """Linked tasks, one "id  state" a line (at most MAX_LINKED, then a count)."""
    lines = [f"{t['id']}  {t.get('state') or '(not visible)'}" for t in tasks[:MAX_LINKED]]
    if len(tasks) > MAX_LINKED:
        lines.append(f"... and {len(tasks) - MAX_LINKED} more (--json lists all)")
    return "\n".join(lines)
