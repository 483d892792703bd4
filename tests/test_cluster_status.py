"""`tq cluster-status` given several brokers: every broker, its role, version and last
sign of life, as a table and as JSON; brokers as real processes on one PostgreSQL."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
from pathlib import Path

from tq.cli.cluster import _fill_from_peers
from tq.testing import BrokerProcess, tq_command


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _status(a: BrokerProcess, brokers: str, *extra: str) -> subprocess.CompletedProcess[str]:
    key = a.key
    assert key is not None
    command = tq_command(
        "cluster-status", "--broker", brokers, "--ca", str(a.ca), "--key", key, *extra
    )
    env = {**os.environ, "COLUMNS": "200"}  # a wide table: one line per broker
    return subprocess.run(command, capture_output=True, text=True, timeout=60, env=env)


def test_cluster_status_asks_every_listed_broker(tmp_path: Path, pg_url: str) -> None:
    a = BrokerProcess(tmp_path / "a", "--store", pg_url, "--http", "off").start()
    (tmp_path / "b").mkdir(mode=0o700)
    shutil.copytree(tmp_path / "a" / "tls", tmp_path / "b" / "tls")  # one CA for the cluster
    b = BrokerProcess(tmp_path / "b", "--store", pg_url, "--http", "off").start()
    gone = f"127.0.0.1:{_closed_port()}"
    try:
        healthy = _status(a, f"{a.address},{b.address}", "-o", "json")
        assert healthy.returncode == 0, healthy.stderr
        data = json.loads(healthy.stdout)
        assert data["healthy"] is True and data["reachable"] == 2
        assert [e["address"] for e in data["brokers"]] == [a.address, b.address]
        for entry in data["brokers"]:
            status = entry["status"]
            assert entry["reachable"] and entry["healthy"] and entry["error"] is None
            assert entry["version"] == status["version"] and entry["uptime"] >= 0
            assert entry["role"] == status.get("role")  # as the broker reports it
            assert entry["last_seen"] > 0 and status["listen"]["wire"] == entry["address"]

        a.kill()
        degraded = _status(a, f"{a.address},{b.address},{gone}", "-o", "json")
        assert degraded.returncode == 1
        assert f"unreachable or unhealthy: {a.address}, {gone}" in degraded.stderr
        data = json.loads(degraded.stdout)
        assert [e["reachable"] for e in data["brokers"]] == [False, True, False]
        assert "cannot connect" in data["brokers"][2]["error"]
        table = _status(a, f"{a.address},{b.address}", "-o", "table")
        assert table.returncode == 1
        assert "UNREACHABLE" in table.stdout and "healthy" in table.stdout
        assert "1 of 2 brokers answered" in table.stdout

        b.kill()
        none = _status(a, f"{a.address},{b.address}", "-o", "json")
        assert none.returncode == 4 and "no broker answered" in none.stderr
        assert json.loads(none.stdout)["reachable"] == 0
        bad = _status(a, f"{a.address},,{b.address}")
        assert bad.returncode == 2 and "entry 2 of 3 is empty" in bad.stderr
    finally:
        a.close()
        b.close()


def test_a_silent_broker_shows_what_the_others_last_heard_of_it() -> None:
    answered = {
        "address": "b:2",
        "reachable": True,
        "status": {
            "brokers": [
                {"id": "A", "address": "a:1", "last_seen": 100.0, "version": "9.9"},
                {"id": "B", "address": "b:2", "last_seen": 200.0, "version": "9.9"},
            ]
        },
    }
    silent = {"address": "a:1", "reachable": False, "status": None, "last_seen": None}
    never = {"address": "c:3", "reachable": False, "status": None, "last_seen": None}
    _fill_from_peers([silent, answered, never])
    assert silent["last_seen"] == 100.0 and silent["reported_by"] == "b:2"
    assert silent["broker"] == "A" and silent["version"] == "9.9"
    assert never["last_seen"] is None and "reported_by" not in never


def test_a_join_token_for_a_cluster_lists_every_broker(broker_proc: BrokerProcess) -> None:
    def tq(*args: str) -> subprocess.CompletedProcess[str]:
        command = tq_command(*args, *broker_proc.client_args())
        return subprocess.run(command, capture_output=True, text=True, timeout=60)

    keys_before = len(json.loads(tq("keys", "list", "-o", "json").stdout))
    made = tq("token", "create", "--address", "b1:7470,b2:7470", "-a", "b3:7470")
    assert made.returncode == 0, made.stderr
    shown = subprocess.run(
        tq_command("token", "inspect", made.stdout.strip(), "--json"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert json.loads(shown.stdout)["addresses"] == ["b1:7470", "b2:7470", "b3:7470"]
    bad = tq("token", "create", "--address", "b1:7470,,b2:7470")
    assert bad.returncode == 2 and "entry 2 of 3 is empty" in bad.stderr
    keys_after = len(json.loads(tq("keys", "list", "-o", "json").stdout))
    assert keys_after == keys_before + 1  # the refused token made no key
