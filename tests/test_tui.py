"""The console (tq tui): Textual's pilot against a real broker, and screen snapshots.

Textual runs on asyncio, so these tests are plain functions that call
``asyncio.run`` (pytest-trio's trio mode must not capture them). The broker
is trio-based, so it runs as a separate process (``BrokerProcess``).

Snapshots: the main screens at 80x24 and 160x48, fed fixed data with a
frozen clock and UTC times, are compared with tests/snapshots/<name>.txt (the
characters on screen, always) and <name>.svg (colours and all, when the
Textual that recorded them is the one installed: see VERSION there).
Regenerate after a deliberate change with:

    TQ_UPDATE_SNAPSHOTS=1 .venv/bin/python -m pytest tests/test_tui.py -k snapshot
"""

from __future__ import annotations

import asyncio
import datetime as dt
import difflib
import io
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

textual = pytest.importorskip("textual")

from rich.console import Console  # noqa: E402
from textual.pilot import Pilot  # noqa: E402
from textual.widgets import DataTable, Input  # noqa: E402

from tq.client import Event  # noqa: E402
from tq.core.task import Task  # noqa: E402
from tq.testing import BrokerProcess  # noqa: E402
from tq.tui import fmt  # noqa: E402
from tq.tui.app import ConsoleApp  # noqa: E402
from tq.tui.link import Page, Snapshot, TaskFilter  # noqa: E402
from tq.tui.model import Pending  # noqa: E402
from tq.tui.screens.detail import TaskScreen  # noqa: E402
from tq.tui.screens.dialogs import (  # noqa: E402
    ConfirmScreen,
    PriorityScreen,
    PurgeScreen,
    SubmitScreen,
)
from tq.tui.screens.tasks import TasksScreen  # noqa: E402
from tq.tui.widgets import Banner  # noqa: E402

SNAPSHOTS = Path(__file__).parent / "snapshots"
COUNTED = ("pending", "running", "failed", "dead", "succeeded")


def run(scenario: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(scenario())


async def until(pilot: Pilot[Any], condition: Callable[[], Any], what: str, seconds: float = 20):
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {seconds}s waiting for {what}")
        await pilot.pause(0.05)


async def in_thread(fn: Callable[..., Any], *args: Any) -> Any:
    return await asyncio.to_thread(fn, *args)


def task_table(app: ConsoleApp) -> DataTable[Any] | None:
    """The task list's table once the tasks screen is up (None before)."""
    if not isinstance(app.screen, TasksScreen):
        return None
    tables = app.screen.query("#tasks").results(DataTable)
    return next(iter(tables), None)


QUEUE_COLUMN = {"pending": "Pending", "running": "Running", "failed": "Failed", "dead": "Dead"}


def queue_cells(app: ConsoleApp, queue: str) -> list[str]:
    table = app.screen.query_one("#queues", DataTable)
    columns = [QUEUE_COLUMN.get(state, "Done") for state in COUNTED]
    return [str(table.get_cell(queue, column)) for column in columns]


def expected_cells(counts: dict[str, int]) -> list[str]:
    return [fmt.count(counts.get(state, 0)) for state in COUNTED]


# -- against a real broker ----------------------------------------------------------


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerProcess]:
    """A broker process with one worker on the queue 'tui'."""
    broker = BrokerProcess(tmp_path_factory.mktemp("tui") / "broker", "--lease-ttl", "3")
    with broker:
        broker.start_worker("--concurrency", "4", "--queues", "tui")
        yield broker


def console(broker: BrokerProcess, **kwargs: Any) -> ConsoleApp:
    return ConsoleApp(broker.asyncio_client, address=broker.address, backoff=(0.1, 0.5), **kwargs)


@pytest.mark.slow
def test_dashboard_counts_follow_the_store(live: BrokerProcess) -> None:
    def submit_and_finish() -> dict[str, int]:
        with live.client() as client:
            specs = [{"type": "echo", "queue": "tui", "payload": i} for i in range(25)]
            specs += [
                {"type": "fail", "queue": "tui", "max_retries": 0, "payload": {"message": "no"}}
            ] * 3
            for task_id in client.submit_many(specs):
                client.wait(task_id, timeout=30)
            return dict(client.stats()["queues"]["tui"])

    async def scenario() -> None:
        app = console(live)
        before = set(threading.enumerate())  # earlier tests may leave idle pool threads
        async with app.run_test(size=(80, 24)) as pilot:
            await until(pilot, lambda: app.state.link.connected, "the first connection")
            await pilot.pause(0.2)  # the snapshot and the first poll are read meanwhile
            started = [t.name for t in set(threading.enumerate()) - before]
            assert started == [], "the console reads the broker without threads"
            # tasks run while the console watches: the counts arrive as events
            counts = await in_thread(submit_and_finish)
            assert counts == {"succeeded": 25, "dead": 3}
            await until(
                pilot,
                lambda: (
                    "tui" in app.screen.query_one("#queues", DataTable).rows
                    and queue_cells(app, "tui") == expected_cells(counts)
                ),
                f"the dashboard to show {counts}",
            )
            failures = app.screen.query_one("#failures", DataTable)
            await until(pilot, lambda: failures.row_count == 3, "the three failures")
            await until(
                pilot, lambda: "RuntimeError: no" in str(failures.get_row_at(0)), "their errors"
            )
            workers = app.screen.query_one("#workers", DataTable)
            assert workers.row_count == 1

    run(scenario)


