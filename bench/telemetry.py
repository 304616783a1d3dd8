"""Drain throughput of a no-op handler with OpenTelemetry off and on.

    python bench/telemetry.py [--tasks N] [--rounds R] [--concurrency C] [--json]

One embedded ``nats-server``. Per round, for each mode (alternating, the order flipped
every round): N tasks of a fresh type are pre-published, then a ``Worker`` drains them
and the clock stops when its consumer has nothing pending or unacknowledged.

* **off**: ``Worker(nc)`` (the default ``Telemetry()``).
* **on**: ``Worker(nc, telemetry=Telemetry(tracer, meters))`` with the SDK's
  ``TracerProvider`` + ``BatchSpanProcessor`` (its exporter drops the spans: export
  cost is the collector's, not the worker's) and a ``MeterProvider`` with an in-memory
  reader: a consumer span, attributes, and the metrics for every task.

The median of the rounds per mode and the ratio on / off are printed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from collections.abc import Sequence
from typing import Any

import nats
from nats.aio.client import Client as NATS
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

import jsworker


class Drop(SpanExporter):
    def __init__(self) -> None:
        self.spans = 0

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.spans += len(spans)
        return SpanExportResult.SUCCESS


async def drain(nc: NATS, mode: str, tasks: int, concurrency: int, rnd: int) -> float:
    ttype = f"bench-otel-{mode}-{rnd}-{time.monotonic_ns() % 10**9}"
    await jsworker.Client(nc).submit_many(
        [jsworker.TaskRequest(ttype, i) for i in range(tasks)], window=512
    )
    telemetry = None
    exporter = Drop()
    if mode == "on":
        tracer = TracerProvider()
        tracer.add_span_processor(BatchSpanProcessor(exporter, max_queue_size=100_000))
        meters = MeterProvider(metric_readers=[InMemoryMetricReader()])
        telemetry = jsworker.Telemetry(tracer, meters)
    w = jsworker.Worker(nc, concurrency=concurrency, telemetry=telemetry)

    @w.handle(ttype)
    async def noop(ctx: jsworker.TaskContext) -> None:
        return None

    js = nc.jetstream()
    t0 = time.perf_counter()
    async with w:
        while True:
            ci = await js.consumer_info("TASK_QUEUES", ttype)
            if ci.num_pending == 0 and ci.num_ack_pending == 0:
                break
            await asyncio.sleep(0.02)
        elapsed = time.perf_counter() - t0
    await js.delete_consumer("TASK_QUEUES", ttype)
    if telemetry is not None:
        assert telemetry.tracer_provider is not None
        telemetry.tracer_provider.shutdown()  # type: ignore[attr-defined]
        assert exporter.spans == tasks, (exporter.spans, tasks)  # every task was traced
    return tasks / elapsed


async def main(args: argparse.Namespace) -> dict[str, Any]:
    async with jsworker.EmbeddedServer() as srv:
        nc = await nats.connect(srv.url)
        await jsworker.setup_all(nc)
        rates: dict[str, list[float]] = {"off": [], "on": []}
        await drain(nc, "off", min(500, args.tasks), args.concurrency, -1)  # warm up
        for rnd in range(args.rounds):
            order = ("off", "on") if rnd % 2 == 0 else ("on", "off")
            for mode in order:
                rates[mode].append(await drain(nc, mode, args.tasks, args.concurrency, rnd))
        await nc.close()
    off, on = statistics.median(rates["off"]), statistics.median(rates["on"])
    return {
        "tasks": args.tasks,
        "rounds": args.rounds,
        "off_tasks_per_s": round(off),
        "on_tasks_per_s": round(on),
        "ratio_on_off": round(on / off, 3),
        "runs": {k: [round(x) for x in v] for k, v in rates.items()},
    }


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", type=int, default=5000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    result = asyncio.run(main(a))
    if a.json:
        print(json.dumps(result, indent=2))
    else:
        print(
            f"off {result['off_tasks_per_s']:,} tasks/s, on {result['on_tasks_per_s']:,} "
            f"tasks/s: on/off = {result['ratio_on_off']:.2f}  (medians of {a.rounds} rounds "
            f"of {a.tasks} tasks; runs {result['runs']})"
        )
