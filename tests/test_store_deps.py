"""Task dependencies on both stores (the conformance fixtures of tests/test_store.py):
blocked until every dependency succeeded, released in the transaction that finishes
the last one, failure policies, results passed along, and a random-DAG property."""

# ruff: noqa: F811  (the store fixtures come from tests/test_store.py)
from __future__ import annotations

import random
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.test_store import (  # noqa: F401  (fixtures)
    NOW,
    backend,
    claim,
    open_backend,
    report,
    store,
)
from tq.core.errors import InvalidRequest, NotFound
from tq.core.task import Outcome, TaskError, TaskSpec

pytestmark = pytest.mark.trio


def spec(type_: str = "t", **fields: Any) -> TaskSpec:
    return TaskSpec.from_mapping({"type": type_, **fields})


async def one(store: Any, **fields: Any) -> str:
    [result] = await store.submit([spec(**fields)], NOW)
    return str(result.id)


async def run(store: Any, task_id: str, status: str = "ok", result: Any = None) -> Any:
    """Claim everything pending; report ``task_id`` (with status), give the rest back."""
    leases = await claim(store)
    by_id = {lease.id: lease for lease in leases}
    assert task_id in by_id, f"{task_id} was not claimable; claimed {list(by_id)}"
    outcomes = [report(lease, "release") for lease in leases if lease.id != task_id] + [
        report(
            by_id[task_id],
            status,
            result=result,
            error=None if status == "ok" else TaskError("E", "boom"),
        )
    ]
    results = await store.complete(outcomes, NOW + 1)
    return results[-1]


async def state(store: Any, task_id: str) -> str:
    return (await store.get(task_id)).state.value


async def test_blocked_until_every_dependency_succeeded(store: Any) -> None:
    a = await one(store)
    b = await one(store)
    c = await one(store, depends_on=[a, b])
    assert await state(store, c) == "blocked"
    assert await store.dependencies(c) == [(a, "pending", False), (b, "pending", False)]
    r = await run(store, a)
    assert r.dependents == ()
    assert await state(store, c) == "blocked"
    r = await run(store, b)
    assert r.dependents == (c,)  # released by the report that finished its last dependency
    assert await state(store, c) == "pending"
    assert await store.dependencies(c) == [(a, "succeeded", True), (b, "succeeded", True)]


async def test_a_dependency_already_succeeded_counts_as_met(store: Any) -> None:
    a = await one(store)
    await run(store, a)
    b = await one(store, depends_on=[a])
    assert await state(store, b) == "pending"


async def test_unknown_dependency_refused_and_nothing_kept(store: Any) -> None:
    a = await one(store)
    with pytest.raises(NotFound, match="no-such-id"):
        await store.submit([spec(), spec(depends_on=[a, "no-such-id"])], NOW)
    [only] = await store.list(__import__("tq.core.task", fromlist=["ListFilter"]).ListFilter())
    assert only.id == a


@pytest.mark.parametrize("ref", ["#1", "#2", "#x", "#-1"])
async def test_batch_references_only_earlier_tasks(store: Any, ref: str) -> None:
    with pytest.raises(InvalidRequest, match="earlier task"):
        await store.submit([spec(), spec(depends_on=[ref]), spec()], NOW)


async def test_batch_reference_by_index(store: Any) -> None:
    results = await store.submit([spec(), spec(depends_on=["#0"]), spec(depends_on=["#1"])], NOW)
    a, b, c = (r.id for r in results)
    assert [await state(store, x) for x in (a, b, c)] == ["pending", "blocked", "blocked"]
    await run(store, a)
    await run(store, b)
    assert await state(store, c) == "pending"


async def test_failure_cascades_down_the_graph(store: Any) -> None:
    a = await one(store, max_retries=0)
    b = await one(store, depends_on=[a])
    c = await one(store, depends_on=[b])
    keep = await one(store, depends_on=[b], on_dependency_failure="wait")
    r = await run(store, a, "reject")
    assert r.state == "dead"
    assert set(r.dependents) == {b, c}
    for task_id, dep in ((b, a), (c, b)):
        task = await store.get(task_id)
        assert task.state.value == "cancelled"
        assert task.error is not None and dep in task.error.message
        assert task.error.type == "DependencyFailed"
    assert await state(store, keep) == "blocked"  # "wait" stays blocked


