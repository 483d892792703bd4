"""When a delayed task is due: durations and times as people write them.

Contract: pure (no I/O, no clock: ``now`` is an argument); imports only tq.core.
Errors are InvalidRequest naming the text and the form expected.

    parse_duration("30s") -> 30.0      units s, m, h, d, w; "1h30m"; plain seconds
    format_duration(604800) -> "7d"    the inverse, for showing settings and TTLs
    parse_time("2026-12-01T09:00:00Z") -> epoch seconds
                                       RFC 3339 with an explicit zone (Z or +hh:mm);
                                       a time without a zone is refused: it would
                                       mean different instants on broker and client
    due_at(delay, run_at, now)         the instant a task submitted at ``now``
                                       becomes runnable: the later of now + delay
                                       and run_at; at most MAX_DELAY ahead

A due time at or before ``now`` is not an error (a clock a little behind, or a
time that passed while the request travelled): the task is pending at once.
"""

from __future__ import annotations

import math
import re
from datetime import datetime

from tq.core.errors import InvalidRequest
from tq.core.limits import MAX_EPOCH, MAX_SECONDS

MAX_DELAY = MAX_SECONDS  # ten years ahead: a due time beyond this is a mistake
MIN_RUN_AT = 0.0  # epoch seconds: 1970-01-01T00:00:00Z
MAX_RUN_AT = MAX_EPOCH  # 9999-12-31T23:59:59Z (what every reader can print)

_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}
_PART = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")
_DURATION = re.compile(r"(?:\d+(?:\.\d+)?[smhdw])+|\d+(?:\.\d+)?")
# RFC 3339 date-time: the zone is mandatory (Z, z or a numeric offset)
_RFC3339 = re.compile(
    r"\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(?:\.\d{1,9})?(?:[Zz]|[+-]\d{2}:\d{2})"
)
_NAIVE = re.compile(r"\d{4}-\d{2}-\d{2}(?:[Tt ]\d{2}:\d{2}(?::\d{2}(?:\.\d+)?)?)?")


def parse_duration(text: str) -> float:
    """'30s', '5m', '2h', '1d', '1w', '1h30m' or plain seconds ('90') -> seconds."""
    value = text.strip().lower()
    if len(value) > 64 or not _DURATION.fullmatch(value):
        raise InvalidRequest(
            f"{text!r} is not a duration: write e.g. 30s, 5m, 2h, 1d, 1h30m or plain seconds"
        )
    if value[-1].isdigit():
        seconds = float(value)
    else:
        seconds = sum(float(n) * _UNITS[unit] for n, unit in _PART.findall(value))
    if not math.isfinite(seconds) or seconds > MAX_DELAY:
        raise InvalidRequest(f"duration {text!r} is longer than the limit of 10 years")
    return seconds


def format_duration(seconds: float) -> str:
    """Seconds as people write them, the inverse of ``parse_duration``: 604800 -> '7d',
    5400 -> '1h30m', 90.5 -> '1m30.5s', 0 -> '0s'."""
    if not math.isfinite(seconds) or seconds < 0:
        return f"{seconds:g}s"
    parts = []
    rest = seconds
    for unit in ("d", "h", "m"):
        whole = int(rest // _UNITS[unit])
        if whole:
            parts.append(f"{whole}{unit}")
            rest -= whole * _UNITS[unit]
    if rest or not parts:
        parts.append(f"{round(rest, 6):g}s")
    return "".join(parts)


def parse_time(text: str) -> float:
    """An RFC 3339 time with an explicit zone -> epoch seconds."""
    value = text.strip()
    if _RFC3339.fullmatch(value):
        try:
            stamp = datetime.fromisoformat(value.replace("z", "Z").replace("t", "T")).timestamp()
        except ValueError as exc:
            raise InvalidRequest(f"{text!r} is not a valid time: {exc}") from None
        if not MIN_RUN_AT <= stamp <= MAX_RUN_AT:
            raise InvalidRequest(f"time {text!r} is outside 1970..9999")
        return stamp
    if _NAIVE.fullmatch(value):
        raise InvalidRequest(
            f"time {text!r} has no zone: add one, e.g. {value}Z (UTC) or {value}+01:00"
            if "T" in value.upper() or " " in value
            else f"time {text!r} has no time of day and zone: write e.g. {value}T09:00:00Z"
        )
    raise InvalidRequest(
        f"{text!r} is not an RFC 3339 time: write e.g. 2026-12-01T09:00:00Z or "
        "2026-12-01T10:00:00+01:00"
    )


def check_delay(value: object, what: str = "task delay") -> float:
    """A wire ``delay``: a finite number of seconds, 0..MAX_DELAY."""
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not 0 <= value <= MAX_DELAY  # also refuses NaN and infinities
    ):
        raise InvalidRequest(
            f"{what} must be a finite number of seconds 0..{MAX_DELAY:.0f} (10 years), "
            f"got {value!r}"
        )
    return float(value)


def check_run_at(value: object, what: str = "task run_at") -> float:
    """A wire ``run_at``: finite epoch seconds in 1970..9999 (the bound ahead of now is
    ``due_at``'s)."""
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not MIN_RUN_AT <= value <= MAX_RUN_AT
    ):
        raise InvalidRequest(
            f"{what} must be finite epoch seconds {MIN_RUN_AT:.0f}..{MAX_RUN_AT:.0f} "
            f"(1970..9999), got {value!r}"
        )
    return float(value)


def due_at(delay: float | None, run_at: float | None, now: float) -> float | None:
    """The due time of a task submitted at ``now``, or None when it is due at once.

    InvalidRequest when it lies more than MAX_DELAY after ``now``."""
    if delay is None and run_at is None:
        return None
    due = max(now + (delay or 0.0), -math.inf if run_at is None else run_at)
    if due - now > MAX_DELAY:
        raise InvalidRequest(
            f"a task may be delayed at most 10 years; this one would be due "
            f"{(due - now) / 86400:.0f} days from now"
        )
    return due if due > now else None
