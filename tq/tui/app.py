"""The tq console: a Textual app over one asyncio client (see link.py), no threads.

    ConsoleApp(lambda: AsyncioClient.open_from_settings(settings), address=...).run()

Data flow: the link's task (a Textual worker on the app's loop) calls
``_link_up`` / ``_event`` / ``_link_down``; they update ``self.state``
(model.py); a 1 s tick bumps ``revision``, which the screen in sight
watches to redraw, so any number of events costs one redraw a second (ages
move on too); screens out of sight redraw when they come back, and tables
change only the cells that changed (widgets.KeyedTable): a table re-renders
all its visible cells when any of them changes, so fewer redraws are what
keeps the console light under load. Connection changes and the operator's
own actions redraw at once. Requests
(lists, actions) run in Textual workers via ``request`` and report back the
same way. Screens that show tasks register in ``task_listeners`` to hear
about task changes. Without a ``connect`` function the app is offline (the
snapshot tests feed it data directly).
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, ClassVar, TypeVar

from textual.app import App, SystemCommand
from textual.binding import Binding
from textual.reactive import reactive
from textual.screen import Screen

from tq.client import AsyncioClient, Event
from tq.core.errors import TQError
from tq.core.task import Task
from tq.tui import fmt
from tq.tui.link import (
    FAILED_SEED,
    BrokerLink,
    Connect,
    Page,
    Snapshot,
    TaskFilter,
    fetch_page,
    read_failures,
    read_oldest,
)
from tq.tui.model import SAMPLE_SECONDS, ConsoleState, Pending
from tq.tui.screens.dashboard import DashboardScreen
from tq.tui.screens.detail import TaskScreen
from tq.tui.screens.dialogs import (
    ConfirmScreen,
    HelpScreen,
    PriorityScreen,
    PurgeScreen,
    SubmitScreen,
)
from tq.tui.screens.tasks import TasksScreen

T = TypeVar("T")
POLL_SECONDS = 5.0  # stats, workers (CPU, memory) and oldest pending tasks: a safety net
REDRAW_SECONDS = 1.0  # one redraw a second, however fast events come
DARK, LIGHT = "textual-dark", "textual-light"


class ConsoleApp(App[None]):
    CSS_PATH = "tq.tcss"
    TITLE = "tq console"
    BINDINGS: ClassVar[list[Any]] = [
        Binding("d", "show('dashboard')", "Dash"),
        Binding("t", "show('tasks')", "Tasks"),
        Binding("s", "submit", "Submit"),
        Binding("question_mark,f1", "help", "Help"),
        Binding("q", "quit", "Quit"),
        Binding("ctrl+t", "toggle_dark", "Light/dark", show=False),
        Binding("ctrl+r", "reconnect", "Reconnect", show=False),
    ]
    MODES: ClassVar[dict[str, Any]] = {"dashboard": DashboardScreen, "tasks": TasksScreen}
    DEFAULT_MODE = "dashboard"

    revision: reactive[int] = reactive(0, init=False)

    def __init__(
        self,
        connect: Connect | None = None,
        *,
        address: str = "",
        clock: Callable[[], float] = time.time,
        tz: dt.tzinfo | None = None,
        poll_seconds: float = POLL_SECONDS,
        backoff: tuple[float, float] = (0.25, 5.0),
        theme: str | None = None,
    ) -> None:
        super().__init__()
        self.clock = clock
        self.tz = tz
        self.state = ConsoleState(address=address)
        self.link = (
            BrokerLink(connect, backoff_min=backoff[0], backoff_max=backoff[1])
            if connect is not None
            else None
        )
        self.poll_seconds = poll_seconds
        self.task_listeners: set[Any] = set()
        self._explaining = False
        self._polling = False
        self._rereading = False
        if theme:
            self.theme = theme
        self.sub_title = address

    # -- life ----------------------------------------------------------
    def on_mount(self) -> None:
        self.set_interval(REDRAW_SECONDS, self.redraw)  # events, and ages moving on
        self.set_interval(SAMPLE_SECONDS, self._sample)
        if self.link is not None:
            self.run_worker(self._run_link(), group="link", exit_on_error=False)
            self.set_interval(self.poll_seconds, self.poll)

    def on_unmount(self) -> None:
        if self.link is not None:
            self.link.stop()  # closes the connection: its subscription and requests end

    def redraw(self) -> None:
        self.revision += 1

    def _changed(self) -> None:
        """The state changed: the next tick shows it."""

    def _sample(self) -> None:
        self.state.sample(self.clock())
        self._changed()

    def watch_theme(self, _: str) -> None:
        self.redraw()  # state colours come from the theme

    # -- the link (callbacks run on the app's loop) ----------------------
    async def _run_link(self) -> None:
        assert self.link is not None
        await self.link.run(on_up=self._link_up, on_event=self._event, on_down=self._link_down)

    def _link_up(self, snapshot: Snapshot) -> None:
        was_down = not self.state.link.connecting and not self.state.link.connected
        self.state.connected(
            snapshot.server, snapshot.stats, snapshot.workers, self.clock(), snapshot.failed
        )
        self.sub_title = f"{self.state.address} · connected"
        if was_down:
            self.notify(f"reconnected to {self.state.address}", title="broker")
        for listener in list(self.task_listeners):
            listener.reload()
        self._explain_failures()
        self.poll()  # the oldest pending tasks
        self.redraw()

    def _link_down(self, reason: str, retry_in: float, attempt: int) -> None:
        self.state.disconnected(reason, retry_in, attempt, self.clock())
        self.sub_title = f"{self.state.address} · DISCONNECTED"
        self.redraw()

    def _event(self, event: Event) -> None:
        self.state.apply_event(event, self.clock())
        if event.topic == "tasks":
            for listener in list(self.task_listeners):
                listener.task_changes(event)
            if any(c.get("to") in ("failed", "dead") for c in event.data.get("changes") or ()):
                self._explain_failures()
            elif event.data.get("more") and any(
                t.get("to") in ("failed", "dead") for t in event.data.get("totals") or ()
            ):
                self._read_failures()  # too many changes to list: read the newest failures
        elif event.topic == "progress":
            for listener in list(self.task_listeners):
                shown = getattr(listener, "task_progress", None)
                if shown is not None:
                    shown(event)
        elif event.topic == "lagged":
            self.notify(
                f"the broker dropped {event.data.get('dropped')} events for this console; "
                "refreshing",
                severity="warning",
            )
            self.poll()
            for listener in list(self.task_listeners):
                listener.task_changes(Event("tasks", 0, 0.0, {"changes": [], "more": 1}))
        self._changed()

    def poll(self) -> None:
        """Refresh stats, workers (uptime, store size, CPU/memory between events) and
        each queue's oldest pending task."""
        if self.link is None or not self.state.link.connected or self._polling:
            return
        self._polling = True

        async def read(
            client: AsyncioClient,
        ) -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, Pending | None]]:
            stats = await client.stats()
            queues = stats.get("queues") or {}
            waiting = sorted(
                (q for q, c in queues.items() if c.get("pending")),
                key=lambda q: -int(queues[q].get("pending") or 0),
            )
            return stats, await client.workers(), await read_oldest(client, waiting)

        def done(
            result: tuple[dict[str, Any], list[dict[str, Any]], dict[str, Pending | None]],
        ) -> None:
            self._polling = False
            now = self.clock()
            self.state.apply_stats(result[0], now)
            self.state.apply_workers(result[1], now)
            self.state.set_oldest(result[2])
            self._changed()

        self.request("refresh", read, done, quiet=True, failed=self._poll_failed)

    def _poll_failed(self) -> None:
        self._polling = False

    def _read_failures(self) -> None:
        """Read the newest failed and dead tasks (when an event could not list them)."""
        if self._rereading or self.link is None:
            return
        self._rereading = True

        async def read(client: AsyncioClient) -> list[Task]:
            return [
                task
                for state in ("failed", "dead")
                for task in (
                    await client.list(state=state, limit=FAILED_SEED, newest_first=True)
                ).tasks
            ]

        def done(tasks: list[Task]) -> None:
            self._rereading = False
            self.state.merge_failures(tasks)
            self._changed()

        self.request("failures", read, done, quiet=True, failed=self._reread_failed)

    def _reread_failed(self) -> None:
        self._rereading = False

    def _explain_failures(self) -> None:
        """Fetch the error message of every failure shown without one (a round at a
        time, a few requests per round; another round while some are left)."""
        ids = self.state.unexplained_failures()
        if self._explaining or not ids or self.link is None:
            return
        self._explaining = True

        def done(tasks: dict[str, Task | None]) -> None:
            self._explaining = False
            for task_id, task in tasks.items():
                if task is None:
                    self.state.note_error(task_id, "(the task no longer exists)")
                else:
                    self.state.note_task(task)
            self._changed()
            if tasks:  # progress: go on with whatever is left (or arrived meanwhile)
                self._explain_failures()

        self.request(
            "error details",
            lambda c: read_failures(c, ids),
            done,
            quiet=True,
            failed=self._unexplained,
        )

    def _unexplained(self) -> None:
        self._explaining = False

    # -- requests from the screens -----------------------------------------
    def request(
        self,
        what: str,
        fn: Callable[[AsyncioClient], Awaitable[T]],
        done: Callable[[T], None] | None = None,
        *,
        quiet: bool = False,
        failed: Callable[[], None] | None = None,
    ) -> None:
        """Run ``await fn(client)`` in a Textual worker; then ``done(result)``."""
        link = self.link
        if link is None:
            if not quiet:
                self.notify(f"{what}: not connected to a broker", severity="error")
            if failed is not None:
                failed()
            return

        async def body() -> None:
            try:
                result = await link.call(fn)
            except TQError as exc:
                if not quiet:
                    self.notify(
                        fmt.one_line(f"{what}: {exc}", 300),
                        severity="error",
                        title="tq",
                        timeout=8,
                        markup=False,
                    )
                if failed is not None:
                    failed()
                return
            if done is not None:
                done(result)

        self.run_worker(body(), group="requests", exit_on_error=False)

    def load_page(
        self,
        flt: TaskFilter,
        after: str | None,
        done: Callable[[Page], None],
        failed: Callable[[], None],
    ) -> None:
        self.request("list tasks", lambda c: fetch_page(c, flt, after), done, failed=failed)

    def load_task(
        self, task_id: str, done: Callable[[Task], None], failed: Callable[[str], None]
    ) -> None:
        async def body(client: AsyncioClient) -> Task | str:
            try:
                return await client.get(task_id)
            except TQError as exc:
                if exc.code == "connection":
                    raise
                return exc.message

        def back(result: Task | str) -> None:
            done(result) if isinstance(result, Task) else failed(result)

        self.request("load task", body, back, failed=lambda: failed("not connected"))

    # -- navigation ----------------------------------------------------
    def action_show(self, mode: str) -> None:
        while len(self.screen_stack) > 1:  # close a task view or dialog first
            self.pop_screen()
        self.switch_mode(mode)

    def show_tasks(self, **filters: Any) -> None:
        self.switch_mode("tasks")
        screen = self.screen
        if isinstance(screen, TasksScreen):
            screen.set_filter(**filters)

    def open_task(self, task_id: str) -> None:
        self.push_screen(TaskScreen(task_id))

    def action_help(self) -> None:
        if not isinstance(self.screen, HelpScreen):
            self.push_screen(HelpScreen())

    def action_toggle_dark(self) -> None:
        self.theme = LIGHT if self.current_theme.dark else DARK

    def action_reconnect(self) -> None:
        if self.link is not None:
            self.notify("reconnecting…")
            self.link.reconnect()

    # -- actions on tasks ----------------------------------------------
    def action_submit(self) -> None:
        screen = self.screen
        queue = screen.filter.queue if isinstance(screen, TasksScreen) else None

        def submitted(spec: dict[str, Any] | None) -> None:
            if spec is None:
                return
            self.request(
                "submit",
                lambda c: c.submit_many([spec]),
                lambda ids: self.notify(
                    fmt.one_line(f"submitted {spec['type']} task {ids[0]}", 300),
                    title="tq",
                    markup=False,
                ),
            )

        self.push_screen(SubmitScreen(queue), submitted)

    def cancel_task(self, task_id: str) -> None:
        def answer(yes: bool | None) -> None:
            if yes:
                self.request(
                    "cancel",
                    lambda c: c.cancel(task_id),
                    lambda task: self._task_done(task, "cancelled"),
                )

        question = f"Cancel task {task_id}?\nA running task is told to stop; this cannot be undone."
        self.push_screen(ConfirmScreen(question, "Cancel task"), answer)

    def retry_task(self, task_id: str) -> None:
        self.request(
            "retry", lambda c: c.retry(task_id), lambda task: self._task_done(task, "retried")
        )

    def bump_priority(self, task_id: str, current: int) -> None:
        def chosen(priority: int | None) -> None:
            if priority is not None:
                self.request(
                    "priority",
                    lambda c: c.set_priority(task_id, priority),
                    lambda task: self._task_done(task, f"priority {task.priority}"),
                )

        self.push_screen(PriorityScreen(task_id, current), chosen)

    def _task_done(self, task: Task, what: str) -> None:
        self.notify(f"task {fmt.short_id(task.id)} {what}: now {task.state.value}", title="tq")
        for listener in list(self.task_listeners):
            if isinstance(listener, TaskScreen) and listener.task_id == task.id:
                listener.show_task(task)
            elif isinstance(listener, TasksScreen):
                listener.reload()

    def action_purge(self, queue: str | None = None, state: str | None = None) -> None:
        if queue:
            self.notify("purge applies to every queue (the broker purges by state and age)")
        states = (state,) if state in ("succeeded", "dead", "cancelled") else None

        def chosen(what: dict[str, Any] | None) -> None:
            if what is not None:
                self._purge_count(what)

        self.push_screen(PurgeScreen(states) if states else PurgeScreen(), chosen)

    def _purge_count(self, what: dict[str, Any]) -> None:
        def counted(reply: dict[str, Any]) -> None:
            matched = int(reply.get("matched") or 0)
            if not matched:
                self.notify("nothing to purge", title="purge")
                return
            question = (
                f"Delete {matched:,} {'/'.join(what['states'])} task(s) finished more than "
                f"{fmt.age(what['older_than'])} ago?\nThis cannot be undone."
            )
            self.push_screen(
                ConfirmScreen(question, "Purge"), lambda yes: self._purge(what) if yes else None
            )

        self.request("purge", lambda c: c.request({"t": "purge", **what, "dry_run": True}), counted)

    def _purge(self, what: dict[str, Any]) -> None:
        async def run(client: AsyncioClient) -> int:
            total = 0
            while True:  # the broker deletes in chunks; `more` says there may be more
                reply = await client.request({"t": "purge", **what})
                total += int(reply.get("purged") or 0)
                if not reply.get("more"):
                    return total

        def done(total: int) -> None:
            self.notify(f"purged {total:,} task(s)", title="purge")
            self.poll()

        self.request("purge", run, done)

    # -- command palette ---------------------------------------------------
    def get_system_commands(self, screen: Screen[Any]) -> Iterable[SystemCommand]:
        yield SystemCommand("Dashboard", "Queues, workers, failures", self._palette_show_dash)
        yield SystemCommand("Tasks", "The task list, filters as they are", self._palette_tasks)
        yield SystemCommand(
            "Tasks: all",
            "Every task: clear the state, queue, type and search filters",
            lambda: self.show_tasks(state=None, queue=None, type=None, search=""),
        )
        yield SystemCommand(
            "Tasks: any state", "Clear the state filter", lambda: self.show_tasks(state=None)
        )
        for state in ("pending", "running", "failed", "dead", "succeeded", "cancelled"):
            yield SystemCommand(
                f"Tasks: {state}",
                f"List {state} tasks",
                lambda state=state: self.show_tasks(state=state),
            )
        yield SystemCommand("Submit a task", "Open the submit form", self.action_submit)
        yield SystemCommand("Purge finished tasks", "Count, confirm, delete", self.action_purge)
        yield SystemCommand(
            "Reconnect", "Drop the connection and connect again", self.action_reconnect
        )
        yield SystemCommand("Light/dark colours", "Toggle the theme", self.action_toggle_dark)
        yield SystemCommand("Help", "Keys and what the dashboard shows", self.action_help)
        yield from super().get_system_commands(screen)

    def _palette_show_dash(self) -> None:
        self.action_show("dashboard")

    def _palette_tasks(self) -> None:
        self.action_show("tasks")
