"""Event subscriptions for the clients (docs/PROTOCOL.md: ``subscribe``, ``event``).

    async with client.subscribe(["tasks", "counts"]) as events:   # Client, AsyncioClient
        async for event in events:
            print(event.topic, event.data)

    with blocking.subscribe(["tasks"]) as events:                  # BlockingClient
        for event in events:
            ...

A connection has at most one subscription at a time. The trio client keeps
making requests on the same connection while subscribed: events go to a
bounded buffer that never blocks the connection's reader; if the consumer
falls behind, events are dropped for it and a ``lagged`` event (``data``:
``dropped``, ``local: True``) takes their place, exactly like the broker's own
marker: on ``lagged``, re-read what you display. A blocking client in
subscription mode can only read events (its one socket is busy); use a
second client for requests. Leaving the ``with`` block unsubscribes, after
which the client can make requests again. (``BlockingSubscription`` lives in
sync.py and ``AsyncioSubscription``, which behaves as the trio one, in
asyncio_client.py, so that neither of those clients imports trio.)
"""

from __future__ import annotations

from collections.abc import Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any

import trio

from tq.client import _api as api
from tq.core.errors import TQError

if TYPE_CHECKING:
    from tq.client.aio import Client
    from tq.client.core import ClientCore

DEFAULT_BUFFER = 1024  # events buffered by the trio client before it drops (and says lagged)
UNSUBSCRIBE_TIMEOUT = 5.0  # seconds to wait for the unsubscribe ACK


class EventSink:
    """The trio client's end of a subscription: never blocks the connection's reader."""

    def __init__(self, send: trio.MemorySendChannel[dict[str, Any]]) -> None:
        self.send = send
        self.dropped = 0

    def offer(self, msg: dict[str, Any]) -> None:
        if self.dropped:
            if not self._put(api.lagged_marker(msg, self.dropped)):
                self.dropped += 1
                return
            self.dropped = 0
        if not self._put(msg):
            self.dropped += 1

    def _put(self, msg: dict[str, Any]) -> bool:
        try:
            self.send.send_nowait(msg)
        except trio.WouldBlock:
            return False
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # nobody reads any more: nothing to tell
        return True


class Subscription:
    """A trio client's subscription: an async context manager and async iterator."""

    def __init__(self, client: Client, topics: Sequence[str], buffer: int) -> None:
        self._client = client
        self.topics = list(topics)
        self._buffer = buffer
        self._rid: int | None = None
        self._recv: trio.MemoryReceiveChannel[dict[str, Any]] | None = None
        self._core: ClientCore | None = None
        self._closed = False

    async def __aenter__(self) -> Subscription:
        await self.start()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> api.Event:
        if self._recv is None:
            await self.start()
        assert self._recv is not None
        try:
            msg = await self._recv.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            if self._closed:
                raise StopAsyncIteration from None
            raise self._client.error or api.connection_lost(self._client.address) from None
        return api.parse_event(msg)

    async def start(self) -> None:
        """Send ``subscribe`` and wait for its ACK (done by ``async with`` or iteration)."""
        if self._recv is not None:
            return
        if self._closed:
            raise TQError("this subscription is closed; subscribe again")
        call = api.subscribe(self.topics)
        rid, frame = self._client._start(call.message)  # refused here if already subscribed
        self._rid, self._recv = rid, self._client._open_events(rid, self._buffer)
        self._core = self._client._core  # the connection it lives on
        try:
            self.topics = call.parse(await self._client._exchange_once(rid, frame))
        except BaseException:
            if self._client._core is self._core:  # (a new connection reuses ids)
                self._client._close_events(rid)
            raise

    async def aclose(self) -> None:
        """Unsubscribe; the connection stays usable for requests."""
        if self._closed:
            return
        self._closed = True
        if self._rid is None or self._client._core is not self._core:
            return  # never started, or its connection is gone (failover): so is it
        self._client._close_events(self._rid)
        if self._client.error is None:
            try:
                with trio.move_on_after(UNSUBSCRIBE_TIMEOUT):
                    await self._client._exchange_once(
                        *self._client._start(api.unsubscribe().message)
                    )
            except TQError:
                pass  # the connection is gone: so is the subscription
