"""``jsworker top``: a full-screen live view of a jsworker system.

Rates and run times come from the ``WORKFLOW_HISTORY`` stream (``step.started``,
``step.completed``, ``step.failed`` events and their timestamps), read through one
ephemeral consumer from ``--window`` seconds ago on, never from worker self-reports, so
workers in any language are counted. Queue depths come from
:func:`jsworker.cli._queues.queue_report` (stream and consumer info), workers from KV
``workers``, partition maps from KV ``elastic-consumer-groups``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import math
import os
import secrets
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import click
import nats.errors
import nats.js.errors
import orjson
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from rich.console import Group, RenderableType
from rich.live import Live
from rich.text import Text

from .. import _names as n
from .. import _wire as w
from .._directory import list_workers
from .._errors import JSWorkerError, NotProvisionedError
from .._pcg_config import ElasticConfig, PartitionConfigError, assignment
from .._services import kv_snapshot
from ._connect import ConnOptions, pass_conn, run
from ._output import console, event_time, make_table, print_json, safe, safe_text
from ._queues import QueueRow, dead_notes, fmt_age, queue_report, workers_cell

#: seconds over which tasks/s are averaged
RATE_WINDOW = 10.0
#: at most this many step.started events wait for their outcome (oldest dropped first)
MAX_OPEN_STARTS = 200_000


def percentile(sorted_values: list[float], p: float) -> float:
    """Nearest-rank percentile of an ascending list (not empty)."""
    k = max(0, math.ceil(p / 100.0 * len(sorted_values)) - 1)
    return sorted_values[min(k, len(sorted_values) - 1)]


@dataclass
class TypeStats:
    completed: int = 0
    failed: int = 0
    done_per_s: float = 0.0
    failed_per_s: float = 0.0
    p50: float | None = None
    p99: float | None = None
    samples: int = 0


@dataclass
class HistoryStats:
    """Per-type rates and run-time percentiles from lifecycle events.

    ``window``: seconds of run times kept for p50/p99; rates are averaged over the last
    ``rate_window`` seconds (default :data:`RATE_WINDOW`). Event times are the events'
    own timestamps, so a replay of the last minutes gives the numbers watching them live
    would have given."""

    window: float = 60.0
    rate_window: float = RATE_WINDOW
    starts: dict[tuple[str, str, int], float] = field(default_factory=dict)
    # (event time, task type, "completed" | "failed")
    outcomes: collections.deque[tuple[float, str, str]] = field(default_factory=collections.deque)
    # (event time, task type, run time in seconds)
    durations: collections.deque[tuple[float, str, float]] = field(
        default_factory=collections.deque
    )
    events: int = 0
    ignored: int = 0

    def add(self, ev: Any) -> None:
        """Account one event (anything: bad events are counted in ``ignored``)."""
        if not isinstance(ev, dict):
            self.ignored += 1
            return
        et, t = ev.get("type"), event_time(ev)
        payload = ev.get("payload")
        task_type = payload.get("task_type") if isinstance(payload, dict) else None
        if t is None or not isinstance(task_type, str):
            self.ignored += 1
            return
        self.events += 1
        attempt = ev.get("attempt_number")
        key = (
            str(ev.get("run_id")),
            str(ev.get("step_id")),
            attempt if isinstance(attempt, int) else 0,
        )
        if et == w.STEP_STARTED:
            self.starts[key] = t
            if len(self.starts) > MAX_OPEN_STARTS:
                self.starts.pop(next(iter(self.starts)))
        elif et in (w.STEP_COMPLETED, w.STEP_FAILED, w.STEP_CONTINUE):
            self.outcomes.append((t, task_type, "failed" if et == w.STEP_FAILED else "completed"))
            started = self.starts.pop(key, None)
            if started is not None and et != w.STEP_FAILED:
                self.durations.append((t, task_type, max(0.0, t - started)))

    def prune(self, now: float) -> None:
        horizon = now - max(self.window, self.rate_window)
        while self.outcomes and self.outcomes[0][0] < horizon:
            self.outcomes.popleft()
        while self.durations and self.durations[0][0] < now - self.window:
            self.durations.popleft()
        for k in [k for k, t in self.starts.items() if t < now - 3600]:
            del self.starts[k]

    def snapshot(self, now: float) -> dict[str, TypeStats]:
        self.prune(now)
        out: dict[str, TypeStats] = collections.defaultdict(TypeStats)
        for t, task_type, what in self.outcomes:
            s = out[task_type]
            recent = t > now - self.rate_window
            if what == "completed":
                s.completed += 1
                s.done_per_s += recent / self.rate_window
            else:
                s.failed += 1
                s.failed_per_s += recent / self.rate_window
        per_type: dict[str, list[float]] = collections.defaultdict(list)
        for _, task_type, d in self.durations:
            per_type[task_type].append(d)
        for task_type, ds in per_type.items():
            ds.sort()
            s = out[task_type]
            s.p50, s.p99, s.samples = percentile(ds, 50), percentile(ds, 99), len(ds)
        return dict(out)


class HistoryReader:
    """Feeds :class:`HistoryStats` from ``history.>`` through an ephemeral pull consumer
    starting ``window`` seconds ago; re-created from the last sequence seen if the server
    loses it (restart, failover)."""

    def __init__(self, nc: NATS, stats: HistoryStats) -> None:
        self.nc = nc
        self.js = nc.jetstream()
        self.stats = stats
        self.name = ""
        self.last_seq = 0
        self.caught_up = asyncio.Event()
        self._sub: Any = None

    async def open(self) -> None:
        self.name = f"jsw-top-{secrets.token_hex(6)}"
        cfg = ConsumerConfig(
            name=self.name,
            filter_subject="history.>",
            ack_policy=AckPolicy.NONE,
            inactive_threshold=30.0,  # a backstop: deleted on exit
            mem_storage=True,
            num_replicas=1,
            max_waiting=4,
        )
        if self.last_seq:
            cfg.deliver_policy = DeliverPolicy.BY_START_SEQUENCE
            cfg.opt_start_seq = self.last_seq + 1
        else:
            cfg.deliver_policy = DeliverPolicy.BY_START_TIME
            cfg.opt_start_time = datetime.fromtimestamp(time.time() - self.stats.window, UTC)
        try:
            info = await self.js.add_consumer(n.HISTORY_STREAM, cfg)
        except nats.js.errors.NotFoundError:
            raise NotProvisionedError(
                f"stream {n.HISTORY_STREAM} does not exist: run `jsworker kv setup`"
            ) from None
        if not info.num_pending:
            self.caught_up.set()
        self._sub = await self.js.pull_subscribe_bind(
            durable=None, stream=n.HISTORY_STREAM, name=self.name
        )

    def _take(self, msg: Msg) -> None:
        md = msg.metadata
        self.last_seq = md.sequence.stream
        try:
            self.stats.add(orjson.loads(msg.data))
        except orjson.JSONDecodeError:
            self.stats.ignored += 1
        if md.num_pending == 0:
            self.caught_up.set()

    async def run(self) -> None:
        while True:
            try:
                if self._sub is None:
                    await self.open()
                msgs = await self._sub.fetch(1000, timeout=1.0)
            except nats.errors.TimeoutError:
                self.caught_up.set()
                continue
            except (nats.js.errors.NotFoundError, nats.errors.Error):
                # consumer lost (server restart) or connection trouble: start again
                # from the last sequence seen once the connection is back
                self._sub = None
                await asyncio.sleep(1.0)
                continue
            for msg in msgs:
                self._take(msg)

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            if self._sub is not None:
                await self._sub.unsubscribe()
        with contextlib.suppress(Exception):
            await self.js.delete_consumer(n.HISTORY_STREAM, self.name)


@dataclass
class Snapshot:
    at: float
    queues: list[QueueRow]
    stats: dict[str, TypeStats]
    workers: list[dict[str, Any]]
    partitions: dict[str, dict[int, str | None]]
    events: int = 0
    took: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        types = sorted({r.task_type for r in self.queues} | set(self.stats))
        return {
            "at": self.at,
            "types": [
                {
                    "task_type": t,
                    **{
                        k: (round(v, 4) if isinstance(v, float) else v)
                        for k, v in vars(self.stats.get(t, TypeStats())).items()
                    },
                    "queues": [r.as_dict() for r in self.queues if r.task_type == t],
                }
                for t in types
            ],
            "workers": self.workers,
            "partitions": {
                k: {str(p): m for p, m in v.items()} for k, v in self.partitions.items()
            },
        }


async def partition_maps(nc: NATS) -> dict[str, dict[int, str | None]]:
    """Elastic group key -> partition -> member (None: unassigned)."""
    out: dict[str, dict[int, str | None]] = {}
    with contextlib.suppress(nats.js.errors.NotFoundError, nats.js.errors.BucketNotFoundError):
        kv = await nc.jetstream().key_value(n.PARTITION_GROUPS_BUCKET)
        for key, raw in (await kv_snapshot(kv)).items():
            try:
                out[key] = assignment(ElasticConfig.from_json(raw))
            except PartitionConfigError:
                out[key] = {}
    return out


async def take_snapshot(nc: NATS, stats: HistoryStats) -> Snapshot:
    t0 = time.monotonic()
    workers = await list_workers(nc)
    queues, parts = await asyncio.gather(queue_report(nc, workers=workers), partition_maps(nc))
    now = time.time()
    return Snapshot(
        now,
        queues,
        stats.snapshot(now),
        sorted(workers, key=lambda e: str(e.get("worker_id"))),
        parts,
        stats.events,
        time.monotonic() - t0,
    )


# ---------------------------------------------------------------------- rendering
def _ms(s: float | None) -> str:
    if s is None:
        return "-"
    return f"{s * 1000:.1f}ms" if s < 1 else f"{s:.2f}s"


def _rate(r: float) -> str:
    return f"{r:.2f}" if r < 10 else f"{r:.1f}" if r < 1000 else f"{r:.0f}"


def _ranges(parts: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2,5'"""
    out: list[str] = []
    for p in sorted(parts):
        if out and out[-1].split("-")[-1] == str(p - 1):
            out[-1] = f"{out[-1].split('-')[0]}-{p}"
        else:
            out.append(str(p))
    return ",".join(out)


