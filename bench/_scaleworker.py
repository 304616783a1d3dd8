"""Worker process for ``bench/partitions.py --members N``: ``_scaleworker.py TYPE LOG STATS``.

Default settings (30 s heartbeat and lease) except a small credit pool (4), so dozens
fit on one machine. Imports and connects, prints ``LOADED``, then waits for a line on
stdin so that all members start at once; prints ``READY <worker id>`` once started.
Appends ``{"k", "w", "t0", "t1"}`` per task to LOG and writes its compare-and-swap
counters to ``STATS/<worker id>.json`` every second and on exit. SIGTERM stops it
gracefully; it also dies with its parent (PR_SET_PDEATHSIG), so a killed benchmark
leaves no process behind.
"""

from __future__ import annotations

import asyncio
import ctypes
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, TextIO

import nats

import jsworker

WORK = 0.01


def die_with_parent() -> None:
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if os.getppid() == 1:  # the parent died before prctl
            os._exit(1)


def counters(worker: jsworker.Worker) -> dict[str, Any]:
    # private, for the benchmark only: the elastic members of this worker's runtimes
    members = [m for rt in worker._runtimes.values() for m in getattr(rt, "members", [])]
    return {
        "w": worker.worker_id,
        "cas_writes": sum(m.cas.writes for m in members),
        "cas_conflicts": sum(m.cas.conflicts for m in members),
        "rebalances": sum(m.rebalances for m in members),
    }


def dump(worker: jsworker.Worker, stats: Path) -> None:
    tmp = stats / f".{worker.worker_id}.tmp"
    tmp.write_text(json.dumps(counters(worker)))
    tmp.replace(stats / f"{worker.worker_id}.json")


async def main(log: TextIO) -> None:
    task_type, stats = sys.argv[1], Path(sys.argv[3])
    nc = await nats.connect(os.environ["NATS_URL"])
    worker = jsworker.Worker(nc, partitions=256, concurrency=4, grace_period=5)

    async def handler(ctx: jsworker.TaskContext) -> None:
        t0 = time.time()
        await asyncio.sleep(WORK)
        log.write(
            json.dumps({"k": ctx.json()["k"], "w": worker.worker_id, "t0": t0, "t1": time.time()})
            + "\n"
        )

    worker.handle(task_type, handler)
    print("LOADED", flush=True)
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.readline)
    await worker.start()
    print("READY", worker.worker_id, flush=True)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    while not stop.is_set():
        dump(worker, stats)
        try:
            await asyncio.wait_for(stop.wait(), 1.0)
        except TimeoutError:
            pass
    await worker.stop()
    dump(worker, stats)
    await nc.close()


if __name__ == "__main__":
    die_with_parent()
    with open(sys.argv[2], "a", buffering=1) as f:
        asyncio.run(main(f))
