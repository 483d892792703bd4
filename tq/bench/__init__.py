"""`tq bench`: throughput, latency and memory of a real broker on loopback.

Every scenario starts a fresh broker process (TLS on, durability exactly as
shipped, its own temporary data directory) and, where it needs them, worker
processes; the driving clients run in this process under trio. Figures are
printed with their setup, or as JSON (``--json``) to compare commits.
Run by hand (``tq bench``, ``python -m benchmarks``), never in the test suite.
"""

from tq.bench.runner import BenchConfig, run_bench

__all__ = ["BenchConfig", "run_bench"]
