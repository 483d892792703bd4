"""OpenTelemetry trace context from the submitting span to the handler's span."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from tq.testing import running_broker, running_worker
from tq.tracing import exec_environment
from tq.worker.handlers import builtin_registry

EXPORTER = InMemorySpanExporter()


@pytest.fixture(scope="module", autouse=True)
def _provider() -> None:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(EXPORTER))
    trace.set_tracer_provider(provider)  # global, once per process


@pytest.mark.trio
async def test_a_task_run_joins_the_trace_that_submitted_it(tmp_path: Path) -> None:
    EXPORTER.clear()
    registry = builtin_registry()
    seen: dict[str, Any] = {}

    @registry.handler("traced")
    async def traced(payload: Any) -> Any:
        context = trace.get_current_span().get_span_context()
        seen[payload["n"]] = context.trace_id
        return payload

    tracer = trace.get_tracer("test")
    async with running_broker(tmp_path) as broker, running_worker(broker, registry):
        async with broker.client() as client:
            with tracer.start_as_current_span("web request") as request:
                task_id = await client.submit("traced", {"n": 1})
                parent = request.get_span_context()
            stored = await client.get(task_id)
            assert stored.trace is not None
            assert stored.trace["traceparent"].split("-")[1] == f"{parent.trace_id:032x}"
            await client.wait(task_id, timeout=15)
            untraced = await client.submit("traced", {"n": 2})  # no span: nothing carried
            assert (await client.get(untraced)).trace is None
            await client.wait(untraced, timeout=15)
    assert seen[1] == parent.trace_id
    assert seen[2] != parent.trace_id  # a root span of its own
    [run] = [s for s in EXPORTER.get_finished_spans() if s.name == "tq.task traced"][:1]
    assert run.parent is not None and run.parent.span_id == parent.span_id
    assert run.attributes is not None and run.attributes["messaging.message.id"] == task_id


def test_exec_handlers_get_the_context_as_environment() -> None:
    carrier = {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}
    assert exec_environment(carrier) == {"TRACEPARENT": carrier["traceparent"]}
    assert exec_environment(None) == {}


@pytest.mark.trio
async def test_a_bad_trace_field_is_refused(tmp_path: Path) -> None:
    from tq.core.errors import InvalidRequest

    async with running_broker(tmp_path) as broker, broker.client() as client:
        with pytest.raises(InvalidRequest, match="task trace"):
            await client.submit_many([{"type": "t", "trace": {"traceparent": 5}}])


@pytest.mark.trio
async def test_an_exec_handler_gets_the_submitters_trace_context(tmp_path: Path) -> None:
    import sys

    from tq.worker.executable import parse_exec_spec

    prog = Path(__file__).parent / "fixtures" / "prog.py"
    handlers = {"env": parse_exec_spec(f"env={sys.executable} {prog} environ")}
    tracer = trace.get_tracer("test")
    async with running_broker(tmp_path) as broker, running_worker(broker, exec_handlers=handlers):
        async with broker.client() as client:
            with tracer.start_as_current_span("request") as request:
                task_id = await client.submit("env", None)
                parent = request.get_span_context()
            task = await client.wait(task_id, timeout=15)
    assert task.state == "succeeded", task.error
    assert task.result["TRACEPARENT"].split("-")[1] == f"{parent.trace_id:032x}"
