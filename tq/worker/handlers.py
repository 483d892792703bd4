"""Task handlers: the registry, the ``@handler`` decorator and the built-ins.

A Python handler takes the payload and returns a msgpack-able result:

    from tq.worker import handler, Retry, Reject

    @handler("resize")
    async def resize(payload):          # async (trio) or plain def
        ...
        return {"ok": True}

Plain ``def`` handlers run in a worker thread (``trio.to_thread``) so they
may block; on timeout or cancellation such a thread is abandoned (Python
cannot interrupt it), so prefer async handlers or ``--exec`` programs for
work that must stop on time. Raise ``Retry(delay)`` to ask for another
attempt later, ``Reject(message)`` to fail without retrying; any other
exception is a failure retried with backoff while attempts remain.
Handlers should be idempotent: delivery is at least once. A handler with a
parameter named ``ctx`` receives the run's ``TaskContext`` (its id, attempt,
and ``ctx.progress(fraction, message)``; tq/worker/context.py), which
``tq.worker.context()`` also returns anywhere inside the run.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from tq.core.errors import ConfigError
from tq.worker.context import TaskContext


class Retry(Exception):
    """Raise in a handler: run this task again later (counts as an attempt)."""

    def __init__(self, message: str = "handler asked to retry", delay: float | None = None):
        super().__init__(message)
        self.delay = delay


class Reject(Exception):
    """Raise in a handler: this task failed and must not be retried."""


HandlerFn = Callable[[Any], Any] | Callable[[Any], Awaitable[Any]]


@dataclass(frozen=True)
class Handler:
    name: str
    fn: Callable[..., Any]
    is_async: bool
    wants_ctx: bool = False  # it has a parameter named ``ctx``: pass the TaskContext

    async def __call__(self, payload: Any, ctx: TaskContext | None = None) -> Any:
        fn = self.fn
        if self.wants_ctx:
            fn = functools.partial(fn, ctx=ctx)
        if self.is_async:
            return await fn(payload)
        return await trio.to_thread.run_sync(fn, payload, abandon_on_cancel=True)


class HandlerRegistry:
    def __init__(self) -> None:
        self._handlers: dict[str, Handler] = {}

    def register(self, name: str, fn: Callable[[Any], Any]) -> None:
        if not name or any(c.isspace() or c == "," for c in name):
            raise ConfigError(f"handler name {name!r} must be non-empty, without spaces or commas")
        try:
            wants_ctx = "ctx" in inspect.signature(fn).parameters
        except (TypeError, ValueError):  # a callable without a signature
            wants_ctx = False
        self._handlers[name] = Handler(name, fn, inspect.iscoroutinefunction(fn), wants_ctx)

    def handler(
        self, name: str | None = None
    ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
            self.register(name or fn.__name__, fn)
            return fn

        return decorate

    def get(self, name: str) -> Handler | None:
        return self._handlers.get(name)

    def names(self) -> list[str]:
        return sorted(self._handlers)

    def update(self, other: HandlerRegistry) -> None:
        self._handlers.update(other._handlers)


# The registry that ``@handler`` fills when a user's module is imported.
default_registry = HandlerRegistry()
handler = default_registry.handler


async def _echo(payload: Any) -> Any:
    """Return the payload unchanged."""
    return payload


async def _sleep(payload: Any) -> Any:
    """Sleep for payload seconds (a number, or {"seconds": n}); return {"slept": n}."""
    seconds = payload.get("seconds", 1) if isinstance(payload, dict) else payload
    if isinstance(seconds, bool) or not isinstance(seconds, int | float) or seconds < 0:
        raise Reject(f"sleep wants a number of seconds >= 0, got {payload!r}")
    await trio.sleep(seconds)
    return {"slept": seconds}


async def _fail(payload: Any) -> Any:
    """Always fail (retried as usual): for testing retries, dead letters and alerts."""
    message = payload.get("message") if isinstance(payload, dict) else payload
    raise RuntimeError(str(message or "failed on purpose"))


BUILTINS: dict[str, Callable[[Any], Awaitable[Any]]] = {
    "echo": _echo,
    "sleep": _sleep,
    "fail": _fail,
}


def builtin_registry() -> HandlerRegistry:
    registry = HandlerRegistry()
    for name, fn in BUILTINS.items():
        registry.register(name, fn)
    return registry


def import_handlers(module: str) -> None:
    """Import a user's module so its ``@handler`` functions and ``@tq.task``
    declarations (tq/tasks.py) register in ``default_registry``."""
    if str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    try:
        importlib.import_module(module)
    except ImportError as exc:
        frozen = (
            " (the frozen tq executable cannot import your code: run `python -m tq worker` "
            "from the environment where tq and your package are installed)"
            if getattr(sys, "frozen", False)
            else ""
        )
        raise ConfigError(f"cannot import handler module {module!r}: {exc}{frozen}") from None
    tasks = sys.modules.get("tq.tasks")  # loaded only if some module declared a task
    if tasks is not None:
        tasks.register(default_registry)
