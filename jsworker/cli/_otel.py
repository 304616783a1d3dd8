"""OpenTelemetry for ``serve``, ``dev`` and ``task submit``, switched on by the standard
``OTEL_*`` variables or ``--otel-console``.

Traces are exported when ``OTEL_TRACES_EXPORTER`` names an exporter (``otlp``,
``console``; ``none`` for none), or, when it is unset, when an OTLP endpoint is set
(``OTEL_EXPORTER_OTLP_ENDPOINT`` or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``). Metrics the
same way with ``OTEL_METRICS_EXPORTER`` and ``OTEL_EXPORTER_OTLP_METRICS_ENDPOINT``.
``OTEL_SDK_DISABLED=true`` switches all of it off. The OTLP exporters (HTTP/protobuf, or
gRPC with ``OTEL_EXPORTER_OTLP_PROTOCOL=grpc``) come from the ``jsworker[otel]`` extra
and read their own ``OTEL_EXPORTER_OTLP_*`` settings (endpoint, headers, timeout).
``OTEL_SERVICE_NAME`` and ``OTEL_RESOURCE_ATTRIBUTES`` name the process (default service
name: ``jsworker-serve``, ``jsworker-dev``, ``jsworker-cli``).

``--otel-console`` prints every finished span to stderr as one JSON object per line, for
a quick look (or a test) without a collector.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, TypeVar

import click

from .._telemetry import Telemetry
from ._output import CLIError

F = TypeVar("F", bound=Callable[..., Any])

_TRACES_ENDPOINTS = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
_METRICS_ENDPOINTS = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT")
_EXTRA = "OTLP export needs the exporter package: pip install 'jsworker[otel]'"


def otel_console_option(f: F) -> F:
    return click.option(
        "--otel-console",
        is_flag=True,
        help="Print every finished span to stderr (one JSON object per line). OTLP "
        "export follows the standard OTEL_* variables (docs/cli.md).",
    )(f)


def exporters(env: Mapping[str, str], signal: str, endpoints: tuple[str, ...]) -> set[str]:
    """The exporters ``OTEL_{SIGNAL}_EXPORTER`` asks for (default: ``otlp`` when an
    endpoint is set, else none)."""
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return set()
    raw = env.get(f"OTEL_{signal}_EXPORTER")
    if raw is None:
        return {"otlp"} if any(env.get(e) for e in endpoints) else set()
    names = {x.strip().lower() for x in raw.split(",") if x.strip()}
    names.discard("none")
    unknown = names - {"otlp", "console"}
    if unknown:
        raise CLIError(
            f"OTEL_{signal}_EXPORTER={raw!r}: unknown exporter {sorted(unknown)[0]!r} "
            "(jsworker knows otlp, console and none)"
        )
    return names


def _grpc(env: Mapping[str, str], signal: str) -> bool:
    proto = env.get(f"OTEL_EXPORTER_OTLP_{signal}_PROTOCOL") or env.get(
        "OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"
    )
    return proto.strip().lower() == "grpc"


def _otlp_span_exporter(env: Mapping[str, str]) -> Any:
    try:
        if _grpc(env, "TRACES"):
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
                OTLPSpanExporter,
            )
        else:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
                OTLPSpanExporter,
            )
    except ImportError:
        raise CLIError(_EXTRA) from None
    return OTLPSpanExporter()


def _otlp_metric_exporter(env: Mapping[str, str]) -> Any:
    try:
        if _grpc(env, "METRICS"):
            from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import (
                OTLPMetricExporter,
            )
        else:
            from opentelemetry.exporter.otlp.proto.http.metric_exporter import (
                OTLPMetricExporter,
            )
    except ImportError:
        raise CLIError(_EXTRA) from None
    return OTLPMetricExporter()


def _console_line(span: Any) -> str:
    return str(span.to_json(indent=None)) + "\n"


@contextmanager
def otel_session(
    *, console: bool, service: str, env: Mapping[str, str] | None = None
) -> Iterator[Telemetry | None]:
    """Providers from the environment (and ``--otel-console``), as a :class:`Telemetry`,
    or ``None`` when nothing asks for telemetry; flushed and shut down on exit."""
    env = os.environ if env is None else env
    traces = exporters(env, "TRACES", _TRACES_ENDPOINTS)
    if console:
        traces.add("console")
    metrics = exporters(env, "METRICS", _METRICS_ENDPOINTS)
    if not traces and not metrics:
        yield None
        return
    from opentelemetry.sdk.resources import Resource

    attrs = {} if env.get("OTEL_SERVICE_NAME") else {"service.name": service}
    resource = Resource.create(attrs)
    tracer_provider = meter_provider = None
    if traces:
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import (
            BatchSpanProcessor,
            ConsoleSpanExporter,
            SimpleSpanProcessor,
        )

        tracer_provider = TracerProvider(resource=resource)
        if "otlp" in traces:
            tracer_provider.add_span_processor(BatchSpanProcessor(_otlp_span_exporter(env)))
        if "console" in traces:
            tracer_provider.add_span_processor(
                SimpleSpanProcessor(ConsoleSpanExporter(out=sys.stderr, formatter=_console_line))
            )
    if metrics:
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import (
            ConsoleMetricExporter,
            PeriodicExportingMetricReader,
        )

        readers = []
        if "otlp" in metrics:
            readers.append(PeriodicExportingMetricReader(_otlp_metric_exporter(env)))
        if "console" in metrics:
            readers.append(PeriodicExportingMetricReader(ConsoleMetricExporter(out=sys.stderr)))
        meter_provider = MeterProvider(resource=resource, metric_readers=readers)
    try:
        yield Telemetry(tracer_provider, meter_provider)
    finally:
        # flush what is buffered: a short command (task submit) must not lose its span
        if tracer_provider is not None:
            tracer_provider.shutdown()
        if meter_provider is not None:
            meter_provider.shutdown()
