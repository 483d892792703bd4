"""The task the web application submits (run by `tq worker --import tasks`)."""

from __future__ import annotations

import re
import unicodedata

import tq


@tq.task(timeout=10)
def slugify(title: str, max_length: int = 40) -> str:
    """A URL slug for a title: Hello, World! becomes hello-world."""
    ascii_text = unicodedata.normalize("NFKD", title).encode("ascii", "ignore").decode()
    slug = re.sub(r"[^a-z0-9]+", "-", ascii_text.lower()).strip("-")
    return slug[:max_length].rstrip("-") or "untitled"
