"""Submit throughput: ``jsworker.Client.submit_many`` vs raw nats-py ``publish_async``.

    python bench/submit.py [--tasks 20000] [--rounds 5] [--loop asyncio|uvloop] [--json]

One embedded server; per round, each contender publishes N tasks of a fresh type on its
own connection (alternating order, flipped every round), and the clock runs from the
first publish to the last PubAck:

* **jsworker**: ``Client.submit_many`` (validation, task id, trace context, the body
  encoded with orjson, pipelined publishes, ``window=1024``);
* **raw**: the strongest hand-written loop: build the same body with ``json.dumps``,
  ``js.publish_async`` every task (nats-py's shared reply inbox, at most 4,000
  outstanding), then ``gather`` the PubAcks.

Reported: every run, the median tasks/s of each and the ratio jsworker / raw.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import statistics
import sys
import time
from typing import Any

import nats
from nats.aio.client import Client as NATS

import jsworker


async def submit_jsworker(nc: NATS, task_type: str, n: int) -> float:
    # the no-worker check runs (nobody serves the bench's types); only its warning is off
    client = jsworker.Client(nc, warn_no_worker=False)
    reqs = [jsworker.TaskRequest(task_type, {"i": i}) for i in range(n)]
    t0 = time.perf_counter()
    handles = await client.submit_many(reqs, window=1024)
    elapsed = time.perf_counter() - t0
    if len(handles) != n or any(h.duplicate for h in handles):
        raise RuntimeError("jsworker: not every task was stored once")
    return elapsed


async def submit_raw(nc: NATS, task_type: str, n: int) -> float:
    js = nc.jetstream()
    t0 = time.perf_counter()
    futs = []
    for i in range(n):
        run_id = f"run-{secrets.token_hex(8)}"
        body = json.dumps(
            {
                "task_id": f"task-{secrets.token_hex(8)}",
                "run_id": run_id,
                "step_id": task_type,
                "iteration": 0,
                "attempt": 1,
                "input": {"i": i},
                "metadata": {},
                "traceparent": "",
                "tracestate": "",
            },
            separators=(",", ":"),
        ).encode()
        futs.append(
            await js.publish_async(
                f"task.{task_type}.{run_id}",
                body,
                headers={"Nats-Msg-Id": f"{run_id}.{task_type}.0"},
            )
        )
    acks = await asyncio.gather(*futs)
    elapsed = time.perf_counter() - t0
    if len(acks) != n or any(a.duplicate for a in acks):
        raise RuntimeError("raw: not every task was stored once")
    return elapsed


CONTENDERS = {"jsworker": submit_jsworker, "raw": submit_raw}


async def compare(url: str, n: int, rounds: int) -> dict[str, Any]:
    """Both contenders, ``rounds`` times, alternating; runs in tasks/s, medians, ratio."""
    runs: dict[str, list[float]] = {k: [] for k in CONTENDERS}
    admin = await nats.connect(url)
    try:
        for rnd in range(-1, rounds):  # round -1: warm-up, not reported
            order = list(CONTENDERS) if rnd % 2 == 0 else list(CONTENDERS)[::-1]
            for name in order:
                task_type = f"submit-{name}-{secrets.token_hex(3)}"
                nc = await nats.connect(url)
                try:
                    elapsed = await CONTENDERS[name](nc, task_type, n if rnd >= 0 else 500)
                finally:
                    await nc.close()
                await admin.jetstream().purge_stream("TASK_QUEUES", subject=f"task.{task_type}.>")
                if rnd >= 0:
                    runs[name].append(round(n / elapsed, 1))
    finally:
        await admin.close()
    med = {k: statistics.median(v) for k, v in runs.items()}
    return {
        "tasks": n,
        "runs": runs,
        "median_tasks_per_s": med,
        "ratio": round(med["jsworker"] / med["raw"], 3),
    }


async def main(args: argparse.Namespace) -> dict[str, Any]:
    async with jsworker.EmbeddedServer() as srv:
        nc = await nats.connect(srv.url)
        await jsworker.setup_all(nc)
        await nc.close()
        return await compare(srv.url, args.tasks, args.rounds)


def cli() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", type=int, default=20_000)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    if args.loop == "uvloop":
        import uvloop

        r = uvloop.run(main(args))
    else:
        r = asyncio.run(main(args))
    if args.json:
        print(json.dumps(r, indent=2))
        return
    for name, runs in r["runs"].items():
        print(
            f"{name:9s} {' / '.join(f'{x:.0f}' for x in runs)}  "
            f"median {r['median_tasks_per_s'][name]:.0f} tasks/s",
            file=sys.stderr,
        )
    print(f"ratio jsworker/raw = {r['ratio']}")


if __name__ == "__main__":
    cli()
