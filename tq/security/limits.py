"""Rate limits: a token bucket per key. Pure; time is an argument.

    limiter = RateLimiter(rate=1000.0, burst=2000.0)
    limiter.take("key-id", n_tasks, now)   # RateLimited(retry_after=...) when over

A bucket holds up to ``burst`` tokens and refills at ``rate`` tokens per
second; a submission of n tasks takes n tokens or, if there are not
enough, takes none and is refused with the time until there will be.
A request larger than the whole bucket can never pass and is refused as
invalid (split it). ``rate`` 0 disables the limit.
"""

from __future__ import annotations

from dataclasses import dataclass

from tq.core.errors import InvalidRequest, RateLimited


@dataclass
class TokenBucket:
    rate: float  # tokens per second
    burst: float  # capacity
    tokens: float
    stamp: float  # when ``tokens`` was last brought up to date

    def take(self, n: float, now: float) -> float:
        """Take ``n`` tokens; 0.0 on success, else the seconds to wait (nothing taken)."""
        elapsed = max(0.0, now - self.stamp)
        self.tokens = min(self.burst, self.tokens + elapsed * self.rate)
        self.stamp = max(self.stamp, now)
        if self.tokens >= n:
            self.tokens -= n
            return 0.0
        return (n - self.tokens) / self.rate


class RateLimiter:
    """One bucket per key id, created full on first use."""

    def __init__(self, rate: float, burst: float) -> None:
        self.rate = rate
        self.burst = max(burst, 1.0)
        self._buckets: dict[str, TokenBucket] = {}

    @property
    def enabled(self) -> bool:
        return self.rate > 0

    def take(self, key: str, n: int, now: float) -> None:
        """Charge ``n`` to ``key``'s bucket; RateLimited with ``retry_after`` if over."""
        if not self.enabled or n <= 0:
            return
        if n > self.burst:
            raise InvalidRequest(
                f"{n} tasks in one request exceed this key's burst of {self.burst:g}; "
                "submit them in smaller batches"
            )
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = TokenBucket(self.rate, self.burst, self.burst, now)
        wait = bucket.take(n, now)
        if wait > 0:
            raise RateLimited(
                f"key {key} is over its submission rate ({self.rate:g} tasks/s, burst "
                f"{self.burst:g}); retry after {wait:.3g}s",
                retry_after=max(0.001, round(wait, 3)),
            )

    def forget(self, key: str) -> None:
        self._buckets.pop(key, None)
