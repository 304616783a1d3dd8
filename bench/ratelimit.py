"""Drain throughput of a no-op handler without a rate limit and with a generous one.

    python bench/ratelimit.py [--tasks N] [--rounds R] [--concurrency C] [--limit L] [--json]

One embedded ``nats-server``. Per round, for each mode (alternating, the order flipped
every round): N tasks of a fresh type are pre-published, then a ``Worker`` drains them
and the clock stops when its consumer has nothing pending or unacknowledged.

* **none**: ``worker.handle(type, noop)``.
* **limited**: ``worker.handle(type, noop, rate_limit=RateLimit(L))`` with L = 1,000,000
  per second by default: far above what the worker drains, so the cost measured is the
  gate itself (token batches from KV ``rate_limits`` by compare-and-swap), not waiting.

The median of the rounds per mode and the ratio limited / none are printed, with the
number of KV round trips (compare-and-swap updates) the limited drains made.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from typing import Any

import nats
from nats.aio.client import Client as NATS

import jsworker


async def drain(nc: NATS, mode: str, tasks: int, concurrency: int, limit: int, rnd: int) -> float:
    ttype = f"bench-rl-{mode}-{rnd}-{time.monotonic_ns() % 10**9}"
    await jsworker.Client(nc).submit_many(
        [jsworker.TaskRequest(ttype, i) for i in range(tasks)], window=512
    )
    w = jsworker.Worker(nc, concurrency=concurrency)
    options: dict[str, Any] = {}
    if mode == "limited":
        options["rate_limit"] = jsworker.RateLimit(limit, per=1.0)

    @w.handle(ttype, **options)
    async def noop(ctx: jsworker.TaskContext) -> None:
        return None

    js = nc.jetstream()
    t0 = time.perf_counter()
    async with w:
        while True:
            ci = await js.consumer_info("TASK_QUEUES", ttype)
            if ci.num_pending == 0 and ci.num_ack_pending == 0:
                break
            await asyncio.sleep(0.02)
        elapsed = time.perf_counter() - t0
    await js.delete_consumer("TASK_QUEUES", ttype)
    assert w.stats.completed == tasks and w.stats.rate_limited == 0, w.stats
    return tasks / elapsed


async def main(args: argparse.Namespace) -> dict[str, Any]:
    async with jsworker.EmbeddedServer() as srv:
        nc = await nats.connect(srv.url)
        await jsworker.setup_all(nc)
        rates: dict[str, list[float]] = {"none": [], "limited": []}
        await drain(nc, "none", min(500, args.tasks), args.concurrency, args.limit, -1)
        for rnd in range(args.rounds):
            order = ("none", "limited") if rnd % 2 == 0 else ("limited", "none")
            for mode in order:
                rates[mode].append(
                    await drain(nc, mode, args.tasks, args.concurrency, args.limit, rnd)
                )
        kv_info = await nc.jetstream().stream_info("KV_rate_limits")
        await nc.close()
    none, limited = statistics.median(rates["none"]), statistics.median(rates["limited"])
    writes = kv_info.state.messages  # history 1: one message per bucket (its last write)
    return {
        "tasks": args.tasks,
        "rounds": args.rounds,
        "limit_per_s": args.limit,
        "none_tasks_per_s": round(none),
        "limited_tasks_per_s": round(limited),
        "ratio_limited_none": round(limited / none, 3),
        "kv_last_sequence": kv_info.state.last_seq,
        "buckets": writes,
        "runs": {k: [round(x) for x in v] for k, v in rates.items()},
    }


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", type=int, default=5000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--limit", type=int, default=1_000_000)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    result = asyncio.run(main(a))
    if a.json:
        print(json.dumps(result, indent=2))
    else:
        print(
            f"none {result['none_tasks_per_s']:,} tasks/s, limited ({a.limit:,}/s) "
            f"{result['limited_tasks_per_s']:,} tasks/s: limited/none = "
            f"{result['ratio_limited_none']:.2f}  (medians of {a.rounds} rounds of {a.tasks} "
            f"tasks; {result['kv_last_sequence']} KV writes in all; runs {result['runs']})"
        )
