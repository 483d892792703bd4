"""The trio client: one connection, many requests in flight.

    async with Client.connect("127.0.0.1:7470", ca=path) as client:
        task_id = await client.submit("echo", {"x": 1})
        task = await client.wait(task_id, timeout=30)

A thin shell over the client core (core.py: session rules, ids, answers
matched to requests) with the API of ``_methods.py``. A reader task hands
each answer to the coroutine waiting for its id, so any number of coroutines
may share one client. A writer task coalesces queued frames into one
``send_all``.

Failover (tq/client/failover.py): ``address`` may list several brokers; connect
tries them in turn, once each. When a connection is lost later, a request that
is safe to send again (reads; submits, which carry idempotency keys, attached
automatically) reconnects, to the next broker first, with backoff, for up to
``failover`` seconds (default: 15 with several brokers, 0 with one), then is
sent again; other writes raise ``OutcomeUnknown``. ``_redial`` is the one
reconnect point: a new stream, a new ``ClientCore`` (a new session), its reader
and writer (older ones are ignored by their generation number) and a new hello.
Which requests were sent and never answered is the old core's to say
(``fail()``, a farewell's ``failed``): those raise ``Unanswered`` inside the
client, and only they can have an unknown outcome; a request the core refused
before any byte was sent is simply sent again on the new connection.
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import msgspec
import trio

from tq.client import _api as api
from tq.client import failover as fo
from tq.client._methods import AsyncMethods
from tq.client.core import RECEIVE_SIZE, ClientCore, connect_targets
from tq.client.events import DEFAULT_BUFFER, EventSink, Subscription
from tq.client.options import ca_name, settings_options, split_addresses, tls_context, with_key
from tq.config import ConnectionSettings, parse_address
from tq.core.errors import ConnectionFailed, TLSFailure, TQError
from tq.core.limits import MAX_FRAME
from tq.protocol.session import Answer, EventReceived, Farewell
from tq.security.tls import describe_tls_error

T = TypeVar("T")
S = TypeVar("S", bound=msgspec.Struct)
CONNECT_TIMEOUT = 10.0


class Client(AsyncMethods):
    def __init__(
        self,
        stream: trio.abc.Stream | None,
        address: str,
        max_frame: int,
        hello: Mapping[str, Any] | None = None,
    ) -> None:
        self.address = address  # the broker this client talks to now
        self._stream = stream
        self._max_frame = max_frame
        self._hello = dict(hello or api.hello("client", ""))
        self._core = ClientCore(address, max_frame, self._hello)
        self._pending: dict[int, trio.MemorySendChannel[Answer]] = {}
        self._events: dict[int, EventSink] = {}  # subscription id -> its buffer (events.py)
        self._out_send, self._out_recv = trio.open_memory_channel[bytes](1024)
        # failover: set by connect(); a connection's reader and writer carry its generation
        self._generation = 0
        self._nursery: trio.Nursery | None = None
        self._rotation = fo.Rotation([address])
        self._window = 0.0
        self._dialer: Any = None  # one address -> a stream (open_stream with our TLS)
        self._timeout = CONNECT_TIMEOUT
        self._redialing = trio.Lock()

    @property
    def server(self) -> dict[str, Any]:
        """The broker's hello ACK (of the current connection)."""
        return self._core.server

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
        max_frame: int = MAX_FRAME,
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

        message = api.hello(kind, name, with_key(dict(hello or {}), key))
        client = cls(None, brokers[0], max_frame, message)
        client._rotation = fo.Rotation(brokers)
        client._window = fo.window(brokers, failover)
        client._dialer = dial
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
        """A new connection to ``one`` (the old one dropped): a new stream, a new core
        (a new session), its reader and writer, and the hello."""
        assert self._nursery is not None and self._dialer is not None
        await self._drop()
        stream = await self._dialer(one)
        self._generation += 1
        gen = self._generation
        self._stream, self.address = stream, one
        self._core = core = ClientCore(one, self._max_frame, self._hello)
        self._out_send, self._out_recv = trio.open_memory_channel[bytes](1024)
        self._nursery.start_soon(self._reader, stream, core, gen)
        self._nursery.start_soon(self._writer, stream, self._out_recv, gen)
        try:
            with trio.fail_after(self._timeout):
                await self._exchange_once(*core.hello_frame())
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

    async def _reader(self, stream: trio.abc.Stream, core: ClientCore, gen: int) -> None:
        try:
            while True:
                core.receive_data(bytes(await stream.receive_some(RECEIVE_SIZE)))
                while (item := core.next_received()) is not None:
                    if gen != self._generation:
                        return  # a connection given up: its core says nothing any more
                    if isinstance(item, EventReceived):
                        sink = self._events.get(item.message["id"])
                        if sink is not None:
                            sink.offer(item.message)
                    elif isinstance(item, Answer):
                        channel = self._pending.pop(item.rid, None)
                        if channel is not None:
                            channel.send_nowait(item)
                    elif isinstance(item, Farewell):  # the broker ends the session
                        self._fail(item.error, gen, item.failed)
        except (TQError, ssl.SSLError, trio.BrokenResourceError) as exc:
            self._fail(core.io_error(exc), gen)
        except (trio.ClosedResourceError, OSError):
            self._fail(api.connection_lost(self.address), gen)

    def _fail(self, exc: TQError, gen: int | None = None, failed: tuple[int, ...] = ()) -> None:
        """The connection is unusable: every waiting request fails with ``exc`` (unless
        ``gen`` names an older connection than the current one). The requests the
        core names as sent and never answered (``fail()``, a farewell's ``failed``)
        raise ``Unanswered`` in ``_exchange``: their outcome is unknown."""
        if gen is not None and gen != self._generation:
            return
        unanswered = (*failed, *self._core.fail(exc))
        for rid in unanswered:
            channel = self._pending.pop(rid, None)
            if channel is not None:
                channel.close()
        for channel in self._pending.values():  # none: every waiter's id was sent
            channel.close()
        self._pending.clear()
        for sink in self._events.values():
            sink.send.close()
        self._events.clear()

    @property
    def error(self) -> TQError | None:
        """Why the connection is unusable, or None while it is fine."""
        return self._core.error

    async def request(self, message: Mapping[str, Any]) -> dict[str, Any]:
        """Send one request and wait for its answer (NACKs raise).

        With failover on, a lost connection reconnects and sends the request again
        if that is safe (tq.client.failover); else ``OutcomeUnknown``."""
        return api.reply_map(await self._ask(message))

    async def request_answer(self, message: Mapping[str, Any], kind: type[S]) -> S:
        """``request``, its ACK decoded straight into its declared answer ``kind``
        (tq/protocol/answers.py); BadAnswer naming the field if it does not fit."""
        return api.read_reply(await self._ask(message), kind)

    async def _ask(self, message: Mapping[str, Any]) -> api.Reply:
        """``request``, its answer as the core gives it (``Call.parse`` reads it)."""
        if self._window <= 0:
            return await self._exchange_once(*self._core.send(message))
        message = fo.with_idempotency_keys(dict(message))  # a resent submit never duplicates
        deadline: float | None = None
        while True:
            seen = self._generation
            try:
                reply = await self._exchange(*self._core.send(message))
                if deadline is None:
                    return reply
                return fo.resent_answer(message, api.reply_map(reply))
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

    def _start(self, message: Mapping[str, Any]) -> tuple[int, bytes]:
        """The id and frame of a request (rules checked); ``_exchange`` sends it."""
        return self._core.send(message)

    async def _exchange_once(self, rid: int, frame: bytes) -> api.Reply:
        """``_exchange`` without failover: a lost answer raises the connection's error."""
        try:
            return await self._exchange(rid, frame)
        except fo.Unanswered as lost:
            raise lost.error from None

    async def _exchange(self, rid: int, frame: bytes) -> api.Reply:
        """Send a frame from ``_start`` and wait for its answer; ``Unanswered`` if the
        connection broke after it was handed to the writer (its outcome is unknown),
        TQError if it was never sent."""
        send, recv = trio.open_memory_channel[Answer](1)
        self._pending[rid] = send
        try:
            try:
                await self._out_send.send(frame)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                raise self.error or api.connection_lost(self.address) from None  # not sent
            try:
                answer = await recv.receive()
            except trio.EndOfChannel:
                raise fo.Unanswered(self.error or api.connection_lost(self.address)) from None
        finally:
            if self._pending.get(rid) is send:  # (a new connection reuses ids)
                del self._pending[rid]
        return self._core.result(answer)

    async def _call(self, call: api.Call[T]) -> T:
        return call.parse(await self._ask(call.message))

    def _clock(self) -> float:
        return trio.current_time()

    def _open_events(self, rid: int, buffer: int) -> trio.MemoryReceiveChannel[dict[str, Any]]:
        """The channel the events of the subscribe ``rid`` will arrive on."""
        send, recv = trio.open_memory_channel[dict[str, Any]](buffer)
        self._events[rid] = EventSink(send)
        return recv

    def _close_events(self, rid: int) -> None:
        sink = self._events.pop(rid, None)
        if sink is not None:
            sink.send.close()

    def subscribe(
        self, topics: Sequence[str] = api.TOPICS, *, buffer: int = DEFAULT_BUFFER
    ) -> Subscription:
        """Live events: ``async with client.subscribe(["tasks"]) as events: async for ...``

        See tq/client/events.py; the client stays usable for requests meanwhile. A
        subscription does not move to another broker: after a lost connection its
        iteration raises the connection's error; subscribe again.
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
    for host, port, one in connect_targets(address):
        try:
            with trio.fail_after(timeout):
                stream = await trio.open_tcp_stream(host, port)
            for level, option, value in fo.socket_options():  # a silent broker host is noticed
                stream.setsockopt(level, option, value)
            return stream, host, one
        except trio.TooSlowError:
            error = ConnectionFailed(f"connecting to the broker at {one} timed out")
        except OSError as exc:
            error = api.connect_failed(one, exc)
    assert error is not None  # connect_targets never returns an empty list
    raise error
