"""Sortable unique task ids: UUIDv7 (RFC 9562) strings.

The first 48 bits are the Unix time in milliseconds, so ids sort by creation
time. Within one millisecond a 12-bit counter (rand_a) keeps ids from one
process strictly increasing; the remaining 62 bits are random.
"""

from __future__ import annotations

import os
import threading
import uuid

_lock = threading.Lock()
_last_ms = 0
_counter = 0


def uuid7(now: float) -> str:
    """A UUIDv7 string for time ``now`` (seconds since the epoch)."""
    global _last_ms, _counter
    ms = int(now * 1000)
    with _lock:
        if ms <= _last_ms:
            ms = _last_ms
            _counter += 1
            if _counter > 0xFFF:  # counter exhausted: borrow the next millisecond
                ms += 1
                _counter = 0
        else:
            _counter = int.from_bytes(os.urandom(2), "big") & 0x3FF  # leave headroom
        _last_ms = ms
        counter = _counter
    rand_b = int.from_bytes(os.urandom(8), "big") & ((1 << 62) - 1)
    value = (ms & ((1 << 48) - 1)) << 80 | 0x7 << 76 | counter << 64 | 0b10 << 62 | rand_b
    return str(uuid.UUID(int=value))


def is_task_id(text: str) -> bool:
    try:
        uuid.UUID(text)
    except (ValueError, AttributeError, TypeError):
        return False
    return True
