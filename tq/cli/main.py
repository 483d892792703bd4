"""The `tq` command: one executable, many roles."""

from __future__ import annotations

import os
import sys

import typer

from tq import PROTOCOL_VERSION, __version__
from tq.cli import (
    admin,
    bench,
    bulk,
    history,
    migrate,
    ops,
    queues,
    schedules,
    security,
    services,
    tasks,
    tui,
    waiting,
    watch,
    workflows,
)
from tq.cli.common import JsonOpt, Output, OutputOpt, emit_text, text_mode

app = typer.Typer(
    name="tq",
    help="tq: a durable task queue. Run `tq up` for a broker with a local worker, then "
    "`tq submit TYPE --payload JSON`. Exit statuses: 0 ok, 1 error, 2 usage, 3 not found, "
    "4 connection/TLS, 5 task failed, 6 timeout, 7 refused (key/role), 8 rate limited.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

app.command(rich_help_panel="Services")(services.up)
app.command(rich_help_panel="Services")(services.broker)
app.command(rich_help_panel="Services")(services.worker)
app.command(rich_help_panel="Tasks")(tasks.submit)
app.command(rich_help_panel="Tasks")(tasks.status)
app.command(rich_help_panel="Tasks")(tasks.explain)  # why a task is not running now
app.command(rich_help_panel="Tasks")(history.history)  # every transition of a task
app.command(rich_help_panel="Tasks")(waiting.wait)  # one id, several, or - (stdin)
app.command("list", rich_help_panel="Tasks")(tasks.list_)
app.command(rich_help_panel="Tasks")(bulk.cancel)  # an id, - (stdin) or --state/--queue/--type
app.command(rich_help_panel="Tasks")(bulk.priority)  # an id or - (stdin)
app.command(rich_help_panel="Tasks")(admin.retry)  # an id, - (stdin) or --state
app.command(rich_help_panel="Tasks")(watch.watch)  # the event stream as JSON lines
app.command(rich_help_panel="Operations")(tasks.stats)
app.command(rich_help_panel="Operations")(tasks.workers)
app.command("queue-depth", rich_help_panel="Operations")(admin.queue_depth)
app.command("cluster-status", rich_help_panel="Operations")(admin.cluster_status)
app.command(rich_help_panel="Operations")(admin.purge)
app.command(rich_help_panel="Operations")(bench.bench)
app.command(  # started by `tq bench` as a process of its own; not for operators
    "bench-probe",
    hidden=True,
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    add_help_option=False,
)(bench.bench_probe)
app.command(rich_help_panel="Operations")(tui.tui)  # the live console (tq/tui)
app.command(rich_help_panel="Operations")(ops.backup)
app.command(rich_help_panel="Operations")(ops.doctor)
app.command(rich_help_panel="Operations")(migrate.migrate)  # copy a store (tq.store.transfer)
security.register(app)  # keys, ca, token, audit
queues.register(app)  # queue pause, resume, list
schedules.register(app)  # recurring schedules
workflows.register(app)  # workflow show


@app.command(rich_help_panel="Operations")
def version(
    as_json: JsonOpt = False,
    output: OutputOpt = None,
) -> None:
    """Print tq's version, protocol version, Python, SQLite and platform."""
    import platform

    try:
        import apsw

        sqlite = apsw.sqlite_lib_version()
    except ImportError:  # pragma: no cover - apsw is a dependency
        sqlite = "unavailable"
    frozen = bool(getattr(sys, "frozen", False))  # the one-file executable (PyInstaller)
    mode = text_mode(output, as_json)
    if mode is not Output.table:
        info = {
            "tq": __version__,
            "protocol": PROTOCOL_VERSION,
            "python": platform.python_version(),
            "sqlite": sqlite,
            "platform": platform.platform(),
            "executable": sys.executable,
            "frozen": frozen,
        }
        emit_text(info, mode, None)
        return
    typer.echo(f"tq {__version__} (protocol {PROTOCOL_VERSION}){' executable' if frozen else ''}")
    typer.echo(f"python {platform.python_version()}, sqlite {sqlite}, {platform.platform()}")


def main() -> None:
    if os.environ.get("_TQ_COMPLETE"):  # shell completion (shell-completions/): TAB pressed
        from typer.completion import completion_init

        completion_init()
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)
