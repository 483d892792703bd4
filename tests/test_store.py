"""The Store conformance suite, run against every backend: SQLite and PostgreSQL.

To add a backend: add its name to BACKENDS and a branch to ``open_backend``.
Every test above the "SQLite only" line must pass unchanged against it.
All times are explicit (``NOW`` and offsets), as the Store takes ``now``.
PostgreSQL runs in a throwaway cluster (tests/conftest.py ``pg_cluster``), each
test in a schema of its own; without PostgreSQL installed those tests skip
(and fail in CI). PostgreSQL-only tests live in tests/test_store_postgres.py.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import apsw
import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from tq.core.auth import ApiKey, AuditEntry
from tq.core.errors import (
    ConfigError,
    InvalidRequest,
    InvalidTransition,
    NotFound,
    PayloadTooLarge,
    StoreError,
    Unavailable,
)
from tq.core.retry import RetryPolicy
from tq.core.schedule import Schedule, check_schedule, parse_schedule
from tq.core.states import State
from tq.core.task import MAX_PAYLOAD_BYTES, Lease, ListFilter, Outcome, TaskError, TaskSpec
from tq.store import schema, sqlite
from tq.store.postgres import open_postgres_store
from tq.store.sqlite import SQLiteStore, open_sqlite_store

pytestmark = pytest.mark.trio

BACKENDS = ["sqlite", "postgresql"]
NOW = 1_800_000_000.0
TTL = 30.0
TOO_BIG = b"x" * (MAX_PAYLOAD_BYTES + 1)


_CLUSTERS: dict[str, Any] = {}  # the session's PostgreSQL cluster, once started


@asynccontextmanager
async def open_backend(backend: str, tmp_path: Path) -> AsyncIterator[Any]:
    """A store of ``backend`` for ``tmp_path``: the same path opens the same data."""
    if backend == "sqlite":
        async with open_sqlite_store(tmp_path / "tq.db") as store:
            yield store
    elif backend == "postgresql":
        url = _CLUSTERS["postgresql"].schema_url(str(tmp_path))
        async with open_postgres_store(url) as pg:
            yield pg
    else:  # pragma: no cover
        raise AssertionError(f"unknown backend {backend}")


@pytest.fixture(params=BACKENDS, scope="session")
def backend(request: pytest.FixtureRequest) -> str:
    if request.param == "postgresql":
        _CLUSTERS["postgresql"] = request.getfixturevalue("pg_cluster")
    return str(request.param)


@pytest.fixture
async def store(backend: str, tmp_path: Path) -> AsyncIterator[Any]:
    async with open_backend(backend, tmp_path) as opened:
        yield opened


async def submit(store: Any, now: float = NOW, **fields: Any) -> str:
    fields.setdefault("type", "t")
    [result] = await store.submit([TaskSpec(**fields)], now)
    return str(result.id)


async def claim(
    store: Any,
    queues: tuple[str, ...] = ("default",),
    n: int = 100,
    now: float = NOW,
    worker: str = "w1",
    types: list[str] | None = None,
) -> list[Lease]:
    leases: list[Lease] = await store.claim(worker, queues, types, n, now, TTL)
    return leases


async def claim_one(store: Any, **kwargs: Any) -> Lease:
    [lease] = await claim(store, n=1, **kwargs)
    return lease


def report(lease: Lease, status: str = "ok", **fields: Any) -> Outcome:
    return Outcome(lease.id, lease.token, status, **fields)


# -- submit and get --------------------------------------------------------------------


@pytest.mark.parametrize(
    "payload",
    [
        {"to": "a@example.com", "n": 3, "tags": ["x", "y"], "nested": {"ok": True}},
        [1, "two", None, 4.5],
        b"\x00\xff binary",
        None,
        {1: "int keys survive", "b": b"bytes inside"},
    ],
)
async def test_submit_get_round_trip(store: Any, payload: Any) -> None:
    spec = TaskSpec(type="email", queue="mail", payload=payload, priority=7, max_retries=5)
    [result] = await store.submit([spec], NOW)
    assert result.created
    task = await store.get(result.id)
    assert task.payload == payload
    assert (task.id, task.type, task.queue, task.priority) == (result.id, "email", "mail", 7)
    assert (task.state, task.attempts, task.max_retries) == (State.PENDING, 0, 5)
    assert (task.created_at, task.started_at, task.finished_at, task.worker) == (
        NOW,
        None,
        None,
        None,
    )
    assert (task.timeout, task.retry_base, task.retry_cap) == (
        spec.timeout,
        spec.retry_base,
        spec.retry_cap,
    )


async def test_submit_returns_results_in_order(store: Any) -> None:
    specs = [TaskSpec(type="t", payload=i) for i in range(50)]
    results = await store.submit(specs, NOW)
    assert [(await store.get(r.id)).payload for r in results] == list(range(50))
    assert len({r.id for r in results}) == 50


@settings(max_examples=30, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.text(st.characters(blacklist_categories=("Z", "Cc", "Cs")), min_size=1).filter(
                lambda name: "," not in name and not any(c.isspace() for c in name)
            ),
            st.floats(min_value=0.001, max_value=1e300),
            st.integers(0, 255),
        ),
        min_size=1,
        max_size=5,
    )
)
async def test_submit_keeps_every_field_exactly(
    backend: str, specs: list[tuple[str, float, int]]
) -> None:
    """Rows travel as one document (SQLite: JSON; PostgreSQL: arrays): names with
    quotes, backslashes and any script, floats and integers all come back as they
    went in, in order."""
    with tempfile.TemporaryDirectory() as tmp:
        async with open_backend(backend, Path(tmp)) as store:
            sent = [
                TaskSpec(type=name, queue=name, timeout=timeout, retry_cap=timeout, priority=prio)
                for name, timeout, prio in specs
            ]
            results = await store.submit(sent, NOW)
            got = [await store.get(r.id) for r in results]
            assert [(t.type, t.queue, t.timeout, t.retry_cap, t.priority) for t in got] == [
                (s.type, s.queue, s.timeout, s.retry_cap, s.priority) for s in sent
            ]
            listed = await store.list(ListFilter())
            assert [t.id for t in listed] == [r.id for r in results]  # seq follows the request


@pytest.mark.parametrize("keyed", [False, True])
async def test_submit_mixes_large_and_small_payloads_in_order(store: Any, keyed: bool) -> None:
    """Small payloads go as hex in one JSON insert; a large one (or an idempotency
    key anywhere in the request) binds the rows one by one. Same rows either way."""
    large = b"L" * (schema.HEX_PAYLOAD_MAX + 1)
    payloads: list[Any] = [1, large, "two", None, large[:100]]
    specs = [
        TaskSpec(type="t", payload=p, idempotency_key=f"k{i}" if keyed else None)
        for i, p in enumerate(payloads)
    ]
    results = await store.submit(specs, NOW)
    assert [(await store.get(r.id)).payload for r in results] == payloads
    assert [t.id for t in await store.list(ListFilter())] == [r.id for r in results]


async def test_get_unknown_is_not_found(store: Any) -> None:
    with pytest.raises(NotFound, match="no task with id nope"):
        await store.get("nope")


async def test_unique_for_dedupes_while_unfinished_and_within_the_window(store: Any) -> None:
    hour = 3600.0
    [first] = await store.submit(
        [TaskSpec(type="t", payload={"a": 1, "b": 2}, unique_for=hour)], NOW
    )
    assert first.created
    # the same type and payload (map keys in another order): the first task's id
    [dup] = await store.submit(
        [TaskSpec(type="t", payload={"b": 2, "a": 1}, unique_for=hour)], NOW + 10
    )
    assert (dup.id, dup.created) == (first.id, False)
    # another payload, type or queue is another key; plain specs in one submit go through
    others = await store.submit(
        [
            TaskSpec(type="t", payload={"a": 1, "b": 3}, unique_for=hour),
            TaskSpec(type="u", payload={"a": 1, "b": 2}, unique_for=hour),
            TaskSpec(type="t", queue="q2", payload={"a": 1, "b": 2}, unique_for=hour),
            TaskSpec(type="t", payload={"a": 1, "b": 2}),
            TaskSpec(type="t", payload={"a": 1, "b": 2}, unique_for=hour),
        ],
        NOW + 20,
    )
    assert [r.created for r in others] == [True, True, True, True, False]
    assert others[4].id == first.id and len({r.id for r in others[:4]} | {first.id}) == 5
    # unfinished past the window: still a duplicate
    [late] = await store.submit(
        [TaskSpec(type="t", payload={"a": 1, "b": 2}, unique_for=hour)], NOW + 2 * hour
    )
    assert (late.id, late.created) == (first.id, False)
    # finished within the window: still a duplicate; finished after it: a new task
    leases = await claim(store, now=NOW + 2 * hour)
    lease = next(one for one in leases if one.id == first.id)
    await store.complete([report(lease)], NOW + 2 * hour + 1)
    [fresh] = await store.submit(
        [TaskSpec(type="t", payload={"a": 1, "b": 2}, unique_for=hour)], NOW + 2 * hour + 2
    )
    assert fresh.created and fresh.id != first.id
    [dup2] = await store.submit(
        [TaskSpec(type="t", payload={"b": 2, "a": 1}, unique_for=60.0)], NOW + 2 * hour + 3
    )
    assert (dup2.id, dup2.created) == (fresh.id, False)


async def test_unique_key_explicit_in_one_submit_and_after_a_purge(store: Any) -> None:
    keyed = [
        TaskSpec.from_mapping({"type": "t", "payload": i, "unique_for": 60, "unique_key": "K"})
        for i in range(3)
    ]
    results = await store.submit(keyed, NOW)
    assert [r.created for r in results] == [True, False, False]
    assert {r.id for r in results} == {results[0].id}
    [lease] = await claim(store)
    await store.complete([report(lease)], NOW + 1)
    await submit(store, queue="other")  # SQLite never purges the newest task
    assert await store.purge(["succeeded"], 0.0, NOW + 2, 100) == 1
    # its holder is gone: the key is free even within the window
    [again] = await store.submit(keyed[:1], NOW + 3)
    assert again.created and again.id != results[0].id
    with pytest.raises(InvalidRequest, match="#N"):
        await store.submit(
            [keyed[0], TaskSpec.from_mapping({"type": "t", "depends_on": ["#0"]})], NOW
        )


async def test_idempotency_key_dedupes(store: Any) -> None:
    first = await store.submit([TaskSpec(type="t", idempotency_key="k1", payload=1)], NOW)
    again = await store.submit(
        [
            TaskSpec(type="t", idempotency_key="k1", payload=2),
            TaskSpec(type="t", idempotency_key="k2"),
            TaskSpec(type="t", idempotency_key="k2"),
        ],
        NOW,
    )
    assert first[0].created
    assert again[0].id == first[0].id and not again[0].created
    assert again[1].created and (again[2].id, again[2].created) == (again[1].id, False)
    assert (await store.get(first[0].id)).payload == 1
    assert len(await store.list(ListFilter())) == 2


async def test_queues_of_keys_names_the_queue_holding_each_key(store: Any) -> None:
    await store.submit(
        [
            TaskSpec(type="t", queue="a", idempotency_key="k1"),
            TaskSpec(type="t", queue="b", idempotency_key="k2"),
        ],
        NOW,
    )
    assert await store.queues_of_keys(["k1", "k2", "k3"]) == {"k1": "a", "k2": "b"}
    assert await store.queues_of_keys([]) == {}


async def test_payload_too_large_inserts_nothing(store: Any) -> None:
    with pytest.raises(PayloadTooLarge, match="limit"):
        await store.submit([TaskSpec(type="t"), TaskSpec(type="t", payload=TOO_BIG)], NOW)
    assert await store.list(ListFilter()) == []


# -- claim -----------------------------------------------------------------------------


async def test_claim_order_is_priority_then_age_across_queues(store: Any) -> None:
    plan = [("a", 100), ("b", 200), ("a", 200), ("b", 50), ("a", 100), ("c", 255), ("b", 100)]
    ids = [await submit(store, queue=q, priority=p) for q, p in plan]
    leases = await claim(store, queues=("a", "b"), n=4)
    # b200, a200 (older first), then a100 (older), a100 ... across both queues
    assert [lease.id for lease in leases] == [ids[1], ids[2], ids[0], ids[4]]
    rest = await claim(store, queues=("a", "b"))
    assert [lease.id for lease in rest] == [ids[6], ids[3]]


@settings(max_examples=25, deadline=None)
@given(
    tasks=st.lists(st.tuples(st.sampled_from("xyz"), st.integers(0, 255)), max_size=30),
    wanted=st.sets(st.sampled_from("xyz"), min_size=1),
    n=st.integers(1, 40),
)
async def test_claim_order_property(
    backend: str, tasks: list[tuple[str, int]], wanted: set[str], n: int
) -> None:
    with tempfile.TemporaryDirectory() as tmp:  # a fresh store per example
        async with open_backend(backend, Path(tmp)) as store:
            specs = [TaskSpec(type="t", queue=q, priority=p) for q, p in tasks]
            results = await store.submit(specs, NOW)
            leases = await claim(store, queues=tuple(sorted(wanted)), n=n)
    eligible = sorted((-p, i) for i, (q, p) in enumerate(tasks) if q in wanted)
    assert [lease.id for lease in leases] == [results[i].id for _, i in eligible[:n]]


async def test_claim_filters_types(store: Any) -> None:
    a = await submit(store, type="a")
    await submit(store, type="b")
    c = await submit(store, type="c", priority=200)
    leases = await claim(store, types=["a", "c", "a"])
    assert [lease.id for lease in leases] == [c, a]
    assert await claim(store, types=[]) == []
    assert [lease.type for lease in await claim(store)] == ["b"]


async def test_claim_sets_a_lease(store: Any) -> None:
    task_id = await submit(store, type="job", payload={"k": "v"}, priority=9, timeout=12.5)
    lease = await claim_one(store, worker="w7")
    assert (lease.id, lease.type, lease.queue, lease.payload) == (
        task_id,
        "job",
        "default",
        {"k": "v"},
    )
    assert (lease.priority, lease.attempt, lease.timeout) == (9, 1, 12.5)
    assert 0 < lease.token < 2**62
    assert lease.expires_at == NOW + TTL
    task = await store.get(task_id)
    assert (task.state, task.attempts, task.worker, task.started_at) == (
        State.RUNNING,
        1,
        "w7",
        NOW,
    )
    assert await claim(store) == []


async def test_claim_tokens_differ(store: Any) -> None:
    await store.submit([TaskSpec(type="t") for _ in range(50)], NOW)
    leases = await claim(store)
    assert len({lease.token for lease in leases}) == 50
    assert all(0 < lease.token < 2**62 for lease in leases)  # fits SQLite's signed 64 bits


# -- complete and fencing -------------------------------------------------------------


async def test_complete_ok(store: Any) -> None:
    await submit(store)
    lease = await claim_one(store)
    [result] = await store.complete([report(lease, result={"sum": 3})], NOW + 1)
    assert (result.id, result.accepted, result.state) == (lease.id, True, "succeeded")
    task = await store.get(lease.id)
    assert (task.state, task.result, task.finished_at) == (State.SUCCEEDED, {"sum": 3}, NOW + 1)
    [again] = await store.complete([report(lease)], NOW + 2)
    assert (again.accepted, again.state) == (False, "succeeded")


async def test_fencing_wrong_token_is_refused(store: Any) -> None:
    await submit(store)
    lease = await claim_one(store)
    before = await store.get(lease.id)
    [result] = await store.complete([Outcome(lease.id, lease.token ^ 1, "ok")], NOW + 1)
    assert (result.accepted, result.state) == (False, "running")
    assert result.reason
    assert await store.get(lease.id) == before


async def test_fencing_expired_lease_is_refused(store: Any) -> None:
    await submit(store)
    lease = await claim_one(store)
    before = await store.get(lease.id)
    [result] = await store.complete([report(lease)], lease.expires_at + 0.001)
    assert (result.accepted, result.state) == (False, "running")
    assert "expired" in result.reason
    assert await store.get(lease.id) == before
    [ok] = await store.complete([report(lease)], lease.expires_at)  # the last valid instant
    assert ok.accepted


async def test_fencing_regranted_lease_refuses_the_old_token(store: Any) -> None:
    await submit(store)
    old = await claim_one(store, worker="w1")
    assert await store.release_expired(old.expires_at + 1) == [old.id]
    new = await claim_one(store, worker="w2", now=old.expires_at + 2)
    assert new.attempt == 2 and new.token != old.token
    before = await store.get(old.id)
    [refused] = await store.complete([report(old)], old.expires_at + 3)
    assert (refused.accepted, refused.state) == (False, "running")
    assert await store.get(old.id) == before
    [accepted] = await store.complete([report(new)], old.expires_at + 3)
    assert accepted.accepted


async def test_complete_unknown_and_duplicate_reports(store: Any) -> None:
    await submit(store)
    lease = await claim_one(store)
    results = await store.complete([report(lease), report(lease), Outcome("x", 1, "ok")], NOW)
    assert [(r.accepted, r.state) for r in results] == [
        (True, "succeeded"),
        (False, "succeeded"),
        (False, None),
    ]


async def test_complete_judges_each_report_in_a_batch_as_if_alone(store: Any) -> None:
    """A stale report does not spoil a good one for the same task in the same call,
    and one call may carry every kind of outcome."""
    for _ in range(4):
        await submit(store, max_retries=1)
    leases = await claim(store, n=4)
    assert len(leases) == 4
    ok, retry, reject, back = leases
    stale = Outcome(ok.id, ok.token + 1, "ok", result=1)
    results = await store.complete(
        [
            stale,
            report(ok, result=2),
            report(retry, "retry", error=TaskError("E", "again")),
            report(reject, "reject", error=TaskError("E", "no")),
            report(back, "release"),
        ],
        NOW,
    )
    assert [(r.accepted, r.state) for r in results] == [
        (False, "running"),
        (True, "succeeded"),
        (True, "failed"),
        (True, "dead"),
        (True, "pending"),
    ]
    assert (await store.get(ok.id)).result == 2
    assert (await store.get(back.id)).attempts == 0


async def test_complete_keeps_large_and_small_results(store: Any) -> None:
    for _ in range(3):
        await submit(store)
    leases = await claim(store, n=3)
    values = [b"R" * (schema.HEX_PAYLOAD_MAX + 1), {"small": [1, 2]}, None]
    results = await store.complete(
        [report(lease, result=value) for lease, value in zip(leases, values, strict=True)], NOW
    )
    assert all(r.accepted for r in results)
    assert [(await store.get(lease.id)).result for lease in leases] == values


async def test_complete_rejects_unknown_status(store: Any) -> None:
    with pytest.raises(InvalidRequest, match="status"):
        await store.complete([Outcome("x", 1, "maybe")], NOW)


async def test_retry_backs_off_then_promotes_then_goes_dead(store: Any) -> None:
    base, cap = 2.0, 5.0
    task_id = await submit(store, max_retries=2, retry_base=base, retry_cap=cap)
    now = NOW
    for attempt in (1, 2):
        lease = await claim_one(store, now=now)
        assert lease.attempt == attempt
        error = TaskError("Boom", f"failure {attempt}", "tb")
        [result] = await store.complete([report(lease, "retry", error=error)], now)
        assert (result.accepted, result.state) == (True, "failed")
        task = await store.get(task_id)
        ceiling = RetryPolicy(base, cap).ceiling(attempt)
        assert task.run_at is not None
        assert now + ceiling / 2 <= task.run_at <= now + ceiling
        assert (task.state, task.error) == (State.FAILED, error)
        assert await store.next_due() == task.run_at
        assert await store.promote_due(task.run_at - 0.001) == 0
        assert await claim(store, now=task.run_at) == []
        assert await store.promote_due(task.run_at) == 1
        assert (await store.get(task_id)).state == State.PENDING
        now = task.run_at
    lease = await claim_one(store, now=now)
    [result] = await store.complete([report(lease, "retry", error=TaskError("Boom", "3"))], now)
    assert (result.accepted, result.state) == (True, "dead")
    task = await store.get(task_id)
    assert (task.state, task.attempts, task.finished_at) == (State.DEAD, 3, now)
    assert task.error == TaskError("Boom", "3")
    assert await store.next_due() is None


async def test_retry_honours_the_requested_delay(store: Any) -> None:
    task_id = await submit(store, retry_base=1.0, retry_cap=1.0)
    lease = await claim_one(store)
    await store.complete([report(lease, "retry", delay=60.0)], NOW)
    assert (await store.get(task_id)).run_at == NOW + 60.0


async def test_reject_goes_dead_with_retries_left(store: Any) -> None:
    task_id = await submit(store, max_retries=5)
    lease = await claim_one(store)
    error = TaskError("BadInput", "no")
    [result] = await store.complete([report(lease, "reject", error=error)], NOW + 1)
    assert (result.accepted, result.state) == (True, "dead")
    task = await store.get(task_id)
    assert (task.state, task.error, task.finished_at) == (State.DEAD, error, NOW + 1)


async def test_a_result_too_large_to_keep_makes_the_task_dead(store: Any) -> None:
    await submit(store)
    lease = await claim_one(store)
    [result] = await store.complete([report(lease, result=TOO_BIG)], NOW)
    assert (result.accepted, result.state) == (True, "dead")
    task = await store.get(lease.id)
    assert task.error is not None and task.error.type == "ResultRejected"


# -- leases ----------------------------------------------------------------------------


async def test_extend_leases(store: Any) -> None:
    await store.submit([TaskSpec(type="t") for _ in range(3)], NOW)
    a, b, c = await claim(store, worker="w1")
    later = NOW + TTL - 1
    lost = await store.extend_leases(
        "w1", [(a.id, a.token), (b.id, b.token ^ 1), (c.id, c.token)], later, TTL
    )
    assert lost == [b.id]
    assert await store.extend_leases("w2", [(a.id, a.token)], later, TTL) == [a.id]
    [ok, expired] = await store.complete([report(a), report(b)], NOW + TTL + 1)
    assert ok.accepted and not expired.accepted
    assert await store.extend_leases("w1", [(b.id, b.token)], NOW + TTL + 1, TTL) == [b.id]
    assert await store.extend_leases("w1", [("unknown", 1)], NOW, TTL) == ["unknown"]


async def test_progress_rides_live_leases_only_and_is_cleared_by_the_next_attempt(
    store: Any,
) -> None:
    await store.submit([TaskSpec(type="t", max_retries=1) for _ in range(2)], NOW)
    a, b = await claim(store)
    lost = await store.extend_leases(
        "w1",
        [(a.id, a.token), (b.id, b.token ^ 1)],
        NOW + 1,
        TTL,
        {a.id: (0.4, "page 4/10"), b.id: (0.9, "stale lease")},
    )
    assert lost == [b.id]
    got_a, got_b = await store.get(a.id), await store.get(b.id)
    assert (got_a.progress, got_a.progress_message) == (0.4, "page 4/10")
    assert (got_b.progress, got_b.progress_message) == (None, None)  # its lease was not live
    assert got_a.to_dict()["progress"] == 0.4
    # an attempt that ends keeps how far it got ...
    await store.complete([report(a, "retry", error=TaskError("E", "boom"))], NOW + 2)
    failed = await store.get(a.id)
    assert (failed.state, failed.progress) == (State.FAILED, 0.4)
    # ... and the next attempt starts from nothing
    await store.promote_due(NOW + 1000)
    again = [lease for lease in await claim(store, now=NOW + 1000) if lease.id == a.id]
    assert again and (await store.get(a.id)).progress is None


async def test_release_expired(store: Any) -> None:
    keep = await submit(store, max_retries=1)
    last = await submit(store, max_retries=0)
    await claim(store, now=NOW)
    other = await submit(store)
    [late] = await claim(store, now=NOW + 10)
    assert late.id == other
    released = await store.release_expired(NOW + TTL + 1)
    assert sorted(released) == sorted([keep, last])
    kept = await store.get(keep)
    assert (kept.state, kept.attempts) == (State.PENDING, 1)
    dead = await store.get(last)
    assert dead.state == State.DEAD and dead.error is not None
    assert dead.error.type == "LeaseExpired"
    assert (await store.get(other)).state == State.RUNNING
    assert await store.release_expired(NOW + TTL + 1) == []
    again = await claim_one(store, now=NOW + TTL + 2)
    assert (again.id, again.attempt) == (keep, 2)


async def test_release_worker(store: Any) -> None:
    await store.submit([TaskSpec(type="t") for _ in range(4)], NOW)
    mine = await claim(store, n=2, worker="gone")
    theirs = await claim(store, n=2, worker="alive")
    released = await store.release_worker("gone", NOW + 1)
    assert sorted(released) == sorted(lease.id for lease in mine)
    for lease in mine:
        assert (await store.get(lease.id)).state == State.PENDING
    for lease in theirs:
        assert (await store.get(lease.id)).state == State.RUNNING
    [refused] = await store.complete([report(mine[0])], NOW + 2)
    assert not refused.accepted


# -- cancel and retry ------------------------------------------------------------------


async def test_cancel_pending(store: Any) -> None:
    task_id = await submit(store)
    task = await store.cancel(task_id, NOW + 1)
    assert (task.state, task.finished_at) == (State.CANCELLED, NOW + 1)
    assert await claim(store) == []


async def test_cancel_running_refuses_the_late_result(store: Any) -> None:
    await submit(store)
    lease = await claim_one(store)
    task = await store.cancel(lease.id, NOW + 1)
    assert task.state == State.CANCELLED
    [late] = await store.complete([report(lease)], NOW + 2)
    assert (late.accepted, late.state) == (False, "cancelled")
    assert (await store.get(lease.id)).state == State.CANCELLED


async def test_cancel_terminal_or_unknown(store: Any) -> None:
    await submit(store)
    lease = await claim_one(store)
    await store.complete([report(lease)], NOW)
    with pytest.raises(InvalidTransition, match=lease.id):
        await store.cancel(lease.id, NOW)
    with pytest.raises(NotFound):
        await store.cancel("missing", NOW)


async def test_retry_dead_back_to_pending(store: Any) -> None:
    task_id = await submit(store, max_retries=0)
    lease = await claim_one(store)
    await store.complete([report(lease, "retry", error=TaskError("E", "m"))], NOW)
    task = await store.retry(task_id, NOW + 5)
    assert (task.state, task.attempts, task.run_at, task.finished_at) == (
        State.PENDING,
        0,
        None,
        None,
    )
    assert task.error == TaskError("E", "m")
    assert (await claim_one(store)).attempt == 1
    with pytest.raises(InvalidTransition):
        await store.retry(task_id, NOW)  # running
    with pytest.raises(NotFound):
        await store.retry("missing", NOW)


async def test_retry_cancelled(store: Any) -> None:
    task_id = await submit(store)
    await store.cancel(task_id, NOW)
    assert (await store.retry(task_id, NOW)).state == State.PENDING


async def test_set_priority_reorders_waiting_tasks(store: Any) -> None:
    first = await submit(store, priority=100)
    second = await submit(store, NOW + 1, priority=100)
    task = await store.set_priority(second, 250)
    assert (task.id, task.priority, task.state) == (second, 250, State.PENDING)
    assert [lease.id for lease in await claim(store, n=2)] == [second, first]
    with pytest.raises(InvalidTransition, match="running"):
        await store.set_priority(first, 10)  # running: too late to matter
    with pytest.raises(NotFound):
        await store.set_priority("missing", 10)
    with pytest.raises(InvalidRequest):
        await store.set_priority(second, 256)
    # a failed task waiting for its retry may still be bumped
    third = await submit(store, NOW + 2)
    lease = await claim_one(store)
    assert lease.id == third
    await store.complete([report(lease, "retry", error=TaskError("E", "m"))], NOW + 3)
    assert (await store.set_priority(third, 0)).priority == 0


async def test_complete_reports_queue_and_type(store: Any) -> None:
    await submit(store, type="email", queue="mail")
    lease = await claim_one(store, queues=("mail",))
    [result] = await store.complete([report(lease)], NOW)
    assert (result.accepted, result.queue, result.type) == (True, "mail", "email")


# -- list and stats --------------------------------------------------------------------


async def test_list_filters_and_cursor(store: Any) -> None:
    specs = [TaskSpec(type="ab"[i % 2], queue=["q1", "q2", "q3"][i % 3]) for i in range(25)]
    ids = [r.id for r in await store.submit(specs, NOW)]
    running = {lease.id for lease in await claim(store, queues=("q1",), n=3)}
    pages: list[str] = []
    cursor = None
    while page := await store.list(ListFilter(limit=10, after=cursor)):
        pages += [task.id for task in page]
        cursor = page[-1].id
    assert pages == ids
    by_type = await store.list(ListFilter(type="a"))
    assert [t.id for t in by_type] == ids[::2]
    q2b = await store.list(ListFilter(type="b", queue="q2"))
    assert [t.id for t in q2b] == [i for n, i in enumerate(ids) if n % 2 == 1 and n % 3 == 1]
    assert {t.id for t in await store.list(ListFilter(state="running"))} == running
    after = await store.list(ListFilter(state="pending", queue="q1", after=ids[9], limit=2))
    assert [t.id for t in after] == [ids[12], ids[15]]
    newest: list[str] = []
    cursor = None
    while page := await store.list(ListFilter(limit=7, after=cursor, newest_first=True)):
        newest += [task.id for task in page]
        cursor = page[-1].id
    assert newest == ids[::-1]
    before = await store.list(ListFilter(queue="q1", after=ids[9], limit=2, newest_first=True))
    assert [t.id for t in before] == [ids[6], ids[3]]


@pytest.mark.parametrize(
    ("flt", "match"),
    [
        (ListFilter(limit=0), "limit"),
        (ListFilter(limit=10_001), "limit"),
        (ListFilter(state="sleeping"), "state"),
        (ListFilter(after="not-a-task"), "cursor"),
    ],
)
async def test_list_rejects_bad_filters(store: Any, flt: ListFilter, match: str) -> None:
    with pytest.raises(InvalidRequest, match=match):
        await store.list(flt)


async def test_stats_counts(store: Any) -> None:
    await store.submit([TaskSpec(type="t", queue="q1") for _ in range(3)], NOW)
    await store.submit([TaskSpec(type="t", queue="q2") for _ in range(2)], NOW)
    lease = await claim_one(store, queues=("q1",))
    await store.complete([report(lease)], NOW)
    await claim_one(store, queues=("q2",))
    stats = await store.stats()
    assert stats.counts == {
        "q1": {"pending": 2, "succeeded": 1},
        "q2": {"pending": 1, "running": 1},
    }
    assert stats.size_bytes > 0


# -- group commit ----------------------------------------------------------------------


async def test_group_commit_groups_concurrent_writes(store: Any) -> None:
    results: list[str] = []

    async def one(i: int) -> None:
        results.append(await submit(store, payload=i))

    before = store.commits
    async with trio.open_nursery() as nursery:
        for i in range(200):
            nursery.start_soon(one, i)
    assert len(set(results)) == 200
    assert store.commits - before < 40
    assert len(await store.list(ListFilter(limit=1000))) == 200


async def test_a_failing_operation_does_not_sink_its_batch(store: Any) -> None:
    good: list[str] = []
    errors: list[BaseException] = []

    async def ok(i: int) -> None:
        good.append(await submit(store, payload=i))

    async def failing(call: Any) -> None:
        try:
            await call
        except (PayloadTooLarge, NotFound, InvalidTransition) as exc:
            errors.append(exc)

    before = store.commits
    async with trio.open_nursery() as nursery:
        for i in range(30):
            nursery.start_soon(ok, i)
        bad = [TaskSpec(type="t", payload="first"), TaskSpec(type="t", payload=TOO_BIG)]
        nursery.start_soon(failing, store.submit(bad, NOW))
        nursery.start_soon(failing, store.cancel("missing", NOW))
        for i in range(30, 60):
            nursery.start_soon(ok, i)
    assert sorted(type(e).__name__ for e in errors) == ["NotFound", "PayloadTooLarge"]
    # all 62 calls are queued before the writer next runs: they share one batch
    assert store.commits - before <= 2
    tasks = await store.list(ListFilter(limit=1000))
    assert sorted(t.id for t in tasks) == sorted(good)
    assert len(good) == 60


async def test_closed_store_refuses_calls(backend: str, tmp_path: Path) -> None:
    async with open_backend(backend, tmp_path) as store:
        await submit(store)
        await store.aclose()
        with pytest.raises(Unavailable):
            await submit(store)
        with pytest.raises(Unavailable):
            await store.list(ListFilter())


async def test_data_survives_close_and_reopen(backend: str, tmp_path: Path) -> None:
    async with open_backend(backend, tmp_path) as store:
        first = await submit(store, payload={"keep": b"me"})
        await submit(store)
        lease = await claim_one(store)
        await store.complete([report(lease, result=[1, 2])], NOW)
        expected = await store.list(ListFilter())
    async with open_backend(backend, tmp_path) as store:
        assert await store.list(ListFilter()) == expected
        assert (await store.get(first)).payload == {"keep": b"me"}


# -- API keys and audit (migration 2) --------------------------------------------------


def api_key(key_id: str = "0123456789ab", **fields: Any) -> ApiKey:
    base: dict[str, Any] = {
        "id": key_id,
        "name": "ci",
        "role": "producer",
        "queues": ("a", "b"),
        "created_at": NOW,
        "expires_at": NOW + 3600,
        "revoked_at": None,
        "kdf": "scrypt:n=16384,r=8,p=1",
        "salt": b"s" * 16,
        "hash": b"h" * 32,
    }
    return ApiKey(**{**base, **fields})


async def test_trace_context_travels_from_submit_to_the_lease(store: Any) -> None:
    trace = {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}
    traced = await submit(store, trace=trace)
    keyed = await submit(store, trace={"tracestate": "a=1"}, idempotency_key="k")
    plain = await submit(store)
    assert (await store.get(traced)).trace == trace
    assert (await store.get(plain)).trace is None
    leases = {lease.id: lease for lease in await claim(store)}
    assert leases[traced].trace == trace and leases[plain].trace is None
    assert leases[keyed].trace == {"tracestate": "a=1"}


async def test_rehash_key_replaces_only_a_hash_of_the_named_kdf(store: Any) -> None:
    await store.create_key(api_key(kdf="old"))
    newer = api_key(kdf="new", salt=b"n" * 16, hash=b"N" * 32)
    assert await store.rehash_key(newer, "other") is False
    assert (await store.get_key(newer.id)).kdf == "old"
    assert await store.rehash_key(newer, "old") is True
    stored = await store.get_key(newer.id)
    assert (stored.kdf, stored.salt, stored.hash) == ("new", b"n" * 16, b"N" * 32)
    assert await store.rehash_key(newer, "old") is False  # done once


async def test_keys_round_trip_and_revoke(store: Any) -> None:
    first, second = api_key(), api_key("ba9876543210", queues=None, role="admin", expires_at=None)
    await store.create_key(first)
    await store.create_key(second)
    assert await store.get_key(first.id) == first
    assert await store.list_keys() == [first, second]
    revoked = await store.revoke_key(first.id, NOW + 10)
    assert revoked.revoked_at == NOW + 10 and revoked.state(NOW + 10) == "revoked"
    again = await store.revoke_key(first.id, NOW + 20)  # the first revocation time stays
    assert again.revoked_at == NOW + 10
    assert (await store.get_key(first.id)).revoked_at == NOW + 10
    with pytest.raises(NotFound):
        await store.get_key("ffffffffffff")
    with pytest.raises(NotFound):
        await store.revoke_key("ffffffffffff", NOW)


async def test_audit_is_newest_first_with_a_cursor(store: Any) -> None:
    seqs = [
        await store.record_audit(AuditEntry(NOW + i, "k1", "task.cancel", f"t{i}", {"n": i}))
        for i in range(5)
    ]
    assert seqs == sorted(seqs)
    page = await store.list_audit(limit=2)
    assert [e.target for e in page] == ["t4", "t3"] and page[0].detail == {"n": 4}
    rest = await store.list_audit(limit=10, before=page[-1].seq)
    assert [e.target for e in rest] == ["t2", "t1", "t0"]
    assert rest[0].actor == "k1" and rest[0].action == "task.cancel" and rest[0].at == NOW + 2
    with pytest.raises(InvalidRequest):
        await store.list_audit(limit=0)


# -- operator surface: queue depth, purge, bulk retry, probe --------------------------


async def finish(store: Any, status: str = "ok", now: float = NOW, **fields: Any) -> str:
    """Submit one task and take it to the end ``status`` leads to; its id."""
    task_id = await submit(store, now, **fields)
    lease = await claim_one(store, queues=(fields.get("queue", "default"),), now=now)
    assert lease.id == task_id
    await store.complete([report(lease, status, error=TaskError("E", "m"))], now)
    return task_id


async def test_queue_depth_counts_unfinished_tasks_by_queue_priority_and_state(
    store: Any,
) -> None:
    await store.submit([TaskSpec(type="t", priority=p) for p in (200, 200, 100, 50)], NOW)
    await store.submit([TaskSpec(type="t", queue="mail")], NOW)
    await claim_one(store)  # the first priority-200 task runs
    await finish(store, "ok", queue="q2")  # finished: not in the depth
    await finish(store, "retry", queue="q3", max_retries=1)  # failed, retry due
    rows = [(d.queue, d.priority, d.state, d.count) for d in await store.queue_depth()]
    assert rows == [
        ("default", 50, "pending", 1),
        ("default", 100, "pending", 1),
        ("default", 200, "pending", 1),
        ("default", 200, "running", 1),
        ("mail", 100, "pending", 1),
        ("q3", 100, "failed", 1),
    ]


async def test_ahead_counts_what_a_claim_takes_first_in_the_queue(store: Any) -> None:
    """explain's "waiting behind": higher priority, then older of the same priority,
    pending, same queue only; up to the limit; None once the task is not pending."""
    for _ in range(3):
        await submit(store, priority=200)
    first = await submit(store, priority=100)
    await submit(store, priority=100, queue="other")  # another queue: not ahead
    mine = await submit(store, priority=100)
    await submit(store, priority=100)  # younger: behind it
    await submit(store, priority=50)
    assert await store.ahead(first, 10_000) == (3, 0)
    assert await store.ahead(mine, 10_000) == (3, 1)
    assert await store.ahead(mine, 2) == (2, 1)  # counted up to the limit
    await claim_one(store)  # a priority-200 task starts running: no longer ahead
    assert await store.ahead(mine, 10_000) == (2, 1)
    running = await claim(store, n=10)
    assert mine in {lease.id for lease in running}
    assert await store.ahead(mine, 10_000) is None
    with pytest.raises(NotFound):
        await store.ahead("no-such-task", 10)


async def test_pausing_a_queue_is_stored_and_says_whether_it_changed(store: Any) -> None:
    assert await store.paused_queues() == {}
    assert await store.set_paused("mail", True, NOW) is True
    assert await store.set_paused("mail", True, NOW + 5) is False  # already: keeps its time
    assert await store.set_paused("other", False, NOW) is False  # never paused
    assert await store.set_paused("zzz", True, NOW + 1) is True
    assert await store.paused_queues() == {"mail": NOW, "zzz": NOW + 1}
    assert await store.set_paused("mail", False, NOW + 2) is True
    assert await store.set_paused("mail", False, NOW + 3) is False
    assert await store.paused_queues() == {"zzz": NOW + 1}
    assert await store.set_paused("mail", True, NOW + 4) is True  # paused again: new time
    assert (await store.paused_queues())["mail"] == NOW + 4


def _schedule(cron: str = "0 * * * *", missed: str = "skip", **task: Any) -> Schedule:
    fields = {"name": "hourly", "cron": cron, "timezone": "UTC", "missed": missed}
    return check_schedule(parse_schedule({**fields, "task": {"type": "report", **task}}), NOW)


async def test_a_schedule_fires_each_tick_once_with_its_task(store: Any) -> None:
    stored, created = await store.put_schedule(_schedule(queue="reports", payload={"a": 1}))
    assert created and stored.next_at == NOW + 3600 - NOW % 3600
    assert await store.next_schedule_at() == stored.next_at
    assert await store.fire_schedules(stored.next_at - 1) == []  # not due yet
    [fired] = await store.fire_schedules(stored.next_at + 2)
    assert (fired.schedule, fired.queue, fired.skipped) == ("hourly", "reports", 0)
    [task_id] = fired.task_ids
    task = await store.get(task_id)
    assert (task.type, task.queue, task.payload, task.state) == (
        "report",
        "reports",
        {"a": 1},
        "pending",
    )
    assert task.idempotency_key == f"tq-schedule:hourly:{stored.next_at:.0f}"
    assert await store.fire_schedules(stored.next_at + 3) == []  # the tick is spent
    after = await store.get_schedule("hourly")
    assert (after.next_at, after.last_task, after.fired) == (stored.next_at + 3600, task_id, 1)


async def test_redeclaring_a_schedule_keeps_its_history_and_next_tick(store: Any) -> None:
    first, _ = await store.put_schedule(_schedule())
    await store.fire_schedules(first.next_at + 1)
    again, created = await store.put_schedule(_schedule(payload="new"))
    assert not created and again.task["payload"] == "new"
    assert (again.fired, again.next_at) == (1, first.next_at + 3600)  # same cron: kept
    changed, _ = await store.put_schedule(_schedule("30 * * * *"))
    assert changed.next_at == NOW + 1800 - NOW % 3600 + (3600 if NOW % 3600 >= 1800 else 0)
    assert changed.fired == 1
    assert [s.name for s in await store.list_schedules()] == ["hourly"]
    assert await store.remove_schedule("hourly") is True
    assert await store.remove_schedule("hourly") is False
    with pytest.raises(NotFound, match="no schedule named 'hourly'"):
        await store.get_schedule("hourly")


async def test_a_paused_schedule_does_not_fire_and_resumes_from_now(store: Any) -> None:
    stored, _ = await store.put_schedule(_schedule())
    paused, changed = await store.pause_schedule("hourly", True, NOW + 1)
    assert changed and paused.paused_at == NOW + 1
    assert (await store.pause_schedule("hourly", True, NOW + 2))[1] is False
    assert await store.next_schedule_at() is None
    assert await store.fire_schedules(stored.next_at + 7200) == []
    resumed, changed = await store.pause_schedule("hourly", False, stored.next_at + 7200)
    assert changed and resumed.paused_at is None
    assert resumed.next_at == stored.next_at + 3 * 3600  # ticks while paused are not owed


@pytest.mark.parametrize(
    ("missed", "fired"),
    [("skip", 0), ("once", 1), ("all", 5)],
)
async def test_missed_ticks_across_a_restart_follow_the_policy(
    backend: str, tmp_path: Path, missed: str, fired: int
) -> None:
    async with open_backend(backend, tmp_path) as store:
        stored, _ = await store.put_schedule(_schedule(missed=missed))
    # the broker was down for five ticks; it comes back 30 minutes after the fifth
    back = stored.next_at + 4 * 3600 + 1800
    async with open_backend(backend, tmp_path) as store:
        [result] = await store.fire_schedules(back)
        assert len(result.task_ids) == fired
        assert result.skipped == 5 - fired
        assert (await store.get_schedule("hourly")).next_at == stored.next_at + 5 * 3600
        assert await store.fire_schedules(back + 60) == []


async def test_run_now_submits_once_and_keeps_the_next_tick(store: Any) -> None:
    stored, _ = await store.put_schedule(_schedule())
    ran, task_id = await store.run_schedule("hourly", NOW + 5)
    assert (await store.get(task_id)).type == "report"
    assert (ran.fired, ran.last_task, ran.next_at) == (1, task_id, stored.next_at)
    with pytest.raises(NotFound):
        await store.run_schedule("nope", NOW)


async def test_purge_deletes_old_finished_tasks_in_chunks(store: Any) -> None:
    old = [await finish(store, "ok", NOW + i) for i in range(5)]
    dead = await finish(store, "reject", NOW + 5)
    recent = await finish(store, "ok", NOW + 100)
    waiting = await submit(store, NOW + 101)  # pending: never purged
    day = 86_400.0
    now = NOW + day + 50  # old ones finished more than a day before; recent did not
    assert await store.count_purgeable(["succeeded"], day, now) == 5
    assert await store.purge(["succeeded"], day, now, 3) == 3
    assert await store.purge(["succeeded"], day, now, 3) == 2
    assert await store.purge(["succeeded"], day, now, 3) == 0
    for task_id in old:
        with pytest.raises(NotFound):
            await store.get(task_id)
    assert (await store.get(dead)).state == State.DEAD
    assert (await store.get(recent)).state == State.SUCCEEDED
    assert await store.purge(["dead", "succeeded"], 0, now, 100) == 2
    assert [t.id for t in await store.list(ListFilter())] == [waiting]


async def test_purge_never_lets_a_new_task_list_before_an_older_one(store: Any) -> None:
    """Insertion order stays the listing order across purges: a task submitted after
    a purge lists after every task that is left, and after a cursor taken before."""
    pending = await submit(store, queue="waiting")  # never claimed by finish()
    first = await finish(store, "ok", NOW + 1)
    newest = await finish(store, "ok", NOW + 2)
    deleted = await store.purge(["succeeded"], 0, NOW + 10, 100)
    assert deleted >= 1  # SQLite keeps the newest row back (test_sqlite_purge_keeps_...)
    with pytest.raises(NotFound):
        await store.get(first)
    later = await submit(store, NOW + 11)
    listing = [t.id for t in await store.list(ListFilter())]
    assert listing == [pending, *([newest] if deleted == 1 else []), later]
    assert [t.id for t in await store.list(ListFilter(after=pending))] == listing[1:]


@pytest.mark.parametrize(
    ("states", "match"),
    [([], "at least one"), (["pending"], "only finished"), (["zombie"], "only finished")],
)
async def test_purge_refuses_unfinished_states(store: Any, states: list[str], match: str) -> None:
    with pytest.raises(InvalidRequest, match=match):
        await store.purge(states, 0, NOW, 10)


async def test_retry_many_sends_a_state_back_to_pending(store: Any) -> None:
    dead = [await finish(store, "reject", NOW + i) for i in range(3)]
    failed = await finish(store, "retry", NOW + 3)
    assert set(await store.retry_many("dead", NOW + 5, 2)) == set(dead[:2])  # oldest first
    assert await store.retry_many("dead", NOW + 5, 2) == dead[2:]
    assert await store.retry_many("dead", NOW + 5, 2) == []
    for task_id in dead:
        task = await store.get(task_id)
        assert (task.state, task.attempts, task.finished_at) == (State.PENDING, 0, None)
    assert (await store.get(failed)).state == State.FAILED
    with pytest.raises(InvalidRequest, match="retry takes"):
        await store.retry_many("pending", NOW, 10)
    with pytest.raises(InvalidRequest, match="limit"):
        await store.retry_many("dead", NOW, 0)


async def test_probe_reads_and_reports_the_files(store: Any) -> None:
    probe = await store.probe()
    assert probe.counts == {} and probe.size_bytes > 0


# -- SQLite only -----------------------------------------------------------------------


async def test_sqlite_submit_binds_rows_when_the_payloads_outgrow_one_document() -> None:
    rows = schema.prepare_rows([TaskSpec(type="t", payload="x" * 1000)] * 2000, NOW)
    assert schema.prepared(NOW, rows).document is None  # over DOCUMENT_PAYLOAD_MAX: bound
    assert schema.prepared(NOW, rows[:100]).document is not None


async def test_sqlite_purge_keeps_the_newest_task_so_seq_is_never_reused(tmp_path: Path) -> None:
    """SQLite would hand a deleted newest rowid out again: purge keeps that row."""
    async with open_sqlite_store(tmp_path / "tq.db") as store:
        first = await finish(store, "ok")
        newest = await finish(store, "ok", NOW + 1)
        assert await store.purge(["succeeded"], 0, NOW + 10, 100) == 1
        assert (await store.get(newest)).state == State.SUCCEEDED
        with pytest.raises(NotFound):
            await store.get(first)
        later = await submit(store, NOW + 11)
        page = await store.list(ListFilter(after=newest))
        assert [t.id for t in page] == [later]  # listed after the kept newest row


def sqlite_files(path: Path) -> list[Path]:
    return [p for p in path.parent.iterdir() if p.name.startswith(path.name)]


async def test_sqlite_light_writes_get_their_own_transaction_first(tmp_path: Path) -> None:
    """Batch formation (no writes run: the ops are queued without waking the writer)."""
    async with open_sqlite_store(tmp_path / "tq.db") as store:
        light_a, bulk, light_b, claim64, light_c = ops = [
            sqlite._Op(lambda conn: None, (), weight) for weight in (1, 1000, 1, 64, 1)
        ]
        store._queue.extend(ops)
        assert store._take_batch() == [light_a, light_b, light_c]  # wherever they stood
        late = sqlite._Op(lambda conn: None, (), 1)
        store._queue.append(late)
        assert store._take_batch() == [bulk]  # passed over once: now FIFO (alone: over the cap)
        assert store._take_batch() == [late]  # the next heavy head lets it go first
        assert store._take_batch() == [claim64]
        assert store._take_batch() == []


async def test_sqlite_a_light_write_arriving_just_after_a_heavy_one_goes_first(
    tmp_path: Path,
) -> None:
    ran: list[str] = []

    async def write(name: str, weight: int, delay_rounds: int) -> None:
        for _ in range(delay_rounds):
            await trio.lowlevel.checkpoint()
        await store._write(lambda conn: ran.append(name), weight=weight)

    async with open_sqlite_store(tmp_path / "tq.db") as store:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(write, "bulk", 1000, 0)
            nursery.start_soon(write, "single", 1, 1)  # queued one round later
    assert ran == ["single", "bulk"]


@pytest.mark.parametrize("version", ["3.44.2", "3.9.2", "2.8.17"])
async def test_sqlite_too_old_is_a_clear_config_error(version: str) -> None:
    with pytest.raises(ConfigError, match=rf"SQLite >= 3\.45.*SQLite {version}.*pip install"):
        sqlite._check_sqlite_version(version)


async def test_sqlite_versions_this_code_runs_on() -> None:
    for version in ("3.45.0", "3.54.1", "4.0.0", apsw.sqlite_lib_version()):
        sqlite._check_sqlite_version(version)


async def test_sqlite_close_checkpoints_the_wal(tmp_path: Path) -> None:
    path = tmp_path / "tq.db"
    async with open_sqlite_store(path) as store:
        await store.submit([TaskSpec(type="t") for _ in range(100)], NOW)
        stats = await store.stats()
        assert stats.details["path"] == str(path) and stats.details["wal"] > 0
    assert sqlite_files(path) == [path]  # the WAL was checkpointed and removed
    conn = apsw.Connection(str(path))
    try:
        assert conn.execute("PRAGMA journal_mode").fetchall() == [("wal",)]
        assert conn.execute("SELECT count(*) FROM tasks").fetchall() == [(100,)]
    finally:
        conn.close()


async def test_sqlite_synchronous_setting(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="synchronous"):
        async with open_sqlite_store(tmp_path / "a.db", synchronous="off"):
            pass
    async with open_sqlite_store(tmp_path / "b.db", synchronous="normal") as store:
        assert (await store.stats()).details["synchronous"] == "normal"


@pytest.mark.parametrize("where", ["missing/dir/tq.db", "a-file/tq.db"])
async def test_sqlite_unusable_directory_is_a_store_error(tmp_path: Path, where: str) -> None:
    (tmp_path / "a-file").write_text("not a directory")
    path = tmp_path / where
    with pytest.raises(StoreError, match=str(path.parent)):
        async with open_sqlite_store(path):
            pass


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write to any directory")
async def test_sqlite_unwritable_directory_is_a_store_error(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        with pytest.raises(StoreError, match="not writable"):
            async with open_sqlite_store(locked / "tq.db"):
                pass
    finally:
        locked.chmod(0o755)


async def test_sqlite_unwritable_directory_message(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same check as above, where root (who may write anywhere) runs the suite."""
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access

    def access(path: Any, mode: int) -> bool:
        return False if Path(path) == locked else real_access(path, mode)

    monkeypatch.setattr(sqlite.os, "access", access)
    with pytest.raises(StoreError, match=f"directory {locked} is not writable"):
        async with open_sqlite_store(locked / "tq.db"):
            pass


