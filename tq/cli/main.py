"""The `tq` command: one executable, many roles."""

from __future__ import annotations

import sys

import typer

from tq import PROTOCOL_VERSION, __version__
from tq.cli import bench, services, tasks

app = typer.Typer(
    name="tq",
    help="tq: a durable task queue. Run `tq up` for a broker with a local worker, then "
    "`tq submit TYPE --payload JSON`. Exit statuses: 0 ok, 1 error, 2 usage, 3 not found, "
    "4 connection/TLS, 5 task failed, 6 timeout.",
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
app.command(rich_help_panel="Tasks")(tasks.wait)
app.command("list", rich_help_panel="Tasks")(tasks.list_)
app.command(rich_help_panel="Tasks")(tasks.cancel)
app.command(rich_help_panel="Tasks")(tasks.retry)
app.command(rich_help_panel="Operations")(tasks.stats)
app.command(rich_help_panel="Operations")(tasks.workers)
app.command(rich_help_panel="Operations")(bench.bench)


@app.command(rich_help_panel="Operations")
def version() -> None:
    """Print tq's version, protocol version, Python, SQLite and platform."""
    import platform

    try:
        import apsw

        sqlite = apsw.sqlite_lib_version()
    except ImportError:  # pragma: no cover - apsw is a dependency
        sqlite = "unavailable"
    typer.echo(f"tq {__version__} (protocol {PROTOCOL_VERSION})")
    typer.echo(f"python {platform.python_version()}, sqlite {sqlite}, {platform.platform()}")


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)
