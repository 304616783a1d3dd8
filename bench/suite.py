"""The benchmark suite behind ``make bench``: one embedded nats-server, every contender.

    python bench/suite.py [--tasks 20000] [--rounds 3] [--skip-peers] [--quick] [--json]

Contenders, each a separate process. All but nats-py-worker do the same wire work per
task (pull, store one completion event on ``history.{run}`` with JetStream, PubAck
received, then ack):

* jsworker (asyncio) and jsworker-uvloop (the same on uvloop);
* raw: the strongest hand-written nats-py loop (fetch 256, ``publish_async`` every
  event, gather the PubAcks, ack each), and raw-uvloop (the same on uvloop: what uvloop
  gives the leanest client); raw-naive: one awaited ``js.publish`` per task in a gather
  of the batch;
* taskiq + taskiq-nats and FastStream's JetStream pull subscriber, tuned (batch 256,
  concurrency 256) and with their libraries' defaults (``-defaults``);
* nats-py-worker (PyPI ``nats-py-worker``, batch 256): no completion events, only the
  ack; compare it with jsworker knowing jsworker stores two events per task.

taskiq, FastStream and nats-py-worker run in their own virtualenvs under a temp dir
(pinned versions), so nothing leaks into jsworker's environment.

Measured: drain throughput (N pre-published no-op tasks, median and spread of
``--rounds``), timed from the first handler call (the contender prints it) to the
consumer's ack floor reaching the last task with nothing pending; latency at a fixed
rate (p50/p99 submit -> handler call and submit -> completion event seen); submit
throughput (``Client.submit_many`` vs raw ``publish_async``, bench/submit.py); jsworker
scale (1, 2, 4 processes; 8 partitions on 2, jsworker and raw through the same orbit.go
layout, every task its own key and 64 keys; payloads 64 B / 4 KiB / 64 KiB); jsworker
RSS over 100,000 tasks (after 10k vs after 100k). The ratios of docs/performance.md's
targets are computed at the end.
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats
import nats.js.errors
import submit as submit_bench  # bench/submit.py: the script's directory is on sys.path
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

import jsworker

HERE = Path(__file__).parent
PEERS = {
    "taskiq": ("taskiq==0.13.0", "taskiq-nats==0.7.0"),
    "faststream": ("faststream[nats]==0.7.8",),
    "npw": ("nats-py-worker==0.0.9",),
}
POLL = 0.02


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


@dataclass
class Contender:
    name: str
    python: str
    argv: list[str]  # script + leading args
    kind: str = ""  # stream/consumer naming; default: the name
    env: dict[str, str] = field(default_factory=dict)

    def stream_consumer(self, cid: str) -> tuple[str, str]:
        return {
            "jsworker": ("TASK_QUEUES", f"jsworker{cid}"),
            "raw": ("TASK_QUEUES", f"raw{cid}"),
            "raw-naive": ("TASK_QUEUES", f"rawnaive{cid}"),
            "taskiq": (f"TQ_{cid}", f"tq_{cid}"),
            "faststream": (f"FS_{cid}", f"fs_{cid}"),
            "npw": (f"NPW_{cid}", f"npw_{cid}"),
        }[self.kind or self.name]


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


def _env(c: Contender) -> dict[str, str]:
    return {**os.environ, **c.env}


async def run_producer(
    c: Contender, url: str, args: list[str], env: dict[str, str] | None = None
) -> None:
    p = await asyncio.create_subprocess_exec(
        c.python, *c.argv, url, *args, env={**_env(c), **(env or {})}
    )
    if await p.wait() != 0:
        raise RuntimeError(f"{c.name} producer failed")


async def start_consumers(
    c: Contender, url: str, args: list[str], n: int, firsts: list[float] | None = None
) -> list[Any]:
    """Start ``n`` consumer processes (each prints READY, then waits for ``go``); the
    ``FIRST <time>`` lines they print later are appended to ``firsts``."""
    procs = []
    for i in range(n):
        p = await asyncio.create_subprocess_exec(
            c.python,
            *c.argv,
            url,
            "consume",
            *args,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            env={**_env(c), "JSB_MEMBER": f"{i}/{n}"},
        )
        assert p.stdout is not None
        line = await asyncio.wait_for(p.stdout.readline(), 60)
        if not line.startswith(b"READY"):
            raise RuntimeError(f"{c.name} consumer did not start: {line!r}")
        # keep reading what it prints (FastStream logs every message): a full pipe
        # would block the consumer and stall the benchmark
        _bg.add(asyncio.create_task(_read(p.stdout, firsts if firsts is not None else [])))
        procs.append(p)
    return procs


_bg: set[asyncio.Task[None]] = set()


async def _read(stream: asyncio.StreamReader, firsts: list[float]) -> None:
    while line := await stream.readline():
        if line.startswith(b"FIRST "):
            firsts.append(float(line.split()[1]))


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
    """From /proc; 0 when the process is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except FileNotFoundError:
        pass
    return 0


