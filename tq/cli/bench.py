"""`tq bench`: measure a real broker on this machine (see docs/BENCHMARKS.md)."""

from __future__ import annotations

from typing import Annotated

import typer

from tq.cli import exits
from tq.cli.common import Output, emit_text, fail, text_mode


def bench(
    tasks: Annotated[
        int,
        typer.Option("--tasks", "-n", min=1, help="Tasks for batched submit and end-to-end runs."),
    ] = 100_000,
    single: Annotated[
        int, typer.Option("--single", min=1, help="Tasks submitted one request at a time.")
    ] = 5_000,
    workers: Annotated[int, typer.Option("--workers", "-w", min=1, help="Worker processes.")] = 2,
    concurrency: Annotated[
        int, typer.Option("--concurrency", "-c", min=1, help="Tasks each worker runs at once.")
    ] = 64,
    payload_bytes: Annotated[int, typer.Option("--payload-bytes", min=0)] = 16,
    batch: Annotated[
        int, typer.Option("--batch", min=1, max=10_000, help="Tasks per submit_many request.")
    ] = 250,
    backlogs: Annotated[
        str,
        typer.Option(
            "--backlogs",
            help="Comma-separated pending-task levels for the claim-scaling and memory runs.",
        ),
    ] = "10000,100000,1000000",
    samples: Annotated[int, typer.Option("--latency-samples", min=10)] = 2000,
    synchronous: Annotated[str, typer.Option("--synchronous", help="full or normal.")] = "full",
    store: Annotated[
        str,
        typer.Option(
            "--store",
            help="Run the brokers on this PostgreSQL database (postgresql://USER@HOST/DB), "
            "each in a fresh schema dropped afterwards; default: SQLite in the data dirs.",
            show_default=False,
        ),
    ] = "",
    scenarios: Annotated[
        str,
        typer.Option(
            "--scenarios", "-s", help="Comma-separated: submit, e2e, latency, backlog, single."
        ),
    ] = "submit,e2e,latency,backlog,single",
    producers: Annotated[
        int,
        typer.Option(
            "--producers",
            min=1,
            help="Concurrent one-at-a-time producers (scenario single), 10 per process, "
            "against one such producer; --single tasks in all.",
        ),
    ] = 50,
    as_json: Annotated[bool, typer.Option("--json", help="Print the figures as JSON.")] = False,
    output: Annotated[
        Output | None,
        typer.Option(
            "--output",
            "-o",
            help="table (the progress lines only, default), json, jsonl or yaml: the figures.",
            show_default=False,
        ),
    ] = None,
    keep: Annotated[bool, typer.Option("--keep", help="Keep the temporary data dirs.")] = False,
) -> None:
    """Benchmark a broker on loopback: submit rate, end-to-end rate, latency, backlog,
    and one call per task (single).

    Starts fresh brokers and worker processes with TLS and durability as
    shipped; progress goes to stderr, the figures to stdout.

    single: --single get, depth and durable submit calls one at a time from the
    blocking client (rate, p50/p99, broker CPU per call); then --producers
    connections in processes of their own, each submitting one task and waiting
    for its ACK, against one such producer (the ratio says whether they share
    group commits; each load generator's CPU is reported, so a saturated one
    shows); then one producer with --workers workers running the tasks (end to
    end). Example: tq bench -s single --single 3000 --producers 50
    """
    from tq.bench import BenchConfig, run_bench
    from tq.bench.runner import SCENARIOS

    chosen = tuple(s.strip() for s in scenarios.split(",") if s.strip())
    unknown = set(chosen) - set(SCENARIOS)
    if unknown:
        fail(
            f"unknown scenario(s) {sorted(unknown)}; choose from {', '.join(SCENARIOS)}",
            exits.USAGE,
        )
    try:
        levels = tuple(int(x) for x in backlogs.split(",") if x.strip())
    except ValueError:
        fail(f"--backlogs {backlogs!r} must be comma-separated whole numbers", exits.USAGE)
    if synchronous not in ("full", "normal"):
        fail("--synchronous must be full or normal", exits.USAGE)
    if store:
        from tq.core.errors import ConfigError
        from tq.store import POSTGRESQL, parse_store_url

        try:
            backend = parse_store_url(store).backend
        except ConfigError as exc:
            fail(exc.message, exits.USAGE)
        if backend != POSTGRESQL:
            fail("--store takes a postgresql:// URL (SQLite is the default)", exits.USAGE)
    cfg = BenchConfig(
        tasks=tasks,
        single=single,
        workers=workers,
        concurrency=concurrency,
        payload_bytes=payload_bytes,
        batch=batch,
        backlogs=levels,
        latency_samples=samples,
        synchronous=synchronous,
        store=store,
        scenarios=chosen,
        keep=keep,
        producers=producers,
    )
    from tq.bench.runner import BenchError

    try:
        report = run_bench(cfg)
    except* BenchError as group:
        first: BaseException = group
        while isinstance(first, BaseExceptionGroup):  # nurseries nest the groups
            first = first.exceptions[0]
        fail(f"bench: {first}", exits.ERROR)
    mode = text_mode(output, as_json)
    if mode is not Output.table:
        emit_text({"setup": report.setup, "results": report.results}, mode, None)


def bench_probe(ctx: typer.Context) -> None:
    """Internal: the latency probe process that `tq bench` starts (tq/bench/probe.py)."""
    from tq.bench.probe import main

    raise typer.Exit(main(list(ctx.args)))
