"""Operator commands: queue-depth, cluster-status, purge, retry (one, stdin, a state), wait.

Each command parses, calls one client method per request and prints: a
table on a terminal, ``--output json|yaml|jsonl`` for scripts (jsonl by
default in a pipe). Data goes to stdout, errors to stderr, so

    tq list --state dead --output jsonl | jq -r .id | tq retry -

works. Bulk operations (purge, retry by state or from stdin, waiting on
many tasks) show a progress bar on a terminal only (``common.progress``).
"""

from __future__ import annotations

import contextlib
import re
import sys
import time
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
    emit,
    fail,
    fmt_time,
    kv_table,
    output_mode,
    progress,
    run_guarded,
    say,
    settings,
)
from tq.core.units import human_bytes

if TYPE_CHECKING:
    from tq.client import BlockingClient

BULK_BATCH = 250  # rows per purge / retry_many request: one transaction each (PROTOCOL.md, "Size")
WATCH_DEFAULT = 2.0
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$")


def _client(
    broker: str | None, ca: Path | None, insecure: bool | None, key: str | None
) -> BlockingClient:
    from tq.client import BlockingClient

    return BlockingClient.from_settings(settings(broker=broker, ca=ca, insecure=insecure, key=key))


def parse_duration(text: str) -> float:
    """'7d', '12h', '30m', '45s', '2w' or plain seconds -> seconds."""
    match = _DURATION.match(text.lower())
    if not match:
        fail(f"{text!r} is not a duration: use e.g. 7d, 12h, 30m, 45s or seconds", exits.USAGE)
    return float(match.group(1)) * _UNITS[match.group(2) or "s"]


# -- queue-depth ------------------------------------------------------------------------


def _depth_table(data: dict[str, Any]) -> Any:
    from rich.table import Table
    from rich.text import Text

    paused = {q["queue"] for q in data["queues"] if q.get("paused")}
    rows = [(q["queue"], p) for q in data["queues"] for p in q["priorities"]]
    widest = max((p["count"] for _, p in rows), default=0)
    table = Table(title=f"queue depth at {fmt_time(time.time())}")
    for column, justify in (("queue", "left"), ("priority", "right"), ("state", "left")):
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    table.add_column("tasks", justify="right")
    table.add_column("", min_width=20, ratio=1)
    colours = {"pending": "cyan", "running": "green", "failed": "yellow"}
    for queue, p in rows:
        width = 0 if not widest else max(1, round(40 * p["count"] / widest))
        bar = Text("█" * width, style=colours.get(p["state"], "magenta"))
        name = cell(f"{queue} (paused)" if queue in paused else queue)
        table.add_row(name, str(p["priority"]), cell(p["state"]), str(p["count"]), bar)
    for queue in sorted(paused - {queue for queue, _ in rows}):
        table.add_row(cell(f"{queue} (paused)"), "", "", "0", "")
    if not rows and not paused:
        table.add_row("(no unfinished tasks)", "", "", "", "")
    return table


def queue_depth(
    queue: Annotated[
        str | None, typer.Option("--queue", "-q", help="Only this queue.", show_default=False)
    ] = None,
    watch: Annotated[
        bool,
        typer.Option(
            "--watch",
            "-w",
            help="Refresh until Ctrl-C (jsonl: one line each); reconnects if the broker restarts.",
        ),
    ] = False,
    interval: Annotated[
        float, typer.Option("--interval", min=0.2, help="Seconds between refreshes.")
    ] = WATCH_DEFAULT,
    broker: BrokerOpt = None,
    ca: CaOpt = None,
    insecure: InsecureOpt = None,
    api_key: KeyOpt = None,
    as_json: JsonOpt = False,
    output: OutputOpt = None,
) -> None:
    """Unfinished tasks per queue and priority (pending, running, failed...), as bars."""
    mode = output_mode(output, as_json)

    def fetch(client: BlockingClient) -> dict[str, Any]:
        data = client.queue_depth()
        if queue is not None:
            data["queues"] = [q for q in data["queues"] if q["queue"] == queue]
        return data

    def body() -> None:
        if not watch:
            with _client(broker, ca, insecure, api_key) as client:
                emit(fetch(client), mode, _depth_table)
            return
        from tq.cli.waiting import with_reconnect  # the broker may restart while we watch

        conf = settings(broker=broker, ca=ca, insecure=insecure, key=api_key)
        if mode is Output.table:
            from rich.live import Live

            with Live("connecting to the broker...", auto_refresh=False) as live:

                def redraw(client: BlockingClient, _: float | None) -> None:
                    while True:
                        live.update(_depth_table(fetch(client)), refresh=True)
                        time.sleep(interval)

                with_reconnect(conf, None, redraw)

        def lines(client: BlockingClient, _: float | None) -> None:
            while True:
                emit(fetch(client), mode)
                sys.stdout.flush()
                time.sleep(interval)

        with_reconnect(conf, None, lines)

    try:
        run_guarded(body)
    except KeyboardInterrupt:
        return


