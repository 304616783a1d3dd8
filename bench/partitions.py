"""Partition benchmarks: rebalance time, singleton failover, partitioned throughput, scale.

    python bench/partitions.py [--rounds 10] [--tasks 10000] [--json]
    python bench/partitions.py --members N [--rate 64] [--timeout 900] [--json]

One embedded nats-server; worker processes from ``bench/_pworker.py`` (heartbeat 1 s, so
the liveness interval after which a silent member is removed is 3 s).

* **rebalance**: 2 workers, 8 partitions, ~100 tasks/s over 64 keys. One worker is
  stopped (SIGTERM, clean) or killed (SIGKILL); the time is from the signal until every
  partition it held has a task completed by the other worker. Median of ``--rounds``.
* **singleton failover**: 3 workers on a singleton handler; the active one is killed;
  time until another worker completes a task. Median of ``--rounds``.
* **throughput**: ``--tasks`` pre-published no-op tasks drained by 2 worker processes,
  8 partitions vs unpartitioned (one shared consumer).

``--members N`` runs the scale scenario instead (``bench/_scaleworker.py``, default
heartbeat and lease): N worker processes on a type with 256 partitions are started at
once (all imported and connected first, then released together), a quarter of them is
killed (SIGKILL), then as many are started again, while ``--rate`` tasks/s flow over one
key per partition. Per transition it reports the time until the map is stable (the
group's members are exactly the live workers and every member's consumer exists with
orbit.go's filters for them, unchanged for 2 s) and covers all 256 partitions, config
writes, and compare-and-swap writes and conflicts per member; after the kill, the time
until one task published at the kill into every orphaned partition has run. At the end
it checks from the executions that no key ran twice at once and that no partition ran on
two workers at once. It stops itself after ``--timeout`` seconds and terminates every
process it started (they also die with it).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
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
from jsworker._pcg_config import ElasticConfig, PartitioningFilter, partition_filters

HERE = Path(__file__).parent
KEYS = [f"k{i}" for i in range(64)]
STABLE_FOR = 2.0


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


# ------------------------------------------------------------------------ scale
def partition_keys(n: int) -> dict[int, str]:
    """One key per partition (the first ``key-{i}`` that hashes there)."""
    keys: dict[int, str] = {}
    i = 0
    while len(keys) < n:
        keys.setdefault(partition_of(f"key-{i}", n), f"key-{i}")
        i += 1
    return keys


class Fleet:
    """The scale benchmark's worker processes (spawned pre-loaded, released at once)."""

    def __init__(self, url: str, ttype: str, log: Path, stats: Path) -> None:
        self.url, self.ttype, self.log, self.stats = url, ttype, log, stats
        self.procs: dict[str, Any] = {}
        self.all: list[Any] = []

    async def _load(self) -> Any:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            str(HERE / "_scaleworker.py"),
            self.ttype,
            str(self.log),
            str(self.stats),
            env={**os.environ, "NATS_URL": self.url},
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        self.all.append(proc)
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 300)
        if not line.startswith(b"LOADED"):
            raise RuntimeError(f"worker process failed to load: {line!r}")
        return proc

    async def start(self, k: int) -> float:
        """Spawn ``k`` processes, wait until all are loaded, release them together;
        returns the release time."""
        procs = await asyncio.gather(*(self._load() for _ in range(k)))
        t_go = time.time()
        for p in procs:
            p.stdin.write(b"go\n")
        await asyncio.gather(*(p.stdin.drain() for p in procs))
        for p in procs:
            line = (await asyncio.wait_for(p.stdout.readline(), 120)).decode().split()
            if line[:1] != ["READY"]:
                raise RuntimeError(f"worker process failed to start: {line}")
            self.procs[line[1]] = p
        return t_go

    async def kill(self, ids: list[str]) -> None:
        for w in ids:
            self.procs.pop(w).send_signal(signal.SIGKILL)

    async def close(self) -> None:
        for p in self.all:
            if p.returncode is None:
                p.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(asyncio.gather(*(p.wait() for p in self.all)), 30)
        except TimeoutError:
            for p in self.all:
                if p.returncode is None:
                    p.kill()
            await asyncio.gather(*(p.wait() for p in self.all))

    def counters(self) -> dict[str, dict[str, int]]:
        out = {}
        for f in self.stats.glob("worker-*.json"):
            with contextlib.suppress(ValueError, OSError):
                d = json.loads(f.read_text())
                out[d["w"]] = d
        return out


