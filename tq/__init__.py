"""tq — a distributed task queue for operators.

One package runs as broker, worker, console or CLI. See docs/ARCHITECTURE.md.
"""

__version__ = "0.1.0"
PROTOCOL_VERSION = 1

__all__ = ["PROTOCOL_VERSION", "__version__"]