async def drained(
    nc: NATS, c: Contender, cid: str, n: int, partitioned: bool, last_seq: int
) -> int:
    """How many of the n tasks are done: acked, and (unpartitioned) only once the
    consumer's ack floor is the last task's sequence with nothing pending."""
    js = nc.jetstream()
    if partitioned:  # the tasks left in the origin and in the group's stream
        ttype = c.stream_consumer(cid)[1]
        try:
            si = await js.stream_info(f"TASK_QUEUES-{ttype}")
            origin = await js.stream_info("TASK_QUEUES", subjects_filter=f"task.{ttype}.>")
        except nats.js.errors.NotFoundError:
            return 0
        left = si.state.messages + sum((origin.state.subjects or {}).values())
        return n - left
    stream, name = c.stream_consumer(cid)
    try:
        ci = await js.consumer_info(stream, name)
    except nats.js.errors.NotFoundError:
        return 0
    done = n - ci.num_pending - ci.num_ack_pending
    if done >= n and (ci.ack_floor is None or (ci.ack_floor.stream_seq or 0) < last_seq):
        return n - 1  # everything delivered and answered, the floor not there yet
    return done


async def last_sequence(nc: NATS, c: Contender, cid: str) -> int:
    stream, _ = c.stream_consumer(cid)
    return int((await nc.jetstream().stream_info(stream)).state.last_seq)


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
    keys: int = 0,
) -> dict[str, float]:
    """Drain n pre-published tasks; timed from the first handler call (the earliest
    ``FIRST`` any process printed) to the ack floor reaching the last task."""
    cid = secrets.token_hex(4)
    extra = [str(payload)] if payload else []
    await run_producer(c, url, ["produce", str(n), cid, *extra], {"JSB_KEYS": str(keys)})
    last_seq = await last_sequence(nc, c, cid)
    cargs = [str(conc), cid] + ([str(partitions)] if partitions else [])
    firsts: list[float] = []
    ps = await start_consumers(c, url, cargs, procs, firsts)
    t_go = time.time()
    await go(ps)
    rss_mid = 0
    try:
        while True:
            await asyncio.sleep(POLL)
            done = await drained(nc, c, cid, n, partitions > 0, last_seq)
            if rss_at and not rss_mid and done >= rss_at:
                rss_mid = rss_kib(ps[0].pid, "VmRSS")
            if done >= n:
                break
            if time.time() - t_go > 600:
                raise RuntimeError(f"{c.name} did not drain {n} tasks in 600 s")
        t_end = time.time()
        for p in ps:  # a contender that died mid-drain makes the figure meaningless
            if p.returncode is not None:
                raise RuntimeError(f"{c.name}: a consumer exited ({p.returncode}) during the drain")
        rss_end = rss_kib(ps[0].pid, "VmRSS")
        hwm = rss_kib(ps[0].pid)
    finally:
        await stop(ps)
    if not firsts:
        raise RuntimeError(f"{c.name} never reported its first handler call")
    elapsed = t_end - min(firsts)
    return {
        "tasks_per_s": n / elapsed,
        "seconds": elapsed,
        "startup_seconds": min(firsts) - t_go,
        "rss_mid_kib": rss_mid,
        "rss_end_kib": rss_end,
        "rss_peak_kib": hwm,
    }


