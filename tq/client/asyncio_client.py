"""The asyncio client: the trio ``Client``'s API on asyncio streams (FastAPI,
Starlette, Django async, aiohttp, Textual), no threads.

    async with AsyncioClient.connect("127.0.0.1:7470", ca=path, key=key) as client:
        task_id = await client.submit("echo", {"x": 1})
        task = await client.wait(task_id, timeout=30)

    client = await AsyncioClient.open(...)    # or open and close it yourself,
    ...                                       # e.g. in an application's lifespan
    await client.aclose()

A thin shell over the client core (core.py: session rules, ids, answers
matched to requests, the broker's farewell) with the methods of
``_methods.py``, exactly as the trio client. One connection carries any
number of concurrent requests: a reader task hands each answer to the
coroutine awaiting its id; a request cancelled meanwhile just drops its
answer. Subscriptions (``subscribe``) buffer events without ever blocking
the reader, with the trio client's ``lagged`` marker when the consumer
falls behind (tq/client/events.py).

Imports asyncio and ssl only: an asyncio application does not load trio.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections import deque
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import msgspec

from tq.client import _api as api
from tq.client._methods import AsyncMethods
from tq.client.core import RECEIVE_SIZE, ClientCore, connect_targets
from tq.client.options import ca_name, settings_options, tls_context, with_key
from tq.config import ConnectionSettings
from tq.core.errors import ConnectionFailed, TLSFailure, TQError
from tq.core.limits import MAX_FRAME
from tq.protocol.session import Answer, EventReceived, Farewell
from tq.security.tls import describe_tls_error

T = TypeVar("T")
S = TypeVar("S", bound=msgspec.Struct)
CONNECT_TIMEOUT = 10.0
DEFAULT_BUFFER = 1024  # events buffered before dropping (and saying lagged), as the trio client
UNSUBSCRIBE_TIMEOUT = 5.0
CLOSE_TIMEOUT = 1.0  # seconds to wait for the TLS close to finish


class AsyncioClient(AsyncMethods):
    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, core: ClientCore
    ) -> None:
        self.address = core.address
        self._reader = reader
        self._writer = writer
        self._core = core
        self._pending: dict[int, asyncio.Future[Answer | None]] = {}
        self._events: dict[int, AsyncioSubscription] = {}
        self._drain = asyncio.Lock()  # one drain() at a time (writes themselves never wait)
        self._task: asyncio.Task[None] | None = None

    @property
    def server(self) -> dict[str, Any]:
        """The broker's hello ACK."""
        return self._core.server

    @property
    def error(self) -> TQError | None:
        """Why the connection is unusable, or None while it is fine."""
        return self._core.error

    # -- connection ----------------------------------------------------
    @classmethod
    async def open(
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
    ) -> AsyncioClient:
        """Connect (``address`` may list brokers, comma-separated) and say hello; the
        arguments are ``Client.connect``'s. Close the client with ``aclose()``."""
        context = tls_context(
            address,
            ca=ca,
            insecure=insecure,
            ca_data=ca_data,
            client_cert=client_cert,
            client_key=client_key,
        )
        reader, writer = await open_connection(address, context, ca_name(ca, ca_data), timeout)
        message = api.hello(kind, name, with_key(dict(hello or {}), key))
        client = cls(reader, writer, ClientCore(address, max_frame, message))
        client._task = asyncio.get_running_loop().create_task(client._read())
        try:
            try:
                await asyncio.wait_for(client._exchange(*client._core.hello_frame()), timeout)
            except TimeoutError:
                raise ConnectionFailed(
                    f"the broker at {address} did not answer hello within {timeout:g}s"
                ) from None
        except BaseException:
            await client.aclose()
            raise
        return client

    @classmethod
    @contextlib.asynccontextmanager
    async def connect(cls, address: str, **options: Any) -> AsyncIterator[AsyncioClient]:
        """``async with AsyncioClient.connect(address, ...) as client:`` (``open``'s
        arguments); the connection closes with the block."""
        client = await cls.open(address, **options)
        try:
            yield client
        finally:
            await client.aclose()

    @classmethod
    def from_settings(cls, settings: ConnectionSettings, **kwargs: Any) -> Any:
        """Connect as the settings say (a context manager, like ``connect``)."""
        return cls.connect(**{**settings_options(settings), **kwargs})

    @classmethod
    async def open_from_settings(cls, settings: ConnectionSettings, **kwargs: Any) -> AsyncioClient:
        return await cls.open(**{**settings_options(settings), **kwargs})

    def close(self) -> None:
        """Close now, without waiting (e.g. from a UI callback): the socket is dropped
        without a TLS goodbye; waiting requests and subscriptions end with an error."""
        self._shutdown()
        self._writer.transport.abort()

    async def aclose(self) -> None:
        """Close the connection (with a TLS goodbye, for at most a second); waiting
        requests and subscriptions end with an error."""
        task = self._task
        self._shutdown()
        if task is not None:
            await asyncio.wait([task], timeout=CLOSE_TIMEOUT)  # never raises its error
        self._writer.close()
        try:
            await asyncio.wait_for(self._writer.wait_closed(), CLOSE_TIMEOUT)
        except Exception:  # a peer that is gone cannot say goodbye
            self._writer.transport.abort()

    def _shutdown(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
        self._fail(ConnectionFailed(f"the connection to {self.address} was closed"))

    async def __aenter__(self) -> AsyncioClient:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def _read(self) -> None:
        core = self._core
        try:
            while True:
                core.receive_data(await self._reader.read(RECEIVE_SIZE))
                while (item := core.next_received()) is not None:
                    if isinstance(item, Answer):
                        future = self._pending.pop(item.rid, None)
                        if future is not None and not future.done():
                            future.set_result(item)
                    elif isinstance(item, EventReceived):
                        subscription = self._events.get(item.message["id"])
                        if subscription is not None:
                            subscription._offer(item.message)
                    elif isinstance(item, Farewell):  # the broker ends the session
                        self._fail(item.error)
        except (TQError, OSError) as exc:  # ssl.SSLError is an OSError
            self._fail(core.io_error(exc))
        except Exception as exc:  # never leave the waiting requests hanging
            self._fail(
                ConnectionFailed(f"reading from the broker at {self.address} failed: {exc!r}")
            )
            raise

    def _fail(self, exc: TQError) -> None:
        """The connection is unusable: every waiting request and subscription ends."""
        self._core.fail(exc)
        for future in self._pending.values():
            if not future.done():
                future.set_result(None)
        self._pending.clear()
        for subscription in self._events.values():
            subscription._end()
        self._events.clear()

    # -- requests ------------------------------------------------------
    async def request(self, message: Mapping[str, Any]) -> dict[str, Any]:
        """Send one request and wait for its answer (NACKs raise)."""
        return api.reply_map(await self._exchange(*self._core.send(message)))

    async def request_answer(self, message: Mapping[str, Any], kind: type[S]) -> S:
        """``request``, its ACK decoded straight into its declared answer ``kind``
        (tq/protocol/answers.py); BadAnswer naming the field if it does not fit."""
        return api.read_reply(await self._exchange(*self._core.send(message)), kind)

    async def _exchange(self, rid: int, frame: bytes) -> api.Reply:
        future: asyncio.Future[Answer | None] = asyncio.get_running_loop().create_future()
        self._pending[rid] = future
        try:
            try:
                self._writer.write(frame)
                async with self._drain:
                    await self._writer.drain()
            except OSError as exc:
                self._fail(self._core.io_error(exc))
            answer = await future
        finally:
            self._pending.pop(rid, None)
        if answer is None:
            raise self.error or api.connection_lost(self.address)
        return self._core.result(answer)

    async def _call(self, call: api.Call[T]) -> T:
        return call.parse(await self._exchange(*self._core.send(call.message)))

    def _clock(self) -> float:
        return asyncio.get_running_loop().time()

    def subscribe(
        self, topics: Sequence[str] = api.TOPICS, *, buffer: int = DEFAULT_BUFFER
    ) -> AsyncioSubscription:
        """Live events: ``async with client.subscribe(["tasks"]) as events: async for ...``;
        the client stays usable for requests meanwhile (see tq/client/events.py)."""
        return AsyncioSubscription(self, topics, buffer)


class AsyncioSubscription:
    """An asyncio client's subscription: an async context manager and async iterator."""

    def __init__(self, client: AsyncioClient, topics: Sequence[str], buffer: int) -> None:
        self._client = client
        self.topics = list(topics)
        self._buffer = max(1, buffer)
        self._queue: deque[dict[str, Any]] = deque()
        self._wake = asyncio.Event()
        self._dropped = 0
        self._rid: int | None = None
        self._ended = False  # no more events will come (closed, or the connection failed)
        self._closed = False

    async def __aenter__(self) -> AsyncioSubscription:
        await self.start()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    def __aiter__(self) -> AsyncioSubscription:
        return self

    async def __anext__(self) -> api.Event:
        if self._rid is None:
            await self.start()
        while not self._queue:
            if self._ended:
                if self._closed:
                    raise StopAsyncIteration
                raise self._client.error or api.connection_lost(self._client.address)
            self._wake.clear()
            await self._wake.wait()
        return api.parse_event(self._queue.popleft())

    async def start(self) -> None:
        """Send ``subscribe`` and wait for its ACK (done by ``async with`` or iteration)."""
        if self._rid is not None:
            return
        if self._closed:
            raise TQError("this subscription is closed; subscribe again")
        call = api.subscribe(self.topics)
        rid, frame = self._client._core.send(call.message)  # refused if already subscribed
        self._rid = rid
        self._client._events[rid] = self
        try:
            self.topics = call.parse(await self._client._exchange(rid, frame))
        except BaseException:
            self._client._events.pop(rid, None)
            self._end()
            raise

    async def aclose(self) -> None:
        """Unsubscribe; the connection stays usable for requests."""
        if self._closed:
            return
        self._closed = True
        self._end()
        if self._rid is None or self._client._events.pop(self._rid, None) is None:
            return  # never started, or the connection is gone: so is the subscription
        with contextlib.suppress(TQError, TimeoutError):
            await asyncio.wait_for(
                self._client.request(api.unsubscribe().message), UNSUBSCRIBE_TIMEOUT
            )

    def _offer(self, msg: dict[str, Any]) -> None:
        """An event from the reader: queue it, never wait; drop it if the buffer is
        full, and queue a ``lagged`` marker where the gap is once there is room."""
        if self._dropped:
            if len(self._queue) >= self._buffer:
                self._dropped += 1
                return
            self._queue.append(api.lagged_marker(msg, self._dropped))
            self._dropped = 0
        if len(self._queue) >= self._buffer:
            self._dropped += 1
        else:
            self._queue.append(msg)
        self._wake.set()

    def _end(self) -> None:
        self._ended = True
        self._wake.set()


async def open_connection(
    address: str, context: ssl.SSLContext | None, ca: Path | str | None, timeout: float
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """TCP (+TLS unless ``context`` is None) to the first broker in ``address`` that
    accepts; errors are ones an operator can act on."""
    error: ConnectionFailed | None = None
    for host, port, one in connect_targets(address):
        try:
            return await asyncio.wait_for(
                asyncio.open_connection(
                    host,
                    port,
                    ssl=context,
                    server_hostname=host if context is not None else None,
                    ssl_handshake_timeout=timeout if context is not None else None,
                ),
                timeout,
            )
        except TimeoutError:
            error = ConnectionFailed(f"connecting to the broker at {one} timed out")
        except ssl.SSLError as exc:
            raise TLSFailure(describe_tls_error(exc, one, ca)) from None
        except OSError as exc:
            if context is not None and api.closed_in_handshake(exc):
                if await _refuses(host, port):
                    raise api.shutting_down(one) from None
                raise TLSFailure(describe_tls_error(exc, one, ca)) from None
            error = api.connect_failed(one, exc)
    assert error is not None  # connect_targets never returns an empty list
    raise error


async def _refuses(host: str, port: int) -> bool:
    """After a dropped handshake: does the broker now refuse connections (going away)?"""
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 2.0)
    except (OSError, TimeoutError):
        return True
    writer.close()
    with contextlib.suppress(Exception):
        await writer.wait_closed()
    return False
