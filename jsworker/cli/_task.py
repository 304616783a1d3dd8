"""``jsworker task ...``: submit tasks and follow them."""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from typing import Any

import click
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from rich.text import Text

from .. import _names as n
from .. import _wire as w
from .._client import Client, TaskRequest, no_worker_message
from .._errors import TaskFailed, TaskTimeout
from .._services import CHUNK_SEQ
from ._connect import ConnOptions, library_errors, pass_conn, run, with_nc
from ._input import parse_metadata, read_json_arg
from ._otel import otel_console_option, otel_session
from ._output import (
    compact,
    console,
    err,
    event_text,
    event_time,
    print_json,
    print_json_line,
    safe,
)

#: tasks per ``submit_many`` call of ``submit --count``
SUBMIT_CHUNK = 10_000


@click.group("task")
def task_group() -> None:
    """Submit tasks and follow them.

    \b
    Examples:
      jsworker task submit send-email '{"to": "a@b.c"}' --wait
      jsworker task events run-1a2b3c --follow
    """


@task_group.command("submit")
@click.argument("task_type")
@click.argument("input", required=False)
@click.option("--group", help="Worker group: subject task.TYPE.GROUP.RUN_ID.")
@click.option(
    "--run-id", help="Run id  [default: a new one; the same run id twice is deduplicated]"
)
@click.option("--step-id", help="Step id  [default: the task type]")
@click.option("--key", help="Partition key for partitioned handlers  [default: the run id]")
@click.option("--metadata", "-m", multiple=True, metavar="KEY=VALUE", help="Repeatable.")
@click.option("--wait", is_flag=True, help="Wait for the outcome; exit 1 if the task failed.")
@click.option(
    "--timeout", type=click.FloatRange(0.1), default=60.0, help="Seconds --wait waits at most."
)
@click.option(
    "--count",
    type=click.IntRange(1),
    default=1,
    help="Submit this many tasks (each its own run), pipelined: load from the CLI.",
)
@click.option(
    "--sticky",
    type=click.Choice(["soft", "hard"]),
    help="Run this step on the worker that ran the run's first sticky step "
    "(soft: or any worker when it is gone; hard: wait for it, fail when it stays gone).",
)
@click.option(
    "--last-step",
    is_flag=True,
    help="With --sticky: the run's last step; its outcome removes the run's binding.",
)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object.")
@otel_console_option
@pass_conn
def submit(
    conn: ConnOptions,
    task_type: str,
    input: str | None,
    group: str | None,
    run_id: str | None,
    step_id: str | None,
    key: str | None,
    metadata: tuple[str, ...],
    wait: bool,
    timeout: float,
    count: int,
    sticky: str | None,
    last_step: bool,
    as_json: bool,
    otel_console: bool,
) -> None:
    """Submit a task of TASK_TYPE with INPUT: JSON text, - for stdin, or
    @file (default null).

    Prints the run id. With --wait, prints the output when the task completes,
    and exits 1 with the error when it fails for good (permanent failure,
    retries exhausted, cancelled) or when --timeout passes first.

    \b
    Examples:
      jsworker task submit send-email '{"to": "a@b.c"}'
      jsworker task submit resize-image @job.json --group gpu --wait
      echo '{"n": 3}' | jsworker task submit fib - --wait --json
      jsworker task submit charge-card '{"amount": 5}' --run-id order-42 -m tenant=acme
      jsworker task submit noop --count 100000 --json   # load: prints tasks/s
      jsworker task submit embed @chunk.json --run-id doc-7 --step-id s2 --sticky soft
    """
    if count > 1 and (run_id is not None or wait or sticky):
        raise click.UsageError("--count cannot be combined with --run-id, --wait or --sticky")
    if last_step and sticky is None:
        raise click.UsageError("--last-step needs --sticky")
    with library_errors():
        n.validate_task_type(task_type)
        if group is not None:
            n.validate_group(group)
        if run_id is not None:
            n.validate_token(run_id, "run id")
        if step_id is not None:
            n.validate_step_id(step_id)
    value = read_json_arg(input)
    meta = parse_metadata(metadata)
    if count > 1:
        _submit_count(conn, task_type, value, group, key, meta, count, as_json)
        return

    async def go(nc: NATS) -> dict[str, Any]:
        client = Client(nc, telemetry=telemetry, warn_no_worker=False)
        h = await client.submit(
            task_type,
            value,
            group=group,
            run_id=run_id,
            step_id=step_id,
            metadata=meta,
            key=key,
            sticky=sticky,
            last_step=last_step,
        )
        out: dict[str, Any] = {
            "task_type": task_type,
            "run_id": h.run_id,
            "step_id": h.step_id,
            "subject": h.subject,
            "duplicate": h.duplicate,
            "sequence": h.sequence,
            "listening": h.listening,
        }
        if h.listening is False:
            # a warning, not an error: a worker may start later and run it
            err(f"Warning: {no_worker_message(h.subject)}", style="yellow")
        if wait:
            retries = asyncio.ensure_future(
                h.follow_retries(lambda line: err(line, style="yellow"))
            )
            try:
                out["output"] = await h.result(timeout=timeout)
                out["status"] = "completed"
            except TaskFailed as e:
                out.update(status="failed", kind=e.kind, error=e.error)
            except TaskTimeout as e:
                out.update(status="timeout", error=str(e))
            finally:
                retries.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await retries
        return out

    # a producer span per submit when OTEL_* or --otel-console ask for it
    with otel_session(console=otel_console, service="jsworker-cli") as telemetry:
        out = run(with_nc(conn, go))
    if as_json:
        print_json(out)
    else:
        line = Text(f"submitted {task_type} run ")
        line.append(safe(out["run_id"]), style="bold cyan")
        if out["duplicate"]:
            line.append(" (duplicate: this run and step were already submitted)", style="yellow")
        console.print(line, soft_wrap=True)
        if wait and out["status"] == "completed":
            console.print(Text.assemble(("completed: ", "green"), safe(compact(out["output"]))))
    if wait and out["status"] != "completed":
        # kind and error come from the worker that failed the task: err() escapes them
        kind = f" ({out['kind']})" if "kind" in out else ""
        err(f"Error: task {out['status']}{kind}: {out['error']}")
        sys.exit(1)


