"""Widgets shared by the console's screens: the connection banner, the broker line,
state colours and a table updated in place.

``KeyedTable.set_rows`` is the only way rows reach a table: it compares the
new rows with what is shown and touches only cells that changed (nothing at
all when nothing did); the rows are rebuilt only when the set or order of
keys changes. A redraw that changes nothing costs no rendering, and the
cursor stays on the row (the key) the operator chose.

State is never told by colour alone: a focused table's title starts with
``▶``, checkboxes read ``[x]``/``[ ]``, and every coloured figure also has
words ("stale", "off", "dead", "⚠ no worker"), so the console reads the same
with NO_COLOR or on a 16-colour terminal.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from rich.text import Text
from textual import events
from textual.app import ComposeResult
from textual.binding import Binding
from textual.content import Content
from textual.screen import Screen
from textual.widgets import Checkbox, DataTable, Footer, Header, Static

from tq.tui import fmt

if TYPE_CHECKING:
    from tq.tui.app import ConsoleApp


def state_colors(app: Any) -> dict[str, str]:
    """Task state -> a Rich style from the current theme (works dark and light)."""
    theme = app.current_theme
    return {
        "pending": "",  # the ordinary waiting state: plain (accent == warning in some themes)
        "running": theme.primary or "",
        "succeeded": theme.success or "",
        "failed": theme.warning or "",
        "dead": f"bold {theme.error}" if theme.error else "bold",
        "cancelled": "dim",
        "scheduled": "dim",
        "blocked": "dim",
    }


def state_text(app: Any, state: str) -> Text:
    return Text(state, style=state_colors(app).get(state, ""))


class Banner(Static):
    """One line that says when the console is not connected (hidden while it is)."""

    def render_for(self, app: ConsoleApp) -> None:
        link = app.state.link
        where = app.state.address or "the broker"
        if link.connected:
            self.display = False
            return
        self.display = True
        if link.connecting:
            self.set_classes("connecting")
            self.update(fmt.plain(f"connecting to {where} …"))
            return
        self.set_classes("down")
        wait = max(0.0, (link.retry_at or 0.0) - app.clock())
        away = fmt.age(app.clock() - link.since)
        gist = link.reason.split(";")[0].replace(f" at {where}", "")  # drop the advice
        gist = gist.rsplit(": ", 1)[-1]  # "cannot connect to ...: Connection refused"
        self.update(
            fmt.plain(
                f"⚠ DISCONNECTED {away} · {fmt.one_line(gist, 60)} · "
                f"retrying in {wait:.0f}s (attempt {link.attempt})"
            )
        )


class BrokerLine(Static):
    """The broker's health in one line: status, name, version, uptime, store, workers."""

    def render_for(self, app: ConsoleApp) -> None:
        state = app.state
        colors = app.current_theme
        now = app.clock()
        if state.link.connected:
            status = Text("● up", style=f"bold {colors.success}")
        elif state.link.connecting:
            status = Text("○ connecting", style=f"bold {colors.warning}")
        else:
            status = Text("● down", style=f"bold {colors.error}")
        stats = state.stats
        store = stats.get("store") or {}
        parts = [
            f"{stats.get('broker') or state.server.get('broker') or 'broker'}"
            f"@{state.address or '?'}",
            f"up {fmt.age(state.uptime(now))}",
            _store_text(store),
            f"{len(state.workers)} worker{'s' if len(state.workers) != 1 else ''}",
            f"tq {stats.get('version', '?')}",
        ]
        if state.lagged:
            parts.append(f"events dropped {state.lagged}")
        line = Text.assemble(status, "  ", fmt.plain(" · ".join(parts)))
        self.update(line)


def _store_text(store: dict[str, Any]) -> str:
    """The store in a few words: its kind and size (SQLite: and its WAL's)."""
    if store.get("backend") == "postgresql":
        return f"store postgresql {fmt.size(store.get('size'))}"
    kind = "sqlite " if store.get("backend") == "sqlite" else ""
    return f"store {kind}{fmt.size(store.get('size'))} (wal {fmt.size(store.get('wal'))})"


def _signature(cell: Any) -> Any:
    """What a cell looks like: equal signatures draw the same."""
    if isinstance(cell, Text):
        spans = tuple((s.start, s.end, str(s.style)) for s in cell.spans)
        return (cell.plain, str(cell.style), cell.justify, spans)
    return (type(cell), str(cell))


