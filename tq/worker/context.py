"""What a running Python handler knows about its task, and how it reports progress.

    from tq.worker import context, handler

    @handler("export")
    async def export(payload, ctx):       # a parameter named ctx receives it
        for page in range(10):
            ...
            ctx.progress((page + 1) / 10, f"page {page + 1}/10")

    @tq.task
    def crunch(n: int) -> int:
        tq.worker.context().progress(0.5, "halfway")   # or look it up anywhere in the run

Contract: ``progress(fraction, message)`` never blocks and never sends anything
itself: it records the latest value (fraction clamped to 0..1, a finite number;
message cut to 200 characters) and asks the worker for an earlier heartbeat,
which carries the latest value of every running task (at most one such early
heartbeat a second). Calling it a million times costs a million assignments, not
a million messages. It is safe from async handlers and from the threads plain
``def`` handlers run in. ``context()`` outside a handler's run raises
RuntimeError.

May import: tq.core.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable
from dataclasses import dataclass, field

from tq.core.progress import Progress, clean

_current: contextvars.ContextVar[TaskContext] = contextvars.ContextVar("tq_task_context")


@dataclass(frozen=True)
class TaskContext:
    """The task a handler runs: its id, type, queue and attempt (1 for the first)."""

    id: str
    type: str
    queue: str
    attempt: int
    _report: Callable[[Progress], None] = field(repr=False, compare=False)

    def progress(self, fraction: float, message: str | None = None) -> None:
        """Report how far this run got: ``fraction`` 0..1 and a short message.

        ValueError if ``fraction`` is not a finite number (it is clamped to 0..1)."""
        self._report(clean(fraction, message))


def context() -> TaskContext:
    """The task the calling handler runs (RuntimeError outside a handler's run)."""
    try:
        return _current.get()
    except LookupError:
        raise RuntimeError(
            "tq.worker.context() is only available inside a running handler"
        ) from None


def bind(ctx: TaskContext) -> contextvars.Token[TaskContext]:
    """Make ``ctx`` the current context of this trio task (and of threads it starts)."""
    return _current.set(ctx)