async def latency(nc: NATS, url: str, c: Contender, rate: float, secs: float) -> dict[str, float]:
    """Submit at ``rate``/s for ``secs``; per task, submit -> handler call (the handler
    puts its ``time.time()`` in the event) and submit -> completion event seen here."""
    cid = secrets.token_hex(4)
    handler: list[float] = []
    event: list[float] = []
    total = int(rate * secs)

    async def on_event(msg: Msg) -> None:
        now = time.time()
        if not msg.subject.startswith(f"history.{cid}-"):
            return
        ev = json.loads(msg.data)
        if ev.get("type") != "step.completed":
            return
        out = ev if "t" in ev else ((ev.get("payload") or {}).get("output") or {})
        t = out.get("t")
        if t:
            event.append(now - t)
            if out.get("h"):
                handler.append(out["h"] - t)

    sub = await nc.subscribe("history.>", cb=on_event)
    ps = await start_consumers(c, url, ["256", cid], 1)
    await go(ps)
    await asyncio.sleep(1.0)  # consumer set up before the first task
    try:
        await run_producer(c, url, ["rate", str(rate), str(secs), cid])
        deadline = time.monotonic() + 30
        while len(event) < total and time.monotonic() < deadline:  # noqa: ASYNC110 - polling a list
            await asyncio.sleep(0.1)
    finally:
        await sub.unsubscribe()
        await stop(ps)
    out: dict[str, float] = {"seen": len(event), "expected": total}
    for name, lat in (("handler", handler), ("event", event)):
        lat.sort()
        out[f"{name}_p50_ms"] = lat[len(lat) // 2] * 1000 if lat else float("nan")
        p99 = lat[max(0, int(len(lat) * 0.99) - 1)] if lat else float("nan")
        out[f"{name}_p99_ms"] = p99 * 1000
    return out


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tasks", type=int, default=20_000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--rate", type=float, default=1000.0)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--memory-tasks", type=int, default=100_000)
    ap.add_argument("--skip-peers", action="store_true")
    ap.add_argument("--skip-defaults", action="store_true", help="no library-default rows")
    ap.add_argument("--only", help="comma-separated sections: drain,latency,submit,scale,memory")
    ap.add_argument("--quick", action="store_true", help="small numbers, to check it runs")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.tasks, args.rounds, args.seconds, args.memory_tasks = 2000, 1, 2.0, 5000
    sections = set((args.only or "drain,latency,submit,scale,memory").split(","))
    results: dict[str, Any] = {
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "load_average_at_start": os.getloadavg(),
        },
        "params": vars(args),
    }
    server_version = _server_version()
    with tempfile.TemporaryDirectory(prefix="jsworker-bench-") as td:
        peers = [] if args.skip_peers else list(PEERS)
        pythons = make_venvs(Path(td), peers)
        own = str(HERE / "_contenders.py")
        uv = {"JSB_LOOP": "uvloop"}
        contenders = [
            Contender("jsworker", sys.executable, [own, "jsworker"]),
            Contender("jsworker-uvloop", sys.executable, [own, "jsworker"], "jsworker", uv),
            Contender("raw", sys.executable, [own, "raw"]),
            Contender("raw-uvloop", sys.executable, [own, "raw"], "raw", uv),
            Contender("raw-naive", sys.executable, [own, "raw-naive"]),
        ]
        for p in peers:
            app = [str(HERE / "peers" / f"{p}_app.py")]
            name = "nats-py-worker" if p == "npw" else p
            contenders.append(Contender(name, pythons[p], app, p))
            if p != "npw" and not args.skip_defaults:
                contenders.append(
                    Contender(f"{p}-defaults", pythons[p], app, p, {"JSB_DEFAULTS": "1"})
                )
        async with jsworker.EmbeddedServer() as srv:
            results["machine"]["nats_server"] = server_version
            results["machine"]["nats_py"] = _version("nats-py")
            results["machine"]["uvloop"] = _version("uvloop")
            for p in peers:
                results["machine"][p] = PEERS[p][0]
            nc = await nats.connect(srv.url)
            await jsworker.setup_all(nc)
            if "drain" in sections:
                thr: dict[str, list[float]] = {c.name: [] for c in contenders}
                for r in range(args.rounds):
                    # rotate and flip the order every round
                    k = r % len(contenders)
                    order = contenders[k:] + contenders[:k]
                    if r % 2:
                        order.reverse()
                    for c in order:
                        log(f"drain round {r + 1}: {c.name} ({args.tasks} tasks)")
                        d = await drain(nc, srv.url, c, args.tasks)
                        log(f"  {d['tasks_per_s']:.0f} tasks/s")
                        thr[c.name].append(round(d["tasks_per_s"], 1))
                results["throughput"] = {k: statistics.median(v) for k, v in thr.items()}
                results["throughput_runs"] = thr
            if "latency" in sections:
                results["latency"] = {}
                for c in contenders:
                    if c.name.endswith("-defaults") and c.kind == "faststream":
                        continue  # batch 1, 1 worker, pull timeout: not a latency contender
                    log(f"latency: {c.name} at {args.rate:g}/s for {args.seconds:g} s")
                    results["latency"][c.name] = await latency(
                        nc, srv.url, c, args.rate, args.seconds
                    )
            if "submit" in sections:
                log(f"submit: Client.submit_many vs raw publish_async, {args.tasks} tasks")
                results["submit"] = await submit_bench.compare(
                    srv.url, args.tasks, max(3, args.rounds)
                )
            js = contenders[0]
            if "scale" in sections:
                scale: dict[str, Any] = {}
                # jsworker and raw, each through the same layout: unpartitioned, and 8
                # partitions (orbit.go elastic: a sourced work-queue stream, one consumer
                # per process filtering its 4 partitions) with every task its own key
                # (the default: the run id) and with 64 keys; and 2 partitions, one per
                # process, so each consumer has a single filter
                raw = next(c for c in contenders if c.name == "raw")
                setups = [
                    (prefix, c, key)
                    for prefix, c in (("", js), ("raw_", raw))
                    for key in (
                        "2_procs",
                        "8_partitions_2_procs",
                        "8_partitions_2_procs_64_keys",
                        "2_partitions_2_procs",
                    )
                ]
                runs: dict[str, list[float]] = {p + k: [] for p, _, k in setups}
                for r in range(args.rounds):
                    for prefix, c, key in setups if r % 2 == 0 else setups[::-1]:
                        log(f"scale: {c.name} {key} (round {r + 1})")
                        d = await drain(
                            nc,
                            srv.url,
                            c,
                            args.tasks,
                            procs=2,
                            partitions=int(key[0]) if "partitions" in key else 0,
                            keys=64 if "keys" in key else 0,
                        )
                        log(f"  {d['tasks_per_s']:.0f} tasks/s")
                        runs[prefix + key].append(round(d["tasks_per_s"], 1))
                scale["runs"] = runs
                scale.update({k: statistics.median(v) for k, v in runs.items()})
                for procs in (1, 4):
                    log(f"scale: jsworker x{procs}")
                    scale[f"{procs}_procs"] = (
                        await drain(nc, srv.url, js, args.tasks, procs=procs)
                    )["tasks_per_s"]
                for size in (64, 4096, 65536):
                    log(f"payload: {size} B")
                    scale[f"payload_{size}B"] = (
                        await drain(nc, srv.url, js, args.tasks, payload=size)
                    )["tasks_per_s"]
                results["scale"] = scale
            if "memory" in sections:
                log(f"memory: jsworker over {args.memory_tasks} tasks")
                mem = await drain(
                    nc, srv.url, js, args.memory_tasks, rss_at=args.memory_tasks // 10
                )
                results["memory"] = {k: v for k, v in mem.items() if k.startswith("rss")}
            await nc.close()
    results["targets"] = targets(results)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print_report(results)


