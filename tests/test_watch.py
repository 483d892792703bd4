"""`tq watch`: the event stream as JSON lines (tq/cli/watch.py).

The pure part (flattening and filtering events) is tested directly; the command
runs against a real broker process over loopback TLS, with a real worker."""

from __future__ import annotations

import json
import os
import selectors
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tq.cli.watch import Filters, lines, text
from tq.testing import BrokerProcess, tq_command

CHANGES = {
    "changes": [
        {"id": "1", "type": "email", "queue": "a", "from": None, "to": "pending"},
        {"id": "2", "type": "resize", "queue": "b", "from": "pending", "to": "running"},
        {"id": "3", "type": "email", "queue": "a", "from": "running", "to": "dead"},
    ],
    "more": 0,
    "totals": [],
}
BULK = {
    "changes": [],
    "more": 1500,
    "totals": [
        {"queue": "a", "from": None, "to": "pending", "n": 1000},
        {"queue": "b", "from": None, "to": "pending", "n": 500},
    ],
}


def test_each_change_is_a_line_of_its_own() -> None:
    out = list(lines("tasks", 5.0, CHANGES, Filters()))
    assert [line["id"] for line in out] == ["1", "2", "3"]
    assert out[0] == {
        "topic": "task",
        "time": 5.0,
        "id": "1",
        "type": "email",
        "queue": "a",
        "from": None,
        "to": "pending",
    }


def test_filters_keep_only_matching_changes() -> None:
    by_queue = lines("tasks", 1.0, CHANGES, Filters(queues=frozenset({"a"})))
    assert [line["id"] for line in by_queue] == ["1", "3"]
    by_state = lines("tasks", 1.0, CHANGES, Filters(states=frozenset({"dead"})))
    assert [line["id"] for line in by_state] == ["3"]
    by_type = lines("tasks", 1.0, CHANGES, Filters(types=frozenset({"resize"})))
    assert [line["id"] for line in by_type] == ["2"]


def test_a_bulk_summary_keeps_its_matching_totals_and_is_dropped_for_a_type_filter() -> None:
    (whole,) = lines("tasks", 1.0, BULK, Filters())
    assert whole["more"] == 1500 and len(whole["totals"]) == 2
    (only_b,) = lines("tasks", 1.0, BULK, Filters(queues=frozenset({"b"})))
    assert only_b["totals"] == [{"queue": "b", "from": None, "to": "pending", "n": 500}]
    assert list(lines("tasks", 1.0, BULK, Filters(queues=frozenset({"c"})))) == []
    assert list(lines("tasks", 1.0, BULK, Filters(types=frozenset({"email"})))) == []


def test_counts_and_workers_follow_the_queue_filter() -> None:
    counts = {"queues": {"a": {"pending": 2}, "b": {"pending": 9}}}
    (line,) = lines("counts", 1.0, counts, Filters(queues=frozenset({"a"})))
    assert line["queues"] == {"a": {"pending": 2}}
    worker = {"kind": "joined", "worker_id": "w1", "worker": {"id": "w1", "queues": ["b"]}}
    assert list(lines("workers", 1.0, worker, Filters(queues=frozenset({"a"})))) == []
    (seen,) = lines("workers", 1.0, worker, Filters(queues=frozenset({"b"})))
    assert seen["kind"] == "joined" and seen["worker_id"] == "w1"


def test_text_lines_show_what_a_remote_party_chose_as_inert_text() -> None:
    hostile = {
        "changes": [{"id": "9", "type": "x\x1b[2Jy", "queue": "q", "from": None, "to": "pending"}],
        "more": 0,
        "totals": [],
    }
    (line,) = lines("tasks", 1.0, hostile, Filters())
    shown = text(line)
    assert "\x1b" not in shown
    assert "new -> pending" in shown


def test_progress_events_are_a_line_per_task_shown_inert() -> None:
    event = {
        "tasks": [
            {"id": "7", "progress": 0.4, "message": "page 4/10"},
            {"id": "8", "progress": 1, "message": "\x1b]0;owned\x07done"},
        ],
        "more": 0,
    }
    first, second = lines("progress", 2.0, event, Filters(queues=frozenset({"a"})))
    assert first == {
        "topic": "progress",
        "time": 2.0,
        "id": "7",
        "progress": 0.4,
        "message": "page 4/10",
    }
    assert "7  40%  page 4/10" in text(first)
    shown = text(second)
    assert "\x1b" not in shown and "\x07" not in shown and "100%" in shown


# -- the command against a live broker ----------------------------------------------------


