"""Worker process for bench/partitions.py: ``_pworker.py TYPE PARTITIONS LOG [HB]``.

PARTITIONS 0 = singleton, -1 = unpartitioned. Appends ``{"k", "w", "t1"}`` per task to
LOG; prints ``READY <worker id>``; SIGTERM stops gracefully.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from typing import TextIO

import nats

import jsworker


async def main(log: TextIO) -> None:
    task_type, partitions = sys.argv[1], int(sys.argv[2])
    hb = float(sys.argv[4]) if len(sys.argv) > 4 else 1.0
    nc = await nats.connect(os.environ["NATS_URL"])
    worker = jsworker.Worker(
        nc, partitions=max(partitions, 0), heartbeat_interval=hb, ack_wait=2.0, concurrency=128
    )

    async def handler(ctx: jsworker.TaskContext) -> None:
        data = ctx.json()
        if data and data.get("log"):
            log.write(json.dumps({"k": data["k"], "w": worker.worker_id, "t1": time.time()}) + "\n")

    if partitions == 0:
        worker.handle_singleton(task_type, handler)
    else:
        worker.handle(task_type, handler)
    await worker.start()
    print("READY", worker.worker_id, flush=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await worker.stop()
    await nc.close()


if __name__ == "__main__":
    with open(sys.argv[3], "a", buffering=1) as f:
        asyncio.run(main(f))
