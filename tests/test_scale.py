"""Partitions with default settings and with many members (issue 15).

* A SIGKILLed worker's partitions (and a singleton) are served again within 10 s with
  the defaults (30 s heartbeat, 30 s lease), and no key ever runs twice at once.
* Twelve members starting at once converge to one stable map: orbit.go's assignment
  for the sorted member list, on the server as in every member.
* The pure parts: the sweep ring and the compare-and-swap backoff.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import secrets
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.aio.client import Client as NATS
from test_partitions import group_config, read_log, spawn, wait_until

import jsworker
from jsworker._directory import ping_subject, probe
from jsworker._partitions import ElasticMember, cas_backoff, sweep_plan
from jsworker._pcg_config import ElasticConfig, assignment, partition_filters

TASK_TIME = 0.05
FAILOVER_BOUND = 10.0  # the promise with default settings, plus the task time


def due_times(
    execs: list[dict[str, Any]], submitted: dict[tuple[str, int], float]
) -> dict[tuple[str, int], float]:
    """When each task could first run: once submitted and once the task of its key
    before it (in submit order) finished. Waiting behind one's own key is per-key order,
    not failover, so the failover bound is measured from here."""
    first_end: dict[tuple[str, int], float] = {}
    for e in sorted(execs, key=lambda e: e["t1"]):
        first_end.setdefault((e["k"], e["i"]), e["t1"])
    due: dict[tuple[str, int], float] = {}
    by_key: dict[str, list[int]] = collections.defaultdict(list)
    for k, i in submitted:
        by_key[k].append(i)
    for k, idx in by_key.items():
        prev_end = 0.0
        for i in sorted(idx):
            due[(k, i)] = max(submitted[(k, i)], prev_end)
            prev_end = first_end[(k, i)]
    return due


@pytest.mark.parametrize("partitions", [8, 0], ids=["partitioned", "singleton"])
async def test_defaults_sigkill_failover_within_10s(
    nc: NATS,
    unique: Callable[[str], str],
    server_env: dict[str, str],
    tmp_path: Path,
    partitions: int,
) -> None:
    ttype = unique("dflt")
    log = tmp_path / "exec.jsonl"
    env = {**server_env, "JSW_TEST_DEFAULTS": "1"}
    procs: dict[str, asyncio.subprocess.Process] = {}
    for _ in range(3):
        p, wid = await spawn(ttype, partitions, log, env, work=TASK_TIME)
        procs[wid] = p
    client = jsworker.Client(nc)
    keys = [f"k{i}" for i in range(32)] if partitions else ["s"]
    rate = 40.0 if partitions else 8.0  # a singleton runs one task at a time
    submitted: dict[tuple[str, int], float] = {}
    counter: collections.Counter[str] = collections.Counter()
    stop = asyncio.Event()

    async def produce() -> None:
        n = 0
        while not stop.is_set():
            k = keys[n % len(keys)]
            i = counter[k]
            counter[k] += 1
            submitted[(k, i)] = time.time()
            await client.submit(ttype, {"k": k, "i": i}, key=k)
            n += 1
            await asyncio.sleep(1 / rate)

    producer = asyncio.create_task(produce())
    victim_id = ""
    try:
        # mid-stream: kill a worker that is running tasks (for a singleton, the active one)
        await wait_until(lambda: _busy(log, 40), 30, "tasks flowing")
        victim_id = read_log(log)[-1]["w"]
        victim = procs.pop(victim_id)
        victim.send_signal(signal.SIGKILL)
        await victim.wait()
        t_kill = time.time()
        await wait_until(lambda: _served_after(log, t_kill, victim_id), 30, "takeover")
        await asyncio.sleep(2)  # keep the stream flowing a little after the takeover
        stop.set()
        await producer
        wanted = set(submitted)
        await wait_until(lambda: _all_done(log, wanted), 60, "every task completed")
    finally:
        stop.set()
        await producer
        for p in procs.values():
            p.send_signal(signal.SIGTERM)
        for p in procs.values():
            await p.wait()
    execs = read_log(log)
    assert {(e["k"], e["i"]) for e in execs} == set(submitted)
    # the killed worker held tasks or partitions that were later served by the others
    assert any(e["w"] != victim_id and e["t0"] > t_kill for e in execs)
    # every task completed within 10 s + the task time of when it could first run
    due = due_times(execs, submitted)
    done = {}
    for e in sorted(execs, key=lambda e: e["t1"]):
        done.setdefault((e["k"], e["i"]), e["t1"])
    slowest = max(done[t] - due[t] for t in submitted)
    assert slowest <= FAILOVER_BOUND + TASK_TIME, f"a task waited {slowest:.1f}s"
    # nothing ran twice at once for one key (for a singleton: nothing ran twice at once)
    by_key: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
    for e in execs:
        by_key[e["k"]].append(e)
    for k, es in by_key.items():
        es.sort(key=lambda e: e["t0"])
        for a, b in itertools.pairwise(es):
            assert b["t0"] >= a["t1"] - 0.001, f"key {k}: overlapping executions {a} {b}"


async def test_a_stalled_worker_is_not_judged_dead(
    nc: NATS, unique: Callable[[str], str], server_env: dict[str, str], tmp_path: Path
) -> None:
    """A worker frozen (SIGSTOP) for longer than the 5 s grace keeps its connection, so it
    is "silent", not gone: with a fresh directory entry it keeps its partitions, and when
    it resumes, its tasks finish without any key running twice at once."""
    ttype = unique("stall")
    log = tmp_path / "exec.jsonl"
    env = {**server_env, "JSW_TEST_DEFAULTS": "1"}
    procs: dict[str, asyncio.subprocess.Process] = {}
    for _ in range(2):
        p, wid = await spawn(ttype, 8, log, env, work=0.2)
        procs[wid] = p
    client = jsworker.Client(nc)
    keys = [f"k{i}" for i in range(16)]
    reqs = [jsworker.TaskRequest(ttype, {"k": k, "i": i}, key=k) for i in range(5) for k in keys]
    stalled = sorted(procs)[0]
    try:
        await client.submit_many(reqs)
        await wait_until(lambda: _ran_on(log, stalled), 30, "the worker to run tasks")
        procs[stalled].send_signal(signal.SIGSTOP)  # mid-task, holding leases
        t_stop = time.monotonic()
        while time.monotonic() - t_stop < 8:  # well past the grace for a closed connection
            assert stalled in ((await group_config(nc, ttype)).members or ())
            await asyncio.sleep(0.5)
        procs[stalled].send_signal(signal.SIGCONT)
        wanted = {(r.input["k"], r.input["i"]) for r in reqs}  # type: ignore[index]
        await wait_until(lambda: _all_done(log, wanted), 60, "every task completed")
        assert stalled in ((await group_config(nc, ttype)).members or ())
    finally:
        for p in procs.values():
            p.send_signal(signal.SIGCONT)
            p.send_signal(signal.SIGTERM)
        for p in procs.values():
            await p.wait()
    by_key: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
    for e in read_log(log):
        by_key[e["k"]].append(e)
    for k, es in by_key.items():
        es.sort(key=lambda e: e["t0"])
        for a, b in itertools.pairwise(es):
            assert b["t0"] >= a["t1"] - 0.001, f"key {k}: overlapping executions {a} {b}"


async def test_a_cut_off_worker_is_removed_once_its_entry_is_stale_and_rejoins(
    nc: NATS, unique: Callable[[str], str], server_env: dict[str, str], tmp_path: Path
) -> None:
    """A worker that neither answers nor closes its connection (as a lost machine looks,
    here frozen with SIGSTOP; heartbeat 1 s, so liveness 3 s) is removed once its
    directory entry is stale and its consumer idle; resumed, it joins again."""
    ttype = unique("cut")
    log = tmp_path / "exec.jsonl"
    procs = dict(
        [(wid, p) for p, wid in [await spawn(ttype, 4, log, server_env) for _ in range(2)]]
    )
    frozen = sorted(procs)[1]
    try:
        await wait_until(lambda: _members_are(nc, ttype, set(procs)), 20, "both members")
        procs[frozen].send_signal(signal.SIGSTOP)
        others = set(procs) - {frozen}
        await wait_until(lambda: _members_are(nc, ttype, others), 30, "the frozen one removed")
        procs[frozen].send_signal(signal.SIGCONT)
        await wait_until(lambda: _members_are(nc, ttype, set(procs)), 30, "it to rejoin")
        handles = await jsworker.Client(nc).submit_many(
            [jsworker.TaskRequest(ttype, {"k": f"k{i}", "i": i}, key=f"k{i}") for i in range(20)]
        )
        for h in handles:
            await h.result(timeout=30)
    finally:
        for p in procs.values():
            p.send_signal(signal.SIGCONT)
            p.send_signal(signal.SIGTERM)
        for p in procs.values():
            await p.wait()


async def _members_are(nc: NATS, ttype: str, ids: set[str]) -> bool:
    return set((await group_config(nc, ttype)).members or ()) == ids


async def _ran_on(log: Path, worker: str) -> bool:
    return any(e["w"] == worker for e in read_log(log))


async def _busy(log: Path, n: int) -> bool:
    return len(read_log(log)) >= n


async def _served_after(log: Path, t: float, victim: str) -> bool:
    return any(e["w"] != victim and e["t0"] > t for e in read_log(log))


async def _all_done(log: Path, wanted: set[tuple[str, int]]) -> bool:
    return wanted <= {(e["k"], e["i"]) for e in read_log(log)}


async def test_twelve_members_starting_at_once_converge_to_orbit_map(
    server_env: dict[str, str], unique: Callable[[str], str]
) -> None:
    ttype = unique("twelve")
    url = server_env["NATS_URL"]
    conns = [await nats.connect(url, allow_reconnect=False) for _ in range(12)]
    workers = []
    for c in conns:
        w = jsworker.Worker(c, partitions=256)  # default heartbeat and lease
        w.handle(ttype, lambda ctx: None)
        workers.append(w)
    try:
        await asyncio.gather(*(w.start() for w in workers))
        ids = sorted(w.worker_id for w in workers)
        nc = conns[0]
        js = nc.jetstream()
        expected = ElasticConfig.from_json(
            (await group_config(nc, ttype)).to_json()
        ).without_members(set(ids))
        for wid in ids:
            expected = expected.with_member(wid)
        owners = assignment(expected)
        assert sorted(collections.Counter(owners.values()).values()) == [21] * 8 + [22] * 4

        async def snapshot() -> tuple[Any, ...]:
            cfg = await group_config(nc, ttype)
            consumers = {}
            async for name, filters in _consumers(js, f"TASK_QUEUES-{ttype}"):
                consumers[name] = filters
            held = {w.worker_id: w._describe()["partitions"].get(ttype) for w in workers}
            return tuple(sorted(cfg.members or ())), consumers, held

        def converged(snap: tuple[Any, ...]) -> bool:
            members, consumers, held = snap
            return (
                list(members) == ids
                and consumers == {m: partition_filters(expected, m) for m in ids}
                and held == {m: [p for p in range(256) if owners[p] == m] for m in ids}
            )

        last: list[tuple[Any, ...]] = []

        async def is_converged() -> bool:
            last[:] = [await snapshot()]
            return converged(last[0])

        try:
            await wait_until(is_converged, 60, "the 12 members to converge")
        except AssertionError:
            raise AssertionError(f"not converged: {last}") from None
        # stable: through several sweeps and settle periods nothing moves any more
        revision = (
            await (await js.key_value("elastic-consumer-groups")).get(f"TASK_QUEUES.{ttype}")
        ).revision
        rebalances = [m.rebalances for w in workers for m in _members(w)]
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            assert converged(await snapshot())
            await asyncio.sleep(0.3)
        kv = await js.key_value("elastic-consumer-groups")
        assert (await kv.get(f"TASK_QUEUES.{ttype}")).revision == revision
        assert [m.rebalances for w in workers for m in _members(w)] == rebalances
        # conflicts happened and were retried, none was lost
        assert sum(m.cas.writes for w in workers for m in _members(w)) >= 12
    finally:
        await asyncio.gather(*(w.stop() for w in workers))
        for c in conns:
            await c.close()


def _members(w: jsworker.Worker) -> list[ElasticMember]:
    return [m for rt in w._runtimes.values() for m in getattr(rt, "members", [])]


async def _consumers(js: Any, stream: str) -> Any:
    for ci in await js.consumers_info(stream):
        yield ci.name, list(ci.config.filter_subjects or [])


async def test_probe_tells_alive_gone_and_silent(
    server_env: dict[str, str], unique: Callable[[str], str]
) -> None:
    url = server_env["NATS_URL"]
    asker = await nats.connect(url, allow_reconnect=False)
    target = await nats.connect(url, allow_reconnect=False)
    try:
        plain = jsworker.Worker(target)
        plain.handle(unique("plain"), lambda ctx: None)
        async with plain:  # no partitioned handler: no presence subject, no permission needed
            assert await probe(asker, plain.worker_id) == "gone"
        w = jsworker.Worker(target)
        w.handle(unique("member"), lambda ctx: None, partitions=2)
        async with w:
            assert await probe(asker, w.worker_id) == "alive"
            # a stalled worker: subscribed, never answering
            sub = await target.subscribe(f"jsworker.workers.{w.worker_id}-stalled.ping")
            await target.flush()
            assert await probe(asker, f"{w.worker_id}-stalled", timeout=0.3) == "silent"
            await sub.unsubscribe()
        assert await probe(asker, w.worker_id) == "gone"  # stopped: no subscriber left
    finally:
        await target.close()
        await asker.close()


async def test_a_member_refused_its_presence_subject_does_not_start(
    unique: Callable[[str], str],
) -> None:
    conf = """