# -- cluster-status ---------------------------------------------------------------------


def _status_rows(data: dict[str, Any]) -> Any:
    store = data.get("store") or {}
    checks = data["checks"]
    from rich.text import Text

    ok = Text("healthy", "green") if data["healthy"] else Text("UNHEALTHY", "bold red")
    store_check = "ok" if checks["store"]["ok"] else f"FAILED: {checks['store']['error']}"
    rows = [
        ("status", ok),
        ("broker", f"{data['broker']} (tq {data['version']}, protocol {data.get('protocol')})"),
        ("uptime", f"{data['uptime']:.0f} s (since {fmt_time(data.get('started_at'))})"),
        ("accepting work", "yes" if checks["accepting"]["ok"] else "no: shutting down"),
        ("store", f"{store_check} ({checks['store']['latency'] * 1000:.1f} ms)"),
        *_store_rows(store),
        ("workers", f"{data['workers']['connected']} connected, {data['workers']['known']} known"),
    ]
    for name, address in (data.get("listen") or {}).items():
        rows.append((f"listen ({name})", address or "off"))
    if data.get("role"):
        rows.append(("role", data["role"]))
    for entry in data.get("brokers") or ():
        life = "alive" if entry["alive"] else "GONE"
        me = ", this one" if entry["self"] else ""
        rows.append(
            (
                f"broker {entry['id']}",
                f"{entry['role']} at {entry['address'] or '-'} (tq {entry['version']}, "
                f"{life}, last seen {entry['age']:.0f} s ago{me})",
            )
        )
    if data.get("brokers_error"):
        rows.append(("brokers", f"unknown: {data['brokers_error']}"))
    return kv_table(rows)


def _store_rows(store: dict[str, Any]) -> list[tuple[str, Any]]:
    """Where the store is and how big, in the backend's own terms."""
    backend = store.get("backend")
    if backend == "postgresql":
        server = store.get("server_version")
        kind = f"PostgreSQL{f' (server {server})' if server else ''}"
        return [
            ("store kind", kind),
            ("store location", store.get("location")),
            ("database size", human_bytes(store.get("size"))),
        ]
    return [
        ("store kind", "SQLite" if backend == "sqlite" else (backend or "?")),
        ("store path", store.get("path") or store.get("location")),
        ("store size", human_bytes(store.get("size"))),
        ("WAL size", human_bytes(store.get("wal"))),
    ]


def cluster_status(
    broker: BrokerOpt = None,
    ca: CaOpt = None,
    insecure: InsecureOpt = None,
    api_key: KeyOpt = None,
    as_json: JsonOpt = False,
    output: OutputOpt = None,
) -> None:
    """Broker health, store (kind, path or database, sizes), uptime, version, workers, and
    every broker sharing the store with its role (leader or follower) and last sign of life.

    Exit 0 when healthy, 1 when unhealthy (store unreachable, shutting down),
    4 when the broker cannot be reached: usable from scripts and probes.

    With several brokers (--broker b1:7470,b2:7470 or a join token) each one is
    asked: its status, role, version, uptime and last sign of life, one row each;
    exit 0 when all answer healthy, 1 when some do not, 4 when none answers.
    """
    from tq.cli import cluster

    conf = run_guarded(lambda: settings(broker=broker, ca=ca, insecure=insecure, key=api_key))
    if len(run_guarded(lambda: cluster.addresses(conf))) > 1:
        run_guarded(lambda: cluster.show(conf, output_mode(output, as_json)))
        return

    def body() -> dict[str, Any]:
        with _client(broker, ca, insecure, api_key) as client:
            return client.cluster_status()

    data = run_guarded(body)
    emit(data, output_mode(output, as_json), _status_rows)
    if not data["healthy"]:
        fail("the broker is unhealthy (see checks above)", exits.ERROR)


# -- purge ------------------------------------------------------------------------------


