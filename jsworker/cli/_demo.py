"""The built-in demo of ``jsworker dev --demo``: a worker with a few task types, a
producer at a fixed rate, and a live board fed by the ``history.>`` events."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import random
import time
from dataclasses import dataclass
from typing import Any

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from rich.console import Group
from rich.live import Live
from rich.text import Text

from .. import _names as n
from .. import _wire as w
from .._client import Client
from .._context import TaskContext
from .._retry import RetryPolicy
from .._telemetry import Telemetry
from .._worker import Worker
from ._output import EVENT_STYLE, compact, console, make_table
from ._serve import ShutdownSignals

DEMO_TYPES = ("resize-image", "send-email", "charge-card", "build-report")
PLAIN_EVERY = 2.0


def demo_worker(nc: NATS) -> Worker:
    """Four handlers, one per outcome the wire contract knows:

    * ``resize-image`` sleeps a little, streams progress and completes;
    * ``send-email`` asks for a retry after 300 ms on a quarter of first attempts;
    * ``charge-card`` fails permanently (dead letter) for amounts over 950;
    * ``build-report`` raises on some first attempts (a plain retriable failure).
    """
    worker = Worker(nc, concurrency=32, retry=RetryPolicy(delay=0.3, max_attempts=4))

    @worker.handle("resize-image")
    async def resize(ctx: TaskContext) -> object:
        size = int(ctx.json()["size"])
        await asyncio.sleep(random.uniform(0.02, 0.08))
        await ctx.stream({"progress": 100})
        return {"thumbnail": f"{size // 4}px"}

    @worker.handle("send-email")
    async def send_email(ctx: TaskContext) -> None:
        await asyncio.sleep(random.uniform(0.005, 0.02))
        if ctx.attempt == 1 and random.random() < 0.25:
            ctx.fail_retry_after("smtp server busy", 0.3)
            return
        ctx.complete({"sent_to": ctx.json()["to"], "attempt": ctx.attempt})

    @worker.handle("charge-card")
    async def charge(ctx: TaskContext) -> object:
        amount = int(ctx.json()["amount"])
        if amount > 950:
            ctx.fail_permanent(f"amount {amount} over the card limit")
            return None
        return {"charged": amount}

    @worker.handle("build-report")
    async def report(ctx: TaskContext) -> object:
        await asyncio.sleep(random.uniform(0.01, 0.05))
        if ctx.attempt == 1 and random.random() < 0.15:
            raise ConnectionError("database connection reset")
        return {"pages": random.randint(1, 40)}

    return worker


def demo_input(task_type: str, i: int, rng: random.Random) -> dict[str, Any]:
    if task_type == "resize-image":
        return {"size": rng.choice([256, 512, 1024])}
    if task_type == "send-email":
        return {"to": f"user{i}@example.com"}
    if task_type == "charge-card":
        return {"amount": rng.randint(1, 1000)}
    return {"month": 1 + i % 12}


@dataclass
class DemoSummary:
    tasks: int
    finished: int
    seconds: float
    completed: int
    retries: int
    dead: int

    def line(self) -> str:
        return (
            f"demo summary: {self.finished}/{self.tasks} tasks reached an outcome in "
            f"{self.seconds:.1f}s: {self.completed} completed, {self.dead} dead-lettered, "
            f"{self.retries} retries along the way"
        )


class DemoBoard:
    """Follows ``history.>`` with core NATS and counts outcomes per task type.

    Run ids are made (and registered) before their task is published, so an event can
    never arrive for a run the board does not know yet."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.type_of: dict[str, str] = {}
        self.submitted: collections.Counter[str] = collections.Counter()
        self.completed: collections.Counter[str] = collections.Counter()
        self.retried: collections.Counter[str] = collections.Counter()
        self.dead: collections.Counter[str] = collections.Counter()
        self.finished: set[str] = set()
        self.recent: collections.deque[Text] = collections.deque(maxlen=8)
        self.all_done = asyncio.Event()
        self.done_at: float | None = None  # monotonic time the last task reached an outcome

    async def on_event(self, msg: Msg) -> None:
        try:
            ev = json.loads(msg.data)
            run_id = str(ev["run_id"])
            kind = str(ev["type"])
        except (ValueError, KeyError, TypeError):
            return
        t = self.type_of.get(run_id)
        if t is None:
            return  # another run on the same server
        p = ev.get("payload") or {}
        if kind == w.STEP_COMPLETED:
            self.completed[t] += 1
            self.finished.add(run_id)
        elif kind == w.STEP_FAILED:
            if p.get("kind") in w.TERMINAL_KINDS | {"max_iterations"}:
                self.dead[t] += 1
                self.finished.add(run_id)
            else:
                self.retried[t] += 1
        elif kind == w.STEP_CANCELLED:
            self.dead[t] += 1
            self.finished.add(run_id)
        if kind != w.STEP_STARTED:
            detail = p.get("error") or compact(p.get("output"))
            line = Text(no_wrap=True, overflow="ellipsis")
            line.append(f"{kind:15}", style=EVENT_STYLE.get(kind, ""))
            line.append(f" {t:13} {run_id[:16]}  ")
            line.append(str(detail), style="dim")
            self.recent.appendleft(line)
        if len(self.finished) >= self.total and not self.all_done.is_set():
            self.done_at = time.monotonic()
            self.all_done.set()

    def render(self) -> Group:
        table = make_table("jsworker demo")
        table.add_column("task type")
        for col in ("submitted", "completed", "retried", "dead"):
            table.add_column(col, justify="right")
        for t in DEMO_TYPES:
            table.add_row(
                t,
                str(self.submitted[t]),
                Text(str(self.completed[t]), style="green"),
                Text(str(self.retried[t]), style="yellow"),
                Text(str(self.dead[t]), style="red"),
            )
        footer = Text(self.progress(), style="bold")
        return Group(table, footer, Text("recent events:", style="dim"), *self.recent)

    def progress(self) -> str:
        return f"{len(self.finished)}/{self.total} tasks reached an outcome"

    def summary(self, seconds: float) -> DemoSummary:
        return DemoSummary(
            tasks=self.total,
            finished=len(self.finished),
            seconds=seconds,
            completed=sum(self.completed.values()),
            retries=sum(self.retried.values()),
            dead=sum(self.dead.values()),
        )


