"""The task list: filters (state, queue, type, search), sorting, paging, actions.

Newest submitted first, as the broker pages them. The filters in force are
spelled out in the pager line (a queue chosen on the dashboard stays until
cleared: ``backspace`` on the table, or *Tasks: all* in the palette). A
pending task that no connected worker would take (its queue or its type) is
marked ``⚠``; *Runs* is attempts made of the runs allowed (max_retries + 1),
and a dead task that did not use them all says "not retried".
"""

from __future__ import annotations

from typing import Any

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal
from textual.widgets import DataTable, Input, Select, Static

from tq.client import Event
from tq.core.task import Task
from tq.tui import fmt
from tq.tui.link import Page, TaskFilter
from tq.tui.model import why_dead
from tq.tui.widgets import ConsoleScreen, KeyedTable, state_text

STATE_CHOICES = ("pending", "running", "failed", "dead", "succeeded", "cancelled")
# column -> (sort key, newest/highest first?)
SORTS: dict[str, tuple[Any, bool]] = {
    "Created": (lambda t: (t.created_at, t.id), True),
    "Priority": (lambda t: (t.priority, -t.created_at), True),
    "State": (lambda t: (t.state.value, t.created_at), False),
    "Type": (lambda t: (t.type, t.created_at), False),
    "Queue": (lambda t: (t.queue, t.created_at), False),
    "Runs": (lambda t: (t.attempts, t.created_at), True),
}
RELOAD_DELAY = 2.0  # seconds: live changes are folded into one reload


