"""PostgreSQL only: unique tasks (``unique_for``) submitted through two brokers at once.

Two broker processes share one PostgreSQL store. Each key is submitted through
both brokers at the same moment; a test session holds ``task_unique`` locked
until both brokers' write transactions wait on it, so the two inserts of the
key really meet in the database, not one after the other. Exactly one task is
created per key, and both answers name it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import psycopg
import pytest
import trio

from tq.client import Client
from tq.testing import BrokerProcess

KEYS = 5  # unique keys, each submitted through both brokers at once


@contextlib.contextmanager
def two_brokers(tmp_path: Path, pg_url: str) -> Iterator[list[BrokerProcess]]:
    with contextlib.ExitStack() as stack:
        yield [
            stack.enter_context(BrokerProcess(tmp_path / name, "--store", pg_url))
            for name in ("one", "two")
        ]


def waiting_on_locks(url: str) -> int:
    """Brokers' sessions of this database now waiting for a lock."""
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'tq broker' "
            "AND wait_event_type = 'Lock' AND datname = current_database()"
        ).fetchone()
    assert row is not None
    return int(row[0])


def stored_tasks(url: str) -> list[tuple[str, Any]]:
    """Every task of the store: (id, payload decoded)."""
    with psycopg.connect(url, autocommit=True) as conn:
        return [
            (str(task_id), msgpack.unpackb(payload))
            for task_id, payload in conn.execute("SELECT id, payload FROM tasks ORDER BY id")
        ]


@pytest.mark.trio
async def test_one_unique_key_submitted_through_two_brokers_at_once_makes_one_task(
    tmp_path: Path, pg_url: str
) -> None:
    with two_brokers(tmp_path, pg_url) as procs:
        key = procs[0].key
        async with contextlib.AsyncExitStack() as stack:
            clients = [
                await stack.enter_async_context(Client.connect(proc.address, ca=proc.ca, key=key))
                for proc in procs
            ]
            named: set[str] = set()
            for n in range(KEYS):
                answers: dict[int, dict[str, Any]] = {}

                async def submit(i: int, n: int = n, answers: dict[int, Any] = answers) -> None:
                    task = {"type": "report", "payload": {"n": n}, "unique_for": 3600}
                    reply = await clients[i].request({"t": "submit", "tasks": [task]})
                    [answers[i]] = reply["tasks"]

                with psycopg.connect(pg_url) as blocker:  # one transaction until the block ends
                    blocker.execute("LOCK TABLE task_unique IN EXCLUSIVE MODE")
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(submit, 0)
                        nursery.start_soon(submit, 1)
                        with trio.fail_after(20):  # both writers wait on the table lock
                            while await trio.to_thread.run_sync(waiting_on_locks, pg_url) < 2:
                                await trio.sleep(0.05)
                        blocker.commit()  # both inserts of the key go ahead together
                ids = {answer["id"] for answer in answers.values()}
                assert len(ids) == 1, answers  # both answers name the one task
                created = sorted(bool(answer["created"]) for answer in answers.values())
                assert created == [False, True], answers
                named |= ids
    stored = stored_tasks(pg_url)
    assert len(stored) == KEYS, stored  # one task per key, no duplicate
    assert {task_id for task_id, _ in stored} == named
    assert sorted(payload["n"] for _, payload in stored) == list(range(KEYS))
