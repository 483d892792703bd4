"""The trio client: one connection, many requests in flight.

    async with Client.connect("127.0.0.1:7470", ca=path) as client:
        task_id = await client.submit("echo", {"x": 1})
        task = await client.wait(task_id, timeout=30)

Requests get increasing ids; a reader task matches answers to waiting
callers by id, so any number of coroutines may share one client. A writer
task coalesces queued frames into one ``send_all``.

Failover (tq/client/failover.py): ``address`` may list several brokers; connect
tries them in turn, once each. When a connection is lost later, a request that
is safe to send again (reads; submits, which carry idempotency keys, attached
automatically) reconnects, to the next broker first, with backoff, for up to
``failover`` seconds (default: 15 with several brokers, 0 with one), then is
sent again; other writes raise ``OutcomeUnknown``. ``_redial`` is the one
reconnect point: a new stream, reader and writer (older ones are ignored by
their generation number) and a new hello.
"""

from __future__ import annotations

import builtins
import itertools
import ssl
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Any, TypeVar

import trio

from tq.client import _api as api
from tq.client import failover as fo
from tq.client.events import DEFAULT_BUFFER, EventSink, Subscription
from tq.client.options import ca_name, settings_options, split_addresses, tls_context, with_key
from tq.config import ConnectionSettings, parse_address
from tq.core.errors import ConnectionFailed, TLSFailure, TQError
from tq.core.task import Task
from tq.protocol import Connection
from tq.protocol.connection import MessageError
from tq.security.tls import describe_tls_error

T = TypeVar("T")
CONNECT_TIMEOUT = 10.0


