"""Delayed tasks: due times as people write them, stored ``scheduled`` on both stores,
never claimed early, pending when due; the promoter on trio's fake clock."""

# ruff: noqa: F811  (the store fixtures come from tests/test_store.py)
from __future__ import annotations

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
    store,
)
from tq.broker.loops import promoter_loop
from tq.broker.service import BrokerService
from tq.core.errors import InvalidRequest, InvalidTransition
from tq.core.states import State
from tq.core.task import ListFilter, TaskSpec
from tq.core.when import MAX_DELAY, due_at, parse_duration, parse_time
from tq.store.postgres import open_postgres_store
from tq.store.sqlite import open_sqlite_store

# -- tq.core.when ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30s", 30), ("5m", 300), ("2h", 7200), ("1d", 86400), ("1w", 604800), ("1h30m", 5400),
     ("90", 90), ("0.5s", 0.5), (" 2H ", 7200)],
)  # fmt: skip
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "s", "5 m", "-5s", "1y", "3650000d", "nan", "1e9", "5mm"])
def test_bad_durations_name_the_text(text: str) -> None:
    with pytest.raises(InvalidRequest, match="duration"):
        parse_duration(text)


def test_rfc3339_times_need_a_zone() -> None:
    assert parse_time("2026-12-01T09:00:00Z") == 1796115600.0
    assert parse_time("2026-12-01T10:00:00+01:00") == 1796115600.0
    assert parse_time("2026-12-01t09:00:00.250z") == 1796115600.25
    with pytest.raises(InvalidRequest, match=r"has no zone: add one, e\.g\. 2026-12-01T09:00:00Z"):
        parse_time("2026-12-01T09:00:00")
    with pytest.raises(InvalidRequest, match="no time of day"):
        parse_time("2026-12-01")
    for bad in ("tomorrow", "2026-13-01T09:00:00Z", "2026-12-01T09:00Z"):
        with pytest.raises(InvalidRequest, match="time"):
            parse_time(bad)


def test_due_at_is_the_later_of_delay_and_run_at_and_bounded() -> None:
    assert due_at(None, None, NOW) is None
    assert due_at(10, None, NOW) == NOW + 10
    assert due_at(10, NOW + 100, NOW) == NOW + 100
    assert due_at(100, NOW + 10, NOW) == NOW + 100
    assert due_at(0, None, NOW) is None  # due now: pending at once
    assert due_at(None, NOW - 5, NOW) is None  # a time just passed: pending at once
    assert due_at(None, NOW + MAX_DELAY, NOW) == NOW + MAX_DELAY
    with pytest.raises(InvalidRequest, match="at most 10 years"):
        due_at(None, NOW + MAX_DELAY + 1, NOW)


@pytest.mark.parametrize(
    ("fields", "said"),
    [
        ({"delay": -1}, "delay must be a finite number of seconds"),
        ({"delay": float("nan")}, "delay must be a finite number"),
        ({"delay": float("inf")}, "delay must be a finite number"),
        ({"delay": True}, "delay must be a finite number"),
        ({"delay": "30s"}, "delay must be a finite number"),
        ({"delay": MAX_DELAY + 1}, "delay must be a finite number"),
        ({"run_at": -1}, "run_at must be finite epoch seconds"),
        ({"run_at": 1e300}, "run_at must be finite epoch seconds"),
        ({"run_at": "2026-12-01T09:00:00Z"}, "run_at must be finite epoch seconds"),
        ({"run_at": NOW, "depends_on": ["x"]}, "cannot also have a delay or run_at"),
    ],
)
def test_bad_due_fields_are_refused(fields: dict[str, Any], said: str) -> None:
    with pytest.raises(InvalidRequest, match=said):
        TaskSpec.from_mapping({"type": "t", **fields})


# -- the stores ------------------------------------------------------------------------------


def spec(**fields: Any) -> TaskSpec:
    return TaskSpec.from_mapping({"type": "t", **fields})


