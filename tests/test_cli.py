"""The command line against a real broker: output formats, pipes, errors, exit codes."""

from __future__ import annotations

import json
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tq.testing import BrokerProcess, tq_command, tq_env

pytestmark = pytest.mark.slow


def tq(broker: BrokerProcess, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        tq_command(*args, *broker.client_args()),
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture
def served(broker_proc: BrokerProcess) -> BrokerProcess:
    """The broker with one connected worker (connected before the test starts)."""
    broker_proc.start_worker("--concurrency", "8")
    broker_proc.wait_for_workers(1)
    return broker_proc


def test_submit_wait_status_list_cancel(served: BrokerProcess) -> None:
    out = tq(served, "submit", "echo", "--payload", '{"x": 1}')
    assert out.returncode == 0, out.stderr
    task_id = out.stdout.strip()
    waited = tq(served, "wait", task_id, "--timeout", "30")
    assert waited.returncode == 0 and json.loads(waited.stdout) == {"x": 1}
    status = json.loads(tq(served, "status", task_id, "--json").stdout)
    assert status["state"] == "succeeded" and status["result"] == {"x": 1}
    listed = tq(served, "list", "--state", "succeeded", "--output", "jsonl").stdout.splitlines()
    assert [json.loads(line)["id"] for line in listed] == [task_id]
    later = tq(served, "submit", "echo", "--payload", "2").stdout.strip()
    tq(served, "wait", later)
    newest = tq(served, "list", "--newest", "--limit", "1", "--output", "jsonl").stdout
    assert json.loads(newest)["id"] == later
    slow = tq(served, "submit", "sleep", "--payload", "30", "--json")
    slow_id = json.loads(slow.stdout)["id"]
    cancelled = tq(served, "cancel", slow_id, "--json")
    assert json.loads(cancelled.stdout)["state"] == "cancelled"
    waited = tq(served, "wait", slow_id)
    assert waited.returncode == 5 and "ended cancelled" in waited.stderr


def test_submit_from_stdin_jsonl_reports_every_line(served: BrokerProcess) -> None:
    lines = [json.dumps({"type": "echo", "payload": i}) for i in range(2500)]
    lines.insert(10, "{not json")
    lines.insert(20, json.dumps({"type": "echo", "priority": "urgent"}))
    out = subprocess.run(
        tq_command("submit", "-", *served.client_args()),
        input="\n".join(lines) + "\n",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert len(rows) == 2502
    assert [r["line"] for r in rows] == list(range(1, 2503))
    errors = [r for r in rows if "error" in r]
    assert [e["line"] for e in errors] == [11, 21]
    assert "not valid JSON" in errors[0]["error"] and "priority" in errors[1]["error"]
    assert "2 line(s) were not submitted" in out.stderr
    ids = [r["id"] for r in rows if "id" in r]
    assert len(set(ids)) == 2500


def test_usage_errors_name_the_problem(served: BrokerProcess) -> None:
    bad = tq(served, "submit", "echo", "--payload", "{x: 1}")
    assert bad.returncode == 2 and "--payload is not valid JSON" in bad.stderr
    assert "Traceback" not in bad.stderr
    missing = tq(served, "status", "01a21f99-0000-7000-8000-000000000000")
    assert missing.returncode == 3 and "no task with id" in missing.stderr
    bad_state = tq(served, "list", "--state", "zombie")
    assert bad_state.returncode == 2 and "unknown state 'zombie'" in bad_state.stderr
    bad_field = tq(served, "submit", "echo", "--priority", "urgent")
    assert bad_field.returncode == 2 and "priority" in bad_field.stderr
    # a payload file that never ends (or is far too large) is refused, not read for ever
    endless = tq(served, "submit", "echo", "--payload-file", "/dev/zero")
    assert endless.returncode == 2 and "payload file /dev/zero is over 40 MiB" in endless.stderr
    assert "Traceback" not in endless.stderr


def test_connection_errors_exit_4(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = subprocess.run(
        tq_command("status", "x", "--broker", f"127.0.0.1:{port}", "--insecure"),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 4
    assert "cannot connect to the broker" in out.stderr and "Traceback" not in out.stderr
    no_ca = subprocess.run(
        tq_command("status", "x", "--broker", f"127.0.0.1:{port}"),
        capture_output=True,
        text=True,
        timeout=30,
        env={"HOME": str(tmp_path), "PATH": ""},
    )
    assert no_ca.returncode == 4 and "--ca" in no_ca.stderr


def test_broker_refuses_unwritable_data_dir(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    out = subprocess.run(
        tq_command("broker", "--data", str(blocker / "data"), "--listen", "127.0.0.1:0"),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 2
    assert "is not writable" in out.stderr and "--data" in out.stderr
    assert "Traceback" not in out.stderr


def test_corrupt_config_file_is_reported(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text("broker = [unclosed\n")
    out = subprocess.run(
        tq_command("status", "x"),
        capture_output=True,
        text=True,
        timeout=30,
        env={"TQ_CONFIG": str(config), "HOME": str(tmp_path), "PATH": ""},
    )
    assert out.returncode == 2 and "is not valid TOML" in out.stderr


def test_readme_first_command_as_a_new_user(tmp_path: Path) -> None:
    """`make run` runs `tq up`; a new user's `tq submit` and `tq wait` then just work."""
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    first_block = readme.split("```sh", 1)[1].split("```", 1)[0]
    assert first_block.strip().splitlines()[0].startswith("make run")
    makefile = (Path(__file__).parent.parent / "Makefile").read_text()
    assert "$(BIN)/tq up" in makefile
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tq_env(tmp_path / "home") as env:
        env["TQ_LISTEN"] = env["TQ_BROKER"] = f"127.0.0.1:{port}"
        env["TQ_HTTP"] = "127.0.0.1:0"  # not the default 7471: another broker may hold it
        log = tmp_path / "up.log"
        with open(log, "wb") as out:
            up = subprocess.Popen(tq_command("up"), stdout=out, stderr=subprocess.STDOUT, env=env)
        try:
            deadline = time.monotonic() + 30
            while "local worker" not in log.read_text():
                assert up.poll() is None, log.read_text()
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.05)
            submit = subprocess.run(
                tq_command("submit", "echo", "--payload", '{"x":1}'),
                capture_output=True,
                text=True,
                env=env,
                timeout=30,
            )
            assert submit.returncode == 0, submit.stderr
            waited = subprocess.run(
                tq_command("wait", submit.stdout.strip()),
                capture_output=True,
                text=True,
                env=env,
                timeout=30,
            )
            assert waited.returncode == 0, waited.stderr
            assert json.loads(waited.stdout) == {"x": 1}
            assert (tmp_path / "home/.local/share/tq/tls/ca.pem").exists()
        finally:
            up.terminate()
            assert up.wait(30) == 0


def test_submit_of_a_type_no_worker_handles_warns_but_stores(served: BrokerProcess) -> None:
    out = tq(served, "submit", "no-such-handler", "--payload", "{}")
    assert out.returncode == 0, out.stderr
    assert "no connected worker handles task type 'no-such-handler'" in out.stderr
    assert "--exec no-such-handler=PROGRAM" in out.stderr
    task_id = out.stdout.strip()
    status = json.loads(tq(served, "status", task_id, "--json").stdout)
    assert status["state"] == "pending"
    known = tq(served, "submit", "echo", "--payload", "{}")
    assert known.returncode == 0 and "warning" not in known.stderr
    lines = "\n".join(json.dumps({"type": "no-such-handler"}) for _ in range(3)) + "\n"
    piped = subprocess.run(
        tq_command("submit", "-", *served.client_args()),
        input=lines,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert piped.returncode == 0 and piped.stderr.count("warning:") == 1
    assert len(piped.stdout.splitlines()) == 3


def test_processes_started_by_tq_ignore_modules_in_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a scratch script named like a module the broker imports late (prometheus_client,
    # for /metrics, imports timeit): `python -m` would import it from the working directory
    (tmp_path / "timeit.py").write_text(
        "raise SystemExit('timeit.py of the working directory was imported')\n"
    )
    monkeypatch.chdir(tmp_path)
    with BrokerProcess(tmp_path / "data") as broker, broker.http_client() as http:
        page = http.get("/metrics")
        assert page.status_code == 200
        assert "tq_broker_info" in page.text
