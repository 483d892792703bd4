"""Widgets shared by the console's screens: the connection banner, the broker line,
state colours and a table that keeps its cursor across rebuilds."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Header, Static

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
            f"store {fmt.size(store.get('size'))} (wal {fmt.size(store.get('wal'))})",
            f"{len(state.workers)} worker{'s' if len(state.workers) != 1 else ''}",
            f"tq {stats.get('version', '?')}",
        ]
        if state.lagged:
            parts.append(f"events dropped {state.lagged}")
        line = Text.assemble(status, "  ", fmt.plain(" · ".join(parts)))
        self.update(line)


class KeyedTable(DataTable[Any]):
    """A DataTable rebuilt from rows with keys, keeping the cursor on the same key."""

    BINDINGS = [Binding("enter", "select_cursor", "Open", show=False)]

    def set_rows(self, rows: Iterable[tuple[str, Sequence[Any]]]) -> None:
        current = self.current_key()
        self.clear()
        for key, cells in rows:
            # a str cell would be parsed as markup: every one becomes an inert Text
            self.add_row(*(fmt.plain(c) if isinstance(c, str) else c for c in cells), key=key)
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

    def _revision(self, _: int) -> None:
        if not self.is_attached:
            return
        self.query_one(Banner).render_for(self.console)
        self.refresh_view()

    def refresh_view(self) -> None:
        """Redraw from ``self.console.state``; screens override."""
