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
from tq.tui.link import Page, Snapshot  # noqa: E402
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
    return ConsoleApp(broker.client, address=broker.address, backoff=(0.1, 0.5), **kwargs)


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
        async with app.run_test(size=(80, 24)) as pilot:
            await until(pilot, lambda: app.state.link.connected, "the first connection")
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