@pytest.mark.trio
async def test_a_delayed_task_is_scheduled_and_never_claimed_early(store: Any) -> None:
    [late, now_, soon] = await store.submit(
        [spec(delay=60), spec(payload=1), spec(run_at=NOW + 5)], NOW
    )
    task = await store.get(late.id)
    assert task.state is State.SCHEDULED and task.run_at == NOW + 60
    assert (await store.get(soon.id)).run_at == NOW + 5
    assert await store.next_due() == NOW + 5
    # only the undelayed one is claimable, even asked for at a later time
    assert [lease.id for lease in await claim(store, now=NOW + 59)] == [now_.id]
    assert await store.promote_due(NOW + 4.9) == 0
    assert await store.promote_due(NOW + 5) == 1
    assert [lease.id for lease in await claim(store, now=NOW + 5)] == [soon.id]
    assert await claim(store, now=NOW + 59) == []
    assert await store.promote_due(NOW + 60) == 1
    assert [lease.id for lease in await claim(store, now=NOW + 60)] == [late.id]
    assert await store.next_due() is None


@pytest.mark.trio
async def test_scheduled_tasks_are_listed_and_cancelled(store: Any) -> None:
    results = await store.submit([spec(delay=d) for d in (30, 10, 20)], NOW)
    listed = await store.list(ListFilter(state="scheduled"))
    assert sorted(t.run_at for t in listed) == [NOW + 10, NOW + 20, NOW + 30]
    cancelled = await store.cancel(results[1].id, NOW + 1)
    assert cancelled.state is State.CANCELLED
    assert await store.next_due() == NOW + 20
    assert await store.promote_due(NOW + 100) == 2
    with pytest.raises(InvalidTransition):
        await store.cancel(results[1].id, NOW + 2)


@pytest.mark.trio
async def test_a_due_time_already_passed_is_pending_and_keys_keep_the_first(store: Any) -> None:
    [past] = await store.submit([spec(run_at=NOW - 10)], NOW)
    assert (await store.get(past.id)).state is State.PENDING
    [first] = await store.submit([spec(delay=50, idempotency_key="k")], NOW)
    [again] = await store.submit([spec(delay=5, idempotency_key="k")], NOW)
    assert again.id == first.id and not again.created
    assert (await store.get(first.id)).run_at == NOW + 50  # the repeat changed nothing


# -- the promoter, on trio's fake clock ------------------------------------------------------


@pytest.mark.trio
async def test_the_promoter_sleeps_to_the_due_time_and_is_woken_by_an_earlier_one(
    tmp_path: Path, mock_clock: trio.testing.MockClock
) -> None:
    """A 60-second fake clock rate (autojump would leap over the store's thread)."""
    mock_clock.rate = 60
    async with open_sqlite_store(tmp_path / "tq.db") as store:
        service = BrokerService(store, lease_ttl=30, clock=lambda: NOW + trio.current_time())
        reads = 0
        next_due = store.next_due

        async def counted() -> float | None:
            nonlocal reads
            reads += 1
            return await next_due()

        store.next_due = counted  # type: ignore[method-assign]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(promoter_loop, service)
            answer = await service.submit([{"type": "t", "delay": 600}])
            late = answer["tasks"][0]["id"]
            await trio.sleep(300)
            # 5 minutes in, asleep until the due time (woken at most every 60 s): a
            # handful of reads, not one a second
            assert reads <= 2 + 300 // 60, reads
            assert (await store.get(late)).state is State.SCHEDULED
            # an earlier due time wakes it
            answer = await service.submit([{"type": "t", "delay": 30}])
            early = answer["tasks"][0]["id"]
            while (await store.get(early)).state is not State.PENDING:
                await trio.sleep(0.5)
            due = (await store.get(early)).run_at
            assert due is not None and 0 <= NOW + trio.current_time() - due < 5
            assert (await store.get(late)).state is State.SCHEDULED
            while (await store.get(late)).state is not State.PENDING:
                await trio.sleep(0.5)
            promoted_at = NOW + trio.current_time()
            due = (await store.get(late)).run_at
            assert due is not None and 0 <= promoted_at - due < 5
            nursery.cancel_scope.cancel()


