"""A worker process for stop/crash tests.

    python worker_proc.py TYPE [--url URL] [--sleep S] [--ack-wait A] [--grace G]

Connects to ``--url`` (default ``$NATS_URL``), handles ``TYPE`` with a handler that
sleeps ``S`` seconds (or the task input's ``"sleep"``) and returns
``{"pid", "worker_id", "attempt", "input"}``. It prints one line per thing it does:

    READY <worker id>            once the worker is started
    START <run id> <attempt>     when a task starts
    DONE <run id>                when a task's handler returns
    STOPPED <stats json>         after a graceful stop

SIGTERM (or SIGINT) stops it gracefully with ``worker.stop()``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal

import nats

import jsworker


def say(*parts: object) -> None:
    print(*parts, flush=True)


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("task_type")
    ap.add_argument("--url", default=os.environ.get("NATS_URL", "nats://127.0.0.1:4222"))
    ap.add_argument("--sleep", type=float, default=0.0)
    ap.add_argument("--ack-wait", type=float, default=30.0)
    ap.add_argument("--grace", type=float, default=10.0)
    args = ap.parse_args()

    nc = await nats.connect(args.url)
    worker = jsworker.Worker(nc, ack_wait=args.ack_wait, grace_period=args.grace)

    @worker.handle(args.task_type)
    async def handler(ctx: jsworker.TaskContext) -> object:
        data = ctx.json()
        pause = data.get("sleep", args.sleep) if isinstance(data, dict) else args.sleep
        say("START", ctx.run_id, ctx.attempt)
        await asyncio.sleep(float(pause))
        say("DONE", ctx.run_id)
        return {
            "pid": os.getpid(),
            "worker_id": worker.worker_id,
            "attempt": ctx.attempt,
            "input": data,
        }

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await worker.start()
    say("READY", worker.worker_id)
    await stop.wait()
    await worker.stop()
    say("STOPPED", json.dumps(worker.stats.as_dict()))
    await nc.close()


if __name__ == "__main__":
    asyncio.run(main())