async def test_run_policy_releases_after_failure(store: Any) -> None:
    a = await one(store, max_retries=0)
    b = await one(store)
    c = await one(store, depends_on=[a, b], on_dependency_failure="run")
    await run(store, a, "reject")
    assert await state(store, c) == "blocked"
    await run(store, b)
    assert await state(store, c) == "pending"


async def test_cancel_cascades_and_cancel_of_blocked_works(store: Any) -> None:
    a = await one(store)
    b = await one(store, depends_on=[a])
    c = await one(store, depends_on=[b])
    cancelled = await store.cancel(c, NOW)
    assert cancelled.state.value == "cancelled"
    await store.cancel(a, NOW)
    assert await state(store, b) == "cancelled"


async def test_dead_dependency_at_submit(store: Any) -> None:
    a = await one(store)
    await store.cancel(a, NOW)
    b = await one(store, depends_on=[a])
    assert await state(store, b) == "cancelled"
    c = await one(store, depends_on=[a], on_dependency_failure="run")
    assert await state(store, c) == "pending"
    d = await one(store, depends_on=[a], on_dependency_failure="wait")
    assert await state(store, d) == "blocked"
    await store.retry(a, NOW)
    await run(store, a)
    assert await state(store, d) == "pending"  # a retried dependency resumes "wait"
    assert await state(store, b) == "cancelled"  # cancelled dependents stay cancelled


async def test_wait_policy_resumes_after_retry_and_counts_once(store: Any) -> None:
    a = await one(store, max_retries=0)
    b = await one(store, depends_on=[a], on_dependency_failure="wait")
    await run(store, a, "reject")
    assert await state(store, b) == "blocked"
    await store.retry(a, NOW)
    r = await run(store, a, result=5)
    assert r.dependents == (b,)
    assert await state(store, b) == "pending"


async def test_expired_lease_dead_cascades(store: Any) -> None:
    a = await one(store, max_retries=0)
    b = await one(store, depends_on=[a])
    await claim(store)
    assert await store.release_expired(NOW + 10_000) == [a]
    assert await state(store, a) == "dead"
    assert await state(store, b) == "cancelled"


async def test_results_passed_as_input(store: Any) -> None:
    results = await store.submit(
        [
            spec(),
            spec(),
            spec(depends_on=["#0"], input="result"),
            spec(depends_on=["#0", "#1"], input="results", result_key="n"),
            spec(depends_on=["#1"], input="result", payload={"mine": 1}),
        ],
        NOW,
    )
    a, b, one_, many, merged = (r.id for r in results)
    await run(store, a, result={"n": 1, "x": "a"})
    assert (await store.get(one_)).payload == {"n": 1, "x": "a"}
    await run(store, b, result={"n": 2})
    assert (await store.get(many)).payload == [1, 2]
    assert (await store.get(merged)).payload == {"mine": 1, "input": {"n": 2}}


async def test_graph_walks_both_ways(store: Any) -> None:
    results = await store.submit([spec(), spec(depends_on=["#0"]), spec(depends_on=["#1"])], NOW)
    a, b, c = (r.id for r in results)
    other = await one(store)
    tasks, edges, cut = await store.graph(b)
    assert {t.id for t in tasks} == {a, b, c}
    assert set(edges) == {(b, a), (c, b)}
    assert not cut
    tasks, edges, _ = await store.graph(other)
    assert [t.id for t in tasks] == [other] and edges == []
    with pytest.raises(NotFound):
        await store.graph("nope")


