"""The console's connection to the broker: two blocking clients used from threads.

Textual runs on asyncio and tq's trio client cannot share its loop, so the
console talks through ``BlockingClient``s from Textual thread workers:

* the **events** client subscribes (tasks, workers, counts) and is read by one
  long-lived thread (``BrokerLink.run``), which hands every event to the UI;
* the **requests** client serves queries and actions (``BrokerLink.call``),
  from short-lived threads; its lock makes one request at a time.

``run`` connects both, takes a snapshot (hello ACK, stats, workers, the
newest failed and dead tasks), reports
``on_up``, forwards events until the connection fails, reports ``on_down``
with the delay before the next attempt (``tq.core.retry``'s exponential
backoff with jitter from ``backoff_min``, never above ``backoff_max``; the
formula tasks and workers use too) and tries again, until ``stop()``.
``stop()`` and ``reconnect()`` close the clients from the UI thread, which
wakes the blocked reader at once.

The UI never waits on the network: it only starts threads and receives their
results through the callbacks (``App.call_from_thread``).
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from tq.client import BlockingClient, Event
from tq.core.errors import ConnectionFailed, NotFound, TQError
from tq.core.retry import RetryPolicy
from tq.core.task import Task
from tq.tui.model import Pending

T = TypeVar("T")
TOPICS = ("tasks", "workers", "counts")
PAGE_SIZE = 100
FAILED_SEED = 50  # failed (awaiting a retry) and dead tasks read at each (re)connection
OLDEST_QUEUES = 50  # queues whose oldest pending task is read per refresh
EXPLAIN_SCAN = 500  # at most, tasks per state read in one request to find failures' errors
EXPLAIN_GETS = 25  # failures read one by one per round (those the scan did not find)
SCAN_PAGE = 1000  # tasks read per request while searching
SEARCH_BUDGET = 10_000  # tasks scanned per search page before giving up
_UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")

Connect = Callable[[], BlockingClient]


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
        self._lock = threading.Lock()
        self._requests: BlockingClient | None = None
        self._events: BlockingClient | None = None
        self._stop = threading.Event()
        self._wake = threading.Event()

    # -- the events thread ---------------------------------------------
    def run(
        self,
        on_up: Callable[[Snapshot], None],
        on_event: Callable[[Event], None],
        on_down: Callable[[str, float, int], None],
    ) -> None:
        """Connect, subscribe and forward events; reconnect with backoff; until stop()."""
        attempt = 0
        while not self._stop.is_set():
            reason = "connection lost"
            try:
                snapshot, events = self._open()
                attempt = 0
                on_up(snapshot)
                for event in events:
                    if self._stop.is_set():
                        return
                    on_event(event)
            except TQError as exc:
                reason = exc.message or type(exc).__name__
            except OSError as exc:  # pragma: no cover - the clients translate these
                reason = str(exc)
            finally:
                self._drop()
            if self._stop.is_set():
                return
            attempt += 1
            delay = self.backoff.delay(attempt)
            on_down(reason, delay, attempt)
            self._wake.wait(delay)
            self._wake.clear()

    def _open(self) -> tuple[Snapshot, Any]:
        events = self._connect()
        with self._lock:
            self._events = events
        if self._stop.is_set():
            raise ConnectionFailed("stopping")
        requests = self._connect()
        with self._lock:
            self._requests = requests
        failed = [
            task
            for state in ("failed", "dead")
            for task in requests.list(state=state, limit=FAILED_SEED, newest_first=True).tasks
        ]
        snapshot = Snapshot(dict(requests.server), requests.stats(), requests.workers(), failed)
        return snapshot, events.subscribe(TOPICS)

    def _drop(self) -> None:
        with self._lock:
            clients = [self._events, self._requests]
            self._events = self._requests = None
        for client in clients:
            if client is not None:
                client.close()

    # -- requests (from worker threads) ----------------------------------
    @property
    def connected(self) -> bool:
        return self._requests is not None

    def call(self, fn: Callable[[BlockingClient], T]) -> T:
        """Run ``fn`` with the requests client; ConnectionFailed while disconnected.

        If the requests connection alone was closed (e.g. the broker dropped
        it as idle), it is opened again once and ``fn`` retried.
        """
        with self._lock:
            client = self._requests
        if client is None:
            raise ConnectionFailed("not connected to the broker (reconnecting)")
        try:
            return fn(client)
        except ConnectionFailed:
            if self._stop.is_set() or self._events is None:
                raise
        fresh = self._connect()
        with self._lock:
            if self._requests is client:
                self._requests = fresh
            else:  # someone else replaced it meanwhile
                fresh.close()
                fresh = self._requests or fresh
        client.close()
        return fn(fresh)

    # -- control (from the UI thread) ------------------------------------
    def reconnect(self) -> None:
        """Drop the connections now and try again at once."""
        self._drop()
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._drop()


# -- reads for the dashboard --------------------------------------------------------


def read_oldest(client: BlockingClient, queues: list[str]) -> dict[str, Pending | None]:
    """Each queue's oldest pending task (one ``list`` of limit 1 per queue)."""
    out: dict[str, Pending | None] = {}
    for queue in queues[:OLDEST_QUEUES]:
        tasks = client.list(queue=queue, state="pending", limit=1).tasks
        out[queue] = Pending(tasks[0].id, tasks[0].type, tasks[0].created_at) if tasks else None
    return out


def read_failures(client: BlockingClient, ids: list[str]) -> dict[str, Task | None]:
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
        page = client.list(state=state, limit=limit, newest_first=True)
        found.update((t.id, t) for t in page.tasks if t.id in wanted)
    for task_id in [i for i in ids if i not in found][:EXPLAIN_GETS]:
        try:
            found[task_id] = client.get(task_id)
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


def fetch_page(
    client: BlockingClient, flt: TaskFilter, after: str | None, size: int = PAGE_SIZE
) -> Page:
    """One page of tasks, newest submitted first, past the cursor ``after``.

    Filters on state, queue and type are the broker's. A search text is not:
    pages are read and matched here, up to SEARCH_BUDGET tasks per page, so a
    search never loads a whole large set. A full task id is looked up directly.
    """
    filters = {"state": flt.state, "queue": flt.queue, "type": flt.type}
    text = flt.search.strip().lower()
    if not text:
        page = client.list(**filters, limit=size, after=after, newest_first=True)
        return Page(page.tasks, after, page.next)
    if _UUID.match(text) and after is None:
        try:
            task = client.get(text)
        except TQError:
            return Page([], None, None)
        wanted = all(v is None or getattr(task, k) == v for k, v in filters.items())
        return Page([task] if wanted else [], None, None)
    found: list[Task] = []
    scanned = 0
    cursor = after
    while scanned < SEARCH_BUDGET:
        page = client.list(**filters, limit=SCAN_PAGE, after=cursor, newest_first=True)
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
