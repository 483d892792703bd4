"""The client API, written once: every method builds a ``Call`` (``_api.py``) and
hands it to the shell's ``_call``, which sends it and parses the answer.

``AsyncMethods`` serves the async shells (``Client`` on trio, ``AsyncioClient``);
``_methods_sync.py`` is generated from this file for ``BlockingClient`` by
``scripts/unasync.py`` (``async def`` -> ``def``, ``await`` dropped), as
httpcore does; tests/test_client_core.py fails when it is stale. Edit this
file, then run ``python scripts/unasync.py``.

A shell provides ``_call`` and ``_clock`` (monotonic seconds of its event loop,
so trio's fake clock drives ``wait``); subscriptions are the shells' own.
"""

from __future__ import annotations

import builtins
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

from tq.client import _api as api
from tq.core.task import Task

T = TypeVar("T")


class AsyncMethods:
    async def _call(self, call: api.Call[T]) -> T:
        raise NotImplementedError

    def _clock(self) -> float:
        raise NotImplementedError

    async def submit(self, type: str, payload: Any = None, **options: Any) -> str:
        """Submit one task; its id (``options``: queue, priority, max_retries, timeout,
        idempotency_key, retry_base, retry_cap, trace, depends_on, on_dependency_failure,
        delay (seconds), run_at (epoch seconds): a delayed task waits as scheduled,
        unique_for, unique_key). A duplicate (idempotency_key, unique_for) answers the
        existing task's id: ``submit_items`` says which ones were (``created``)."""
        ids = await self.submit_many([api.task_spec(type, payload, **options)])
        return ids[0]

    async def submit_many(self, specs: Sequence[Mapping[str, Any]]) -> builtins.list[str]:
        """Submit ``specs`` in one request: all or nothing, one transaction; their ids.

        Keep a request to about 250 tasks and send several (an async client
        pipelines them from concurrent tasks): a larger one holds the broker's
        writer longer and every other client's write waits for it
        (docs/PROTOCOL.md, "Size").
        """
        return await self._call(api.submit_many(specs))

    async def submit_items(
        self, specs: Sequence[Mapping[str, Any]]
    ) -> builtins.list[dict[str, Any]]:
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

    async def history(self, task_id: str) -> list[dict[str, Any]]:
        """Every transition of the task, oldest first: maps with ``n``, ``at``,
        ``event``, ``state``, ``actor``, ``worker``, ``token``, ``error``, ``run_at``,
        ``priority`` (docs/PROTOCOL.md, query "history")."""
        return await self._call(api.history(task_id))

    async def explain(self, task_id: str) -> dict[str, Any]:
        """Why the task is not running now: ``{"task", "state", "reasons": [...]}``."""
        return await self._call(api.explain(task_id))

    async def wait(self, task_id: str, timeout: float | None = None) -> Task:
        """Until the task is finished (succeeded, dead or cancelled); Timeout after
        ``timeout`` seconds (None: no limit). The broker waits in steps of at most
        a minute, so a long wait is a few requests."""
        deadline = None if timeout is None else self._clock() + timeout
        while True:
            remaining = None if deadline is None else deadline - self._clock()
            task, timed_out = await self._call(api.wait_step(task_id, remaining))
            if not timed_out:
                return task
            if deadline is not None and self._clock() >= deadline:
                raise api.wait_timed_out(task, timeout)

    async def list(self, **filters: Any) -> api.TaskPage:
        """One page of tasks (``filters``: state, type, queue, limit, after, newest_first)."""
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

    async def set_cap(
        self,
        kind: str,
        name: str,
        *,
        concurrency: int | None = None,
        rate: float | str | None = None,
        burst: float | None = None,
    ) -> dict[str, Any]:
        """Cap a queue or task type (``kind`` "queue" or "type"), admin only: at most
        ``concurrency`` running at once, at most ``rate`` started per second (a number,
        or text like "5/s", "30/m"), in bursts of ``burst``. Replaces both limits."""
        return await self._call(api.set_cap(kind, name, concurrency, rate, burst))

    async def remove_cap(self, kind: str, name: str) -> bool:
        """Lift a queue's or type's cap; False if it had none."""
        return await self._call(api.remove_cap(kind, name))

    async def list_caps(self) -> builtins.list[dict[str, Any]]:
        """Every cap, with ``running`` (tasks running under it now)."""
        return await self._call(api.list_caps())

    async def cluster_status(self) -> dict[str, Any]:
        return await self._call(api.cluster_status())

    async def purge(
        self, states: Sequence[str], older_than: float, **options: Any
    ) -> dict[str, Any]:
        return await self._call(api.purge(states, older_than, **options))

    async def retry_many(self, state: str, **options: Any) -> dict[str, Any]:
        return await self._call(api.retry_many(state, **options))