def purge(
    states: Annotated[
        list[str],
        typer.Option(
            "--state",
            "-s",
            help="Finished state to purge: succeeded, dead or cancelled (repeatable).",
        ),
    ],
    older_than: Annotated[
        str,
        typer.Option(
            "--older-than",
            help="Only tasks that finished longer ago than this: 7d, 12h, 30m, 45s.",
        ),
    ],
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Count what would be deleted; delete nothing.")
    ] = False,
    broker: BrokerOpt = None,
    ca: CaOpt = None,
    insecure: InsecureOpt = None,
    api_key: KeyOpt = None,
    as_json: JsonOpt = False,
    output: OutputOpt = None,
) -> None:
    """Delete finished tasks older than --older-than, in batches, oldest first.

    An SQLite store keeps its newest task back (so list cursors stay valid);
    a PostgreSQL store needs no such rule. Example:
    tq purge --state succeeded --older-than 7d
    """
    age = parse_duration(older_than)
    mode = output_mode(output, as_json)

    def body() -> dict[str, Any]:
        with _client(broker, ca, insecure, api_key) as client:
            matched = client.purge(states, age, dry_run=True)["matched"]
            if dry_run:
                return {"purged": 0, "matched": matched, "dry_run": True}
            purged = 0
            with progress("purging", matched) as bar:
                while True:
                    step = client.purge(states, age, limit=BULK_BATCH)
                    purged += step["purged"]
                    bar.advance(step["purged"])
                    if not step["more"]:
                        break
            return {"purged": purged, "matched": matched, "dry_run": False}

    result = run_guarded(body)
    if mode is Output.table:
        verb = "would purge" if dry_run else "purged"
        count = result["matched"] if dry_run else result["purged"]
        typer.echo(f"{verb} {count} task(s) ({', '.join(states)}, older than {older_than})")
    else:
        emit(result, mode)


# -- retry: one id, ids from stdin, or a whole state -------------------------------------


def _stdin_ids() -> Iterator[str]:
    """Task ids from stdin: one per line, bare or as a JSON object with "id"."""
    import json

    for line in sys.stdin:
        text = line.strip()
        if not text:
            continue
        if text.startswith("{"):
            with contextlib.suppress(ValueError, AttributeError):
                text = str(json.loads(text).get("id", ""))
        yield text


def retry(
    task_id: Annotated[
        str | None,
        typer.Argument(
            help="Id of a failed, dead or cancelled task, or - to read ids from stdin "
            "(one per line).",
            show_default=False,
        ),
    ] = None,
    state: Annotated[
        str | None,
        typer.Option(
            "--state",
            "-s",
            help="Retry every task in this state instead: failed, dead or cancelled.",
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
    """Send failed, dead or cancelled tasks back to pending (attempts start over).

    Examples: tq retry ID; tq retry --state dead;
    tq list --state dead --output jsonl | jq -r .id | tq retry -
    """
    if (task_id is None) == (state is None):
        fail("give a task id, - (ids on stdin) or --state STATE", exits.USAGE)
    mode = output_mode(output, as_json)
    if state is not None:
        run_guarded(lambda: _retry_state(state, broker, ca, insecure, api_key, mode))
    elif task_id == "-":
        run_guarded(lambda: _retry_stdin(broker, ca, insecure, api_key, mode))
    else:
        assert task_id is not None

        def body() -> None:
            with _client(broker, ca, insecure, api_key) as client:
                task = client.retry(task_id).to_dict()
            if mode is Output.table:
                typer.echo(f"{task_id} {task['state']}")
            else:
                emit(task, mode)

        run_guarded(body)


def _retry_state(
    state: str,
    broker: str | None,
    ca: Path | None,
    insecure: bool | None,
    key: str | None,
    mode: Output,
) -> None:
    retried: list[str] = []
    with _client(broker, ca, insecure, key) as client:
        total = client.stats()["queues"]
        expected = sum(counts.get(state, 0) for counts in total.values())
        seen: set[str] = set()
        with progress(f"retrying {state} tasks", expected) as bar:
            while True:
                step = client.retry_many(state, limit=BULK_BATCH)
                fresh = [i for i in step["retried"] if i not in seen]
                seen.update(fresh)
                retried += fresh
                bar.advance(len(fresh))
                if not step["more"] or not fresh:  # done, or only tasks that failed again
                    break
    if mode is Output.table:
        typer.echo(f"retried {len(retried)} {state} task(s)")
    else:
        emit([{"id": i, "state": "pending"} for i in retried], mode)


def _retry_stdin(
    broker: str | None, ca: Path | None, insecure: bool | None, key: str | None, mode: Output
) -> None:
    from tq.core.errors import TQError

    ids = list(_stdin_ids())
    rows, failures, worst = [], 0, exits.OK
    with _client(broker, ca, insecure, key) as client, progress("retrying", len(ids)) as bar:
        for task_id in ids:
            try:
                task = client.retry(task_id)
                rows.append({"id": task_id, "state": task.state.value})
            except TQError as exc:
                failures += 1
                worst = max(worst, exits.for_code(exc.code))
                from tq.cli.bulk import error_line

                say(f"tq: error: {error_line(task_id, exc)}", err=True)
            bar.advance()
    if mode is Output.table:
        typer.echo(f"retried {len(rows)} task(s)")
    else:
        emit(rows, mode)
    if failures:
        fail(f"{failures} of {len(ids)} task(s) were not retried (see above)", worst)
