"""Retention: finished tasks deleted after their TTL, per state and per queue, in
batches, on both stores (the conformance fixtures of tests/test_store.py); never an
unfinished task, nor a dependency a blocked task still waits for."""

# ruff: noqa: F811  (the store fixtures come from tests/test_store.py)
from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from tests.test_store import (  # noqa: F401  (fixtures)
    NOW,
    backend,
    claim,
    open_backend,
    report,
    store,
)
from tq.broker.loops import retention_loop, retention_policy
from tq.broker.service import BrokerService
from tq.config import BrokerSettings, load
from tq.core.errors import ConfigError, InvalidRequest, NotFound
from tq.core.retention import RetentionPolicy
from tq.core.task import ListFilter, TaskSpec
from tq.http.metrics import MetricsPage
from tq.store.sqlite import open_sqlite_store

pytestmark = pytest.mark.trio


def spec(queue: str = "a", **fields: Any) -> TaskSpec:
    return TaskSpec.from_mapping({"type": "t", "queue": queue, **fields})


async def finished(store: Any, queue: str, status: str, n: int, at: float) -> list[str]:
    """``n`` tasks of ``queue`` finished at ``at``: "ok" succeeded, "reject" dead,
    "cancel" cancelled."""
    results = await store.submit([spec(queue) for _ in range(n)], at)
    ids = [r.id for r in results]
    if status == "cancel":
        for task_id in ids:
            await store.cancel(task_id, at)
        return ids
    leases = [lease for lease in await claim(store, (queue,), n=1000, now=at) if lease.id in ids]
    assert len(leases) == n
    await store.complete([report(lease, status) for lease in leases], at)
    return ids


async def exists(store: Any, task_id: str) -> bool:
    try:
        await store.get(task_id)
    except NotFound:
        return False
    return True


POLICY = RetentionPolicy.of(
    {"succeeded": 100.0, "dead": 200.0, "cancelled": 0.0}, {("b", "succeeded"): 10.0}
)


async def test_each_state_and_queue_expires_after_its_own_ttl(store: Any) -> None:
    a_ok = await finished(store, "a", "ok", 3, NOW)
    b_ok = await finished(store, "b", "ok", 2, NOW)
    a_dead = await finished(store, "a", "reject", 2, NOW)
    a_cancelled = await finished(store, "a", "cancel", 2, NOW)
    unfinished = [r.id for r in await store.submit([spec("a"), spec("b", delay=1e6)], NOW)]
    [running] = await claim(store, ("a",), n=1, now=NOW)  # the pending one of queue a
    unfinished += [r.id for r in await store.submit([spec("a")], NOW + 1)]  # the newest row

    assert await store.expire_finished(POLICY, NOW + 10, 100) == {}  # nothing old enough
    assert await store.expire_finished(POLICY, NOW + 50, 100) == {("b", "succeeded"): 2}
    assert not any([await exists(store, i) for i in b_ok])
    assert all([await exists(store, i) for i in a_ok + a_dead])
    assert await store.expire_finished(POLICY, NOW + 150, 100) == {("a", "succeeded"): 3}
    assert await store.expire_finished(POLICY, NOW + 250, 100) == {("a", "dead"): 2}
    # cancelled: kept forever (TTL 0); unfinished tasks never expire
    assert await store.expire_finished(POLICY, NOW + 1e9, 100) == {}
    assert all([await exists(store, i) for i in a_cancelled + unfinished])
    assert (await store.get(running.id)).state == "running"
    counts = (await store.stats()).counts
    assert counts["a"].get("succeeded", 0) == 0 and counts["a"]["cancelled"] == 2
    assert counts.get("b", {}).get("succeeded", 0) == 0


async def test_expiry_deletes_in_bounded_batches_oldest_first(store: Any) -> None:
    ids = []
    for i in range(7):
        ids += await finished(store, "a", "ok", 1, NOW + i)
    await store.submit([spec("a")], NOW + 10)  # newest row: pending
    policy = RetentionPolicy.of({"succeeded": 100.0})
    batches = []
    while True:
        done = await store.expire_finished(policy, NOW + 1000, 3)
        if not done:
            break
        batches.append(done[("a", "succeeded")])
    assert batches == [3, 3, 1]
    assert not any([await exists(store, i) for i in ids])
    # oldest first: at a cutoff between them only the older ones go
    newer = []
    for i in range(4):
        newer += await finished(store, "a", "ok", 1, NOW + 2000 + i)
    await store.submit([spec("a")], NOW + 3000)
    assert await store.expire_finished(policy, NOW + 2101.5, 100) == {("a", "succeeded"): 2}
    assert [await exists(store, i) for i in newer] == [False, False, True, True]


