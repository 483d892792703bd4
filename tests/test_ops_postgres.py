"""The operator commands on a PostgreSQL store (backend-specific: a real PostgreSQL).

`tq doctor` checks the database (answers, schema version, server settings, its
clock); `tq backup` refuses and says how PostgreSQL is backed up; `tq keys
--data` works on the configured store; `tq cluster-status` and the console say
which kind of store the broker has.
"""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
import trio
from typer.testing import CliRunner

from tq.cli.doctor import Check, _postgres_checks, run_checks
from tq.cli.main import app
from tq.core.task import TaskSpec
from tq.store import open_store
from tq.store.inspect import StoreReport, inspect_store
from tq.store.pg_schema import SCHEMA_VERSION
from tq.testing import running_broker


def by_name(checks: list[Check]) -> dict[str, Check]:
    return {c.name: c for c in checks}


async def _make_store(url: str, tasks: int = 0) -> None:
    async with open_store(url) as store:
        if tasks:
            await store.submit([TaskSpec(type="echo") for _ in range(tasks)], now=time.time())


# -- the read-only inspection ----------------------------------------------------------


def test_inspect_reads_a_postgres_store_without_creating_it(pg_url: str) -> None:
    empty = inspect_store(pg_url)
    assert empty.backend == "postgresql" and empty.exists is False
    with psycopg.connect(pg_url) as conn:  # nothing was created
        assert conn.execute("SELECT to_regclass('tq_schema')").fetchone() == (None,)

    trio.run(_make_store, pg_url, 3)
    report = inspect_store(pg_url)
    assert report.exists and report.schema_version == report.known_version == SCHEMA_VERSION
    assert report.newest is not None and abs(report.newest - time.time()) < 60
    assert report.clock is not None and abs(report.clock - report.measured_at) < 5
    assert report.facts["fsync"] == "off"  # the test cluster runs with fsync off
    assert report.facts["synchronous_commit"] == "on"
    assert isinstance(report.facts["max_connections"], int)
    assert report.facts["connections"] >= 1 and report.facts["broker_connections"] == 0
    assert report.size > 0


# -- tq doctor -----------------------------------------------------------------------


def test_doctor_checks_a_postgres_store(pg_url: str, tmp_path: Path) -> None:
    flags: dict[str, Any] = {"data": tmp_path / "data", "store": pg_url}
    fresh = by_name(run_checks(flags, offline=True))
    assert fresh["store"].status == "ok", fresh["store"]
    assert "PostgreSQL" in fresh["store"].detail and "no tq tables yet" in fresh["store"].detail

    trio.run(_make_store, pg_url, 1)
    checks = by_name(run_checks(flags, offline=True))
    store = checks["store"]
    assert store.status == "ok" and f"schema version {SCHEMA_VERSION}" in store.detail
    assert "wal" not in store.detail.lower()
    # the test cluster runs with fsync off: doctor calls that out as a failure
    settings = checks["pg settings"]
    assert settings.status == "fail" and "fsync = on" in settings.fix
    assert "max_connections" in settings.detail
    clock = checks["clock"]
    assert clock.status == "ok" and "database server's clock" in clock.detail

    # the database server's clock is compared with this host's
    ahead = datetime.now(UTC) + timedelta(minutes=10)
    skewed = by_name(run_checks(flags, offline=True, now=ahead))["clock"]
    assert skewed.status == "fail" and "database server's" in skewed.detail


def test_doctor_cli_reports_postgres_facts_in_json(pg_url: str, tmp_path: Path) -> None:
    trio.run(_make_store, pg_url, 0)
    args = ["doctor", "--data", str(tmp_path / "d"), "--store", pg_url, "--offline", "--json"]
    result = CliRunner().invoke(app, args)
    report = json.loads(result.output)
    rows = {row["name"]: row for row in report["checks"]}
    assert rows["store"]["status"] == "ok" and "PostgreSQL" in rows["store"]["detail"]
    assert "synchronous_commit on" in rows["pg settings"]["detail"]


def test_doctor_reports_an_unreachable_and_a_newer_postgres_store(
    pg_url: str, tmp_path: Path
) -> None:
    gone = "postgresql://tq@127.0.0.1:1/tq"
    store = by_name(run_checks({"data": tmp_path, "store": gone}, offline=True))["store"]
    assert store.status == "fail" and "PGPASSWORD" in store.fix
    assert "127.0.0.1:1" in store.detail and "\n" not in store.detail  # one line

    trio.run(_make_store, pg_url, 0)
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("UPDATE tq_schema SET version = 999")
    newer = by_name(run_checks({"data": tmp_path, "store": pg_url}, offline=True))["store"]
    assert newer.status == "fail" and "newer than this tq" in newer.detail