async def test_sqlite_refuses_a_newer_schema(tmp_path: Path) -> None:
    path = tmp_path / "future.db"
    conn = apsw.Connection(str(path))
    conn.execute(f"PRAGMA user_version = {schema.SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(StoreError, match="Upgrade tq"):
        async with open_sqlite_store(path):
            pass


async def test_sqlite_refuses_a_foreign_database(tmp_path: Path) -> None:
    path = tmp_path / "other.db"
    conn = apsw.Connection(str(path))
    conn.execute("CREATE TABLE accounts (id INTEGER)")
    conn.close()
    with pytest.raises(StoreError, match="did not create"):
        async with open_sqlite_store(path):
            pass


async def test_sqlite_refuses_a_file_that_is_not_a_database(tmp_path: Path) -> None:
    path = tmp_path / "junk.db"
    path.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StoreError, match=str(path)):
        async with open_sqlite_store(path):
            pass


def query_plan(conn: apsw.Connection, statement: str, params: tuple[Any, ...]) -> list[str]:
    rows = conn.execute(f"EXPLAIN QUERY PLAN {statement}", params).fetchall()
    return [str(row[3]) for row in rows]


@pytest.mark.parametrize(
    ("statement", "params", "index"),
    [
        (schema.CLAIM_PICK, ("default", 10), "COVERING INDEX tasks_claim (queue=?)"),
        (schema.CLAIM_PICK_TYPE, ("q", "t", 10), "COVERING INDEX tasks_claim_type (queue=? AND"),
        (schema.CLAIM_TAKE, ("running", 0, "w", 1, "[[1, 2]]"), "PRIMARY KEY (rowid=?)"),
        (schema.EXPIRED_LEASES, (NOW,), "INDEX tasks_lease (lease_expires_at<?)"),
        # a worker's leases: a walk over the running tasks only (the partial index)
        (schema.WORKER_LEASES, ("w",), "SCAN tasks USING INDEX tasks_lease"),
        (schema.PROMOTE_DUE, ("pending", NOW, 250), "INDEX tasks_due (run_at<?)"),
        (schema.NEXT_DUE, (), "INDEX tasks_due (run_at>?)"),
        (schema.list_query(True, False, True, True), ("p", "q", 1, 10), "tasks_state (state=?"),
    ],
)
async def test_sqlite_hot_queries_use_their_indexes(
    tmp_path: Path, statement: str, params: tuple[Any, ...], index: str
) -> None:
    path = tmp_path / "tq.db"
    async with open_sqlite_store(path) as store:
        await store.submit([TaskSpec(type="t", queue=f"q{i % 7}") for i in range(500)], NOW)
    conn = apsw.Connection(str(path))
    try:
        plan = query_plan(conn, statement, params)
    finally:
        conn.close()
    assert any(index in step for step in plan), plan
    assert "SCAN tasks" not in plan, plan  # a full table scan
    assert not any("TEMP B-TREE" in step for step in plan), plan  # a sort