class Watcher:
    """`tq watch` in a process of its own; lines read with a deadline."""

    def __init__(self, broker: BrokerProcess, *args: str) -> None:
        self.proc = subprocess.Popen(
            tq_command("watch", *args, *broker.client_args()),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            bufsize=0,
        )
        assert self.proc.stdout is not None
        assert self.proc.stderr is not None
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.proc.stdout, selectors.EVENT_READ, "out")
        self.selector.register(self.proc.stderr, selectors.EVENT_READ, "err")
        self.buffers = {"out": b"", "err": b""}

    def _read(self, which: str, timeout: float) -> bytes:
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buffers[which]:
            left = deadline - time.monotonic()
            assert left > 0, f"no line within {timeout}s; stderr: {self.buffers['err']!r}"
            for key, _ in self.selector.select(left):
                chunk = os.read(key.fileobj.fileno(), 65536)  # type: ignore[union-attr]
                assert chunk, f"tq watch ended: {self.proc.wait(10)}; {self.buffers['err']!r}"
                self.buffers[key.data] += chunk
        one, self.buffers[which] = self.buffers[which].split(b"\n", 1)
        return one

    def ready(self, timeout: float = 30.0) -> str:
        """The stderr line that says the subscription is in place."""
        said = self._read("err", timeout).decode()
        assert said.startswith("tq: watching "), said
        return said

    def line(self, timeout: float = 30.0) -> dict[str, Any]:
        return dict(json.loads(self._read("out", timeout)))

    def until(self, topic: str, timeout: float = 30.0) -> Iterator[dict[str, Any]]:
        """Lines until (and including) the first of ``topic``."""
        while True:
            line = self.line(timeout)
            yield line
            if line["topic"] == topic:
                return

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        self.selector.close()
        for pipe in (self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                pipe.close()


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[BrokerProcess]:
    with BrokerProcess(tmp_path / "broker") as proc:
        yield proc


def test_watch_prints_the_filtered_changes_as_json_lines(broker: BrokerProcess) -> None:
    watcher = Watcher(broker, "--topic", "tasks,counts", "--queue", "a", "-o", "jsonl")
    try:
        assert watcher.ready().startswith("tq: watching counts, tasks at ")
        assert watcher.line()["topic"] == "counts"  # a new counts subscriber gets them at once
        with broker.client() as client:
            client.submit("echo", {"n": 1}, queue="b")
            wanted = {client.submit("echo", {"n": i}, queue="a") for i in range(2)}
        seen: list[dict[str, Any]] = []
        while {line["id"] for line in seen} != wanted:
            line = watcher.line()
            if line["topic"] == "task":
                seen.append(line)
            else:
                assert line["topic"] == "counts" and set(line["queues"]) <= {"a"}, line
        assert all(line["queue"] == "a" and line["to"] == "pending" for line in seen), seen
        assert all(line["from"] is None and line["type"] == "echo" for line in seen), seen

        broker.start_worker("--queues", "a")  # the worker runs them: running, succeeded
        done: set[str] = set()
        while done != wanted:
            line = watcher.line()
            if line["topic"] == "task" and line["to"] == "succeeded":
                done.add(line["id"])
        watcher.proc.send_signal(signal.SIGINT)  # Ctrl-C: a clean stop
        assert watcher.proc.wait(20) == 0
        assert b"Traceback" not in watcher.buffers["err"] + watcher.proc.stderr.read()  # type: ignore[union-attr]
    finally:
        watcher.close()


def test_watch_stops_after_count_lines_and_filters_by_state(broker: BrokerProcess) -> None:
    broker.start_worker()
    broker.wait_for_workers(1)
    watcher = Watcher(broker, "--state", "succeeded", "--count", "2", "-o", "jsonl")
    try:
        assert watcher.ready().endswith(f"tasks at {broker.address}")
        with broker.client() as client:
            ids = {client.submit("echo", {"n": i}) for i in range(2)}
        got = [watcher.line(), watcher.line()]
        assert {line["id"] for line in got} == ids
        assert {line["to"] for line in got} == {"succeeded"}
        assert watcher.proc.wait(20) == 0  # --count 2: done
    finally:
        watcher.close()


def test_watch_reconnects_after_a_broker_restart(broker: BrokerProcess) -> None:
    watcher = Watcher(broker, "--topic", "counts,tasks", "-o", "jsonl")
    try:
        watcher.ready()
        assert watcher.line()["topic"] == "counts"
        address = broker.address
        assert broker.stop() == 0
        broker.start(listen=address)
        lines_after = list(watcher.until("reconnected", timeout=60))
        assert lines_after[-1]["topic"] == "reconnected"
        assert watcher.line()["topic"] == "counts"  # subscribed again: counts come first
        with broker.client() as client:
            task_id = client.submit("echo", {})
        while (line := watcher.line())["topic"] != "task":
            pass
        assert line["id"] == task_id
    finally:
        watcher.close()


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (["--state", "finished"], "unknown state 'finished' for --state"),
        (["--topic", "everything"], "unknown topic 'everything' for --topic"),
        (["-o", "yaml"], "--output yaml is not a stream"),
    ],
)
def test_bad_flags_are_usage_errors(args: list[str], said: str) -> None:
    out = subprocess.run(tq_command("watch", *args), capture_output=True, text=True, timeout=60)
    assert out.returncode == 2, out
    assert said in out.stderr and "Traceback" not in out.stderr, out.stderr
