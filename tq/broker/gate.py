"""Admission of new connections: the connection limit and the TLS handshake.

Every refusal here gets a line in the broker's log and, where the peer can
read one, a connection-level NACK (id 0) before the socket closes:

* over ``max_connections``: after the TLS handshake, ``unavailable``
  ("at its connection limit"); at most ``REFUSING_MAX`` such refusals run
  at once, beyond that the socket is closed without a word;
* a plaintext client on the TLS port: detected from its first byte (a TLS
  ClientHello starts with 0x16) and answered, in plaintext, with ``tls``;
* a failed handshake (unknown CA, no client certificate when one is
  required, garbage): the TLS alert is the client's error; logged here.
  The handshake leaves the alert OpenSSL wrote for a failure unsent, so it
  is sent here: without it a TLS 1.3 client refused for its certificate
  (which it learns only on its first read) would see a bare disconnect;
* a handshake (or the first byte) that does not arrive within
  ``handshake_timeout``: dropped (slow loris).

``check_open_files`` runs at start: every connection is a file descriptor,
so the process's open-file limit must exceed ``max_connections`` by
``FD_HEADROOM`` (store files, listeners, HTTP clients). The broker raises its
soft limit up to the hard one if that is needed, and warns if even that is
not enough (accepts would fail with "too many open files").
"""

from __future__ import annotations

import logging
import resource
import socket
import ssl
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import trio

from tq.broker.wire import WireStream
from tq.core.errors import TLSFailure, TQError, Unavailable
from tq.protocol import Connection

log = logging.getLogger("tq.broker")

REFUSING_MAX = 64  # over-limit connections answered at once; beyond that: closed silently
FD_HEADROOM = 128  # descriptors besides wire connections: store, listeners, HTTP, refusals
TLS_HANDSHAKE_RECORD = 0x16
DRAIN_SECONDS = 1.0