class KeyedTable(DataTable[Any]):
    """A DataTable fed whole rows with keys, updated in place (see the module docstring)."""

    BINDINGS = [Binding("enter", "select_cursor", "Open", show=False)]

    def __init__(self, *args: Any, title: str = "", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.title = title
        self._keys: list[str] = []
        self._shown: dict[str, tuple[Any, ...]] = {}  # key -> cell signatures
        self.rebuilds = 0  # how often the rows were rebuilt (the benchmark and tests read it)
        self._show_title()

    # -- focus, in words as well as colour ------------------------------------
    def set_title(self, title: str) -> None:
        self.title = title
        self._show_title()

    def _show_title(self, focused: bool | None = None) -> None:
        if focused is None:
            focused = self.has_focus
        if self.title:
            self.border_title = f"▶ {self.title}" if focused else self.title

    def on_focus(self, _: events.Focus) -> None:
        self._show_title(True)  # runs before Widget's handler sets has_focus

    def on_blur(self, _: events.Blur) -> None:
        self._show_title(False)

    # -- rows --------------------------------------------------------------------
    def clear(self, columns: bool = False) -> Any:
        self._keys, self._shown = [], {}
        return super().clear(columns)

    def set_rows(self, rows: Iterable[tuple[str, Sequence[Any]]]) -> None:
        # a str cell would be parsed as markup: every one becomes an inert Text
        new = [
            (key, [fmt.plain(c) if isinstance(c, str) else c for c in cells]) for key, cells in rows
        ]
        keys = [key for key, _ in new]
        if keys == self._keys and len(self._keys) == self.row_count:
            columns = list(self.columns)
            changed = False
            for key, cells in new:
                shown = self._shown[key]
                signatures = tuple(_signature(c) for c in cells)
                if signatures == shown:
                    continue
                for i, cell in enumerate(cells):
                    if i >= len(shown) or signatures[i] != shown[i]:
                        self.update_cell(key, columns[i], cell, update_width=True)
                        changed = True
                self._shown[key] = signatures
            if changed:
                # every cached render is keyed by the table's update count, so none can be
                # used again: drop them now rather than let them fill Textual's LRU caches
                # (thousands of entries per table, memory growing for hours)
                self._clear_caches()
            return
        current = self.current_key()
        self.rebuilds += 1
        super().clear()
        for key, cells in new:
            self.add_row(*cells, key=key)
            self._shown[key] = tuple(_signature(c) for c in cells)
        self._keys = keys
        if current is not None and current in self.rows:
            self.move_cursor(row=self.get_row_index(current), animate=False)

    def current_key(self) -> str | None:
        if not self.row_count:
            return None
        try:
            key = self.coordinate_to_cell_key(self.cursor_coordinate).row_key
        except Exception:  # the cursor is outside the rows
            return None
        return None if key.value is None else str(key.value)


class MarkedCheckbox(Checkbox):
    """A checkbox that reads [x] or [ ] (Textual's tells on from off by colour only)."""

    BUTTON_LEFT = "["
    BUTTON_RIGHT = "]"

    @property
    def _button(self) -> Content:
        self.BUTTON_INNER = "x" if self.value else " "
        return super()._button


class ConsoleScreen(Screen[None]):
    """A main screen: header, connection banner, body, footer; redrawn on app changes."""

    def compose_frame_top(self) -> ComposeResult:
        yield Header(icon="tq")
        yield Banner(id="banner")

    def compose_frame_bottom(self) -> ComposeResult:
        yield Footer()

    @property
    def console(self) -> ConsoleApp:
        from tq.tui.app import ConsoleApp

        app = self.app
        assert isinstance(app, ConsoleApp)
        return app

    def on_mount(self) -> None:
        self.watch(self.app, "revision", self._revision, init=True)

    def on_screen_resume(self) -> None:
        self._revision(0)  # it was not redrawn while hidden

    def _revision(self, _: int) -> None:
        if not self.is_attached or not self.is_current:
            return  # a screen out of sight is redrawn when it comes back
        self.query_one(Banner).render_for(self.console)
        self.refresh_view()

    def refresh_view(self) -> None:
        """Redraw from ``self.console.state``; screens override."""
