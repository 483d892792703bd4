"""What a value from the network may be: plain data, finite numbers, bounded depth.

Contract: every number and every user value that crosses the wire or REST
passes through here once, at the edge, before anything is stored or
computed with it. Pure: no I/O; imports only tq.core.

``check_plain`` is the rule for payloads and results: a value tq can store,
hand to a worker, and show as JSON in every reader (CLI, REST, console) is

    None, bool, int (-2**63 .. 2**64-1), finite float, str, bytes,
    list (or tuple), map with str or int keys,

nested at most ``MAX_DEPTH`` levels. NaN and infinities, msgpack extension
values (Timestamps included) and anything else are refused: such a value
could be stored but not read back by every client (JSON has no NaN; a
Timestamp is not JSON; msgpack encoders stop at a nesting limit), so it
would poison every read of its task.

``readable`` is the same rule for reads: a stored value that breaks it
(stored before the rule existed) is replaced by a short text that says so,
so one bad row never fails a read.

``number`` and ``whole`` check scalars: the right type (a bool is never a
number), finite, within range; errors name the field and the range.
"""

from __future__ import annotations

from typing import Any

from tq.core.errors import InvalidRequest
from tq.core.limits import MAX_SECONDS

MAX_DEPTH = 64  # nesting of maps and arrays in a payload or result
MIN_INT = -(2**63)
MAX_INT = 2**64 - 1  # what msgpack can carry

_SCALARS = (str, bool, bytes, type(None))


def check_plain(value: Any, what: str = "payload") -> None:
    """InvalidRequest naming the first place in ``value`` that is not plain data."""
    problem = _first_problem(value)
    if problem is not None:
        where, why = problem
        raise InvalidRequest(f"{what}{where} {why}")


def readable(value: Any, what: str = "payload") -> Any:
    """``value`` if it is plain data, else a text saying why it cannot be shown."""
    problem = _first_problem(value)
    if problem is None:
        return value
    where, why = problem
    return f"<unreadable {what}: {what}{where} {why}>"


def _first_problem(value: Any) -> tuple[str, str] | None:
    """(path, reason) of the first offending element, or None; iterative, one pass."""
    kind = type(value)
    if kind is str or (kind is int and MIN_INT <= value <= MAX_INT) or value is None:
        return None  # the common scalar payloads, without building a stack
    stack: list[tuple[Any, int, str]] = [(value, 0, "")]
    while stack:
        item, depth, path = stack.pop()
        kind = type(item)
        if kind is dict:
            if depth >= MAX_DEPTH:
                return path, f"is nested deeper than {MAX_DEPTH} levels of maps and arrays"
            for key, child in item.items():
                key_kind = type(key)
                if key_kind is not str and not (key_kind is int and MIN_INT <= key <= MAX_INT):
                    return path, f"has a map key of type {key_kind.__name__}: keys are strings"
                child_path = f"{path}[{key!r}]" if len(path) < 200 else path
                if type(child) in _SCALARS:
                    continue
                stack.append((child, depth + 1, child_path))
        elif kind is list or kind is tuple:
            if depth >= MAX_DEPTH:
                return path, f"is nested deeper than {MAX_DEPTH} levels of maps and arrays"
            for index, child in enumerate(item):
                if type(child) in _SCALARS:
                    continue
                stack.append((child, depth + 1, f"{path}[{index}]" if len(path) < 200 else path))
        elif kind is float:
            if item - item != 0.0:  # NaN or an infinity
                return path, f"is {item!r}: only finite numbers can be stored (JSON has no NaN)"
        elif kind is int:
            if not MIN_INT <= item <= MAX_INT:
                return path, "is an integer outside the 64-bit range msgpack carries"
        elif kind not in _SCALARS:
            return path, (
                f"is a {kind.__name__}: only null, booleans, numbers, strings, bytes, "
                "arrays and maps are accepted (no msgpack extension types)"
            )
    return None


def number(
    value: object,
    what: str,
    *,
    lo: float = 0.0,
    hi: float = MAX_SECONDS,
    default: float | None = None,
) -> float:
    """A finite float in [lo, hi]; ``default`` when value is None (if a default is given)."""
    if value is None and default is not None:
        return default
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not lo <= value <= hi  # also False for NaN
    ):
        raise InvalidRequest(f"{what} must be a finite number {lo:g}..{hi:g}, got {value!r}")
    return float(value)


def whole(
    value: object,
    what: str,
    *,
    lo: int = 0,
    hi: int = 2**63 - 1,
    default: int | None = None,
) -> int:
    """An int (never a bool) in [lo, hi]; ``default`` when value is None (if given)."""
    if value is None and default is not None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise InvalidRequest(f"{what} must be a whole number {lo}..{hi}, got {value!r}")
    return value
