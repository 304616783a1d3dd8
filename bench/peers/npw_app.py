"""nats-py-worker (PyPI ``nats-py-worker``) contender for bench/suite.py (own venv).

    python npw_app.py URL produce N ID
    python npw_app.py URL rate RATE SECS ID
    python npw_app.py URL consume CONC ID   # READY, wait for a line, consume

No completion events: the library's durable consumer fetches a batch (tuned: CONC, 256
in the suite), calls the handler with it, then acks each message. It does less wire
work than the contenders that store an outcome per task; the suite puts it next to
jsworker for that reason. Stream ``NPW_{ID}``, subject ``npw.{ID}``, durable
``npw_{ID}``. Prints ``FIRST <time>`` at the first handler call; for latency it
publishes (core NATS, not stored) ``{"t", "h"}`` per task on ``history.{run_id}``.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

import nats
from nats_worker import Worker

URL, MODE, ARG, ID = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[-1]


async def produce(items: list[dict[str, object]], rate: float | None = None) -> None:
    nc = await nats.connect(URL)
    js = nc.jetstream()
    await js.add_stream(name=f"NPW_{ID}", subjects=[f"npw.{ID}"])
    t0 = time.monotonic()
    if rate is None:
        for start in range(0, len(items), 500):
            await asyncio.gather(
                *(
                    js.publish(f"npw.{ID}", json.dumps(m).encode())
                    for m in items[start : start + 500]
                )
            )
    else:
        for i, m in enumerate(items):
            m["t"] = time.time()
            await js.publish(f"npw.{ID}", json.dumps(m).encode())
            delay = t0 + (i + 1) / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
    await nc.close()


def consume(conc: int) -> None:
    worker = Worker("npw", servers=URL)
    first: list[float] = []

    @worker.background_consumer(name=ID, subject=f"npw.{ID}", batch_size=conc)
    async def handle(batch: list[nats.aio.msg.Msg]) -> None:
        h = time.time()
        if not first:
            first.append(h)
            print("FIRST", h, flush=True)
        nc = worker.connection
        for m in batch:
            msg = json.loads(m.data)
            if "t" in msg:
                body = {"type": "step.completed", "t": msg["t"], "h": h}
                await nc.publish(f"history.{msg['run_id']}", json.dumps(body).encode())

    async def init(*, connection: nats.aio.client.Client) -> None:
        # the stream first: in the latency run the consumer starts before any producer
        await connection.jetstream().add_stream(name=f"NPW_{ID}", subjects=[f"npw.{ID}"])

    print("READY", flush=True)
    sys.stdin.readline()
    worker.start_as_app(init=init)


if __name__ == "__main__":
    if MODE == "produce":
        asyncio.run(produce([{"run_id": f"{ID}-{i}"} for i in range(int(ARG))]))
    elif MODE == "rate":
        total = int(float(ARG) * float(sys.argv[4]))
        asyncio.run(produce([{"run_id": f"{ID}-{i}"} for i in range(total)], float(ARG)))
    else:
        consume(int(ARG))
