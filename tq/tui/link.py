"""The console's connection to the broker: one ``AsyncioClient`` on Textual's loop.

Textual runs on asyncio, so the console talks through tq's asyncio client,
with no threads. One connection does both jobs (the broker keeps answering
requests on a subscribed connection, and never counts it idle):

* it **subscribes** (tasks, workers, counts); ``BrokerLink.run``, a Textual
  worker (a task on the app's loop), hands every event to the UI;
* it serves **queries and actions** (``BrokerLink.call``), pipelined.

``run`` connects, takes a snapshot (hello ACK, stats, workers, the newest
failed and dead tasks), reports ``on_up``, forwards events until the
connection fails, reports ``on_down`` with the delay before the next attempt
(``tq.core.retry``'s exponential backoff with jitter from ``backoff_min``,
never above ``backoff_max``; the formula tasks and workers use too) and tries
again, until ``stop()``. ``stop()`` and ``reconnect()`` close the client at
once, which ends the subscription and every request in flight.

The UI never waits on the network: callbacks run on the UI's loop between
awaits, and requests run in Textual workers.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from tq.client import AsyncioClient, Event
from tq.core.errors import ConnectionFailed, NotFound, TQError
from tq.core.retry import RetryPolicy
from tq.core.task import Task
from tq.tui.model import Pending

T = TypeVar("T")
TOPICS = ("tasks", "workers", "counts", "progress")
PAGE_SIZE = 100
FAILED_SEED = 50  # failed (awaiting a retry) and dead tasks read at each (re)connection
OLDEST_QUEUES = 50  # queues whose oldest pending task is read per refresh
EXPLAIN_SCAN = 500  # at most, tasks per state read in one request to find failures' errors
EXPLAIN_GETS = 25  # failures read one by one per round (those the scan did not find)
SCAN_PAGE = 1000  # tasks read per request while searching
SEARCH_BUDGET = 10_000  # tasks scanned per search page before giving up
_UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")

Connect = Callable[[], Awaitable[AsyncioClient]]


@dataclass(frozen=True)
class Snapshot:
    server: dict[str, Any]
    stats: dict[str, Any]
    workers: list[dict[str, Any]]
    failed: list[Task] = field(default_factory=list)  # newest failed and dead tasks


class BrokerLink:
    def __init__(
        self, connect: Connect, *, backoff_min: float = 0.25, backoff_max: float = 5.0
    ) -> None:
        self._connect = connect
        self.backoff = RetryPolicy(base=backoff_min, cap=backoff_max)
        self._client: AsyncioClient | None = None
        self._stopped = False
        self._wake = asyncio.Event()

    # -- the events task -----------------------------------------------
    async def run(
        self,
        on_up: Callable[[Snapshot], None],
        on_event: Callable[[Event], None],
        on_down: Callable[[str, float, int], None],
    ) -> None:
        """Connect, subscribe and forward events; reconnect with backoff; until stop()."""
        attempt = 0
        while not self._stopped:
            reason = "connection lost"
            try:
                client = await self._connect()
                if self._stopped:
                    await client.aclose()
                    return
                self._client = client
                async with client.subscribe(TOPICS) as events:
                    snapshot = await _snapshot(client)
                    attempt = 0
                    on_up(snapshot)
                    async for event in events:
                        if self._stopped:
                            return
                        on_event(event)
            except TQError as exc:
                reason = exc.message or type(exc).__name__
            except OSError as exc:  # pragma: no cover - the client translates these
                reason = str(exc)
            finally:
                await self._drop()
            if self._stopped:
                return
            attempt += 1
            delay = self.backoff.delay(attempt)
            on_down(reason, delay, attempt)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), delay)
            self._wake.clear()

    async def _drop(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    # -- requests (from Textual workers) ----------------------------------
    @property
    def connected(self) -> bool:
        return self._client is not None

    async def call(self, fn: Callable[[AsyncioClient], Awaitable[T]]) -> T:
        """``await fn(client)``; ConnectionFailed while disconnected."""
        client = self._client
        if client is None:
            raise ConnectionFailed("not connected to the broker (reconnecting)")
        return await fn(client)

    # -- control (from the UI) ---------------------------------------------
    def reconnect(self) -> None:
        """Drop the connection now and try again at once."""
        self._close()
        self._wake.set()

    def stop(self) -> None:
        self._stopped = True
        self._wake.set()
        self._close()

    def _close(self) -> None:
        """Close the client without waiting: the subscription and requests end now."""
        client, self._client = self._client, None
        if client is not None:
            client.close()


async def _snapshot(client: AsyncioClient) -> Snapshot:
    failed = [
        task
        for state in ("failed", "dead")
        for task in (await client.list(state=state, limit=FAILED_SEED, newest_first=True)).tasks
    ]
    return Snapshot(dict(client.server), await client.stats(), await client.workers(), failed)


# -- reads for the dashboard --------------------------------------------------------


async def read_oldest(client: AsyncioClient, queues: list[str]) -> dict[str, Pending | None]:
    """Each queue's oldest pending task (one ``list`` of limit 1 per queue, pipelined)."""
    chosen = queues[:OLDEST_QUEUES]
    pages = await asyncio.gather(
        *(client.list(queue=queue, state="pending", limit=1) for queue in chosen)
    )
    out: dict[str, Pending | None] = {}
    for queue, page in zip(chosen, pages, strict=True):
        tasks = page.tasks
        out[queue] = Pending(tasks[0].id, tasks[0].type, tasks[0].created_at) if tasks else None
    return out