def targets(r: dict[str, Any]) -> dict[str, Any]:
    """The figures of issue 11's table, from this run."""
    out: dict[str, Any] = {}
    t = r.get("throughput", {})
    if "jsworker" in t:
        for k, v in t.items():
            if k != "jsworker" and v:
                out[f"drain jsworker/{k}"] = round(t["jsworker"] / v, 3)
        if t.get("jsworker-uvloop"):
            out["drain jsworker-uvloop/jsworker"] = round(t["jsworker-uvloop"] / t["jsworker"], 3)
        if t.get("raw-uvloop") and t.get("raw"):  # what uvloop gives the leanest client
            out["drain raw-uvloop/raw"] = round(t["raw-uvloop"] / t["raw"], 3)
    sc = r.get("scale", {})
    if sc.get("2_procs"):
        out["partitioned (8, 2 procs) / unpartitioned (2 procs)"] = round(
            sc["8_partitions_2_procs"] / sc["2_procs"], 3
        )
        for prefix, who in (("", "jsworker"), ("raw_", "raw")):
            base = sc.get(f"{prefix}2_procs")
            for key in (
                "8_partitions_2_procs",
                "8_partitions_2_procs_64_keys",
                "2_partitions_2_procs",
            ):
                if base and sc.get(prefix + key):
                    out[f"{who} {key} / {who} 2_procs"] = round(sc[prefix + key] / base, 3)
        if sc.get("raw_8_partitions_2_procs"):
            out["partitioned: jsworker / raw"] = round(
                sc["8_partitions_2_procs"] / sc["raw_8_partitions_2_procs"], 3
            )
    lat = r.get("latency", {})
    if "jsworker" in lat and "raw" in lat:
        out["p99 submit->handler ms jsworker / raw"] = [
            round(lat["jsworker"]["handler_p99_ms"], 2),
            round(lat["raw"]["handler_p99_ms"], 2),
        ]
    m = r.get("memory")
    if m and m.get("rss_mid_kib"):
        out["RSS after all / after 10%"] = round(m["rss_end_kib"] / m["rss_mid_kib"], 3)
    if "submit" in r:
        out["submit_many / raw publish_async"] = r["submit"]["ratio"]
    return out


