"""FastStream (NATS JetStream pull subscriber) contender for bench/suite.py (own venv).

    python faststream_app.py URL produce N ID
    python faststream_app.py URL rate RATE SECS ID
    python faststream_app.py URL consume CONC ID   # READY, wait for a line, consume

Handler: a JetStream publish of a completion event to ``history.{run_id}`` (awaiting the
PubAck); FastStream acks after the handler. Stream ``FS_{ID}``, subject ``fs.{ID}``.
Tuned: ``PullSub(batch_size=256, timeout=1.0)``, ``max_workers=CONC``; with
``JSB_DEFAULTS=1`` a plain ``PullSub()`` and FastStream's default workers. Prints
``FIRST <time>`` at the first handler call.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time

import nats
from faststream.nats import JStream, NatsBroker, PullSub

URL, MODE, ARG, ID = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[-1]
stream = JStream(f"FS_{ID}", subjects=[f"fs.{ID}"])


async def produce(items: list[dict[str, object]], rate: float | None = None) -> None:
    nc = await nats.connect(URL)
    js = nc.jetstream()
    await js.add_stream(name=f"FS_{ID}", subjects=[f"fs.{ID}"])
    t0 = time.monotonic()
    if rate is None:
        for start in range(0, len(items), 500):
            await asyncio.gather(
                *(
                    js.publish(f"fs.{ID}", json.dumps(m).encode())
                    for m in items[start : start + 500]
                )
            )
    else:
        for i, m in enumerate(items):
            m["t"] = time.time()
            await js.publish(f"fs.{ID}", json.dumps(m).encode())
            delay = t0 + (i + 1) / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
    await nc.close()


async def consume(conc: int) -> None:
    broker = NatsBroker(URL)
    pub_nc = await nats.connect(URL)
    pub_js = pub_nc.jetstream()
    first: list[float] = []
    if os.environ.get("JSB_DEFAULTS") == "1":
        tuning: dict[str, object] = {"pull_sub": PullSub()}
    else:
        tuning = {"pull_sub": PullSub(batch_size=256, timeout=1.0), "max_workers": conc}

    @broker.subscriber(f"fs.{ID}", stream=stream, durable=f"fs_{ID}", **tuning)
    async def handle(msg: dict[str, object]) -> None:
        h = time.time()
        if not first:
            first.append(h)
            print("FIRST", h, flush=True)
        run_id = str(msg["run_id"])
        body = json.dumps(
            {"type": "step.completed", "run_id": run_id, "t": msg.get("t", 0.0), "h": h}
        ).encode()
        await pub_js.publish(f"history.{run_id}", body, headers={"Nats-Msg-Id": f"{run_id}.c"})

    print("READY", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    await broker.start()
    await asyncio.Event().wait()


if __name__ == "__main__":
    if MODE == "produce":
        asyncio.run(produce([{"run_id": f"{ID}-{i}"} for i in range(int(ARG))]))
    elif MODE == "rate":
        total = int(float(ARG) * float(sys.argv[4]))
        asyncio.run(produce([{"run_id": f"{ID}-{i}"} for i in range(total)], float(ARG)))
    else:
        asyncio.run(consume(int(ARG)))
