"""`tq migrate --from URL --to URL`: copy a whole store to another backend or place.

The copy itself is tq.store.transfer (tasks, API keys, audit log; verified
counts; one destination transaction). This module only parses the flags and
prints the result.
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from tq.cli.common import JsonOpt, Output, OutputOpt, emit_text, run_guarded, text_mode

FromOpt = Annotated[
    str,
    typer.Option(
        "--from",
        help="The store to copy: sqlite:///PATH/tq.db or postgresql://USER@HOST/DB.",
        show_default=False,
    ),
]
ToOpt = Annotated[
    str,
    typer.Option(
        "--to",
        help="Where to copy it: an empty (or new) store, same URL forms as --from.",
        show_default=False,
    ),
]


def migrate(
    source: FromOpt,
    destination: ToOpt,
    output: OutputOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Copy a store (tasks, API keys, audit log) to another store, then verify it.

    Stop every broker using either store first: tq migrate refuses while one
    runs (an SQLite file is opened exclusively; on PostgreSQL it looks for
    broker connections). The destination must be empty; it is created and
    its schema set up if needed. Every row is copied as it is, in one
    transaction, and the task counts per state, keys and audit entries of
    both sides are compared before it commits. Then start the broker with
    --store set to the destination (docs/OPERATIONS.md).
    """

    def body() -> None:
        from tq.store.transfer import copy_store

        def progress(table: str, copied: int) -> None:
            sys.stderr.write(f"\r{table}: {copied} rows copied")
            sys.stderr.flush()

        mode = text_mode(output, as_json)
        tty = sys.stderr.isatty() and mode is Output.table
        result = copy_store(source, destination, progress if tty else None)
        if tty:
            sys.stderr.write("\n")
        total = sum(result.tasks.values())
        by_state = ", ".join(f"{state} {n}" for state, n in sorted(result.tasks.items()))
        text = (
            f"copied {result.source} to {result.destination}: {total} tasks"
            f"{f' ({by_state})' if by_state else ''}, {result.keys} API keys, "
            f"{result.audit} audit entries; counts verified ({result.seconds:.2f} s)"
        )
        emit_text(result.to_dict(), mode, text)

    run_guarded(body)