def render(snap: Snapshot, url: str, problem: str = "") -> RenderableType:
    head = Text()
    head.append("jsworker top", style="bold")
    head.append(f"  {url}  {datetime.fromtimestamp(snap.at, UTC):%H:%M:%S} UTC  ")
    head.append(f"{snap.events} events  ", style="dim")
    head.append("q quits", style="reverse")
    if problem:
        head.append(f"\n{safe(problem)} (showing the last numbers)", style="bold red")

    types = make_table("task types", pad_edge=False)
    types.add_column("type", no_wrap=True)
    types.add_column("group", no_wrap=True)
    for col in ("done/s", "fail/s", "p50", "p99", "queued", "running", "redeliv", "oldest"):
        types.add_column(col, justify="right", no_wrap=True)
    types.add_column("consumers", justify="right", no_wrap=True)
    types.add_column("workers", justify="right", no_wrap=True)
    by_type: dict[str, list[QueueRow]] = collections.defaultdict(list)
    for r in snap.queues:
        by_type[r.task_type].append(r)
    for t in sorted(set(by_type) | set(snap.stats)):
        s = snap.stats.get(t, TypeStats())
        rows = by_type.get(t) or [QueueRow(t)]
        for i, r in enumerate(rows):
            first = i == 0
            types.add_row(
                safe_text(t if first else ""),
                safe_text(r.group or "-"),
                _rate(s.done_per_s) if first else "",
                Text(_rate(s.failed_per_s), style="red" if s.failed_per_s else "") if first else "",
                _ms(s.p50) if first else "",
                _ms(s.p99) if first else "",
                str(r.queued),
                str(r.in_flight),
                str(r.redelivered),
                fmt_age(r.oldest_age),
                str(len(r.consumers))
                if r.consumers or r.partitions is not None
                else Text("none", style="red" if r.queued else "dim"),
                workers_cell(r),
            )

    workers = make_table(f"{len(snap.workers)} worker(s)")
    workers.add_column("worker", no_wrap=True)
    for col in ("lang", "host:pid", "handlers", "groups", "partitions held"):
        workers.add_column(col)
    for e in snap.workers:
        held = e.get("partitions") or {}
        workers.add_row(
            safe_text(str(e.get("worker_id", ""))),
            safe_text(str(e.get("language", ""))),
            safe_text(f"{e.get('hostname', '')}:{e.get('pid', '')}"),
            safe_text(", ".join(map(str, e.get("task_types") or []))),
            safe_text(", ".join(map(str, e.get("groups") or [])) or "all"),
            safe_text(
                "; ".join(
                    f"{k}: {_ranges([p for p in v if isinstance(p, int)])}"
                    if isinstance(v, list)
                    else f"{k}: {v}"
                    for k, v in held.items()
                )
                if isinstance(held, dict)
                else str(held)
            ),
        )

    parts = make_table("partition maps")
    parts.add_column("group", no_wrap=True)
    parts.add_column("partitions", justify="right")
    parts.add_column("member: partitions")
    for key, owners in sorted(snap.partitions.items()):
        per: dict[str | None, list[int]] = collections.defaultdict(list)
        for p, m in owners.items():
            per[m].append(p)
        line = Text()
        for m, ps in sorted(per.items(), key=lambda kv: min(kv[1])):
            if line:
                line.append("  ")
            line.append(safe(m or "unassigned"), style="" if m else "red")
            line.append(f": {_ranges(ps)}")
        parts.add_row(safe_text(key), str(len(owners)), line)
    # an empty table is a line that says so, not a header over nothing
    out: list[RenderableType] = [head]
    if types.row_count:
        out.append(types)
    else:
        out.append(Text("\nno task types yet: nothing queued, consumed or run", style="dim"))
    notes = dead_notes(snap.queues)
    out += [*notes, Text()] if notes else []
    if workers.row_count:
        out.append(workers)
    else:
        out.append(Text("no live worker in the directory (KV workers)", style="dim"))
    if parts.row_count:
        out.append(parts)
    else:
        out.append(Text("no elastic groups (no partitioned handler)", style="dim"))
    return Group(*out)