@pytest.mark.slow
def test_a_task_submitted_from_the_form_appears(live: BrokerProcess) -> None:
    async def scenario() -> None:
        app = console(live)
        async with app.run_test(size=(80, 24)) as pilot:
            await until(pilot, lambda: app.state.link.connected, "the connection")
            await pilot.press("s")
            await until(
                pilot,
                lambda: isinstance(app.screen, SubmitScreen) and app.screen.query("#queue"),
                "the form",
            )
            await pilot.press(*"echo")
            queue = app.screen.query_one("#queue", Input)
            queue.value = "tui-form"  # a queue no worker takes: the task stays pending
            await pilot.press("ctrl+s")
            await until(pilot, lambda: not isinstance(app.screen, SubmitScreen), "the form to go")

            def listed() -> list[Task]:
                with live.client() as client:
                    return client.list(queue="tui-form").tasks

            tasks = await in_thread(listed)
            assert [(t.type, t.state.value, t.payload) for t in tasks] == [("echo", "pending", {})]
            app.show_tasks(queue="tui-form")
            await until(pilot, lambda: task_table(app) is not None, "the task list")
            table = task_table(app)
            assert table is not None
            await until(pilot, lambda: tasks[0].id in table.rows, "the task in the list")

    run(scenario)


@pytest.mark.slow
def test_cancel_retry_and_priority_change_the_task_in_the_broker(live: BrokerProcess) -> None:
    with live.client() as client:
        task_id = client.submit("echo", {"x": 1}, queue="tui-held")  # nobody takes this queue

    def state() -> tuple[str, int]:
        with live.client() as client:
            task = client.get(task_id)
            return task.state.value, task.priority

    async def scenario() -> None:
        app = console(live)
        async with app.run_test(size=(80, 24)) as pilot:
            await until(pilot, lambda: app.state.link.connected, "the connection")
            app.show_tasks(queue="tui-held")
            await until(pilot, lambda: task_table(app) is not None, "the task list")
            table = task_table(app)
            assert table is not None
            await until(pilot, lambda: task_id in table.rows, "the task")
            table.focus()

            await pilot.press("p")  # bump the priority: the dialog suggests "high"
            await until(pilot, lambda: isinstance(app.screen, PriorityScreen), "the dialog")
            await pilot.press("enter")
            await until(pilot, lambda: state_now[0] == ("pending", 200), "priority 200", 20)

            await pilot.press("c")  # cancel asks first
            await until(pilot, lambda: isinstance(app.screen, ConfirmScreen), "the question")
            await pilot.press("y")
            await until(pilot, lambda: state_now[0][0] == "cancelled", "cancelled")
            cell = lambda: str(table.get_row(task_id)[3]).split()[0]  # noqa: E731
            await until(pilot, lambda: cell() == "cancelled", "the row to say so")

            await pilot.press("r")  # retry does not ask
            await until(pilot, lambda: state_now[0][0] == "pending", "pending again")
            await until(pilot, lambda: cell() == "pending", "the row to say so")

    state_now: list[tuple[str, int]] = [("?", 0)]

    async def poll_state() -> None:
        while True:
            state_now[0] = await in_thread(state)
            await asyncio.sleep(0.1)

    async def both() -> None:
        poller = asyncio.create_task(poll_state())
        try:
            await scenario()
        finally:
            poller.cancel()

    run(both)


@pytest.mark.slow
def test_purge_counts_asks_and_deletes(live: BrokerProcess) -> None:
    with live.client() as client:
        gone = client.submit("echo", 1, queue="tui-purge")
        client.cancel(gone)
        client.submit("echo", 2, queue="tui-purge")  # the store never purges the newest task

    def cancelled() -> int:
        with live.client() as client:
            return len(client.list(state="cancelled").tasks)

    async def scenario() -> None:
        app = console(live)
        async with app.run_test(size=(80, 24)) as pilot:
            await until(pilot, lambda: app.state.link.connected, "the connection")
            app.action_purge(state="cancelled")
            await until(
                pilot,
                lambda: isinstance(app.screen, PurgeScreen) and app.screen.query("#age"),
                "the purge dialog",
            )
            app.screen.query_one("#age", Input).value = "0s"
            await pilot.press("enter")  # counts first (a dry run), then asks
            await until(
                pilot,
                lambda: isinstance(app.screen, ConfirmScreen),
                f"the question ({[n.message for n in app._notifications]})",
            )
            assert "Delete 1 cancelled task" in app.screen.question
            await pilot.press("y")
            deadline = time.monotonic() + 20
            while await in_thread(cancelled):
                assert time.monotonic() < deadline, "the cancelled task is still there"
                await pilot.pause(0.1)

    run(scenario)


@pytest.mark.slow
def test_the_console_survives_a_broker_restart_and_says_so(tmp_path: Path) -> None:
    with BrokerProcess(tmp_path / "broker") as broker:

        async def scenario() -> None:
            app = console(broker)
            async with app.run_test(size=(80, 24)) as pilot:
                await until(pilot, lambda: app.state.link.connected, "the connection")
                banner = app.screen.query_one(Banner)
                assert not banner.display
                await in_thread(broker.stop)
                await until(pilot, lambda: banner.display, "the banner")
                assert "DISCONNECTED" in str(banner.render())
                assert not app.state.link.connected and app.state.link.attempt >= 1
                assert "DISCONNECTED" in app.sub_title
                await in_thread(broker.start, broker.address)  # same port, same data
                await until(pilot, lambda: app.state.link.connected, "the reconnection")
                await until(pilot, lambda: not banner.display, "the banner to go")

                def submit() -> None:  # and it is live again: events flow
                    with broker.client() as client:
                        client.submit("echo", 1, queue="after-restart")

                await in_thread(submit)
                await until(
                    pilot,
                    lambda: app.state.counts.get("after-restart") == {"pending": 1},
                    "counts from the new broker",
                )

        run(scenario)