def _report(**facts: Any) -> StoreReport:
    base = {
        "server_version": "16.1",
        "synchronous_commit": "on",
        "fsync": "on",
        "max_connections": 100,
        "shared_buffers": "128MB",
        "connections": 10,
        "broker_connections": 6,
    }
    return StoreReport("postgresql", "postgresql://tq@db/tq", True, 3, 3, facts={**base, **facts})


def test_doctor_judges_postgres_settings() -> None:
    assert _postgres_checks(_report())[1].status == "ok"
    sync_off = _postgres_checks(_report(synchronous_commit="off"))[1]
    assert sync_off.status == "warn" and "loses the last commits" in sync_off.detail
    crowded = _postgres_checks(_report(connections=95))[1]
    assert crowded.status == "warn" and "95 of 100" in crowded.detail
    assert _postgres_checks(_report(fsync="off"))[1].status == "fail"


# -- tq backup -----------------------------------------------------------------------


def test_backup_refuses_a_postgres_store_and_says_how(pg_url: str, tmp_path: Path) -> None:
    target = tmp_path / "backup.db"
    result = CliRunner().invoke(app, ["backup", str(target), "--store", pg_url])
    assert result.exit_code == 2, result.output
    assert "pg_dump" in result.output and "Traceback" not in result.output
    assert not target.exists()
    # TQ_STORE counts as much as the flag
    result = CliRunner().invoke(app, ["backup", str(target)], env={"TQ_STORE": pg_url})
    assert result.exit_code == 2 and "pg_dump" in result.output


def test_backup_copies_the_sqlite_file_the_store_setting_names(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere" / "tasks.db"
    elsewhere.parent.mkdir()
    trio.run(_make_store, f"sqlite://{elsewhere}", 2)
    target = tmp_path / "copy.db"
    args = ["backup", str(target), "--data", str(tmp_path / "data"), "--json"]
    result = CliRunner().invoke(app, [*args, "--store", f"sqlite://{elsewhere}"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["tasks"] == 2 and target.exists()


# -- tq keys --data (offline) ------------------------------------------------------------


def test_offline_keys_work_on_the_configured_postgres_store(pg_url: str, tmp_path: Path) -> None:
    data = tmp_path / "data"
    env = {"TQ_STORE": pg_url}
    runner = CliRunner()
    missing = runner.invoke(app, ["keys", "list", "--data", str(data)], env=env)
    assert missing.exit_code == 2 and "start a broker on it first" in missing.output

    trio.run(_make_store, pg_url, 0)
    args = ["keys", "create", "--role", "reader", "--name", "prom", "--data", str(data), "--json"]
    made = runner.invoke(app, args, env=env)
    assert made.exit_code == 0, made.output
    key = json.loads(made.output)
    listed = runner.invoke(app, ["keys", "list", "--data", str(data), "--json"], env=env)
    assert key["id"] in {k["id"] for k in json.loads(listed.output)}

    async def stored() -> list[str]:
        async with open_store(pg_url) as store:
            return [k.id for k in await store.list_keys()]

    assert key["id"] in trio.run(stored)  # in PostgreSQL, not in a file under --data
    assert not (data / "tq.db").exists()


# -- tq cluster-status and the console -------------------------------------------------


@pytest.mark.trio
async def test_cluster_status_shows_a_postgres_store(pg_url: str, tmp_path: Path) -> None:
    async with running_broker(tmp_path / "data", store=pg_url) as broker:
        conf = broker.settings
        conn = ["--broker", conf.broker, "--ca", str(conf.ca), "--key", str(conf.key)]

        def status(*more: str) -> str:
            result = CliRunner().invoke(app, ["cluster-status", *conn, *more])
            assert result.exit_code == 0, result.output
            return result.output

        table = await trio.to_thread.run_sync(status, "-o", "table")
        data = json.loads(await trio.to_thread.run_sync(status, "--json"))
        live = await trio.to_thread.run_sync(inspect_store, pg_url)
    assert live.facts["broker_connections"] >= 2  # writer and reader, named "tq broker"
    assert "PostgreSQL" in table and "database size" in table
    assert "WAL size" not in table and "store path" not in table
    assert data["store"]["backend"] == "postgresql"


def test_console_broker_line_names_the_store_kind() -> None:
    from tq.tui.widgets import _store_text

    pg = _store_text({"backend": "postgresql", "size": 12_582_912})
    assert pg.startswith("store postgresql") and "wal" not in pg
    lite = _store_text({"backend": "sqlite", "size": 12_582_912, "wal": 1_048_576})
    assert lite.startswith("store sqlite") and "(wal " in lite