class ConnectionGate:
    """Counts open connections against ``limit``.

    A connection is *unproven* from its accept until its ``hello`` is accepted
    (``proven``). When the limit is reached, a new connection evicts the oldest
    unproven one instead of being refused: connections that never say hello
    (anyone who can reach the port, no key needed) cannot lock out clients and
    workers, whose hello follows their connect within milliseconds.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.open = 0
        self.refusing = 0
        self.evicted = 0
        self.sessions: set[Any] = set()  # open sessions (server.Session), for a farewell
        self._unproven: dict[object, trio.CancelScope] = {}  # oldest first

    @contextmanager
    def enter(self, scope: trio.CancelScope | None = None) -> Iterator[bool]:
        """Yields True if the connection may be served, False if it is to be refused.
        ``scope`` is cancelled if a newer connection needs the place while this one is
        still unproven."""
        admitted = self.open < self.limit
        if not admitted and self._unproven:
            token, oldest = next(iter(self._unproven.items()))
            del self._unproven[token]
            oldest.cancel()  # its place is taken now; it closes as it unwinds
            self.evicted += 1
            admitted = True
        token = object()
        if admitted:
            self.open += 1
            if scope is not None:
                self._unproven[token] = scope
        else:
            self.refusing += 1
        try:
            yield admitted
        finally:
            self._unproven.pop(token, None)
            if admitted:
                self.open -= 1
            else:
                self.refusing -= 1

    def proven(self, scope: trio.CancelScope) -> None:
        """The connection of ``scope`` said an accepted hello: never evicted now."""
        for token, held in list(self._unproven.items()):
            if held is scope:
                del self._unproven[token]


def check_open_files(max_connections: int) -> int:
    """The open-file soft limit, raised toward ``max_connections + FD_HEADROOM`` if the
    hard limit allows; a warning (logged) if it stays below. Returns the soft limit."""
    wanted = max_connections + FD_HEADROOM
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    if soft != resource.RLIM_INFINITY and soft < wanted:
        log.warning(
            "the open-file limit is %d, below max_connections %d + %d for the store, "
            "listeners and HTTP: beyond about %d connections accepts fail with 'too many "
            "open files'; raise it (ulimit -n %d, or LimitNOFILE=%d in a systemd unit) or "
            "lower --max-connections",
            soft,
            max_connections,
            FD_HEADROOM,
            max(0, soft - FD_HEADROOM),
            wanted,
            wanted,
        )
    return soft


async def handshake(
    stream: trio.SocketStream, context: ssl.SSLContext, timeout: float, peer: str
) -> WireStream | None:
    """The TLS stream once the handshake is done; None (logged, answered) if it failed."""
    tls: WireStream | None = None
    try:
        with trio.fail_after(timeout):
            first = await stream.socket.recv(1, socket.MSG_PEEK)
            if not first:
                return None  # connected and left (a port probe)
            if first[0] != TLS_HANDSHAKE_RECORD:
                log.warning("%s: plaintext client on the TLS port; refused", peer)
                await _say(stream, TLSFailure(PLAINTEXT))
                return None
            tls = WireStream(stream, context)
            await tls.do_handshake()
    except trio.TooSlowError:
        log.warning("%s: TLS handshake not completed within %gs; dropped", peer, timeout)
        return None
    except (trio.BrokenResourceError, ssl.SSLError, OSError) as exc:
        cause = exc.__cause__ if isinstance(exc, trio.BrokenResourceError) else exc
        log.warning("%s: TLS handshake failed: %s", peer, _reason(cause))
        await send_alert(stream, tls)
        return None
    return tls


async def send_alert(stream: trio.SocketStream, tls: WireStream | None) -> None:
    """Send the TLS alert a failed server-side handshake left unsent, then drain.

    The handshake raises without flushing what OpenSSL wrote for the
    failure (e.g. "certificate required"); the bytes are still in the
    stream's outgoing memory BIO. Sending them gives the client an explicit
    TLS error instead of a disconnect; reading until the client hangs up
    (briefly) keeps the kernel from answering its unread data with a reset
    that could overtake the alert.
    """
    outgoing = None if tls is None else tls._outgoing
    if not isinstance(outgoing, ssl.MemoryBIO) or not outgoing.pending:
        return
    with trio.move_on_after(DRAIN_SECONDS):
        try:
            await stream.send_all(outgoing.read())
            while await stream.receive_some(65536):
                pass
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass


PLAINTEXT = (
    "this broker port speaks TLS: connect with TLS and the broker's CA (--ca); "
    "--insecure works only with a broker started with --insecure"
)


async def refuse_over_limit(
    stream: trio.SocketStream,
    context: ssl.SSLContext | None,
    gate: ConnectionGate,
    timeout: float,
    peer: str,
) -> None:
    """Tell a connection beyond the limit why it is closed (if that is cheap enough)."""
    log.warning(
        "%s: refused: %d connections open (max_connections %d)", peer, gate.open, gate.limit
    )
    if gate.refusing > REFUSING_MAX:
        return
    wrapped: trio.abc.Stream | None = stream
    if context is not None:
        wrapped = await handshake(stream, context, timeout, peer)
    if wrapped is not None:
        with trio.move_on_after(timeout):
            await _say(
                wrapped,
                Unavailable(
                    f"the broker is at its connection limit ({gate.limit}); retry later or "
                    "ask its operator to raise max_connections"
                ),
            )


async def _say(stream: trio.abc.Stream, exc: TQError) -> None:
    """Send a connection-level NACK, then wait (briefly) for the peer to hang up.

    Closing a socket with unread input makes the kernel send a reset, which
    can reach the peer before our NACK does; reading until the peer closes
    (it does once it has read the NACK) avoids that.
    """
    try:
        await stream.send_all(Connection().send(Connection.nack(0, exc)))
        with trio.move_on_after(DRAIN_SECONDS):
            while await stream.receive_some(65536):
                pass
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        pass


def _reason(exc: BaseException | None) -> str:
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return str(exc.reason).lower().replace("_", " ")  # e.g. "tlsv1 alert unknown ca"
    return str(exc) or type(exc).__name__