# -- snapshots -----------------------------------------------------------------------

NOW = 1_795_000_000.0  # 2026-11-18 09:46:40 UTC
UTC = dt.UTC


def task(n: int, state: str, **fields: Any) -> Task:
    data: dict[str, Any] = {
        "id": f"01a21f99-{n:04x}-7000-8000-{n:012x}",
        "type": "email" if n % 3 else "resize",
        "queue": "mail" if n % 2 else "default",
        "payload": {"to": f"user{n}@example.com"},
        "priority": 100 + (n % 3) * 50,
        "state": state,
        "attempts": 1 if state != "pending" else 0,
        "max_retries": 3,
        "timeout": 300.0,
        "retry_base": 1.0,
        "retry_cap": 300.0,
        "created_at": NOW - 600 + n * 7,
        "started_at": None if state == "pending" else NOW - 590 + n * 7,
        "finished_at": NOW - 580 + n * 7 if state in ("succeeded", "dead") else None,
        "worker": None if state == "pending" else f"worker-{n % 2}",
        "result": {"sent": True} if state == "succeeded" else None,
        "error": None,
        "idempotency_key": None,
    }
    data.update(fields)
    return Task.from_dict(data)


def fill(app: ConsoleApp) -> None:
    """Fixed broker state, fed through the same entry points the link uses."""
    stats = {
        "broker": "tq",
        "version": "0.1.0",
        "uptime": 9000.0,
        "store": {"path": "/x/tq.db", "size": 12_582_912, "wal": 1_048_576},
        "queues": {
            "default": {"pending": 1204, "running": 8, "failed": 3, "dead": 12, "succeeded": 98311},
            "mail": {"pending": 56, "running": 2, "succeeded": 20411, "cancelled": 4},
            "reports": {"pending": 7},
        },
    }
    workers = [
        {
            "id": "w1",
            "name": "worker-0",
            "host": "app-1",
            "queues": ["default", "mail"],
            "concurrency": 8,
            "running": 8,
            "cpu": 87.5,
            "memory": 220_000_000,
            "connected": True,
            "heartbeat_age": 2.0,
        },
        {
            "id": "w2",
            "name": "worker-1",
            "host": "app-2",
            "queues": ["default"],
            "concurrency": 4,
            "running": 2,
            "cpu": 12.0,
            "memory": 95_000_000,
            "connected": True,
            "heartbeat_age": 19.0,  # stale: more than lease_ttl / 2
        },
        {
            "id": "w3",
            "name": "worker-2",
            "host": "app-3",
            "queues": ["reports"],
            "concurrency": 2,
            "running": 0,
            "cpu": None,
            "memory": None,
            "connected": False,
            "heartbeat_age": 25.0,
        },
    ]
    failing = [
        task(i, "failed", error={"type": "SMTPError", "message": "451 try later"}) for i in (1, 3)
    ]
    server = {"broker": "tq", "lease_ttl": 30.0, "server": "tq/0.1.0"}
    app._link_up(Snapshot(server, stats, workers, failing))
    app._event(
        Event(
            "tasks",
            1,
            NOW,
            {
                "changes": [
                    {
                        "id": task(5, "dead").id,
                        "type": "resize",
                        "queue": "default",
                        "from": "running",
                        "to": "dead",
                    },
                ],
                "more": 0,
            },
        )
    )
    app.state.note_error(
        task(5, "dead").id, "ValueError: image too large (12000x9000)", "out of retries"
    )
    oldest = {  # each queue's oldest pending task: its age shows under Wait
        "default": Pending("a", "resize", NOW - 4000),
        "mail": Pending("b", "email", NOW - 75),
        "reports": Pending("c", "report", NOW - 905),
    }
    app.state.set_oldest(oldest)
    history = [40.0, 42.5, 38.0, 51.0, 60.5, 58.0, 47.0, 30.0, 12.0, 0.0, 5.5, 22.0]
    app.state.history = {"default": deque(history * 5, maxlen=60)}


def page() -> Page:
    states = ["succeeded", "running", "pending", "dead", "failed", "cancelled", "pending"]
    return Page([task(i, states[i % len(states)]) for i in range(1, 31)], None, "next-cursor")


def screen_text(app: ConsoleApp) -> str:
    """The characters on screen, line by line (what a person reads)."""
    width, height = app.size
    console = Console(
        width=width, height=height, file=io.StringIO(), record=True, color_system=None
    )
    console.print(
        app.screen._compositor.render_update(full=True, screen_stack=app._background_screens)
    )
    return "\n".join(line.rstrip() for line in console.export_text().splitlines()) + "\n"


