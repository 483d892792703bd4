"""Caps and priority aging in both stores (the conformance fixtures of tests/test_store.py):
concurrency and rate caps per queue and per type held at claim time, the bucket's
refill reported, aging's order (exact, submission order kept within a priority, no
starvation), and every claim read an index probe (EXPLAIN on both stores)."""

# ruff: noqa: F811  (the store fixtures come from tests/test_store.py)
from __future__ import annotations

from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.test_store import (  # noqa: F401  (fixtures)
    _CLUSTERS,
    NOW,
    TTL,
    backend,
    open_backend,
    store,
)
from tq.core.task import Outcome, TaskSpec
from tq.store import pg_caps, schema_caps
from tq.store.claimplan import Aging, Cap, CapNote

pytestmark = pytest.mark.trio


async def put(store: Any, n: int, now: float = NOW, **fields: Any) -> list[str]:
    fields.setdefault("type", "t")
    results = await store.submit([TaskSpec(**fields) for _ in range(n)], now)
    return [r.id for r in results]


async def take(
    store: Any,
    n: int = 100,
    now: float = NOW,
    queues: tuple[str, ...] = ("default",),
    types: list[str] | None = None,
    aging: Aging | None = None,
    note: CapNote | None = None,
) -> list[Any]:
    leases: list[Any] = await store.claim("w", queues, types, n, now, TTL, aging, note)
    return leases


async def finish(store: Any, leases: list[Any], now: float = NOW) -> None:
    outcomes = [Outcome(id=lease.id, token=lease.token, status="ok") for lease in leases]
    results = await store.complete(outcomes, now)
    assert all(r.accepted for r in results)


async def test_a_queue_concurrency_cap_holds_and_frees_as_tasks_finish(store: Any) -> None:
    await store.set_cap(Cap("queue", "default", concurrency=3), NOW)
    await put(store, 10)
    first = await take(store)
    assert len(first) == 3
    note = CapNote()
    assert await take(store, note=note) == []
    assert note.capped and note.refill_in is None
    await finish(store, first[:1])
    assert len(await take(store)) == 1
    assert await store.running_count("queue", "default", 100) == 3
    assert await store.remove_cap("queue", "default") is True
    assert await store.remove_cap("queue", "default") is False
    assert len(await take(store)) == 6


async def test_a_type_cap_holds_for_claims_of_any_type_and_of_named_types(store: Any) -> None:
    await store.set_cap(Cap("type", "slow", concurrency=2), NOW)
    await put(store, 5, type="slow", priority=200)
    await put(store, 3, type="fast", priority=100)
    await put(store, 2, type="slow", queue="other")
    leases = await take(store)  # any type: 2 slow (the cap), then every fast
    assert sorted(lease.type for lease in leases) == ["fast"] * 3 + ["slow"] * 2
    assert await take(store, queues=("default", "other"), types=["slow"]) == []
    await finish(store, [lease for lease in leases if lease.type == "slow"][:1])
    [lease] = await take(store, queues=("other",), types=["slow"])
    assert lease.queue == "other"  # a type cap counts across queues
    caps = await store.list_caps()
    assert [(c.kind, c.name, c.concurrency) for c in caps] == [("type", "slow", 2)]


async def test_a_rate_cap_starts_at_most_burst_plus_rate_per_window(store: Any) -> None:
    await store.set_cap(Cap("queue", "default", rate=2.0), NOW)  # burst 2
    ids = await put(store, 40)
    started: list[float] = []
    now = NOW
    for step in range(40):  # a claim every 0.25 s for 10 s
        now = NOW + step * 0.25
        note = CapNote()
        leases = await take(store, now=now, note=note)
        started += [(await store.get(lease.id)).started_at for lease in leases]
        if not leases:
            assert note.capped and note.refill_in is not None and 0 < note.refill_in <= 0.5
    assert len(started) == 2 + 19  # the burst, then 2 per second for 9.75 s
    for start in started:  # any 1 s window: at most burst + rate * 1 s
        assert sum(1 for s in started if start <= s < start + 1.0) <= 4
    assert len(set(ids)) == 40


async def test_caps_combine_queue_and_type(store: Any) -> None:
    await store.set_cap(Cap("queue", "default", concurrency=4), NOW)
    await store.set_cap(Cap("type", "a", concurrency=1), NOW)
    await put(store, 3, type="a", priority=200)
    await put(store, 5, type="b", priority=100)
    leases = await take(store, types=["a", "b"])
    assert sorted(lease.type for lease in leases) == ["a", "b", "b", "b"]


async def test_aging_lets_an_old_low_priority_task_first(store: Any) -> None:
    aging = Aging(rate=1 / 60, cap=20)  # a point a minute, at most 20
    [old] = await put(store, 1, now=NOW - 1000, priority=0)  # 16.7 points of age
    await put(store, 3, now=NOW, priority=10)
    leases = await take(store, n=1, aging=aging)
    assert [lease.id for lease in leases] == [old]
    [young] = await put(store, 1, now=NOW, priority=0, queue="q2")
    await put(store, 1, now=NOW, priority=1, queue="q2")
    [lease] = await take(store, n=1, queues=("q2",), aging=aging)
    assert lease.id != young  # no wait, no boost: priority decides
    assert (await take(store, n=1, aging=None))[0].priority == 10  # aging off: plain order


