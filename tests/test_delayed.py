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
from tq.core.task import ListFilter, Outcome, TaskError, TaskSpec
from tq.core.when import MAX_DELAY, due_at, format_duration, parse_duration, parse_time
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


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(604800, "7d"), (2592000, "30d"), (5400, "1h30m"), (90.5, "1m30.5s"), (0, "0s"), (45, "45s"),
     (86400 + 1, "1d1s")],
)  # fmt: skip
def test_durations_are_shown_as_written_and_read_back(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text
    assert parse_duration(text) == seconds


def test_the_settings_table_shows_retention_as_durations() -> None:
    from tq.cli.settings_table import markdown

    rows = {line.split("|")[1].strip(): line.split("|") for line in markdown().splitlines()[4:-2]}
    assert rows["`retention_succeeded`"][4].strip() == "7d"
    assert rows["`retention_dead`"][4].strip() == "30d"


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


@pytest.mark.trio
async def test_promotion_is_bounded_per_transaction_earliest_first(store: Any) -> None:
    results = await store.submit([spec(delay=70 - i) for i in range(7)], NOW)
    by_due = sorted(results, key=lambda r: 70 - results.index(r))
    assert await store.promote_due(NOW + 100, 3) == 3
    pending = {t.id for t in await store.list(ListFilter(state="pending"))}
    assert pending == {r.id for r in by_due[:3]}  # the three due first
    assert await store.promote_due(NOW + 100, 3) == 3
    assert await store.promote_due(NOW + 100, 3) == 1
    assert await store.promote_due(NOW + 100, 3) == 0
    assert await store.promote_due(NOW + 100, 0) == 0
    assert len(await store.list(ListFilter(state="pending"))) == 7


@pytest.mark.trio
async def test_the_service_promotes_batch_after_batch_until_none_is_due(store: Any) -> None:
    await store.submit([spec(delay=10 + i) for i in range(7)] + [spec(delay=500)], NOW)
    service = BrokerService(store, lease_ttl=30, clock=lambda: NOW + 100)
    calls: list[int] = []
    promote_due = store.promote_due

    async def counted(now: float, limit: int) -> int:
        calls.append(count := await promote_due(now, limit))
        return count

    store.promote_due = counted
    woken = 0

    def wake() -> None:
        nonlocal woken
        woken += 1

    service.notify_work = wake  # type: ignore[method-assign]
    assert await service.promote(batch=3) == 7
    assert calls == [3, 3, 1]  # three transactions, the last one short
    assert woken == 3  # workers woken after each batch, not once at the end
    [left] = await store.list(ListFilter(state="scheduled"))
    assert left.run_at == NOW + 500


async def _depth_truth(store: Any) -> list[tuple[str, int, str, int]]:
    """Unfinished tasks per (queue, priority, state), counted from the listing itself."""
    found: dict[tuple[str, int, str], int] = {}
    for state in ("pending", "scheduled", "blocked", "running", "failed"):
        for task in await store.list(ListFilter(state=state, limit=1000)):
            key = (task.queue, task.priority, state)
            found[key] = found.get(key, 0) + 1
    return sorted((*key, n) for key, n in found.items())


@pytest.mark.trio
async def test_scheduled_and_failed_counts_follow_every_change(store: Any) -> None:
    """Stats and queue depth read failed/scheduled from counters the triggers keep: they
    agree with the rows after submits, cancels, reprioritising, promotion, retries."""
    results = await store.submit(
        [spec(delay=10 * (i + 1), queue=f"q{i % 3}", priority=100 + i % 2) for i in range(12)]
        + [spec(queue="q0", max_retries=2, retry_base=5)],
        NOW,
    )
    assert await _depth_truth(store) == [
        (d.queue, d.priority, d.state, d.count) for d in await store.queue_depth()
    ]
    await store.cancel(results[0].id, NOW + 1)
    await store.set_priority(results[1].id, 7)
    [lease] = await claim(store, queues=("q0",), now=NOW + 1)
    await store.complete(
        [Outcome(lease.id, lease.token, "retry", error=TaskError("E", "m"))], NOW + 1
    )
    assert (await store.get(lease.id)).state is State.FAILED
    assert await store.promote_due(NOW + 35, 2) == 2
    rows = [(d.queue, d.priority, d.state, d.count) for d in await store.queue_depth()]
    assert rows == await _depth_truth(store)
    assert ("q0", 100, "failed", 1) not in rows  # the retry was due first: promoted
    counts = (await store.stats()).counts
    assert counts["q1"]["scheduled"] + counts["q2"]["scheduled"] + counts["q0"]["scheduled"] == 10
    assert counts["q0"]["cancelled"] == 1
    assert await store.promote_due(NOW + 1000, 100) == 10
    assert [d for d in await store.queue_depth() if d.state in ("scheduled", "failed")] == []


@pytest.mark.trio
async def test_the_counts_migration_counts_the_tasks_already_stored(tmp_path: Path) -> None:
    import apsw

    from tq.store import schema

    async with open_sqlite_store(tmp_path / "tq.db") as opened:
        await opened.submit([spec(delay=60, priority=p) for p in (1, 1, 2)], NOW)
    conn = apsw.Connection(str(tmp_path / "tq.db"))  # back to the schema before the counts
    for trigger in ("insert", "leave", "enter", "delete"):
        conn.execute(f"DROP TRIGGER tasks_due_{trigger}")
    conn.execute("DROP TABLE due_counts")
    conn.execute("ALTER TABLE tasks DROP COLUMN dep_delay")
    conn.execute("DROP INDEX task_unique_task")
    conn.execute(f"PRAGMA user_version = {schema.SCHEMA_VERSION - 1}")
    conn.close()
    async with open_sqlite_store(tmp_path / "tq.db") as opened:
        depth = [(d.priority, d.state, d.count) for d in await opened.queue_depth()]
        assert depth == [(1, "scheduled", 2), (2, "scheduled", 1)]


# -- a delay on a task with dependencies (a workflow step): counted from its release ------


async def _run_one(store: Any, queue: str, now: float, result: Any = None) -> str:
    [lease] = await store.claim("w1", (queue,), None, 1, now, 30)
    await store.complete([Outcome(lease.id, lease.token, "ok", result=result)], now)
    return str(lease.id)


@pytest.mark.trio
async def test_a_dependent_with_a_delay_is_scheduled_when_released(store: Any) -> None:
    [first] = await store.submit([spec(queue="a")], NOW)
    [later] = await store.submit(
        [spec(queue="b", depends_on=[first.id], delay=30, input="result", payload={"k": 1})], NOW
    )
    assert (await store.get(later.id)).state is State.BLOCKED
    assert await store.next_due() is None  # blocked: not in the due index yet
    await _run_one(store, "a", NOW + 5, result=7)
    task = await store.get(later.id)
    assert task.state is State.SCHEDULED and task.run_at == NOW + 35  # from the release
    assert task.payload == {"k": 1, "input": 7}  # its input is filled in at the release
    rows = [(r.event, r.state, r.actor, r.run_at) for r in await store.history(later.id)]
    assert rows[-1] == ("scheduled", "scheduled", f"dependency:{first.id}", NOW + 35)
    assert await store.next_due() == NOW + 35
    assert await claim(store, queues=("b",), now=NOW + 34) == []
    assert await store.promote_due(NOW + 34.9) == 0
    assert await store.promote_due(NOW + 35) == 1
    assert [lease.id for lease in await claim(store, queues=("b",), now=NOW + 35)] == [later.id]


@pytest.mark.trio
async def test_a_dependent_with_run_at_waits_for_it_unless_it_passed(store: Any) -> None:
    a, b = await store.submit([spec(queue="a"), spec(queue="a")], NOW)
    [late, early] = await store.submit(
        [
            spec(queue="b", depends_on=[a.id], run_at=NOW + 100),
            spec(queue="b", depends_on=[b.id], run_at=NOW + 10, delay=1),
        ],
        NOW,
    )
    await _run_one(store, "a", NOW + 5)  # a: late still has 95 s to wait
    task = await store.get(late.id)
    assert task.state is State.SCHEDULED and task.run_at == NOW + 100
    await _run_one(store, "a", NOW + 20)  # b, after early's run_at and its delay: 1 s more
    task = await store.get(early.id)
    assert task.state is State.SCHEDULED and task.run_at == NOW + 21
    # dependencies already met at submit: the delay counts from the submit
    [done] = await store.submit([spec(queue="c", depends_on=[a.id], delay=50)], NOW + 30)
    task = await store.get(done.id)
    assert task.state is State.SCHEDULED and task.run_at == NOW + 80
    # without a due time of its own, a released dependent is pending at once, run_at empty
    [plain] = await store.submit([spec(queue="c", depends_on=[a.id])], NOW + 30)
    task = await store.get(plain.id)
    assert task.state is State.PENDING and task.run_at is None


@pytest.mark.trio
async def test_a_workflow_step_with_a_delay_runs_that_long_after_the_step_before(
    tmp_path: Path, mock_clock: trio.testing.MockClock
) -> None:
    """A chain [a, b with delay 120] through the service and the promoter: b becomes
    pending 120 s after a succeeded (the promoter is woken by the report)."""
    from tq.core.workflow import compile_workflow

    mock_clock.rate = 60
    async with open_sqlite_store(tmp_path / "tq.db") as store:
        service = BrokerService(store, lease_ttl=30, clock=lambda: NOW + trio.current_time())
        async with trio.open_nursery() as nursery:
            nursery.start_soon(promoter_loop, service)
            tasks = compile_workflow({"chain": [{"type": "a"}, {"type": "b", "delay": 120}]})
            answer = await service.submit(tasks)
            first, step = (t["id"] for t in answer["tasks"])
            await trio.sleep(600)  # long after any delay counted from the submit
            assert (await store.get(step)).state is State.BLOCKED
            [lease] = await store.claim("w", ("default",), ["a"], 1, service.clock(), 30)
            await service.report(None, [{"id": first, "token": lease.token, "status": "ok"}])
            done_at = (await store.get(first)).finished_at
            task = await store.get(step)
            assert task.state is State.SCHEDULED and done_at is not None
            assert task.run_at == done_at + 120
            while (await store.get(step)).state is not State.PENDING:
                await trio.sleep(0.5)
            assert 0 <= NOW + trio.current_time() - (done_at + 120) < 5
            nursery.cancel_scope.cancel()


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
    text = plan(schema.PROMOTE_DUE, ("pending", NOW, 250))
    assert "INDEX tasks_due" in text and "SCAN" not in text, text
    # a delayed submit finds each of its rows by id: never a walk of the table per row
    from tq.store.deps_sql import _SCHEDULE_SQLITE

    text = plan(_SCHEDULE_SQLITE, ("scheduled", NOW, "x", "pending"))
    assert "SCAN" not in text and "INDEX" in text, text
    # stats, queue depth and metrics never walk the scheduled backlog
    from tq.store.schema_ops import DEPTH_STATEMENTS

    for statement in DEPTH_STATEMENTS:
        assert "tasks_due" not in plan(statement, ()), statement
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
            plan(pg_schema.PROMOTE_DUE, ("pending", NOW, 250)),
            plan(
                retention_sql._PICK_PG.replace("?", "%s"),
                ("q", "succeeded", NOW, "blocked", 500),
            ),
        ):
            assert "Seq Scan on tasks" not in text and "Index" in text, text
        assert "tasks_due" in plan(pg_schema.NEXT_DUE, ())
        from tq.store.pg_ops import DEPTH_STATEMENTS

        for statement in DEPTH_STATEMENTS:  # never a walk of the scheduled backlog
            assert "tasks_due" not in plan(statement, ()), statement


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