def compare(name: str, text: str, svg: str) -> None:
    """Compare with the stored snapshot (or store it with TQ_UPDATE_SNAPSHOTS=1)."""
    version = textual.__version__
    txt_file, svg_file, version_file = (
        SNAPSHOTS / f"{name}.txt",
        SNAPSHOTS / f"{name}.svg",
        SNAPSHOTS / "VERSION",
    )
    if os.environ.get("TQ_UPDATE_SNAPSHOTS"):
        SNAPSHOTS.mkdir(exist_ok=True)
        txt_file.write_text(text, encoding="utf-8")
        svg_file.write_text(svg, encoding="utf-8")
        version_file.write_text(f"textual {version}\n", encoding="utf-8")
        return
    assert txt_file.exists(), f"no snapshot {txt_file}: record it with TQ_UPDATE_SNAPSHOTS=1"
    expected = txt_file.read_text(encoding="utf-8")
    if text != expected:
        diff = "\n".join(
            difflib.unified_diff(expected.splitlines(), text.splitlines(), "stored", "now", n=1)
        )
        raise AssertionError(f"screen {name} changed:\n{diff}")
    if version_file.read_text(encoding="utf-8").strip() == f"textual {version}":
        assert svg == svg_file.read_text(encoding="utf-8"), (
            f"screen {name}: same characters, different colours or styles than {svg_file}"
        )


async def show(app: ConsoleApp, pilot: Pilot[Any], view: str) -> None:
    fill(app)
    if view == "tasks":
        app.switch_mode("tasks")
        await pilot.pause()
        screen = app.screen
        assert isinstance(screen, TasksScreen)
        screen._loading = False
        screen.show_page(page())
    elif view == "detail":
        failed = task(
            4,
            "dead",
            attempts=4,
            error={
                "type": "ValueError",
                "message": "image too large (12000x9000)",
                "traceback": 'Traceback (most recent call last):\n  File "tasks.py", line 12, '
                "in resize\n    raise ValueError(...)\nValueError: image too large",
            },
        )
        app.push_screen(TaskScreen(failed.id, failed))
    elif view == "submit":
        app.push_screen(SubmitScreen("mail"))
        await pilot.pause()
        for widget in app.screen.query(Input):
            widget.cursor_blink = False
    elif view == "disconnected":
        app._link_down(
            "cannot connect to the broker at 127.0.0.1:7470: Connection refused; is it running?",
            4.0,
            3,
        )
    elif view == "light":
        app.theme = "textual-light"
    await pilot.pause()
    app.redraw()
    await pilot.pause()
    await pilot.pause()


SNAPSHOT_CASES = [
    ("dashboard", (80, 24)),
    ("dashboard", (160, 48)),
    ("tasks", (80, 24)),
    ("tasks", (160, 48)),
    ("detail", (80, 24)),
    ("submit", (80, 24)),
    ("disconnected", (80, 24)),
    ("light", (80, 24)),
]


def snapshot(view: str, size: tuple[int, int]) -> tuple[str, str]:
    result: list[tuple[str, str]] = []

    async def scenario() -> None:
        app = ConsoleApp(address="127.0.0.1:7470", clock=lambda: NOW, tz=UTC)
        async with app.run_test(size=size) as pilot:
            await show(app, pilot, view)
            result.append((screen_text(app), app.export_screenshot()))

    run(scenario)
    return result[0]


@pytest.mark.parametrize(("view", "size"), SNAPSHOT_CASES, ids=lambda v: str(v))
def test_snapshot(view: str, size: tuple[int, int]) -> None:
    text, svg = snapshot(view, size)
    compare(f"{view}-{size[0]}x{size[1]}", text, svg)


def test_snapshots_notice_a_change(monkeypatch: pytest.MonkeyPatch) -> None:
    """A screen that differs by one figure fails the comparison."""
    monkeypatch.delenv("TQ_UPDATE_SNAPSHOTS", raising=False)
    original = fill

    def one_more_dead(app: ConsoleApp) -> None:
        original(app)
        app.state.counts["default"]["dead"] += 1

    monkeypatch.setattr(sys.modules[__name__], "fill", one_more_dead)
    text, svg = snapshot("dashboard", (80, 24))
    with pytest.raises(AssertionError, match="screen dashboard-80x24 changed"):
        compare("dashboard-80x24", text, svg)


# -- text another party chose ----------------------------------------------------------

HOSTILE_TYPE = "[link=http://evil]x[/link]\x1b]8;;http://evil\x07"
HOSTILE_QUEUE = "[red]q\x1b[2J"
HOSTILE_HOST = "[link=http://evil]host[/link]\u202e"
HOSTILE_ERROR = "boom \x1b[31m[red]red[/red]\x9b2J"


def hostile_fill(app: ConsoleApp) -> Task:
    """Broker state whose names and messages carry markup and escape sequences."""
    stats = {
        "broker": "tq",
        "version": "0.1.0",
        "uptime": 60.0,
        "store": {"size": 1, "wal": 0},
        "queues": {HOSTILE_QUEUE: {"pending": 1, "dead": 1}},
    }
    workers = [
        {
            "id": "w[red]1",
            "name": "w[red]1\x1b[5m",
            "host": HOSTILE_HOST,
            "queues": [HOSTILE_QUEUE],
            "concurrency": 1,
            "running": 0,
            "cpu": 1.0,
            "memory": 1,
            "connected": True,
            "heartbeat_age": 1.0,
        }
    ]
    error = {"type": "Evil", "message": HOSTILE_ERROR, "traceback": f"tb\n{HOSTILE_ERROR}"}
    dead = task(1, "dead", type=HOSTILE_TYPE, queue=HOSTILE_QUEUE, worker="w[red]1", error=error)
    server = {"broker": "tq", "lease_ttl": 30.0, "server": "tq/0.1.0"}
    app._link_up(Snapshot(server, stats, workers, [dead]))
    app.state.note_error(dead.id, f"Evil: {HOSTILE_ERROR}")
    return dead


