"""Task progress: a fraction 0..1 and a short message a running handler reports.

Contract: a worker keeps the latest progress of each running task and sends it
with its next heartbeat (``progress``: ``[task id, lease token, fraction,
message]`` items, docs/PROTOCOL.md); the broker stores it on the task, for the
live lease only, and publishes a coalesced ``progress`` event. ``clean`` is what
a reporter applies (a handler's values made valid: clamped, cut); ``parse`` is
what the broker applies (anything else refused: the heartbeat is hostile input).
Messages are stored as given, within bounds; every display makes them inert.

May import: tq.core only. Pure.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from tq.core.errors import InvalidRequest
from tq.core.task import MAX_PROGRESS_MESSAGE
from tq.core.values import MAX_INT

Progress = tuple[float, str | None]  # fraction 0..1, message (None: none)


def clean(fraction: object, message: object = None) -> Progress:
    """A handler's report made valid, or ValueError naming what is wrong with it.

    The fraction must be a finite real number; it is clamped to 0..1. The message
    is turned to text, NULs dropped, and cut to MAX_PROGRESS_MESSAGE characters."""
    if isinstance(fraction, bool) or not isinstance(fraction, int | float):
        raise ValueError(f"progress must be a number 0..1, got {fraction!r}")
    value = float(fraction)
    if not math.isfinite(value):
        raise ValueError(f"progress must be a finite number 0..1, got {fraction!r}")
    value = min(1.0, max(0.0, value))
    if message is None:
        return value, None
    text = str(message).replace("\x00", "")[:MAX_PROGRESS_MESSAGE]
    return value, text or None


def parse(value: object, leases: Mapping[str, int]) -> dict[str, Progress]:
    """A heartbeat's ``progress`` field: task id -> (fraction, message).

    Every item must name one of the heartbeat's own ``leases`` (id and token), at
    most once, so the field is no longer than the lease list."""
    if value is None:
        return {}
    if not isinstance(value, list | tuple):
        raise InvalidRequest("heartbeat progress must be an array of [task id, token, p, msg]")
    out: dict[str, Progress] = {}
    for item in value:
        if not isinstance(item, list | tuple) or len(item) != 4:
            raise InvalidRequest(
                "heartbeat progress items must be [task id, lease token, fraction, message]"
            )
        task_id, token, fraction, message = item
        if not isinstance(task_id, str) or task_id in out:
            raise InvalidRequest("heartbeat progress names a task twice or not by its id")
        if (
            isinstance(token, bool)
            or not isinstance(token, int)
            or not 0 <= token <= MAX_INT
            or leases.get(task_id) != token
        ):
            raise InvalidRequest(
                f"heartbeat progress for {task_id!r} must name a lease of the same heartbeat"
            )
        if (
            isinstance(fraction, bool)
            or not isinstance(fraction, int | float)
            or not 0.0 <= fraction <= 1.0  # also refuses NaN
        ):
            raise InvalidRequest(
                f"heartbeat progress for {task_id!r} must be a number 0..1, got {fraction!r}"
            )
        if message is not None and (
            not isinstance(message, str) or len(message) > MAX_PROGRESS_MESSAGE or "\x00" in message
        ):
            raise InvalidRequest(
                f"heartbeat progress message for {task_id!r} must be nil or a string of at "
                f"most {MAX_PROGRESS_MESSAGE} characters without NUL"
            )
        out[task_id] = (float(fraction), message or None)
    return out


def as_dict(task_id: str, progress: Progress) -> dict[str, Any]:
    return {"id": task_id, "progress": progress[0], "message": progress[1]}
