"""Concurrent plain submits that share a SQLite transaction are inserted by one
statement (``schema.insert_grouped``): each keeps its own ids, ``created_at``,
history actor and order, and a submit that fails inside a group fails alone (the
group is undone and its submits run one by one)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import apsw
import pytest
import trio
import trio.testing

from tq.core.errors import StoreError
from tq.core.task import TaskSpec
from tq.store import schema
from tq.store.sqlite import SQLiteStore, open_sqlite_store

NOW = 1_800_000_000.0


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SQLiteStore]:
    async with open_sqlite_store(tmp_path / "tq.db") as opened:
        yield opened


def _column(store: SQLiteStore, sql: str) -> list[object]:
    """The first column of a query, read by another connection to the file."""
    conn = apsw.Connection(store.path, flags=apsw.SQLITE_OPEN_READONLY)
    try:
        return [row[0] for row in conn.execute(sql)]
    finally:
        conn.close()


async def _in_one_batch(
    store: SQLiteStore, calls: list[Callable[[], Awaitable[None]]]
) -> list[str]:
    """Run ``calls`` so that all but the first queue behind it and then share the
    writer's next transaction (the first commits alone, in its own thread hop); the
    ids of the first row of each queued submit, in the queue's order."""
    turn = object()
    await store._write_limiter.acquire_on_behalf_of(turn)  # a transaction is running
    async with trio.open_nursery() as nursery:
        nursery.start_soon(calls[0])
        await trio.testing.wait_all_tasks_blocked()
        for call in calls[1:]:
            nursery.start_soon(call)
        await trio.testing.wait_all_tasks_blocked()
        assert len(store._queue) == len(calls) - 1
        queued = [op.args[0].rows[0][0] for op in store._queue]
        store._write_limiter.release_on_behalf_of(turn)
    return queued


@pytest.mark.trio
async def test_concurrent_single_submits_share_one_statement(store: SQLiteStore) -> None:
    ids: dict[int, str] = {}

    def one(i: int) -> Callable[[], Awaitable[None]]:
        async def call() -> None:
            spec = TaskSpec(type="t", payload={"i": i})
            [result] = await store.submit([spec], NOW + i / 1000, actor="key1")
            ids[i] = result.id

        return call

    commits, grouped = store.commits, store.grouped_ops
    queued = await _in_one_batch(store, [one(i) for i in range(50)])
    assert store.commits == commits + 2, "the lone write, then one transaction of 49"
    assert store.grouped_ops == grouped + 49, "the 49 inserted by one statement"
    for i, task_id in ids.items():
        task = await store.get(task_id)
        assert task.payload == {"i": i}
        assert task.created_at == NOW + i / 1000, "each submit's own time"
        [created] = await store.history(task_id)
        assert (created.event, created.actor, created.at) == ("submitted", "key1", NOW + i / 1000)
    in_order = _column(store, "SELECT id FROM tasks ORDER BY seq")
    assert in_order[1:] == queued, "inserted in the order they were queued"


@pytest.mark.trio
async def test_submits_of_several_actors_keep_their_actor(store: SQLiteStore) -> None:
    ids: dict[str, str] = {}

    def one(actor: str) -> Callable[[], Awaitable[None]]:
        async def call() -> None:
            [result] = await store.submit([TaskSpec(type="t")], NOW, actor=actor)
            ids[actor] = result.id

        return call

    await _in_one_batch(store, [one(a) for a in ["a0", "a1", "a2", "a3", "a3", "a4"]])
    for actor, task_id in ids.items():
        [created] = await store.history(task_id)
        assert created.actor == actor


@pytest.mark.trio
async def test_a_failing_submit_in_a_group_fails_alone(store: SQLiteStore) -> None:
    taken = (await store.submit([TaskSpec(type="t")], NOW))[0].id
    good: list[str] = []
    errors: list[BaseException] = []

    async def ok() -> None:
        good.append((await store.submit([TaskSpec(type="t")], NOW))[0].id)

    async def duplicate() -> None:
        prepared = schema.prepare_submit([TaskSpec(type="t")], NOW)
        prepared.rows[0][0] = taken  # an id that exists: the insert violates the key
        prepared = schema.prepared(NOW, prepared.rows)
        try:
            await store._write(schema.insert_prepared, prepared, note=(None, None))
        except StoreError as exc:
            errors.append(exc)

    grouped = store.grouped_ops
    await _in_one_batch(store, [ok, ok, ok, duplicate, ok, ok])
    assert len(errors) == 1, "the duplicate fails"
    assert len(good) == 5, "the others are stored"
    assert store.grouped_ops == grouped, "the failed group was undone and run one by one"
    for task_id in good:
        assert (await store.get(task_id)).id == task_id
    assert _column(store, "SELECT count(*) FROM tasks") == [6]


CHILD = textwrap.dedent(
    """
    import sys, trio
    from tq.core.task import TaskSpec
    from tq.store.sqlite import open_sqlite_store

    async def main(path):
        async with open_sqlite_store(path) as store:
            async def submitter():
                while True:
                    [r] = await store.submit([TaskSpec(type="t")], 1_800_000_000.0, actor="k")
                    print(r.id, store.grouped_ops, flush=True)  # the acknowledgement

            async with trio.open_nursery() as nursery:
                for _ in range(20):
                    nursery.start_soon(submitter)

    trio.run(main, sys.argv[1])
    """
)


def _ids_on_disk(path: Path) -> set[str]:
    conn = apsw.Connection(str(path), flags=apsw.SQLITE_OPEN_READONLY)
    try:
        return {row[0] for row in conn.execute("SELECT id FROM tasks")}
    finally:
        conn.close()


def test_sigkill_after_grouped_acknowledgements_loses_none(tmp_path: Path) -> None:
    path = tmp_path / "tq.db"
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(path)],
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    acknowledged: list[str] = []
    grouped = 0
    try:
        assert child.stdout is not None
        while len(acknowledged) < 500 or not grouped:
            line = child.stdout.readline()
            assert line, "the child ended early"
            task_id, grouped_ops = line.decode().split()
            acknowledged.append(task_id)
            grouped = int(grouped_ops)
        os.kill(child.pid, signal.SIGKILL)  # while 20 submitters go on
    finally:
        child.kill()
        child.wait(timeout=30)
        if child.stdout is not None:
            acknowledged += [line.split()[0].decode() for line in child.stdout if line.strip()]
            child.stdout.close()
    assert grouped, "concurrent submits were inserted in groups"
    missing = set(acknowledged) - _ids_on_disk(path)
    assert not missing, f"{len(missing)} acknowledged writes lost"
