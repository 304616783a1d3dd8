"""OpenTelemetry: a consumer span per task continuing the submitter's trace, counters."""

from __future__ import annotations

from collections.abc import Callable

from nats.aio.client import Client as NATS
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import jsworker


async def test_task_span_continues_submitter_trace(
    nc: NATS, unique: Callable[[str], str]
) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    reader = InMemoryMetricReader()
    meters = MeterProvider(metric_readers=[reader])
    ttype = unique("otel")
    w = jsworker.Worker(nc, jsworker.Telemetry(provider, meters))

    @w.handle(ttype)
    async def traced(ctx: jsworker.TaskContext) -> object:
        return "ok"

    tracer = provider.get_tracer("test")
    async with w:
        with tracer.start_as_current_span("submitter") as parent:
            h = await jsworker.Client(nc).submit(ttype)
        assert await h.result(timeout=10) == "ok"

    spans = {s.name: s for s in exporter.get_finished_spans()}
    task_span = spans[f"task {ttype}"]
    assert task_span.context.trace_id == parent.get_span_context().trace_id
    assert task_span.parent is not None
    assert task_span.parent.span_id == parent.get_span_context().span_id
    assert task_span.attributes is not None
    assert task_span.attributes["task.run_id"] == h.run_id

    data = reader.get_metrics_data()
    assert data is not None
    points = {
        m.name: sum(p.value for p in m.data.data_points)  # type: ignore[union-attr]
        for rm in data.resource_metrics
        for sm in rm.scope_metrics
        for m in sm.metrics
        if m.name == "jsworker.tasks.completed"
    }
    assert points == {"jsworker.tasks.completed": 1}


async def test_default_telemetry_is_noop(nc: NATS, unique: Callable[[str], str]) -> None:
    ttype = unique("noop")
    w = jsworker.Worker(nc)
    assert w.telemetry.enabled is False

    @w.handle(ttype)
    async def plain(ctx: jsworker.TaskContext) -> object:
        return ctx.info.attempt

    async with w:
        h = await jsworker.Client(nc).submit(ttype)
        assert await h.result(timeout=10) == 1
