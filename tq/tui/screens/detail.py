"""One task in full: summary, payload, result, error and traceback, the tasks it
depends on and that depend on it, its history; actions on it."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from rich.table import Table
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.widgets import Static

from tq.client import Event
from tq.core.task import Task
from tq.tui import fmt
from tq.tui.model import why_dead
from tq.tui.widgets import ConsoleScreen, state_text

MAX_LINKS = 20  # dependencies (and dependents) listed each


class TaskScreen(ConsoleScreen):
    BINDINGS = [
        Binding("escape,backspace", "back", "Back"),
        Binding("c", "cancel", "Cancel"),
        Binding("r", "retry", "Retry"),
        Binding("p", "priority", "Priority"),
        Binding("l", "reload", "Reload", show=False),
        # the app's keys work here too; these keep them out of an 80-column footer
        Binding("t", "app.show('tasks')", show=False),
        Binding("s", "app.submit", show=False),
        Binding("q", "app.quit", show=False),
    ]

    def __init__(self, task_id: str, task: Task | None = None) -> None:
        super().__init__()
        self.task_id = task_id
        self.task_data = task
        self.error: str | None = None
        self.history: list[dict[str, Any]] = []  # query history rows, oldest first
        self.links: dict[str, list[dict[str, Any]]] = {}  # tq.core.workflow.links
        self._reload_timer: Any = None

    def compose(self) -> ComposeResult:
        yield from self.compose_frame_top()
        with VerticalScroll(id="detail"):
            yield Static(id="summary")
            yield Static(id="error", classes="block")  # first: why it failed matters most
            yield Static(id="payload", classes="block")
            yield Static(id="result", classes="block")
            yield Static(id="links", classes="block")
            yield Static(id="history", classes="block")
        yield from self.compose_frame_bottom()

    def on_mount(self) -> None:
        super().on_mount()
        self.console.task_listeners.add(self)
        self.query_one("#detail").focus()
        if self.task_data is None:
            self.action_reload()

    def on_unmount(self) -> None:
        self.console.task_listeners.discard(self)

    def action_reload(self) -> None:
        self.console.load_task(self.task_id, self.show_task, self._not_loaded)
        task_id = self.task_id

        async def extras(client: Any) -> tuple[list[dict[str, Any]], dict[str, Any]]:
            from tq.core.workflow import links

            rows = await client.history(task_id)
            return rows, links(await client.workflow(task_id), task_id)

        self.console.request("task history", extras, self._show_extras, quiet=True)

    def _show_extras(self, found: tuple[list[dict[str, Any]], dict[str, Any]]) -> None:
        self.history, self.links = found
        self.refresh_view()

    reload = action_reload

    def show_task(self, task: Task) -> None:
        self.task_data, self.error = task, None
        self.refresh_view()

    def _not_loaded(self, message: str) -> None:
        self.error = message
        self.refresh_view()

    def task_changes(self, event: Event) -> None:
        touched = event.data.get("more") or any(
            c.get("id") == self.task_id for c in event.data.get("changes") or ()
        )
        if touched and self._reload_timer is None:
            self._reload_timer = self.set_timer(0.3, self._timed_reload)

    def task_progress(self, event: Event) -> None:
        """A progress event: this task's latest progress, shown at once (no reload)."""
        task = self.task_data
        for item in event.data.get("tasks") or ():
            if task is not None and item.get("id") == self.task_id:
                fraction, message = item.get("progress"), item.get("message")
                if isinstance(fraction, int | float) and not isinstance(fraction, bool):
                    self.task_data = replace(
                        task,
                        progress=float(fraction),
                        progress_message=message if isinstance(message, str) else None,
                    )
                    self.refresh_view()

    def _timed_reload(self) -> None:
        self._reload_timer = None
        self.action_reload()

    def refresh_view(self) -> None:
        task = self.task_data
        summary = self.query_one("#summary", Static)
        if task is None:
            summary.update(fmt.plain(self.error or f"loading task {self.task_id} …"))
            return
        app = self.console
        tz = app.tz
        grid = Table.grid(padding=(0, 2))
        grid.add_column(style="bold", no_wrap=True)
        grid.add_column(overflow="fold")
        grid.add_row("id", fmt.plain(task.id))
        state = state_text(app, task.state.value)
        if why := why_dead(task):
            state.append(f": {why}")
            if why == "not retried" and task.error is not None:
                state.append(f" ({fmt.one_line(task.error.type, 40)})")
        grid.add_row("state", state)
        grid.add_row("type / queue", fmt.plain(f"{task.type} / {task.queue}"))
        grid.add_row("priority", str(task.priority))
        grid.add_row(
            "attempts",
            f"{task.attempts} of {task.max_retries + 1} run{'s' if task.max_retries else ''} "
            f"allowed (max_retries {task.max_retries})",
        )
        if task.progress is not None:
            grid.add_row("progress", fmt.progress(task.progress, task.progress_message))
        grid.add_row("timeout", f"{task.timeout:g}s")
        grid.add_row("created", fmt.when(task.created_at, tz, date=True))
        grid.add_row("started", fmt.when(task.started_at, tz, date=True))
        grid.add_row("finished", fmt.when(task.finished_at, tz, date=True))
        if task.run_at is not None:
            grid.add_row("next run", fmt.when(task.run_at, tz, date=True))
        grid.add_row("worker", fmt.plain(task.worker or "-"))
        if task.idempotency_key:
            grid.add_row("idempotency key", fmt.plain(task.idempotency_key))
        if self.error:
            grid.add_row("", fmt.plain(self.error, style="italic"))
        summary.update(grid)
        self._block("#payload", "Payload", fmt.pretty(task.payload))
        self._block("#result", "Result", fmt.pretty(task.result) if task.result is not None else "")
        error = ""
        if task.error is not None:
            error = f"{task.error.type}: {task.error.message}"
            if task.error.traceback:
                error += "\n\n" + task.error.traceback.rstrip()
        self._block("#error", "Error", error)
        self._block("#links", "Dependencies", self._links_text())
        self._block("#history", "History", self._history_text(tz))

    def _links_text(self) -> str:
        lines = []
        for key, label in (("depends_on", "depends on"), ("dependents", "needed by")):
            for t in self.links.get(key, ())[:MAX_LINKS]:
                lines.append(f"{label:<10} {t['id']}  {t.get('state') or '(not visible)'}")
            if len(self.links.get(key, ())) > MAX_LINKS:
                lines.append(f"{label:<10} ... {len(self.links[key]) - MAX_LINKS} more")
        return "\n".join(lines)

    def _history_text(self, tz: Any) -> str:
        from tq.core.history import details, gaps, who

        lines = []
        for row, dropped in gaps(self.history):
            if row is None:
                lines.append(f"   ... {dropped} transition(s) not kept")
                continue
            when = fmt.when(row.get("at"), tz, date=True)
            more = details(row, lambda ts: fmt.when(ts, tz, date=True))
            text = f"{row.get('n'):>3} {when}  {row.get('event'):<10} {who(row)}"
            lines.append(text + (f"  {more}" if more else ""))
        return "\n".join(lines)

    def _block(self, selector: str, title: str, text: str) -> None:
        block = self.query_one(selector, Static)
        block.border_title = title
        block.display = bool(text)
        block.update(fmt.plain(text, multiline=True))

    def action_back(self) -> None:
        self.dismiss()

    def action_cancel(self) -> None:
        self.console.cancel_task(self.task_id)

    def action_retry(self) -> None:
        self.console.retry_task(self.task_id)

    def action_priority(self) -> None:
        current = self.task_data.priority if self.task_data else 100
        self.console.bump_priority(self.task_id, current)
