"""Task progress: handlers report it, heartbeats carry it, the task keeps it, events,
`tq status` and `tq wait --progress` show it (real broker and workers on loopback)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.test_events import next_event
from tq.broker.events import EventBus, event_fields
from tq.core.errors import InvalidRequest
from tq.core.progress import clean, parse
from tq.testing import BrokerProcess, running_broker, running_worker, tq_command
from tq.worker import context
from tq.worker.executable import ExecHandler, StderrLines, parse_progress_line
from tq.worker.handlers import HandlerRegistry

# -- pure parts ------------------------------------------------------------------------


def test_clean_clamps_cuts_and_refuses_non_numbers() -> None:
    assert clean(0.4, "page 4/10") == (0.4, "page 4/10")
    assert clean(7, None) == (1.0, None) and clean(-1.5) == (0.0, None)
    assert clean(0.5, "x" * 500)[1] == "x" * 200
    assert clean(0.5, "a\x00b") == (0.5, "ab")
    for bad in (float("nan"), float("inf"), "0.5", True, None):
        with pytest.raises(ValueError, match="progress must be"):
            clean(bad)


def test_the_broker_refuses_progress_that_is_not_of_a_lease_it_extends() -> None:
    leases = {"a": 7, "b": 8}
    assert parse([["a", 7, 0.25, "q"], ["b", 8, 1, None]], leases) == {
        "a": (0.25, "q"),
        "b": (1.0, None),
    }
    assert parse(None, leases) == {}
    bad = [
        ["a", 7, 0.2],  # three fields
        [["c", 9, 0.2, None]],  # not a lease of this heartbeat
        [["a", 8, 0.2, None]],  # another token
        [["a", 7, 1.5, None]],
        [["a", 7, float("nan"), None]],
        [["a", 7, True, None]],
        [["a", 7, 0.2, "x" * 201]],
        [["a", 7, 0.2, "a\x00"]],
        [["a", 7, 0.2, None], ["a", 7, 0.3, None]],  # twice
        "a",
    ]
    for value in bad:
        with pytest.raises(InvalidRequest, match="heartbeat progress"):
            parse(value, leases)


def test_progress_lines_are_told_from_ordinary_stderr() -> None:
    assert parse_progress_line(b"tq-progress 0.4 page 4/10\n") == (0.4, "page 4/10")
    assert parse_progress_line(b"tq-progress 40%\n") == (0.4, None)
    for other in (
        b"tq-progress\n",
        b"tq-progress 1.5 too far\n",
        b"tq-progress nan\n",
        b"tq-progress half\n",
        b" tq-progress 0.4\n",
        b"TQ-PROGRESS 0.4\n",
        b"tq-progress 0.4 " + b"x" * 1100 + b"\n",
    ):
        assert parse_progress_line(other) is None, other
    lines = StderrLines()
    # split anywhere, even inside the prefix: progress lines leave, the rest passes whole
    stream = (
        b"log one\ntq-progress 0.1 a\ntq-pro"
        + b"gress 0.2 b\nwarning: tq-progress 0.9 not at a line start\ntq-progress oops\n"
    )
    out = bytearray()
    latest = None
    for i in range(0, len(stream), 5):
        text, found = lines.feed(stream[i : i + 5])
        out += text
        latest = found or latest
    text, found = lines.close()
    out += text
    assert latest == (0.2, "b") and found is None
    assert bytes(out) == (
        b"log one\nwarning: tq-progress 0.9 not at a line start\ntq-progress oops\n"
    )
    last = StderrLines()
    assert last.feed(b"tq-progress 1 done") == (b"", None)
    assert last.close() == (b"", (1.0, "done"))


def test_a_flood_of_progress_lines_keeps_only_the_latest() -> None:
    lines = StderrLines()
    chunk = b"".join(b"tq-progress %d%% step\n" % (i % 101) for i in range(20_000))
    text, found = lines.feed(chunk)
    assert text == b"" and found == ((19_999 % 101) / 100, "step")


@pytest.mark.trio
async def test_progress_events_are_coalesced_per_task() -> None:
    bus = EventBus()
    sub = bus.subscribe(1, ["progress"])
    for i in range(1000):
        bus.progressed({"t1": (i / 1000, f"step {i}"), "t2": (0.5, None)})
    bus.flush_progress()
    event = event_fields(sub.receive.receive_nowait())
    assert event["topic"] == "progress" and event["more"] == 0
    assert event["tasks"] == [
        {"id": "t1", "progress": 0.999, "message": "step 999"},
        {"id": "t2", "progress": 0.5, "message": None},
    ]
    with pytest.raises(trio.WouldBlock):
        sub.receive.receive_nowait()  # one event for 2000 reports
    many = {f"t{i}": (0.1, None) for i in range(150)}
    bus.progressed(many)
    bus.flush_progress()
    event = event_fields(sub.receive.receive_nowait())
    assert len(event["tasks"]) == 100 and event["more"] == 50  # bounded; the rest counted


# -- a real broker and workers ---------------------------------------------------------


@pytest.mark.slow
@pytest.mark.trio
async def test_python_handler_progress_reaches_task_and_events(tmp_path: Path) -> None:
    gate = trio.Event()
    registry = HandlerRegistry()

    @registry.handler("export")
    async def export(payload: Any, ctx: Any) -> str:
        assert ctx.attempt == 1 and ctx is context()
        for i in range(5000):  # a chatty handler: nothing is sent per call
            ctx.progress(i / 10_000, f"row {i}")
        ctx.progress(0.4, "page 4/10")
        await gate.wait()
        return "done"

    async with running_broker(tmp_path, lease_ttl=30.0) as broker, broker.client() as client:
        async with client.subscribe(["progress"]) as events:
            async with running_worker(broker, registry):
                task_id = await client.submit("export", None)
                event = await next_event(events, "progress")
                assert event.data["tasks"] == [
                    {"id": task_id, "progress": 0.4, "message": "page 4/10"}
                ]
                # well before lease_ttl / 3 = 10 s: progress brought the heartbeat forward
                task = await client.get(task_id)
                assert (task.state.value, task.progress, task.progress_message) == (
                    "running",
                    0.4,
                    "page 4/10",
                )
                gate.set()
                done = await client.wait(task_id, timeout=10)
        # the last progress is kept once the task ends
        assert (done.result, done.progress, done.progress_message) == ("done", 0.4, "page 4/10")
        async with broker.http_client() as http:
            body = (await http.get(f"/api/v1/tasks/{task_id}")).json()
        assert (body["progress"], body["progress_message"]) == (0.4, "page 4/10")


@pytest.mark.slow
@pytest.mark.trio
async def test_plain_handler_in_a_thread_reports_through_context(tmp_path: Path) -> None:
    release = threading.Event()
    registry = HandlerRegistry()

    @registry.handler("crunch")
    def crunch(payload: Any) -> int:
        context().progress(0.75, "three quarters")
        release.wait(20)
        return 3

    async with running_broker(tmp_path, lease_ttl=30.0) as broker, broker.client() as client:
        async with running_worker(broker, registry):
            task_id = await client.submit("crunch", None)
            with trio.fail_after(10):
                while (await client.get(task_id)).progress is None:
                    await trio.sleep(0.05)
            task = await client.get(task_id)
            assert (task.progress, task.progress_message) == (0.75, "three quarters")
            release.set()
            assert (await client.wait(task_id, timeout=10)).result == 3


EXEC_PROGRAM = """
import os, sys, time
sys.stderr.write("starting\\n")
for i in range(1, 201):
    sys.stderr.write(f"tq-progress {i / 400} step {i}\\n")
