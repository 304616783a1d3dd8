"""A worker process for the rate-limit and sticky tests (tests/test_ratelimit.py,
tests/test_sticky.py).

    python limits_worker.py TYPE [--url URL] [--rate N] [--per S] [--key-rate N]
        [--key PATH] [--hold S] [--soft S] [--hard S] [--heartbeat S] [--sleep S]

Handles ``TYPE`` with a handler that sleeps ``S`` seconds (or the input's ``"sleep"``)
and returns ``{"worker_id", "attempt", "step_id"}``. It prints, flushed:

    READY <worker id>
    DONE <run id> <step id> <attempt> <delivery count> <unix time>

SIGTERM stops it gracefully.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import time

import nats

import jsworker


def say(*parts: object) -> None:
    print(*parts, flush=True)


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("task_type")
    ap.add_argument("--url", default=os.environ.get("NATS_URL", "nats://127.0.0.1:4222"))
    ap.add_argument("--rate", type=int)
    ap.add_argument("--per", type=float, default=1.0)
    ap.add_argument("--key-rate", type=int)
    ap.add_argument("--key")
    ap.add_argument("--hold", type=float, default=2.0)
    ap.add_argument("--soft", type=float, default=10.0)
    ap.add_argument("--hard", type=float, default=300.0)
    ap.add_argument("--heartbeat", type=float, default=30.0)
    ap.add_argument("--sleep", type=float, default=0.0)
    args = ap.parse_args()

    nc = await nats.connect(args.url)
    worker = jsworker.Worker(
        nc,
        rate_limit_hold=args.hold,
        sticky_soft_timeout=args.soft,
        sticky_hard_timeout=args.hard,
        heartbeat_interval=args.heartbeat,
    )
    options: dict[str, object] = {}
    if args.rate:
        options["rate_limit"] = jsworker.RateLimit(args.rate, per=args.per)
    if args.key_rate:
        options["key_rate_limit"] = jsworker.RateLimit(args.key_rate, per=args.per, key=args.key)

    @worker.handle(args.task_type, **options)
    async def handler(ctx: jsworker.TaskContext) -> object:
        data = ctx.json()
        pause = data.get("sleep", args.sleep) if isinstance(data, dict) else args.sleep
        await asyncio.sleep(float(pause))
        delivered = ctx.info.attempt
        msg = getattr(ctx, "_msg", None)
        if msg is not None:
            delivered = msg.metadata.num_delivered
        say("DONE", ctx.run_id, ctx.step_id, ctx.attempt, delivered, repr(time.time()))
        return {"worker_id": worker.worker_id, "attempt": ctx.attempt, "step_id": ctx.step_id}

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await worker.start()
    say("READY", worker.worker_id)
    await stop.wait()
    await worker.stop()
    await nc.close()


if __name__ == "__main__":
    asyncio.run(main())
