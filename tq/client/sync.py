"""The blocking client: the same API as ``Client``, over a plain socket.

For scripts, threads and any code without an event loop. One request at a
time per client (a lock makes it safe to share between threads); batch with
``submit_many`` for throughput. A thin shell over the client core (core.py)
with the API of ``_methods_sync.py``, generated from the async clients' own.
"""

from __future__ import annotations

import contextlib
import select
import socket
import ssl
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from tq.client import _api as api
from tq.client._methods_sync import SyncMethods
from tq.client.core import RECEIVE_SIZE, ClientCore, connect_targets
from tq.client.options import ca_name, settings_options, tls_context, with_key
from tq.config import Settings, parse_address
from tq.core.errors import ConnectionFailed, InvalidRequest, TLSFailure, TQError
from tq.protocol.session import Answer, EventReceived, Farewell, Received
from tq.security.tls import describe_tls_error

T = TypeVar("T")


class BlockingClient(SyncMethods):
    def __init__(
        self,
        address: str,
        *,
        ca: Path | None = None,
        insecure: bool = False,
        kind: str = "client",
        name: str = "",
        hello: Mapping[str, Any] | None = None,
        max_frame: int = 16 * 1024 * 1024,
        timeout: float = 10.0,
        key: str | None = None,
        ca_data: str | None = None,
        client_cert: Path | None = None,
        client_key: Path | None = None,
    ) -> None:
        self.address = address
        self._core = ClientCore(
            address, max_frame, api.hello(kind, name, with_key(dict(hello or {}), key))
        )
        self._lock = threading.Lock()
        self._subscription: BlockingSubscription | None = None  # subscription mode
        context = tls_context(
            address,
            ca=ca,
            insecure=insecure,
            ca_data=ca_data,
            client_cert=client_cert,
            client_key=client_key,
        )
        self._sock = _open_socket(address, context, ca_name(ca, ca_data), timeout)
        self._sock.settimeout(None)
        try:
            self._exchange(self._core.hello, timeout)
        except BaseException:
            self.close()
            raise

    @property
    def server(self) -> dict[str, Any]:
        """The broker's hello ACK."""
        return self._core.server

    @classmethod
    def from_settings(cls, settings: Settings, **kwargs: Any) -> BlockingClient:
        """Connect as the settings say: address, CA, key (or a join token), mutual TLS."""
        return cls(**{**settings_options(settings), **kwargs})

    def close(self) -> None:
        """Close the connection; safe from another thread (wakes a blocked read)."""
        with contextlib.suppress(OSError):
            socket.socket.shutdown(self._sock, socket.SHUT_RDWR)  # not SSLSocket's: see events
        with contextlib.suppress(OSError):
            self._sock.close()

    def closed_by_broker(self) -> bool:
        """True if this idle connection has something to read: the broker closed it
        (its idle timeout, a restart) or sent a connection-level NACK. Reconnect then.
        Never blocks; False while another thread is using the client."""
        if self._subscription is not None or not self._lock.acquire(blocking=False):
            return False
        try:
            if self._sock.fileno() < 0:
                return True
            readable, _, _ = select.select([self._sock], [], [], 0)
            return bool(readable)
        except (OSError, ValueError):
            return True
        finally:
            self._lock.release()

    def __enter__(self) -> BlockingClient:
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _exchange(self, message: Mapping[str, Any], timeout: float | None = None) -> dict[str, Any]:
        """Send one request and read until its answer (events meanwhile are dropped:
        a subscribed blocking client only sends ``unsubscribe``)."""
        if self._subscription is not None and message.get("t") != "unsubscribe":
            raise InvalidRequest(
                "this client is reading events (subscribe): use another client for requests"
            )
        with self._lock:
            rid, frame = self._core.send(message)
            self._sock.settimeout(timeout)
            try:
                self._sock.sendall(frame)
                while True:
                    item = self._next_received()
                    if isinstance(item, Answer) and item.rid == rid:
                        return self._core.result(item)
            except TimeoutError:
                raise self._broken(
                    ConnectionFailed(
                        f"the broker at {self.address} did not answer within {timeout:g}s"
                    )
                ) from None
            except (OSError, ValueError) as exc:  # ValueError: a socket closed meanwhile
                raise self._broken(self._core.io_error(exc)) from None
            finally:
                with contextlib.suppress(OSError):
                    self._sock.settimeout(None)

    def _next_received(self) -> Received:
        """The next message from the socket (the caller holds the lock); raises the
        broker's reason for a farewell (id 0) and whatever breaks the stream."""
        while True:
            try:
                item = self._core.next_received()
            except TQError as exc:
                raise self._broken(exc) from None
            if isinstance(item, Farewell):
                raise self._broken(item.error)
            if item is not None:
                return item
            try:
                self._core.receive_data(self._sock.recv(RECEIVE_SIZE))
            except TQError as exc:
                raise self._broken(exc) from None

    def _broken(self, exc: TQError) -> TQError:
        self._core.fail(exc)
        return exc

    def request(self, message: Mapping[str, Any]) -> dict[str, Any]:
        """Send one request and wait for its answer (NACKs raise)."""
        return self._exchange(message)

    def _call(self, call: api.Call[T], timeout: float | None = None) -> T:
        return call.parse(self._exchange(call.message, timeout))

    def _clock(self) -> float:
        return time.monotonic()

    def subscribe(self, topics: Sequence[str] = api.TOPICS) -> BlockingSubscription:
        """Subscribe and return the iterator of events (tq/client/events.py).

        Until it is closed this client only reads events; another thread may
        call ``close()`` on the client to stop a blocked read.
        """
        return BlockingSubscription(self, topics)

    def _next_event(self) -> dict[str, Any]:
        """Read until the next event message (subscription mode)."""
        with self._lock:
            try:
                while True:
                    item = self._next_received()
                    if isinstance(item, EventReceived):
                        return item.message
            except (OSError, ValueError) as exc:  # ValueError: read on a socket closed meanwhile
                raise self._broken(self._core.io_error(exc)) from None


