"""What a new operator tripped on in the CLI, driven as they drove it: `tq` as a
subprocess against a live broker process (TLS, keys, a real store).

One broker and one worker serve the module; tests that restart or lock a
broker start their own.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import time
from collections.abc import Iterator
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
    assert "scheduled" not in states and "blocked" not in states
    assert tq(broker, "list", "--state", "scheduled").returncode == 2
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
