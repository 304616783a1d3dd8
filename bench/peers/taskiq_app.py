"""taskiq + taskiq-nats contender for bench/suite.py (runs in its own virtualenv).

    python taskiq_app.py URL produce N ID      # kiq N tasks
    python taskiq_app.py URL rate RATE SECS ID # kiq at RATE/s for SECS (latency)
    python taskiq_app.py URL consume CONC ID   # print READY, wait for a line, consume

Each task does the same wire work as the other contenders: a JetStream publish of a
completion event to ``history.{run_id}`` (awaiting the PubAck), then taskiq acks.
Stream ``TQ_{ID}``, subject ``tq.{ID}``, durable ``tq_{ID}``. Tuned: pull batch 256,
``max_async_tasks=CONC``; with ``JSB_DEFAULTS=1`` the broker and receiver keep taskiq's
and taskiq-nats' defaults. Prints ``FIRST <time>`` at the first handler call.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time

from taskiq.receiver import Receiver
from taskiq_nats import PullBasedJetStreamBroker

URL, MODE, ARG, ID = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[-1]
DEFAULTS = os.environ.get("JSB_DEFAULTS") == "1"
tuning = {} if DEFAULTS else {"pull_consume_batch": 256, "pull_consume_timeout": 1.0}
broker = PullBasedJetStreamBroker(
    URL, subject=f"tq.{ID}", stream_name=f"TQ_{ID}", durable=f"tq_{ID}", **tuning
)
_first: list[float] = []


@broker.task(task_name="noop")
async def noop(run_id: str, t: float = 0.0) -> None:
    h = time.time()
    if not _first:
        _first.append(h)
        print("FIRST", h, flush=True)
    body = json.dumps({"type": "step.completed", "run_id": run_id, "t": t, "h": h}).encode()
    await broker.js.publish(f"history.{run_id}", body, headers={"Nats-Msg-Id": f"{run_id}.c"})


async def main() -> None:
    await broker.startup()
    try:
        if MODE == "produce":
            n = int(ARG)
            for start in range(0, n, 500):
                await asyncio.gather(
                    *(noop.kiq(f"{ID}-{i}") for i in range(start, min(n, start + 500)))
                )
        elif MODE == "rate":
            rate, secs = float(ARG), float(sys.argv[4])
            total = int(rate * secs)
            t0 = time.monotonic()
            for i in range(total):
                await noop.kiq(f"{ID}-{i}", time.time())
                delay = t0 + (i + 1) / rate - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
        else:
            print("READY", flush=True)
            await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
            if DEFAULTS:
                receiver = Receiver(broker, run_startup=False)
            else:
                receiver = Receiver(broker, max_async_tasks=int(ARG), run_startup=False)
            await receiver.listen(asyncio.Event())
    finally:
        await broker.shutdown()


if __name__ == "__main__":
    asyncio.run(main())
