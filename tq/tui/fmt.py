"""Text for the console: ages, sizes, times, sparklines, short ids. Pure functions.

Text another party chose (types, queues, messages, host names) goes through
``tq.core.text.inert`` before it reaches the screen: ``one_line`` and
``plain`` do that, and ``widgets.KeyedTable`` makes every str cell an inert
``Text`` (never parsed as markup).
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Sequence
from typing import Any

from rich.text import Text

from tq.core.text import inert
from tq.core.units import human_bytes

BLOCKS = "▁▂▃▄▅▆▇█"


def age(seconds: float | None) -> str:
    """3s, 2m05s, 1h02m, 3d04h."""
    if seconds is None:
        return "-"
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def size(n: int | float | None) -> str:
    return human_bytes(n, missing="-")


def count(n: int) -> str:
    return f"{n:,}" if n else "·"


def rate(per_second: float | None) -> str:
    if per_second is None:
        return "-"
    if per_second >= 100:
        return f"{per_second:,.0f}"
    return f"{per_second:.1f}"


def when(ts: float | None, tz: dt.tzinfo | None = None, *, date: bool = False) -> str:
    """A broker timestamp as local (or ``tz``) time: 14:03:07, with the date if asked."""
    if ts is None:
        return "-"
    try:
        moment = dt.datetime.fromtimestamp(ts, tz)
    except (OverflowError, OSError, ValueError):  # e.g. a retry ~1e300 s away
        return f"{ts:.6g}"
    return moment.strftime("%Y-%m-%d %H:%M:%S" if date else "%H:%M:%S")


def sparkline(values: Sequence[float], width: int) -> str:
    """The last ``width`` values as block characters, scaled to their maximum."""
    if width <= 0:
        return ""
    tail = list(values)[-width:]
    top = max(tail, default=0.0)
    if top <= 0:
        return (" " * (width - len(tail))) + "▁" * len(tail)
    steps = len(BLOCKS) - 1
    line = "".join(BLOCKS[min(steps, round(v / top * steps))] for v in tail)
    return " " * (width - len(tail)) + line


def short_id(task_id: str, width: int = 13) -> str:
    """The end of a UUIDv7 (its random part): ids made close in time share their start."""
    if len(task_id) <= width:
        return task_id
    return "…" + task_id[-(width - 1) :]


def pretty(value: Any) -> str:
    """A payload or result as indented JSON (bytes shown as their repr)."""
    if value is None:
        return "null"
    try:
        return json.dumps(value, indent=2, ensure_ascii=False, default=repr, sort_keys=True)
    except (TypeError, ValueError):
        return repr(value)


def one_line(value: Any, width: int = 60) -> str:
    """``value`` on one line of at most ``width`` characters, made inert."""
    text = value if isinstance(value, str) else json.dumps(value, default=repr)
    text = inert(" ".join(text.split()))
    return text if len(text) <= width else text[: width - 1] + "…"


def plain(value: Any, multiline: bool = False, **options: Any) -> Text:
    """``value`` as a rich Text of inert characters: shown as is, never parsed for markup.
    ``options``: Text options (style, justify...)."""
    return Text(inert(value, multiline), **options)


PROGRESS_BAR = 20  # cells of the bar drawn for a task's progress


def progress(fraction: float, message: str | None) -> Text:
    """``██████░░░░ 40% page 4/10``: a task's reported progress (message inert)."""
    value = min(1.0, max(0.0, fraction))
    filled = round(value * PROGRESS_BAR)
    text = Text("█" * filled, style="green")
    text.append("░" * (PROGRESS_BAR - filled), style="dim")
    text.append(f" {100 * value:.0f}%")
    if message:
        text.append(" ")
        text.append(plain(message))
    return text
