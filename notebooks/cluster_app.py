"""The 'production' side of notebooks/live-partitions.ipynb, run with
``jsworker serve cluster_app:make_worker --app-dir notebooks``: a worker serving
``resize`` with 8 elastic partitions. Its output names the worker that ran the task."""

from __future__ import annotations

import asyncio

from nats.aio.client import Client as NATS

import jsworker


def make_worker(nc: NATS) -> jsworker.Worker:
    worker = jsworker.Worker(nc, partitions=8, heartbeat_interval=1.0, ack_wait=5.0)

    @worker.handle("resize")
    async def resize(ctx: jsworker.TaskContext) -> object:
        await asyncio.sleep(0.01)
        return {"by": "serve", "worker": worker.worker_id, "size": ctx.json()["size"]}

    return worker
