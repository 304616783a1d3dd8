"""OpenTelemetry glue. ``Telemetry(None)`` (the default) is a no-op bundle, so simple
users never import OpenTelemetry themselves; with providers given, every task gets a
consumer span continuing the submitter's ``traceparent`` and counters are recorded."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from opentelemetry.metrics import MeterProvider
from opentelemetry.trace import SpanKind, TracerProvider
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

_propagator = TraceContextTextMapPropagator()


@dataclass
class Telemetry:
    """Tracer and meter providers; ``None`` means no-op for that signal."""

    tracer_provider: TracerProvider | None = None
    meter_provider: MeterProvider | None = None

    def __post_init__(self) -> None:
        self.enabled = self.tracer_provider is not None or self.meter_provider is not None
        self._tracer = self.tracer_provider.get_tracer("jsworker") if self.tracer_provider else None
        self._counters: dict[str, Any] = {}
        if self.meter_provider is not None:
            meter = self.meter_provider.get_meter("jsworker")
            for name in ("completed", "failed", "retried", "dead_lettered", "continued"):
                self._counters[name] = meter.create_counter(
                    f"jsworker.tasks.{name}", unit="{task}", description=f"tasks {name}"
                )
            self._duration = meter.create_histogram(
                "jsworker.task.duration", unit="s", description="handler run time"
            )

    def count(self, name: str, task_type: str) -> None:
        c = self._counters.get(name)
        if c is not None:
            c.add(1, {"task.type": task_type})

    def record_duration(self, seconds: float, task_type: str) -> None:
        if self.meter_provider is not None:
            self._duration.record(seconds, {"task.type": task_type})

    @contextmanager
    def task_span(
        self, task_type: str, run_id: str, step_id: str, traceparent: str, tracestate: str
    ) -> Iterator[Any]:
        if self._tracer is None:
            yield None
            return
        carrier = {"traceparent": traceparent, "tracestate": tracestate} if traceparent else {}
        ctx = _propagator.extract(carrier)
        with self._tracer.start_as_current_span(
            f"task {task_type}",
            context=ctx,
            kind=SpanKind.CONSUMER,
            attributes={"task.type": task_type, "task.run_id": run_id, "task.step_id": step_id},
        ) as span:
            yield span


def current_traceparent() -> tuple[str, str]:
    """The active span's ``traceparent``/``tracestate`` (empty strings when none)."""
    carrier: dict[str, str] = {}
    _propagator.inject(carrier)
    return carrier.get("traceparent", ""), carrier.get("tracestate", "")
