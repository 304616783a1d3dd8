"""OpenTelemetry glue: producer spans on submit, consumer spans per task, metrics.

``Telemetry()`` (the default everywhere) is off: :meth:`Telemetry.task_span` returns one
shared no-op context manager and the counters look up nothing, so a worker without
telemetry allocates nothing per task for it. With a tracer provider:

* ``Client.submit`` starts a PRODUCER span ``send {type}`` and puts its context in the
  task's ``traceparent``/``tracestate``;
* the worker runs each attempt of the handler inside a CONSUMER span ``task {type}``,
  a child of that producer span (in another process: the context travels in the task
  body). Attributes: ``task.type``, ``task.group``, ``task.partition``,
  ``task.attempt``, ``task.iteration``, ``task.run_id``, ``task.step_id``,
  ``task.outcome``, ``task.error``. A retriable failure adds a ``retry`` event (next
  attempt, delay); a ``continue_`` makes the next iteration's span a child of this one,
  with a link to it.

With a meter provider: counters ``jsworker.tasks.started``, ``.completed``,
``.failed`` (attribute ``task.failure.kind``: retriable, retry_after, non_retriable,
exhausted, max_iterations, invalid_payload), ``.retried``, ``.dead_lettered``,
``.continued``, ``.redelivered`` (delivered more than once), an up-down counter
``jsworker.tasks.in_flight`` and a histogram ``jsworker.task.duration`` (seconds), all
with attribute ``task.type``.

The CLI (``serve``, ``dev``, ``task submit``) builds providers from the standard
``OTEL_*`` variables (``jsworker.cli._otel``); a library user passes their own.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.metrics import MeterProvider
from opentelemetry.trace import Link, SpanKind, Status, StatusCode, TracerProvider
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

if TYPE_CHECKING:
    from ._context import Outcome, TaskInfo
    from ._retry import RetryPolicy
    from ._wire import TaskPayload

_propagator = TraceContextTextMapPropagator()
#: what :meth:`Telemetry.task_span` returns when telemetry is off (shared, reusable)
_NOOP: contextlib.nullcontext[None] = contextlib.nullcontext()

_COUNTERS = (
    "started",
    "completed",
    "failed",
    "retried",
    "dead_lettered",
    "continued",
    "redelivered",
)
_FAILURE_KIND = {"fail": "retriable", "retry_after": "retry_after", "permanent": "non_retriable"}


@dataclass
class Telemetry:
    """Tracer and meter providers; ``None`` means off for that signal.

    One object is shared by a worker's executor and outcome recorder, so
    :meth:`enable` switches a built worker on in place (``jsworker serve`` does that
    for workers built by the user's factory)."""

    tracer_provider: TracerProvider | None = None
    meter_provider: MeterProvider | None = None

    def __post_init__(self) -> None:
        self.enable(self.tracer_provider, self.meter_provider)

    def enable(
        self,
        tracer_provider: TracerProvider | None = None,
        meter_provider: MeterProvider | None = None,
    ) -> None:
        """(Re)configure with these providers; ``enable()`` turns everything off."""
        self.tracer_provider = tracer_provider
        self.meter_provider = meter_provider
        self.tracing = tracer_provider is not None
        self.metrics = meter_provider is not None
        self.enabled = self.tracing or self.metrics
        self._tracer = tracer_provider.get_tracer("jsworker") if tracer_provider else None
        self._counters: dict[str, Any] = {}
        self._in_flight: Any = None
        self._duration: Any = None
        self._rebalances: Any = None
        self._extensions: Any = None
        if meter_provider is not None:
            meter = meter_provider.get_meter("jsworker")
            for name in _COUNTERS:
                self._counters[name] = meter.create_counter(
                    f"jsworker.tasks.{name}", unit="{task}", description=f"tasks {name}"
                )
            self._in_flight = meter.create_up_down_counter(
                "jsworker.tasks.in_flight", unit="{task}", description="tasks running now"
            )
            self._duration = meter.create_histogram(
                "jsworker.task.duration", unit="s", description="handler run time"
            )
            self._rebalances = meter.create_counter(
                "jsworker.partitions.rebalances",
                unit="{rebalance}",
                description="times this worker's partitions of an elastic group changed",
            )
            self._extensions = meter.create_counter(
                "jsworker.leases.extended",
                unit="{heartbeat}",
                description="lease extensions (in_progress) sent for tasks held long",
            )

    # ------------------------------------------------------------------ metrics
    def count(self, name: str, task_type: str, failure_kind: str | None = None) -> None:
        c = self._counters.get(name)
        if c is not None:
            attrs = {"task.type": task_type}
            if failure_kind is not None:
                attrs["task.failure.kind"] = failure_kind
            c.add(1, attrs)

    def count_rebalance(self, task_type: str, group: str | None) -> None:
        if self._rebalances is not None:
            self._rebalances.add(1, {"task.type": task_type, "task.group": group or ""})

    def count_lease_extensions(self, task_type: str, n: int) -> None:
        if self._extensions is not None and n:
            self._extensions.add(n, {"task.type": task_type})

    def record_duration(self, seconds: float, task_type: str) -> None:
        if self._duration is not None:
            self._duration.record(seconds, {"task.type": task_type})

    # ------------------------------------------------------------ worker side
    def task_span(
        self, task_type: str, info: TaskInfo, payload: TaskPayload, delivered_subject: str
    ) -> contextlib.AbstractContextManager[TaskObservation | None]:
        """The context one attempt of a handler runs in: a consumer span continuing the
        task's ``traceparent``, the started / in-flight / redelivered metrics. Off: a
        shared no-op (``None`` as the ``with`` target)."""
        if not self.enabled:
            return _NOOP
        return TaskObservation(self, task_type, info, payload, delivered_subject)

    # ------------------------------------------------------------ client side
    def start_producer(
        self, task_type: str, group: str | None
    ) -> tuple[Any, tuple[str, str]] | None:
        """Start a PRODUCER span for one submit; returns it and the ``traceparent`` /
        ``tracestate`` to put in the task, or ``None`` when tracing is off."""
        if self._tracer is None:
            return None
        attrs: dict[str, Any] = {
            "task.type": task_type,
            "messaging.system": "nats",
            "messaging.operation.type": "send",
        }
        if group:
            attrs["task.group"] = group
        span = self._tracer.start_span(
            f"send {task_type}", kind=SpanKind.PRODUCER, attributes=attrs
        )
        carrier: dict[str, str] = {}
        _propagator.inject(carrier, context=trace.set_span_in_context(span))
        return span, (carrier.get("traceparent", ""), carrier.get("tracestate", ""))

    @staticmethod
    def end_producer(
        span: Any, *, run_id: str = "", subject: str = "", error: BaseException | None = None
    ) -> None:
        if run_id:
            span.set_attribute("task.run_id", run_id)
        if subject:
            span.set_attribute("messaging.destination.name", subject)
        if error is not None:
            span.record_exception(error)
            span.set_status(Status(StatusCode.ERROR, str(error) or type(error).__name__))
        span.end()


class TaskObservation:
    """One attempt of a task as telemetry sees it (only built when telemetry is on)."""

    def __init__(
        self,
        tel: Telemetry,
        task_type: str,
        info: TaskInfo,
        payload: TaskPayload,
        delivered_subject: str,
    ) -> None:
        self.tel = tel
        self.task_type = task_type
        self.info = info
        self.payload = payload
        self.delivered_subject = delivered_subject
        self.span: Any = None
        self._token: object = None
        self._t0 = 0.0

    def __enter__(self) -> TaskObservation:
        tel, info = self.tel, self.info
        self._t0 = time.monotonic()
        tel.count("started", self.task_type)
        if info.attempt > 1:
            tel.count("redelivered", self.task_type)
        if tel._in_flight is not None:
            tel._in_flight.add(1, {"task.type": self.task_type})
        if tel._tracer is not None:
            p = self.payload
            carrier = {"traceparent": p.traceparent, "tracestate": p.tracestate}
            parent = _propagator.extract(carrier) if p.traceparent else None
            links = []
            if info.iteration > 0 and parent is not None:
                # the previous iteration (its continue_ made it this task's parent)
                prev = trace.get_current_span(parent).get_span_context()
                if prev.is_valid:
                    links.append(Link(prev, {"jsworker.link": "continue"}))
            attrs: dict[str, Any] = {
                "task.type": self.task_type,
                "task.run_id": info.run_id,
                "task.step_id": info.step_id,
                "task.attempt": info.attempt,
                "task.iteration": info.iteration,
                "messaging.system": "nats",
                "messaging.operation.type": "process",
                "messaging.destination.name": info.subject,
            }
            if info.group:
                attrs["task.group"] = info.group
            if self.delivered_subject != info.subject:
                # a partitioned stream prefixes the partition: "{n}.task.{type}..."
                head = self.delivered_subject.split(".", 1)[0]
                if head.isdigit():
                    attrs["task.partition"] = int(head)
            self.span = tel._tracer.start_span(
                f"task {self.task_type}",
                context=parent,
                kind=SpanKind.CONSUMER,
                attributes=attrs,
                links=links,
            )
            if info.attempt > 1:
                self.span.add_event("redelivered", {"task.attempt": info.attempt})
            self._token = otel_context.attach(trace.set_span_in_context(self.span))
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: Any) -> None:
        tel = self.tel
        if tel._in_flight is not None:
            tel._in_flight.add(-1, {"task.type": self.task_type})
        tel.record_duration(time.monotonic() - self._t0, self.task_type)
        if self.span is not None:
            if e is not None:
                # cancelled or handed back mid-run: no outcome was recorded by this attempt
                self.span.set_attribute("task.outcome", "interrupted")
                self.span.add_event("interrupted", {"exception.type": type(e).__name__})
            otel_context.detach(self._token)  # type: ignore[arg-type]
            self.span.end()

    def finish(self, outcome: Outcome, retry: RetryPolicy, max_iterations: int) -> TaskPayload:
        """Record the attempt's outcome; returns the payload the outcome's successor
        (a ``continue_``'s next iteration) is built from: with this span's context as
        its ``traceparent``, so the next iteration is its child (and links to it)."""
        info, kind = self.info, outcome.kind
        failure: str | None = None
        if kind in ("fail", "retry_after"):
            failure = "exhausted" if retry.exhausted(info.attempt) else _FAILURE_KIND[kind]
        elif kind == "permanent":
            failure = _FAILURE_KIND[kind]
        elif kind == "continue" and info.iteration + 1 >= max_iterations:
            failure = "max_iterations"
        if failure is not None:
            self.tel.count("failed", self.task_type, failure)
        span = self.span
        if span is None:
            return self.payload
        label = {"complete": "completed", "continue": "continued"}.get(kind, kind)
        if failure is not None:
            label = "retry" if failure in ("retriable", "retry_after") else failure
        span.set_attribute("task.outcome", label)
        if outcome.error:
            span.set_attribute("task.error", outcome.error)
        if label == "retry":
            delay = (
                outcome.delay
                if kind == "retry_after" and outcome.delay is not None
                else retry.delay_for(info.attempt)
            )
            span.add_event(
                "retry",
                {
                    "task.attempt": info.attempt,
                    "task.next_attempt": info.attempt + 1,
                    "task.retry_delay_s": float(delay),
                    "task.error": outcome.error,
                },
            )
        elif failure is not None:
            span.set_status(Status(StatusCode.ERROR, outcome.error or failure))
        if kind == "continue" and failure is None:
            carrier: dict[str, str] = {}
            _propagator.inject(carrier, context=trace.set_span_in_context(span))
            return replace(
                self.payload,
                traceparent=carrier.get("traceparent", ""),
                tracestate=carrier.get("tracestate", ""),
            )
        return self.payload


def current_traceparent() -> tuple[str, str]:
    """The active span's ``traceparent``/``tracestate`` (empty strings when none)."""
    if not trace.get_current_span().get_span_context().is_valid:
        return "", ""
    carrier: dict[str, str] = {}
    _propagator.inject(carrier)
    return carrier.get("traceparent", ""), carrier.get("tracestate", "")
