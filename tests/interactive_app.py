"""``jsworker serve interactive_app:make_worker`` for the interactive-mode acceptance test.

Serves ``$JSW_ACC_TYPE`` with 8 elastic partitions and appends one JSON line per
execution to ``$JSW_ACC_LOG``: {"k": key, "i": index, "w": worker id, "v": "serve",
"t0": start, "t1": end} (the same shape as the notebook's handler writes).
"""

from __future__ import annotations

import asyncio
import json
import os
import time

from nats.aio.client import Client as NATS

import jsworker


def make_worker(nc: NATS) -> jsworker.Worker:
    task_type = os.environ["JSW_ACC_TYPE"]
    log = open(os.environ["JSW_ACC_LOG"], "a", buffering=1)
    work = float(os.environ.get("JSW_ACC_WORK", "0.002"))
    worker = jsworker.Worker(
        nc, partitions=8, heartbeat_interval=1.0, ack_wait=5.0, grace_period=10
    )

    @worker.handle(task_type)
    async def run(ctx: jsworker.TaskContext) -> object:
        t0 = time.time()
        await asyncio.sleep(work)
        data = ctx.json()
        line = {"k": data["k"], "i": data["i"], "w": worker.worker_id, "v": "serve"}
        log.write(json.dumps({**line, "t0": t0, "t1": time.time()}) + "\n")
        return {"v": "serve", "w": worker.worker_id}

    return worker
