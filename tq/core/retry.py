"""Retry policy: exponential backoff with equal jitter, bounded by a cap.

delay(n) for the n-th failed attempt (n >= 1):
    ceiling = min(cap, base * 2 ** (n - 1))
    delay   = ceiling / 2 + uniform(0, ceiling / 2)
so every delay lies in [ceiling / 2, ceiling]: jittered, never zero, never above cap.

The one backoff formula of tq: a failed task's next run (the store), a worker's
reconnects (tq.worker.runner) and the console's (tq.tui.link) all use it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

DEFAULT_BASE = 1.0
DEFAULT_CAP = 300.0


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    base: float = DEFAULT_BASE
    cap: float = DEFAULT_CAP

    def ceiling(self, attempt: int) -> float:
        if attempt < 1:
            raise ValueError("attempt counts from 1")
        exponent = min(attempt - 1, 64)  # 2**64 * base already exceeds any cap
        return min(self.cap, self.base * 2.0**exponent)

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        ceiling = self.ceiling(attempt)
        r = (rng or random).random()
        return ceiling / 2 + r * ceiling / 2
