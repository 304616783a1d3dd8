"""CLI text from a new user's first hour (issue): live workers next to consumers in
``queues`` and ``top``, against a real server and the real CLI (subprocesses)."""

from __future__ import annotations

import json
from collections.abc import Callable

from nats.aio.client import Client as NATS
from test_ops_cli import acli

import jsworker


async def test_queues_and_top_show_no_live_worker_for_a_left_behind_consumer(
    nc: NATS, server_env: dict[str, str], unique: Callable[[str], str]
) -> None:
    gone, alive = unique("gone"), unique("alive")
    w = jsworker.Worker(nc)
    live = jsworker.Worker(nc)

    @w.handle(gone)
    async def h(ctx: jsworker.TaskContext) -> None:
        return None

    @live.handle(alive)
    async def h2(ctx: jsworker.TaskContext) -> None:
        return None

    async with live:
        async with w:
            pass  # its durable consumer stays; its directory entry is deleted on stop
        await nc.jetstream().publish(f"task.{gone}.run-1", b"{}")  # as any language would
        p = await acli("queues", "--json", env=server_env)
        table = await acli("queues", env=server_env)
        top = await acli("top", "--once", "--json", env=server_env)
        top_text = await acli("top", "--once", env=server_env)
    assert p.returncode == 0, p.stderr
    rows = {(r["task_type"], r["group"]): r for r in json.loads(p.stdout)}
    g, a = rows[(gone, None)], rows[(alive, None)]
    assert g["consumers"] == [gone]  # the old field, kept
    assert (g["live"], g["live_workers"]) == (False, [])
    assert (a["live"], a["live_workers"]) == (True, [live.worker_id])
    line = next(ln for ln in table.stdout.splitlines() if f" {gone} " in ln)
    assert "none" in line, table.stdout
    assert f"no live worker for {gone}: 1 consumer left behind, 1 task waiting" in table.stdout
    assert f"no live worker for {alive}" not in table.stdout
    assert top.returncode == 0, top.stderr
    t = next(x for x in json.loads(top.stdout)["types"] if x["task_type"] == gone)
    assert t["queues"][0]["live"] is False
    assert f"no live worker for {gone}" in top_text.stdout, top_text.stdout
    await nc.jetstream().purge_stream("TASK_QUEUES", subject=f"task.{gone}.>")