class Client:
    def __init__(self, stream: trio.abc.Stream | None, address: str, max_frame: int) -> None:
        self.address = address  # the broker this client talks to now
        self.server: dict[str, Any] = {}
        self._stream = stream
        self._max_frame = max_frame
        self._conn = Connection(max_frame)
        self._ids = itertools.count(1)
        self._pending: dict[int, trio.MemorySendChannel[dict[str, Any]]] = {}
        self._events: dict[int, EventSink] = {}  # subscription id -> its buffer (events.py)
        self._out_send, self._out_recv = trio.open_memory_channel[bytes](1024)
        self._error: TQError | None = None
        # failover: set by connect(); a connection's reader and writer carry its generation
        self._generation = 0
        self._established = -1  # the generation whose hello was answered
        self._nursery: trio.Nursery | None = None
        self._rotation = fo.Rotation([address])
        self._window = 0.0
        self._dialer: Any = None  # one address -> a stream (open_stream with our TLS)
        self._hello: dict[str, Any] = {}
        self._timeout = CONNECT_TIMEOUT
        self._redialing = trio.Lock()

    # -- connection ----------------------------------------------------
    @classmethod
    @asynccontextmanager
    async def connect(
        cls,
        address: str,
        *,
        ca: Path | None = None,
        insecure: bool = False,
        kind: str = "client",
        name: str = "",
        hello: Mapping[str, Any] | None = None,
        max_frame: int = 16 * 1024 * 1024,
        timeout: float = CONNECT_TIMEOUT,
        key: str | None = None,
        ca_data: str | None = None,
        client_cert: Path | None = None,
        client_key: Path | None = None,
        failover: float | None = None,
    ) -> AsyncIterator[Client]:
        """Connect (``address`` may list brokers, comma-separated) and say hello.

        ``key`` is the API key; ``ca_data`` the CA as PEM text instead of a
        file; ``client_cert``/``client_key`` a certificate for mutual TLS;
        ``failover`` the seconds to keep reconnecting after a lost connection
        (None: 15 with several brokers, 0 with one; see the module docstring).
        """
        brokers = split_addresses(address)
        tls_context(address, ca=ca, insecure=insecure, ca_data=ca_data)  # a missing CA: now

        async def dial(one: str) -> trio.abc.Stream:
            return await open_stream(
                one,
                ca=ca,
                insecure=insecure,
                timeout=timeout,
                ca_data=ca_data,
                client_cert=client_cert,
                client_key=client_key,
            )

        client = cls(None, brokers[0], max_frame)
        client._rotation = fo.Rotation(brokers)
        client._window = fo.window(brokers, failover)
        client._dialer = dial
        client._hello = api.hello(kind, name, with_key(dict(hello or {}), key))
        client._timeout = timeout
        try:
            async with trio.open_nursery() as nursery:
                client._nursery = nursery
                await client._redial(client._generation, None)
                yield client
                nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            raise single_exception(group) from None
        finally:
            if client._stream is not None:
                await trio.aclose_forcefully(client._stream)

    @classmethod
    def from_settings(cls, settings: ConnectionSettings, **kwargs: Any) -> Any:
        """Connect as the settings say: address, CA, key (or a join token), mutual TLS."""
        return cls.connect(**{**settings_options(settings), **kwargs})

    # -- (re)connecting: the one place failover happens --------------------
    async def _redial(self, seen: int, deadline: float | None) -> None:
        """Connect to the next broker that accepts, unless another task already did
        since generation ``seen``. ``deadline`` None: one round through the brokers
        (the first connect); else rounds with backoff until the deadline."""
        async with self._redialing:
            if self._generation != seen:
                return  # another request reconnected meanwhile
            if deadline is not None:
                self._rotation.failed(self.address)  # lost: try the next broker first
            backoff = fo.Backoff(deadline)
            while True:
                error: TQError | None = None
                for one in self._rotation.order():
                    try:
                        await self._dial(one)
                    except TQError as exc:
                        if not fo.retriable(exc):
                            raise
                        self._rotation.failed(one)
                        error = exc
                        continue
                    self._rotation.connected(one)
                    return
                assert error is not None  # the rotation is never empty
                delay = None if deadline is None else backoff.next_delay(trio.current_time())
                if delay is None:
                    raise error
                await trio.sleep(delay)

    async def _dial(self, one: str) -> None:
        """A new connection to ``one`` (the old one dropped) and its hello."""
        assert self._nursery is not None and self._dialer is not None
        await self._drop()
        stream = await self._dialer(one)
        self._generation += 1
        gen = self._generation
        self._stream, self.address, self._error = stream, one, None
        self._conn = Connection(self._max_frame)
        self._out_send, self._out_recv = trio.open_memory_channel[bytes](1024)
        self._nursery.start_soon(self._reader, stream, self._conn, gen)
        self._nursery.start_soon(self._writer, stream, self._out_recv, gen)
        try:
            with trio.fail_after(self._timeout):
                self.server = await self._request_with_id(self._hello, next(self._ids))
            self._established = gen
        except trio.TooSlowError:
            await self._drop()
            raise ConnectionFailed(
                f"the broker at {one} did not answer hello within {self._timeout:g}s"
            ) from None
        except TQError:
            await self._drop()
            raise

    async def _drop(self) -> None:
        """Give up the current connection (its reader and writer end on their own)."""
        if self._stream is None:
            return
        self._fail(api.connection_lost(self.address))
        self._out_send.close()
        stream, self._stream = self._stream, None
        await trio.aclose_forcefully(stream)

    async def _writer(
        self, stream: trio.abc.Stream, out: trio.MemoryReceiveChannel[bytes], gen: int
    ) -> None:
        try:
            async for first in out:
                chunks = [first]
                while True:
                    try:
                        chunks.append(out.receive_nowait())
                    except (trio.WouldBlock, trio.EndOfChannel):
                        break
                await stream.send_all(b"".join(chunks))
        except (trio.BrokenResourceError, trio.ClosedResourceError, ssl.SSLError, OSError):
            self._fail(api.connection_lost(self.address), gen)

    async def _reader(self, stream: trio.abc.Stream, conn: Connection, gen: int) -> None:
        with suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            await self._read(stream, conn, gen)
        self._fail(api.connection_lost(self.address), gen)

    async def _read(self, stream: trio.abc.Stream, conn: Connection, gen: int) -> None:
        try:
            while True:
                data = bytes(await stream.receive_some(256 * 1024))
                if not data:
                    break
                conn.receive_data(data)
                while (msg := conn.next_message()) is not None:
                    if gen != self._generation:
                        return
                    if msg["t"] == "event":
                        sink = self._events.get(msg["id"])
                        if sink is not None:
                            sink.offer(msg)
                        continue
                    self._deliver(msg, gen)
        except MessageError as exc:
            self._fail(exc.cause, gen)
        except TQError as exc:
            self._fail(exc, gen)
        except ssl.SSLError as exc:
            self._tls_failed(exc, gen)
        except trio.BrokenResourceError as exc:
            if isinstance(exc.__cause__, ssl.SSLError):  # e.g. mutual TLS refused our cert
                self._tls_failed(exc.__cause__, gen)
            else:
                raise

    def _tls_failed(self, exc: ssl.SSLError, gen: int) -> None:
        if gen == self._established and api.closed_in_handshake(exc):
            return  # an EOF after the hello was answered: the connection was lost
        self._fail(TLSFailure(describe_tls_error(exc, self.address, None)), gen)

    def _deliver(self, msg: dict[str, Any], gen: int) -> None:
        rid = msg["id"]
        if rid == 0 and msg["t"] == "nack":
            try:
                api.raise_for_nack(msg)
            except TQError as exc:
                self._fail(exc, gen)
            return
        channel = self._pending.pop(rid, None)
        if channel is not None:
            channel.send_nowait(msg)

    def _fail(self, exc: TQError, gen: int | None = None) -> None:
        """The connection is unusable: fail every waiting request with ``exc``
        (unless ``gen`` names an older connection than the current one)."""
        if gen is not None and gen != self._generation:
            return
        if self._error is None:
            self._error = exc
        for channel in self._pending.values():
            channel.close()
        self._pending.clear()
        for sink in self._events.values():
            sink.send.close()
        self._events.clear()

    @property
    def error(self) -> TQError | None:
        """Why the connection is unusable, or None while it is fine."""
        return self._error

    async def request(self, message: dict[str, Any]) -> dict[str, Any]:
        """Send one request and wait for its answer (NACKs raise).

        With failover on, a lost connection reconnects and sends the request again
        if that is safe (tq.client.failover); else ``OutcomeUnknown``."""
        if self._window <= 0:
            return await self._request_with_id(message, next(self._ids))
        message = fo.with_idempotency_keys(message)  # a resent submit never duplicates
        deadline: float | None = None
        while True:
            seen = self._generation
            try:
                reply = await self._exchange(message, next(self._ids))
                return reply if deadline is None else fo.resent_answer(message, reply)
            except fo.Unanswered as lost:
                if not fo.resend_safe(message):
                    raise fo.outcome_unknown(self.address, message) from None
                error = lost.error
            except TQError as exc:  # refused before it was sent, or a NACK of its own id
                if not fo.retriable(exc):
                    raise
                error = exc
            if deadline is None:
                deadline = trio.current_time() + self._window
            try:
                await self._redial(seen, deadline)
            except TQError as exc:
                raise exc from error

    async def _request_with_id(self, message: dict[str, Any], rid: int) -> dict[str, Any]:
        try:
            return await self._exchange(message, rid)
        except fo.Unanswered as lost:
            raise lost.error from None

    async def _exchange(self, message: dict[str, Any], rid: int) -> dict[str, Any]:
        """One request and its answer; ``Unanswered`` if the connection broke after it
        was handed to the writer (its outcome is unknown); TQError otherwise."""
        if self._error is not None:
            raise self._error
        send, recv = trio.open_memory_channel[dict[str, Any]](1)
        self._pending[rid] = send
        try:
            await self._out_send.send(self._conn.send({**message, "id": rid}))
            try:
                reply = await recv.receive()
            except trio.EndOfChannel:
                raise fo.Unanswered(self._error or api.connection_lost(self.address)) from None
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise self._error or api.connection_lost(self.address) from None  # not sent
        finally:
            self._pending.pop(rid, None)
        return api.raise_for_nack(reply)

    async def _call(self, call: api.Call[T]) -> T:
        return call.parse(await self.request(call.message))

    def _open_events(self, buffer: int) -> tuple[int, trio.MemoryReceiveChannel[dict[str, Any]]]:
        """A request id for a subscribe and the channel its events will arrive on."""
        rid = next(self._ids)
        send, recv = trio.open_memory_channel[dict[str, Any]](buffer)
        self._events[rid] = EventSink(send)
        return rid, recv

    def _close_events(self, rid: int) -> None:
        sink = self._events.pop(rid, None)
        if sink is not None:
            sink.send.close()

    # -- the client API (same names and arguments as BlockingClient) -----
    async def submit(self, type: str, payload: Any = None, **options: Any) -> str:
        ids = await self.submit_many([api.task_spec(type, payload, **options)])
        return ids[0]

    async def submit_many(self, specs: Sequence[Mapping[str, Any]]) -> list[str]:
        """Submit ``specs`` in one request: all or nothing, one transaction; their ids.

        Keep a request to about 250 tasks and pipeline several (the trio client
        from concurrent tasks): a larger one holds the broker's writer longer and
        every other client's write waits for it (docs/PROTOCOL.md, "Size").
        """
        return await self._call(api.submit_many(specs))

    async def submit_items(self, specs: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
        """Like ``submit_many``, with each task's ``created`` flag and broker ``warning``."""
        return await self._call(api.submit_items(specs))

    async def get(self, task_id: str) -> Task:
        return await self._call(api.get(task_id))

    async def submit_workflow(self, document: Mapping[str, Any]) -> list[str]:
        """Submit a workflow (chains, groups, chords: tq.core.workflow) atomically; the
        ids of its tasks in the document's order."""
        return await self._call(api.submit_workflow(document))

    async def workflow(self, task_id: str) -> dict[str, Any]:
        """The workflow around a task: ``{"tasks", "edges": [[task, depends_on]],
        "truncated"}``."""
        return await self._call(api.workflow(task_id))

    async def explain(self, task_id: str) -> dict[str, Any]:
        """Why the task is not running now: ``{"task", "state", "reasons": [...]}``."""
        return await self._call(api.explain(task_id))

    async def wait(self, task_id: str, timeout: float | None = None) -> Task:
        deadline = None if timeout is None else trio.current_time() + timeout
        while True:
            remaining = None if deadline is None else deadline - trio.current_time()
            task, timed_out = await self._call(api.wait_step(task_id, remaining))
            if not timed_out:
                return task
            if deadline is not None and trio.current_time() >= deadline:
                raise api.wait_timed_out(task, timeout)

    async def list(self, **filters: Any) -> api.TaskPage:
        return await self._call(api.list_tasks(**filters))

    async def cancel(self, task_id: str) -> Task:
        return await self._call(api.cancel(task_id))

    async def retry(self, task_id: str) -> Task:
        return await self._call(api.retry(task_id))

    async def stats(self) -> dict[str, Any]:
        return await self._call(api.stats())

    async def workers(self) -> builtins.list[dict[str, Any]]:
        return await self._call(api.workers())

    async def set_priority(self, task_id: str, priority: int | str) -> Task:
        return await self._call(api.set_priority(task_id, priority))

    async def queue_depth(self) -> dict[str, Any]:
        return await self._call(api.queue_depth())

    async def pause_queue(self, queue: str) -> dict[str, Any]:
        """Pause a queue (admin): it accepts submits, hands nothing out. ``changed``
        False: it was paused already."""
        return await self._call(api.pause_queue(queue, True))

    async def resume_queue(self, queue: str) -> dict[str, Any]:
        return await self._call(api.pause_queue(queue, False))

    async def schedule(self, op: str, **fields: Any) -> dict[str, Any]:
        """A ``schedule`` request: ``add`` (name, cron, task, timezone, missed), ``list``,
        ``get``/``remove``/``pause``/``resume``/``run_now`` (name). See
        ``tq.client.schedule_task`` for the task map."""
        return await self._call(api.schedule(op, **fields))

    async def cluster_status(self) -> dict[str, Any]:
        return await self._call(api.cluster_status())

    async def purge(
        self, states: Sequence[str], older_than: float, **options: Any
    ) -> dict[str, Any]:
        return await self._call(api.purge(states, older_than, **options))

    async def retry_many(self, state: str, **options: Any) -> dict[str, Any]:
        return await self._call(api.retry_many(state, **options))

    def subscribe(
        self, topics: Sequence[str] = api.TOPICS, *, buffer: int = DEFAULT_BUFFER
    ) -> Subscription:
        """Live events: ``async with client.subscribe(["tasks"]) as events: async for ...``

        See tq/client/events.py; the client stays usable for requests meanwhile.
        """
        return Subscription(self, topics, buffer)


def single_exception(group: BaseExceptionGroup) -> BaseException:
    """The one exception inside nested single-member groups, else the group itself.

    The client's nursery only wraps; callers should see the TQError (or their
    own exception from inside ``async with``), not an ExceptionGroup.
    """
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


async def open_stream(
    address: str,
    *,
    ca: Path | None,
    insecure: bool,
    timeout: float = CONNECT_TIMEOUT,
    ca_data: str | None = None,
    client_cert: Path | None = None,
    client_key: Path | None = None,
) -> trio.abc.Stream:
    """TCP (+TLS unless insecure) to the first broker in ``address`` that accepts.

    Errors are ones an operator can act on.
    """
    context = tls_context(
        address,
        ca=ca,
        insecure=insecure,
        ca_data=ca_data,
        client_cert=client_cert,
        client_key=client_key,
    )
    tcp, host, where = await _open_tcp(address, timeout)
    if context is None:
        return tcp
    tls = trio.SSLStream(tcp, context, server_hostname=host)
    try:
        with trio.fail_after(timeout):
            await tls.do_handshake()
    except trio.TooSlowError:
        await trio.aclose_forcefully(tcp)
        raise TLSFailure(f"TLS handshake with {where} timed out") from None
    except (ssl.SSLError, trio.BrokenResourceError) as exc:
        await trio.aclose_forcefully(tcp)
        cause = exc.__cause__ if isinstance(exc, trio.BrokenResourceError) else exc
        if (cause is None or api.closed_in_handshake(cause)) and await _refuses(host, where):
            raise api.shutting_down(where) from None
        if isinstance(cause, ssl.SSLError | OSError):
            raise TLSFailure(describe_tls_error(cause, where, ca_name(ca, ca_data))) from None
        raise api.connection_lost(where) from None
    return tls


async def _refuses(host: str, where: str) -> bool:
    """After a dropped handshake: does the broker now refuse connections (going away)?"""
    try:
        with trio.fail_after(2.0):
            stream = await trio.open_tcp_stream(host, parse_address(where)[1])
    except (OSError, trio.TooSlowError):
        return True
    await trio.aclose_forcefully(stream)
    return False


async def _open_tcp(address: str, timeout: float) -> tuple[trio.SocketStream, str, str]:
    """(stream, host, the address used): the first of the listed brokers that accepts."""
    error: ConnectionFailed | None = None
    for one in split_addresses(address):
        host, port = parse_address(one)
        try:
            with trio.fail_after(timeout):
                stream = await trio.open_tcp_stream(host, port)
            for level, option, value in fo.socket_options():
                stream.setsockopt(level, option, value)
            return stream, host, one
        except trio.TooSlowError:
            error = ConnectionFailed(f"connecting to the broker at {one} timed out")
        except OSError as exc:
            error = api.connect_failed(one, exc)
    assert error is not None  # split_addresses never returns an empty list
    raise error
