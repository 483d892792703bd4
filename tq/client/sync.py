"""The blocking client: the same API as ``Client``, over a plain socket.

For scripts, threads (the Textual console's workers) and any code without a
trio loop. One request at a time per client (a lock makes it safe to share
between threads); batch with ``submit_many`` for throughput. Messages and
parsing come from ``_api.py``, exactly as in the trio client.

Failover as in the trio client (tq/client/failover.py): ``address`` may list
several brokers, tried in turn; after a lost connection a request that is safe
to send again reconnects (``_redial``, the one reconnect point) with backoff for
up to ``failover`` seconds and is sent again; other writes raise
``OutcomeUnknown``. The pauses are ``time.sleep`` (Ctrl-C interrupts them).
"""

from __future__ import annotations

import builtins
import contextlib
import itertools
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
from tq.client import failover as fo
from tq.client.options import ca_name, settings_options, split_addresses, tls_context, with_key
from tq.config import ConnectionSettings, parse_address
from tq.core.errors import ConnectionFailed, InvalidRequest, TLSFailure, TQError
from tq.core.task import Task
from tq.protocol import Connection
from tq.protocol.connection import MessageError
from tq.security.tls import describe_tls_error

T = TypeVar("T")


class BlockingClient:
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
        failover: float | None = None,
    ) -> None:
        brokers = split_addresses(address)
        self.address = brokers[0]  # the broker this client talks to now
        self._closed = False  # close() was called: no reconnecting
        self.server: dict[str, Any] = {}
        self._max_frame = max_frame
        self._conn = Connection(max_frame)
        self._ids = itertools.count(1)
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
        self._hello = api.hello(kind, name, with_key(dict(hello or {}), key))
        self._rotation = fo.Rotation(brokers)
        self._window = fo.window(brokers, failover)
        self._redial(None)

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
        """A new connection to ``one`` (the old one closed) and its hello."""
        if hasattr(self, "_sock"):
            self._close_socket()
        self._sock = _open_socket(one, self._context, self._ca, self._timeout)
        self._sock.settimeout(None)
        self.address = one
        self._conn = Connection(self._max_frame)
        self._established = False  # until the hello is answered
        try:
            self.server = self._request_once(self._hello, self._timeout)
            self._established = True
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

    def _request(self, message: dict[str, Any], timeout: float | None = None) -> dict[str, Any]:
        if self._subscription is not None and message.get("t") != "unsubscribe":
            raise InvalidRequest(
                "this client is reading events (subscribe): use another client for requests"
            )
        with self._lock:
            if self._window <= 0 or message.get("t") in ("subscribe", "unsubscribe"):
                return self._request_once(message, timeout)
            message = fo.with_idempotency_keys(message)  # a resent submit never duplicates
            deadline: float | None = None
            while True:
                try:
                    reply = self._exchange(message, timeout)
                    return reply if deadline is None else fo.resent_answer(message, reply)
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

    def _request_once(self, message: dict[str, Any], timeout: float | None) -> dict[str, Any]:
        try:
            return self._exchange(message, timeout)
        except fo.Unanswered as lost:
            raise lost.error from None

    def _exchange(self, message: dict[str, Any], timeout: float | None) -> dict[str, Any]:
        """One request and its answer (the caller holds the lock); ``Unanswered`` if
        the connection broke after it was sent (its outcome is unknown)."""
        rid = next(self._ids)
        self._sock.settimeout(timeout)
        try:
            try:
                self._sock.sendall(self._conn.send({**message, "id": rid}))
            except ssl.SSLError as exc:
                if self._established and api.closed_in_handshake(exc):
                    raise api.connection_lost(self.address) from None  # not (all) sent
                raise TLSFailure(describe_tls_error(exc, self.address, None)) from None
            except (OSError, ValueError):  # ValueError: a socket closed meanwhile
                raise api.connection_lost(self.address) from None  # not (all) sent
            try:
                while True:
                    msg = self._read_message()
                    if msg["id"] == rid:
                        return api.raise_for_nack(msg)
                    if msg["id"] == 0 and msg["t"] == "nack":
                        try:
                            api.raise_for_nack(msg)
                        except TQError as exc:  # the connection ends: the outcome is unknown
                            raise fo.Unanswered(exc) from None
            except MessageError as exc:
                raise exc.cause from None
            except TimeoutError:
                raise ConnectionFailed(
                    f"the broker at {self.address} did not answer within {timeout:g}s"
                ) from None
            except ssl.SSLError as exc:
                if self._established and api.closed_in_handshake(exc):
                    raise fo.Unanswered(api.connection_lost(self.address)) from None
                raise TLSFailure(describe_tls_error(exc, self.address, None)) from None
            except (OSError, ValueError):
                raise fo.Unanswered(api.connection_lost(self.address)) from None
            except ConnectionFailed as exc:  # the broker closed the connection
                raise fo.Unanswered(exc) from None
        finally:
            with contextlib.suppress(OSError, ValueError):
                self._sock.settimeout(None)

    def _read_message(self) -> dict[str, Any]:
        """The next message from the socket (the caller holds the lock)."""
        while (msg := self._conn.next_message()) is None:
            data = self._sock.recv(256 * 1024)
            if not data:
                raise api.connection_lost(self.address)
            self._conn.receive_data(data)
        return msg

    def request(self, message: dict[str, Any]) -> dict[str, Any]:
        return self._request(message)

    def _call(self, call: api.Call[T], timeout: float | None = None) -> T:
        return call.parse(self._request(call.message, timeout))

    # -- the client API (same names and arguments as Client) ------------
    def submit(self, type: str, payload: Any = None, **options: Any) -> str:
        return self.submit_many([api.task_spec(type, payload, **options)])[0]

    def submit_many(self, specs: Sequence[Mapping[str, Any]]) -> list[str]:
        """Submit ``specs`` in one request: all or nothing, one transaction; their ids.

        Keep a request to about 250 tasks and send several: a larger one holds the
        broker's writer longer and every other client's write waits for it
        (docs/PROTOCOL.md, "Size"). For the highest rates use the trio ``Client``,
        which pipelines requests.
        """
        return self._call(api.submit_many(specs))

    def submit_items(self, specs: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
        """Like ``submit_many``, with each task's ``created`` flag and broker ``warning``."""
        return self._call(api.submit_items(specs))

    def get(self, task_id: str) -> Task:
        return self._call(api.get(task_id))

    def submit_workflow(self, document: Mapping[str, Any]) -> list[str]:
        """Submit a workflow (chains, groups, chords: tq.core.workflow) atomically; the
        ids of its tasks in the document's order."""
        return self._call(api.submit_workflow(document))

    def workflow(self, task_id: str) -> dict[str, Any]:
        """The workflow around a task: ``{"tasks", "edges": [[task, depends_on]],
        "truncated"}``."""
        return self._call(api.workflow(task_id))

    def explain(self, task_id: str) -> dict[str, Any]:
        """Why the task is not running now: ``{"task", "state", "reasons": [...]}``."""
        return self._call(api.explain(task_id))

    def wait(self, task_id: str, timeout: float | None = None) -> Task:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            remaining = None if deadline is None else deadline - time.monotonic()
            task, timed_out = self._call(api.wait_step(task_id, remaining))
            if not timed_out:
                return task
            if deadline is not None and time.monotonic() >= deadline:
                raise api.wait_timed_out(task, timeout)

    def list(self, **filters: Any) -> api.TaskPage:
        return self._call(api.list_tasks(**filters))

    def cancel(self, task_id: str) -> Task:
        return self._call(api.cancel(task_id))

    def retry(self, task_id: str) -> Task:
        return self._call(api.retry(task_id))

    def stats(self) -> dict[str, Any]:
        return self._call(api.stats())

    def workers(self) -> builtins.list[dict[str, Any]]:
        return self._call(api.workers())

    def set_priority(self, task_id: str, priority: int | str) -> Task:
        return self._call(api.set_priority(task_id, priority))

    def queue_depth(self) -> dict[str, Any]:
        return self._call(api.queue_depth())

    def pause_queue(self, queue: str) -> dict[str, Any]:
        """Pause a queue (admin): it accepts submits, hands nothing out. ``changed``
        False: it was paused already."""
        return self._call(api.pause_queue(queue, True))

    def resume_queue(self, queue: str) -> dict[str, Any]:
        return self._call(api.pause_queue(queue, False))

    def schedule(self, op: str, **fields: Any) -> dict[str, Any]:
        """A ``schedule`` request: ``add`` (name, cron, task, timezone, missed), ``list``,
        ``get``/``remove``/``pause``/``resume``/``run_now`` (name). See
        ``tq.client.schedule_task`` for the task map."""
        return self._call(api.schedule(op, **fields))

    def cluster_status(self) -> dict[str, Any]:
        return self._call(api.cluster_status())

    def purge(self, states: Sequence[str], older_than: float, **options: Any) -> dict[str, Any]:
        return self._call(api.purge(states, older_than, **options))

    def retry_many(self, state: str, **options: Any) -> dict[str, Any]:
        return self._call(api.retry_many(state, **options))

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
                    msg = self._read_message()
                    if msg["t"] == "event":
                        return msg
                    if msg["id"] == 0 and msg["t"] == "nack":
                        api.raise_for_nack(msg)
            except MessageError as exc:
                raise exc.cause from None
            except ssl.SSLError as exc:
                raise TLSFailure(describe_tls_error(exc, self.address, None)) from None
            except (OSError, ValueError):  # ValueError: read on a socket closed meanwhile
                raise api.connection_lost(self.address) from None


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
    for one in split_addresses(address):
        host, port = parse_address(one)
        try:
            return socket.create_connection((host, port), timeout=timeout), host, one
        except TimeoutError:
            error = ConnectionFailed(f"connecting to the broker at {one} timed out")
        except OSError as exc:
            error = api.connect_failed(one, exc)
    assert error is not None  # split_addresses never returns an empty list
    raise error


__all__ = ["BlockingClient", "TQError"]
