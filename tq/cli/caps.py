"""`tq cap set|remove|list`: concurrency and rate caps per queue or task type.

A cap holds cluster-wide, at claim time in the store (every broker of the store
obeys it): at most ``--concurrency`` tasks of the queue or type running at once,
at most ``--rate`` started per second (a token bucket of ``--burst`` tokens).
Capped tasks wait pending; `tq explain ID` says which cap holds one back. The
broker checks every value (tq.broker.caps): this module decodes, calls the
client and prints.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any

import typer

from tq.broker.caps import burst_of, rate_text
from tq.cli.admin import _client
from tq.cli.common import (
    BrokerOpt,
    CaOpt,
    InsecureOpt,
    JsonOpt,
    KeyOpt,
    OutputOpt,
    cell,
    emit,
    emit_text,
    output_mode,
    run_guarded,
    text_mode,
)

cap_app = typer.Typer(
    help="Caps: at most N running at once and at most R started per second, per queue or "
    "task type, cluster-wide. E.g. `tq cap set type send-email --concurrency 5 --rate 10/s`.",
    no_args_is_help=True,
)


class Kind(StrEnum):
    queue = "queue"
    type = "type"


KindArg = Annotated[
    Kind,
    typer.Argument(
        help="What the cap limits: `queue` (one queue) or `type` (one task type, in every queue)."
    ),
]
NameArg = Annotated[str, typer.Argument(help="The queue's or task type's name.")]


def describe(cap: dict[str, Any]) -> str:
    """A cap's limits in words: ``at most 5 running, 10/s (bursts of 10)``."""
    parts = []
    if cap.get("concurrency") is not None:
        parts.append(f"at most {cap['concurrency']} running")
    if cap.get("rate") is not None:
        burst = burst_of(cap["rate"], cap.get("burst"))
        parts.append(f"at most {rate_text(cap['rate'])} started (bursts of {burst:g})")
    return ", ".join(parts) or "no limit"


def brief(cap: dict[str, Any]) -> str:
    """A cap's limits for a table cell: ``5 at once, 10/s``."""
    parts = []
    if cap.get("concurrency") is not None:
        parts.append(f"{cap['concurrency']} at once")
    if cap.get("rate") is not None:
        parts.append(rate_text(cap["rate"]))
    return ", ".join(parts)


@cap_app.command("set")
def set_(
    kind: KindArg,
    name: NameArg,
    concurrency: Annotated[
        int | None,
        typer.Option(
            "--concurrency",
            "-c",
            min=1,
            help="At most this many of its tasks running at once, on all workers together.",
            show_default=False,
        ),
    ] = None,
    rate: Annotated[
        str | None,
        typer.Option(
            "--rate",
            "-r",
            help="At most this many started per second: a number (0.5) or with a unit: "
            "10/s, 30/m, 100/h.",
            show_default=False,
        ),
    ] = None,
    burst: Annotated[
        float | None,
        typer.Option(
            "--burst",
            help="With --rate: how many may start at once after a quiet spell (the token "
            "bucket's size; default one second's worth, at least 1).",
            show_default=False,
        ),
    ] = None,
    broker: BrokerOpt = None,
    ca: CaOpt = None,
    insecure: InsecureOpt = None,
    api_key: KeyOpt = None,
    as_json: JsonOpt = False,
    output: OutputOpt = None,
) -> None:
    """Cap a queue or a task type (admin): give --concurrency, --rate or both.

    Setting a cap replaces both of its limits: a limit left out is lifted. Tasks
    over the cap stay pending and are handed out as running ones finish or the
    rate allows; workers do not poll for them. Examples:

      tq cap set type send-email --concurrency 5

      tq cap set queue partner-api --rate 30/m --burst 5
    """

    def body() -> None:
        with _client(broker, ca, insecure, api_key) as client:
            stored = client.set_cap(
                kind.value, name, concurrency=concurrency, rate=rate, burst=burst
            )
        text = f"{stored['kind']} {stored['name']} capped: {describe(stored)}"
        emit_text(stored, text_mode(output, as_json), text)

    run_guarded(body)


@cap_app.command("remove")
def remove(
    kind: KindArg,
    name: NameArg,
    broker: BrokerOpt = None,
    ca: CaOpt = None,
    insecure: InsecureOpt = None,
    api_key: KeyOpt = None,
    as_json: JsonOpt = False,
    output: OutputOpt = None,
) -> None:
    """Lift a queue's or task type's cap (admin); its waiting tasks are handed out at once.

    Removing a cap that does not exist changes nothing and says so (exit 0).
    """

    def body() -> None:
        with _client(broker, ca, insecure, api_key) as client:
            removed = client.remove_cap(kind.value, name)
        answer = {"kind": kind.value, "name": name, "removed": removed}
        text = f"{kind.value} {name} " + ("cap removed" if removed else "had no cap")
        emit_text(answer, text_mode(output, as_json), text)

    run_guarded(body)


@cap_app.command("list")
def list_caps(
    broker: BrokerOpt = None,
    ca: CaOpt = None,
    insecure: InsecureOpt = None,
    api_key: KeyOpt = None,
    as_json: JsonOpt = False,
    output: OutputOpt = None,
) -> None:
    """Every cap, with how many of its tasks are running now (--json: the exact values)."""

    def body() -> None:
        with _client(broker, ca, insecure, api_key) as client:
            caps = client.list_caps()
        emit(caps, output_mode(output, as_json), _table)

    run_guarded(body)


def _table(caps: list[dict[str, Any]]) -> Any:
    from rich.table import Table

    table = Table()
    for column in ("kind", "name", "running", "concurrency", "rate", "burst"):
        table.add_column(column, justify="left" if column in ("kind", "name") else "right")
    for cap in caps:
        concurrency = cap.get("concurrency")
        rate = cap.get("rate")
        burst = cap.get("burst")
        table.add_row(
            cell(cap["kind"]),
            cell(cap["name"]),
            cell(cap.get("running", "")),
            cell("" if concurrency is None else concurrency),
            cell("" if rate is None else rate_text(rate)),
            cell("" if rate is None else f"{burst_of(rate, burst):g}"),
        )
    if not caps:
        table.add_row("", "(no caps: `tq cap set --help`)", "", "", "", "")
    return table


def register(app: typer.Typer) -> None:
    app.add_typer(cap_app, name="cap", rich_help_panel="Operations")
