"""Typed tasks, declared once: the producer submits them, the worker runs them.

    tq worker --import tasks --queues default,emails      (run from this directory)

The task types are ``tasks.send_welcome`` and ``tasks.word_count`` (module
name + function name).
"""

from __future__ import annotations

from collections import Counter
from typing import Literal

import tq


@tq.task(queue="emails", max_retries=5, priority="high", timeout=30)
async def send_welcome(to: str, name: str, language: Literal["en", "fr"] = "en") -> dict[str, str]:
    """An async task: runs on the worker's trio loop (await trio-friendly I/O here)."""
    greeting = {"en": "Welcome", "fr": "Bienvenue"}[language]
    return {"to": to, "subject": f"{greeting}, {name}!"}


@tq.task
def word_count(text: str, top: int = 3) -> dict[str, int]:
    """A plain function: runs in a worker thread, so it may block."""
    return dict(Counter(text.lower().split()).most_common(top))