async def test_sqlite_store_exposes_its_commit_counter(tmp_path: Path) -> None:
    async with open_sqlite_store(tmp_path / "tq.db") as store:
        assert isinstance(store, SQLiteStore)
        before = store.commits
        await submit(store)
        assert store.commits == before + 1


async def test_sqlite_an_exception_in_the_body_closes_the_store_and_propagates(
    tmp_path: Path,
) -> None:
    path = tmp_path / "tq.db"
    with pytest.raises(ZeroDivisionError):  # not wrapped in an ExceptionGroup
        async with open_sqlite_store(path) as store:
            await submit(store)
            1 / 0  # noqa: B018
    assert sqlite_files(path) == [path]
    with pytest.raises(Unavailable):
        await submit(store)


async def wait_for(condition: Any, seconds: float = 5.0) -> None:
    with trio.fail_after(seconds):
        while not condition():
            await trio.sleep(0.01)


async def test_sqlite_checkpointer_empties_the_wal_when_idle(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sqlite, "CHECKPOINT_INTERVAL", 0.02)
    async with open_sqlite_store(tmp_path / "tq.db") as store:
        await store.submit([TaskSpec(type="t") for _ in range(100)], NOW)
        await wait_for(lambda: store.checkpoints["TRUNCATE"] >= 1)
        assert store.checkpoints["PASSIVE"] >= 1
        stats = await store.stats()
        assert stats.details["wal"] == 0
        assert stats.details["checkpoints"]["TRUNCATE"] >= 1


