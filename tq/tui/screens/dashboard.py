"""The dashboard: queues (counts and throughput), workers, broker health, failures.

Queues come by what needs attention (model.queue_names) under the ``(all)``
row, so the ones in trouble are in sight at 80x24; *Wait* is the age of a
queue's oldest pending task, "paused" marks a paused queue (``tq queue
pause``), "capped" one whose concurrency cap is full (``tq cap``) and ``⚠``
marks a queue no connected worker takes (or whose oldest pending task's type
none handles), spelled out in the panel's title.
"""

from __future__ import annotations

from typing import Any

from rich.text import Text
from textual import events, on
from textual.app import ComposeResult
from textual.containers import Container, Vertical
from textual.widgets import DataTable

from tq.tui import fmt
from tq.tui.model import HISTORY, SAMPLE_SECONDS, STATES
from tq.tui.widgets import BrokerLine, ConsoleScreen, KeyedTable, state_text

WIDE = 120  # columns from which the failures go to their own column

QUEUE_COLUMNS = (
    "Queue",
    "Pending",
    "Wait",
    "Running",
    "Failed",
    "Dead",
    "Done",
    "Cancel",
    "Done/s",
)
ALL = "(all)"
WORKER_COLUMNS = ("Worker", "Host", "Busy", "CPU", "Memory", "Beat", "Queues")
FAILURE_COLUMNS = ("Time", "Task", "Type", "Queue", "State", "Error")


