"""The benchmark suite behind ``make bench``: one embedded nats-server, every contender.

    python bench/suite.py [--tasks 20000] [--rounds 3] [--skip-peers] [--quick] [--json]

Contenders, each a separate process doing the same wire work per task (pull, publish one
completion event to ``history.{run}`` with JetStream, awaiting its PubAck, ack):
jsworker, raw nats-py, taskiq + taskiq-nats, FastStream's JetStream pull subscriber.
taskiq and FastStream run in their own virtualenvs under a temp dir (pinned versions),
so nothing leaks into jsworker's environment.

Measured: drain throughput (N pre-published no-op tasks, median of ``--rounds``);
latency submit -> completion event at a fixed rate (p50/p99); jsworker scale (1, 2, 4
processes; 8 partitions on 2; payloads 64 B / 4 KiB / 64 KiB); jsworker peak RSS over
100,000 tasks (RSS after 10k vs after 100k).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nats
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

import jsworker

HERE = Path(__file__).parent
PEERS = {
    "taskiq": ("taskiq==0.13.0", "taskiq-nats==0.7.0"),
    "faststream": ("faststream[nats]==0.7.8",),
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


@dataclass
class Contender:
    name: str
    python: str
    argv: list[str]  # script + leading args

    def stream_consumer(self, cid: str) -> tuple[str, str]:
        return {
            "jsworker": ("TASK_QUEUES", f"jsworker{cid}"),
            "raw": ("TASK_QUEUES", f"raw{cid}"),
            "taskiq": (f"TQ_{cid}", f"tq_{cid}"),
            "faststream": (f"FS_{cid}", f"fs_{cid}"),
        }[self.name]


def make_venvs(root: Path, names: list[str]) -> dict[str, str]:
    out = {}
    for name in names:
        venv = root / f"venv-{name}"
        log(f"creating virtualenv for {name} ({', '.join(PEERS[name])})")
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run(
            [str(venv / "bin" / "pip"), "install", "-q", *PEERS[name]],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        out[name] = str(venv / "bin" / "python")
    return out


async def run_producer(c: Contender, url: str, args: list[str]) -> None:
    p = await asyncio.create_subprocess_exec(c.python, *c.argv, url, *args)
    if await p.wait() != 0:
        raise RuntimeError(f"{c.name} producer failed")


async def start_consumers(c: Contender, url: str, args: list[str], n: int) -> list[Any]:
    procs = []
    for _ in range(n):
        p = await asyncio.create_subprocess_exec(
            c.python,
            *c.argv,
            url,
            "consume",
            *args,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        assert p.stdout is not None
        line = await asyncio.wait_for(p.stdout.readline(), 60)
        if not line.startswith(b"READY"):
            raise RuntimeError(f"{c.name} consumer did not start: {line!r}")
        # keep reading what it prints (FastStream logs every message): a full pipe
        # would block the consumer and stall the benchmark
        _bg.add(asyncio.create_task(_discard(p.stdout)))
        procs.append(p)
    return procs


_bg: set[asyncio.Task[None]] = set()


async def _discard(stream: asyncio.StreamReader) -> None:
    while await stream.read(65536):
        pass


async def go(procs: list[Any]) -> None:
    for p in procs:
        p.stdin.write(b"go\n")
        await p.stdin.drain()


async def stop(procs: list[Any]) -> None:
    for p in procs:
        if p.returncode is None:
            p.send_signal(signal.SIGKILL)
    for p in procs:
        await p.wait()


def rss_kib(pid: int, field: str = "VmHWM") -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


async def drained(nc: NATS, c: Contender, cid: str, n: int, partitioned: bool) -> int:
    """How many of the n tasks are done (acked)."""
    js = nc.jetstream()
    if partitioned:
        try:
            si = await js.stream_info(f"TASK_QUEUES-jsworker{cid}")
            origin = await js.stream_info("TASK_QUEUES", subjects_filter=f"task.jsworker{cid}.>")
        except nats.js.errors.NotFoundError:
            return 0
        left = si.state.messages + sum((origin.state.subjects or {}).values())
        return n - left
    stream, name = c.stream_consumer(cid)
    try:
        ci = await js.consumer_info(stream, name)
    except nats.js.errors.NotFoundError:
        return 0
    return n - ci.num_pending - ci.num_ack_pending


async def drain(
    nc: NATS,
    url: str,
    c: Contender,
    n: int,
    *,
    conc: int = 256,
    procs: int = 1,
    partitions: int = 0,
    payload: int = 0,
    rss_at: int = 0,
) -> dict[str, float]:
    cid = secrets.token_hex(4)
    extra = [str(payload)] if payload else []
    await run_producer(c, url, ["produce", str(n), cid, *extra])
    cargs = [str(conc), cid] + ([str(partitions)] if partitions else [])
    ps = await start_consumers(c, url, cargs, procs)
    t0 = time.perf_counter()
    await go(ps)
    rss_mid = 0
    try:
        while True:
            await asyncio.sleep(0.05)
            done = await drained(nc, c, cid, n, partitions > 0)
            if rss_at and not rss_mid and done >= rss_at:
                rss_mid = rss_kib(ps[0].pid, "VmRSS")
            if done >= n:
                break
            if time.perf_counter() - t0 > 600:
                raise RuntimeError(f"{c.name} did not drain {n} tasks in 600 s")
        elapsed = time.perf_counter() - t0
        rss_end = rss_kib(ps[0].pid, "VmRSS")
        hwm = rss_kib(ps[0].pid)
    finally:
        await stop(ps)
    return {
        "tasks_per_s": n / elapsed,
        "seconds": elapsed,
        "rss_mid_kib": rss_mid,
        "rss_end_kib": rss_end,
        "rss_peak_kib": hwm,
    }


async def latency(nc: NATS, url: str, c: Contender, rate: float, secs: float) -> dict[str, float]:
    cid = secrets.token_hex(4)
    lat: list[float] = []
    total = int(rate * secs)

    async def on_event(msg: Msg) -> None:
        now = time.time()
        if not msg.subject.startswith(f"history.{cid}-"):
            return
        ev = json.loads(msg.data)
        if ev.get("type") != "step.completed":
            return
        t = ev.get("t") or ((ev.get("payload") or {}).get("output") or {}).get("t")
        if t:
            lat.append(now - t)

    sub = await nc.subscribe("history.>", cb=on_event)
    ps = await start_consumers(c, url, ["256", cid], 1)
    await go(ps)
    await asyncio.sleep(1.0)  # consumer set up before the first task
    try:
        await run_producer(c, url, ["rate", str(rate), str(secs), cid])
        deadline = time.monotonic() + 30
        while len(lat) < total and time.monotonic() < deadline:  # noqa: ASYNC110 - polling a list
            await asyncio.sleep(0.1)
    finally:
        await sub.unsubscribe()
        await stop(ps)
    lat.sort()
    if not lat:
        return {"p50_ms": float("nan"), "p99_ms": float("nan"), "seen": 0}
    return {
        "p50_ms": lat[len(lat) // 2] * 1000,
        "p99_ms": lat[int(len(lat) * 0.99) - 1] * 1000,
        "seen": len(lat),
        "expected": total,
    }


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tasks", type=int, default=20_000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--rate", type=float, default=1000.0)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--memory-tasks", type=int, default=100_000)
    ap.add_argument("--skip-peers", action="store_true")
    ap.add_argument("--quick", action="store_true", help="small numbers, to check it runs")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.tasks, args.rounds, args.seconds, args.memory_tasks = 2000, 1, 2.0, 5000
    results: dict[str, Any] = {
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "params": vars(args),
    }
    server_version = _server_version()
    with tempfile.TemporaryDirectory(prefix="jsworker-bench-") as td:
        peers = [] if args.skip_peers else list(PEERS)
        pythons = make_venvs(Path(td), peers)
        contenders = [
            Contender("jsworker", sys.executable, [str(HERE / "_contenders.py"), "jsworker"]),
            Contender("raw", sys.executable, [str(HERE / "_contenders.py"), "raw"]),
        ] + [Contender(p, pythons[p], [str(HERE / "peers" / f"{p}_app.py")]) for p in peers]
        async with jsworker.EmbeddedServer() as srv:
            results["machine"]["nats_server"] = server_version
            results["machine"]["nats_py"] = _version("nats-py")
            for p in peers:
                results["machine"][p] = PEERS[p][0]
            nc = await nats.connect(srv.url)
            await jsworker.setup_all(nc)
            thr: dict[str, list[float]] = {c.name: [] for c in contenders}
            for r in range(args.rounds):
                order = contenders if r % 2 == 0 else contenders[::-1]
                for c in order:
                    log(f"drain round {r + 1}: {c.name} ({args.tasks} tasks)")
                    thr[c.name].append((await drain(nc, srv.url, c, args.tasks))["tasks_per_s"])
            results["throughput"] = {k: statistics.median(v) for k, v in thr.items()}
            results["throughput_runs"] = thr
            results["latency"] = {}
            for c in contenders:
                log(f"latency: {c.name} at {args.rate:g}/s for {args.seconds:g} s")
                results["latency"][c.name] = await latency(nc, srv.url, c, args.rate, args.seconds)
            js = contenders[0]
            scale: dict[str, float] = {}
            for procs in (1, 2, 4):
                log(f"scale: jsworker x{procs}")
                scale[f"{procs}_procs"] = (await drain(nc, srv.url, js, args.tasks, procs=procs))[
                    "tasks_per_s"
                ]
            log("scale: jsworker 8 partitions x2")
            scale["8_partitions_2_procs"] = (
                await drain(nc, srv.url, js, args.tasks, procs=2, partitions=8)
            )["tasks_per_s"]
            for size in (64, 4096, 65536):
                log(f"payload: {size} B")
                scale[f"payload_{size}B"] = (
                    await drain(nc, srv.url, js, args.tasks, payload=size)
                )["tasks_per_s"]
            results["scale"] = scale
            log(f"memory: jsworker over {args.memory_tasks} tasks")
            mem = await drain(nc, srv.url, js, args.memory_tasks, rss_at=args.memory_tasks // 10)
            results["memory"] = {k: v for k, v in mem.items() if k.startswith("rss")}
            await nc.close()
    t = results["throughput"]
    results["ratios"] = {
        f"jsworker/{k}": t["jsworker"] / v for k, v in t.items() if k != "jsworker"
    }
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print_report(results)


def _server_version() -> str:
    return subprocess.run(
        [jsworker.find_nats_server(), "--version"], capture_output=True, text=True, check=False
    ).stdout.strip()


def _version(dist: str) -> str:
    from importlib.metadata import version

    return version(dist)


def print_report(r: dict[str, Any]) -> None:
    print("\n## drain throughput (tasks/s, median)")
    for k, v in r["throughput"].items():
        print(f"  {k:12} {v:10.0f}")
    for k, v in r["ratios"].items():
        print(f"  {k:22} {v:.2f}")
    print("\n## latency submit -> completion event (ms)")
    for k, v in r["latency"].items():
        print(f"  {k:12} p50 {v['p50_ms']:8.2f}  p99 {v['p99_ms']:8.2f}  ({v['seen']} events)")
    print("\n## jsworker scale (tasks/s)")
    for k, v in r["scale"].items():
        print(f"  {k:22} {v:10.0f}")
    m = r["memory"]
    print("\n## jsworker memory (KiB)")
    print(
        f"  RSS after 10%: {m['rss_mid_kib']}  after all: {m['rss_end_kib']}  "
        f"peak: {m['rss_peak_kib']}"
    )
    print("\n## machine")
    for k, v in r["machine"].items():
        print(f"  {k}: {v}")


if __name__ == "__main__":
    asyncio.run(main())