async def map_state(js: Any, ttype: str) -> tuple[list[str], int, dict[str, list[str]]]:
    kv = await js.key_value("elastic-consumer-groups")
    e = await kv.get(f"TASK_QUEUES.{ttype}")
    cfg = ElasticConfig.from_json(e.value or b"")
    consumers = {
        ci.name: list(ci.config.filter_subjects or [])
        for ci in await js.consumers_info(f"TASK_QUEUES-{ttype}")
    }
    return sorted(cfg.members or ()), e.revision or 0, consumers


async def wait_stable(js: Any, ttype: str, live: set[str], t0: float) -> dict[str, Any]:
    """Seconds from ``t0`` until the map is the one for ``live``, complete and unchanged
    for ``STABLE_FOR``; the config revision then; and the config changes seen on the
    way (seconds after ``t0``, members; polled every 0.2 s)."""
    since: float | None = None
    changes: list[tuple[float, int]] = []
    seen_rev = -1
    while True:
        members, rev, consumers = await map_state(js, ttype)
        if rev != seen_rev:
            if seen_rev >= 0:
                changes.append((round(time.time() - t0, 2), len(members)))
            seen_rev = rev
        cfg = ElasticConfig(
            max_members=256,
            partitioning_filters=(PartitioningFilter(f"task.{ttype}.*", (1,)),),
            members=tuple(members),
        )
        want = {m: partition_filters(cfg, m) for m in members}
        covered = {int(f.split(".", 1)[0]) for fs in consumers.values() for f in fs}
        ok = set(members) == live and consumers == want and covered == set(range(256))
        now = time.time()
        if ok and since is None:
            since = now
        elif not ok:
            since = None
        if since is not None and now - since >= STABLE_FOR:
            return {"stable_s": since - t0, "revision": rev, "changes": changes}
        await asyncio.sleep(0.2)


