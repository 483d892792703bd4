"""Shared limits on expensive work: one computation at a time shared by every caller
(``Coalesced``), and a budget of bytes taken and given back (``ByteBudget``).

Contract: ``Coalesced(fn).get()`` awaits ``fn()``; a caller that arrives while
a call is running waits for that call's answer instead of starting another.
So a flood of identical expensive reads (2,000 pipelined ``stats``) costs
about one computation per round, and answers are never older than the moment
the caller asked. A cancelled first caller does not strand the others: they
start a fresh call. Imports only trio.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

import trio

T = TypeVar("T")


class Coalesced(Generic[T]):
    def __init__(self, fn: Callable[[], Awaitable[T]]) -> None:
        self._fn = fn
        self._running: trio.Event | None = None
        self._generation = 0  # bumped when a call ends
        self._outcome: tuple[int, T | None, BaseException | None] = (0, None, None)

    async def get(self) -> T:
        while True:
            running = self._running
            if running is None:
                return await self._call()
            started = self._generation
            await running.wait()
            generation, value, error = self._outcome
            if generation == started + 1:  # the call this caller waited for
                if error is not None:
                    raise error
                return value  # type: ignore[return-value]
            # that call was cancelled before it answered: try again

    async def _call(self) -> T:
        done = self._running = trio.Event()
        generation = self._generation + 1
        try:
            value = await self._fn()
        except trio.Cancelled:
            self._outcome = (-1, None, None)
            raise
        except Exception as exc:
            self._outcome = (generation, None, exc)
            raise
        else:
            self._outcome = (generation, value, None)
            return value
        finally:
            self._generation = generation
            self._running = None
            done.set()


class ByteBudget:
    """At most ``total`` bytes taken at once; ``take`` waits for room. A single take
    larger than the total is cut to the total, so it proceeds when nothing else holds."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.used = 0
        self._freed = trio.Event()

    async def take(self, n: int) -> int:
        n = min(n, self.total)
        while self.used + n > self.total:
            await self._freed.wait()
        self.used += n
        return n

    def give(self, n: int) -> None:
        if n:
            self.used -= n
            self._freed.set()
            self._freed = trio.Event()
