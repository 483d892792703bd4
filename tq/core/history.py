"""A task history row (the broker's ``query history`` maps) in words, for the CLI and
the console. Pure: no I/O.

The events (tq.store.history_sql writes them): submitted, blocked, leased, released,
lease_lost, failed, succeeded, dead, cancelled, retried, promoted, unblocked,
scheduled, priority.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


def who(row: Mapping[str, Any]) -> str:
    """Who made the change: an actor (``key:ID``, ``anonymous``, ``dependency:ID``,
    ``schedule:NAME``), else the worker that held the task, else ""."""
    actor = row.get("actor")
    if actor:
        return str(actor)
    worker = row.get("worker")
    return f"worker:{worker}" if worker else ""


def details(row: Mapping[str, Any], when: Any = None) -> str:
    """What else the row says: lease token, error, when a retry is due, priority.
    ``when`` formats a Unix time (default: the number as is)."""
    fmt = when or (lambda ts: f"{ts:.3f}")
    event = row.get("event")
    parts: list[str] = []
    if row.get("token") is not None and event == "leased":
        parts.append(f"token {row['token']}")
    error = row.get("error")
    if isinstance(error, Mapping):
        message = str(error.get("message") or "")
        parts.append(f"{error.get('type') or 'Error'}: {message}".rstrip(": "))
    if row.get("run_at") is not None and event in ("failed", "scheduled"):
        parts.append(f"{'retry' if event == 'failed' else 'runs'} at {fmt(row['run_at'])}")
    if event in ("priority", "submitted") and row.get("priority") is not None:
        parts.append(f"priority {row['priority']}")
    return "; ".join(parts)


def gaps(rows: Sequence[Mapping[str, Any]]) -> list[tuple[Mapping[str, Any] | None, int]]:
    """The rows with the dropped ones between them counted: (row, 0) for each row,
    (None, k) before a row that follows k dropped transitions."""
    out: list[tuple[Mapping[str, Any] | None, int]] = []
    previous = 0
    for row in rows:
        n = int(row.get("n") or 0)
        if previous and n > previous + 1:
            out.append((None, n - previous - 1))
        out.append((row, 0))
        previous = n
    return out
