"""tq — a distributed task queue for operators.

One package runs as broker, worker, console or CLI. See docs/ARCHITECTURE.md.
The Python API for applications (docs/PYTHON.md) is here too, loaded on
first use so that ``import tq`` stays light: ``tq.task`` declares a task,
``tq.configure`` says where to submit, ``tq.connect`` opens a client (trio or asyncio).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tq.tasks import TaskFailed, configure, connect, task

__version__ = "0.1.0"
PROTOCOL_VERSION = 1

__all__ = ["PROTOCOL_VERSION", "TaskFailed", "__version__", "configure", "connect", "task"]

_LAZY = frozenset({"TaskFailed", "configure", "connect", "task"})


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'tq' has no attribute {name!r}")
    from tq import tasks

    value = getattr(tasks, name)
    globals()[name] = value
    return value
