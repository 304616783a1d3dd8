"""``jsworker top``: the numbers (pure logic), and the real full-screen program in a
pseudo-terminal (pexpect), its screen read back through a terminal emulator (pyte)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import pexpect
import pyte
from nats.aio.client import Client as NATS
from pytest import approx

import jsworker
from jsworker import EmbeddedServer
from jsworker.cli._top import HistoryStats, percentile

COLS, ROWS = 180, 60


def ev(
    etype: str, t: float, task_type: str = "a", run: str = "r1", attempt: int = 1
) -> dict[str, Any]:
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1e6):06d}Z"
    return {
        "type": etype,
        "run_id": run,
        "step_id": "main",
        "timestamp": stamp,
        "attempt_number": attempt,
        "payload": {"task_type": task_type},
    }


def test_percentile_nearest_rank() -> None:
    xs = [float(i) for i in range(1, 101)]
    assert percentile(xs, 50) == 50.0 and percentile(xs, 99) == 99.0
    assert percentile([3.0], 99) == 3.0 and percentile([1.0, 2.0], 50) == 1.0


def test_history_stats_rates_and_run_times() -> None:
    now = 1_800_000_000.0
    s = HistoryStats(window=60.0, rate_window=10.0)
    for i in range(20):  # 20 runs of type a, run time 0.01 * (i + 1), ending 0..19 s ago
        end = now - i
        s.add(ev("step.started", end - 0.01 * (i + 1), run=f"a{i}"))
        s.add(ev("step.completed", end, run=f"a{i}"))
    s.add(ev("step.started", now - 5, "b", "b1", 1))
    s.add(ev("step.failed", now - 4.5, "b", "b1", 1))  # a retry: failed, no run time
    s.add(ev("step.started", now - 4, "b", "b1", 2))
    s.add(ev("step.completed", now - 1, "b", "b1", 2))
    for bad in ("x", {"type": "step.completed"}, ev("step.completed", now) | {"timestamp": "?"}):
        s.add(bad)
    snap = s.snapshot(now)
    a, b = snap["a"], snap["b"]
    assert a.completed == 20 and a.failed == 0
    assert abs(a.done_per_s - 1.0) < 1e-9  # 10 completions in the last 10 s (0..9 s ago)
    assert a.samples == 20
    assert (a.p50, a.p99) == (approx(0.10, abs=1e-5), approx(0.20, abs=1e-5))
    assert (b.completed, b.failed) == (1, 1)
    assert b.failed_per_s == approx(0.1) and b.p50 == approx(3.0, abs=1e-5)
    assert s.ignored == 3
    later = s.snapshot(now + 100)  # everything slid out of both windows
    assert later == {}


class Screen:
    """A pseudo-terminal running ``jsworker top``, its screen emulated by pyte."""

    def __init__(self, env: dict[str, str], *args: str) -> None:
        self.screen = pyte.Screen(COLS, ROWS)
        self.stream = pyte.ByteStream(self.screen)
        self.child = pexpect.spawn(
            sys.executable,
            ["-m", "jsworker.cli", "top", *args],
            env={**env, "TERM": "xterm-256color", "COLUMNS": str(COLS), "LINES": str(ROWS)},
            dimensions=(ROWS, COLS),
            timeout=5,
        )

    def pump(self) -> None:
        try:
            while True:
                self.stream.feed(self.child.read_nonblocking(65536, timeout=0.1))
        except (pexpect.TIMEOUT, pexpect.EOF):
            return

    def text(self) -> str:
        return "\n".join(line.rstrip() for line in self.screen.display)

    def row(self, *words: str) -> str | None:
        for line in self.screen.display:
            if all(w in line for w in words):
                return line
        return None

    async def wait(self, pred: Callable[[], Any], what: str, timeout: float = 30.0) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            await asyncio.to_thread(self.pump)
            got = pred()
            if got:
                return got
            if time.monotonic() > deadline or (not self.child.isalive() and not got):
                raise AssertionError(f"screen never showed {what}:\n{self.text()}")


def cells(line: str) -> list[str]:
    """A table row's cells: rich pads every cell with a space each side."""
    return re.split(r"\s{2,}", line.strip())


async def test_top_full_screen_in_a_pty(
    fresh_server: EmbeddedServer, unique: Callable[[str], str]
) -> None:
    # a server of its own: on the shared one, other tests' types would push these rows
    # off the bottom of the screen
    import nats

    nc = await nats.connect(fresh_server.url)
    try:
        await jsworker.setup_all(nc)
        await _full_screen(nc, {**os.environ, "NATS_URL": fresh_server.url}, unique)
    finally:
        await nc.close()


