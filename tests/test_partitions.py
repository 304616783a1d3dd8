"""Elastic partitions and singletons against a real server and real worker processes."""

from __future__ import annotations

import asyncio
import collections
import itertools
import json
import random
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from nats.aio.client import Client as NATS
from nats.js.api import ConsumerConfig, DeliverPolicy

import jsworker
from jsworker._pcg_config import ElasticConfig, assignment

HERE = Path(__file__).parent


async def spawn(
    ttype: str, partitions: int, log: Path, env: dict[str, str], work: float = 0.002
) -> tuple[asyncio.subprocess.Process, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(HERE / "partition_worker.py"),
        ttype,
        str(partitions),
        str(log),
        env={**env, "JSW_TEST_WORK": str(work)},
        stdout=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None
    line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode().split()
    assert line[:1] == ["READY"], line
    return proc, line[1]


async def group_config(nc: NATS, ttype: str) -> ElasticConfig:
    kv = await nc.jetstream().key_value("elastic-consumer-groups")
    e = await kv.get(f"TASK_QUEUES.{ttype}")
    return ElasticConfig.from_json(e.value or b"")


async def wait_until(pred: Callable[[], Any], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await pred():
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def read_log(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


async def completed_counts(nc: NATS, prefix: str, since: float) -> collections.Counter[str]:
    """step.completed events per run id (runs named ``{prefix}-…``) in WORKFLOW_HISTORY."""
    js = nc.jetstream()
    from datetime import UTC, datetime

    sub = await js.pull_subscribe(
        "history.>",
        stream="WORKFLOW_HISTORY",
        config=ConsumerConfig(
            deliver_policy=DeliverPolicy.BY_START_TIME,
            opt_start_time=datetime.fromtimestamp(since, UTC).isoformat(),
        ),
    )
    counts: collections.Counter[str] = collections.Counter()
    try:
        while True:
            try:
                msgs = await sub.fetch(1000, timeout=1.0)
            except TimeoutError:  # nats-py raises its own or asyncio's, depending on path
                break
            for m in msgs:
                ev = json.loads(m.data)
                if ev["type"] == "step.completed" and ev["run_id"].startswith(prefix):
                    counts[ev["run_id"]] += 1
                await m.ack()
    finally:
        await sub.unsubscribe()
    return counts


async def test_concurrent_starts_end_balanced(nc: NATS, unique: Callable[[str], str]) -> None:
    ttype = unique("bal")
    workers = []
    for _ in range(5):
        w = jsworker.Worker(nc, partitions=8, heartbeat_interval=1.0, ack_wait=2.0)
        w.handle(ttype, lambda ctx: None)
        workers.append(w)
    await asyncio.gather(*(w.start() for w in workers))
    try:
        cfg = await group_config(nc, ttype)
        assert sorted(cfg.members or ()) == sorted(w.worker_id for w in workers)
        owners = collections.Counter(assignment(cfg).values())
        assert sorted(owners.values()) == [1, 1, 2, 2, 2]  # 8 = 5 x 1 + 3 remainder

        async def all_consuming() -> bool:
            held = [p for w in workers for ps in w._describe()["partitions"].values() for p in ps]
            return sorted(held) == list(range(8))

        await wait_until(all_consuming, 15, "every partition consumed by its member")
        # the directory records the partitions each worker holds
        dirs = {e["worker_id"]: e for e in await jsworker.list_workers(nc)}
        for w in workers:
            await w._refresh_directory()
        dirs = {e["worker_id"]: e for e in await jsworker.list_workers(nc)}
        assert sum(len(dirs[w.worker_id]["partitions"][ttype]) for w in workers) == 8
    finally:
        await asyncio.gather(*(w.stop() for w in workers))
    cfg = await group_config(nc, ttype)
    assert not cfg.members  # every worker left on stop


async def test_10k_tasks_with_workers_joining_and_leaving(
    nc: NATS, unique: Callable[[str], str], server_env: dict[str, str], tmp_path: Path
) -> None:
    ttype = unique("churn")
    prefix = unique("r")
    log = tmp_path / "exec.jsonl"
    n_tasks, n_keys = 10_000, 64
    since = time.time()
    procs: dict[str, asyncio.subprocess.Process] = {}
    for _ in range(2):
        p, wid = await spawn(ttype, 8, log, server_env, work=0.08)
        procs[wid] = p
    client = jsworker.Client(nc)
    per_key = collections.Counter[str]()
    reqs = []
    for n in range(n_tasks):
        k = f"k{n % n_keys}"
        reqs.append(
            jsworker.TaskRequest(ttype, {"k": k, "i": per_key[k]}, run_id=f"{prefix}-{n}", key=k)
        )
        per_key[k] += 1
    await client.submit_many(reqs)
    rng = random.Random(7)
    kills = terms = 0
    js = nc.jetstream()

    async def remaining() -> int:
        done = {(e["k"], e["i"]) for e in read_log(log)}
        return n_tasks - len(done)

    # a worker joins or leaves (SIGTERM or SIGKILL) every 1.5 s while tasks flow; tasks
    # take 80 ms and one key runs at a time, so the drain lasts well past the churn
    for action in ["join", "kill", "join", "term", "kill", "join", "term", "join"]:
        await asyncio.sleep(1.5)
        if await remaining() == 0:
            break
        if action == "join":
            p, wid = await spawn(ttype, 8, log, server_env, work=0.08)
            procs[wid] = p
            continue
        wid = rng.choice(sorted(procs))
        p = procs.pop(wid)
        if action == "term":
            p.send_signal(signal.SIGTERM)
            terms += 1
        else:
            p.send_signal(signal.SIGKILL)
            kills += 1
        await p.wait()
    try:
        await wait_until(lambda: _is_zero(remaining), 60, "all tasks completed")
    finally:
        for p in procs.values():
            p.send_signal(signal.SIGTERM)
        for p in procs.values():
            await p.wait()
    assert kills >= 1 and terms >= 1, (kills, terms)  # the churn happened mid-drain

    execs = read_log(log)
    assert {(e["k"], e["i"]) for e in execs} == {(r.input["k"], r.input["i"]) for r in reqs}
    # per-key order: executions of one key never overlap and run in submit order
    by_key: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
    for e in execs:
        by_key[e["k"]].append(e)
    for k, es in by_key.items():
        es.sort(key=lambda e: e["t0"])
        firsts: dict[int, float] = {}
        for e in es:
            firsts.setdefault(e["i"], e["t0"])
        order = sorted(firsts, key=lambda i: firsts[i])
        assert order == sorted(order), f"key {k} ran out of order"
        for a, b in itertools.pairwise(es):
            assert b["t0"] >= a["t1"] - 0.001, f"key {k}: overlapping executions {a} {b}"
    # none recorded twice
    counts = await completed_counts(nc, prefix, since)
    assert len(counts) == n_tasks
    assert set(counts.values()) == {1}
    # no pile-up: nothing processed is left in any stream
    assert (await js.stream_info(f"TASK_QUEUES-{ttype}")).state.messages == 0
    si = await js.stream_info("TASK_QUEUES", subjects_filter=f"task.{ttype}.>")
    assert not si.state.subjects


async def _is_zero(f: Callable[[], Any]) -> bool:
    return bool(await f() == 0)


async def test_singleton_never_concurrent_and_fails_over(
    nc: NATS, unique: Callable[[str], str], server_env: dict[str, str], tmp_path: Path
) -> None:
    ttype = unique("single")
    log = tmp_path / "single.jsonl"
    procs: dict[str, asyncio.subprocess.Process] = {}
    for _ in range(3):
        p, wid = await spawn(ttype, 0, log, server_env, work=0.02)
        procs[wid] = p
    client = jsworker.Client(nc)
    try:
        await client.submit_many(
            [jsworker.TaskRequest(ttype, {"k": "s", "i": i}) for i in range(60)]
        )
        await wait_until(lambda: _count_at_least(log, 20), 30, "20 singleton executions")
        active = read_log(log)[-1]["w"]
        victim = procs.pop(active)
        victim.send_signal(signal.SIGKILL)
        await victim.wait()
        t_kill = time.time()
        await wait_until(lambda: _count_at_least(log, 60), 60, "all singleton executions")
        execs = read_log(log)
        after = [e for e in execs if e["t0"] > t_kill]
        assert after and all(e["w"] != active for e in after)
        takeover = min(e["t0"] for e in after) - t_kill
        assert takeover < 10, takeover
        execs.sort(key=lambda e: e["t0"])
        for a, b in itertools.pairwise(execs):
            assert b["t0"] >= a["t1"] - 0.001, f"concurrent singleton executions {a} {b}"
        assert {e["i"] for e in execs} == set(range(60))
    finally:
        for p in procs.values():
            p.send_signal(signal.SIGTERM)
        for p in procs.values():
            await p.wait()


async def _count_at_least(log: Path, n: int) -> bool:
    return len({e["i"] for e in read_log(log)}) >= n


async def test_joins_a_group_written_by_orbit_go(nc: NATS, unique: Callable[[str], str]) -> None:
    """A config as orbit.go's CreateElastic + AddMembers writes it (Go json.Marshal) is
    joined; the foreign member is kept (never swept) and the bytes stay Go-shaped."""
    ttype = unique("orbit")
    kv = await nc.jetstream().key_value("elastic-consumer-groups")
    go_bytes = (
        b'{"max_members":4,"partitioning_filters":[{"filter":"task.'
        + ttype.encode()
        + b'.*","partitioning_wildcards":[1]}],"members":["orbit-member"]}'
    )
    await kv.put(f"TASK_QUEUES.{ttype}", go_bytes)
    w = jsworker.Worker(nc, partitions=4, heartbeat_interval=0.3, ack_wait=2.0)
    w.handle(ttype, lambda ctx: None)
    async with w:
        await asyncio.sleep(1.5)  # several sweeps
        entry = await kv.get(f"TASK_QUEUES.{ttype}")
        assert entry.value == go_bytes.replace(
            b'["orbit-member"]', b'["orbit-member","' + w.worker_id.encode() + b'"]'
        )
        cfg = ElasticConfig.from_json(entry.value or b"")
        owners = assignment(cfg)
        assert sorted(owners.values()) == sorted(["orbit-member"] * 2 + [w.worker_id] * 2)
    entry = await kv.get(f"TASK_QUEUES.{ttype}")
    assert entry.value == go_bytes  # left on stop, foreign member untouched


async def test_mismatched_group_config_is_refused(nc: NATS, unique: Callable[[str], str]) -> None:
    ttype = unique("mism")
    w1 = jsworker.Worker(nc, partitions=4)
    w1.handle(ttype, lambda ctx: None)
    async with w1:
        w2 = jsworker.Worker(nc, partitions=8)
        w2.handle(ttype, lambda ctx: None)
        with pytest.raises(jsworker.ConfigError, match="4 partitions"):
            await w2.start()


@pytest.mark.parametrize("bad", [-1, 257, 1.5, "8", True])
def test_partitions_out_of_range(nc: NATS, bad: Any) -> None:
    with pytest.raises(jsworker.ConfigError):
        jsworker.Worker(nc, partitions=bad)
