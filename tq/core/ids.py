"""Sortable unique task ids: UUIDv7 (RFC 9562) strings.

The first 48 bits are the Unix time in milliseconds, so ids sort by creation
time. Within one millisecond a 12-bit counter (rand_a) keeps ids from one
process strictly increasing; the remaining 62 bits are random.
"""

from __future__ import annotations

import os
import random
import threading
import uuid

_lock = threading.Lock()
_last_ms = 0
_counter = 0
# Task ids need uniqueness, not secrecy (lease tokens are the secrets): a PRNG
# seeded from the OS, reseeded in forked children, is ~30x cheaper than an
# os.urandom call per id.
_rng = random.Random(os.urandom(32))
os.register_at_fork(after_in_child=lambda: _rng.seed(os.urandom(32)))


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
            _counter = _rng.getrandbits(10)  # random start, leaving headroom
        _last_ms = ms
        counter = _counter
        rand_b = _rng.getrandbits(62)
    value = (ms & ((1 << 48) - 1)) << 80 | 0x7 << 76 | counter << 64 | 0b10 << 62 | rand_b
    h = f"{value:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def is_task_id(text: str) -> bool:
    try:
        uuid.UUID(text)
    except (ValueError, AttributeError, TypeError):
        return False
    return True
