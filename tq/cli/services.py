"""`tq broker`, `tq worker`, `tq up`: long-running services until SIGINT/SIGTERM."""

from __future__ import annotations

import logging
import signal
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from tq.cli import security_options as sec
from tq.cli.common import (
    BrokerOpt,
    CaOpt,
    DataOpt,
    InsecureOpt,
    KeyOpt,
    log_settings,
    role_settings,
    run_guarded,
)

if TYPE_CHECKING:
    import trio

    from tq.broker.server import BrokerInfo
    from tq.config import Settings, WorkerSettings
    from tq.worker.executable import ExecHandler
    from tq.worker.handlers import HandlerRegistry

ListenOpt = Annotated[
    str | None,
    typer.Option(
        "--listen",
        "-l",
        help="Address to listen on, HOST:PORT (port 0 picks a free "
        "one) (env TQ_LISTEN; default 127.0.0.1:7470).",
        show_default=False,
    ),
]
StoreOpt = Annotated[
    str | None,
    typer.Option(
        "--store",
        help="Where tasks are kept: sqlite:///PATH or postgresql://USER@HOST/DB "
        "(env TQ_STORE; default sqlite://DATA/tq.db).",
        show_default=False,
    ),
]
SyncOpt = Annotated[
    str | None,
    typer.Option(
        "--synchronous",
        help="Durability: 'full' (default) survives power "
        "loss; 'normal' survives a crashed process but may lose the last commits on "
        "power loss (PostgreSQL: synchronous_commit off, a server crash may lose them).",
        show_default=False,
    ),
]
LeaseOpt = Annotated[
    float | None,
    typer.Option(
        "--lease-ttl",
        help="Seconds a claimed task stays leased without a heartbeat (default 30).",
        show_default=False,
    ),
]
SanOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--tls-san",
        help="Extra host name or IP for the broker certificate "
        "(repeatable), so workers on other hosts can verify it.",
        show_default=False,
    ),
]
ConcurrencyOpt = Annotated[
    int | None,
    typer.Option("--concurrency", "-c", help="Tasks run at once (default 8).", show_default=False),
]
QueuesOpt = Annotated[
    str | None,
    typer.Option(
        "--queues",
        "-q",
        help="Comma-separated queues to take tasks from (default: default).",
        show_default=False,
    ),
]
ImportOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--import",
        "-i",
        help="Python module whose @handler functions and @tq.task tasks to load "
        "(repeatable; needs tq installed in that Python).",
        show_default=False,
    ),
]
ExecOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--exec",
        "-e",
        help="TYPE=PROGRAM [ARGS]: run PROGRAM for tasks of TYPE: "
        "payload JSON on stdin, result JSON on stdout; exit 0 success, 65 bad input "
        "(do not retry), 75 retry later, other statuses fail and are retried while "
        "retries are left (repeatable).",
        show_default=False,
    ),
]
NameOpt = Annotated[
    str | None,
    typer.Option(
        "--name",
        help="Worker name shown to operators (default HOST-PID-RANDOM).",
        show_default=False,
    ),
]
GraceOpt = Annotated[
    float | None,
    typer.Option(
        "--grace",
        help="Seconds running tasks get to finish on SIGTERM before they "
        "are released back to the queue (env TQ_GRACE; default 30).",
        show_default=False,
    ),
]
LogOpt = Annotated[
    str | None,
    typer.Option(
        "--log-level",
        help="debug, info (default), warning or error (env TQ_LOG_LEVEL).",
        show_default=False,
    ),
]
LogFormatOpt = Annotated[
    str | None,
    typer.Option(
        "--log-format",
        help="human (default) or json: one JSON object per line, for log shippers "
        "(env TQ_LOG_FORMAT).",
        show_default=False,
    ),
]
HttpOpt = Annotated[
    str | None,
    typer.Option(
        "--http",
        help="Serve the REST API, the web dashboard (/), /metrics and /health on HOST:PORT "
        "(TLS unless --insecure; "
        "port 0 picks a free one), or 'off' (env TQ_HTTP; default 127.0.0.1:7471).",
        show_default=False,
    ),
]