def _submit_count(
    conn: ConnOptions,
    task_type: str,
    value: Any,
    group: str | None,
    key: str | None,
    meta: dict[str, str],
    count: int,
    as_json: bool,
) -> None:
    """``submit --count N``: N tasks with ``Client.submit_many`` (in chunks, so memory
    stays flat), then one line (or JSON) with the rate."""

    async def go(nc: NATS) -> dict[str, Any]:
        client = Client(nc, warn_no_worker=False)
        t0 = time.perf_counter()
        duplicates, first, last = 0, 0, 0
        for start in range(0, count, SUBMIT_CHUNK):
            reqs = [
                TaskRequest(task_type, value, group=group, key=key, metadata=meta)
                for _ in range(min(SUBMIT_CHUNK, count - start))
            ]
            handles = await client.submit_many(reqs, window=1024)
            if start == 0 and handles[0].listening is False:
                err(f"Warning: {no_worker_message(handles[0].subject)}", style="yellow")
            duplicates += sum(h.duplicate for h in handles)
            first = first or handles[0].sequence
            last = handles[-1].sequence
        seconds = time.perf_counter() - t0
        return {
            "task_type": task_type,
            "count": count,
            "duplicates": duplicates,
            "first_sequence": first,
            "last_sequence": last,
            "seconds": round(seconds, 3),
            "tasks_per_s": round(count / seconds, 1) if seconds > 0 else None,
        }

    out = run(with_nc(conn, go))
    if as_json:
        print_json(out)
    else:
        console.print(
            f"submitted {count} {task_type} tasks in {out['seconds']:.2f} s "
            f"({out['tasks_per_s']:.0f} tasks/s)",
            soft_wrap=True,
        )


@task_group.command("events")
@click.argument("run_id")
@click.option("--follow", "-f", is_flag=True, help="Keep printing new events until Ctrl-C.")
@click.option("--json", "as_json", is_flag=True, help="One JSON event per line.")
@pass_conn
def events(conn: ConnOptions, run_id: str, follow: bool, as_json: bool) -> None:
    """Print the lifecycle events of RUN_ID (stream WORKFLOW_HISTORY):
    step.started, step.completed, step.failed, step.continue, step.cancelled.

    \b
    Examples:
      jsworker task events run-1a2b3c
      jsworker task events run-1a2b3c --follow
      jsworker task events run-1a2b3c --json | jq -r .type
    """
    with library_errors():
        n.validate_token(run_id, "run id")

    async def go(nc: NATS) -> int:
        count = 0
        async for ev in Client(nc).run_events(run_id, timeout=None if follow else 0.5):
            count += 1
            if as_json:
                print_json_line(ev)
            else:
                console.print(event_text(ev), soft_wrap=True)
        return count

    if run(with_nc(conn, go)) == 0 and not as_json:
        err(f"no events for run {run_id}", style="yellow")