class TasksScreen(ConsoleScreen):
    BINDINGS = [
        Binding("c", "cancel", "Cancel"),
        Binding("r", "retry", "Retry"),
        Binding("p", "priority", "Priority"),
        Binding("slash", "search", "Search"),
        Binding("right_square_bracket", "page(1)", "Next", show=False),  # the pager says so
        Binding("left_square_bracket", "page(-1)", "Prev", show=False),
        Binding("o", "sort", "Sort", show=False),
        Binding("x", "purge", "Purge", show=False),
        Binding("escape", "focus_table", "Table", show=False),
        Binding("backspace", "clear_filters", "Clear filters", show=False),
        # the app's keys work here too; these keep them out of an 80-column footer
        Binding("t", "app.show('tasks')", show=False),
        Binding("q", "app.quit", show=False),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.filter = TaskFilter()
        self.page: Page | None = None
        self.cursors: list[str | None] = [None]  # the `after` of each page visited
        self.sort = "Created"
        self.descending = False
        self._loading = False
        self._reload_timer: Any = None

    def compose(self) -> ComposeResult:
        yield from self.compose_frame_top()
        with Horizontal(id="filters"):
            yield Select(
                [(s, s) for s in STATE_CHOICES], prompt="any state", id="state", compact=True
            )
            yield Input(placeholder="queue", id="queue", compact=True)
            yield Input(placeholder="type", id="type", compact=True)
            yield Input(placeholder="search id/type  (/)", id="search", compact=True)
        yield KeyedTable(id="tasks", cursor_type="row", zebra_stripes=True, title="Tasks")
        yield Static(id="pager")
        yield from self.compose_frame_bottom()

    def on_mount(self) -> None:
        super().on_mount()
        self.console.task_listeners.add(self)
        self.query_one("#tasks").focus()
        self._show_filter()
        self.reload()

    def on_unmount(self) -> None:
        self.console.task_listeners.discard(self)

    # -- filters -------------------------------------------------------
    def set_filter(self, **changes: Any) -> None:
        """Apply filters from elsewhere (dashboard, palette) and show them in the inputs."""
        fields = {**self.filter.__dict__, **changes}
        self.filter = TaskFilter(**fields)
        if self.is_mounted:  # else on_mount shows them and loads the first page
            self._show_filter()
            self.first_page()

    def _show_filter(self) -> None:
        with self.prevent(Input.Changed, Select.Changed):
            select = self.query_one("#state", Select)
            select.value = self.filter.state if self.filter.state else Select.NULL
            self.query_one("#queue", Input).value = self.filter.queue or ""
            self.query_one("#type", Input).value = self.filter.type or ""
            self.query_one("#search", Input).value = self.filter.search

    @on(Select.Changed, "#state")
    def _state_changed(self, event: Select.Changed) -> None:
        value = event.value
        state = value if isinstance(value, str) else None
        if state != self.filter.state:
            self.filter = TaskFilter(state, self.filter.queue, self.filter.type, self.filter.search)
            self.first_page()

    @on(Input.Submitted)
    def _input_submitted(self, event: Input.Submitted) -> None:
        self._read_inputs()
        self.query_one("#tasks").focus()

    @on(Input.Changed, "#search")
    def _search_typed(self, event: Input.Changed) -> None:
        self._read_inputs()

    def _read_inputs(self) -> None:
        queue = self.query_one("#queue", Input).value.strip() or None
        type_ = self.query_one("#type", Input).value.strip() or None
        search = self.query_one("#search", Input).value.strip()
        new = TaskFilter(self.filter.state, queue, type_, search)
        if new != self.filter:
            self.filter = new
            self.first_page()

    # -- loading -------------------------------------------------------
    def first_page(self) -> None:
        self.cursors = [None]
        self.reload()

    def reload(self) -> None:
        """Read the current page again (same cursor, same filters)."""
        if self._loading:
            self._schedule_reload()
            return
        self._loading = True
        flt, after = self.filter, self.cursors[-1]
        self.console.load_page(flt, after, lambda page: self._loaded(flt, page), self._failed)

    def _failed(self) -> None:
        self._loading = False

    def _loaded(self, flt: TaskFilter, page: Page) -> None:
        self._loading = False
        if flt != self.filter:  # the filters changed while this page was loading
            self.reload()
            return
        self.show_page(page)

    def show_page(self, page: Page) -> None:
        self.page = page
        self.refresh_view()

    def refresh_view(self) -> None:
        if self.page is None:
            self._pager("loading…")
            return
        key, highest_first = SORTS[self.sort]
        tasks = sorted(self.page.tasks, key=key, reverse=highest_first != self.descending)
        app = self.console
        narrow = self.size.width < 120
        table = self.query_one("#tasks", KeyedTable)
        columns: tuple[str, ...] = (
            "Task",
            "Type",
            "Queue",
            "State",
            "Priority",
            "Runs",
            "Created",
            "Worker",
        )
        if narrow:
            columns = columns[:-1]
        labels = tuple(self._label(c) for c in columns)
        if tuple(str(c.label) for c in table.columns.values()) != labels:
            table.clear(columns=True)
            for column, label in zip(columns, labels, strict=True):
                table.add_column(label, key=column)
        rows = []
        for task in tasks:
            cells: list[Any] = [
                fmt.short_id(task.id, 13) if narrow else task.id,
                fmt.one_line(task.type, 20),
                fmt.one_line(task.queue, 14),
                self._state_cell(task),
                Text(str(task.priority), justify="right"),
                Text(f"{task.attempts} of {task.max_retries + 1}", justify="right"),
                fmt.when(task.created_at, app.tz, date=not narrow),
            ]
            if not narrow:
                cells.append(fmt.one_line(task.worker or "", 24))
            rows.append((task.id, cells))
        table.set_rows(rows)
        table.set_title(f"Tasks · {self._filters()}")
        self._pager(self._describe(len(tasks)))

    def _state_cell(self, task: Task) -> Text:
        text = state_text(self.console, task.state.value)
        if task.state.value == "dead" and why_dead(task) == "not retried":
            return Text.assemble(text, (" not retried", "dim"))
        if task.state.value == "pending" and self._unserved(task):
            return Text.assemble(text, (" ⚠", f"bold {self.console.current_theme.warning}"))
        return text

    def _unserved(self, task: Task) -> bool:
        """No connected worker takes this pending task's queue or type."""
        if not self.console.state.link.connected:
            return False  # not known
        types = self.console.state.worker_types(task.queue)
        return types is not None and task.type not in types

    def _filters(self) -> str:
        flt = self.filter
        parts = [f"state {flt.state or 'any'}"]
        if flt.queue:
            parts.append(f"queue {fmt.one_line(flt.queue, 20)}")
        if flt.type:
            parts.append(f"type {fmt.one_line(flt.type, 20)}")
        if flt.search:
            parts.append(f"search {fmt.one_line(flt.search, 20)!r}")
        if flt != TaskFilter():
            parts.append("backspace clears")
        return ", ".join(parts)

    def _label(self, column: str) -> str:
        if column != self.sort:
            return column
        return f"{column} {'▼' if SORTS[column][1] != self.descending else '▲'}"

    def _describe(self, shown: int) -> str:
        assert self.page is not None
        page_no = len(self.cursors)
        parts = [f"page {page_no}", f"{shown} task{'s' if shown != 1 else ''}"]
        if self.filter.search:
            parts.append(f"matching {self.filter.search!r} (scanned {self.page.scanned:,})")
        if self.page.next is not None:
            parts.append("] next")
        if page_no > 1:
            parts.append("[ previous")
        parts.append(f"sorted by {self.sort.lower()} (o)")
        if any(t.state.value == "pending" and self._unserved(t) for t in self.page.tasks):
            parts.append("⚠ no worker takes its queue or type")
        return " · ".join(parts)

    def _pager(self, text: str) -> None:
        self.query_one("#pager", Static).update(fmt.plain(text))

    # -- live changes --------------------------------------------------
    def task_changes(self, event: Event) -> None:
        """Called by the app for every tasks event: patch visible rows, reload soon."""
        if self.page is None:
            return
        shown = {t.id: t for t in self.page.tasks}
        affected = bool(event.data.get("more"))
        for change in event.data.get("changes") or ():
            task_id = change.get("id")
            if task_id in shown and isinstance(change.get("to"), str):
                self._patch_state(task_id, change["to"])
                affected = True
            elif change.get("from") is None and len(self.cursors) == 1:
                affected = True  # a new task belongs at the top of the first page
        if affected:
            self._schedule_reload()

    def _patch_state(self, task_id: str, state: str) -> None:
        table = self.query_one("#tasks", KeyedTable)
        if task_id in table.rows:
            table.update_cell(task_id, "State", state_text(self.console, state))

    def _schedule_reload(self) -> None:
        if self._reload_timer is None:
            self._reload_timer = self.set_timer(RELOAD_DELAY, self._timed_reload)

    def _timed_reload(self) -> None:
        self._reload_timer = None
        self.reload()

    # -- actions -------------------------------------------------------
    def selected(self) -> Task | None:
        key = self.query_one("#tasks", KeyedTable).current_key()
        if key is None or self.page is None:
            return None
        return next((t for t in self.page.tasks if t.id == key), None)

    @on(DataTable.RowSelected, "#tasks")
    def _open(self, event: DataTable.RowSelected) -> None:
        self.console.open_task(str(event.row_key.value))

    def _with_selected(self, what: str) -> Task | None:
        task = self.selected()
        if task is None:
            self.notify(f"select a task to {what}", severity="warning")
        return task

    def action_cancel(self) -> None:
        if task := self._with_selected("cancel"):
            self.console.cancel_task(task.id)

    def action_retry(self) -> None:
        if task := self._with_selected("retry"):
            self.console.retry_task(task.id)

    def action_priority(self) -> None:
        if task := self._with_selected("reprioritise"):
            self.console.bump_priority(task.id, task.priority)

    def action_purge(self) -> None:
        self.console.action_purge(self.filter.queue, self.filter.state)

    def action_search(self) -> None:
        self.query_one("#search", Input).focus()

    def action_focus_table(self) -> None:
        self.query_one("#tasks").focus()

    def action_clear_filters(self) -> None:
        if self.filter != TaskFilter():
            self.set_filter(state=None, queue=None, type=None, search="")
            self.notify("filters cleared: every task", title="tasks")

    def action_page(self, step: int) -> None:
        if self.page is None:
            return
        if step > 0 and self.page.next is not None:
            self.cursors.append(self.page.next)
            self.reload()
        elif step < 0 and len(self.cursors) > 1:
            self.cursors.pop()
            self.reload()

    def action_sort(self) -> None:
        names = list(SORTS)
        self.sort = names[(names.index(self.sort) + 1) % len(names)]
        self.descending = False
        self.refresh_view()

    @on(DataTable.HeaderSelected, "#tasks")
    def _sort_by_header(self, event: DataTable.HeaderSelected) -> None:
        column = str(event.column_key.value)
        if column not in SORTS:
            return
        if column == self.sort:
            self.descending = not self.descending
        else:
            self.sort, self.descending = column, False
        self.refresh_view()