def setup_logging(level: str | None, fmt: str | None = None) -> None:
    """Log to stderr as the flags, TQ_LOG_LEVEL/TQ_LOG_FORMAT or the config file say
    (a bad value from any of them: an error naming it, exit 2)."""
    from tq.cli.logfmt import formatter

    conf = run_guarded(lambda: log_settings(log_level=level, log_format=fmt))
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter(conf.log_format))
    logging.basicConfig(level=getattr(logging, conf.log_level.upper()), handlers=[handler])


DUPLICATE_WINDOW = 1.0  # seconds: a second signal sooner than this is the same keypress


class SignalRule:
    """What a SIGINT/SIGTERM means: the first asks for a graceful stop; a second one
    stops at once, unless it comes within ``DUPLICATE_WINDOW`` of the first. One
    Ctrl-C can arrive twice: from the terminal (to the whole process group) and
    forwarded by a parent such as the one-file executable's bootloader, which
    also gets it from the terminal; that is still one request for a graceful stop."""

    def __init__(self, window: float = DUPLICATE_WINDOW) -> None:
        self.window = window
        self.first: float | None = None

    def on_signal(self, now: float) -> str:
        """ "graceful", "duplicate" (ignore it) or "now"."""
        if self.first is None:
            self.first = now
            return "graceful"
        return "duplicate" if now - self.first < self.window else "now"


def run_service(main: Callable[[trio.Event], Awaitable[None]]) -> None:
    """Run ``main(shutdown)`` under trio; SIGINT/SIGTERM set ``shutdown`` (SignalRule)."""
    import trio

    async def runner() -> None:
        shutdown = trio.Event()
        rule = SignalRule()
        log = logging.getLogger("tq")
        async with trio.open_nursery() as nursery:

            async def watch() -> None:
                with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                    async for signum in signals:
                        name = signal.Signals(signum).name
                        verdict = rule.on_signal(trio.current_time())
                        if verdict == "graceful":
                            log.info("%s received: shutting down", name)
                            shutdown.set()
                        elif verdict == "duplicate":
                            log.info(
                                "%s again within %gs of the first: the same request, ignored "
                                "(send it again later to stop at once)",
                                name,
                                rule.window,
                            )
                        else:
                            log.warning("second signal: stopping now")
                            nursery.cancel_scope.cancel()

            nursery.start_soon(watch)
            await main(shutdown)
            nursery.cancel_scope.cancel()

    trio.run(runner)


def _announce(info: BrokerInfo, insecure: bool) -> None:
    err = sys.stderr
    print(f"tq broker listening on {info.address}", file=err)
    if info.http:
        print(f"  HTTP API: {info.http} (REST /api/v1, /metrics, /health)", file=err)
    if info.ca_file is not None:
        made = "created" if info.tls_created else "using"
        print(f"  TLS: {made} CA certificate {info.ca_file}", file=err)
        print(f"  CA fingerprint (SHA-256): {info.ca_fingerprint}", file=err)
        print("  remote workers and clients need that file: --ca FILE", file=err)
    elif insecure:
        print(
            "  WARNING: plaintext (--insecure): anyone on the network can read and submit tasks",
            file=err,
        )
    sec.announce(info)


def _registry(imports: list[str] | None) -> HandlerRegistry:
    from tq.worker.handlers import builtin_registry, default_registry, import_handlers

    for module in imports or []:
        import_handlers(module)
    registry = builtin_registry()
    registry.update(default_registry)
    return registry