async def test_a_dependency_a_blocked_task_waits_for_is_kept(store: Any) -> None:
    [first] = await finished(store, "a", "ok", 1, NOW)
    [other] = [r.id for r in await store.submit([spec("o")], NOW)]
    [waiting] = [r.id for r in await store.submit([spec("a", depends_on=[first, other])], NOW)]
    [done_dep] = await finished(store, "a", "ok", 1, NOW)
    [dependent] = [r.id for r in await store.submit([spec("c", depends_on=[done_dep])], NOW)]
    # the dependent of done_dep was released at once; finish it
    [lease] = await claim(store, ("c",), n=1, now=NOW)
    await store.complete([report(lease)], NOW)
    await store.submit([spec("d")], NOW)  # the newest row (SQLite keeps it): pending
    policy = RetentionPolicy.of({"succeeded": 10.0})
    await store.expire_finished(policy, NOW + 100, 100)
    assert await exists(store, first)  # waiting (blocked) still needs it
    assert (await store.get(waiting)).state == "blocked"
    assert not await exists(store, done_dep) and not await exists(store, dependent)
    # once the other dependency succeeds, the waiting task runs, and first may go
    leases = await claim(store, ("o",), n=10, now=NOW + 100)
    assert [lease.id for lease in leases] == [other]
    await store.complete([report(leases[0])], NOW + 100)
    assert (await store.get(waiting)).state == "pending"
    await store.expire_finished(policy, NOW + 105, 100)
    assert not await exists(store, first) and await exists(store, other)


async def edges(store: Any) -> set[tuple[str, str]]:
    """Every stored dependency edge (dependent, dependency)."""
    found = await store._read(
        lambda conn: conn.execute("SELECT task, depends_on FROM task_deps").fetchall()
    )
    return {(task, dep) for task, dep in found}


async def test_expiry_and_purge_delete_the_edges_of_the_tasks_they_delete(store: Any) -> None:
    [dep] = await finished(store, "a", "ok", 1, NOW)
    [child] = [r.id for r in await store.submit([spec("c", depends_on=[dep])], NOW)]
    [lease] = await claim(store, ("c",), n=1, now=NOW)
    await store.complete([report(lease)], NOW)
    [dep2] = await finished(store, "a", "ok", 1, NOW)
    [child2] = [r.id for r in await store.submit([spec("k", depends_on=[dep2])], NOW)]
    await store.submit([spec("z")], NOW)  # the newest row (SQLite keeps it): pending
    assert await edges(store) == {(child, dep), (child2, dep2)}
    # purge of queue-less "succeeded": dep, child and dep2 go; child2 is pending, kept
    assert await store.purge(["succeeded"], 10.0, NOW + 100, 100) == 3
    assert not await exists(store, child) and await exists(store, child2)
    # the purged dependent's edge went with it; the kept dependent still names dep2
    assert await edges(store) == {(child2, dep2)}
    [lease] = await claim(store, ("k",), n=1, now=NOW + 100)
    await store.complete([report(lease)], NOW + 100)
    policy = RetentionPolicy.of({"succeeded": 10.0})
    assert sum((await store.expire_finished(policy, NOW + 200, 100)).values()) == 1
    assert await edges(store) == set()


async def keys(store: Any) -> set[str]:
    """The tasks holding a stored unique key."""
    found = await store._read(lambda conn: conn.execute("SELECT task FROM task_unique").fetchall())
    return {task for (task,) in found}


async def test_expiry_and_purge_delete_the_unique_keys_of_the_tasks_they_delete(
    store: Any,
) -> None:
    first, second, third = [
        r.id
        for r in await store.submit(
            [spec("a", payload=i, unique_for=3600.0) for i in range(3)], NOW
        )
    ]
    leases = await claim(store, ("a",), n=3, now=NOW)
    await store.complete([report(lease) for lease in leases], NOW)
    await store.submit([spec("z")], NOW)  # the newest row (SQLite keeps it)
    assert await keys(store) == {first, second, third}
    policy = RetentionPolicy.of({"succeeded": 10.0})
    assert sum((await store.expire_finished(policy, NOW + 100, 1)).values()) == 1
    assert await keys(store) == {second, third}
    assert await store.purge(["succeeded"], 10.0, NOW + 100, 1) == 1
    assert len(await keys(store)) == 1
    # the key of a deleted holder is free: the same task again is created anew
    [again] = await store.submit([spec("a", payload=0, unique_for=3600.0)], NOW + 200)
    assert again.created and again.id != first


