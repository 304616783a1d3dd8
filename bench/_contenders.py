"""jsworker and raw nats-py contenders for bench/suite.py (same CLI as bench/peers/*).

    python _contenders.py jsworker|raw URL produce N ID [PAYLOAD_BYTES]
    python _contenders.py jsworker|raw URL rate RATE SECS ID
    python _contenders.py jsworker|raw URL consume CONC ID [PARTITIONS]

Task type ``{kind}{ID}``; both consume from TASK_QUEUES and, per task, JetStream-publish
one completion event to ``history.{run_id}`` awaiting the PubAck, then ack (jsworker does
this itself; raw does it by hand, batch by batch, concurrently within a batch).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time

import nats
import nats.errors
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig

import jsworker

KIND, URL, MODE, ARG = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
ID = sys.argv[6] if MODE == "rate" else sys.argv[5]
TTYPE = f"{KIND}{ID}"


async def produce() -> None:
    nc = await nats.connect(URL)
    client = jsworker.Client(nc)
    if MODE == "produce":
        n = int(ARG)
        size = int(sys.argv[6]) if len(sys.argv) > 6 else 0
        pad = "x" * max(0, size - 60)
        for start in range(0, n, 1000):
            await client.submit_many(
                [
                    jsworker.TaskRequest(TTYPE, {"pad": pad} if pad else None, run_id=f"{ID}-{i}")
                    for i in range(start, min(n, start + 1000))
                ]
            )
    else:
        rate, secs = float(ARG), float(sys.argv[5])
        t0 = time.monotonic()
        for i in range(int(rate * secs)):
            await client.submit(TTYPE, {"t": time.time()}, run_id=f"{ID}-{i}")
            delay = t0 + (i + 1) / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
    await nc.close()


async def consume_jsworker(conc: int, partitions: int) -> None:
    nc = await nats.connect(URL)
    w = jsworker.Worker(nc, concurrency=conc, partitions=partitions)

    @w.handle(TTYPE)
    async def noop(ctx: jsworker.TaskContext) -> object:
        data = ctx.json()
        return {"t": data["t"]} if isinstance(data, dict) and "t" in data else None

    print("READY", os.getpid(), flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    await w.start()
    await asyncio.Event().wait()


async def consume_raw(conc: int) -> None:
    nc = await nats.connect(URL)
    js = nc.jetstream()
    print("READY", os.getpid(), flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    psub = await js.pull_subscribe(
        f"task.{TTYPE}.>",
        durable=TTYPE,
        stream="TASK_QUEUES",
        config=ConsumerConfig(ack_policy=AckPolicy.EXPLICIT, max_ack_pending=-1),
    )

    async def one(m: Msg) -> None:
        task = json.loads(m.data)
        inp = task.get("input") or {}
        ev = json.dumps(
            {
                "type": "step.completed",
                "run_id": task["run_id"],
                "step_id": task["step_id"],
                "payload": {"output": {"t": inp["t"]} if "t" in inp else None},
            }
        ).encode()
        await js.publish(
            f"history.{task['run_id']}",
            ev,
            headers={"Nats-Msg-Id": f"{task['run_id']}.{task['step_id']}.c"},
        )
        await m.ack()

    while True:
        try:
            msgs = await psub.fetch(conc, timeout=1.0)
        except nats.errors.TimeoutError:
            continue
        await asyncio.gather(*(one(m) for m in msgs))


if __name__ == "__main__":
    if MODE in ("produce", "rate"):
        asyncio.run(produce())
    elif KIND == "jsworker":
        asyncio.run(consume_jsworker(int(ARG), int(sys.argv[6]) if len(sys.argv) > 6 else 0))
    else:
        asyncio.run(consume_raw(int(ARG)))
