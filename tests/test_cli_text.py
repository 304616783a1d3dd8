"""CLI text from a new user's first hour (issue): live workers next to consumers in
``queues`` and ``top``, against a real server and the real CLI (subprocesses)."""

from __future__ import annotations

import asyncio
import io
import json
import sys
from collections.abc import Callable
from pathlib import Path

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


def _rendered(renderable: object) -> str:
    from rich.console import Console

    c = Console(width=160, record=True, file=io.StringIO(), color_system=None)
    c.print(renderable)
    return c.export_text()


def test_top_says_what_is_empty_instead_of_printing_empty_tables() -> None:
    from jsworker.cli._top import Snapshot, render

    text = _rendered(render(Snapshot(at=0.0, queues=[], stats={}, workers=[], partitions={}), "u"))
    assert "no task types yet" in text
    assert "no live worker in the directory" in text
    assert "no elastic groups" in text
    assert "consumers" not in text and "partition maps" not in text  # no header over nothing


def test_every_command_table_has_one_style() -> None:
    # a rule under the header and no box: the same in queues, top, dead, kv, workers ...
    from jsworker.cli._output import make_table

    t = make_table("title")
    t.add_column("a")
    t.add_row("1")
    text = _rendered(t)
    assert "─" in text and not set("│┃┏┡└") & set(text), text
    import jsworker.cli as cli_pkg

    root = Path(cli_pkg.__file__).parent
    direct = [p.name for p in root.glob("*.py") if "Table(" in p.read_text()]
    assert direct == ["_output.py"], direct  # every other module uses make_table


def test_partition_view_counts_one_member_and_explains_its_columns() -> None:
    from jsworker.cli._partitions import _render

    view = {
        "group": "TASK_QUEUES.t",
        "max_members": 2,
        "members": ["w1"],
        "member_mappings": [],
        "revision": 3,
        "partitions": [
            {"partition": 0, "member": "w1", "consuming": True, "pinned": True, "pending": 0},
            {"partition": 1, "member": "w1", "consuming": True, "pinned": False, "pending": 2},
        ],
    }
    text = _rendered(_render(view))
    assert "(2 partitions, 1 member, revision 3)" in text, text
    assert "pinned: the server has pinned one client" in text, text
    assert "an idle member shows no" in text, text


async def test_signal_list_and_cancel_of_an_unknown_run_say_so(server_env: dict[str, str]) -> None:
    p = await acli("signal", "list", "run-nobody-knows", env=server_env)
    assert p.returncode == 0, p.stderr
    assert "no signals for run run-nobody-knows" in p.stdout, p.stdout
    assert "name" not in p.stdout  # no empty table
    p = await acli("task", "cancel", "run-nobody-knows-2", env=server_env)
    assert p.returncode == 0, p.stderr
    assert "no run run-nobody-knows-2 is known" in p.stderr, p.stderr
    assert "cancel requested for run run-nobody-knows-2" in p.stdout


async def test_task_watch_started_late_says_earlier_chunks_are_not_kept(
    nc: NATS, server_env: dict[str, str], unique: Callable[[str], str]
) -> None:
    t = unique("late")
    w = jsworker.Worker(nc)
    go = asyncio.Event()

    @w.handle(t)
    async def h(ctx: jsworker.TaskContext) -> str:
        await ctx.stream({"chunk": 1})
        await go.wait()
        await ctx.stream({"chunk": 2})
        return "done"

    async with w:
        handle = await jsworker.Client(nc).submit(t, {})
        async for ev in jsworker.Client(nc).run_events(handle.run_id, timeout=10):
            if ev.get("type") == "step.started":
                break
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "jsworker.cli",
            "task",
            "watch",
            handle.run_id,
            "--timeout",
            "30",
            env={**server_env, "COLUMNS": "300", "NO_COLOR": "1"},
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        assert proc.stderr is not None and proc.stdout is not None
        # the notice comes after the watch subscribed to the chunks: chunk 2 reaches it
        notice = await asyncio.wait_for(proc.stderr.readline(), 30)
        go.set()
        out, rest = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, rest
    assert b"partial results it sent before now are not kept" in notice, notice
    p_stdout = out.decode()
    assert '"chunk": 2' in p_stdout or '"chunk":2' in p_stdout, p_stdout
    assert '"chunk": 1' not in p_stdout and '"chunk":1' not in p_stdout  # sent before: gone
