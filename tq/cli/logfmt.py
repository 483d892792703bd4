"""Log formats: ``human`` lines for a terminal, ``--log-format json`` for log shippers.

Human lines are made inert (tq.core.text): log messages carry task types,
queue names, worker names and error texts other parties chose, and a
terminal must not obey escape sequences in them (tracebacks keep their
lines). JSON lines keep every string exact (JSON escapes control characters).

``--log-format json``: one JSON object per log record:

    {"ts": "2026-11-20T10:00:00.123+00:00", "level": "info", "logger": "tq.broker",
     "message": "broker listening on 127.0.0.1:7470 (TLS)", "pid": 4242}

``exc`` carries a formatted traceback when the record has one; extra fields
passed with ``logger.info(..., extra={...})`` are kept when JSON can carry them.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from typing import Any

from tq.core.text import inert

HUMAN = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
FORMATS = ("human", "json")
_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            "pid": record.process,
        }
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        for key, value in vars(record).items():
            if key not in _STANDARD and key not in out:
                out[key] = value
        return json.dumps(out, default=str, ensure_ascii=False)


class HumanFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__(HUMAN)

    def format(self, record: logging.LogRecord) -> str:
        return inert(super().format(record), multiline=True)


def formatter(kind: str) -> logging.Formatter:
    """The formatter for ``--log-format`` ``kind`` (human or json)."""
    if kind == "json":
        return JsonFormatter()
    if kind == "human":
        return HumanFormatter()
    raise ValueError(f"log format must be one of {', '.join(FORMATS)}, not {kind!r}")