_UNSUBSCRIBE_TIMEOUT = 5.0  # seconds to wait for the unsubscribe ACK


class BlockingSubscription:
    """A blocking client's subscription: an iterator of events and a context manager."""

    def __init__(self, client: BlockingClient, topics: Sequence[str]) -> None:
        self._client = client
        call = api.subscribe(topics)
        self.topics = call.parse(client._exchange(call.message))
        client._subscription = self
        self._closed = False

    def __enter__(self) -> BlockingSubscription:
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __iter__(self) -> BlockingSubscription:
        return self

    def __next__(self) -> api.Event:
        if self._closed:
            raise StopIteration
        return api.parse_event(self._client._next_event())

    def close(self) -> None:
        """Unsubscribe (the client can make requests again), or close it if that fails."""
        if self._closed:
            return
        self._closed = True
        self._client._subscription = None
        try:
            self._client._exchange(api.unsubscribe().message, _UNSUBSCRIBE_TIMEOUT)
        except TQError:
            self._client.close()


def _open_socket(
    address: str, context: ssl.SSLContext | None, ca: Path | str | None, timeout: float
) -> socket.socket:
    """TCP (+TLS) to the first broker in ``address`` that accepts."""
    sock, host, where = _open_tcp(address, timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if context is None:
        return sock
    try:
        return context.wrap_socket(sock, server_hostname=host)
    except (ssl.SSLError, OSError) as exc:
        sock.close()
        if api.closed_in_handshake(exc) and _refuses(host, where):
            raise api.shutting_down(where) from None
        raise TLSFailure(describe_tls_error(exc, where, ca)) from None


def _refuses(host: str, where: str) -> bool:
    """After a dropped handshake: does the broker now refuse connections (going away)?"""
    try:
        socket.create_connection((host, parse_address(where)[1]), timeout=2.0).close()
    except OSError:
        return True
    return False


def _open_tcp(address: str, timeout: float) -> tuple[socket.socket, str, str]:
    error: ConnectionFailed | None = None
    for host, port, one in connect_targets(address):
        try:
            return socket.create_connection((host, port), timeout=timeout), host, one
        except TimeoutError:
            error = ConnectionFailed(f"connecting to the broker at {one} timed out")
        except OSError as exc:
            error = api.connect_failed(one, exc)
    assert error is not None  # connect_targets never returns an empty list
    raise error


__all__ = ["BlockingClient", "TQError"]
