"""The tq worker: claims tasks, runs handlers, reports results.

Contract: ``runner.py`` owns the broker session (claim in batches sized to
free capacity, batched results, heartbeats with lease extension and host
stats, reconnect with backoff, graceful drain); ``handlers.py`` the handler
registry and built-ins; ``executable.py`` programs as handlers (own process
group, killed as a group on timeout or cancel). May import: tq.core,
tq.client, tq.config, trio, psutil. Importing ``tq.worker`` stays light:
user code does ``from tq.worker import handler``.
"""

from tq.worker.context import TaskContext, context
from tq.worker.handlers import Reject, Retry, default_registry, handler

__all__ = ["Reject", "Retry", "TaskContext", "context", "default_registry", "handler"]
