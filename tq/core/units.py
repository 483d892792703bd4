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