def assert_literal(text: str, *shown: str) -> None:
    assert "\x1b" not in text and "\x9b" not in text and "\u202e" not in text, text
    for piece in shown:
        assert piece in text, f"{piece!r} not on screen:\n{text}"


def test_the_console_shows_hostile_text_literally() -> None:
    screens: dict[str, str] = {}

    async def scenario() -> None:
        app = ConsoleApp(address="127.0.0.1:7470", clock=lambda: NOW, tz=UTC)
        async with app.run_test(size=(200, 50)) as pilot:
            dead = hostile_fill(app)
            await pilot.pause()
            app.redraw()
            await pilot.pause()
            screens["dashboard"] = screen_text(app)
            app.switch_mode("tasks")
            await pilot.pause()
            tasks = app.screen
            assert isinstance(tasks, TasksScreen)
            tasks._loading = False
            tasks.show_page(Page([dead], None, None))
            await pilot.pause()
            screens["tasks"] = screen_text(app)
            app.push_screen(TaskScreen(dead.id, dead))
            await pilot.pause()
            await pilot.pause()
            screens["detail"] = screen_text(app)

    run(scenario)
    assert_literal(screens["dashboard"], "[red]q\\x1b[2J", "[link=http://ev…")  # host, cut
    assert_literal(screens["dashboard"], "w[red]1\\x1b[5m", "[red]red[/red]")
    assert_literal(screens["tasks"], "[link=http://evil]x…", "[red]q\\x1b[2J", "w[red]1")
    assert_literal(
        screens["detail"],
        "[link=http://evil]x[/link]\\x1b]8;;http://evil\\x07 / [red]q\\x1b[2J",
        "Evil: boom \\x1b[31m[red]red[/red]\\x9b2J",
    )


def test_the_detail_view_shows_dependencies_and_history() -> None:
    shown: dict[str, str] = {}

    async def scenario() -> None:
        app = ConsoleApp(address="127.0.0.1:7470", clock=lambda: NOW, tz=UTC)
        async with app.run_test(size=(200, 60)) as pilot:
            dead = hostile_fill(app)
            app.push_screen(TaskScreen(dead.id, dead))
            await pilot.pause()
            screen = app.screen
            assert isinstance(screen, TaskScreen)
            rows = [
                {
                    "n": 1,
                    "at": NOW - 60,
                    "event": "submitted",
                    "state": "pending",
                    "actor": "key:abc",
                    "priority": 100,
                },
                {
                    "n": 7,
                    "at": NOW - 30,
                    "event": "leased",
                    "state": "running",
                    "worker": "w[red]1\x1b[5m",
                    "token": 4242,
                },
                {
                    "n": 8,
                    "at": NOW - 10,
                    "event": "dead",
                    "state": "dead",
                    "worker": "w1",
                    "token": 4242,
                    "error": {"type": "Evil", "message": "boom"},
                },
            ]
            links = {
                "depends_on": [{"id": "dep-1", "state": "succeeded"}],
                "dependents": [{"id": "next-1", "state": None}],
            }
            screen._show_extras((rows, links))
            await pilot.pause()
            shown["detail"] = screen_text(app)

    run(scenario)
    assert_literal(
        shown["detail"],
        "depends on dep-1  succeeded",
        "needed by  next-1  (not visible)",
        "submitted  key:abc",
        "5 transition(s) not kept",
        "worker:w[red]1\\x1b[5m  token 4242",
        "dead       worker:w1  Evil: boom",
    )


# -- staying light -------------------------------------------------------------------


def table_updates(app: ConsoleApp) -> dict[str, int]:
    """How often each table of the screen was changed (Textual counts every change)."""
    return {str(t.id): t._update_count for t in app.screen.query(DataTable)}


def test_a_redraw_that_changes_nothing_touches_no_table() -> None:
    """Tables are updated in place: an idle tick costs no rendering, a change costs
    one cell, and the cursor stays on its row."""

    async def scenario() -> None:
        app = ConsoleApp(address="127.0.0.1:7470", clock=lambda: NOW, tz=UTC)
        async with app.run_test(size=(80, 24)) as pilot:
            fill(app)
            app.redraw()
            await pilot.pause()
            queues = app.screen.query_one("#queues", DataTable)
            queues.move_cursor(row=2)
            before = table_updates(app)
            for _ in range(3):
                app.redraw()
                await pilot.pause()
            assert table_updates(app) == before, "an idle redraw changed a table"
            key = queues.coordinate_to_cell_key(queues.cursor_coordinate).row_key
            app.state.counts["default"]["running"] += 1
            app.redraw()
            await pilot.pause()
            after = table_updates(app)
            assert after["queues"] - before["queues"] in (1, 2), "more than the changed cells"
            assert {k: v for k, v in after.items() if k != "queues"} == {
                k: v for k, v in before.items() if k != "queues"
            }
            assert queues.coordinate_to_cell_key(queues.cursor_coordinate).row_key == key
            for _ in range(30):  # renders that can never be used again are not kept
                app.state.counts["default"]["running"] += 1
                app.redraw()
                await pilot.pause()
            cells = (queues.row_count + 1) * len(queues.columns)
            assert len(queues._cell_render_cache) <= cells, "stale renders pile up"

    run(scenario)