class Events:
    """The executions log, read incrementally."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.rows: list[dict[str, Any]] = []

    def poll(self) -> list[dict[str, Any]]:
        if self.path.exists():
            with self.path.open() as f:
                f.seek(self.offset)
                chunk = f.read()
            end = chunk.rfind("\n") + 1
            self.offset += len(chunk[:end].encode())
            self.rows.extend(json.loads(x) for x in chunk[:end].splitlines() if x.strip())
        return self.rows


def overlaps(rows: list[dict[str, Any]], by: Any, other_worker_only: bool) -> int:
    groups: dict[Any, list[dict[str, Any]]] = {}
    for e in rows:
        groups.setdefault(by(e), []).append(e)
    bad = 0
    for es in groups.values():
        es.sort(key=lambda e: e["t0"])
        end, who = 0.0, ""
        for e in es:
            if e["t0"] < end - 0.001 and (not other_worker_only or e["w"] != who):
                bad += 1
            if e["t1"] > end:
                end, who = e["t1"], e["w"]
    return bad


def cas_delta(
    before: dict[str, dict[str, int]], after: dict[str, dict[str, int]]
) -> dict[str, Any]:
    conflicts, writes = [], []
    for w, d in after.items():
        b = before.get(w, {})
        conflicts.append(d["cas_conflicts"] - b.get("cas_conflicts", 0))
        writes.append(d["cas_writes"] - b.get("cas_writes", 0))
    n = max(len(conflicts), 1)
    return {
        "cas_conflicts_total": sum(conflicts),
        "cas_conflicts_per_member_mean": sum(conflicts) / n,
        "cas_conflicts_per_member_max": max(conflicts, default=0),
        "cas_writes_per_member_mean": sum(writes) / n,
    }


async def scale(url: str, members: int, rate: float, tmp: Path) -> dict[str, Any]:
    ttype = f"sc-{secrets.token_hex(4)}"
    log, stats = tmp / f"{ttype}.jsonl", tmp / f"{ttype}-stats"
    stats.mkdir()
    keys = partition_keys(256)
    key_part = {k: p for p, k in keys.items()}
    nc = await nats.connect(url)
    js = nc.jetstream()
    client = jsworker.Client(nc)
    fleet = Fleet(url, ttype, log, stats)
    events = Events(log)
    stop = asyncio.Event()
    out: dict[str, Any] = {"members": members, "partitions": 256, "rate_tasks_per_s": rate}

    async def produce() -> None:
        i = 0
        order = list(keys.values())
        while not stop.is_set():
            await client.submit(ttype, {"k": order[i % 256]}, key=order[i % 256])
            i += 1
            await asyncio.sleep(1 / rate)

    prod: asyncio.Task[None] | None = None
    try:
        t_go = await fleet.start(members)
        prod = asyncio.create_task(produce())
        st = await wait_stable(js, ttype, set(fleet.procs), t_go)
        c0 = fleet.counters()
        out["start"] = {**st, **cas_delta({}, c0), "config_writes": st["revision"]}
        rev0 = st["revision"]
        # kill a quarter (at least one)
        _, _, consumers = await map_state(js, ttype)
        victims = random.Random(members).sample(sorted(fleet.procs), max(1, members // 4))
        orphaned = sorted(int(f.split(".", 1)[0]) for v in victims for f in consumers.get(v, []))
        await fleet.kill(victims)
        t_kill = time.time()
        probes = [
            jsworker.TaskRequest(ttype, {"k": keys[p], "probe": True}, key=keys[p])
            for p in orphaned
        ]
        await client.submit_many(probes)
        t_pub = time.time()
        orphan_set = set(orphaned)
        served: dict[int, float] = {}
        removed_at: float | None = None
        while len(served) < len(orphan_set):
            if removed_at is None and (await map_state(js, ttype))[1] != rev0:
                removed_at = time.time()
            for e in events.poll():
                p = key_part[e["k"]]
                if p in orphan_set and e["t0"] >= t_pub and e["w"] not in victims:
                    served.setdefault(p, e["t1"])
            await asyncio.sleep(0.2)
        st = await wait_stable(js, ttype, set(fleet.procs), t_kill)
        c1 = fleet.counters()
        out["kill"] = {
            "killed": len(victims),
            "orphaned_partitions": len(orphaned),
            "dead_removed_s": (removed_at or time.time()) - t_kill,
            "all_orphans_served_s": max(served.values()) - t_kill,
            **st,
            **cas_delta(c0, c1),
            "config_writes": st["revision"] - rev0,
        }
        rev1 = st["revision"]
        # start as many again
        t_go = await fleet.start(len(victims))
        st = await wait_stable(js, ttype, set(fleet.procs), t_go)
        c2 = fleet.counters()
        out["restart"] = {
            "started": len(victims),
            **st,
            **cas_delta(c1, c2),
            "config_writes": st["revision"] - rev1,
        }
        stop.set()
        await prod
        prod = None
        # let what was published drain, then check the executions
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            si = await js.stream_info(f"TASK_QUEUES-{ttype}")
            origin = await js.stream_info("TASK_QUEUES", subjects_filter=f"task.{ttype}.>")
            if si.state.messages == 0 and not origin.state.subjects:
                break
            await asyncio.sleep(0.5)
        rows = events.poll()
        out["executions"] = len(rows)
        out["key_overlaps"] = overlaps(rows, lambda e: e["k"], False)
        out["partition_overlaps_across_workers"] = overlaps(rows, lambda e: key_part[e["k"]], True)
    finally:
        stop.set()
        if prod is not None:
            with contextlib.suppress(Exception):
                await prod
        await fleet.close()
        await nc.close()
    return out


def print_scale(out: dict[str, Any]) -> None:
    print(
        f"members={out['members']} partitions={out['partitions']} "
        f"rate={out['rate_tasks_per_s']:g} tasks/s"
    )
    for phase in ("start", "kill", "restart"):
        d = out[phase]
        extra = (
            f"  dead removed {d['dead_removed_s']:.2f}s, all orphans served "
            f"{d['all_orphans_served_s']:.2f}s ({d['orphaned_partitions']} partitions)"
            if phase == "kill"
            else ""
        )
        print(
            f"{phase:8} stable+covering {d['stable_s']:6.2f}s  config writes "
            f"{d['config_writes']:3}  CAS conflicts/member mean "
            f"{d['cas_conflicts_per_member_mean']:.2f} max {d['cas_conflicts_per_member_max']}"
            f"{extra}"
        )
    print(
        f"executions {out['executions']}  key overlaps {out['key_overlaps']}  "
        f"partition overlaps across workers {out['partition_overlaps_across_workers']}"
    )


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--tasks", type=int, default=10_000)
    ap.add_argument("--members", type=int, default=0, help="run the scale scenario (1-48)")
    ap.add_argument("--rate", type=float, default=64.0, help="scale: tasks/s published")
    ap.add_argument("--timeout", type=float, default=900.0, help="scale: stop after this")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.members:
        if not 1 <= args.members <= 48:
            sys.exit("error: --members must be 1-48")
        if not args.rate > 0 or not args.timeout > 0:
            sys.exit("error: --rate and --timeout must be > 0")
        with tempfile.TemporaryDirectory() as td:
            async with jsworker.EmbeddedServer() as srv:
                nc = await nats.connect(srv.url)
                await jsworker.setup_all(nc)
                await nc.close()
                try:
                    res = await asyncio.wait_for(
                        scale(srv.url, args.members, args.rate, Path(td)), args.timeout
                    )
                except TimeoutError:
                    sys.exit(f"error: the scale benchmark did not finish in {args.timeout:g}s")
        if args.json:
            print(json.dumps(res, indent=2))
        else:
            print_scale(res)
        return
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
