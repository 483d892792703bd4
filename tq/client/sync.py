"""The blocking client: the same API as ``Client``, over a plain socket.

For scripts, threads and any code without an event loop. One request at a
time per client (a lock makes it safe to share between threads); batch with
``submit_many`` for throughput. A thin shell over the client core (core.py)
with the API of ``_methods_sync.py``, generated from the async clients' own.

Failover as in the trio client (tq/client/failover.py): ``address`` may list
several brokers, tried in turn; after a lost connection a request that is safe
to send again reconnects (``_redial``, the one reconnect point: a new socket, a
new ``ClientCore``, hello again) with backoff for up to ``failover`` seconds and
is sent again; other writes whose answer the old core names as never received
raise ``OutcomeUnknown``. The pauses are ``time.sleep`` (Ctrl-C interrupts
them); a client closed by its owner never reconnects.
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

import msgspec

from tq.client import _api as api
from tq.client import failover as fo
from tq.client._methods_sync import SyncMethods
from tq.client.core import RECEIVE_SIZE, ClientCore, connect_targets
from tq.client.options import ca_name, settings_options, split_addresses, tls_context, with_key
from tq.config import ConnectionSettings, parse_address
from tq.core.errors import ConnectionFailed, InvalidRequest, TLSFailure, TQError
from tq.core.limits import MAX_FRAME
from tq.protocol.session import Answer, EventReceived, Farewell, Received
from tq.security.tls import describe_tls_error

T = TypeVar("T")
S = TypeVar("S", bound=msgspec.Struct)


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
        max_frame: int = MAX_FRAME,
        timeout: float = 10.0,
        key: str | None = None,
        ca_data: str | None = None,
        client_cert: Path | None = None,
        client_key: Path | None = None,
        failover: float | None = None,
    ) -> None:
        brokers = split_addresses(address)
        self.address = brokers[0]  # the broker this client talks to now
        self._closed = False  # close() was called: no reconnecting
        self._max_frame = max_frame
        self._hello = api.hello(kind, name, with_key(dict(hello or {}), key))
        self._core = ClientCore(self.address, max_frame, self._hello)
        self._lock = threading.Lock()
        self._subscription: BlockingSubscription | None = None  # subscription mode
        self._context = tls_context(
            address,
            ca=ca,
            insecure=insecure,
            ca_data=ca_data,
            client_cert=client_cert,
            client_key=client_key,
        )
        self._ca = ca_name(ca, ca_data)
        self._timeout = timeout
        self._rotation = fo.Rotation(brokers)
        self._window = fo.window(brokers, failover)
        self._redial(None)

    @property
    def server(self) -> dict[str, Any]:
        """The broker's hello ACK (of the current connection)."""
        return self._core.server

    @property
    def error(self) -> TQError | None:
        """Why the current connection is unusable, or None while it is fine."""
        return self._core.error

    # -- (re)connecting: the one place failover happens --------------------
    def _redial(self, deadline: float | None) -> None:
        """Connect to the next broker that accepts. ``deadline`` None: one round
        through the brokers (the first connect); else rounds with backoff until then."""
        backoff = fo.Backoff(deadline)
        while True:
            error: TQError | None = None
            for one in self._rotation.order():
                try:
                    self._dial(one)
                except TQError as exc:
                    if not fo.retriable(exc):
                        raise
                    self._rotation.failed(one)
                    error = exc
                    continue
                self._rotation.connected(one)
                return
            assert error is not None  # the rotation is never empty
            delay = None if deadline is None else backoff.next_delay(time.monotonic())
            if delay is None:
                raise error
            time.sleep(delay)

    def _dial(self, one: str) -> None:
        """A new connection to ``one`` (the old one closed): a new socket, a new core
        (a new session) and its hello."""
        if hasattr(self, "_sock"):
            self._close_socket()
        self._sock = _open_socket(one, self._context, self._ca, self._timeout)
        self._sock.settimeout(None)
        self.address = one
        self._core = ClientCore(one, self._max_frame, self._hello)
        try:
            self._exchange_once(self._core.hello, self._timeout)
        except BaseException:
            self._close_socket()
            raise

    @classmethod
    def from_settings(cls, settings: ConnectionSettings, **kwargs: Any) -> BlockingClient:
        """Connect as the settings say: address, CA, key (or a join token), mutual TLS."""
        return cls(**{**settings_options(settings), **kwargs})

    def close(self) -> None:
        """Close the connection; safe from another thread (wakes a blocked read, which
        then fails: a closed client never reconnects)."""
        self._closed = True
        self._close_socket()

    def _close_socket(self) -> None:
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

    def _request(self, message: Mapping[str, Any], timeout: float | None = None) -> api.Reply:
        """Send one request and wait for its answer, with failover if it is on (events
        meanwhile are dropped: a subscribed blocking client only sends ``unsubscribe``)."""
        if self._subscription is not None and message.get("t") != "unsubscribe":
            raise InvalidRequest(
                "this client is reading events (subscribe): use another client for requests"
            )
        with self._lock:
            if self._window <= 0 or message.get("t") in ("subscribe", "unsubscribe"):
                return self._exchange_once(message, timeout)
            message = fo.with_idempotency_keys(dict(message))  # a resent submit never duplicates
            deadline: float | None = None
            while True:
                try:
                    reply = self._exchange(message, timeout)
                    if deadline is None:
                        return reply
                    return fo.resent_answer(message, api.reply_map(reply))
                except fo.Unanswered as lost:
                    if not fo.resend_safe(message):
                        raise fo.outcome_unknown(self.address, message) from None
                    error = lost.error
                except TQError as exc:  # not sent, or a NACK of its own id: nothing done
                    if not fo.retriable(exc):
                        raise
                    error = exc
                if self._closed:  # closed by its owner (maybe from another thread)
                    raise error
                if deadline is None:
                    deadline = time.monotonic() + self._window
                self._rotation.failed(self.address)  # lost: try the next broker first
                try:
                    self._redial(deadline)
                except TQError as exc:
                    raise exc from error

    def _exchange_once(self, message: Mapping[str, Any], timeout: float | None) -> api.Reply:
        """``_exchange`` without failover: a lost answer raises the connection's error."""
        try:
            return self._exchange(message, timeout)
        except fo.Unanswered as lost:
            raise lost.error from None

    def _exchange(self, message: Mapping[str, Any], timeout: float | None) -> api.Reply:
        """One request and its answer (the caller holds the lock). A TQError if it was
        not sent (the core refused it, or the write failed); ``Unanswered`` if the
        connection broke after it was sent (the core names it among the requests
        never answered: its outcome is unknown). A NACK of its own id raises."""
        rid, frame = self._core.send(message)
        self._sock.settimeout(timeout)
        try:
            try:
                self._sock.sendall(frame)
            except (OSError, ValueError) as exc:  # ValueError: a socket closed meanwhile
                raise self._broken(self._core.io_error(exc)) from None  # not (all) sent
            try:
                answer = self._answer(rid)
            except TimeoutError:
                raise self._lost(
                    rid,
                    ConnectionFailed(
                        f"the broker at {self.address} did not answer within {timeout:g}s"
                    ),
                ) from None
            except (OSError, ValueError) as exc:
                raise self._lost(rid, self._core.io_error(exc)) from None
            except TQError as exc:  # the stream broke (a malformed frame, closed by the broker)
                raise self._lost(rid, exc) from None
        finally:
            with contextlib.suppress(OSError, ValueError):
                self._sock.settimeout(None)
        return self._core.result(answer)

    def _answer(self, rid: int) -> Answer:
        """Read until the answer to ``rid`` (events and other answers are dropped)."""
        while True:
            item = self._next_received()
            if isinstance(item, Farewell):  # the broker ends the session
                raise self._lost(rid, item.error, item.failed)
            if isinstance(item, Answer) and item.rid == rid:
                return item

    def _next_received(self) -> Received:
        """The next message from the socket (the caller holds the lock); raises the
        TQError that breaks the stream, and the socket's own errors."""
        while (item := self._core.next_received()) is None:
            self._core.receive_data(self._sock.recv(RECEIVE_SIZE))
        return item

    def _broken(self, exc: TQError) -> TQError:
        self._core.fail(exc)
        return exc

    def _lost(self, rid: int, exc: TQError, failed: tuple[int, ...] = ()) -> Exception:
        """The connection broke while ``rid`` was out: ``Unanswered`` if the core names
        it among the requests sent and never answered, else ``exc``."""
        failed = (*failed, *self._core.fail(exc))
        return fo.Unanswered(exc) if rid in failed else exc

    def request(self, message: Mapping[str, Any]) -> dict[str, Any]:
        """Send one request and wait for its answer (NACKs raise)."""
        return api.reply_map(self._request(message))

    def request_answer(self, message: Mapping[str, Any], kind: type[S]) -> S:
        """``request``, its ACK decoded straight into its declared answer ``kind``
        (tq/protocol/answers.py); BadAnswer naming the field if it does not fit."""
        return api.read_reply(self._request(message), kind)

    def _call(self, call: api.Call[T], timeout: float | None = None) -> T:
        return call.parse(self._request(call.message, timeout))

    def _clock(self) -> float:
        return time.monotonic()

    def subscribe(self, topics: Sequence[str] = api.TOPICS) -> BlockingSubscription:
        """Subscribe and return the iterator of events (tq/client/events.py).

        Until it is closed this client only reads events; another thread may
        call ``close()`` on the client to stop a blocked read. A subscription does
        not move to another broker: a lost connection ends it with an error.
        """
        return BlockingSubscription(self, topics)

    def _next_event(self) -> dict[str, Any]:
        """Read until the next event message (subscription mode)."""
        with self._lock:
            try:
                while True:
                    item = self._next_received()
                    if isinstance(item, Farewell):
                        raise item.error
                    if isinstance(item, EventReceived):
                        return item.message
            except TQError as exc:
                raise self._broken(exc) from None
            except (OSError, ValueError) as exc:  # ValueError: read on a socket closed meanwhile
                raise self._broken(self._core.io_error(exc)) from None


_UNSUBSCRIBE_TIMEOUT = 5.0  # seconds to wait for the unsubscribe ACK


class BlockingSubscription:
    """A blocking client's subscription: an iterator of events and a context manager."""

    def __init__(self, client: BlockingClient, topics: Sequence[str]) -> None:
        self._client = client
        call = api.subscribe(topics)
        self.topics = call.parse(client._request(call.message))
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
            self._client._request(api.unsubscribe().message, _UNSUBSCRIBE_TIMEOUT)
        except TQError:
            self._client.close()


def _open_socket(
    address: str, context: ssl.SSLContext | None, ca: Path | str | None, timeout: float
) -> socket.socket:
    """TCP (+TLS) to the first broker in ``address`` that accepts."""
    sock, host, where = _open_tcp(address, timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for level, option, value in fo.socket_options():  # a silent broker host is noticed
        sock.setsockopt(level, option, value)
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