def test_a_hidden_screen_is_not_redrawn_and_state_is_bounded() -> None:
    async def scenario() -> None:
        app = ConsoleApp(address="127.0.0.1:7470", clock=lambda: NOW, tz=UTC)
        async with app.run_test(size=(80, 24)) as pilot:
            fill(app)
            app.redraw()
            await pilot.pause()
            dashboard = app.screen
            before = {str(t.id): t._update_count for t in dashboard.query(DataTable)}
            app.switch_mode("tasks")
            await pilot.pause()
            for n in range(500):  # a long busy spell: failures and samples pile up
                change = {"id": f"t{n:05d}", "type": "x", "queue": "q", "from": "running"}
                app._event(Event("tasks", n, NOW + n, {"changes": [{**change, "to": "dead"}]}))
                app.state.counts["q"] = {"dead": n}
                app.state.sample(NOW + n * 5)
                app.redraw()
            await pilot.pause()
            after = {str(t.id): t._update_count for t in dashboard.query(DataTable)}
            assert after == before, "the dashboard was redrawn behind the tasks screen"
            assert len(app.state.failures) == 100
            assert all(len(series) <= 60 for series in app.state.history.values())
            app.switch_mode("dashboard")
            await pilot.pause()
            failures = app.screen.query_one("#failures", DataTable)
            assert failures.row_count == 100 and "t00499" in failures.rows

    run(scenario)


# -- failures: every one with its error, across reconnections ------------------------


def failure_errors(app: ConsoleApp) -> dict[str, str]:
    table = app.screen.query_one("#failures", DataTable)
    return {str(key.value): str(table.get_cell(key, "Error")) for key in table.rows}


@pytest.mark.slow
def test_every_failure_of_a_burst_gets_its_error_even_across_a_reconnection(
    tmp_path: Path,
) -> None:
    with BrokerProcess(tmp_path / "broker") as broker:
        broker.start_worker("--concurrency", "8", "--queues", "burst")
        broker.wait_for_workers(1)
        gate = asyncio.Event()
        gate.set()

        async def connect() -> Any:
            await gate.wait()  # closed: the console cannot reconnect yet
            return await broker.asyncio_client()

        def burst(message: str, n: int = 12) -> list[str]:
            with broker.client() as client:
                spec = {"type": "fail", "queue": "burst", "max_retries": 0}
                ids = client.submit_many([{**spec, "payload": {"message": message}}] * n)
                for task_id in ids:
                    client.wait(task_id, timeout=30)
                return ids

        async def scenario() -> None:
            app = ConsoleApp(connect, address=broker.address, backoff=(0.1, 0.5))
            async with app.run_test(size=(160, 48)) as pilot:
                await until(pilot, lambda: app.state.link.connected, "the connection")
                ids = await in_thread(burst, "while watched")
                await until(
                    pilot,
                    lambda: all(
                        failure_errors(app).get(i, "").endswith("RuntimeError: while watched")
                        for i in ids
                    ),
                    "12 errors, not 5",
                )
                assert failure_errors(app)[ids[0]].startswith("out of retries: ")
                gate.clear()  # the console goes away and cannot come back yet
                app.action_reconnect()
                await until(pilot, lambda: not app.state.link.connected, "the disconnection")
                away = await in_thread(burst, "while away")
                gate.set()
                await until(pilot, lambda: app.state.link.connected, "the reconnection")
                await until(
                    pilot,
                    lambda: all(
                        failure_errors(app).get(i, "").endswith("RuntimeError: while away")
                        for i in away
                    ),
                    "the failures from while it was away",
                )

        run(scenario)


# -- order: newest first -------------------------------------------------------------


@pytest.mark.slow
def test_the_task_list_shows_the_newest_first(live: BrokerProcess) -> None:
    with live.client() as client:
        ids = [client.submit("echo", i, queue="tui-order") for i in range(3)]

    async def scenario() -> None:
        app = console(live)
        async with app.run_test(size=(80, 24)) as pilot:
            await until(pilot, lambda: app.state.link.connected, "the connection")
            app.show_tasks(queue="tui-order")
            await until(pilot, lambda: (t := task_table(app)) and t.row_count == 3, "3 tasks")
            table = task_table(app)
            assert table is not None
            shown = [str(table.coordinate_to_cell_key((r, 0)).row_key.value) for r in range(3)]
            assert shown == ids[::-1]

    run(scenario)


def test_failures_in_one_burst_show_the_newest_first() -> None:
    async def scenario() -> None:
        app = ConsoleApp(address="127.0.0.1:7470", clock=lambda: NOW, tz=UTC)
        async with app.run_test(size=(80, 24)) as pilot:
            fill(app)
            burst = [task(n, "dead").id for n in (40, 41, 42)]
            changes = [  # the broker may list a burst in any order
                {"id": i, "type": "email", "queue": "mail", "from": "running", "to": "dead"}
                for i in reversed(burst)
            ]
            app._event(Event("tasks", 2, NOW + 5, {"changes": changes, "more": 0}))
            app.redraw()
            await pilot.pause()
            table = app.screen.query_one("#failures", DataTable)
            top = [str(table.coordinate_to_cell_key((r, 0)).row_key.value) for r in range(3)]
            assert top == burst[::-1]

    run(scenario)


# -- stuck work and throughput from before --------------------------------------------