async def test_retention_policies_refuse_unfinished_states_and_bad_ttls() -> None:
    with pytest.raises(InvalidRequest, match="finished states"):
        RetentionPolicy.of({"pending": 10.0})
    with pytest.raises(InvalidRequest, match=">= 0"):
        RetentionPolicy.of({"dead": -1.0})
    assert POLICY.ttl("b", "succeeded") == 10.0 and POLICY.ttl("c", "succeeded") == 100.0
    assert POLICY.ttl("b", "cancelled") == 0.0 and not RetentionPolicy.of({}).active


async def test_the_listing_after_expiry_is_consistent(store: Any) -> None:
    await finished(store, "a", "ok", 5, NOW)
    keep = [r.id for r in await store.submit([spec("a") for _ in range(3)], NOW)]
    await store.expire_finished(RetentionPolicy.of({"succeeded": 1.0}), NOW + 10, 100)
    assert [t.id for t in await store.list(ListFilter(queue="a"))] == keep


# -- the broker's retention loop, on trio's fake clock -----------------------------------------


async def test_the_retention_loop_deletes_in_batches_when_due(
    tmp_path: Path, mock_clock: trio.testing.MockClock
) -> None:
    """Fake time 60 times faster than real (autojump would leap over the store's thread)."""
    mock_clock.rate = 60
    async with open_sqlite_store(tmp_path / "tq.db") as opened:
        await finished(opened, "a", "ok", 25, NOW)
        await finished(opened, "keep", "ok", 3, NOW)
        await opened.submit([spec("a")], NOW)  # unfinished, and the newest row
        service = BrokerService(opened, lease_ttl=30, clock=lambda: NOW + trio.current_time())
        batches: list[int] = []
        expire = opened.expire_finished

        async def counted(*args: Any) -> dict[tuple[str, str], int]:
            done = await expire(*args)
            batches.append(sum(done.values()))
            return done

        opened.expire_finished = counted  # type: ignore[method-assign]
        policy = RetentionPolicy.of({"succeeded": 100.0}, {("keep", "succeeded"): 0.0})
        async with trio.open_nursery() as nursery:
            nursery.start_soon(partial(retention_loop, service, policy, interval=60, batch=10))
            await trio.sleep(90)  # passes at 0 and 60 s: nothing old enough yet
            assert batches == [0, 0]
            await trio.sleep(60)  # the pass at 120 s: three batches, back to back
            assert batches == [0, 0, 10, 10, 5]
            nursery.cancel_scope.cancel()
        assert service.retention_deleted == {"succeeded": 25}
        body, _ = await MetricsPage(service).render(None)
        assert b'tq_retention_deleted_total{state="succeeded"} 25.0' in body
        assert b'tq_retention_deleted_total{state="dead"} 0.0' in body
        left = await opened.list(ListFilter(limit=100))
        assert sorted(t.queue for t in left) == ["a", "keep", "keep", "keep"]


async def test_the_broker_settings_make_the_policy(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text(
        'retention_dead = "90d"\nretention_cancelled = false\n'
        '[retention_queues.reports]\nsucceeded = "1d"\ndead = 0\n',
        encoding="utf-8",
    )
    settings = load(BrokerSettings, env={"TQ_RETENTION_SUCCEEDED": "12h"}, config_file=config)
    policy = retention_policy(settings)
    assert policy.ttl("mail", "succeeded") == 12 * 3600
    assert policy.ttl("mail", "dead") == 90 * 86400 and policy.ttl("mail", "cancelled") == 0
    assert policy.ttl("reports", "succeeded") == 86400 and policy.ttl("reports", "dead") == 0
    assert retention_policy(BrokerSettings()).ttl("x", "dead") == 30 * 86400
    config.write_text('[retention_queues.reports]\nrunning = "1d"\n', encoding="utf-8")
    with pytest.raises(ConfigError, match=r"retention_queues .*reports.running: retention"):
        load(BrokerSettings, env={}, config_file=config)
    with pytest.raises(ConfigError, match="TQ_RETENTION_DEAD=soon: not a duration"):
        load(BrokerSettings, env={"TQ_RETENTION_DEAD": "soon"}, config_file=tmp_path / "none")


async def test_doctor_says_what_retention_deletes() -> None:
    from tq.cli.doctor import _check_retention
    from tq.config import Settings

    check = _check_retention(Settings(retention_queues=(("reports", "dead", 7200.0),)))
    assert check.status == "ok"
    assert check.detail == (
        "finished tasks: succeeded 7d, dead 30d, cancelled 7d; per queue: reports.dead 2h"
    )
    off = _check_retention(Settings(retention_succeeded=0, retention_dead=0, retention_cancelled=0))
    assert off.status == "warn" and "nothing is ever deleted" in off.detail
