"""Operations commands: `tq backup FILE` and `tq doctor`.

`tq backup` copies a consistent snapshot of the live SQLite store
(tq/store/backup.py) while the broker runs, and refuses a PostgreSQL store,
naming PostgreSQL's own tools. `tq doctor` checks this host's configuration and says
what to fix: one line per check, exit 1 if any failed. Both import their heavy
parts (apsw, cryptography, the client) inside the command.
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
    DataOpt,
    InsecureOpt,
    JsonOpt,
    KeyOpt,
    Output,
    OutputOpt,
    emit_text,
    fail,
    fmt_time,
    role_settings,
    run_guarded,
    say,
    text_mode,
)
from tq.cli.services import StoreOpt

if TYPE_CHECKING:
    from tq.cli.doctor import Check


# -- tq backup ---------------------------------------------------------------------------


def backup(
    file: Annotated[
        Path,
        typer.Argument(
            help="Where to write the backup: a file, or a directory (the file is then named "
            "tq-YYYYMMDDTHHMMSSZ.db).",
            show_default=False,
        ),
    ],
    data: DataOpt = None,
    store: StoreOpt = None,
    force: Annotated[bool, typer.Option("--force", help="Replace FILE if it exists.")] = False,
    as_json: JsonOpt = False,
    output: OutputOpt = None,
) -> None:
    """Back up the task store while the broker runs (SQLite online backup).

    Run it on the broker's host, with the broker's --data (and --store if it
    sets one). The copy is one consistent snapshot: every task acknowledged
    before the backup started is in it. Restore: stop the broker, copy FILE
    to DATA/tq.db, delete DATA/tq.db-wal and DATA/tq.db-shm, start the
    broker (docs/OPERATIONS.md). A PostgreSQL store is backed up with
    PostgreSQL's own tools (pg_dump, or base backups with WAL archiving).
    """

    def body() -> None:
        from tq.store import SQLITE, parse_store_url
        from tq.store.backup import backup_sqlite

        conf = _store_settings(data=data, store=store)
        where = parse_store_url(conf.store_url)
        if where.backend != SQLITE:
            fail(
                f"tq backup copies SQLite stores only; {where.shown} is PostgreSQL: back it "
                "up with PostgreSQL's tools, e.g. pg_dump --format=custom --file=tq.dump "
                "DATABASE (consistent while brokers run), or base backups with WAL archiving "
                "for point-in-time recovery (docs/OPERATIONS.md: Cluster, Backups)",
                exits.USAGE,
            )
        mode = text_mode(output, as_json)
        shown = sys.stderr.isatty() and mode is Output.table
        progress = _progress_printer() if shown else None
        result = backup_sqlite(Path(where.target), file, overwrite=force, progress=progress)
        if progress is not None:
            sys.stderr.write("\n")
        if mode is not Output.table:
            emit_text(result.to_dict(), mode, None)
            return
        size = result.bytes / (1024 * 1024)
        snapshot = fmt_time(result.started_at)
        typer.echo(
            f"backup of {result.source} written to {result.path}: {result.tasks} tasks, "
            f"{size:.1f} MiB, schema version {result.schema_version}, snapshot taken {snapshot}, "
            f"{result.seconds:.2f} s"
        )

    run_guarded(body)


def _progress_printer() -> Any:
    def show(done: int, total: int) -> None:
        percent = 100 * done // total if total else 100
        sys.stderr.write(f"\rbackup: {done}/{total} pages ({percent}%)")
        sys.stderr.flush()

    return show


# -- tq doctor ---------------------------------------------------------------------------

MARKS = {"ok": "✓", "warn": "!", "fail": "✗", "skip": "-"}
ASCII_MARKS = {"ok": "ok", "warn": "!!", "fail": "XX", "skip": "--"}


def doctor(
    data: DataOpt = None,
    store: StoreOpt = None,
    broker: BrokerOpt = None,
    ca: CaOpt = None,
    insecure: InsecureOpt = None,
    api_key: KeyOpt = None,
    offline: Annotated[
        bool, typer.Option("--offline", help="Skip the check that connects to the broker.")
    ] = False,
    as_json: JsonOpt = False,
    output: OutputOpt = None,
) -> None:
    """Check this host's tq set-up and say what to fix.

    Checks the configuration file, that the data directory is writable (and
    its free space), the store and its schema version (a PostgreSQL store:
    that it answers, and the server settings tq depends on), the broker's TLS files
    (present, valid, signed by the CA, not expiring within 30 days, keys
    private), the CA clients use, that the broker answers (connect and hello
    with the configured CA and key), and that the clock is sane. One line per
    check; exit status 1 if any check failed.
    """
    from tq.cli.doctor import run_checks

    flags = {
        "data": data,
        "store": store,
        "broker": broker,
        "ca": ca,
        "insecure": insecure,
        "key": api_key,
    }
    checks = run_checks(flags, offline=offline)
    failed = [c for c in checks if c.status == "fail"]
    mode = text_mode(output, as_json)
    if mode is not Output.table:
        rows = [
            {"name": c.name, "status": c.status, "detail": c.detail, "fix": c.fix} for c in checks
        ]
        emit_text({"ok": not failed, "checks": rows}, mode, None)
    else:
        _print_checks(checks)
    if failed:
        raise typer.Exit(exits.ERROR)


def _print_checks(checks: list[Check]) -> None:
    marks = MARKS if _can_print("".join(MARKS.values())) else ASCII_MARKS
    width = max(len(c.name) for c in checks)
    for c in checks:
        line = f"{marks[c.status]} {c.name:<{width}}  {c.detail}"
        if c.fix:
            line += f" -> {c.fix}"
        say(line)
    counts = {s: sum(c.status == s for c in checks) for s in MARKS}
    summary = f"{counts['ok']} ok, {counts['fail']} failed, {counts['warn']} warnings"
    typer.echo(summary + (f", {counts['skip']} skipped" if counts["skip"] else ""))


def _can_print(text: str) -> bool:
    try:
        text.encode(sys.stdout.encoding or "ascii")
    except (UnicodeEncodeError, LookupError):
        return False
    return True


def _store_settings(**flags: Any) -> Any:
    """A command that opens the store itself reads what a broker reads (data, store)."""
    from tq.config import BrokerSettings

    return role_settings(BrokerSettings, **flags)
