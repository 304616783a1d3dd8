"""OpenTelemetry against a real server, with in-memory exporters: the producer span of a
submit and the worker's consumer spans (one per attempt) in one trace, their attributes,
retry events, continue links, the metrics, and nothing allocated when it is off."""

from __future__ import annotations

import asyncio
import gc
import itertools
import tracemalloc
from collections.abc import Callable
from typing import Any

from nats.aio.client import Client as NATS
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

import jsworker
from jsworker._context import TaskInfo
from jsworker._telemetry import _NOOP
from jsworker._wire import TaskPayload


def tracing() -> tuple[TracerProvider, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider, exporter


def metric_points(reader: InMemoryMetricReader) -> dict[str, list[tuple[dict[str, Any], Any]]]:
    data = reader.get_metrics_data()
    out: dict[str, list[tuple[dict[str, Any], Any]]] = {}
    assert data is not None
    for rm in data.resource_metrics:
        for sm in rm.scope_metrics:
            for m in sm.metrics:
                for p in m.data.data_points:  # type: ignore[union-attr]
                    value = getattr(p, "value", None)
                    if value is None:
                        value = p.count  # type: ignore[union-attr]
                    out.setdefault(m.name, []).append((dict(p.attributes or {}), value))
    return out


def consumer_spans(exporter: InMemorySpanExporter, task_type: str) -> list[ReadableSpan]:
    spans = [s for s in exporter.get_finished_spans() if s.name == f"task {task_type}"]
    return sorted(spans, key=lambda s: s.start_time or 0)


async def test_one_trace_from_submit_to_completion(nc: NATS, unique: Callable[[str], str]) -> None:
    # two providers, as in two processes: the context travels only in the task body
    client_tp, client_spans = tracing()
    worker_tp, worker_spans = tracing()
    ttype = unique("otel")
    w = jsworker.Worker(nc, groups=["gpu"], telemetry=jsworker.Telemetry(worker_tp))

    @w.handle(ttype)
    async def h(ctx: jsworker.TaskContext) -> object:
        return "ok"

    client = jsworker.Client(nc, telemetry=jsworker.Telemetry(client_tp))
    async with w:
        handle = await client.submit(ttype, {"x": 1}, group="gpu")
        assert await handle.result(timeout=10) == "ok"

    [producer] = client_spans.get_finished_spans()
    assert producer.name == f"send {ttype}" and producer.kind == SpanKind.PRODUCER
    assert producer.attributes is not None
    assert producer.attributes["task.run_id"] == handle.run_id
    assert producer.attributes["messaging.destination.name"] == handle.subject
    [consumer] = consumer_spans(worker_spans, ttype)
    assert consumer.kind == SpanKind.CONSUMER
    assert consumer.context.trace_id == producer.context.trace_id
    assert consumer.parent is not None and consumer.parent.span_id == producer.context.span_id
    attrs = dict(consumer.attributes or {})
    assert attrs["task.type"] == ttype and attrs["task.group"] == "gpu"
    assert attrs["task.attempt"] == 1 and attrs["task.outcome"] == "completed"
    assert attrs["task.run_id"] == handle.run_id and "task.partition" not in attrs


async def test_retries_are_events_failures_have_status(
    nc: NATS, unique: Callable[[str], str]
) -> None:
    tp, exporter = tracing()
    flaky, broken = unique("flaky"), unique("broken")
    w = jsworker.Worker(
        nc,
        telemetry=jsworker.Telemetry(tp),
        retry=jsworker.RetryPolicy(delay=0.1, max_attempts=3),
    )

    @w.handle(flaky)
    async def h(ctx: jsworker.TaskContext) -> object:
        if ctx.attempt == 1:
            raise RuntimeError("not yet")
        return ctx.attempt

    @w.handle(broken)
    async def b(ctx: jsworker.TaskContext) -> None:
        ctx.fail_permanent("bad input")

    client = jsworker.Client(nc, telemetry=jsworker.Telemetry(tp))
    async with w:
        assert await (await client.submit(flaky)).result(timeout=15) == 2
        try:
            await (await client.submit(broken)).result(timeout=15)
        except jsworker.TaskFailed:
            pass
    first, second = consumer_spans(exporter, flaky)
    assert first.context.trace_id == second.context.trace_id
    assert first.parent is not None and second.parent is not None
    assert first.parent.span_id == second.parent.span_id  # both children of the submit
    assert (first.attributes or {})["task.outcome"] == "retry"
    assert (first.attributes or {})["task.error"] == "RuntimeError: not yet"
    [retry] = [e for e in first.events if e.name == "retry"]
    assert dict(retry.attributes or {})["task.next_attempt"] == 2
    assert dict(retry.attributes or {})["task.retry_delay_s"] > 0
    assert (second.attributes or {})["task.attempt"] == 2
    assert (second.attributes or {})["task.outcome"] == "completed"
    assert [e.name for e in second.events] == ["redelivered"]
    [dead] = consumer_spans(exporter, broken)
    assert (dead.attributes or {})["task.outcome"] == "non_retriable"
    assert dead.status.status_code == StatusCode.ERROR and dead.status.description == "bad input"


async def test_continue_iterations_are_linked(nc: NATS, unique: Callable[[str], str]) -> None:
    tp, exporter = tracing()
    ttype = unique("loop")
    w = jsworker.Worker(nc, telemetry=jsworker.Telemetry(tp))

    @w.handle(ttype)
    async def h(ctx: jsworker.TaskContext) -> object:
        n = ctx.json()
        if n < 2:
            ctx.continue_(n + 1)
            return None
        return n

    async with w:
        handle = await jsworker.Client(nc, telemetry=jsworker.Telemetry(tp)).submit(ttype, 0)
        async for ev in handle.events(timeout=15):
            if ev["type"] == "step.completed":
                break
    spans = consumer_spans(exporter, ttype)
    assert [(s.attributes or {})["task.iteration"] for s in spans] == [0, 1, 2]
    assert len({s.context.trace_id for s in spans}) == 1
    for prev, nxt in itertools.pairwise(spans):
        assert nxt.parent is not None and nxt.parent.span_id == prev.context.span_id
        assert [link.context.span_id for link in nxt.links] == [prev.context.span_id]
    assert [(s.attributes or {})["task.outcome"] for s in spans] == [
        "continued",
        "continued",
        "completed",
    ]


async def test_partition_attribute(nc: NATS, unique: Callable[[str], str]) -> None:
    tp, exporter = tracing()
    ttype = unique("part")
    w = jsworker.Worker(nc, partitions=3, telemetry=jsworker.Telemetry(tp))

    @w.handle(ttype)
    async def h(ctx: jsworker.TaskContext) -> object:
        return None

    async with w:
        client = jsworker.Client(nc)
        for k in ("a", "b", "c", "d"):
            await (await client.submit(ttype, key=k)).result(timeout=15)
    parts = [(s.attributes or {}).get("task.partition") for s in consumer_spans(exporter, ttype)]
    assert len(parts) == 4 and all(isinstance(p, int) and 0 <= p < 3 for p in parts)


async def test_metrics(nc: NATS, unique: Callable[[str], str]) -> None:
    reader = InMemoryMetricReader()
    meters = MeterProvider(metric_readers=[reader])
    ttype = unique("m")
    w = jsworker.Worker(
        nc,
        telemetry=jsworker.Telemetry(meter_provider=meters),
        retry=jsworker.RetryPolicy(delay=0.1, max_attempts=2),
    )

    @w.handle(ttype)
    async def h(ctx: jsworker.TaskContext) -> object:
        kind = ctx.json()
        if kind == "flaky" and ctx.attempt == 1:
            raise RuntimeError("once")
        if kind == "never":
            raise RuntimeError("always")
        if kind == "permanent":
            ctx.fail_permanent("no")
        return None

    async with w:
        c = jsworker.Client(nc)
        for kind in ("ok", "ok", "flaky", "never", "permanent"):
            try:
                await (await c.submit(ttype, kind)).result(timeout=15)
            except jsworker.TaskFailed:
                pass
    pts = metric_points(reader)

    def total(name: str, **attrs: Any) -> Any:
        return sum(
            v
            for a, v in pts.get(name, [])
            if a.get("task.type") == ttype and all(a.get(k) == x for k, x in attrs.items())
        )

    assert total("jsworker.tasks.started") == 7  # ok, ok, flaky x2, never x2, permanent
    assert total("jsworker.tasks.completed") == 3
    assert total("jsworker.tasks.redelivered") == 2
    assert total("jsworker.tasks.failed", **{"task.failure.kind": "retriable"}) == 2
    assert total("jsworker.tasks.failed", **{"task.failure.kind": "exhausted"}) == 1
    assert total("jsworker.tasks.failed", **{"task.failure.kind": "non_retriable"}) == 1
    assert total("jsworker.tasks.dead_lettered") == 2
    assert total("jsworker.tasks.in_flight") == 0  # all done: back to zero
    assert total("jsworker.task.duration") == 7  # one sample per attempt


def test_off_allocates_nothing_per_task() -> None:
    """The calls the executor and the outcome recorder make for every task, with
    telemetry off, allocate no memory at all (tracemalloc's peak does not move)."""
    off = jsworker.Telemetry()
    assert off.enabled is False
    info = TaskInfo("t", "id", "run", "step", 1, 0, {}, None, "task.t.run", 1)
    payload = TaskPayload("id", "run", "step")
    assert off.task_span("t", info, payload, "task.t.run") is off.task_span(
        "t", info, payload, "task.t.run"
    )

    def per_task() -> None:
        with off.task_span("t", info, payload, "task.t.run") as obs:
            assert obs is None
        off.count("completed", "t")
        off.record_duration(0.5, "t")

    def bare() -> None:  # the same shape without telemetry: the `with` statement's own cost
        with _NOOP as obs:
            assert obs is None

    def peak(fn: Callable[[], None]) -> int:
        fn()
        gc.collect()
        tracemalloc.start()
        try:
            base = tracemalloc.get_traced_memory()[0]
            for _ in itertools.repeat(None, 10_000):
                fn()
            return tracemalloc.get_traced_memory()[1] - base
        finally:
            tracemalloc.stop()

    assert peak(per_task) <= peak(bare)


async def test_rebalance_and_lease_extension_metrics(
    nc: NATS, unique: Callable[[str], str]
) -> None:
    reader = InMemoryMetricReader()
    meters = MeterProvider(metric_readers=[reader])
    ttype = unique("m")
    w = jsworker.Worker(nc, telemetry=jsworker.Telemetry(meter_provider=meters))

    @w.handle(ttype, partitions=2, ack_wait=0.6)
    async def slow(ctx: jsworker.TaskContext) -> None:
        await asyncio.sleep(0.9)  # past a third of ack_wait, twice

    async with w:
        await (await jsworker.Client(nc).submit(ttype, None)).result(timeout=15)
    pts = metric_points(reader)
    rebalances = [v for a, v in pts["jsworker.partitions.rebalances"] if a["task.type"] == ttype]
    assert sum(rebalances) >= 1  # joining the group gave it its partitions
    extended = [v for a, v in pts["jsworker.leases.extended"] if a["task.type"] == ttype]
    assert sum(extended) >= 1
