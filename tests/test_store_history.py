"""Task history on both stores (the conformance fixtures of tests/test_store.py): every
transition kept in the transaction that makes it, with who and when, bounded per task,
and deleted with the task."""

# ruff: noqa: F811  (the store fixtures come from tests/test_store.py)
from __future__ import annotations

import contextlib
import functools
import time
from typing import Any

import pytest
import trio
import trio.testing

from tests.test_store import (  # noqa: F401  (fixtures)
    NOW,
    TTL,
    backend,
    claim_one,
    report,
    store,
    submit,
)
from tq.core.errors import NotFound
from tq.core.task import ListFilter, TaskError, TaskSpec
from tq.store.history_sql import MAX_HISTORY

pytestmark = pytest.mark.trio


async def events(store: Any, task_id: str) -> list[tuple[Any, ...]]:
    return [(h.n, h.at, h.event, h.state, h.actor) for h in await store.history(task_id)]


async def test_a_task_life_step_by_step(store: Any) -> None:
    [res] = await store.submit([TaskSpec(type="t", max_retries=1)], NOW, actor="key:k1")
    task_id = res.id
    lease = await claim_one(store, now=NOW + 1, worker="w1")
    error = TaskError("Boom", "it broke")
    [out] = await store.complete([report(lease, "retry", error=error)], NOW + 2)
    assert out.state == "failed"
    retry_at = (await store.get(task_id)).run_at
    await store.promote_due(retry_at + 1)
    await store.set_priority(task_id, 7, now=NOW + 50, actor="key:op")
    again = await claim_one(store, now=retry_at + 2, worker="w2")
    await store.complete([report(again, result=1)], retry_at + 3)
    rows = await store.history(task_id)
    assert [(h.n, h.event, h.state) for h in rows] == [
        (1, "submitted", "pending"),
        (2, "leased", "running"),
        (3, "failed", "failed"),
        (4, "promoted", "pending"),
        (5, "priority", "pending"),
        (6, "leased", "running"),
        (7, "succeeded", "succeeded"),
    ]
    submitted, leased, failed, promoted, priority, leased2, done = rows
    assert (submitted.at, submitted.actor, submitted.priority) == (NOW, "key:k1", 100)
    assert (leased.at, leased.worker, leased.token) == (NOW + 1, "w1", lease.token)
    assert leased.actor is None
    assert (failed.at, failed.error, failed.run_at, failed.token) == (
        NOW + 2,
        error,
        retry_at,
        lease.token,
    )
    assert promoted.at == retry_at + 1
    assert (priority.at, priority.actor, priority.priority) == (NOW + 50, "key:op", 7)
    assert (leased2.worker, leased2.token) == ("w2", again.token)
    assert (done.at, done.worker, done.error) == (retry_at + 3, "w2", None)


async def test_cancel_retry_release_and_lost_leases(store: Any) -> None:
    task_id = await submit(store, max_retries=3)
    lease = await claim_one(store, now=NOW + 1)
    await store.complete([report(lease, "release")], NOW + 2)  # given back unrun
    await claim_one(store, now=NOW + 3, worker="w9")
    await store.release_expired(NOW + 3 + TTL + 1)  # the lease ran out
    await claim_one(store, now=NOW + 40, worker="w9")
    await store.release_worker("w9", NOW + 41)  # its worker went away
    await store.cancel(task_id, NOW + 42, actor="key:c")
    await store.retry(task_id, NOW + 43, actor="key:r")
    rows = await store.history(task_id)
    assert [h.event for h in rows] == [
        "submitted",
        "leased",
        "released",
        "leased",
        "lease_lost",
        "leased",
        "lease_lost",
        "cancelled",
        "retried",
    ]
    assert rows[4].error is not None and rows[4].error.type == "LeaseExpired"
    assert rows[4].at == NOW + 3 + TTL + 1
    assert rows[6].error is not None and rows[6].error.type == "WorkerLost"
    assert (rows[7].actor, rows[7].at, rows[7].error) == ("key:c", NOW + 42, None)
    assert (rows[8].actor, rows[8].at, rows[8].state) == ("key:r", NOW + 43, "pending")