@pytest.mark.slow
def test_stuck_queues_show_their_wait_and_why_and_throughput_from_before(tmp_path: Path) -> None:
    with BrokerProcess(tmp_path / "broker") as broker:
        broker.start_worker("--queues", "busy")  # the built-in handlers: echo, sleep, fail
        broker.wait_for_workers(1)
        with broker.client() as client:
            for task_id in client.submit_many([{"type": "echo", "queue": "busy"}] * 30):
                client.wait(task_id, timeout=30)
            client.submit("echo", 1, queue="nobody")  # no worker takes this queue
            client.submit("resize", 1, queue="busy")  # no worker has this type

        async def scenario() -> None:
            app = console(broker)
            async with app.run_test(size=(120, 30)) as pilot:
                await until(pilot, lambda: app.state.link.connected, "the connection")
                table = app.screen.query_one("#queues", DataTable)
                # before any sample of its own (every 5 s), from the broker's last minute
                await until(
                    pilot,
                    lambda: "busy" in table.rows and str(table.get_cell("busy", "Done/s")) != "-",
                    "the throughput of the last minute",
                    seconds=4,
                )
                await until(
                    pilot,
                    lambda: (
                        "nobody" in table.rows
                        and str(table.get_cell("nobody", "Wait")) not in ("", "-")
                    ),
                    "the oldest pending task's age",
                )
                assert str(table.get_cell("nobody", "Queue")) == "nobody ⚠"
                assert str(table.get_cell("busy", "Queue")) == "busy ⚠"
                title = str(table.border_title)
                assert "nobody: no worker" in title, title
                assert "busy: no worker for resize" in title, title

        run(scenario)


# -- readable without colour, filters you can see and clear ----------------------------


def test_filters_are_spelled_out_and_clear_and_the_palette_has_any_state() -> None:
    async def scenario() -> None:
        app = ConsoleApp(address="127.0.0.1:7470", clock=lambda: NOW, tz=UTC)
        async with app.run_test(size=(80, 24)) as pilot:
            fill(app)
            app.show_tasks(queue="mail", state="dead")  # as a drill-down does
            await pilot.pause()
            screen = app.screen
            assert isinstance(screen, TasksScreen)
            screen._loading = False
            screen.show_page(page())
            await pilot.pause()
            assert "Tasks · state dead, queue mail, backspace clears" in screen_text(app)
            await pilot.press("backspace")
            await pilot.pause()
            assert screen.filter == TaskFilter()
            assert screen.query_one("#queue", Input).value == ""
            titles = [c.title for c in app.get_system_commands(screen)]
            assert "Tasks: any state" in titles and "Tasks: all" in titles

    run(scenario)