async def _full_screen(nc: NATS, server_env: dict[str, str], unique: Callable[[str], str]) -> None:
    ttype, part, orphan = unique("top"), unique("tpart"), unique("torph")
    w = jsworker.Worker(nc, groups=["cpu"], concurrency=8)
    wp = jsworker.Worker(nc, partitions=4)

    @w.handle(ttype)
    async def h(ctx: jsworker.TaskContext) -> None:
        if ctx.json() % 5 == 0:
            ctx.fail_permanent("fives")

    @wp.handle(part)
    async def hp(ctx: jsworker.TaskContext) -> None:
        return None

    c = jsworker.Client(nc)
    async with w, wp:
        handles = [await c.submit(ttype, i, group="cpu") for i in range(30)]
        for h_ in handles:
            try:
                await h_.result(timeout=30)
            except jsworker.TaskFailed:
                pass
        for i in range(3):
            await c.submit(orphan, i)
        term = Screen(server_env, "--interval", "0.3", "--window", "300", "--rate-window", "300")
        try:
            line = await term.wait(lambda: term.row(f" {ttype} "), f"the {ttype} row")
            got = cells(line)
            # type, group, done/s, failed/s, p50, p99, queued, in flight, redeliv, oldest, consumers
            assert got[0] == ttype and got[1] == "cpu"
            assert got[2] == f"{24 / 300:.2f}" and got[3] == f"{6 / 300:.2f}"
            assert got[4].endswith("ms") or got[4].endswith("s")
            assert got[6:9] == ["0", "0", "0"] and got[10] == "1"
            orow = cells(await term.wait(lambda: term.row(f" {orphan} "), "the orphan row"))
            assert orow[6] == "3" and orow[10] == "none"
            await term.wait(lambda: term.row(w.worker_id, ttype, "cpu"), "the worker and handler")
            await term.wait(lambda: term.row(wp.worker_id, f"{part}: 0-3"), "partitions held")
            await term.wait(
                lambda: term.row(f"TASK_QUEUES.{part}", f"{wp.worker_id}: 0-3"), "partition map"
            )
            assert "q quits" in term.text()
            # it refreshes: more queued tasks show up without restarting it
            for i in range(4):
                await c.submit(orphan, i + 10)
            await term.wait(
                lambda: (r := term.row(f" {orphan} ")) and cells(r)[6] == "7", "the new depth"
            )
            term.child.send("q")
            await asyncio.to_thread(term.child.expect, pexpect.EOF, 15)
            term.child.close()
            assert term.child.exitstatus == 0, term.text()
        finally:
            if term.child.isalive():
                term.child.terminate(force=True)


async def test_top_once_json(
    nc: NATS, server_env: dict[str, str], unique: Callable[[str], str]
) -> None:
    ttype = unique("once")
    w = jsworker.Worker(nc)

    @w.handle(ttype)
    async def h(ctx: jsworker.TaskContext) -> int:
        return 1

    async with w:
        for h_ in [await jsworker.Client(nc).submit(ttype, i) for i in range(5)]:
            await h_.result(timeout=30)
        p = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "jsworker.cli", "top", "--once", "--json", "--window", "600"],
            capture_output=True,
            text=True,
            env=server_env,
            timeout=60,
        )
    assert p.returncode == 0, p.stderr
    snap = json.loads(p.stdout)
    t = next(x for x in snap["types"] if x["task_type"] == ttype)
    assert t["completed"] == 5 and t["failed"] == 0 and t["samples"] == 5
    assert t["p50"] is not None and t["p99"] >= t["p50"]
    assert t["queues"][0]["consumers"] == [ttype]
    assert [e["worker_id"] for e in snap["workers"] if ttype in e["task_types"]] == [w.worker_id]


async def test_top_without_streams(fresh_server: EmbeddedServer) -> None:
    env = {**os.environ, "NATS_URL": fresh_server.url}
    term = Screen(env)
    await asyncio.to_thread(term.child.expect, pexpect.EOF, 30)
    term.child.close()
    out = term.child.before.decode() if isinstance(term.child.before, bytes) else ""
    assert term.child.exitstatus == 1
    assert "Traceback" not in out
    assert "WORKFLOW_HISTORY, TASK_QUEUES do not exist: run `jsworker kv setup`" in out, out


async def test_top_rides_out_a_missing_stream_and_quits_on_ctrl_c(
    fresh_server: EmbeddedServer,
) -> None:
    import nats

    nc = await nats.connect(fresh_server.url)
    try:
        await jsworker.setup_all(nc)
        term = Screen({**os.environ, "NATS_URL": fresh_server.url}, "--interval", "0.2")
        try:
            await term.wait(lambda: "q quits" in term.text(), "the header")
            await nc.jetstream().delete_stream("TASK_QUEUES")
            await term.wait(
                lambda: "TASK_QUEUES does not exist" in term.text(), "the problem in the header"
            )
            assert term.child.isalive()  # still running, last numbers on screen
            await jsworker.setup_all(nc)
            await term.wait(lambda: "does not exist" not in term.text(), "recovery")
            term.child.sendintr()  # Ctrl-C
            await asyncio.to_thread(term.child.expect, pexpect.EOF, 15)
            term.child.close()
            assert term.child.exitstatus == 0
        finally:
            if term.child.isalive():
                term.child.terminate(force=True)
    finally:
        await nc.close()