async def test_dependencies_name_the_cause(store: Any) -> None:
    [a, b, c] = await store.submit(
        [
            TaskSpec(type="a"),
            TaskSpec.from_mapping({"type": "b", "depends_on": ["#0"]}),
            TaskSpec.from_mapping({"type": "c", "depends_on": ["#1"]}),
        ],
        NOW,
        actor="key:s",
    )
    lease = await claim_one(store, now=NOW + 1)
    await store.complete([report(lease)], NOW + 2)
    rows = await store.history(b.id)
    assert [(h.event, h.state, h.actor) for h in rows] == [
        ("submitted", "pending", "key:s"),
        ("blocked", "blocked", "key:s"),
        ("unblocked", "pending", f"dependency:{a.id}"),
    ]
    assert rows[2].at == NOW + 2
    await store.cancel(b.id, NOW + 3, actor="key:x")
    rows = await store.history(c.id)
    assert [(h.event, h.actor) for h in rows][-1] == ("cancelled", f"dependency:{b.id}")
    assert rows[-1].error is not None and b.id in rows[-1].error.message


async def test_each_change_carries_its_own_operations_note(store: Any) -> None:
    """Whatever ran before (an operation that failed and was undone, a dependency's
    note set inside a report, an operation with the same time, one without a note),
    each row carries the time and actor of the operation that made it."""
    [a, b] = await store.submit(
        [TaskSpec(type="a"), TaskSpec.from_mapping({"type": "b", "depends_on": ["#0"]})],
        NOW,
        actor="key:s",
    )
    spare = await submit(store)
    waiting = await submit(store, type="w")
    lease = await claim_one(store, now=NOW + 1, types=["a"])
    await store.complete([report(lease)], NOW + 2)  # notes dependency:a for b's release
    b_lease = await claim_one(store, now=NOW + 2)  # the same time, no actor
    assert b_lease.id == b.id
    with pytest.raises(NotFound):  # fails after its note was set: undone with it
        await store.cancel("no-such-task", NOW + 5, actor="key:x")
    await store.cancel(spare, NOW + 5, actor="key:x")
    before = time.time()
    await store.set_priority(waiting, 3)  # no time, no actor: the database's clock
    after = time.time()
    assert [(h.event, h.at, h.actor) for h in await store.history(b.id)] == [
        ("submitted", NOW, "key:s"),
        ("blocked", NOW, "key:s"),
        ("unblocked", NOW + 2, f"dependency:{a.id}"),
        ("leased", NOW + 2, None),
    ]
    assert [(h.event, h.at, h.actor) for h in await store.history(spare)] == [
        ("submitted", NOW, None),
        ("cancelled", NOW + 5, "key:x"),
    ]
    *_, done = await store.history(a.id)
    assert (done.event, done.at, done.actor) == ("succeeded", NOW + 2, None)
    *_, changed = await store.history(waiting)
    assert (changed.event, changed.actor) == ("priority", None)
    assert before - 1 <= changed.at <= after + 1


