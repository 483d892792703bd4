"""Text another party chose never drives the operator's terminal.

A hostile submitter picks task types and queue names with escape sequences
and Rich markup; a hostile worker picks its host name and its error messages.
The CLI runs as a subprocess against a real broker process and its table
output must hold no ESC (nor a bidi override) and show the markup literally,
while JSON output stays exact. The console's side is in tests/test_tui.py.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from tq.cli.logfmt import formatter
from tq.client import BlockingClient
from tq.core.text import inert
from tq.testing import BrokerProcess, tq_command

OSC8 = "\x1b]8;;http://evil\x07click\x1b]8;;\x07"  # a terminal hyperlink
TYPES = [f"osc{OSC8}", "[link=http://evil]x[/link]", "[red]"]
QUEUE = "[bold]q\x1b[2J"  # markup and "clear the screen"
HOST = "[link=http://evil]host[/link]\x1b[31m\u202eevil"
ERROR = "boom \x1b[2J[red]red[/red] \x9b31m \u202egnp.exe"


# -- the helper --------------------------------------------------------------------------


def test_inert_shows_controls_and_keeps_the_rest() -> None:
    assert inert(OSC8) == "\\x1b]8;;http://evil\\x07click\\x1b]8;;\\x07"
    assert inert("a\u202eb\u2066c\u200fd") == "a\\u202eb\\u2066c\\u200fd"
    assert inert("\x00\x7f\x85\x9b") == "\\x00\\x7f\\x85\\x9b"
    assert inert("line\nnext\tcol\r") == "line\\x0anext\\x09col\\x0d"
    assert inert("line\nnext\tcol\r", multiline=True) == "line\nnext\tcol\\x0d"
    assert inert("[red]é 漢字 ✓ (other)") == "[red]é 漢字 ✓ (other)"  # markup: the renderer's job
    assert inert(None) == "" and inert(42) == "42"
    assert inert(inert(ERROR)) == inert(ERROR)  # twice is harmless


def test_human_log_lines_are_inert_and_json_lines_exact() -> None:
    try:
        raise ValueError(ERROR)
    except ValueError:
        exc_info = sys.exc_info()
    record = logging.LogRecord(
        "tq.worker", logging.ERROR, __file__, 1, "task %s failed", (TYPES[0],), exc_info
    )
    human = formatter("human").format(record)
    assert_inert(human)
    assert inert(TYPES[0]) in human and "Traceback (most recent call last):\n" in human
    as_json = json.loads(formatter("json").format(record))
    assert as_json["message"] == f"task {TYPES[0]} failed" and ERROR in as_json["exc"]


# -- the CLI against a real broker ---------------------------------------------------------


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[BrokerProcess, str]]:
    """A broker holding hostile tasks, and a hostile worker connected to it; yields the
    broker and the id of a task that failed with a hostile error."""
    with BrokerProcess(tmp_path_factory.mktemp("hostile") / "broker") as broker:
        with broker.client() as client:
            ids = client.submit_many([{"type": t, "queue": QUEUE, "max_retries": 0} for t in TYPES])
        hello = {
            "worker_id": "w[red]1",
            "queues": [QUEUE],
            "types": None,
            "concurrency": 1,
            "host": HOST,
            "pid": 4242,
        }
        worker = BlockingClient(
            broker.address,
            ca=broker.ca,
            kind="worker",
            name="w[red]1",
            hello=hello,
            **broker.client_kwargs(),
        )
        with worker:
            claimed = worker.request({"t": "claim", "n": 1, "queues": [QUEUE], "wait": 5.0})
            (lease,) = claimed["tasks"]
            error = {"type": "Evil\x1b[5m", "message": ERROR, "traceback": f"line 1\n{ERROR}"}
            report = {
                "id": lease["id"],
                "token": lease["token"],
                "status": "reject",
                "error": error,
            }
            answer = worker.request({"t": "result", "results": [report]})
            assert answer["results"][0]["accepted"], answer
            assert lease["id"] in ids
            yield broker, lease["id"]


def tq_table(broker: BrokerProcess, *args: str) -> str:
    out = subprocess.run(
        tq_command(*args, *broker.client_args()),
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "COLUMNS": "400"},  # wide enough that no cell is cut
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


def assert_inert(text: str) -> None:
    assert "\x1b" not in text and "\x9b" not in text and "\u202e" not in text, repr(text)


@pytest.mark.slow
def test_cli_tables_show_hostile_names_as_text(hostile: tuple[BrokerProcess, str]) -> None:
    broker, failed = hostile
    listing = tq_table(broker, "list", "--output", "table")
    assert_inert(listing)
    assert "[link=http://evil]x[/link]" in listing and "[red]" in listing
    assert inert(f"osc{OSC8}") in listing and "[bold]q\\x1b[2J" in listing

    workers = tq_table(broker, "workers", "--output", "table")
    assert_inert(workers)
    assert "[link=http://evil]host[/link]\\x1b[31m\\u202eevil" in workers
    assert "w[red]1" in workers

    status = tq_table(broker, "status", failed, "--output", "table")
    assert_inert(status)
    assert "Evil\\x1b[5m: boom \\x1b[2J[red]red[/red] \\x9b31m \\u202egnp.exe" in status
    assert re.search(r"line 1 *\n", status)  # a traceback keeps its lines

    for command in (("stats",), ("queue-depth",)):
        table = tq_table(broker, *command, "--output", "table")
        assert_inert(table)
        assert "[bold]q\\x1b[2J" in table


@pytest.mark.slow
def test_json_output_stays_exact(hostile: tuple[BrokerProcess, str]) -> None:
    broker, failed = hostile
    tasks = json.loads(tq_table(broker, "list", "--output", "json"))
    assert sorted(t["type"] for t in tasks) == sorted(TYPES)
    assert {t["queue"] for t in tasks} == {QUEUE}
    task: dict[str, Any] = json.loads(tq_table(broker, "status", failed, "--json"))
    assert task["error"]["message"] == ERROR
    (worker,) = json.loads(tq_table(broker, "workers", "--output", "json"))
    assert worker["host"] == HOST