async def test_sqlite_checkpointer_restarts_a_long_wal_under_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sqlite, "CHECKPOINT_INTERVAL", 60.0)  # only "many commits" triggers
    monkeypatch.setattr(sqlite, "CHECKPOINT_AFTER_COMMITS", 2)
    monkeypatch.setattr(sqlite, "WAL_RESTART_FRAMES", 1)
    async with open_sqlite_store(tmp_path / "tq.db") as store:
        with trio.fail_after(5):
            while store.checkpoints["RESTART"] == 0:
                await submit(store)
        assert store.checkpoints["PASSIVE"] >= 1
        assert len(await store.list(ListFilter(limit=10_000))) == store.commits


async def test_sqlite_a_write_cancelled_before_it_runs_is_dropped(tmp_path: Path) -> None:
    async with open_sqlite_store(tmp_path / "tq.db") as store:
        doomed = trio.CancelScope()

        async def submit_doomed() -> None:
            with doomed:
                await submit(store, payload="doomed")

        await store._write_limiter.acquire()  # the writer cannot run a batch meanwhile
        async with trio.open_nursery() as nursery:
            nursery.start_soon(partial(submit, store, payload="kept"))
            await trio.testing.wait_all_tasks_blocked()  # "kept" is taken, its batch waits
            nursery.start_soon(submit_doomed)
            await trio.testing.wait_all_tasks_blocked()  # "doomed" is queued
            doomed.cancel()
            await trio.testing.wait_all_tasks_blocked()
            store._write_limiter.release()
        assert doomed.cancelled_caught
        await submit(store, payload="after")  # writes run in order: the queue is drained
        assert [t.payload for t in await store.list(ListFilter())] == ["kept", "after"]


