"""Modal dialogs: confirmation, submit form, priority, purge, help."""

from __future__ import annotations

import json
from typing import Any

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Grid, Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Button, Checkbox, Input, Label, Markdown, Static, TextArea

from tq.core.errors import InvalidRequest
from tq.core.task import TaskSpec, parse_priority
from tq.tui import fmt
from tq.tui.widgets import MarkedCheckbox


class ConfirmScreen(ModalScreen[bool]):
    """Yes/no for destructive actions; y/enter confirms, n/escape refuses."""

    BINDINGS = [
        Binding("y", "answer(True)", "Yes"),
        Binding("n,escape", "answer(False)", "No"),
    ]

    def __init__(self, question: str, confirm: str = "Yes") -> None:
        super().__init__(classes="dialog")
        self.question = question
        self.confirm = confirm

    def compose(self) -> ComposeResult:
        with Vertical(classes="box"):
            yield Static(self.question, classes="question")
            with Horizontal(classes="buttons"):
                yield Button(f"{self.confirm} (y)", variant="error", id="yes")
                yield Button("No (n)", id="no")

    def on_mount(self) -> None:
        self.query_one("#no", Button).focus()

    @on(Button.Pressed)
    def _pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "yes")

    def action_answer(self, yes: bool) -> None:
        self.dismiss(yes)


class SubmitScreen(ModalScreen[dict[str, Any] | None]):
    """A task from a form; dismisses with the submission map (checked here first)."""

    BINDINGS = [
        Binding("escape", "dismiss(None)", "Close"),
        Binding("ctrl+s", "submit", "Submit"),
    ]

    def __init__(self, queue: str | None = None) -> None:
        super().__init__(classes="dialog")
        self.queue = queue

    def compose(self) -> ComposeResult:
        with Vertical(classes="box form"):
            yield Label("Submit a task", classes="title")
            with Grid(classes="fields"):
                yield self._field(Input(placeholder="e.g. echo", id="type"), "Type")
                yield self._field(Input(self.queue or "default", id="queue"), "Queue")
                yield self._field(Input("normal", id="priority"), "Priority 0..255/high/low")
                yield self._field(Input("3", id="max_retries", type="integer"), "Max retries")
                yield self._field(Input("300", id="timeout", type="number"), "Timeout (s)")
                yield self._field(Input(id="key"), "Idempotency key")
            area = TextArea("{}", id="payload", soft_wrap=True, show_line_numbers=False)
            yield self._field(area, "Payload (JSON)")
            yield Static("", id="problem")
            with Horizontal(classes="buttons"):
                yield Button("Submit (ctrl+s)", variant="primary", id="submit")
                yield Button("Cancel (esc)", id="close")

    @staticmethod
    def _field(widget: Any, title: str) -> Any:
        widget.border_title = title
        return widget

    def on_mount(self) -> None:
        self.query_one("#type", Input).focus()

    @on(Button.Pressed, "#close")
    def _close(self) -> None:
        self.dismiss(None)

    @on(Button.Pressed, "#submit")
    @on(Input.Submitted)
    def action_submit(self) -> None:
        try:
            spec = self.spec()
        except InvalidRequest as exc:
            self.query_one("#problem", Static).update(fmt.plain(exc.message))
            return
        self.dismiss(spec)

    def spec(self) -> dict[str, Any]:
        """The submission map, validated like the broker would (InvalidRequest)."""

        def text(field: str) -> str:
            return self.query_one(f"#{field}", Input).value.strip()

        raw = self.query_one("#payload", TextArea).text.strip()
        try:
            payload = json.loads(raw) if raw else None
        except json.JSONDecodeError as exc:
            raise InvalidRequest(
                f"payload is not valid JSON: {exc.msg} (line {exc.lineno})"
            ) from None
        spec: dict[str, Any] = {"type": text("type"), "payload": payload}
        if not spec["type"]:
            raise InvalidRequest("type is required (the handler's name, e.g. echo)")
        spec["queue"] = text("queue") or "default"
        spec["priority"] = parse_priority(text("priority") or "normal")
        for field, cast in (("max_retries", int), ("timeout", float)):
            if value := text(field):
                try:
                    spec[field] = cast(value)
                except ValueError:
                    raise InvalidRequest(f"{field.replace('_', ' ')} must be a number") from None
        if key := text("key"):
            spec["idempotency_key"] = key
        TaskSpec.from_mapping(spec)  # every other rule, with the broker's messages
        return spec


class PriorityScreen(ModalScreen[int | None]):
    """A new priority for a waiting task (0..255, or high/normal/low)."""

    BINDINGS = [Binding("escape", "dismiss(None)", "Close")]

    def __init__(self, task_id: str, current: int) -> None:
        super().__init__(classes="dialog")
        self.task_id = task_id
        self.current = current

    def compose(self) -> ComposeResult:
        suggestion = "high" if self.current < 200 else "255"
        with Vertical(classes="box"):
            yield Label(f"Priority of {self.task_id}", classes="title")
            yield Static(
                f"now {self.current}; 0..255 (255 first) or high=200, normal=100, low=50. "
                "Only a task waiting to run can change.",
                classes="hint",
            )
            yield Input(suggestion, id="priority")
            yield Static("", id="problem")
            with Horizontal(classes="buttons"):
                yield Button("Set (enter)", variant="primary", id="set")
                yield Button("Cancel (esc)", id="close")

    @on(Button.Pressed, "#close")
    def _close(self) -> None:
        self.dismiss(None)

    @on(Button.Pressed, "#set")
    @on(Input.Submitted)
    def _set(self) -> None:
        try:
            value = parse_priority(self.query_one("#priority", Input).value)
        except InvalidRequest as exc:
            self.query_one("#problem", Static).update(fmt.plain(exc.message))
            return
        self.dismiss(value)


