"""Replaying a dead letter whose handler still fails leaves a trace: the replayed run's
events and its new dead letter are recorded (not dropped as duplicates of the original's
inside the streams' duplicate windows), and the CLI says how to follow the replay."""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Callable
from typing import Any

from nats.aio.client import Client as NATS
from test_ops_cli import cli

import jsworker
from jsworker._dead import list_dead, replay_dead


async def wait_for(pred: Callable[[], Any], timeout: float = 15.0, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        r = pred()
        if asyncio.iscoroutine(r):
            r = await r
        if r:
            return r
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def events(nc: NATS, run_id: str) -> list[dict[str, Any]]:
    return [ev async for ev in jsworker.Client(nc).run_events(run_id, timeout=0.5)]


async def dead_of(nc: NATS, ttype: str, count: int) -> Any:
    got = await list_dead(nc, task_type=ttype)
    return got if len(got) >= count else None


async def test_replay_of_a_still_failing_task_is_recorded(
    nc: NATS, unique: Callable[[str], str]
) -> None:
    ttype = unique("still-broken")
    runs: list[jsworker.TaskInfo] = []
    w = jsworker.Worker(nc)

    @w.handle(ttype, retry=jsworker.RetryPolicy.fixed(0.05, max_attempts=2))
    async def h(ctx: jsworker.TaskContext) -> None:
        runs.append(ctx.info)
        raise RuntimeError("still broken")

    async with w:
        handle = await jsworker.Client(nc).submit(ttype, {"n": 1})
        (first,) = await wait_for(lambda: dead_of(nc, ttype, 1), what="the first dead letter")
        assert first.kind == "exhausted" and first.attempts == 2
        before = await events(nc, handle.run_id)

        res = await replay_dead(nc, first)  # seconds later: inside every dedup window
        assert not res.duplicate and res.run_id == handle.run_id
        dls = await wait_for(lambda: dead_of(nc, ttype, 2), what="the replay's dead letter")
        assert len(runs) == 4  # the original's two attempts, then the replay's two
        second = dls[1]
        assert second.seq > first.seq and second.run_id == handle.run_id
        assert json.loads(second.metadata["replayed_from"])["seq"] == first.seq

        after = await wait_for(
            lambda: _longer(events(nc, handle.run_id), len(before) * 2),
            what="the replay's events",
        )
        types = [ev["type"] for ev in after]
        # the original's started/failed x2 + terminal failure, and the replay's again
        assert types.count("step.started") == 4, types
        terminal = [ev for ev in after if ev["payload"].get("kind") == "exhausted"]
        assert len(terminal) == 2, types

        # replaying the replay's dead letter is recorded as well (a third record)
        res2 = await replay_dead(nc, second)
        assert not res2.duplicate
        dls = await wait_for(lambda: dead_of(nc, ttype, 3), what="the second replay's dead letter")
        assert json.loads(dls[2].metadata["replayed_from"])["seq"] == second.seq
        # and the first replay stays deduplicated: one dead letter is re-submitted once
        assert (await replay_dead(nc, first)).duplicate


async def _longer(coro: Any, n: int) -> Any:
    got = await coro
    return got if len(got) >= n else None


async def test_cli_replay_says_how_to_follow_it(
    nc: NATS, unique: Callable[[str], str], server_env: dict[str, str]
) -> None:
    ttype = unique("follow")
    w = jsworker.Worker(nc)

    @w.handle(ttype)
    async def h(ctx: jsworker.TaskContext) -> None:
        ctx.fail_permanent("nope")

    async with w:
        handle = await jsworker.Client(nc).submit(ttype, {})
        (dl,) = await wait_for(lambda: dead_of(nc, ttype, 1), what="the dead letter")
        p = await asyncio.to_thread(cli, "dead", "replay", str(dl.seq), env=server_env)
        assert p.returncode == 0, p.stderr
        out = " ".join(p.stdout.split())
        assert handle.run_id in out
        assert f"jsworker task events {handle.run_id} --follow" in out, out
        assert f"jsworker dead list --type {ttype}" in out, out
        await wait_for(lambda: dead_of(nc, ttype, 2), what="the replay's dead letter")

        p = await asyncio.to_thread(cli, "dead", "replay", str(dl.seq), env=server_env)
        assert p.returncode == 0, p.stderr
        assert "duplicate" in p.stdout
    assert os.environ  # the worker ran in this process; the CLI in a subprocess