def _exec_handlers(
    specs: list[str] | None, registry: HandlerRegistry | None = None
) -> dict[str, ExecHandler]:
    """``--exec`` handlers by type. One that shadows a Python handler (built-in or
    imported) of the same type wins: say so at start, once per type."""
    from tq.worker.executable import parse_exec_spec

    handlers = [parse_exec_spec(spec) for spec in specs or []]
    by_type = {h.type: h for h in handlers}
    for name in sorted(by_type):
        if registry is not None and registry.get(name) is not None:
            logging.getLogger("tq.worker").warning(
                "--exec %s=%s replaces the Python handler %r (built-in or --import): "
                "tasks of type %r run the program",
                name,
                " ".join(by_type[name].argv),
                name,
                name,
            )
    return by_type


def _broker_flags(
    data: Path | None,
    listen: str | None,
    insecure: bool | None,
    synchronous: str | None,
    lease_ttl: float | None,
    tls_san: list[str] | None,
    store: str | None = None,
) -> dict[str, Any]:
    return {
        "data": data,
        "store": store,
        "listen": listen,
        "insecure": insecure,
        "synchronous": synchronous,
        "lease_ttl": lease_ttl,
        "tls_san": tls_san or None,
    }


def broker(
    listen: ListenOpt = None,
    data: DataOpt = None,
    store: StoreOpt = None,
    insecure: InsecureOpt = None,
    synchronous: SyncOpt = None,
    lease_ttl: LeaseOpt = None,
    tls_san: SanOpt = None,
    no_auth: sec.NoAuthOpt = False,
    require_client_cert: sec.RequireCertOpt = None,
    submit_rate: sec.SubmitRateOpt = None,
    max_connections: sec.MaxConnectionsOpt = None,
    http: HttpOpt = None,
    log_level: LogOpt = None,
    log_format: LogFormatOpt = None,
) -> None:
    """Run a broker: store tasks durably and lease them to workers.

    TLS is on by default: the first start creates a CA and a server
    certificate under DATA/tls and prints the CA's path and fingerprint.
    API keys are required by default: the first start creates an admin key
    in DATA/admin.key; the broker prints a join token for workers.
    Stops cleanly on SIGINT/SIGTERM. The REST API, the web dashboard (/),
    /metrics and /health are served on --http (docs/REST.md, docs/WEB.md).
    """
    setup_logging(log_level, log_format)

    def body() -> None:
        from tq.broker.server import serve_broker
        from tq.config import BrokerSettings

        conf = role_settings(
            BrokerSettings,
            **_broker_flags(data, listen, insecure, synchronous, lease_ttl, tls_san, store),
            **sec.broker_flags(no_auth, require_client_cert, submit_rate, max_connections),
            http=http,
        )

        async def main(shutdown: trio.Event) -> None:
            import trio

            async with trio.open_nursery() as nursery:
                info = await nursery.start(
                    lambda task_status: serve_broker(
                        conf, shutdown=shutdown, task_status=task_status
                    )
                )
                _announce(info, conf.insecure)

        run_service(main)

    run_guarded(body)


def _worker_flags(
    broker: str | None,
    ca: Path | None,
    insecure: bool | None,
    concurrency: int | None,
    queues: str | None,
    name: str | None,
    grace: float | None,
) -> dict[str, Any]:
    return {
        "broker": broker,
        "ca": ca,
        "insecure": insecure,
        "concurrency": concurrency,
        "queues": queues,
        "name": name,
        "shutdown_grace": grace,
    }


