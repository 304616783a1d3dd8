"""A worker process for partition tests: ``python partition_worker.py TYPE PARTITIONS LOG``.

Handles ``TYPE`` with ``partitions=PARTITIONS`` (0 = singleton) and appends one JSON
line per execution to LOG: {"k": key, "i": index, "w": worker id, "t0": start, "t1": end}.
Prints ``READY <worker id>`` once started; SIGTERM stops it gracefully. With
``JSW_TEST_DEFAULTS=1`` the worker keeps the default heartbeat and lease (30 s each).
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
    work = float(os.environ.get("JSW_TEST_WORK", "0.002"))
    nc = await nats.connect(os.environ["NATS_URL"])
    fast = (
        {} if os.environ.get("JSW_TEST_DEFAULTS") else {"heartbeat_interval": 1.0, "ack_wait": 2.0}
    )
    worker = jsworker.Worker(nc, partitions=max(partitions, 0), grace_period=5, **fast)

    async def handler(ctx: jsworker.TaskContext) -> object:
        t0 = time.time()
        await asyncio.sleep(work)
        data = ctx.json()
        log.write(
            json.dumps(
                {"k": data["k"], "i": data["i"], "w": worker.worker_id, "t0": t0, "t1": time.time()}
            )
            + "\n"
        )
        return None

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
    with open(sys.argv[3], "a", buffering=1) as log_file:
        asyncio.run(main(log_file))