authorization {
  users: [
    { user: admin, password: admin-pw }
    { user: nopresence, password: pw, permissions: { subscribe: { deny: ["jsworker.workers.>"] } } }
  ]
}
"""
    async with jsworker.EmbeddedServer(extra_config=conf) as srv:
        admin = await nats.connect(srv.url, user="admin", password="admin-pw")
        nc = await nats.connect(srv.url, user="nopresence", password="pw", error_cb=_ignore)
        try:
            await jsworker.setup_all(admin)
            plain = jsworker.Worker(nc)
            plain.handle(unique("plain"), lambda ctx: None)
            async with plain:  # unpartitioned handlers never need it
                pass
            w = jsworker.Worker(nc)
            w.handle(unique("member"), lambda ctx: None, partitions=2)
            with pytest.raises(jsworker.ServerError, match=r"jsworker\.workers\.\*\.ping"):
                await w.start()
        finally:
            await nc.close()
            await admin.close()


async def _ignore(e: Exception) -> None:
    pass


async def test_probe_across_a_cluster(cluster: jsworker.EmbeddedCluster) -> None:
    """Presence works between servers: interest travels over routes, and so does its
    removal when a worker's connection closes."""
    asker = await nats.connect(cluster.urls[0], allow_reconnect=False)
    target = await nats.connect(cluster.urls[1], allow_reconnect=False)
    wid = f"worker-{secrets.token_hex(8)}"
    try:
        # what Directory.start() subscribes (the cluster is not provisioned for a Worker)
        async def pong(msg: Any) -> None:
            await msg.respond(wid.encode())

        await target.subscribe(ping_subject(wid), cb=pong)
        await target.flush()
        states: list[str] = []

        async def answered() -> bool:
            states.append(await probe(asker, wid))
            return states[-1] == "alive"

        await wait_until(answered, 10, "an answer across the route")
        await target.close()

        async def gone() -> bool:
            states.append(await probe(asker, wid))
            return states[-1] == "gone"

        # (until the route has carried the unsubscribe, a request may go unanswered:
        # "silent", which never removes a member by itself)
        await wait_until(gone, 10, "no responders across the route")
    finally:
        await target.close()
        await asker.close()