def _server_version() -> str:
    return subprocess.run(
        [jsworker.find_nats_server(), "--version"], capture_output=True, text=True, check=False
    ).stdout.strip()


def _version(dist: str) -> str:
    from importlib.metadata import version

    return version(dist)


def print_report(r: dict[str, Any]) -> None:
    if "throughput" in r:
        print("\n## drain throughput (tasks/s: median, runs)")
        for k, v in r["throughput"].items():
            runs = " / ".join(f"{x:.0f}" for x in r["throughput_runs"][k])
            print(f"  {k:20} {v:8.0f}   ({runs})")
    if "latency" in r:
        print("\n## latency (ms): submit -> handler, submit -> completion event")
        for k, v in r["latency"].items():
            print(
                f"  {k:20} handler p50 {v['handler_p50_ms']:8.2f} p99 {v['handler_p99_ms']:8.2f}"
                f"   event p50 {v['event_p50_ms']:8.2f} p99 {v['event_p99_ms']:8.2f}"
                f"  ({v['seen']}/{v['expected']})"
            )
    if "submit" in r:
        s = r["submit"]
        print("\n## submit (tasks/s: median, runs)")
        for k, v in s["median_tasks_per_s"].items():
            print(f"  {k:20} {v:8.0f}   ({' / '.join(f'{x:.0f}' for x in s['runs'][k])})")
    if "scale" in r:
        print("\n## jsworker scale (tasks/s)")
        for k, v in r["scale"].items():
            if k != "runs":
                print(f"  {k:22} {v:10.0f}")
        for k, v in r["scale"]["runs"].items():
            print(f"  runs {k:17} {' / '.join(f'{x:.0f}' for x in v)}")
    if "memory" in r:
        m = r["memory"]
        print("\n## jsworker memory (KiB)")
        print(
            f"  RSS after 10%: {m['rss_mid_kib']}  after all: {m['rss_end_kib']}  "
            f"peak: {m['rss_peak_kib']}"
        )
    print("\n## targets")
    for k, v in r["targets"].items():
        print(f"  {k}: {v}")
    print("\n## machine")
    for k, v in r["machine"].items():
        print(f"  {k}: {v}")


if __name__ == "__main__":
    asyncio.run(main())
