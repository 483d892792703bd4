"""Operations: `tq backup` (online, under load, restorable), `tq doctor`, `tq version`,
and the start-up rule that `tq --help` and `tq submit` import no heavy modules."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import trio
from typer.testing import CliRunner

from tq.cli.doctor import Check, run_checks
from tq.cli.main import app
from tq.core.errors import ConfigError
from tq.core.task import ListFilter, TaskSpec
from tq.security.tls import ensure_broker_tls
from tq.store.backup import backup_sqlite
from tq.store.sqlite import open_sqlite_store
from tq.testing import BrokerProcess, running_broker, tq_command

HEAVY = {"textual", "hypercorn", "starlette", "prometheus_client", "cryptography", "apsw", "psutil"}


def by_name(checks: list[Check]) -> dict[str, Check]:
    return {c.name: c for c in checks}


# -- start-up ------------------------------------------------------------------------


def imported_after(code: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-c", f"{code}\nimport sys; print(' '.join(sys.modules))"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return {name.split(".")[0] for name in out.stdout.split()}


@pytest.mark.slow
def test_help_and_submit_import_no_heavy_modules() -> None:
    assert not imported_after("import tq.cli.main") & (HEAVY | {"trio", "msgpack"})
    # `tq submit` needs the blocking client: msgpack and ssl, not trio, the store or servers.
    # (cryptography still comes with tq.security.tls, for reading the CA file.)
    submit = imported_after("import tq.cli.main, tq.client.sync")
    assert not submit & (HEAVY - {"cryptography"} | {"trio"})
    helped = subprocess.run(tq_command("--help"), capture_output=True, text=True, timeout=60)
    assert helped.returncode == 0 and "doctor" in helped.stdout and "backup" in helped.stdout


# -- backup --------------------------------------------------------------------------


def spec(i: int) -> TaskSpec:
    return TaskSpec(type="echo", payload={"i": i, "pad": "x" * 200})


async def all_ids(path: Path) -> set[str]:
    async with open_sqlite_store(path) as store:
        tasks = await store.list(ListFilter(limit=10_000))
    return {t.id for t in tasks}


@pytest.mark.trio
async def test_backup_of_a_live_store_is_a_consistent_snapshot(tmp_path: Path) -> None:
    db, dest = tmp_path / "tq.db", tmp_path / "backups"
    dest.mkdir()
    async with open_sqlite_store(db, synchronous="normal") as store:
        before = {r.id for r in await store.submit([spec(i) for i in range(2000)], now=1.0)}
        stop = trio.Event()
        written: list[str] = []

        async def keep_writing() -> None:  # the writer commits throughout the backup
            i = 0
            while not stop.is_set():
                written.extend(r.id for r in await store.submit([spec(i)], now=2.0))
                i += 1
                await trio.sleep(0)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(keep_writing)
            await trio.sleep(0.05)
            result = await trio.to_thread.run_sync(
                lambda: backup_sqlite(db, dest, pages_per_step=8)  # many steps: must not restart
            )
            stop.set()
    assert written, "no write happened during the backup"
    path = Path(result.path)
    assert path.parent == dest and path.name.startswith("tq-") and path.suffix == ".db"
    assert path.stat().st_mode & 0o777 == 0o600
    assert not Path(f"{path}-wal").exists() and not list(dest.glob(".*partial*"))
    restored = await all_ids(path)
    assert before <= restored and len(restored) == result.tasks
    assert restored <= before | set(written)
    with pytest.raises(ConfigError, match="already exists"):
        backup_sqlite(db, path)
    with pytest.raises(ConfigError, match="no task database"):
        backup_sqlite(tmp_path / "missing.db", tmp_path / "x.db")


@pytest.mark.slow
def test_backup_under_load_restores_every_acknowledged_task(tmp_path: Path) -> None:
    data, backup_file = tmp_path / "data", tmp_path / "backup.db"
    with BrokerProcess(data, "--lease-ttl", "5") as broker:
        acked: list[str] = []
        stop = threading.Event()
        errors: list[BaseException] = []

        def submitter() -> None:  # a producer that keeps going during the backup
            try:
                with broker.client() as client:
                    i = 0
                    while not stop.is_set():
                        acked.extend(client.submit_many([{"type": "echo", "payload": i}] * 20))
                        i += 1
            except BaseException as exc:  # surfaced below
                errors.append(exc)

        thread = threading.Thread(target=submitter)
        thread.start()
        try:
            deadline = time.monotonic() + 30
            while len(acked) < 400 and time.monotonic() < deadline and not errors:
                time.sleep(0.02)
            acked_before = set(acked)  # acknowledged before the backup starts
            out = subprocess.run(
                tq_command("backup", str(backup_file), "--data", str(data), "--json"),
                capture_output=True,
                text=True,
                timeout=60,
            )
            time.sleep(0.2)  # and a little more load after it
        finally:
            stop.set()
            thread.join(30)
        assert not errors, errors
        assert out.returncode == 0, out.stderr
        result = json.loads(out.stdout)
        assert len(acked_before) >= 400 and result["tasks"] >= len(acked_before)
        all_acked = set(acked)
        assert result["tasks"] < len(all_acked), "no task was acknowledged after the snapshot"
        assert broker.stop() == 0

        # restore as docs/OPERATIONS.md says: broker stopped, copy over, drop -wal/-shm, start
        shutil.copyfile(backup_file, data / "tq.db")
        for suffix in ("-wal", "-shm"):
            (data / f"tq.db{suffix}").unlink(missing_ok=True)
        broker.start()
        with broker.client() as client:
            page = client.list(limit=10_000)
        restored = {t.id for t in page.tasks}
        assert page.next is None
    assert acked_before <= restored, f"{len(acked_before - restored)} acknowledged tasks lost"
    assert restored <= all_acked and len(restored) == result["tasks"]


# -- doctor --------------------------------------------------------------------------


def test_doctor_reports_an_unwritable_data_dir(tmp_path: Path) -> None:
    # Tests run as root, whom chmod does not stop: use paths that cannot be directories.
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    checks = by_name(run_checks({"data": blocker / "data"}, offline=True))
    assert checks["data dir"].status == "fail"
    assert "cannot be created" in checks["data dir"].detail and checks["data dir"].fix
    checks = by_name(run_checks({"data": blocker}, offline=True))
    assert checks["data dir"].status == "fail" and "not a directory" in checks["data dir"].detail

    result = CliRunner().invoke(app, ["doctor", "--data", str(blocker / "data"), "--offline"])
    assert result.exit_code == 1
    line = next(x for x in result.output.splitlines() if "data dir" in x)
    assert line.startswith("✗") and "->" in line
    result = CliRunner().invoke(app, ["doctor", "--data", str(blocker), "--offline", "--json"])
    report = json.loads(result.output)
    assert result.exit_code == 1 and report["ok"] is False


def test_doctor_reports_an_expired_and_an_expiring_certificate(tmp_path: Path) -> None:
    now = datetime.now(UTC)
    data = tmp_path / "data"
    ensure_broker_tls(data / "tls", now=now - timedelta(days=900))  # server cert: 825 days
    checks = by_name(run_checks({"data": data}, offline=True, now=now))
    server = checks["tls server"]
    assert server.status == "fail" and "expired" in server.detail and "restart" in server.fix
    assert checks["tls ca"].status == "ok"  # the CA lasts 10 years

    expiring = by_name(run_checks({"data": data}, offline=True, now=now - timedelta(days=80)))
    assert expiring["tls server"].status == "fail" and "expires in" in expiring["tls server"].detail

    result = CliRunner().invoke(app, ["doctor", "--data", str(data), "--offline"])
    assert result.exit_code == 1 and "expired" in result.output


def test_doctor_checks_key_permissions_and_a_foreign_ca(tmp_path: Path) -> None:
    data, other = tmp_path / "data", tmp_path / "other"
    files, _ = ensure_broker_tls(data / "tls")
    other_files, _ = ensure_broker_tls(other / "tls")
    files.server_key.chmod(0o644)
    checks = by_name(run_checks({"data": data, "ca": other_files.ca_cert}, offline=True))
    assert checks["key files"].status == "fail" and "chmod 600" in checks["key files"].fix
    assert checks["client ca"].status == "fail" and "did not sign" in checks["client ca"].detail
    assert checks["tls server"].status == "ok" and checks["broker"].status == "skip"


@pytest.mark.trio
async def test_doctor_against_a_live_broker_passes(tmp_path: Path) -> None:
    async with running_broker(tmp_path / "data") as broker:
        conf = broker.settings
        flags: dict[str, Any] = {"data": conf.data, "broker": conf.broker, "ca": conf.ca}
        if conf.key:
            flags["key"] = conf.key
        checks = await trio.to_thread.run_sync(lambda: run_checks(flags))
    failed = [c for c in checks if c.status == "fail"]
    assert not failed, failed
    named = by_name(checks)
    assert named["broker"].status == "ok" and "answered" in named["broker"].detail
    assert named["store"].status == "ok" and named["clock"].status == "ok"


@pytest.mark.trio
async def test_doctor_notices_a_clock_behind_the_store(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    async with open_sqlite_store(data / "tq.db") as store:
        await store.submit([spec(1)], now=time.time())
    past = datetime.now(UTC) - timedelta(hours=1)
    checks = by_name(run_checks({"data": data}, offline=True, now=past))
    assert checks["clock"].status == "fail" and "NTP" in checks["clock"].fix


def test_version_json() -> None:
    result = CliRunner().invoke(app, ["version", "--json"])
    info = json.loads(result.output)
    assert result.exit_code == 0 and info["frozen"] is False
    assert {"tq", "protocol", "python", "sqlite", "platform"} <= set(info)


# -- packaging -----------------------------------------------------------------------


def test_example_config_documents_every_setting(tmp_path: Path) -> None:
    from tq.config import FIELDS, load_settings, read_config_file

    example = Path(__file__).parent.parent / "packaging" / "config.example.toml"
    settings_lines = [
        line[1:] for line in example.read_text().splitlines() if re.match(r"#\w+ = ", line)
    ]
    enabled = tmp_path / "config.toml"
    enabled.write_text("\n".join(settings_lines) + "\n")
    keys = set(read_config_file(enabled))
    assert keys == set(FIELDS), (
        f"packaging/config.example.toml: add {sorted(set(FIELDS) - keys)}, "
        f"remove {sorted(keys - set(FIELDS))}"
    )
    load_settings(env={}, config_file=enabled)  # every documented value is valid
    assert read_config_file(example) == {}  # as shipped, it changes nothing
