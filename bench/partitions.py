"""Partition benchmarks: rebalance time, singleton failover, partitioned throughput.

    python bench/partitions.py [--rounds 10] [--tasks 10000] [--json]

One embedded nats-server; worker processes from ``bench/_pworker.py`` (heartbeat 1 s, so
the liveness interval after which a silent member is removed is 3 s).

* **rebalance**: 2 workers, 8 partitions, ~100 tasks/s over 64 keys. One worker is
  stopped (SIGTERM, clean) or killed (SIGKILL); the time is from the signal until every
  partition it held has a task completed by the other worker. Median of ``--rounds``.
* **singleton failover**: 3 workers on a singleton handler; the active one is killed;
  time until another worker completes a task. Median of ``--rounds``.
* **throughput**: ``--tasks`` pre-published no-op tasks drained by 2 worker processes,
  8 partitions vs unpartitioned (one shared consumer).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import nats
from nats.aio.client import Client as NATS

import jsworker

HERE = Path(__file__).parent
KEYS = [f"k{i}" for i in range(64)]


def fnv1a(data: bytes) -> int:
    """The hash behind ``{{Partition(n,...)}}`` (nats-server: FNV-1a 32 bit)."""
    h = 2166136261
    for c in data:
        h = ((h ^ c) * 16777619) & 0xFFFFFFFF
    return h


def partition_of(key: str, n: int) -> int:
    return fnv1a(key.encode()) % n


async def spawn(ttype: str, partitions: int, log: Path, url: str) -> tuple[Any, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(HERE / "_pworker.py"),
        ttype,
        str(partitions),
        str(log),
        env={**os.environ, "NATS_URL": url},
        stdout=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None
    line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode().split()
    return proc, line[1]


def read(log: Path) -> list[dict[str, Any]]:
    if not log.exists():
        return []
    return [json.loads(x) for x in log.read_text().splitlines() if x.strip()]


async def producer(nc: NATS, ttype: str, stop: asyncio.Event, rate: float = 100) -> None:
    client = jsworker.Client(nc)
    i = 0
    while not stop.is_set():
        k = KEYS[i % len(KEYS)]
        await client.submit(ttype, {"k": k, "log": True}, key=k)
        i += 1
        await asyncio.sleep(1 / rate)


async def wait_for(pred: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        await asyncio.sleep(0.02)
    return False


async def rebalance_once(nc: NATS, url: str, mode: str, tmp: Path) -> float:
    ttype = f"rb-{secrets.token_hex(4)}"
    log = tmp / f"{ttype}.jsonl"
    a, wa = await spawn(ttype, 8, log, url)
    b, wb = await spawn(ttype, 8, log, url)
    stop = asyncio.Event()
    prod = asyncio.create_task(producer(nc, ttype, stop))
    try:

        def steady() -> bool:
            seen = {(e["w"], partition_of(e["k"], 8)) for e in read(log)}
            return (
                {p for w, p in seen if w == wa} | {p for w, p in seen if w == wb} == set(range(8))
                and any(w == wa for w, _ in seen)
                and any(w == wb for w, _ in seen)
            )

        if not await wait_for(steady, 30):
            raise RuntimeError("workers never reached a steady state")
        held = {partition_of(e["k"], 8) for e in read(log)[-200:] if e["w"] == wa}
        t0 = time.time()
        a.send_signal(signal.SIGKILL if mode == "kill" else signal.SIGTERM)

        def taken_over() -> bool:
            got = {partition_of(e["k"], 8) for e in read(log) if e["w"] == wb and e["t1"] > t0}
            return held <= got

        if not await wait_for(taken_over, 60):
            raise RuntimeError("partitions were not taken over within 60 s")
        firsts = {}
        for e in read(log):
            p = partition_of(e["k"], 8)
            if e["w"] == wb and e["t1"] > t0 and p in held:
                firsts.setdefault(p, e["t1"])
        return max(firsts.values()) - t0
    finally:
        stop.set()
        await prod
        for p in (a, b):
            if p.returncode is None:
                p.send_signal(signal.SIGTERM)
        await asyncio.gather(a.wait(), b.wait())


async def failover_once(nc: NATS, url: str, tmp: Path) -> float:
    ttype = f"sg-{secrets.token_hex(4)}"
    log = tmp / f"{ttype}.jsonl"
    procs = dict([(w, p) for p, w in [await spawn(ttype, 0, log, url) for _ in range(3)]])
    stop = asyncio.Event()
    prod = asyncio.create_task(producer(nc, ttype, stop))
    try:
        if not await wait_for(lambda: len(read(log)) >= 20, 30):
            raise RuntimeError("singleton never ran")
        active = read(log)[-1]["w"]
        t0 = time.time()
        procs[active].send_signal(signal.SIGKILL)
        if not await wait_for(
            lambda: any(e["w"] != active and e["t1"] > t0 for e in read(log)), 60
        ):
            raise RuntimeError("no failover within 60 s")
        return min(e["t1"] for e in read(log) if e["w"] != active and e["t1"] > t0) - t0
    finally:
        stop.set()
        await prod
        for p in procs.values():
            if p.returncode is None:
                p.send_signal(signal.SIGTERM)
        await asyncio.gather(*(p.wait() for p in procs.values()))


async def throughput_once(nc: NATS, url: str, partitions: int, n: int, tmp: Path) -> float:
    ttype = f"tp-{secrets.token_hex(4)}"
    log = tmp / f"{ttype}.jsonl"
    client = jsworker.Client(nc)
    await client.submit_many([jsworker.TaskRequest(ttype, {"k": f"r{i}"}) for i in range(n)])
    js = nc.jetstream()
    t0 = time.perf_counter()
    procs = [await spawn(ttype, partitions, log, url) for _ in range(2)]
    try:
        stream = f"TASK_QUEUES-{ttype}" if partitions > 0 else "TASK_QUEUES"
        while True:
            await asyncio.sleep(0.05)
            if partitions > 0:
                si = await js.stream_info(stream)
                origin = await js.stream_info("TASK_QUEUES", subjects_filter=f"task.{ttype}.>")
                if si.state.messages == 0 and not origin.state.subjects:
                    break
            else:
                ci = await js.consumer_info("TASK_QUEUES", ttype)
                if ci.num_pending == 0 and ci.num_ack_pending == 0:
                    break
        return n / (time.perf_counter() - t0)
    finally:
        for p, _ in procs:
            p.send_signal(signal.SIGTERM)
        await asyncio.gather(*(p.wait() for p, _ in procs))


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--tasks", type=int, default=10_000)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as td:
        tmp = Path(td)
        async with jsworker.EmbeddedServer() as srv:
            nc = await nats.connect(srv.url)
            await jsworker.setup_all(nc)
            for mode in ("stop", "kill"):
                times = [await rebalance_once(nc, srv.url, mode, tmp) for _ in range(args.rounds)]
                out[f"rebalance_{mode}_s"] = {
                    "median": statistics.median(times),
                    "max": max(times),
                    "runs": times,
                }
            times = [await failover_once(nc, srv.url, tmp) for _ in range(args.rounds)]
            out["singleton_failover_s"] = {
                "median": statistics.median(times),
                "max": max(times),
                "runs": times,
            }
            unp = await throughput_once(nc, srv.url, -1, args.tasks, tmp)
            part = await throughput_once(nc, srv.url, 8, args.tasks, tmp)
            out["throughput_tasks_per_s"] = {
                "unpartitioned_2_procs": unp,
                "partitions_8_2_procs": part,
                "ratio": part / unp,
            }
            await nc.close()
    out["liveness_interval_s"] = 3.0
    if args.json:
        print(json.dumps(out, indent=2))
        return
    for k, v in out.items():
        if isinstance(v, dict) and "median" in v:
            print(f"{k:26} median {v['median']:.3f}  max {v['max']:.3f}  (n={len(v['runs'])})")
        elif isinstance(v, dict):
            print(
                f"{k:26} "
                + "  ".join(
                    f"{a}={b:.1f}" if isinstance(b, float) else f"{a}={b}" for a, b in v.items()
                )
            )
        else:
            print(f"{k:26} {v}")


if __name__ == "__main__":
    asyncio.run(main())
