"""Exit statuses: the one place that maps error codes to them.

0  success
1  any other error (internal, store, remote)
2  usage: bad flag, bad JSON, invalid task fields, bad configuration
3  not found: no task with that id
4  connection: broker unreachable, TLS failure, broker shutting down
5  the task ended without success (`tq wait`: dead or cancelled)
6  timed out (`tq wait --timeout`)
7  refused: no or bad API key (unauthorized), or the key's role/queues forbid it
8  rate limited: the key submitted faster than the broker allows; try again later
"""

from __future__ import annotations

OK = 0
ERROR = 1
USAGE = 2
NOT_FOUND = 3
CONNECTION = 4
TASK_FAILED = 5
TIMEOUT = 6
REFUSED = 7
RATE_LIMITED = 8

BY_CODE = {
    "invalid": USAGE,
    "payload_too_large": USAGE,
    "config": USAGE,
    "unknown_message": USAGE,
    "frame_too_large": USAGE,
    "not_found": NOT_FOUND,
    "connection": CONNECTION,
    "tls": CONNECTION,
    "unavailable": CONNECTION,
    "timeout": TIMEOUT,
    "unauthorized": REFUSED,
    "forbidden": REFUSED,
    "rate_limited": RATE_LIMITED,
}


def for_code(code: str) -> int:
    return BY_CODE.get(code, ERROR)
