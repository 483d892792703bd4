"""PostgreSQL only: what the conformance suite (tests/test_store.py) cannot say.

Claims through the claim index, two stores (two brokers) racing on one
database, migrations and foreign schemas, lost connections, store URLs, the
broker end to end on PostgreSQL, and ``tq migrate`` from SQLite. Each test
gets a schema of its own in the session's throwaway cluster (tests/conftest.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest
import trio
from psycopg.conninfo import conninfo_to_dict

from tq.core.auth import ApiKey, AuditEntry
from tq.core.errors import ConfigError, InvalidRequest, StoreError
from tq.core.task import ListFilter, Outcome, TaskSpec
from tq.store import open_store, parse_store_url, pg_schema
from tq.store.postgres import conninfo, open_postgres_store, redact
from tq.store.sqlite import open_sqlite_store
from tq.store.transfer import copy_store
from tq.testing import running_broker, running_worker

NOW = 1_800_000_000.0


def plan(url: str, statement: str, params: tuple[Any, ...]) -> str:
    with psycopg.connect(url, autocommit=True) as conn:
        rows = conn.execute(f"EXPLAIN {statement}", params).fetchall()
    return "\n".join(row[0] for row in rows)


@pytest.mark.trio
async def test_claims_read_the_claim_index_at_10k_pending(pg_url: str) -> None:
    async with open_postgres_store(pg_url) as store:
        for _ in range(10):
            await store.submit([TaskSpec(type="t", priority=i % 7) for i in range(1000)], NOW)
        await store.submit([TaskSpec(type="u", queue="other")], NOW)
        with psycopg.connect(pg_url, autocommit=True) as conn:
            conn.execute("ANALYZE tasks")
        take = (1, "running", NOW, "w", [1], NOW + 30)
        text = plan(pg_url, pg_schema.CLAIM, (["default", "other"], 1, *take))
        assert "tasks_claim" in text and "Seq Scan" not in text, text
        text = plan(pg_url, pg_schema.CLAIM_TYPE, (["default"], ["t"], 1, *take))
        assert "tasks_claim_type" in text and "Seq Scan" not in text, text
        [lease] = await store.claim("w", ["default"], None, 1, NOW, 30.0)
        assert lease.priority == 6


@pytest.mark.trio
async def test_two_stores_racing_claims_never_lease_a_task_twice(pg_url: str) -> None:
    """Two brokers on one database: SKIP LOCKED hands every task to exactly one."""
    async with open_postgres_store(pg_url) as a, open_postgres_store(pg_url) as b:
        await a.submit([TaskSpec(type="t", payload=i) for i in range(600)], NOW)
        leased: list[str] = []

        async def claimer(store: Any, worker: str) -> None:
            while True:
                leases = await store.claim(worker, ["default"], None, 7, NOW, 30.0)
                if not leases:
                    return
                leased.extend(lease.id for lease in leases)
                await store.complete([Outcome(x.id, x.token, "ok") for x in leases], NOW)

        async with trio.open_nursery() as nursery:
            for i in range(4):
                nursery.start_soon(claimer, a if i % 2 else b, f"w{i}")
        assert len(leased) == 600 and len(set(leased)) == 600
        stats = await b.stats()
        assert stats.counts == {"default": {"succeeded": 600}}
        assert a.commits > 0 and b.commits > 0


@pytest.mark.trio
async def test_one_lease_reported_through_two_stores_at_once_is_accepted_once(
    pg_url: str,
) -> None:
    """Fencing holds across brokers: the fenced UPDATE of the second report waits
    for the first to commit, re-checks the row, and finds no lease."""
    async with open_postgres_store(pg_url) as a, open_postgres_store(pg_url) as b:
        await a.submit([TaskSpec(type="t") for _ in range(50)], NOW)
        leases = await a.claim("w", ["default"], None, 50, NOW, 30.0)
        answers: dict[str, list[Any]] = {"a": [], "b": []}

        async def report(name: str, store: Any) -> None:
            for lease in leases:
                answers[name] += await store.complete(
                    [Outcome(lease.id, lease.token, "ok", result=name)], NOW
                )

        async with trio.open_nursery() as nursery:
            nursery.start_soon(report, "a", a)
            nursery.start_soon(report, "b", b)
        for lease, first, second in zip(leases, answers["a"], answers["b"], strict=True):
            assert first.accepted != second.accepted
            task = await a.get(lease.id)
            assert task.result == ("a" if first.accepted else "b")
            refused = second if first.accepted else first
            assert refused.state == "succeeded" and "no lease" in refused.reason


@pytest.mark.trio
async def test_stats_counts_finished_tasks_without_scanning(pg_url: str) -> None:
    """The trigger-kept counters agree with a real count through cancels, retries,
    purges and several connections (slots)."""
    async with open_postgres_store(pg_url) as a, open_postgres_store(pg_url) as b:
        ids = [r.id for r in await a.submit([TaskSpec(type="t") for _ in range(20)], NOW)]
        for store in (a, b):
            leases = await store.claim("w", ["default"], None, 5, NOW, 30.0)
            await store.complete([Outcome(x.id, x.token, "ok") for x in leases], NOW)
        await a.cancel(ids[-1], NOW)
        await b.retry(ids[-1], NOW)
        await b.cancel(ids[-2], NOW)
        assert await a.purge(["succeeded"], 0, NOW + 1, 3) == 3
        with psycopg.connect(pg_url, autocommit=True) as conn:
            real = dict(conn.execute("SELECT state, count(*) FROM tasks GROUP BY state").fetchall())
        assert (await a.stats()).counts["default"] == real
        assert real == {"succeeded": 7, "cancelled": 1, "pending": 9}


@pytest.mark.trio
async def test_store_details_name_the_backend_without_the_password(pg_cluster: Any) -> None:
    url = pg_cluster.schema_url("details").replace("tq@", "tq:secret@")
    async with open_store(url) as store:
        stats = await store.stats()
        probe = await store.probe()
    assert stats.details["backend"] == probe.details["backend"] == "postgresql"
    assert "secret" not in json.dumps(stats.details) and "***" in stats.details["location"]
    assert stats.size_bytes > 0 and stats.details["server_version"]
    assert set(stats.brief()) == {"backend", "location", "size"}


def test_store_urls() -> None:
    assert parse_store_url("sqlite:///var/lib/tq/tq.db").target == "/var/lib/tq/tq.db"
    assert parse_store_url("sqlite://rel/tq.db").target == "rel/tq.db"
    assert parse_store_url("/plain/path.db").backend == "sqlite"
    assert parse_store_url("postgres://u@h/db").backend == "postgresql"
    for bad, why in [("", "empty"), ("mysql://h/db", "unknown scheme"), ("sqlite://", "path")]:
        with pytest.raises(ConfigError, match=why):
            parse_store_url(bad)
    info = conninfo_to_dict(conninfo("postgresql://u@h/db?keepalives_idle=60"))
    assert info["keepalives_idle"] == "60" and info["keepalives"] == "1"  # the URL wins
    assert info["application_name"] == "tq broker" and info["connect_timeout"] == "10"
    assert redact("postgresql://u:pw@h:5/db") == "postgresql://u:***@h:5/db"
    assert redact("postgresql://u@h/db") == "postgresql://u@h/db"


def test_the_store_setting_is_checked_where_it_is_read() -> None:
    from tq.config import load_settings

    conf = load_settings(env={"TQ_STORE": "postgresql://tq@db/tq"}, config_file=Path("/none"))
    assert conf.store_url == "postgresql://tq@db/tq"
    assert load_settings(env={}, config_file=Path("/none"), flags={"data": "/d"}).store_url == (
        "sqlite:///d/tq.db"
    )
    with pytest.raises(ConfigError, match="store URL"):
        load_settings(env={"TQ_STORE": "redis://x"}, config_file=Path("/none"))


@pytest.mark.trio
async def test_text_with_nul_is_the_callers_mistake(pg_url: str) -> None:
    async with open_postgres_store(pg_url) as store:
        with pytest.raises(InvalidRequest, match="NUL"):
            await store.submit([TaskSpec(type="a\x00b")], NOW)
        with pytest.raises(InvalidRequest, match="NUL"):
            await store.get("x\x00")


@pytest.mark.trio
async def test_refuses_a_newer_schema_and_a_foreign_tasks_table(pg_cluster: Any) -> None:
    newer = pg_cluster.schema_url("newer")
    async with open_postgres_store(newer):
        pass
    with psycopg.connect(newer, autocommit=True) as conn:
        conn.execute("UPDATE tq_schema SET version = 99")
    with pytest.raises(StoreError, match="newer tq"):
        async with open_postgres_store(newer):
            pass
    foreign = pg_cluster.schema_url("foreign")
    with psycopg.connect(foreign, autocommit=True) as conn:
        conn.execute("CREATE TABLE tasks (x int)")
    with pytest.raises(StoreError, match="did not create"):
        async with open_postgres_store(foreign):
            pass


@pytest.mark.trio
async def test_a_malformed_url_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="not a valid PostgreSQL URL"):
        async with open_postgres_store("postgresql://u@h/db?nosuchparam=1"):
            pass


@pytest.mark.trio
async def test_unreachable_server_is_a_clear_store_error(pg_cluster: Any) -> None:
    url = f"postgresql://tq@127.0.0.1:{pg_cluster.port + 1}/tq"  # nothing listens there
    with pytest.raises(StoreError, match="unreachable") as caught:
        async with open_postgres_store(url):
            pass
    assert "cannot open" in caught.value.message or "cannot connect" in caught.value.message


def _kill_broker_connections(url: str) -> None:
    """Terminate every store connection, and wait until the server has closed them."""
    with psycopg.connect(url, autocommit=True) as admin:
        admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE application_name = 'tq broker'"
        )
        for _ in range(500):
            left = admin.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'tq broker'"
            ).fetchone()
            if left == (0,):
                return
            time.sleep(0.01)
    raise AssertionError("the server did not close the connections")


@pytest.mark.trio
async def test_lost_connections_are_replaced_without_failing_a_call(pg_url: str) -> None:
    """A server restart or a cut connection: reads and writes that had not sent
    COMMIT run again on a new connection, so the callers never see it."""
    async with open_postgres_store(pg_url) as store:
        await store.submit([TaskSpec(type="t")], NOW)
        assert (await store.probe()).details["backend"] == "postgresql"
        _kill_broker_connections(pg_url)
        await store.submit([TaskSpec(type="t")], NOW)
        assert len(await store.list(ListFilter())) == 2
        assert (await store.probe()).details["backend"] == "postgresql"
        _kill_broker_connections(pg_url)
        [claimed] = await store.claim("w", ["default"], None, 1, NOW, 30.0)
        assert (await store.get(claimed.id)).state == "running"
        assert (await store.stats()).counts == {"default": {"pending": 1, "running": 1}}
        assert store.commits >= 3


@pytest.mark.trio
async def test_a_server_that_stays_away_fails_calls_with_a_store_error(
    pg_cluster: Any, pg_url: str
) -> None:
    async with open_postgres_store(pg_url) as store:
        store._writer.url = store._reader.url = store._prober.url = (
            f"postgresql://tq@127.0.0.1:{pg_cluster.port + 1}/tq"  # where nothing listens
        )
        _kill_broker_connections(pg_url)
        with pytest.raises(StoreError, match="unreachable"):
            await store.submit([TaskSpec(type="t")], NOW)
        with pytest.raises(StoreError, match="unreachable"):
            await store.get("x")


@pytest.mark.trio
async def test_broker_end_to_end_on_postgresql(tmp_path: Path, pg_url: str) -> None:
    """submit -> worker -> succeeded, with the broker's store on PostgreSQL."""
    async with running_broker(tmp_path / "b", store=pg_url) as broker:
        async with running_worker(broker), broker.client() as client:
            task_id = await client.submit("echo", {"hello": "pg"})
            task = await client.wait(task_id, timeout=30)
            stats = await client.stats()
    assert task.state == "succeeded" and task.result == {"hello": "pg"}
    assert stats["store"]["backend"] == "postgresql"
    with psycopg.connect(pg_url, autocommit=True) as conn:
        row = conn.execute("SELECT state FROM tasks WHERE id = %s", (task_id,)).fetchone()
    assert row == ("succeeded",)


