"""A lone light SQLite write (nothing queued, no transaction running) commits in its
caller's own thread hop: it is committed when its call returns (so when the broker
answers), writes arriving meanwhile share the writer's next transaction, a caller
cancelled before its turn writes nothing, and a process killed with SIGKILL right
after an acknowledgement keeps what was acknowledged."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import apsw
import pytest
import trio
import trio.testing

from tq.core.task import TaskSpec
from tq.store.sqlite import SQLiteStore, open_sqlite_store

NOW = 1_800_000_000.0


def _ids_on_disk(path: Path) -> set[str]:
    """The task ids a fresh connection (another reader of the file) sees."""
    conn = apsw.Connection(str(path), flags=apsw.SQLITE_OPEN_READONLY)
    try:
        return {row[0] for row in conn.execute("SELECT id FROM tasks")}
    finally:
        conn.close()


async def _submit(store: SQLiteStore, kind: str = "t") -> str:
    [result] = await store.submit([TaskSpec(type=kind)], NOW)
    return str(result.id)


@pytest.mark.trio
async def test_a_lone_write_is_committed_when_its_call_returns(tmp_path: Path) -> None:
    path = tmp_path / "tq.db"
    async with open_sqlite_store(path) as store:
        alone = 0
        run_alone = store._run_alone

        async def counted(op: object) -> None:
            nonlocal alone
            alone += 1
            await run_alone(op)  # type: ignore[arg-type]

        store._run_alone = counted  # type: ignore[method-assign]
        commits = store.commits
        task_id = await _submit(store)
        assert alone == 1, "nothing queued, nothing running: the lone path"
        assert store.commits == commits + 1
        assert task_id in _ids_on_disk(path), "committed before the caller is answered"
        assert not store._writing


@pytest.mark.trio
async def test_writes_arriving_during_a_lone_write_share_the_next_transaction(
    tmp_path: Path,
) -> None:
    async with open_sqlite_store(tmp_path / "tq.db") as store:
        turn = object()
        await store._write_limiter.acquire_on_behalf_of(turn)  # a transaction is running
        commits = store.commits
        ids: list[str] = []

        async def one() -> None:
            ids.append(await _submit(store))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(one)  # the lone write: waits for its turn
            await trio.testing.wait_all_tasks_blocked()
            assert store._writing
            for _ in range(10):
                nursery.start_soon(one)  # these queue for the writer
            await trio.testing.wait_all_tasks_blocked()
            assert len(store._queue) == 10
            store._write_limiter.release_on_behalf_of(turn)
        assert len(ids) == 11
        assert store.commits == commits + 2, "the lone write, then one batch of ten"
        for task_id in ids:
            assert (await store.get(task_id)).id == task_id


@pytest.mark.trio
async def test_a_lone_write_cancelled_before_its_turn_writes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "tq.db"
    async with open_sqlite_store(path) as store:
        turn = object()
        await store._write_limiter.acquire_on_behalf_of(turn)
        commits = store.commits
        written: list[str] = []

        async def never(task_status: trio.TaskStatus[trio.CancelScope]) -> None:
            with trio.CancelScope() as scope:
                task_status.started(scope)
                written.append(await _submit(store, "never"))

        async with trio.open_nursery() as nursery:
            scope = await nursery.start(never)
            await trio.testing.wait_all_tasks_blocked()
            assert store._writing, "it waits for its turn"
            scope.cancel()
        assert not written and not store._writing
        store._write_limiter.release_on_behalf_of(turn)
        assert store.commits == commits
        task_id = await _submit(store)  # the store goes on
        assert _ids_on_disk(path) == {task_id}


CHILD = textwrap.dedent(
    """
    import sys, trio
    from tq.core.task import TaskSpec
    from tq.store.sqlite import open_sqlite_store

    async def main(path):
        async with open_sqlite_store(path) as store:
            while True:
                [r] = await store.submit([TaskSpec(type="t")], 1_800_000_000.0)
                print(r.id, flush=True)  # the acknowledgement

    trio.run(main, sys.argv[1])
    """
)


def test_sigkill_right_after_acknowledgements_loses_none(tmp_path: Path) -> None:
    path = tmp_path / "tq.db"
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(path)],
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    acknowledged: list[str] = []
    try:
        assert child.stdout is not None
        while len(acknowledged) < 200:
            line = child.stdout.readline()
            assert line, "the child ended early"
            acknowledged.append(line.decode().strip())
        os.kill(child.pid, signal.SIGKILL)  # while it goes on submitting
    finally:
        child.kill()
        child.wait(timeout=30)
        if child.stdout is not None:
            acknowledged += [line.decode().strip() for line in child.stdout if line.strip()]
            child.stdout.close()
    missing = set(acknowledged) - _ids_on_disk(path)
    assert not missing, f"{len(missing)} acknowledged writes lost"