def test_focus_and_checkboxes_read_without_colour(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NO_COLOR", "1")
    texts: list[str] = []

    async def scenario() -> None:
        app = ConsoleApp(address="127.0.0.1:7470", clock=lambda: NOW, tz=UTC)
        async with app.run_test(size=(80, 24)) as pilot:
            fill(app)
            app.redraw()
            await pilot.pause()
            texts.append(screen_text(app))
            await pilot.press("tab")
            await pilot.pause()
            texts.append(screen_text(app))
            app.action_purge(state="dead")
            await pilot.pause()
            await pilot.pause()
            texts.append(screen_text(app))

    run(scenario)
    first, tabbed, purge = texts
    assert "▶ Queues" in first and "▶ Workers" not in first
    assert "▶ Workers" in tabbed and "▶ Queues" not in tabbed
    assert "[ ] succeeded" in purge and "[x] dead" in purge and "[ ] cancelled" in purge


# -- many queues at 80x24 ---------------------------------------------------------------


def test_many_queues_fit_at_80x24_those_in_trouble_first() -> None:
    text: list[str] = []

    async def scenario() -> None:
        app = ConsoleApp(address="127.0.0.1:7470", clock=lambda: NOW, tz=UTC)
        async with app.run_test(size=(80, 24)) as pilot:
            fill(app)
            # nine queues (with "default", which still has a throughput history)
            queues = {f"q{n}": {"pending": 3, "succeeded": 10 * n} for n in range(1, 9)}
            queues["q5"]["dead"] = 301
            queues["q3"]["failed"] = 2
            app.state.apply_stats({**app.state.stats, "queues": queues}, NOW)
            app.state.set_oldest({"q7": Pending("x", "echo", NOW - 600)})
            app.redraw()
            await pilot.pause()
            text.append(screen_text(app))

    run(scenario)
    lines = [line.split()[0] for line in text[0].splitlines()[4:14]]
    expected = ["(all)", "q5", "q3", "q7", "default", "q1", "q2", "q4", "q6", "q8"]
    assert lines == expected, text[0]


def test_a_paused_queue_is_marked_on_the_dashboard() -> None:
    text: list[str] = []

    async def scenario() -> None:
        app = ConsoleApp(address="127.0.0.1:7470", clock=lambda: NOW, tz=UTC)
        async with app.run_test(size=(100, 30)) as pilot:
            fill(app)
            queues = {"held": {"pending": 4}, "busy": {"pending": 1}}
            app.state.apply_stats({**app.state.stats, "queues": queues, "paused": ["held"]}, NOW)
            app.redraw()
            await pilot.pause()
            text.append(screen_text(app))

    run(scenario)
    rows = {line.split()[0]: line for line in text[0].splitlines() if line.split()}
    assert "held paused" in rows["held"], text[0]
    assert "paused" not in rows["busy"], text[0]


def test_a_queue_at_its_concurrency_cap_is_marked_on_the_dashboard() -> None:
    text: list[str] = []

    async def scenario() -> None:
        app = ConsoleApp(address="127.0.0.1:7470", clock=lambda: NOW, tz=UTC)
        async with app.run_test(size=(100, 30)) as pilot:
            fill(app)
            queues = {"full": {"pending": 4, "running": 2}, "roomy": {"running": 1}}
            caps = [
                {"kind": "queue", "name": "full", "concurrency": 2, "rate": None, "burst": None},
                {"kind": "queue", "name": "roomy", "concurrency": 5, "rate": None, "burst": None},
            ]
            app.state.apply_stats({**app.state.stats, "queues": queues, "caps": caps}, NOW)
            app.redraw()
            await pilot.pause()
            text.append(screen_text(app))

    run(scenario)
    rows = {line.split()[0]: line for line in text[0].splitlines() if line.split()}
    assert "full capped" in rows["full"], text[0]
    assert "capped" not in rows["roomy"], text[0]


# -- attempts and why a task is dead ------------------------------------------------------


def test_attempts_and_why_a_task_is_dead_are_unambiguous() -> None:
    texts: list[str] = []
    error = {"type": "ExitStatus", "message": "exit status 3", "traceback": None}
    refused = task(7, "dead", attempts=1, max_retries=1, error=error)
    spent = task(8, "dead", attempts=2, max_retries=1, error=error)

    async def scenario() -> None:
        app = ConsoleApp(address="127.0.0.1:7470", clock=lambda: NOW, tz=UTC)
        async with app.run_test(size=(80, 24)) as pilot:
            for one in (refused, spent):
                app.push_screen(TaskScreen(one.id, one))
                await pilot.pause()
                await pilot.pause()
                texts.append(screen_text(app))
                app.pop_screen()
            app.switch_mode("tasks")
            await pilot.pause()
            screen = app.screen
            assert isinstance(screen, TasksScreen)
            screen._loading = False
            screen.show_page(Page([refused, spent], None, None))
            await pilot.pause()
            texts.append(screen_text(app))

    run(scenario)
    refused_text, spent_text, listed = texts
    assert "dead: not retried (ExitStatus)" in refused_text
    assert "1 of 2 runs allowed (max_retries 1)" in refused_text
    assert "dead: out of retries" in spent_text
    assert "2 of 2 runs allowed (max_retries 1)" in spent_text
    assert "Runs" in listed and "Att" not in listed
    rows = {line.split()[0]: line for line in listed.splitlines() if "…0000000000" in line}
    assert "dead not retried" in rows["…000000000007"] and "1 of 2" in rows["…000000000007"]
    assert "not retried" not in rows["…000000000008"] and "2 of 2" in rows["…000000000008"]


PROGRESS_PROGRAM = """
import os, sys, time
for step in ("0.25 one quarter", "0.5 one half"):
    sys.stderr.write("tq-progress " + step + "\\n"); sys.stderr.flush()
    gate = sys.argv[1] + step.split()[0]
    while not os.path.exists(gate):
        time.sleep(0.02)
print('{"pages": 10}')
"""


@pytest.mark.slow
def test_the_detail_view_shows_a_running_tasks_progress_as_it_moves(tmp_path: Path) -> None:
    """A worker runs a program that reports 25 %, waits, then 50 %: the open detail
    view shows each (the second from the progress event, without a reload)."""
    program = tmp_path / "pages.py"
    program.write_text(PROGRESS_PROGRAM)
    gate = str(tmp_path / "gate-")
    shown: dict[str, str] = {}
    with BrokerProcess(tmp_path / "broker", "--lease-ttl", "30") as broker:
        broker.start_worker("--exec", f"pages={sys.executable} {program} {gate}")
        broker.wait_for_workers(1)
        with broker.client() as client:
            task_id = client.submit("pages", None)

        async def scenario() -> None:
            app = console(broker)
            async with app.run_test(size=(120, 40)) as pilot:
                await until(pilot, lambda: app.state.link.connected, "the connection")
                app.open_task(task_id)
                await until(pilot, lambda: isinstance(app.screen, TaskScreen), "the detail")
                screen = app.screen
                assert isinstance(screen, TaskScreen)
                reloads: list[int] = []
                await until(
                    pilot, lambda: "25% one quarter" in screen_text(app), "25 % on screen", 30
                )
                shown["quarter"] = screen_text(app)
                reload = screen.action_reload

                def counted_reload() -> None:
                    reloads.append(1)
                    reload()

                screen.action_reload = counted_reload  # type: ignore[method-assign]
                Path(gate + "0.25").touch()
                await until(pilot, lambda: "50% one half" in screen_text(app), "50 % on screen", 30)
                shown["half"] = screen_text(app)
                shown["reloads"] = str(len(reloads))
                Path(gate + "0.5").touch()
                await until(
                    pilot,
                    lambda: (
                        screen.task_data is not None and screen.task_data.state.value == "succeeded"
                    ),
                    "the task to end",
                    30,
                )
                await pilot.pause(0.1)
                shown["done"] = screen_text(app)

        run(scenario)
    assert_literal(shown["quarter"], "running", "progress", "█████░░░░░░░░░░░░░░░ 25% one quarter")
    assert "50%" not in shown["quarter"]
    assert_literal(shown["half"], "running", "██████████░░░░░░░░░░ 50% one half")
    assert shown["reloads"] == "0"  # the progress event, not a reload, moved it
    assert_literal(shown["done"], "succeeded", "50% one half")  # the last progress stays