# ------------------------------------------------------------------------ running
@contextlib.contextmanager
def _keys(on_quit: Any) -> Iterator[None]:
    """Single keypresses (``q``) from a terminal, without echo; restored on exit."""
    fd = sys.stdin.fileno() if sys.stdin and sys.stdin.isatty() else None
    if fd is None:
        yield
        return
    import termios
    import tty

    saved = termios.tcgetattr(fd)
    tty.setcbreak(fd)
    loop = asyncio.get_running_loop()

    def readable() -> None:
        data = os.read(fd, 64)
        if not data or b"q" in data.lower():
            on_quit()

    loop.add_reader(fd, readable)
    try:
        yield
    finally:
        loop.remove_reader(fd)
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


async def _check(nc: NATS) -> None:
    js = nc.jetstream()
    missing = []
    for stream in (n.HISTORY_STREAM, n.TASK_STREAM):
        try:
            await js.stream_info(stream)
        except nats.js.errors.NotFoundError:
            missing.append(stream)
    if missing:
        raise NotProvisionedError(
            f"stream{'s' if len(missing) > 1 else ''} {', '.join(missing)} "
            f"do{'' if len(missing) > 1 else 'es'} not exist: run `jsworker kv setup`"
        )
    await list_workers(nc)  # raises naming `jsworker kv setup` without KV workers