def test_sweep_plan_one_sweeper_judges_everyone_after_it() -> None:
    members = ["worker-c", "orbit-x", "worker-a", "worker-d", "worker-b"]
    assert sweep_plan(members, "worker-a") == ([], ["worker-b", "worker-c", "worker-d"])
    assert sweep_plan(members, "worker-c") == (["worker-a", "worker-b"], ["worker-d"])
    assert sweep_plan(members, "worker-d") == (["worker-a", "worker-b", "worker-c"], [])
    # members added by other tools are never judged; a non-member sees everyone before it
    before, after = sweep_plan(members, "worker-b")
    assert "orbit-x" not in before + after
    assert sweep_plan(members, "worker-z") == (
        ["worker-a", "worker-b", "worker-c", "worker-d"],
        [],
    )
    # whoever sweeps, every worker but the first is judged by each member before it
    for m in ("worker-a", "worker-b", "worker-c", "worker-d"):
        before, after = sweep_plan(members, m)
        assert sorted([*before, m, *after]) == ["worker-a", "worker-b", "worker-c", "worker-d"]


def test_cas_backoff_grows_with_jitter_and_is_capped() -> None:
    for n in range(30):
        for _ in range(50):
            d = cas_backoff(n)
            assert 0 <= d <= min(1.0, 0.01 * 2**n)
    late = [cas_backoff(12) for _ in range(200)]
    assert max(late) > 0.5 and min(late) < 0.5  # spread over the whole window