async def read_failures(client: AsyncioClient, ids: list[str]) -> dict[str, Task | None]:
    """The tasks behind failures shown without their error, in a few requests.

    One ``list`` per state (dead, then failed; newest first; about twice as
    many tasks as ids, so the cost follows the need, not the store) finds the
    recent ones; those it misses are read one by one, at most EXPLAIN_GETS
    (the caller asks again for the rest). A task that is gone maps to None.
    """
    wanted = set(ids)
    found: dict[str, Task | None] = {}
    for state in ("dead", "failed"):
        if not wanted - found.keys():
            break
        limit = min(EXPLAIN_SCAN, 2 * len(ids) + 10)  # the cost follows the need
        page = await client.list(state=state, limit=limit, newest_first=True)
        found.update((t.id, t) for t in page.tasks if t.id in wanted)
    for task_id in [i for i in ids if i not in found][:EXPLAIN_GETS]:
        try:
            found[task_id] = await client.get(task_id)
        except NotFound:
            found[task_id] = None
    return found


# -- task pages ----------------------------------------------------------------------


@dataclass(frozen=True)
class TaskFilter:
    state: str | None = None
    queue: str | None = None
    type: str | None = None
    search: str = ""  # substring of the id or type (scanned here: the broker has no search)

    def matches(self, task: Task) -> bool:
        text = self.search.strip().lower()
        return not text or text in task.id or text in task.type.lower()


@dataclass(frozen=True)
class Page:
    tasks: list[Task]
    after: str | None  # the cursor this page was read from
    next: str | None  # the cursor of the following page, None at the end
    scanned: int = 0  # tasks read to find these (search only)
    exhausted_budget: bool = False
    notes: list[str] = field(default_factory=list)


async def fetch_page(
    client: AsyncioClient, flt: TaskFilter, after: str | None, size: int = PAGE_SIZE
) -> Page:
    """One page of tasks, newest submitted first, past the cursor ``after``.

    Filters on state, queue and type are the broker's. A search text is not:
    pages are read and matched here, up to SEARCH_BUDGET tasks per page, so a
    search never loads a whole large set. A full task id is looked up directly.
    """
    filters = {"state": flt.state, "queue": flt.queue, "type": flt.type}
    text = flt.search.strip().lower()
    if not text:
        page = await client.list(**filters, limit=size, after=after, newest_first=True)
        return Page(page.tasks, after, page.next)
    if _UUID.match(text) and after is None:
        try:
            task = await client.get(text)
        except TQError:
            return Page([], None, None)
        wanted = all(v is None or getattr(task, k) == v for k, v in filters.items())
        return Page([task] if wanted else [], None, None)
    found: list[Task] = []
    scanned = 0
    cursor = after
    while scanned < SEARCH_BUDGET:
        page = await client.list(**filters, limit=SCAN_PAGE, after=cursor, newest_first=True)
        scanned += len(page.tasks)
        for task in page.tasks:
            if flt.matches(task):
                found.append(task)
                if len(found) == size:
                    return Page(found, after, task.id, scanned)
        if page.next is None:
            return Page(found, after, None, scanned)
        cursor = page.next
    return Page(found, after, cursor, scanned, exhausted_budget=True)