# -- tq migrate -----------------------------------------------------------------------


@pytest.mark.trio
async def test_migrate_copies_sqlite_to_postgresql_and_verifies(
    tmp_path: Path, pg_url: str
) -> None:
    source = tmp_path / "tq.db"
    async with open_sqlite_store(source) as store:
        results = await store.submit([TaskSpec(type="t", payload=i) for i in range(30)], NOW)
        ids = [r.id for r in results]
        await store.submit([TaskSpec(type="k", idempotency_key="once", payload=b"\x00b")], NOW)
        leases = await store.claim("w", ["default"], None, 10, NOW, 30.0)
        await store.complete([Outcome(x.id, x.token, "ok", result=[1]) for x in leases[:6]], NOW)
        await store.complete([Outcome(x.id, x.token, "reject") for x in leases[6:8]], NOW)
        await store.cancel(ids[-1], NOW)
        await store.record_audit(AuditEntry(NOW, "admin", "key.create", "k1", {"n": 1}))
        key = ApiKey(
            "0123456789ab", "ci", "producer", ("a",), NOW, None, None, "scrypt", b"s", b"h"
        )
        await store.create_key(key)
        await store.set_paused("held", True, NOW)
        expected = await store.list(ListFilter(limit=1000))
        expected_counts = (await store.stats()).counts
    result = await trio.to_thread.run_sync(copy_store, f"sqlite://{source}", pg_url)
    assert result.tasks == {"pending": 20, "running": 2, "succeeded": 6, "dead": 2, "cancelled": 1}
    assert (result.keys, result.audit) == (1, 1)
    async with open_postgres_store(pg_url) as pg:
        assert await pg.list(ListFilter(limit=1000)) == expected  # every field, same order
        assert (await pg.stats()).counts == expected_counts  # finished counters rebuilt
        [audit] = await pg.list_audit()
        assert (audit.action, audit.target, audit.detail) == ("key.create", "k1", {"n": 1})
        assert await pg.list_keys() == [key]
        assert await pg.paused_queues() == {"held": NOW}  # queue settings came along
        [again] = await pg.submit([TaskSpec(type="k", idempotency_key="once")], NOW)
        assert not again.created  # idempotency keys came along
        new = await pg.submit([TaskSpec(type="t")], NOW + 1)
        assert (await pg.list(ListFilter(limit=1000)))[-1].id == new[0].id  # seq continues
        running = [t for t in expected if t.state == "running"]
        lease_rows = await pg.complete([Outcome(running[0].id, 1, "ok")], NOW)
        assert not lease_rows[0].accepted  # tokens copied, not reset: a guess is refused
        copied = await pg.list(ListFilter(limit=1000))
    back = tmp_path / "back.db"  # and back again: PostgreSQL -> SQLite
    result = await trio.to_thread.run_sync(copy_store, pg_url, f"sqlite://{back}")
    assert sum(result.tasks.values()) == len(copied)
    async with open_sqlite_store(back) as store:
        assert await store.list(ListFilter(limit=1000)) == copied
        assert (await store.stats()).counts == (await _stats_of(pg_url)).counts
        assert len(await store.list_keys()) == 1
        assert await store.paused_queues() == {"held": NOW}