async def test_sqlite_notes_of_operations_sharing_a_transaction(tmp_path: Any) -> None:
    """Writes queued together commit in one transaction, one after another: one
    that fails takes back its own note only, and the next carries its own."""
    from tq.store.sqlite import open_sqlite_store

    async with open_sqlite_store(tmp_path / "tq.db") as store:
        ids = [await submit(store) for _ in range(3)]

        async def cancel(task_id: str, at: float, actor: str) -> None:
            with contextlib.suppress(NotFound):
                await store.cancel(task_id, at, actor=actor)

        commits = store.commits
        await store._write_limiter.acquire()  # the writer cannot run a batch meanwhile
        async with trio.open_nursery() as nursery:
            for i, task_id in enumerate(ids):  # queued in this order
                nursery.start_soon(cancel, "no-such-task", NOW + 10 + i, f"key:x{i}")
                await trio.testing.wait_all_tasks_blocked()
                nursery.start_soon(cancel, task_id, NOW + 10 + i, f"key:x{i}")
                await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(
                functools.partial(store.submit, [TaskSpec(type="s")], NOW + 20, actor="key:s")
            )
            await trio.testing.wait_all_tasks_blocked()
            store._write_limiter.release()
        assert store.commits == commits + 1  # the first alone (rolled back), the rest together
        for i, task_id in enumerate(ids):
            *_, cancelled = await store.history(task_id)
            assert (cancelled.event, cancelled.at, cancelled.actor) == (
                "cancelled",
                NOW + 10 + i,
                f"key:x{i}",
            )
        [last] = await store.list(ListFilter(type="s"))
        assert await events(store, last.id) == [(1, NOW + 20, "submitted", "pending", "key:s")]


async def test_bounded_keeps_the_first_and_the_latest(store: Any) -> None:
    task_id = await submit(store)
    for i in range(MAX_HISTORY + 20):
        await store.set_priority(task_id, i % 200, now=NOW + i)
    rows = await store.history(task_id)
    assert len(rows) == MAX_HISTORY
    total = 1 + MAX_HISTORY + 20  # submitted, then one row per change
    assert rows[0].n == 1 and rows[0].event == "submitted"
    assert [h.n for h in rows[1:]] == list(range(total - MAX_HISTORY + 2, total + 1))
    assert rows[-1].priority == (MAX_HISTORY + 19) % 200


async def test_deleted_with_the_task(store: Any) -> None:
    gone = await submit(store)
    kept = await submit(store)
    await store.cancel(gone, NOW + 1)
    assert await store.purge(["cancelled"], 0.0, NOW + 10, 100) == 1
    with pytest.raises(NotFound):
        await store.history(gone)
    assert [h.event for h in await store.history(kept)] == ["submitted"]
    with pytest.raises(NotFound):
        await store.history("no-such-task")


async def test_a_batched_submit_records_every_task(store: Any) -> None:
    results = await store.submit([TaskSpec(type="t") for _ in range(300)], NOW, actor="key:b")
    for r in (results[0], results[150], results[-1]):
        assert await events(store, r.id) == [(1, NOW, "submitted", "pending", "key:b")]
    leases = await store.claim("w", ["default"], None, 300, NOW + 1, TTL)
    await store.complete([report(lease) for lease in leases], NOW + 2)
    assert [e[2] for e in await events(store, results[7].id)] == [
        "submitted",
        "leased",
        "succeeded",
    ]


async def test_migrate_copies_history_both_ways(tmp_path: Any, pg_url: str) -> None:
    import trio

    from tq.store.postgres import open_postgres_store
    from tq.store.sqlite import open_sqlite_store
    from tq.store.transfer import copy_store

    source = tmp_path / "src.db"
    async with open_sqlite_store(source) as s:
        [res] = await s.submit([TaskSpec(type="t")], NOW, actor="key:m")
        await s.cancel(res.id, NOW + 1, actor="key:c")
        before = await s.history(res.id)
    await trio.to_thread.run_sync(copy_store, f"sqlite://{source}", pg_url)
    async with open_postgres_store(pg_url) as pg:
        assert await pg.history(res.id) == before
        await pg.retry(res.id, NOW + 2, actor="key:r")
        after = await pg.history(res.id)
        assert after[:2] == before and (after[2].n, after[2].event) == (3, "retried")
    back = tmp_path / "back.db"
    await trio.to_thread.run_sync(copy_store, pg_url, f"sqlite://{back}")
    async with open_sqlite_store(back) as s:
        assert await s.history(res.id) == after
