"""jsworker and raw nats-py contenders for bench/suite.py (same CLI as bench/peers/*).

    python _contenders.py jsworker|raw|raw-naive URL produce N ID [PAYLOAD_BYTES]
    python _contenders.py jsworker|raw|raw-naive URL rate RATE SECS ID
    python _contenders.py jsworker|raw|raw-naive URL consume CONC ID [PARTITIONS]

With PARTITIONS, jsworker and raw consume through the orbit.go elastic layout (see
``_raw_member``); the suite tells each process its member index in ``JSB_MEMBER=i/n``.
``JSB_KEYS=K`` makes the producer give the tasks K distinct partition keys (default: each
task its own, the run id).

Task type ``{kind}{ID}``; all consume from TASK_QUEUES and, per task, store one
completion event on ``history.{run_id}`` (JetStream, PubAck received) before the ack:

* jsworker does this itself (``JSB_LOOP=uvloop`` runs it on uvloop);
* raw is the strongest hand-written loop: fetch 256, ``publish_async`` one event per
  message (PubAcks on one shared inbox), gather the batch's PubAcks, then ack each;
* raw-naive awaits one ``js.publish`` per message inside a gather of the batch.

A consumer prints ``READY pid``, waits for a line on stdin, and prints ``FIRST <time>``
(``time.time()``) at its first handler call: the suite times a drain from there to the
consumer's ack floor reaching the last task.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import time
from typing import Any

import nats
import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    RetentionPolicy,
    StreamConfig,
    StreamSource,
    SubjectTransform,
)

import jsworker

KIND, URL, MODE, ARG = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
ID = sys.argv[6] if MODE == "rate" else sys.argv[5]
TTYPE = f"{KIND.replace('-', '')}{ID}"
_first: list[float] = []


def first_call() -> None:
    if not _first:
        _first.append(time.time())
        print("FIRST", _first[0], flush=True)


def _key(i: int) -> str | None:
    keys = int(os.environ.get("JSB_KEYS") or 0)
    return f"k{i % keys}" if keys else None


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
                    jsworker.TaskRequest(
                        TTYPE, {"pad": pad} if pad else None, run_id=f"{ID}-{i}", key=_key(i)
                    )
                    for i in range(start, min(n, start + 1000))
                ]
            )
    else:
        rate, secs = float(ARG), float(sys.argv[5])
        t0 = time.monotonic()
        for i in range(int(rate * secs)):
            await client.submit(TTYPE, {"t": time.time()}, run_id=f"{ID}-{i}", key=_key(i))
            delay = t0 + (i + 1) / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
    await nc.close()


async def consume_jsworker(conc: int, partitions: int) -> None:
    nc = await nats.connect(URL)
    w = jsworker.Worker(nc, concurrency=conc, partitions=partitions)

    @w.handle(TTYPE)
    async def noop(ctx: jsworker.TaskContext) -> object:
        first_call()
        data = ctx.json()
        return (
            {"t": data["t"], "h": time.time()} if isinstance(data, dict) and "t" in data else None
        )

    print("READY", os.getpid(), flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    await w.start()
    await asyncio.Event().wait()


async def _raw_consumer(js: Any) -> Any:
    return await js.pull_subscribe(
        f"task.{TTYPE}.>",
        durable=TTYPE,
        stream="TASK_QUEUES",
        config=ConsumerConfig(ack_policy=AckPolicy.EXPLICIT, max_ack_pending=-1),
    )


def _event(m: Msg) -> tuple[str, bytes, dict[str, str]]:
    task = json.loads(m.data)
    inp = task.get("input") or {}
    ev = json.dumps(
        {
            "type": "step.completed",
            "run_id": task["run_id"],
            "step_id": task["step_id"],
            "payload": {"output": {"t": inp["t"], "h": time.time()} if "t" in inp else None},
        }
    ).encode()
    headers = {"Nats-Msg-Id": f"{task['run_id']}.{task['step_id']}.c"}
    return f"history.{task['run_id']}", ev, headers


async def _raw_member(js: Any, partitions: int) -> Any:
    """The orbit.go elastic layout jsworker uses, by hand: a work-queue stream
    ``TASK_QUEUES-{type}`` sourcing the type's tasks with the partition transform, and per
    process (``JSB_MEMBER=i/n`` from the suite) a consumer filtering its share of the
    partitions, as ``jsworker._pcg_config`` assigns them to members ``m0 .. m{n-1}``."""
    from jsworker._pcg_config import (
        ElasticConfig,
        PartitioningFilter,
        partition_filters,
        transform_destination,
    )

    i, n = (int(x) for x in os.environ.get("JSB_MEMBER", "0/1").split("/"))
    pf = PartitioningFilter(f"task.{TTYPE}.*", (1,))
    members = tuple(f"m{k}" for k in range(n))
    cfg = ElasticConfig(max_members=partitions, partitioning_filters=(pf,), members=members)
    stream = f"TASK_QUEUES-{TTYPE}"
    with contextlib.suppress(nats.js.errors.BadRequestError):  # the other member made it
        await js.add_stream(
            StreamConfig(
                name=stream,
                retention=RetentionPolicy.WORK_QUEUE,
                sources=[
                    StreamSource(
                        name="TASK_QUEUES",
                        subject_transforms=[
                            SubjectTransform(
                                src=pf.filter, dest=transform_destination(pf, partitions)
                            )
                        ],
                    )
                ],
                allow_direct=True,
            )
        )
    return await js.pull_subscribe(
        "",
        durable=members[i],
        stream=stream,
        config=ConsumerConfig(
            ack_policy=AckPolicy.EXPLICIT,
            max_ack_pending=-1,
            filter_subjects=partition_filters(cfg, members[i]),
        ),
    )


async def consume_raw(conc: int, partitions: int = 0) -> None:
    """fetch, publish_async every event, gather the PubAcks, ack every message."""
    nc = await nats.connect(URL)
    js = nc.jetstream()
    print("READY", os.getpid(), flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    psub = await (_raw_member(js, partitions) if partitions else _raw_consumer(js))
    while True:
        try:
            msgs = await psub.fetch(conc, timeout=1.0)
        except TimeoutError:  # nats-py raises its own or asyncio's (the builtin)
            continue
        first_call()
        acks = []
        for m in msgs:
            subject, ev, headers = _event(m)
            acks.append(await js.publish_async(subject, ev, headers=headers))
        await asyncio.gather(*acks)
        for m in msgs:
            await m.ack()


async def consume_raw_naive(conc: int) -> None:
    """fetch; per message, concurrently: js.publish (await the PubAck), then ack."""
    nc = await nats.connect(URL)
    js = nc.jetstream()
    print("READY", os.getpid(), flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    psub = await _raw_consumer(js)

    async def one(m: Msg) -> None:
        subject, ev, headers = _event(m)
        await js.publish(subject, ev, headers=headers)
        await m.ack()

    while True:
        try:
            msgs = await psub.fetch(conc, timeout=1.0)
        except TimeoutError:  # nats-py raises its own or asyncio's (the builtin)
            continue
        first_call()
        await asyncio.gather(*(one(m) for m in msgs))


def _run(coro: Any) -> None:
    if os.environ.get("JSB_LOOP") == "uvloop":
        import uvloop

        uvloop.run(coro)
    else:
        asyncio.run(coro)


if __name__ == "__main__":
    if MODE in ("produce", "rate"):
        _run(produce())
    elif KIND == "jsworker":
        _run(consume_jsworker(int(ARG), int(sys.argv[6]) if len(sys.argv) > 6 else 0))
    elif KIND == "raw-naive":
        _run(consume_raw_naive(int(ARG)))
    else:
        _run(consume_raw(int(ARG), int(sys.argv[6]) if len(sys.argv) > 6 else 0))