async def test_sqlite_an_operation_failing_after_writing_rolls_back_only_itself(
    tmp_path: Path,
) -> None:
    def insert_then_fail(conn: apsw.Connection) -> None:
        schema.submit(conn, [TaskSpec(type="t", payload="partial")], NOW)
        raise RuntimeError("boom")

    async def failing() -> None:
        with pytest.raises(RuntimeError, match="boom"):
            await store._write(insert_then_fail)

    async with open_sqlite_store(tmp_path / "tq.db") as store:
        before = store.commits
        async with trio.open_nursery() as nursery:
            for i in range(10):
                nursery.start_soon(partial(submit, store, payload=i))
            nursery.start_soon(failing)
            for i in range(10, 20):
                nursery.start_soon(partial(submit, store, payload=i))
        assert store.commits - before <= 2  # one batch (two if the writer was busy)
        payloads = sorted(t.payload for t in await store.list(ListFilter()))
        assert payloads == list(range(20))


async def test_sqlite_disk_full_is_a_store_error_and_the_store_recovers(tmp_path: Path) -> None:
    async with open_sqlite_store(tmp_path / "tq.db") as store:
        await submit(store)

        def max_pages(pages: int | None) -> None:
            conn = store._writer
            if pages is None:
                pages = conn.execute("PRAGMA page_count").fetchall()[0][0]
            conn.execute(f"PRAGMA max_page_count = {pages}").fetchall()

        await trio.to_thread.run_sync(max_pages, None, limiter=store._write_limiter)
        big = [TaskSpec(type="t", payload="x" * 5000) for _ in range(100)]
        with pytest.raises(StoreError, match="disk is full"):
            await store.submit(big, NOW)
        await trio.to_thread.run_sync(max_pages, 2**30, limiter=store._write_limiter)
        await store.submit(big, NOW)
        assert len(await store.list(ListFilter(limit=1000))) == 101


async def test_sqlite_batches_that_change_nothing_do_not_wake_the_checkpointer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sqlite, "CHECKPOINT_INTERVAL", 0.01)
    async with open_sqlite_store(tmp_path / "tq.db") as store:
        for _ in range(5):  # what a broker's timers do all day long
            assert await store.release_expired(NOW) == []
            assert await store.promote_due(NOW) == 0
            await trio.sleep(0.01)
        await trio.sleep(0.05)
        assert sum(store.checkpoints.values()) == 0


async def test_release_outcome_gives_the_lease_back_uncounted(store: Any) -> None:
    task_id = await submit(store, max_retries=0)
    lease = await claim_one(store, now=NOW)
    [result] = await store.complete([Outcome(lease.id, lease.token, "release")], NOW + 1)
    assert result.accepted and result.state == "pending"
    task = await store.get(task_id)
    assert (task.state, task.attempts, task.started_at, task.error) == (
        State.PENDING,
        0,
        None,
        None,
    )
    [stale] = await store.complete([Outcome(lease.id, lease.token, "ok")], NOW + 2)
    assert not stale.accepted
    again = await claim_one(store, now=NOW + 3)
    assert (again.id, again.attempt) == (task_id, 1)