async def test_aging_cap_bounds_the_boost(store: Any) -> None:
    aging = Aging(rate=1.0, cap=5)
    await put(store, 1, now=NOW - 10_000, priority=0)  # capped at 0 + 5
    [high] = await put(store, 1, now=NOW, priority=6)
    [lease] = await take(store, n=1, aging=aging)
    assert lease.id == high


async def test_a_low_priority_task_is_claimed_under_a_steady_stream_of_high(store: Any) -> None:
    aging = Aging(rate=1 / 60, cap=50)
    [low] = await put(store, 1, now=NOW, priority=0)
    claimed_at = None
    for second in range(1, 1200):  # a high-priority task a second, one claim a second
        now = NOW + second
        await put(store, 1, now=now, priority=10)
        [lease] = await take(store, n=1, now=now, aging=aging)
        if lease.id == low:
            claimed_at = second
            break
    # it overtakes a fresh priority-10 task once it waited 10 minutes (10 points)
    assert claimed_at is not None and 600 <= claimed_at <= 602


async def test_no_aging_starves_without_it(store: Any) -> None:
    [low] = await put(store, 1, now=NOW, priority=0)
    for second in range(1, 50):
        await put(store, 1, now=NOW + second, priority=10)
        [lease] = await take(store, n=1, now=NOW + second)
        assert lease.id != low


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    tasks=st.lists(st.tuples(st.integers(0, 6), st.floats(0, 600)), min_size=2, max_size=25),
    rate=st.floats(0.001, 1.0),
    cap=st.integers(1, 10),
    n=st.integers(1, 8),
)
async def test_aging_never_reorders_equal_priorities(
    backend: str,
    tmp_path_factory: pytest.TempPathFactory,
    tasks: list[tuple[int, float]],
    rate: float,
    cap: int,
    n: int,
) -> None:
    """Submitted in list order at arbitrary times (clocks may even run backwards):
    tasks of one priority are claimed in submission order."""
    aging = Aging(rate=rate, cap=cap)
    order: dict[str, tuple[int, int]] = {}
    async with open_backend(backend, tmp_path_factory.mktemp("aging")) as s:
        for position, (priority, age) in enumerate(tasks):
            [task_id] = await put(s, 1, now=NOW - age, priority=priority)
            order[task_id] = (priority, position)
        claimed: list[str] = []
        while len(claimed) < len(tasks):
            leases = await take(s, n=n, aging=aging)
            assert leases
            claimed += [lease.id for lease in leases]
    for priority in {p for p, _ in order.values()}:
        same = [order[i][1] for i in claimed if order[i][0] == priority]
        assert same == sorted(same)


@pytest.mark.parametrize("aging", [None, Aging(rate=0.1, cap=10)])
async def test_capped_and_aged_claims_read_indexes_only(
    backend: str, tmp_path: Any, aging: Aging | None
) -> None:
    """Every statement of a planned claim is an index probe on both stores (EXPLAIN)."""
    async with open_backend(backend, tmp_path) as store:
        for chunk in range(10):
            await store.submit(
                [TaskSpec(type=f"t{i % 3}", priority=i % 7) for i in range(1000)], NOW - chunk
            )
        await store.set_cap(Cap("type", "t1", concurrency=5), NOW)
        leases = await take(store, n=10, aging=aging)
        assert len(leases) == 10
        statements: list[tuple[str, tuple[Any, ...]]]
        if backend == "sqlite":
            statements = [
                (schema_caps._LEVEL_BELOW, ("default", 5)),
                (schema_caps._HEADS_AT, ("default", 3, 10)),
                (schema_caps._HEADS_TYPE_AT, ("default", "t1", 3, 10)),
                (schema_caps._LEVEL_TYPE_BELOW, ("default", "t1", 4)),
                (schema_caps._NEXT_TYPE, ("default", "t0")),
                (schema_caps._RUNNING["queue"], ("default", 10)),
                (schema_caps._RUNNING["type"], ("t1", 10)),
            ]
            for statement, params in statements:
                reader = store._reader  # the store's read connection
                plan = " ".join(
                    str(row[-1])
                    for row in reader.execute(f"EXPLAIN QUERY PLAN {statement}", params)
                )
                assert "USING" in plan and "INDEX" in plan and "SCAN tasks" not in plan, plan
        else:
            url = _CLUSTERS["postgresql"].schema_url(str(tmp_path))
            statements = [
                (pg_caps._LEVEL_BELOW, ("default", 5)),
                (pg_caps._HEADS_AT, ("default", 3, 10)),
                (pg_caps._HEADS_TYPE_AT, ("default", "t1", 3, 10)),
                (pg_caps._LEVEL_TYPE_BELOW, ("default", "t1", 4)),
                (pg_caps._NEXT_TYPE, ("default", "t0")),
                (pg_caps._RUNNING["queue"], ("default", 10)),
                (pg_caps._RUNNING["type"], ("t1", 10)),
            ]
            with psycopg.connect(url, autocommit=True) as conn:
                conn.execute("ANALYZE tasks")
                for statement, params in statements:
                    text = "\n".join(row[0] for row in conn.execute(f"EXPLAIN {statement}", params))
                    assert "Index" in text and "Seq Scan" not in text, text
