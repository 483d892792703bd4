"""Quantities as text for people (CLI tables, console). Pure."""

from __future__ import annotations

_BINARY_UNITS = ("B", "KiB", "MiB", "GiB", "TiB")


def human_bytes(n: float | None, missing: str = "") -> str:
    """1536 -> "1.5 KiB"; powers of 1024, named as such; ``missing`` for None."""
    if n is None:
        return missing
    value = float(n)
    for unit in _BINARY_UNITS:
        if abs(value) < 1024 or unit == _BINARY_UNITS[-1]:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")  # the loop returns at the last unit


_DURATION_UNITS = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}


def seconds(value: float | str, what: str = "duration") -> float:
    """A duration as seconds: a number, or text like ``"1h"``, ``"30m"``, ``"7d"``,
    ``"45s"``, ``"2w"``, ``"90"``. ValueError naming ``what`` if unreadable."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        text = value.strip().lower()
        unit = text[-1:] if text[-1:].isalpha() else ""
        number = text[: len(text) - len(unit)].strip()
        if unit in _DURATION_UNITS and number.replace(".", "", 1).isdigit() and number.isascii():
            return float(number) * _DURATION_UNITS[unit]
    raise ValueError(f"{what} {value!r} is not a duration: use e.g. 1h, 30m, 7d, 45s or seconds")