@pytest.mark.trio
async def test_service_refuses_a_due_time_too_far_ahead(tmp_path: Path) -> None:
    async with open_sqlite_store(tmp_path / "tq.db") as store:
        service = BrokerService(store, lease_ttl=30, clock=lambda: NOW)
        with pytest.raises(InvalidRequest, match=r"task 1: .*at most 10 years; .*nothing was"):
            await service.submit([{"type": "t"}, {"type": "t", "run_at": NOW + MAX_DELAY + 60}])
        assert await store.list(ListFilter()) == []


# -- the due and retention queries read their indexes, whatever the backlog ------------------


@pytest.mark.trio
async def test_sqlite_due_and_retention_queries_use_their_indexes(tmp_path: Path) -> None:
    import apsw

    from tq.store import retention_sql, schema

    async with open_sqlite_store(tmp_path / "tq.db") as opened:
        await opened.submit([spec(delay=60 + i) for i in range(2000)], NOW)
    conn = apsw.Connection(str(tmp_path / "tq.db"))
    conn.execute("ANALYZE").fetchall()

    def plan(statement: str, params: tuple[Any, ...]) -> str:
        rows = conn.execute(f"EXPLAIN QUERY PLAN {statement}", params).fetchall()
        return "\n".join(str(row[-1]) for row in rows)

    assert "INDEX tasks_due" in plan(schema.NEXT_DUE, ())
    text = plan(schema.PROMOTE_DUE, ("pending", NOW))
    assert "INDEX tasks_due" in text and "SCAN" not in text, text
    pick = plan(retention_sql._PICK_SQLITE, ("q", "succeeded", NOW, "blocked", 500))
    assert "INDEX tasks_finished (queue=? AND state=? AND finished_at<?)" in pick, pick
    conn.close()


@pytest.mark.trio
async def test_postgres_due_and_retention_queries_use_their_indexes(pg_url: str) -> None:
    import psycopg

    from tq.store import pg_schema, retention_sql

    async with open_postgres_store(pg_url) as opened:
        for start in range(0, 20_000, 5000):
            await opened.submit([spec(delay=60 + start + i) for i in range(5000)], NOW)
        await opened.submit([spec() for _ in range(2000)], NOW)
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("ANALYZE tasks")

        def plan(statement: str, params: tuple[Any, ...]) -> str:
            rows = conn.execute(f"EXPLAIN {statement}", params).fetchall()
            return "\n".join(row[0] for row in rows)

        for text in (
            plan(pg_schema.NEXT_DUE, ()),
            plan(pg_schema.PROMOTE_DUE, ("pending", NOW)),
            plan(
                retention_sql._PICK_PG.replace("?", "%s"),
                ("q", "succeeded", NOW, "blocked", 500),
            ),
        ):
            assert "Seq Scan on tasks" not in text and "Index" in text, text
        assert "tasks_due" in plan(pg_schema.NEXT_DUE, ())


@pytest.mark.trio
async def test_a_unique_delayed_task_waits_scheduled_and_its_history_says_so(store: Any) -> None:
    # a unique submit takes its own write path: the due time must still hold there
    [first] = await store.submit([spec(delay=30, unique_for=3600, payload="u")], NOW, actor="key:a")
    [again] = await store.submit([spec(delay=5, unique_for=3600, payload="u")], NOW + 1)
    assert again.id == first.id and first.created and not again.created
    task = await store.get(first.id)
    assert task.state is State.SCHEDULED and task.run_at == NOW + 30
    assert await claim(store, now=NOW + 29) == []
    assert await store.promote_due(NOW + 30) == 1
    [lease] = await claim(store, now=NOW + 30)
    assert lease.id == first.id
    # stored and scheduled in one transaction: two rows at the submit, then the promotion
    rows = [(row.event, row.state, row.actor) for row in await store.history(first.id)]
    assert rows[:2] == [("submitted", "pending", "key:a"), ("scheduled", "scheduled", "key:a")]
    assert [(event, state) for event, state, _ in rows[2:]] == [
        ("promoted", "pending"),
        ("leased", "running"),
    ]