class DashboardScreen(ConsoleScreen):
    """Everything at a glance; enter on a queue or failure opens the tasks behind it."""

    def compose(self) -> ComposeResult:
        yield from self.compose_frame_top()
        yield BrokerLine(id="broker")
        with Vertical(id="dash"):
            yield KeyedTable(id="queues", cursor_type="row", title="Queues")
            with Container(id="lower"):  # stacked; side by side on a wide terminal
                yield KeyedTable(id="workers", cursor_type="row", title="Workers")
                yield KeyedTable(id="failures", cursor_type="row", title="Failures")
        yield from self.compose_frame_bottom()

    def on_mount(self) -> None:
        self._layout(self.size.width)
        super().on_mount()

    def on_resize(self, event: events.Resize) -> None:
        self._layout(event.size.width)
        self.refresh_view()

    def _layout(self, width: int) -> None:
        self.set_class(width >= WIDE, "wide")

    @property
    def wide(self) -> bool:
        return self.has_class("wide")

    def refresh_view(self) -> None:
        self.query_one(BrokerLine).render_for(self.console)
        self._queues()
        self._workers()
        self._failures()

    # -- tables --------------------------------------------------------
    def _columns(self, table: DataTable[Any], names: tuple[str, ...]) -> None:
        if tuple(str(c.label) for c in table.columns.values()) != names:
            table.clear(columns=True)
            for name in names:
                table.add_column(name, key=name)

    def _queues(self) -> None:
        table = self.query_one("#queues", KeyedTable)
        state = self.console.state
        now = self.console.clock()
        names = QUEUE_COLUMNS if self.wide else tuple(c for c in QUEUE_COLUMNS if c != "Cancel")
        rows: list[tuple[str, list[Any], list[float]]] = []
        queues = state.queue_names()
        totals = state.totals()
        unserved = {q: why for q in queues if (why := state.unserved(q))}
        for queue in [*([ALL] if len(queues) > 1 else []), *queues]:
            counts = totals if queue == ALL else state.counts.get(queue, {})
            label = fmt.plain(fmt.one_line(queue, 20), style="bold" if queue == ALL else "")
            if queue != ALL and state.paused(queue):
                label.append(" paused", style=f"bold {self.console.current_theme.warning}")
            elif queue != ALL and state.capped(queue):
                label.append(" capped", style=f"bold {self.console.current_theme.warning}")
            elif queue in unserved:
                label.append(" ⚠", style=f"bold {self.console.current_theme.warning}")
            cells: list[Any] = [label]
            for s in STATES:
                if s == "cancelled" and not self.wide:
                    continue
                n = counts.get(s, 0)
                cells.append(Text(fmt.count(n), justify="right", style=self._count_style(s, n)))
                if s == "pending":
                    cells.append(Text(fmt.age(state.pending_age(queue, now)), justify="right"))
            if queue == ALL:
                rates = [r for q in queues if (r := state.rate(q)) is not None]
                cells.append(Text(fmt.rate(sum(rates) if rates else None), justify="right"))
                series = self._sum_series([list(state.history.get(q, ())) for q in queues])
            else:
                cells.append(Text(fmt.rate(state.rate(queue)), justify="right"))
                series = list(state.history.get(queue, ()))
            rows.append((queue, cells, series))
        # the sparkline takes the width the other columns leave (2 cells of padding each)
        used = sum(
            2 + max([len(name), *(len(str(r[1][i])) for r in rows)]) for i, name in enumerate(names)
        )
        spark = max(8, min(HISTORY, table.size.width - used - 3))
        self._columns(table, (*names, f"last {fmt.age(spark * SAMPLE_SECONDS)}"))
        table.set_rows(
            (queue, [*cells, Text(fmt.sparkline(series, spark), style=self._accent())])
            for queue, cells, series in rows
        )
        title = "Queues"
        if unserved:
            title += " · ⚠ " + "; ".join(
                f"{fmt.one_line(q, 20)}: {fmt.one_line(why, 40)}" for q, why in unserved.items()
            )
        table.set_title(title)

    @staticmethod
    def _sum_series(series: list[list[float]]) -> list[float]:
        width = max((len(s) for s in series), default=0)
        padded = [[0.0] * (width - len(s)) + s for s in series]
        return [sum(column) for column in zip(*padded, strict=True)] if padded else []

    def _accent(self) -> str:
        return self.console.current_theme.primary or ""

    def _count_style(self, state: str, n: int) -> str:
        if not n:
            return "dim"
        theme = self.console.current_theme
        if state == "dead":
            return f"bold {theme.error}"
        if state == "failed":
            return theme.warning or ""
        return ""

    def _workers(self) -> None:
        table = self.query_one("#workers", KeyedTable)
        state = self.console.state
        names = WORKER_COLUMNS if self.wide else WORKER_COLUMNS[:-1]
        self._columns(table, names)
        now = self.console.clock()
        theme = self.console.current_theme
        stale_after = state.lease_ttl / 2  # a heartbeat comes every lease_ttl / 3
        rows = []
        for worker_id, view in sorted(state.workers.items(), key=lambda kv: kv[0]):
            w = view.data
            age = view.age(now)
            if not w.get("connected", True):
                beat = Text(f"off {fmt.age(age)}", style=f"bold {theme.error}")
            elif age > stale_after:
                beat = Text(f"{fmt.age(age)} stale", style=f"bold {theme.warning}")
            else:
                beat = Text(fmt.age(age), style=theme.success or "")
            cpu = w.get("cpu")
            cells: list[Any] = [
                fmt.one_line(w.get("name") or worker_id, 24),
                fmt.one_line(w.get("host") or "-", 16),
                Text(f"{w.get('running') or 0}/{w.get('concurrency') or 0}", justify="right"),
                Text("-" if cpu is None else f"{cpu:.0f}%", justify="right"),
                Text(fmt.size(w.get("memory")), justify="right"),
                beat,
            ]
            if self.wide:
                cells.append(",".join(w.get("queues") or []))
            rows.append((worker_id, cells))
        table.set_rows(rows)

    def _failures(self) -> None:
        table = self.query_one("#failures", KeyedTable)
        app = self.console
        self._columns(table, FAILURE_COLUMNS)
        rows: list[tuple[str, list[Any], str]] = []
        for failure in app.state.failures:
            cells: list[Any] = [
                fmt.when(failure.at, app.tz),
                fmt.short_id(failure.id, 9),
                fmt.one_line(failure.type or "?", 16),
                fmt.one_line(failure.queue or "?", 12),
                state_text(app, failure.state),
            ]
            text = failure.message or "…"
            rows.append((failure.id, cells, f"{failure.why}: {text}" if failure.why else text))
        # the error message gets the width the other columns leave: no sideways scrolling
        used = sum(
            2 + max([len(name), *(len(str(r[1][i])) for r in rows)])
            for i, name in enumerate(FAILURE_COLUMNS[:-1])
        )
        room = max(20, table.size.width - used - 3)
        table.set_rows((key, [*cells, fmt.one_line(text, room)]) for key, cells, text in rows)

    # -- selection -----------------------------------------------------
    @on(DataTable.RowSelected, "#queues")
    def _open_queue(self, event: DataTable.RowSelected) -> None:
        queue = str(event.row_key.value)
        self.console.show_tasks(queue=None if queue == ALL else queue)

    @on(DataTable.RowSelected, "#failures")
    def _open_failure(self, event: DataTable.RowSelected) -> None:
        self.console.open_task(str(event.row_key.value))