async def _top(
    conn: ConnOptions,
    interval: float,
    window: float,
    rate_window: float,
    once: bool,
    as_json: bool,
) -> None:
    nc = await conn.connect(long_running=not once, name="jsworker-top")
    stats = HistoryStats(window=max(window, rate_window), rate_window=rate_window)
    reader = HistoryReader(nc, stats)
    feeding: asyncio.Task[None] | None = None
    try:
        await _check(nc)
        await reader.open()
        feeding = asyncio.create_task(reader.run())
        await asyncio.wait_for(reader.caught_up.wait(), 30.0)
        if once:
            snap = await take_snapshot(nc, stats)
            if as_json:
                print_json(snap.as_dict())
            else:
                console.print(render(snap, conn.display_url))
            return
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGINT, stop.set)
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        try:
            with (
                _keys(stop.set),
                Live(
                    Text("jsworker top: reading..."),
                    console=console,
                    screen=True,
                    auto_refresh=False,
                ) as live,
            ):
                last: Snapshot | None = None
                while not stop.is_set():
                    problem = ""
                    try:
                        last = await take_snapshot(nc, stats)
                    except (JSWorkerError, nats.errors.Error) as e:
                        # keep the screen (and the last numbers) up: the server may be
                        # restarting; say what is wrong in the header
                        problem = str(e) or type(e).__name__
                    if last is not None:
                        live.update(render(last, conn.display_url, problem), refresh=True)
                    elif problem:
                        live.update(safe_text(f"jsworker top: {problem}", "red"), refresh=True)
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), interval)
        finally:
            loop.remove_signal_handler(signal.SIGINT)
            loop.remove_signal_handler(signal.SIGTERM)
    finally:
        if feeding is not None:
            feeding.cancel()
            with contextlib.suppress(BaseException):
                await feeding
        await reader.close()
        await nc.close()


@click.command("top")
@click.option(
    "--interval", type=click.FloatRange(0.1), default=1.0, help="Seconds between refreshes."
)
@click.option(
    "--window",
    type=click.FloatRange(10.0),
    default=60.0,
    help="Seconds of history read at start and kept for p50/p99 run times.",
)
@click.option(
    "--rate-window",
    type=click.FloatRange(1.0),
    default=RATE_WINDOW,
    help="Seconds over which tasks/s are averaged.",
)
@click.option("--once", is_flag=True, help="Print one snapshot and exit (no full screen).")
@click.option("--json", "as_json", is_flag=True, help="With --once: print JSON.")
@pass_conn
def top(
    conn: ConnOptions,
    interval: float,
    window: float,
    rate_window: float,
    once: bool,
    as_json: bool,
) -> None:
    """A live full-screen view, refreshed every second: tasks/s completed and
    failed per type and p50/p99 run time (from the WORKFLOW_HISTORY stream, the
    last 10 s and --window s), queue depth, in flight, redeliveries and the oldest
    task per type and group, workers and their handlers, partition maps.
    Press q (or Ctrl-C) to quit.

    \b
    Examples:
      jsworker top
      jsworker top --interval 5 --window 300
      jsworker top --once --json | jq '.types[] | {task_type, done_per_s, p99}'
    """
    if as_json and not once:
        raise click.UsageError("--json needs --once")
    run(_top(conn, interval, window, rate_window, once, as_json))
