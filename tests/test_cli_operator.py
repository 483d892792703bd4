"""What a new operator tripped on in the CLI, driven as they drove it: `tq` as a
subprocess against a live broker process (TLS, keys, a real store).

One broker and one worker serve the module; tests that restart or lock a
broker start their own.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tq.testing import BrokerProcess, tq_command

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerProcess]:
    with BrokerProcess(tmp_path_factory.mktemp("operator") / "broker", "--lease-ttl", "5") as proc:
        proc.start_worker("--concurrency", "8", "--queues", "default,work", log_name="worker.log")
        proc.wait_for_workers(1)
        yield proc


def tq(broker: BrokerProcess, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        tq_command(*args, *broker.client_args()),
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
    )


def ok(broker: BrokerProcess, *args: str, stdin: str | None = None) -> str:
    out = tq(broker, *args, stdin=stdin)
    assert out.returncode == 0, f"tq {' '.join(args)}: {out.stderr}"
    return str(out.stdout)


def listed(broker: BrokerProcess, queue: str, state: str | None = None) -> list[dict[str, Any]]:
    args = ["list", "--queue", queue, "--limit", "10000", "--output", "jsonl"]
    if state:
        args += ["--state", state]
    return [json.loads(line) for line in ok(broker, *args).splitlines()]


def read_lines(stream: Any, count: int, seconds: float) -> list[bytes]:
    """Up to ``count`` lines from an unbuffered pipe within ``seconds`` (fewer if they do
    not come)."""
    lines: list[bytes] = []
    deadline = time.monotonic() + seconds
    while len(lines) < count:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([stream], [], [], left)[0]:
            break
        line = stream.readline()
        if not line:
            break
        lines.append(line)
    return lines


# -- tq wait on several tasks: the count is of tasks ----------------------------------


def test_wait_on_many_counts_tasks_not_states(broker: BrokerProcess) -> None:
    good = [ok(broker, "submit", "echo").strip() for _ in range(2)]
    bad = ok(broker, "submit", "fail", "--max-retries", "0").strip()
    out = tq(broker, "wait", *good, bad, "--timeout", "30")
    assert out.returncode == 5
    assert "1 of 3 task(s) did not succeed" in out.stderr
    parked = ok(broker, "submit", "sleep", "-p", "60", "-q", "parked-wait").strip()
    for ids in ([parked], [parked, good[0]]):
        late = tq(broker, "wait", *ids, "--timeout", "1")
        assert late.returncode == 6 and "still pending after 1s;" in late.stderr, late.stderr
    ok(broker, "cancel", parked)


# -- tq submit -: timer flush, ids for every stored task, Ctrl-C ------------------------


def _submitter(broker: BrokerProcess, *extra: str) -> subprocess.Popen[bytes]:
    """`tq submit -` with unbuffered pipes (so select() sees every line)."""
    return subprocess.Popen(
        tq_command("submit", "-", *extra, *broker.client_args()),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        bufsize=0,
    )


def task_line(payload: Any, queue: str) -> bytes:
    return (json.dumps({"type": "echo", "payload": payload, "queue": queue}) + "\n").encode()


def test_submit_stdin_flushes_a_few_lines_without_waiting_for_more(
    broker: BrokerProcess,
) -> None:
    with _submitter(broker) as proc:
        assert proc.stdin is not None and proc.stdout is not None
        for i in range(3):
            proc.stdin.write(task_line(i, "trickle"))
        rows = [json.loads(line) for line in read_lines(proc.stdout, 3, 15)]  # stdin still open
        proc.stdin.close()
        proc.wait(30)
    assert [r["line"] for r in rows] == [1, 2, 3] and all("id" in r for r in rows)
    assert {t["id"] for t in listed(broker, "trickle")} == {r["id"] for r in rows}
    assert proc.returncode == 0


def test_submit_stdin_interrupted_prints_every_stored_id(broker: BrokerProcess) -> None:
    with _submitter(broker) as proc:
        assert proc.stdin is not None and proc.stdout is not None
        sent = 0
        for _ in range(4):  # several batches, some by size, some by the timer
            for _ in range(300):
                sent += 1
                proc.stdin.write(task_line(sent, "cut"))
        first = read_lines(proc.stdout, 1, 15)
        assert first, "no id came back before the interrupt"
        proc.send_signal(signal.SIGINT)  # stdin stays open: only the signal stops it
        out, err = proc.communicate(timeout=30)
    rows = [json.loads(line) for line in [*first, *out.splitlines()]]
    assert proc.returncode == 130
    printed = [r["id"] for r in rows]
    assert [r["line"] for r in rows] == list(range(1, len(rows) + 1))  # in order, none missing
    stored = {t["id"] for t in listed(broker, "cut")}
    assert stored == set(printed), "a stored task without its id, or an id not stored"
    last = err.decode().strip().splitlines()[-1]
    assert f"{len(printed)} task(s) submitted" in last
    assert f"stopped after input line {len(rows)}" in last


def test_submit_stdin_prints_ids_on_a_terminal(broker: BrokerProcess) -> None:
    import pty

    lines = b"".join(task_line(i, "tty") for i in (1, 2)).decode()
    primary, secondary = pty.openpty()
    try:
        proc = subprocess.Popen(
            tq_command("submit", "-", *broker.client_args()),
            stdin=subprocess.PIPE,
            stdout=secondary,
            stderr=secondary,
            text=True,
        )
        proc.communicate(lines, timeout=60)
        os.close(secondary)
        secondary = -1
        output = b""
        while select.select([primary], [], [], 1)[0]:
            try:
                chunk = os.read(primary, 65536)
            except OSError:
                break
            if not chunk:
                break
            output += chunk
    finally:
        os.close(primary)
        if secondary >= 0:
            os.close(secondary)
    assert proc.returncode == 0
    ids = {t["id"] for t in listed(broker, "tty")}
    text = output.decode()
    assert len(ids) == 2 and all(i in text for i in ids)
    assert "submitted 2 task(s)" in text


# -- bulk cancel, priority -------------------------------------------------------------


def test_cancel_by_id_from_stdin_and_by_state(broker: BrokerProcess) -> None:
    ids = [ok(broker, "submit", "sleep", "-p", "60", "-q", "parked").strip() for _ in range(5)]
    asked = tq(broker, "cancel", "--queue", "parked")  # a pipe: no prompt, so --yes is needed
    assert asked.returncode == 2
    assert "5 task(s) match" in asked.stderr and "add --yes" in asked.stderr
    assert {t["state"] for t in listed(broker, "parked")} == {"pending"}
    missing = "01a21f99-0000-7000-8000-000000000000"
    some = tq(broker, "cancel", "-", "--output", "jsonl", stdin=f"{ids[0]}\n{missing}\n")
    assert some.returncode == 3
    assert [json.loads(line) for line in some.stdout.splitlines()] == [
        {"id": ids[0], "state": "cancelled"}
    ]
    assert some.stderr.count(missing) == 1  # the id once per error line
    rest = ok(broker, "cancel", "--state", "pending", "--queue", "parked", "--yes", "-o", "jsonl")
    assert {json.loads(line)["id"] for line in rest.splitlines()} == set(ids[1:])
    assert {t["state"] for t in listed(broker, "parked")} == {"cancelled"}
    again = tq(broker, "cancel", ids[1])
    assert again.returncode != 0 and "cancelled task cannot be cancelled" in again.stderr
    wrong = tq(broker, "cancel", "--state", "dead", "--yes")
    assert wrong.returncode == 2 and "cancel takes --state" in wrong.stderr


def test_priority_of_one_task_and_of_ids_from_stdin(broker: BrokerProcess) -> None:
    ids = [ok(broker, "submit", "sleep", "-p", "60", "-q", "ranked").strip() for _ in range(3)]
    assert ok(broker, "priority", ids[0], "high").strip() == f"{ids[0]} priority 200"
    rows = ok(broker, "priority", "-", "7", "--output", "jsonl", stdin="\n".join(ids[1:]) + "\n")
    assert [json.loads(line) for line in rows.splitlines()] == [
        {"id": i, "priority": 7} for i in ids[1:]
    ]
    assert {t["id"]: t["priority"] for t in listed(broker, "ranked")} == {
        ids[0]: 200,
        ids[1]: 7,
        ids[2]: 7,
    }
    ok(broker, "cancel", "--queue", "ranked", "--yes")


# -- small ones -------------------------------------------------------------------------


def test_small_operator_papercuts(broker: BrokerProcess) -> None:
    token = ok(broker, "token", "create", "--address", "a.example:7470", "-a", "b.example:7470")
    shown = subprocess.run(
        tq_command("token", "inspect", token.strip()), capture_output=True, text=True, timeout=60
    ).stdout
    assert "a.example:7470, b.example:7470" in shown and "[" not in shown
    states = tq(broker, "list", "--help").stdout
    assert "scheduled" in states and "blocked" in states  # delays and dependencies list
    assert tq(broker, "list", "--state", "scheduled").returncode == 0
    assert tq(broker, "list", "--state", "sleeping").returncode == 2
    missing = "01a21f99-0000-7000-8000-000000000001"
    retried = tq(broker, "retry", "-", stdin=missing + "\n")
    assert retried.returncode == 3 and retried.stderr.count(missing) == 1
    with broker.http_client(headers={"Authorization": ""}) as http:
        del http.headers["Authorization"]
        answer = http.get("/metrics")
    assert answer.status_code == 401
    assert "Bearer" in answer.text and "--key" not in answer.text


def test_exec_over_a_python_handler_warns_at_start(broker: BrokerProcess) -> None:
    worker = broker.start_worker("--exec", "echo=cat", "--queues", "nothing", log_name="shadow.log")
    try:
        log = broker.data / "shadow.log"
        deadline = time.monotonic() + 30
        while "replaces the Python handler" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "cat replaces the Python handler 'echo'" in log.read_text()
    finally:
        worker.terminate()
        worker.wait(30)


# -- a broker restart under tq wait and tq queue-depth --watch --------------------------


def test_wait_and_watch_reconnect_across_a_broker_restart(tmp_path: Path) -> None:
    with BrokerProcess(tmp_path / "restart") as broker:
        task_id = ok(broker, "submit", "sleep", "-p", "60", "-q", "unserved").strip()
        wait_cmd = tq_command("wait", task_id, "--timeout", "90", *broker.client_args())
        watch_cmd = tq_command(
            "queue-depth", "--watch", "--interval", "0.3", "-o", "jsonl", *broker.client_args()
        )
        with (
            subprocess.Popen(wait_cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as waiter,
            subprocess.Popen(watch_cmd, stdout=subprocess.PIPE, bufsize=0) as watcher,
        ):
            assert watcher.stdout is not None
            assert read_lines(watcher.stdout, 1, 30), "queue-depth --watch printed nothing"
            _wait_for_socket(waiter.pid)  # tq wait is connected (not still starting)
            address = broker.address
            assert broker.stop() == 0
            broker.start(listen=address)
            ok(broker, "submit", "sleep", "-p", "60", "-q", "after-restart")
            deadline, seen = time.monotonic() + 30, False
            while not seen and time.monotonic() < deadline:  # the watch answers again
                for line in read_lines(watcher.stdout, 1, 2):
                    seen |= any(q["queue"] == "after-restart" for q in json.loads(line)["queues"])
            assert seen, "queue-depth --watch did not come back after the restart"
            assert waiter.poll() is None, "tq wait gave up when the broker stopped"
            ok(broker, "cancel", task_id)
            _, err = waiter.communicate(timeout=60)
            print(err.decode())
            watcher.terminate()
        assert waiter.returncode == 5, err
        assert b"ended cancelled" in err and b"reconnecting" in err
        assert b"reconnected" in err


def _wait_for_socket(pid: int, seconds: float = 30) -> None:
    """Until process ``pid`` holds a socket (then a moment for its connect to complete)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            fds = os.listdir(f"/proc/{pid}/fd")
            if any(os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:") for fd in fds):
                time.sleep(0.5)
                return
        time.sleep(0.05)
    raise AssertionError("the client never opened a socket")


def test_a_broker_going_away_mid_handshake_is_not_called_a_tls_problem(tmp_path: Path) -> None:
    with BrokerProcess(tmp_path / "gone") as broker:
        assert broker.proc is not None
        broker.proc.send_signal(signal.SIGSTOP)  # the kernel still completes TCP connects
        try:
            command = tq_command("status", "01a21f99-0000-7000-8000-000000000000")
            with subprocess.Popen(
                [*command, *broker.client_args()], stderr=subprocess.PIPE, text=True
            ) as status:
                _wait_for_socket(status.pid)  # connected (the backlog), awaiting the handshake
                broker.kill()  # the listener goes, the connection is reset mid-handshake
                _, err = status.communicate(timeout=30)
        finally:
            if broker.proc.poll() is None:
                broker.proc.send_signal(signal.SIGCONT)
    assert status.returncode == 4
    assert "is shutting down" in err and "--insecure" not in err, err


# -- --output on every command ---------------------------------------------------------


def _commands() -> Iterator[tuple[str, Any]]:
    import typer.main

    from tq.cli.main import app

    def walk(group: Any, prefix: str) -> Iterator[tuple[str, Any]]:
        for name, command in group.commands.items():
            if hasattr(command, "commands"):
                yield from walk(command, f"{prefix}{name} ")
            else:
                yield f"{prefix}{name}", command

    yield from walk(typer.main.get_command(app), "")


def test_every_command_with_json_takes_output() -> None:
    missing = [
        name
        for name, command in _commands()
        if any("--json" in p.opts for p in command.params)
        and not any("--output" in p.opts for p in command.params)
    ]
    assert missing == [], missing


def test_output_formats_of_the_text_commands(broker: BrokerProcess, tmp_path: Path) -> None:
    import yaml

    task = yaml.safe_load(ok(broker, "submit", "echo", "-p", '{"a": 1}', "--output", "yaml"))
    assert task == {"id": task["id"], "created": True}
    waited = yaml.safe_load(ok(broker, "wait", task["id"], "--output", "yaml"))
    assert waited["state"] == "succeeded" and waited["result"] == {"a": 1}
    assert json.loads(ok(broker, "wait", task["id"], "--output", "jsonl"))["id"] == task["id"]
    parked = ok(broker, "submit", "sleep", "-p", "60", "-q", "formats").strip()
    assert yaml.safe_load(ok(broker, "cancel", parked, "-o", "yaml"))["state"] == "cancelled"
    made = yaml.safe_load(ok(broker, "keys", "create", "--role", "reader", "-o", "yaml"))
    assert made["key"].startswith("tq_") and made["role"] == "reader"
    gone = json.loads(ok(broker, "keys", "revoke", made["id"], "--output", "json"))
    assert gone["id"] == made["id"] and gone["state"] == "revoked"
    version = yaml.safe_load(
        subprocess.run(
            tq_command("version", "-o", "yaml"), capture_output=True, text=True, timeout=60
        ).stdout
    )
    assert {"tq", "protocol", "python"} <= set(version)
    backup = subprocess.run(
        tq_command("backup", str(tmp_path / "b.db"), "--data", str(broker.data), "-o", "yaml"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert backup.returncode == 0, backup.stderr
    assert yaml.safe_load(backup.stdout)["tasks"] >= 1


# -- one broker per data directory -----------------------------------------------------


def test_a_second_broker_on_the_same_data_directory_is_refused(tmp_path: Path) -> None:
    with BrokerProcess(tmp_path / "shared") as first:
        assert first.proc is not None
        second = subprocess.run(
            tq_command("broker", "--data", str(first.data), "--listen", "127.0.0.1:0",
                       "--http", "off"),
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert second.returncode == 2
        assert f"in use by another broker (pid {first.proc.pid}" in second.stderr
        assert "Traceback" not in second.stderr
        first.kill()  # kill -9: the kernel drops the lock, a restart is not blocked
        first.start()
        assert ok(first, "stats", "-o", "json")


# -- tq list on a 120-column terminal ----------------------------------------------------


def test_list_table_never_wraps_ids_and_shows_errors(broker: BrokerProcess) -> None:
    dead = ok(broker, "submit", "fail", "--max-retries", "0", "-q", "work").strip()
    assert tq(broker, "wait", dead).returncode == 5
    error = json.loads(ok(broker, "status", dead, "-o", "json"))["error"]

    def table(columns: int, *extra: str) -> list[str]:
        out = subprocess.run(
            tq_command("list", "-q", "work", "-o", "table", *extra, *broker.client_args()),
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "COLUMNS": str(columns)},
        )
        assert out.returncode == 0, out.stderr
        return out.stdout.splitlines()

    narrow = table(120)
    [row] = [line for line in narrow if dead[-12:] in line]
    assert f"…{dead[-12:]}" in row and error["type"] in row  # one line: short id, error
    assert any("--wide" in line for line in narrow)
    [row] = [line for line in table(120, "--wide") if dead[-12:] in line]
    assert dead in row  # whole, on one line
    [row] = [line for line in table(200) if dead[-12:] in line]
    assert dead in row and error["type"] in row


def test_a_bad_environment_value_stops_a_service_and_names_it(tmp_path: Path) -> None:
    from tq.testing import tq_env

    with tq_env(tmp_path) as env:
        for name, value, words in (
            ("TQ_GRACE", "abc", "TQ_GRACE=abc: not a number of seconds"),
            ("TQ_LOG_FORMAT", "xml", "TQ_LOG_FORMAT=xml: expected human or json"),
        ):
            out = subprocess.run(
                tq_command("worker", "--broker", "127.0.0.1:1", "--insecure"),
                env={**env, name: value},
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert out.returncode == 2 and words in out.stderr, out.stderr


# -- exec handlers: exit statuses --------------------------------------------------------


def test_exec_exit_statuses_retry_ordinary_failures_and_stop_on_65(broker: BrokerProcess) -> None:
    import shlex
    import sys

    prog = Path(__file__).parent / "fixtures" / "prog.py"
    run = f"{shlex.quote(sys.executable)} {shlex.quote(str(prog))} exit"
    worker = broker.start_worker(
        "--exec", f"flaky={run} 3 0 boom", "--exec", f"bad={run} 65 0 nope",
        "--queues", "execq", log_name="exec.log",
    )  # fmt: skip
    try:
        lines = "".join(
            json.dumps({"type": t, "queue": "execq", "max_retries": 1, "retry_base": 0.05}) + "\n"
            for t in ("flaky", "bad")
        )
        rows = [json.loads(line) for line in ok(broker, "submit", "-", stdin=lines).splitlines()]
        flaky, bad = (row["id"] for row in rows)
        assert tq(broker, "wait", flaky, bad, "--timeout", "60").returncode == 5
        retried = json.loads(ok(broker, "status", flaky, "-o", "json"))
        assert (retried["state"], retried["attempts"]) == ("dead", 2)  # retried once
        assert retried["error"]["message"] == "program exited with status 3"
        stopped = json.loads(ok(broker, "status", bad, "-o", "json"))
        assert (stopped["state"], stopped["attempts"]) == ("dead", 1)  # not retried
        assert stopped["error"]["type"] == "DoNotRetry"
    finally:
        worker.terminate()
        worker.wait(30)


# -- one Ctrl-C delivered twice is still one graceful stop --------------------------------


def test_one_ctrl_c_delivered_twice_still_drains(tmp_path: Path) -> None:
    data = tmp_path / "up"
    data.mkdir()
    log_path = data / "up.log"
    command = tq_command("up", "--data", str(data), "--listen", "127.0.0.1:0", "--http", "off")
    with open(log_path, "wb") as log, subprocess.Popen(command, stderr=log, stdout=log) as up:
        deadline = time.monotonic() + 30
        while "try: tq submit" not in log_path.read_text() and time.monotonic() < deadline:
            time.sleep(0.1)
        address = log_path.read_text().split("listening on ")[1].split()[0]
        client = BrokerProcess(data)
        client.address = address
        task_id = ok(client, "submit", "sleep", "-p", "2").strip()
        while json.loads(ok(client, "status", task_id, "-o", "json"))["state"] != "running":
            time.sleep(0.05)
        up.send_signal(signal.SIGINT)  # the terminal's Ctrl-C ...
        time.sleep(0.05)
        up.send_signal(signal.SIGINT)  # ... and the same one forwarded by a parent
        assert up.wait(60) == 0
    text = log_path.read_text()
    assert "stopping now" not in text and "the same request, ignored" in text
    with BrokerProcess(data) as again:  # the task finished during the graceful stop
        assert json.loads(ok(again, "status", task_id, "-o", "json"))["state"] == "succeeded"


# -- export and import in one pipe --------------------------------------------------------


def test_listed_tasks_resubmit_with_from_list(broker: BrokerProcess) -> None:
    for n in range(3):
        ok(broker, "submit", "sleep", "-p", str(60 + n), "-q", "export", "--priority", "high")
    exported = ok(broker, "list", "-q", "export", "--output", "jsonl")
    refused = tq(broker, "submit", "-", stdin=exported)  # the listed fields are not a submit
    assert refused.returncode == 2
    out = ok(broker, "submit", "-", "--from-list", stdin=exported.replace('"export"', '"import"'))
    new_ids = [json.loads(line)["id"] for line in out.splitlines()]
    imported = listed(broker, "import")
    assert sorted(t["id"] for t in imported) == sorted(new_ids) and len(new_ids) == 3
    assert sorted(t["payload"] for t in imported) == [60, 61, 62]
    assert {(t["type"], t["priority"], t["state"]) for t in imported} == {("sleep", 200, "pending")}
    ok(broker, "cancel", "--queue", "export", "--yes")
    ok(broker, "cancel", "--queue", "import", "--yes")