sys.stderr.write("tq-progress 50% half way\\n")
sys.stderr.flush()
gate = sys.argv[1]
while not os.path.exists(gate):
    time.sleep(0.02)
sys.stderr.write("about to fail\\n")
sys.exit(int(sys.argv[2]))
"""


@pytest.mark.slow
@pytest.mark.trio
async def test_exec_handler_progress_line(tmp_path: Path) -> None:
    program = tmp_path / "prog.py"
    program.write_text(EXEC_PROGRAM)
    gate = tmp_path / "gate"
    handlers = {"job": ExecHandler("job", (sys.executable, str(program), str(gate), "3"))}
    async with running_broker(tmp_path, lease_ttl=30.0) as broker, broker.client() as client:
        async with client.subscribe(["progress"]) as events:
            async with running_worker(broker, exec_handlers=handlers):
                task_id = await client.submit("job", None, max_retries=0)
                seen: list[dict[str, Any]] = []
                while not seen or seen[-1]["progress"] != 0.5:
                    seen += (await next_event(events, "progress")).data["tasks"]
                assert seen[-1] == {"id": task_id, "progress": 0.5, "message": "half way"}
                assert len(seen) <= 3  # 201 lines, at most a few heartbeats
                gate.touch()
                task = await client.wait(task_id, timeout=20)
    assert task.state.value == "dead" and (task.progress, task.progress_message) == (
        0.5,
        "half way",
    )
    assert task.error is not None
    # the stderr tail kept with the error has the ordinary lines only
    assert "starting" in task.error.traceback and "about to fail" in task.error.traceback
    assert "tq-progress" not in task.error.traceback


WAIT_PROGRAM = """
import os, sys, time
for step in ("0.25 one quarter", "0.5 one half"):
    sys.stderr.write("tq-progress " + step + "\\n"); sys.stderr.flush()
    gate = sys.argv[1] + step.split()[0]
    while not os.path.exists(gate):
        time.sleep(0.02)
print('{"pages": 10}')
"""


@pytest.mark.slow
def test_wait_progress_json_lines_in_a_pipe(broker_proc: BrokerProcess, tmp_path: Path) -> None:
    program = tmp_path / "pages.py"
    program.write_text(WAIT_PROGRAM)
    gate = str(tmp_path / "gate-")
    broker_proc.start_worker("--exec", f"pages={sys.executable} {program} {gate}")
    broker_proc.wait_for_workers(1)
    with broker_proc.client() as client:
        task_id = client.submit("pages", None)
    waiter = subprocess.Popen(
        tq_command("wait", task_id, "--progress", "--timeout", "60", *broker_proc.client_args()),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert waiter.stdout is not None
        rows = []
        for gate_name in ("0.25", "0.5"):
            while True:
                row = json.loads(waiter.stdout.readline())
                rows.append(row)
                if row["progress"] == float(gate_name):
                    break
            Path(gate + gate_name).touch()
        rest, err = waiter.communicate(timeout=60)
    finally:
        if waiter.poll() is None:
            waiter.kill()
    rows += [json.loads(line) for line in rest.splitlines()]
    assert waiter.returncode == 0, err
    assert {"id": task_id, "state": "running", "progress": 0.25, "message": "one quarter"} in rows
    assert {"id": task_id, "state": "running", "progress": 0.5, "message": "one half"} in rows
    assert rows[-1] == {
        "id": task_id,
        "state": "succeeded",
        "progress": 0.5,
        "message": "one half",
        "result": {"pages": 10},
    }
    status = subprocess.run(
        tq_command("status", task_id, "--output", "table", *broker_proc.client_args()),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert "50% one half" in status.stdout
