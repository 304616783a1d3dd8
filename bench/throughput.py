"""No-op task drain throughput: a jsworker ``Worker`` vs raw nats-py doing the same wire work.

    python bench/throughput.py [--tasks N] [--batch B] [--concurrency C] [--rounds R] [--json]

One embedded ``nats-server`` (``jsworker.EmbeddedServer``), provisioned with
``jsworker.setup_all``. For each round and each contender (alternating, the order
flipped every round), N tasks of a fresh task type are pre-published with
``jsworker.Client.submit_many``; then the clock starts and the contender drains them:

* **jsworker**: ``Worker(nc, concurrency=C, batch=B)`` with an ``async`` no-op handler
  (the clock includes ``Worker.start()``: consumer creation, directory entry, ...).
* **raw**: nats-py only. A durable pull consumer on ``TASK_QUEUES`` filtered to
  ``task.{type}.>``, ``fetch(B)`` in a loop; for every message of a batch (concurrently,
  ``asyncio.gather``) decode the task, JetStream-publish a ``step.completed`` event to
  ``history.{run_id}`` (with ``Nats-Msg-Id``) awaiting the PubAck, then ack.

The clock stops when the contender's consumer reports ``num_pending == 0`` and
``num_ack_pending == 0`` (both ack only after the completion event's PubAck, so every
completion event is stored by then). The median of the rounds is reported per
contender, and the ratio jsworker / raw.

``--profile FILE`` profiles one extra jsworker drain with pyinstrument (not a project
dependency: ``pip install pyinstrument``) and writes its text report to FILE.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import secrets
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

import jsworker

TASK_STREAM = "TASK_QUEUES"
HISTORY_STREAM = "WORKFLOW_HISTORY"
POLL_EVERY = 0.02


@dataclass
class RunResult:
    contender: str
    round: int
    tasks: int
    seconds: float
    tasks_per_s: float
    history_events: int
    start_seconds: float = 0.0
    #: CPU seconds of this process (contender, and the 20 ms polls) over the drain
    cpu_seconds: float = 0.0


@dataclass
class Report:
    tasks: int
    batch: int
    concurrency: int
    rounds: int
    machine: dict[str, Any]
    runs: list[RunResult] = field(default_factory=list)

    def median(self, contender: str) -> float:
        return statistics.median(r.tasks_per_s for r in self.runs if r.contender == contender)

    def as_dict(self) -> dict[str, Any]:
        names = [n for n in CONTENDERS if any(r.contender == n for r in self.runs)]
        medians = {n: round(self.median(n), 1) for n in names}
        return {
            "tasks": self.tasks,
            "batch": self.batch,
            "concurrency": self.concurrency,
            "rounds": self.rounds,
            "machine": self.machine,
            "runs": [asdict(r) for r in self.runs],
            "median_tasks_per_s": medians,
            "ratios": {
                f"jsworker/{n}": round(medians["jsworker"] / medians[n], 3)
                for n in names
                if n != "jsworker" and medians[n]
            },
            "spread": {
                n: [
                    min(r.tasks_per_s for r in self.runs if r.contender == n),
                    max(r.tasks_per_s for r in self.runs if r.contender == n),
                ]
                for n in names
            },
        }


# --------------------------------------------------------------------------- helpers
async def publish_tasks(nc: NATS, task_type: str, n: int) -> int:
    """Publish ``n`` tasks; returns the stream sequence of the last one."""
    client = jsworker.Client(nc)
    handles = await client.submit_many(
        (jsworker.TaskRequest(task_type, {"i": i}) for i in range(n)), window=512
    )
    return max(h.sequence for h in handles)


async def history_count(nc: NATS) -> int:
    info = await nc.jetstream().stream_info(HISTORY_STREAM)
    return int(info.state.messages)


async def wait_drained(nc: NATS, consumer: str, last_seq: int, timeout: float) -> float:
    """Poll until the consumer's ack floor is the last task's sequence with nothing
    pending or unacknowledged; returns the ``perf_counter`` time it was observed."""
    js = nc.jetstream()
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(nats.errors.TimeoutError, nats.js.errors.NotFoundError):
            ci = await js.consumer_info(TASK_STREAM, consumer)
            if (
                ci.ack_floor is not None
                and (ci.ack_floor.stream_seq or 0) >= last_seq
                and ci.num_pending == 0
                and ci.num_ack_pending == 0
            ):
                return time.perf_counter()
        if time.monotonic() > deadline:
            raise TimeoutError(f"consumer {consumer} not drained within {timeout:g}s")
        await asyncio.sleep(POLL_EVERY)


async def delete_consumer(nc: NATS, name: str) -> None:
    with contextlib.suppress(Exception):
        await nc.jetstream().delete_consumer(TASK_STREAM, name)


def completion_event(task: dict[str, Any], task_type: str, worker_id: str, attempt: int) -> bytes:
    """The ``step.completed`` event the raw contenders write (the fields jsworker writes)."""
    event = {
        "type": "step.completed",
        "run_id": task["run_id"],
        "step_id": task["step_id"],
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "payload": {
            "task_type": task_type,
            "task_id": task["task_id"],
            "iteration": task["iteration"],
            "output": None,
        },
        "worker_id": worker_id,
        "attempt_number": attempt,
        "trace_parent": task.get("traceparent", ""),
        "trace_state": task.get("tracestate", ""),
    }
    return json.dumps(event, separators=(",", ":")).encode()


# ------------------------------------------------------------------------ contenders
# Each returns (first handler call, start-up seconds) as perf_counter values; the caller
# measures the drain from the first handler call to the ack floor reaching the last task.
async def run_jsworker(
    url: str, admin: NATS, task_type: str, last_seq: int, args: argparse.Namespace
) -> tuple[float, float, float]:
    """Drain ``task_type`` with a jsworker Worker."""
    nc = await nats.connect(url)
    first: list[float] = []
    try:
        worker = jsworker.Worker(nc, concurrency=args.concurrency, batch=args.batch)

        @worker.handle(task_type)
        async def noop(ctx: jsworker.TaskContext) -> None:
            if not first:
                first.append(time.perf_counter())

        t0 = time.perf_counter()
        await worker.start()
        t_started = time.perf_counter() - t0
        try:
            t_end = await wait_drained(admin, task_type, last_seq, args.timeout)
        finally:
            await worker.stop()
        if worker.stats.completed != args.tasks:
            raise RuntimeError(f"jsworker completed {worker.stats.completed} of {args.tasks}")
        return first[0], t_end, t_started
    finally:
        await nc.close()
        await delete_consumer(admin, task_type)


async def _raw_consumer(js: Any, task_type: str) -> Any:
    return await js.pull_subscribe(
        f"task.{task_type}.>",
        durable=task_type,
        stream=TASK_STREAM,
        config=ConsumerConfig(
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=30,
            deliver_policy=DeliverPolicy.ALL,
            max_ack_pending=-1,
            max_deliver=-1,
        ),
    )


async def run_raw(
    url: str, admin: NATS, task_type: str, last_seq: int, args: argparse.Namespace
) -> tuple[float, float, float]:
    """The strongest hand-written loop: fetch B; per message publish the completion event
    with ``publish_async`` (PubAcks on one shared inbox); gather the batch's PubAcks; then
    ack each message."""
    nc = await nats.connect(url)
    js = nc.jetstream()
    worker_id = f"raw-{secrets.token_hex(8)}"
    done = 0
    first = 0.0
    try:
        t0 = time.perf_counter()
        sub = await _raw_consumer(js, task_type)
        t_started = time.perf_counter() - t0
        while done < args.tasks:
            try:
                msgs = await sub.fetch(args.batch, timeout=1.0)
            except TimeoutError:  # nats-py raises its own or asyncio's (the builtin)
                continue
            if not first:
                first = time.perf_counter()
            acks = []
            for m in msgs:
                task = json.loads(m.data)
                run_id, step_id = task["run_id"], task["step_id"]
                acks.append(
                    await js.publish_async(
                        f"history.{run_id}",
                        completion_event(task, task_type, worker_id, m.metadata.num_delivered),
                        headers={"Nats-Msg-Id": f"{run_id}.{step_id}.step.completed"},
                    )
                )
            await asyncio.gather(*acks)
            for m in msgs:
                await m.ack()
            done += len(msgs)
        t_end = await wait_drained(admin, task_type, last_seq, args.timeout)
        await sub.unsubscribe()
        return first, t_end, t_started
    finally:
        await nc.close()
        await delete_consumer(admin, task_type)


async def run_raw_naive(
    url: str, admin: NATS, task_type: str, last_seq: int, args: argparse.Namespace
) -> tuple[float, float, float]:
    """The previous raw loop: fetch B; per message, concurrently (``gather``), publish
    the completion event with ``js.publish`` (one request round trip each), then ack."""
    nc = await nats.connect(url)
    js = nc.jetstream()
    worker_id = f"raw-{secrets.token_hex(8)}"
    done = 0
    first = 0.0
    try:
        t0 = time.perf_counter()
        sub = await _raw_consumer(js, task_type)
        t_started = time.perf_counter() - t0

        async def one(msg: Msg) -> None:
            task = json.loads(msg.data)
            run_id, step_id = task["run_id"], task["step_id"]
            await js.publish(
                f"history.{run_id}",
                completion_event(task, task_type, worker_id, msg.metadata.num_delivered),
                headers={"Nats-Msg-Id": f"{run_id}.{step_id}.step.completed"},
            )
            await msg.ack()

        while done < args.tasks:
            try:
                msgs = await sub.fetch(args.batch, timeout=1.0)
            except TimeoutError:  # nats-py raises its own or asyncio's (the builtin)
                continue
            if not first:
                first = time.perf_counter()
            await asyncio.gather(*(one(m) for m in msgs))
            done += len(msgs)
        t_end = await wait_drained(admin, task_type, last_seq, args.timeout)
        await sub.unsubscribe()
        return first, t_end, t_started
    finally:
        await nc.close()
        await delete_consumer(admin, task_type)


Contender = Callable[
    [str, NATS, str, int, argparse.Namespace], Awaitable[tuple[float, float, float]]
]
CONTENDERS: dict[str, Contender] = {
    "jsworker": run_jsworker,
    "raw": run_raw,
    "raw-naive": run_raw_naive,
}


async def one_run(
    url: str, admin: NATS, name: str, rnd: int, args: argparse.Namespace
) -> RunResult:
    task_type = f"bench-{name}-{rnd}-{secrets.token_hex(3)}"
    last_seq = await publish_tasks(admin, task_type, args.tasks)
    before = await history_count(admin)
    cpu0 = time.process_time()
    first, end, started = await CONTENDERS[name](url, admin, task_type, last_seq, args)
    cpu = time.process_time() - cpu0
    elapsed = end - first
    await asyncio.sleep(0.2)  # let fire-and-forget events (step.started) land
    events = await history_count(admin) - before
    return RunResult(
        name,
        rnd,
        args.tasks,
        round(elapsed, 4),
        round(args.tasks / elapsed, 1),
        events,
        round(started, 4),
        round(cpu, 3),
    )


async def profile_jsworker(url: str, admin: NATS, args: argparse.Namespace) -> None:
    try:
        from pyinstrument import Profiler
    except ImportError:
        sys.exit("--profile needs pyinstrument: pip install pyinstrument")
    task_type = f"bench-prof-{secrets.token_hex(3)}"
    last_seq = await publish_tasks(admin, task_type, args.tasks)
    profiler = Profiler(async_mode="disabled", interval=0.0005)
    profiler.start()
    await run_jsworker(url, admin, task_type, last_seq, args)
    profiler.stop()
    text = profiler.output_text(unicode=False, color=False, show_all=False)
    await asyncio.to_thread(Path(args.profile).write_text, text)
    html = profiler.output_html()
    await asyncio.to_thread(Path(args.profile + ".html").write_text, html)
    print(f"profile written to {args.profile}", file=sys.stderr)


def machine(loop: str) -> dict[str, Any]:
    try:
        version = subprocess.run(
            [jsworker.find_nats_server(), "--version"], capture_output=True, text=True, check=False
        ).stdout.strip()
    except Exception as e:  # pragma: no cover - reported, not fatal
        version = f"unknown ({e})"
    return {
        "nproc": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "nats_server": version,
        "nats_py": _dist_version("nats-py"),
        "jsworker": jsworker.__version__,
        "loop": loop,
        "uvloop": _dist_version("uvloop") if loop == "uvloop" else None,
    }


def _dist_version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "unknown"


async def main(args: argparse.Namespace) -> Report:
    report = Report(args.tasks, args.batch, args.concurrency, args.rounds, machine(args.loop))
    names = args.contenders
    async with jsworker.EmbeddedServer() as srv:
        admin = await nats.connect(srv.url)
        try:
            await jsworker.setup_all(admin)
            # warm-up: a small drain each, not reported (imports, caches, server)
            warm = argparse.Namespace(**{**vars(args), "tasks": min(500, args.tasks)})
            for name in names:
                await one_run(srv.url, admin, name, -1, warm)
            for rnd in range(args.rounds):
                # rotate the order every round so no contender always goes first
                order = names[rnd % len(names) :] + names[: rnd % len(names)]
                if rnd % 2:
                    order.reverse()
                for name in order:
                    r = await one_run(srv.url, admin, name, rnd, args)
                    report.runs.append(r)
                    if not args.json:
                        print(
                            f"round {rnd + 1}/{args.rounds} {name:9s} {r.tasks_per_s:>9.0f} "
                            f"tasks/s  ({r.seconds:.2f} s, cpu {r.cpu_seconds:.2f} s, "
                            f"{r.history_events} history events)",
                            file=sys.stderr,
                        )
            if args.profile:
                await profile_jsworker(srv.url, admin, args)
        finally:
            await admin.close()
    return report


def print_table(report: Report) -> None:
    d = report.as_dict()
    m = d["machine"]
    title = (
        f"no-op drain of {report.tasks} tasks, batch {report.batch}, "
        f"concurrency {report.concurrency}, {report.rounds} rounds"
    )
    rows = []
    for name in d["median_tasks_per_s"]:
        runs = [r for r in report.runs if r.contender == name]
        rows.append(
            (
                name,
                " / ".join(f"{r.tasks_per_s:.0f}" for r in runs),
                f"{report.median(name):.0f}",
                f"{statistics.median(r.seconds for r in runs):.2f}",
            )
        )
    ratios = ", ".join(f"{k} = {v}" for k, v in d["ratios"].items())
    footer = (
        f"{ratios}   |   {m['nproc']} CPUs, Python {m['python']}, loop {m['loop']}, "
        f"{m['nats_server']}, nats-py {m['nats_py']}"
    )
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # pragma: no cover - rich is a jsworker dependency
        print(title)
        print(f"{'contender':10s} {'runs (tasks/s)':30s} {'median tasks/s':>15s} {'median s':>9s}")
        for r in rows:
            print(f"{r[0]:10s} {r[1]:30s} {r[2]:>15s} {r[3]:>9s}")
        print(footer)
        return
    table = Table(title=title, caption=footer)
    table.add_column("contender")
    table.add_column("runs (tasks/s)")
    table.add_column("median tasks/s", justify="right")
    table.add_column("median s", justify="right")
    for r in rows:
        table.add_row(*r)
    Console().print(table)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", type=int, default=20_000, help="tasks per run (default 20000)")
    p.add_argument("--batch", type=int, default=256, help="messages per pull/fetch (default 256)")
    p.add_argument(
        "--concurrency",
        type=int,
        default=256,
        help="jsworker Worker(concurrency=...) (default 256, = the raw in-flight bound)",
    )
    p.add_argument("--rounds", type=int, default=3, help="runs per contender (default 3)")
    p.add_argument("--timeout", type=float, default=300.0, help="max seconds per drain")
    p.add_argument("--json", action="store_true", help="print one JSON document to stdout")
    p.add_argument(
        "--profile",
        metavar="FILE",
        help="pyinstrument one extra jsworker drain: text report to FILE, flame graph "
        "(pyinstrument's HTML) to FILE.html",
    )
    p.add_argument(
        "--loop",
        choices=("asyncio", "uvloop"),
        default="asyncio",
        help="event loop of the whole process, every contender (default asyncio)",
    )
    p.add_argument(
        "--contenders",
        default=",".join(CONTENDERS),
        help=f"comma-separated, from {', '.join(CONTENDERS)} (default: all)",
    )
    args = p.parse_args(argv)
    args.contenders = [c.strip() for c in args.contenders.split(",") if c.strip()]
    unknown = [c for c in args.contenders if c not in CONTENDERS]
    if unknown or "jsworker" not in args.contenders:
        p.error(f"--contenders: jsworker plus any of {', '.join(CONTENDERS)}")
    for name in ("tasks", "batch", "concurrency", "rounds"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1")
    return args


def cli(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.loop == "uvloop":
        import uvloop

        report = uvloop.run(main(args))
    else:
        report = asyncio.run(main(args))
    if args.json:
        print(json.dumps(report.as_dict(), indent=2))
    else:
        print_table(report)


if __name__ == "__main__":
    cli()
