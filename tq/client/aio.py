"""The trio client: one connection, many requests in flight.

    async with Client.connect("127.0.0.1:7470", ca=path) as client:
        task_id = await client.submit("echo", {"x": 1})
        task = await client.wait(task_id, timeout=30)

A thin shell over the client core (core.py: session rules, ids, answers
matched to requests) with the API of ``_methods.py``. A reader task hands
each answer to the coroutine waiting for its id, so any number of coroutines
may share one client. A writer task coalesces queued frames into one
``send_all``.
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import trio

from tq.client import _api as api
from tq.client._methods import AsyncMethods
from tq.client.core import RECEIVE_SIZE, ClientCore, connect_targets
from tq.client.events import DEFAULT_BUFFER, EventSink, Subscription
from tq.client.options import ca_name, settings_options, tls_context, with_key
from tq.config import Settings, parse_address
from tq.core.errors import ConnectionFailed, TLSFailure, TQError
from tq.protocol.session import Answer, EventReceived, Farewell
from tq.security.tls import describe_tls_error

T = TypeVar("T")
CONNECT_TIMEOUT = 10.0


class Client(AsyncMethods):
    def __init__(
        self,
        stream: trio.abc.Stream,
        address: str,
        max_frame: int,
        hello: Mapping[str, Any] | None = None,
    ) -> None:
        self.address = address
        self._stream = stream
        self._core = ClientCore(address, max_frame, hello or api.hello("client", ""))
        self._pending: dict[int, trio.MemorySendChannel[Answer]] = {}
        self._events: dict[int, EventSink] = {}  # subscription id -> its buffer (events.py)
        self._out_send, self._out_recv = trio.open_memory_channel[bytes](1024)

    @property
    def server(self) -> dict[str, Any]:
        """The broker's hello ACK."""
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
        max_frame: int = 16 * 1024 * 1024,
        timeout: float = CONNECT_TIMEOUT,
        key: str | None = None,
        ca_data: str | None = None,
        client_cert: Path | None = None,
        client_key: Path | None = None,
    ) -> AsyncIterator[Client]:
        """Connect (``address`` may list brokers, comma-separated) and say hello.

        ``key`` is the API key; ``ca_data`` the CA as PEM text instead of a
        file; ``client_cert``/``client_key`` a certificate for mutual TLS.
        """
        stream = await open_stream(
            address,
            ca=ca,
            insecure=insecure,
            timeout=timeout,
            ca_data=ca_data,
            client_cert=client_cert,
            client_key=client_key,
        )
        message = api.hello(kind, name, with_key(dict(hello or {}), key))
        client = cls(stream, address, max_frame, message)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(client._reader)
                nursery.start_soon(client._writer)
                try:
                    with trio.fail_after(timeout):
                        await client._exchange(*client._core.hello_frame())
                except trio.TooSlowError:
                    raise ConnectionFailed(
                        f"the broker at {address} did not answer hello within {timeout:g}s"
                    ) from None
                yield client
                nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            raise single_exception(group) from None
        finally:
            await trio.aclose_forcefully(stream)

    @classmethod
    def from_settings(cls, settings: Settings, **kwargs: Any) -> Any:
        """Connect as the settings say: address, CA, key (or a join token), mutual TLS."""
        return cls.connect(**{**settings_options(settings), **kwargs})

    async def _writer(self) -> None:
        try:
            async for first in self._out_recv:
                chunks = [first]
                while True:
                    try:
                        chunks.append(self._out_recv.receive_nowait())
                    except (trio.WouldBlock, trio.EndOfChannel):
                        break
                await self._stream.send_all(b"".join(chunks))
        except (trio.BrokenResourceError, trio.ClosedResourceError, ssl.SSLError, OSError):
            self._fail(api.connection_lost(self.address))

    async def _reader(self) -> None:
        core = self._core
        try:
            while True:
                core.receive_data(bytes(await self._stream.receive_some(RECEIVE_SIZE)))
                while (item := core.next_received()) is not None:
                    if isinstance(item, EventReceived):
                        sink = self._events.get(item.message["id"])
                        if sink is not None:
                            sink.offer(item.message)
                    elif isinstance(item, Answer):
                        channel = self._pending.pop(item.rid, None)
                        if channel is not None:
                            channel.send_nowait(item)
                    elif isinstance(item, Farewell):  # the broker ends the session
                        self._fail(item.error)
        except (TQError, ssl.SSLError, trio.BrokenResourceError) as exc:
            self._fail(core.io_error(exc))
        except (trio.ClosedResourceError, OSError):
            self._fail(api.connection_lost(self.address))

    def _fail(self, exc: TQError) -> None:
        """The connection is unusable: fail every waiting request with ``exc``."""
        self._core.fail(exc)
        for channel in self._pending.values():
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
        """Send one request and wait for its answer (NACKs raise)."""
        return await self._exchange(*self._core.send(message))

    def _start(self, message: Mapping[str, Any]) -> tuple[int, bytes]:
        """The id and frame of a request (rules checked); ``_exchange`` sends it."""
        return self._core.send(message)

    async def _exchange(self, rid: int, frame: bytes) -> dict[str, Any]:
        send, recv = trio.open_memory_channel[Answer](1)
        self._pending[rid] = send
        try:
            await self._out_send.send(frame)
            try:
                answer = await recv.receive()
            except trio.EndOfChannel:
                raise self.error or api.connection_lost(self.address) from None
        finally:
            self._pending.pop(rid, None)
        return self._core.result(answer)

    async def _call(self, call: api.Call[T]) -> T:
        return call.parse(await self.request(call.message))

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
    for host, port, one in connect_targets(address):
        try:
            with trio.fail_after(timeout):
                return await trio.open_tcp_stream(host, port), host, one
        except trio.TooSlowError:
            error = ConnectionFailed(f"connecting to the broker at {one} timed out")
        except OSError as exc:
            error = api.connect_failed(one, exc)
    assert error is not None  # connect_targets never returns an empty list
    raise error