async def test_chord_of_1000_calls_back_once_with_every_result(store: Any) -> None:
    n = 1000
    specs = [spec("m", payload=i) for i in range(n)]
    specs.append(spec("cb", depends_on=[f"#{i}" for i in range(n)], input="results"))
    results = await store.submit(specs, NOW)
    callback = results[-1].id
    leases = await store.claim("w", ["default"], ["m"], n, NOW, 30.0)
    assert len(leases) == n
    random.Random(7).shuffle(leases)
    released: list[str] = []
    for start in range(0, n, 97):
        outcomes = [
            Outcome(lease.id, lease.token, "ok", result=lease.payload * 10)
            for lease in leases[start : start + 97]
        ]
        for r in await store.complete(outcomes, NOW + 1):
            released += r.dependents
    assert released == [callback]
    [lease] = await store.claim("w", ["default"], ["cb"], 10, NOW + 2, 30.0)
    assert lease.payload == [i * 10 for i in range(n)]
    assert await store.claim("w", ["default"], None, 10, NOW + 2, 30.0) == []


# -- property: random DAGs run in an order consistent with their edges ---------------------


@st.composite
def dags(draw: st.DrawFn) -> tuple[list[list[int]], list[int]]:
    n = draw(st.integers(1, 12))
    deps = [sorted(draw(st.sets(st.integers(0, i - 1), max_size=3))) if i else [] for i in range(n)]
    seed = draw(st.integers(0, 2**32))
    return deps, [seed]


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(dag=dags())
async def test_random_dags_run_in_dependency_order(
    backend: str,
    tmp_path_factory: pytest.TempPathFactory,
    dag: tuple[list[list[int]], list[int]],
) -> None:
    deps, [seed] = dag
    rng = random.Random(seed)
    async with open_backend(backend, tmp_path_factory.mktemp("dag")) as s:
        results = await s.submit([spec(depends_on=[f"#{d}" for d in ds]) for ds in deps], NOW)
        ids = [r.id for r in results]
        index = {task_id: i for i, task_id in enumerate(ids)}
        succeeded: set[int] = set()
        while len(succeeded) < len(ids):
            leases = await claim(s)
            assert leases, f"stuck: {len(succeeded)} of {len(ids)} done, nothing claimable"
            for lease in leases:  # nothing is claimed before its dependencies succeeded
                assert set(deps[index[lease.id]]) <= succeeded
            rng.shuffle(leases)
            finish = leases[: rng.randint(1, len(leases))]
            outcomes = [report(lease) for lease in finish]
            outcomes += [report(lease, "release") for lease in leases[len(finish) :]]
            await s.complete(outcomes, NOW)
            succeeded |= {index[lease.id] for lease in finish}


async def test_migrate_copies_dependencies(tmp_path: Any, pg_url: str) -> None:
    import trio

    from tq.store.postgres import open_postgres_store
    from tq.store.sqlite import open_sqlite_store
    from tq.store.transfer import copy_store

    source = tmp_path / "src.db"
    async with open_sqlite_store(source) as s:
        results = await s.submit(
            [spec(), spec(depends_on=["#0"], input="result", on_dependency_failure="wait")], NOW
        )
        a, b = (r.id for r in results)
    await trio.to_thread.run_sync(copy_store, f"sqlite://{source}", pg_url)
    async with open_postgres_store(pg_url) as pg:
        assert await pg.dependencies(b) == [(a, "pending", False)]
        r = await run(pg, a, result=7)
        assert r.dependents == (b,)
        assert (await pg.get(b)).payload == 7


async def test_two_brokers_finishing_two_dependencies_at_once_release_once(pg_url: str) -> None:
    import trio

    from tq.store.postgres import open_postgres_store

    async with open_postgres_store(pg_url) as one_, open_postgres_store(pg_url) as two:
        for _ in range(20):
            results = await one_.submit([spec(), spec(), spec(depends_on=["#0", "#1"])], NOW)
            a, b, c = (r.id for r in results)
            leases = {lease.id: lease for lease in await claim(one_, n=2)}
            released: list[str] = []

            async def finish(store: Any, lease: Any, released: list[str]) -> None:
                [r] = await store.complete([Outcome(lease.id, lease.token, "ok")], NOW + 1)
                assert r.accepted
                released.extend(r.dependents)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(finish, one_, leases[a], released)
                nursery.start_soon(finish, two, leases[b], released)
            assert released == [c]
            [lease] = await claim(two, n=5)
            assert lease.id == c
            await two.complete([Outcome(lease.id, lease.token, "ok")], NOW + 2)
