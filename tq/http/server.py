"""Serve the REST app with hypercorn's trio worker, inside the broker's nursery.

    http_url = await nursery.start(serve_http, service, settings, cert, key, shutdown)

``task_status.started`` reports the bound URL (``https://127.0.0.1:7471``).
Hypercorn stops accepting when ``shutdown`` is set and gives in-flight
requests ``GRACEFUL_SECONDS`` (always pass ``shutdown_trigger``). A broker
started with ``--require-client-cert`` passes its CA as ``client_ca``: the
HTTPS port then refuses clients without a certificate from that CA, exactly
like the wire port.
"""

from __future__ import annotations

import logging
import socket
import ssl
from pathlib import Path
from typing import TYPE_CHECKING

import trio
from hypercorn.config import Config
from hypercorn.trio import serve

from tq.config import parse_address
from tq.core.errors import ConfigError
from tq.http.app import MAX_BODY, build_app

if TYPE_CHECKING:
    from tq.broker.service import BrokerService

DEFAULT_HTTP_PORT = 7471
GRACEFUL_SECONDS = 3.0


def hypercorn_config(
    address: str, cert: Path | None, key: Path | None, client_ca: Path | None = None
) -> Config:
    """Hypercorn's settings; ``client_ca`` given: TLS demands a client certificate it signed."""
    host, port = parse_address(address, DEFAULT_HTTP_PORT)
    config = Config()
    config.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    if cert is not None and key is not None:
        config.certfile, config.keyfile = str(cert), str(key)
        if client_ca is not None:  # mutual TLS: whatever the wire port requires, REST requires
            config.ca_certs = str(client_ca)
            config.verify_mode = ssl.CERT_REQUIRED
    config.errorlog = logging.getLogger("tq.http")  # through the broker's own logging
    config.accesslog = None
    config.graceful_timeout = GRACEFUL_SECONDS
    config.h11_max_incomplete_size = 64 * 1024
    config.wsgi_max_body_size = MAX_BODY
    config.include_server_header = False
    return config


def _check_bind(address: str) -> None:
    """Fail with our message before hypercorn, which leaks its socket on a failed bind."""
    host, port = parse_address(address, DEFAULT_HTTP_PORT)
    if port == 0:
        return
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, kind, proto, _, where = infos[0]
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(where)
    except OSError as exc:
        raise ConfigError(
            f"cannot serve HTTP on {address}: {exc.strerror or exc}; pass --http HOST:PORT "
            "(port 0 picks a free one) or --http off"
        ) from None


async def serve_http(
    service: BrokerService,
    address: str,
    cert: Path | None,
    key: Path | None,
    shutdown: trio.Event,
    *,
    client_ca: Path | None = None,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the REST API on ``address`` until shutdown: TLS when ``cert``/``key`` are
    given, and mutual TLS (a client certificate signed by ``client_ca``) when that is."""
    config = hypercorn_config(address, cert, key, client_ca)
    _check_bind(address)
    app = build_app(service)
    app.state.shutdown = shutdown  # long-lived responses (server-sent events) end with it

    async def run(task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED) -> None:
        await serve(app, config, shutdown_trigger=shutdown.wait, task_status=task_status)  # type: ignore[arg-type]

    async with trio.open_nursery() as nursery:
        try:
            binds: list[str] = await nursery.start(run)
        except* OSError as group:
            reason = group.exceptions[0]
            raise ConfigError(
                f"cannot serve HTTP on {address}: {getattr(reason, 'strerror', None) or reason}; "
                "pass --http HOST:PORT (port 0 picks a free one) or --http off"
            ) from None
        task_status.started(binds[0] if binds else "")
