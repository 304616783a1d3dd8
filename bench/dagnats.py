"""DagNats mode drain: jsworker vs DagNats's own Go worker, and DagNats mode vs standalone.

    python bench/dagnats.py [--tasks N] [--rounds R] [--json]

One embedded ``nats-server``, streams made by the real ``dagnats-engine`` (started once,
then stopped, so it does not consume the history while the workers drain: this measures
the workers, not the engine). For each round and contender (order rotated every round),
N no-op steps of a fresh task type are pre-published as the engine dispatches them
(``task.{type}.{run}``, the engine's ``protocol.TaskPayload`` body and
``Nats-Msg-Id: {run}.{step}.queued``); the clock starts, the contender starts and drains
them; it stops when the shared consumer ``workers-{type}`` has nothing pending and nothing
unacknowledged (every worker acks after its ``step.completed``'s PubAck).

* **go**: DagNats's Go worker (``tests/dagnats_peer``: ``worker.NewWorker`` +
  ``Handle``), one process. Its ``Consume`` callback runs one task at a time.
* **jsworker-c1**: ``Worker(nc, engine="dagnats", concurrency=1)``: like for like.
* **jsworker**: ``Worker(nc, engine="dagnats")`` with its default concurrency (64).
* **standalone**: ``Worker(nc, engine="standalone")`` on the same number of tasks
  submitted by ``jsworker.Client.submit_many`` (jsworker's own contract).

Needs the DagNats binaries (``dagnats-engine``; ``$DAGNATS_BIN`` or ``$PATH``) and the
Go peer (built here with ``go build``; ``$DAGNATS_SRC`` points it at a DagNats checkout).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import statistics
import subprocess
import sys
import time
from pathlib import Path

import nats
import nats.js.errors
from nats.aio.client import Client as NATS

import jsworker

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from dagnats_env import Engine, peer_bin, require_bins  # noqa: E402


class Skip(Exception):
    pass


async def publish_engine_tasks(nc: NATS, task_type: str, n: int) -> None:
    js = nc.jetstream()
    acks = []
    for _ in range(n):
        run = secrets.token_hex(16)
        body = {
            "task_id": f"{run}.s",
            "run_id": run,
            "step_id": "s",
            "input": {"x": 1},
            "dispatch_nonce": secrets.token_hex(16),
            "workflow_name": "bench",
        }
        acks.append(
            js.publish(
                f"task.{task_type}.{run}",
                json.dumps(body).encode(),
                headers={"Nats-Msg-Id": f"{run}.s.queued"},
            )
        )
        if len(acks) >= 512:
            await asyncio.gather(*acks)
            acks = []
    await asyncio.gather(*acks)


async def drained(nc: NATS, consumer: str) -> None:
    js = nc.jetstream()
    while True:
        try:
            ci = await js.consumer_info("TASK_QUEUES", consumer)
            if ci.num_pending == 0 and ci.num_ack_pending == 0 and ci.delivered.stream_seq:
                return
        except nats.js.errors.NotFoundError:
            pass
        await asyncio.sleep(0.01)


async def run_go(nc: NATS, url: str, task_type: str, n: int) -> float:
    await publish_engine_tasks(nc, task_type, n)
    t0 = time.perf_counter()
    proc = subprocess.Popen(  # noqa: ASYNC220 - started inside the clock on purpose
        [peer_bin(), "-url", url, "-type", task_type, "-quiet"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        await drained(nc, f"workers-{task_type}")
        return time.perf_counter() - t0
    finally:
        proc.terminate()
        proc.wait()


async def run_jsworker(nc: NATS, task_type: str, n: int, engine: str, concurrency: int) -> float:
    if engine == "dagnats":
        await publish_engine_tasks(nc, task_type, n)
        consumer = f"workers-{task_type}"
    else:
        reqs = [jsworker.TaskRequest(task_type, {"x": 1}) for _ in range(n)]
        await jsworker.Client(nc).submit_many(reqs)
        consumer = task_type
    worker = jsworker.Worker(nc, engine=engine, concurrency=concurrency)

    @worker.handle(task_type)
    async def noop(ctx: jsworker.TaskContext) -> None:
        return None

    t0 = time.perf_counter()
    async with worker:
        await drained(nc, consumer)
        return time.perf_counter() - t0


async def main(tasks: int, rounds: int, as_json: bool) -> None:
    try:
        engine_bin, cli_bin = require_bins()
        peer_bin()
    except BaseException as e:  # pytest.skip raises an outcome exception
        print(f"bench/dagnats.py: {e}", file=sys.stderr)
        sys.exit(2)
    async with jsworker.EmbeddedServer() as srv:
        eng = Engine(srv.url, engine_bin, cli_bin)
        eng.start()  # its SetupAll makes the streams and buckets
        eng.stop()
        nc = await nats.connect(srv.url)
        await jsworker.setup_all(nc)  # jsworker's own (standalone) needs; changes nothing
        names = ["go", "jsworker-c1", "jsworker", "standalone"]
        times: dict[str, list[float]] = {k: [] for k in names}
        for r in range(rounds):
            order = names[r % len(names) :] + names[: r % len(names)]
            for name in order:
                t = f"bench-{name}-{secrets.token_hex(3)}"
                if name == "go":
                    dt = await run_go(nc, srv.url, t, tasks)
                elif name == "jsworker-c1":
                    dt = await run_jsworker(nc, t, tasks, "dagnats", 1)
                elif name == "jsworker":
                    dt = await run_jsworker(nc, t, tasks, "dagnats", 64)
                else:
                    dt = await run_jsworker(nc, t, tasks, "standalone", 64)
                times[name].append(dt)
        await nc.close()
    med = {k: statistics.median(v) for k, v in times.items()}
    rate = {k: tasks / v for k, v in med.items()}
    result = {
        "tasks": tasks,
        "rounds": rounds,
        "median_seconds": med,
        "tasks_per_second": rate,
        "ratios": {
            "jsworker-c1 / go": rate["jsworker-c1"] / rate["go"],
            "jsworker / go": rate["jsworker"] / rate["go"],
            "dagnats mode / standalone": rate["jsworker"] / rate["standalone"],
        },
        "python": sys.version.split()[0],
        "cpus": os.cpu_count(),
    }
    if as_json:
        print(json.dumps(result, indent=2))
        return
    print(f"{tasks} no-op DagNats steps, median of {rounds} rounds")
    for k in names:
        print(f"  {k:12} {med[k]:7.3f} s  {rate[k]:9.0f} tasks/s")
    for k, v in result["ratios"].items():  # type: ignore[attr-defined]
        print(f"  {k:28} {v:6.2f}x")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tasks", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    asyncio.run(main(a.tasks, a.rounds, a.json))
