"""``jsworker task ...``: submit, follow, watch and cancel tasks."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from typing import Any

import click
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from rich.markup import escape

from .. import _names as n
from .._client import Client
from .._errors import TaskFailed, TaskTimeout
from .._wire import TERMINAL_KINDS
from ._common import (
    ConnOptions,
    console,
    err_console,
    parse_metadata,
    pass_conn,
    print_json,
    read_json_arg,
    run,
    with_nc,
)


@click.group("task")
def task_group() -> None:
    """Submit and follow tasks."""


@task_group.command("submit")
@click.argument("task_type")
@click.argument("input", required=False)
@click.option("--group", default=None, help="Worker group (subject task.TYPE.GROUP.RUN).")
@click.option("--run-id", default=None, help="Run id (default: a new one). Same id = deduplicated.")
@click.option(
    "--key", default=None, help="Partition key for partitioned handlers (default: run id)."
)
@click.option("--metadata", "-m", multiple=True, help="key=value, repeatable.")
@click.option("--wait", is_flag=True, help="Wait for the outcome; exit 1 if the task failed.")
@click.option("--timeout", type=float, default=60.0, show_default=True, help="With --wait.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@pass_conn
def submit(
    conn: ConnOptions,
    task_type: str,
    input: str | None,
    group: str | None,
    run_id: str | None,
    key: str | None,
    metadata: tuple[str, ...],
    wait: bool,
    timeout: float,
    as_json: bool,
) -> None:
    """Submit a task of TASK_TYPE with INPUT (JSON text, - for stdin, @file).

    \b
    Examples:
      jsworker task submit send-email '{"to": "a@b.c"}'
      jsworker task submit resize-image @job.json --group gpu --wait
      echo '{"n": 3}' | jsworker task submit fib - --wait --json
    """
    value = read_json_arg(input)
    meta = parse_metadata(metadata)

    async def go(nc: NATS) -> dict[str, Any]:
        h = await Client(nc).submit(
            task_type, value, group=group, run_id=run_id, metadata=meta, key=key
        )
        out: dict[str, Any] = {
            "task_type": task_type,
            "run_id": h.run_id,
            "step_id": h.step_id,
            "subject": h.subject,
            "duplicate": h.duplicate,
            "sequence": h.sequence,
        }
        if wait:
            try:
                out["output"] = await h.result(timeout=timeout)
                out["status"] = "completed"
            except TaskFailed as e:
                out.update(status="failed", kind=e.kind, error=e.error)
            except TaskTimeout as e:
                out.update(status="timeout", error=str(e))
        return out

    out = run(with_nc(conn, go))
    if as_json:
        print_json(out)
    else:
        dup = " [yellow](duplicate: already submitted)[/]" if out["duplicate"] else ""
        console.print(f"submitted [bold]{task_type}[/] run [cyan]{out['run_id']}[/]{dup}")
        if wait:
            if out["status"] == "completed":
                console.print(f"[green]completed[/]: {escape(json.dumps(out['output']))}")
            else:
                err_console.print(
                    f"[red]{out['status']}[/] ({out.get('kind', '')}): {escape(str(out['error']))}"
                )
    if wait and out["status"] != "completed":
        sys.exit(1)


@task_group.command("events")
@click.argument("run_id")
@click.option("--follow", "-f", is_flag=True, help="Keep printing new events.")
@click.option("--json", "as_json", is_flag=True, help="One JSON event per line.")
@pass_conn
def events(conn: ConnOptions, run_id: str, follow: bool, as_json: bool) -> None:
    """Print the lifecycle events of RUN_ID (stream WORKFLOW_HISTORY).

    \b
    Examples:
      jsworker task events run-1a2b3c
      jsworker task events run-1a2b3c --follow --json | jq .type
    """

    async def go(nc: NATS) -> int:
        count = 0
        async for ev in Client(nc).run_events(run_id, timeout=None if follow else 0.5):
            count += 1
            if as_json:
                click.echo(json.dumps(ev))
            else:
                console.print(_event_line(ev))
        return count

    if run(with_nc(conn, go)) == 0 and not as_json:
        err_console.print(f"no events for run {run_id}")


def _event_line(ev: dict[str, Any]) -> str:
    p = ev.get("payload") or {}
    et = ev.get("type", "?")
    style = {"step.completed": "green", "step.failed": "red", "step.cancelled": "yellow"}.get(
        et, "default"
    )
    detail = ""
    if "output" in p:
        detail = json.dumps(p["output"])
    if p.get("error"):
        detail = f"{p.get('kind', '')}: {p['error']}"
    if p.get("reason"):
        detail = p["reason"]
    return (
        f"{ev.get('timestamp', '')}  [{style}]{et:15}[/] {escape(str(ev.get('step_id', '')))} "
        f"attempt {ev.get('attempt_number', '')}  {escape(str(detail))}"
    )


@task_group.command("watch")
@click.argument("run_id")
@click.option("--timeout", type=float, default=None, help="Give up after this many seconds.")
@pass_conn
def watch(conn: ConnOptions, run_id: str, timeout: float | None) -> None:
    """Print RUN_ID's partial results (``stream.RUN.*``) live, then its outcome.

    Exits 0 when the run's step completes, 1 when it fails or is cancelled.

    \b
    Examples:
      jsworker task watch run-1a2b3c
    """
    n.validate_token(run_id, "run id")

    async def go(nc: NATS) -> bool:
        queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()

        async def on_chunk(msg: Msg) -> None:
            await queue.put(("chunk", msg))

        sub = await nc.subscribe(f"stream.{run_id}.>", cb=on_chunk)

        async def follow() -> None:
            async for ev in Client(nc).run_events(run_id):
                await queue.put(("event", ev))

        follower = asyncio.create_task(follow())
        try:
            async with asyncio.timeout(timeout):
                while True:
                    kind, item = await queue.get()
                    if kind == "chunk":
                        step = item.subject.split(".", 2)[2]
                        seq = (item.headers or {}).get("Jsw-Seq", "")
                        text = escape(item.data.decode(errors="replace"))
                        console.print(f"[dim]{escape(step)} #{seq}[/] {text}")
                        continue
                    console.print(_event_line(item))
                    p = item.get("payload") or {}
                    if item["type"] == "step.completed":
                        return True
                    if item["type"] == "step.cancelled" or (
                        item["type"] == "step.failed"
                        and p.get("kind") in TERMINAL_KINDS | {"max_iterations"}
                    ):
                        return False
        except TimeoutError:
            err_console.print(f"[yellow]no outcome within {timeout}s[/]")
            return False
        finally:
            follower.cancel()
            with contextlib.suppress(BaseException):
                await follower
            await sub.unsubscribe()

    if not run(with_nc(conn, go)):
        sys.exit(1)


@task_group.command("cancel")
@click.argument("run_id")
@click.option("--reason", default="cancelled from the CLI", show_default=True)
@pass_conn
def cancel(conn: ConnOptions, run_id: str, reason: str) -> None:
    """Cancel RUN_ID: queued tasks never start, running ones are asked to stop.

    \b
    Examples:
      jsworker task cancel run-1a2b3c --reason "customer asked"
    """

    async def go(nc: NATS) -> None:
        await Client(nc).cancel(run_id, reason)

    run(with_nc(conn, go))
    console.print(f"cancel requested for run [cyan]{run_id}[/]")