async def _stats_of(url: str) -> Any:
    async with open_postgres_store(url) as pg:
        return await pg.stats()


@pytest.mark.trio
async def test_migrate_refuses_a_running_broker_and_a_full_destination(
    tmp_path: Path, pg_url: str
) -> None:
    source = tmp_path / "tq.db"
    async with open_sqlite_store(source) as store:
        await store.submit([TaskSpec(type="t")], NOW)
        with pytest.raises(StoreError, match="in use"):
            await trio.to_thread.run_sync(copy_store, f"sqlite://{source}", pg_url)
    async with open_postgres_store(pg_url) as pg:
        with pytest.raises(StoreError, match="in use"):
            await trio.to_thread.run_sync(copy_store, f"sqlite://{source}", pg_url)
        await pg.submit([TaskSpec(type="x")], NOW)
    with pytest.raises(StoreError, match="already holds"):
        await trio.to_thread.run_sync(copy_store, f"sqlite://{source}", pg_url)
    with pytest.raises(ConfigError, match="does not exist"):
        await trio.to_thread.run_sync(copy_store, f"sqlite://{tmp_path}/none.db", pg_url)


def test_tq_migrate_command(tmp_path: Path, pg_url: str) -> None:
    source = tmp_path / "tq.db"

    async def fill() -> None:
        async with open_sqlite_store(source) as store:
            await store.submit([TaskSpec(type="t") for _ in range(5)], NOW)

    trio.run(fill)
    env = {**os.environ, "TQ_CONFIG": str(tmp_path / "none.toml")}
    command = [sys.executable, "-m", "tq", "migrate", "--from", f"sqlite://{source}"]
    done = subprocess.run(
        [*command, "--to", pg_url, "--json"], capture_output=True, text=True, env=env, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["tasks"] == {"pending": 5}
    again = subprocess.run(
        [*command, "--to", pg_url], capture_output=True, text=True, env=env, timeout=60
    )
    assert again.returncode == 1 and "already holds" in again.stderr
    assert "Traceback" not in again.stderr