@task_group.command("watch")
@click.argument("run_id")
@click.option("--timeout", type=click.FloatRange(0.1), help="Give up after this many seconds.")
@pass_conn
def watch(conn: ConnOptions, run_id: str, timeout: float | None) -> None:
    """Print RUN_ID's partial results (ctx.stream) live, with its events,
    until a step completes (exit 0) or fails for good / is cancelled (exit 1).

    Partial results are not persisted: start watching before they are sent.

    \b
    Examples:
      jsworker task watch run-1a2b3c
      jsworker task watch run-1a2b3c --timeout 60
    """
    with library_errors():
        n.validate_token(run_id, "run id")

    async def go(nc: NATS) -> bool:
        queue: asyncio.Queue[Msg | dict[str, Any] | BaseException] = asyncio.Queue()

        async def on_chunk(msg: Msg) -> None:
            queue.put_nowait(msg)

        sub = await nc.subscribe(f"stream.{run_id}.>", cb=on_chunk)
        since = time.time()  # partial results are not kept: only those from now on
        told = False

        async def follow() -> None:
            try:
                async for ev in Client(nc).run_events(run_id):
                    queue.put_nowait(ev)
            except Exception as e:  # handed to the main loop, which raises it
                queue.put_nowait(e)

        follower = asyncio.create_task(follow())
        try:
            async with asyncio.timeout(timeout):
                while True:
                    item = await queue.get()
                    if isinstance(item, BaseException):
                        raise item
                    if isinstance(item, Msg):
                        # the subject, header and data are written by the worker
                        step = item.subject.split(".", 2)[2]
                        seq = (item.headers or {}).get(CHUNK_SEQ, "")
                        line = Text(f"{safe(step)} #{safe(seq)} ", style="dim")
                        line.append(safe(item.data.decode(errors="replace")), style="")
                        console.print(line, soft_wrap=True)
                        continue
                    console.print(event_text(item), soft_wrap=True)
                    if not isinstance(item, dict):
                        continue
                    et = item.get("type")
                    started = event_time(item) if et == w.STEP_STARTED else None
                    if not told and started is not None and started < since:
                        told = True  # the run was under way before this watch began
                        err(
                            "the run started before this watch: partial results it sent "
                            "before now are not kept; showing them from now on",
                            style="dim",
                        )
                    payload = item.get("payload")
                    kind = payload.get("kind") if isinstance(payload, dict) else None
                    kind = kind if isinstance(kind, str) else None  # unhashable from the wire
                    if et == w.STEP_COMPLETED:
                        return True
                    if et == w.STEP_CANCELLED or (
                        et == w.STEP_FAILED and kind in w.TERMINAL_KINDS | {"max_iterations"}
                    ):
                        return False
        except TimeoutError:
            err(f"no outcome within {timeout:g}s", style="yellow")
            return False
        finally:
            follower.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await follower
            await sub.unsubscribe()

    if not run(with_nc(conn, go)):
        sys.exit(1)


@task_group.command("cancel")
@click.argument("run_id")
@click.option("--reason", default="cancelled from the CLI", help="Recorded in step.cancelled.")
@pass_conn
def cancel(conn: ConnOptions, run_id: str, reason: str) -> None:
    """Cancel RUN_ID: its queued tasks never start, running ones are asked to
    stop (needs the signals bucket).

    \b
    Examples:
      jsworker task cancel run-1a2b3c
      jsworker task cancel run-1a2b3c --reason "customer asked"
    """
    with library_errors():
        n.validate_token(run_id, "run id")

    async def go(nc: NATS) -> int:
        client = Client(nc)
        seen = 0
        async for _ in client.run_events(run_id, timeout=0.5):
            seen += 1
        await client.cancel(run_id, reason)
        return seen

    if run(with_nc(conn, go)) == 0:
        # a queued task has no events yet, so the cancel stays recorded for it
        err(
            f"no run {run_id} is known (no events recorded; a typo? `jsworker task events "
            f"{run_id}`): the cancel is recorded anyway, so a task of that run still "
            "queued will not start",
            style="yellow",
        )
    console.print(Text(f"cancel requested for run {run_id}"))
