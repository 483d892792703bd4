"""Serve the REST app with hypercorn's trio worker, inside the broker's nursery.

    http_url = await nursery.start(serve_http, service, settings, cert, key, shutdown)

``task_status.started`` reports the bound URL (``https://127.0.0.1:7471``).
When ``shutdown`` is set the port stops accepting and in-flight requests get
``GRACEFUL_SECONDS``. A broker
started with ``--require-client-cert`` passes its CA as ``client_ca``: the
HTTPS port then refuses clients without a certificate from that CA, exactly
like the wire port.

The accept loop is tq's own, around hypercorn's connection handler: at most
``MAX_CONNECTIONS`` HTTP connections are open at once (beyond that, new ones
wait in the kernel's listen backlog and hold no file descriptor of the
broker), and a connection that has not finished its TLS handshake within
``HANDSHAKE_SECONDS`` is dropped. So connections to the REST port that never
send a byte, from anyone who can reach it, cost the broker a bounded number
of descriptors and cannot starve the wire port of them; hypercorn's own
``serve`` accepts without a limit and waits 60 s for a handshake.
"""

from __future__ import annotations

import logging
import socket
import ssl
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import trio
from hypercorn.app_wrappers import ASGIWrapper
from hypercorn.config import Config
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.trio.worker_context import WorkerContext

from tq.config import parse_address
from tq.core.errors import ConfigError
from tq.http.app import MAX_BODY, build_app

if TYPE_CHECKING:
    from tq.broker.service import BrokerService

DEFAULT_HTTP_PORT = 7471
GRACEFUL_SECONDS = 3.0
MAX_CONNECTIONS = 64  # part of the broker's FD_HEADROOM (tq/broker/gate.py)
HANDSHAKE_SECONDS = 10.0


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
    config.ssl_handshake_timeout = HANDSHAKE_SECONDS
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

    async with trio.open_nursery() as nursery:
        try:
            binds: list[str] = await nursery.start(_serve, app, config, shutdown)
        except* OSError as group:
            reason = group.exceptions[0]
            raise ConfigError(
                f"cannot serve HTTP on {address}: {getattr(reason, 'strerror', None) or reason}; "
                "pass --http HOST:PORT (port 0 picks a free one) or --http off"
            ) from None
        task_status.started(binds[0] if binds else "")


class _Bounded(trio.abc.Listener[trio.abc.Stream]):
    """Accepts only while fewer than ``slots``' limit of connections are open; each
    accepted connection holds one slot until its handler returns."""

    def __init__(self, inner: trio.abc.Listener[trio.abc.Stream], slots: trio.Semaphore):
        self._inner = inner
        self._slots = slots

    async def accept(self) -> trio.abc.Stream:
        await self._slots.acquire()
        try:
            return await self._inner.accept()
        except BaseException:
            self._slots.release()
            raise

    async def aclose(self) -> None:
        await self._inner.aclose()


async def _serve(
    app: object,
    config: Config,
    shutdown: trio.Event,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Hypercorn's HTTP/1.1 and HTTP/2 connection handler behind a bounded accept loop."""
    sockets = config.create_sockets()
    tls = config.create_ssl_context()
    slots = trio.Semaphore(MAX_CONNECTIONS)
    listeners: list[trio.abc.Listener[trio.abc.Stream]] = []
    binds: list[str] = []
    for sock, secure in [(s, True) for s in sockets.secure_sockets] + [
        (s, False) for s in sockets.insecure_sockets
    ]:
        sock.listen(config.backlog)
        plain = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
        inner: trio.abc.Listener[trio.abc.Stream] = plain
        if secure and tls is not None:
            inner = trio.SSLListener(plain, tls, https_compatible=True)
        listeners.append(_Bounded(inner, slots))
        host, port = sock.getsockname()[:2]
        shown = f"[{host}]" if ":" in host else host
        binds.append(f"{'https' if secure else 'http'}://{shown}:{port}")
    wrapped = ASGIWrapper(app)  # type: ignore[arg-type]
    context = WorkerContext(None)

    async def handle(stream: trio.abc.Stream) -> None:
        try:
            await TCPServer(wrapped, config, context, {}, stream)  # type: ignore[arg-type]
        finally:
            slots.release()

    async with trio.open_nursery() as connections:
        async with trio.open_nursery() as accepting:
            accepting.start_soon(
                partial(trio.serve_listeners, handle, listeners, handler_nursery=connections)
            )
            task_status.started(binds)
            await shutdown.wait()
            accepting.cancel_scope.cancel()
        for listener in listeners:
            await listener.aclose()
        await context.terminated.set()  # keep-alive connections close after their request
        connections.cancel_scope.deadline = trio.current_time() + config.graceful_timeout