def worker(
    broker: BrokerOpt = None,
    ca: CaOpt = None,
    insecure: InsecureOpt = None,
    key: KeyOpt = None,
    join: sec.JoinOpt = None,
    client_cert: sec.ClientCertOpt = None,
    client_key: sec.ClientKeyOpt = None,
    concurrency: ConcurrencyOpt = None,
    queues: QueuesOpt = None,
    imports: ImportOpt = None,
    execs: ExecOpt = None,
    name: NameOpt = None,
    grace: GraceOpt = None,
    log_level: LogOpt = None,
    log_format: LogFormatOpt = None,
) -> None:
    """Run a worker: claim tasks from the broker and run their handlers.

    Built-in handlers: echo, sleep, fail. Add Python handlers with
    --import MODULE and programs with --exec TYPE=PROGRAM. On SIGTERM it
    stops claiming, lets running tasks finish within --grace seconds and
    releases the rest back to the queue. On another machine, `--join TOKEN`
    (printed by `tq broker`) is all the connection setup it needs.
    """
    setup_logging(log_level, log_format)

    def body() -> None:
        from tq.config import WorkerSettings
        from tq.worker.runner import serve_worker

        conf = role_settings(
            WorkerSettings,
            **_worker_flags(broker, ca, insecure, concurrency, queues, name, grace),
            **sec.client_flags(key, join, client_cert, client_key),
        )
        registry = _registry(imports)
        execs_ = _exec_handlers(execs, registry)

        async def main(shutdown: trio.Event) -> None:
            await serve_worker(conf, registry, execs_, shutdown=shutdown)

        run_service(main)

    run_guarded(body)


def up(
    listen: ListenOpt = None,
    data: DataOpt = None,
    insecure: InsecureOpt = None,
    synchronous: SyncOpt = None,
    lease_ttl: LeaseOpt = None,
    concurrency: ConcurrencyOpt = None,
    queues: QueuesOpt = None,
    imports: ImportOpt = None,
    execs: ExecOpt = None,
    http: HttpOpt = None,
    log_level: LogOpt = None,
    log_format: LogFormatOpt = None,
) -> None:
    """Run a broker and a local worker in one process: the quickest start.

    Ctrl-C or SIGTERM: the worker stops claiming and its running tasks get the grace
    period (TQ_GRACE, default 30 s) to finish and report; then the broker stops. A
    second signal (more than 1 s after the first) stops at once.

    Then, in another shell: tq submit echo --payload '{"x": 1}'
    """
    setup_logging(log_level, log_format)

    def body() -> None:
        import trio

        from tq.broker.server import serve_broker
        from tq.config import Settings
        from tq.worker.runner import serve_worker

        conf = role_settings(  # a broker and a worker: every role's settings
            Settings,
            **_broker_flags(data, listen, insecure, synchronous, lease_ttl, None),
            concurrency=concurrency,
            queues=queues,
            http=http,
        )
        registry = _registry(imports)
        execs_ = _exec_handlers(execs, registry)

        async def main(shutdown: trio.Event) -> None:
            # on shutdown the local worker drains first (its running tasks finish within
            # the grace and report their results); only then does the broker stop
            worker_stop, broker_stop = trio.Event(), trio.Event()
            async with trio.open_nursery() as nursery:
                info = await nursery.start(
                    lambda task_status: serve_broker(
                        conf, shutdown=broker_stop, task_status=task_status
                    )
                )
                _announce(info, conf.insecure)
                local = _local_settings(conf, info)
                async with trio.open_nursery() as local_worker:
                    worker_id = await local_worker.start(
                        lambda task_status: serve_worker(
                            local, registry, execs_, shutdown=worker_stop, task_status=task_status
                        )
                    )
                    print(
                        f"  local worker {worker_id} runs: {', '.join(registry.names())}",
                        file=sys.stderr,
                    )
                    print("  try: tq submit echo --payload '{\"x\": 1}'", file=sys.stderr)
                    await shutdown.wait()
                    worker_stop.set()
                broker_stop.set()

        run_service(main)

    run_guarded(body)


def _local_settings(conf: Settings, info: BrokerInfo) -> WorkerSettings:
    """The local worker's settings: ``conf``'s worker part, reaching the broker just started."""
    import dataclasses

    from tq.config import WorkerSettings, as_role

    local = dataclasses.replace(conf, broker=info.address, ca=info.ca_file)
    local = dataclasses.replace(local, key=sec.local_worker_key(info) or conf.key)
    return as_role(local, WorkerSettings)