async def run_demo(
    nc: NATS,
    *,
    tasks: int,
    rate: float,
    exit_after: bool,
    signals: ShutdownSignals,
    telemetry: Telemetry | None = None,
) -> DemoSummary:
    """Run the demo until every task reached an outcome (``exit_after``) or a signal.

    The summary's time is the demo's: from the first submit to the last outcome (or to
    the stop, when it stopped first), not how long the process then idled."""
    board = DemoBoard(tasks)
    sub = await nc.subscribe("history.>", cb=board.on_event)
    client = Client(nc, telemetry=telemetry, warn_no_worker=False)
    worker = demo_worker(nc)
    if telemetry is not None:
        worker.telemetry.enable(telemetry.tracer_provider, telemetry.meter_provider)
    rng = random.Random(42)

    async def produce() -> None:
        t0 = time.monotonic()
        for i in range(tasks):
            t = DEMO_TYPES[i % len(DEMO_TYPES)]
            run_id = n.new_run_id()
            board.type_of[run_id] = t
            await client.submit(t, demo_input(t, i, rng), run_id=run_id)
            board.submitted[t] += 1
            # pace by the schedule, not by sleeping 1/rate after each publish (no drift)
            await asyncio.sleep(max(0.0, t0 + (i + 1) / rate - time.monotonic()))

    await worker.start()
    console.print(intro(tasks, rate), soft_wrap=True)
    t0 = time.monotonic()
    producer = asyncio.create_task(produce(), name="jsworker-demo-producer")

    def finished() -> bool:
        return signals.stop.is_set() or (exit_after and board.all_done.is_set())

    live = Live(board.render(), console=console, refresh_per_second=4)
    with live if console.is_terminal else contextlib.nullcontext():
        try:
            last, said = time.monotonic(), ""
            while not finished():
                await _tick(signals, producer)
                if console.is_terminal:
                    live.update(board.render())
                elif time.monotonic() - last >= PLAIN_EVERY and board.progress() != said:
                    # not a terminal (a log, CI): a line when the count changed, at most
                    # one per PLAIN_EVERY, never the same line again while it idles
                    last, said = time.monotonic(), board.progress()
                    console.print(said)
        finally:
            producer.cancel()
            await asyncio.gather(producer, return_exceptions=True)
            await worker.stop()
            await sub.unsubscribe()
            if console.is_terminal:
                live.update(board.render())  # the final frame stays on screen
    if not console.is_terminal:
        console.print(board.render())
    end = board.done_at if board.done_at is not None else time.monotonic()
    return board.summary(end - t0)


def intro(tasks: int, rate: float) -> str:
    """The line printed before the first task: what the demo does, and that its
    failures are on purpose (each of the five outcomes shows up)."""
    return (
        f"demo: {tasks} tasks of {len(DEMO_TYPES)} types at {rate:g}/s. Some fail on "
        "purpose, to show each outcome: send-email asks for a retry, build-report raises "
        "on some first attempts (retried), charge-card over 950 fails permanently "
        "(a dead letter: `jsworker dead list`)"
    )


async def _tick(signals: ShutdownSignals, producer: asyncio.Task[None]) -> None:
    await signals.sleep(0.25)
    if producer.done() and not producer.cancelled():
        exc = producer.exception()  # a failed submit ends the demo with its error
        if exc is not None:
            raise exc
