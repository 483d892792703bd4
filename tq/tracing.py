"""OpenTelemetry trace context across the queue (optional: ``pip install 'tq[otel]'``).

Contract: when code submits a task from inside an OpenTelemetry span, the
client attaches the span's W3C trace context (``traceparent`` and, if set,
``tracestate``) to the task as its ``trace`` field; the broker stores it and
hands it to the worker with the lease; the worker runs the handler inside a
span ``tq.task <type>`` whose parent is that context, so a task's run joins
the trace of the request that submitted it, however long it waited. An exec
handler gets the context in ``TRACEPARENT`` / ``TRACESTATE``.

Without OpenTelemetry nothing happens and nothing is imported: both sides
look for ``opentelemetry.trace`` among the modules the application already
imported (an application that traces has imported it; one that does not
pays nothing). The worker side starts spans only when a tracer provider is
configured in the worker process (e.g. by the module given to --import).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

TRACE_FIELDS = ("traceparent", "tracestate")


def _otel() -> bool:
    return "opentelemetry.trace" in sys.modules


def current_carrier() -> dict[str, str] | None:
    """The active span's trace context as a ``trace`` field, or None (no span, no OTel)."""
    if not _otel():
        return None
    from opentelemetry import propagate, trace

    if not trace.get_current_span().get_span_context().is_valid:
        return None
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    picked = {k: v for k, v in carrier.items() if k in TRACE_FIELDS and isinstance(v, str)}
    return picked or None


@contextmanager
def task_span(
    task_type: str, task_id: str, attempt: int, trace: Mapping[str, str] | None
) -> Iterator[None]:
    """Run a handler inside ``tq.task <type>``, a child of the submitter's context."""
    if not _otel():
        yield
        return
    from opentelemetry import propagate
    from opentelemetry import trace as otel

    parent = propagate.extract(dict(trace)) if trace else None
    attributes: dict[str, Any] = {
        "messaging.system": "tq",
        "messaging.operation": "process",
        "messaging.message.id": task_id,
        "tq.task.type": task_type,
        "tq.task.attempt": attempt,
    }
    tracer = otel.get_tracer("tq")
    with tracer.start_as_current_span(
        f"tq.task {task_type}",
        context=parent,
        kind=otel.SpanKind.CONSUMER,
        attributes=attributes,
    ):
        yield


def exec_environment(trace: Mapping[str, str] | None) -> dict[str, str]:
    """``TRACEPARENT`` / ``TRACESTATE`` for a program run as a handler."""
    if not trace:
        return {}
    return {
        key.upper(): value
        for key, value in trace.items()
        if key in TRACE_FIELDS and "\x00" not in value  # a NUL cannot be in an environment
    }