PURGEABLE = ("succeeded", "dead", "cancelled")
AGE_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_age(text: str) -> float:
    """'90', '90s', '15m', '2h', '7d', '1w' -> seconds (InvalidRequest otherwise)."""
    text = text.strip().lower()
    unit = AGE_UNITS.get(text[-1:]) if text else None
    number = text[:-1] if unit else text
    try:
        value = float(number) * (unit or 1)
    except ValueError:
        raise InvalidRequest(f"{text!r} is not an age like 90s, 15m, 2h or 7d") from None
    if value < 0:
        raise InvalidRequest("the age must be >= 0")
    return value


class PurgeScreen(ModalScreen[dict[str, Any] | None]):
    """Which finished tasks to delete: states and minimum age. The app counts them
    (a dry run) and asks for confirmation before deleting."""

    BINDINGS = [Binding("escape", "dismiss(None)", "Close")]

    def __init__(self, states: tuple[str, ...] = PURGEABLE) -> None:
        super().__init__(classes="dialog")
        self.states = states

    def compose(self) -> ComposeResult:
        with Vertical(classes="box"):
            yield Label("Purge finished tasks", classes="title")
            yield Static(
                "Deletes tasks for good, from every queue. Only finished tasks can go.",
                classes="hint",
            )
            with Horizontal(classes="checks"):
                for state in PURGEABLE:
                    yield MarkedCheckbox(state, state in self.states, id=f"s-{state}")
            yield Input("7d", id="age", placeholder="older than: 90s, 15m, 2h, 7d")
            yield Static("", id="problem")
            with Horizontal(classes="buttons"):
                yield Button("Count and purge…", variant="error", id="go")
                yield Button("Cancel (esc)", id="close")

    def on_mount(self) -> None:
        age = self.query_one("#age", Input)
        age.border_title = "Finished more than … ago"
        age.focus()

    @on(Button.Pressed, "#close")
    def _close(self) -> None:
        self.dismiss(None)

    @on(Button.Pressed, "#go")
    @on(Input.Submitted)
    def _go(self) -> None:
        states = [s for s in PURGEABLE if self.query_one(f"#s-{s}", Checkbox).value]
        try:
            if not states:
                raise InvalidRequest("choose at least one state")
            age = parse_age(self.query_one("#age", Input).value)
        except InvalidRequest as exc:
            self.query_one("#problem", Static).update(fmt.plain(exc.message))
            return
        self.dismiss({"states": states, "older_than": age})


HELP = """\
# tq console

Live view of one broker: counts, workers and failures update from the
broker's event stream; nothing is polled faster than every few seconds.

## Keys

Anywhere: `d` dashboard · `t` tasks · `s` submit a task · `ctrl+p` command
palette (every action by name) · `?` or `f1` this help · `ctrl+t` light/dark ·
`ctrl+r` reconnect now · `q` quit.

In a table: `enter` opens the task, queue or failure under the cursor; `tab`
moves between tables.

On tasks and a task: `c` cancel (asks first) · `r` retry a failed, dead or
cancelled task · `p` priority of a waiting task · `escape` back.

On tasks: `/` search ids and types (scans at most 10,000 tasks per page) ·
`]` / `[` next / previous page · `o` or a click on a header sorts the page ·
`x` purge finished tasks (counts them, then asks).

## Reading the dashboard

* **Queues**: `(all)` first, then the queues needing attention first
  (dead + failed, then the longest wait); *Wait* is how long the oldest
  pending task has waited; `⚠` means no connected worker takes the queue
  (or the type of its oldest pending task), the title says which;
  *Done/s* is the rate of finished tasks over the last 5 s (the broker's
  last minute until then); the sparkline shows it over the last minutes.
* **Workers**: *Busy* is running/concurrency; *Beat* is the time since the
  last heartbeat, **stale** when a beat is overdue, **off** when the
  worker's connection is closed (its leases expire after the lease TTL).
* **Failures**: the newest failed (will retry) and dead tasks, newest first,
  with the error; a dead one says *out of retries* or *not retried*.

On tasks: *Runs* is attempts made of the runs allowed (`1 of 3`); the title
shows the filters, `backspace` clears them. The focused table's title starts
with `▶`.

When the broker goes away a red banner says so and the console reconnects
by itself (backing off up to 5 s); the last known figures stay on screen.
"""


class HelpScreen(ModalScreen[None]):
    BINDINGS = [Binding("escape,q,question_mark,f1", "dismiss(None)", "Close")]

    def __init__(self) -> None:
        super().__init__(classes="dialog")

    def compose(self) -> ComposeResult:
        with VerticalScroll(classes="box help"):
            yield Markdown(HELP)
