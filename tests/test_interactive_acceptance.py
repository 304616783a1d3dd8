"""Issue 9's acceptance test: a notebook kernel joins a live partitioned cluster.

Two ``jsworker serve`` processes serve a type with 8 elastic partitions while 5,000
tasks over 500 keys stream in. During the stream a real kernel (jupyter_client)
registers the same handler (the map shows 3 members), replaces it twice (outputs
switch to v2, then v3) and removes it (2 members again). Then: every task has exactly
one ``step.completed`` and ran exactly once, no key's executions overlap or run out of
order, and no old version started a task after the replace that retired it returned.

The last 500 tasks are held back until the removal is done, so every phase happens
during the stream whatever the machine's speed. Timings are printed, not asserted.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import json
import os
import signal
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nats
import pytest
from interactive_helpers import Kernel, spawn_serve, wait_for
from nats.aio.client import Client as NATS

import jsworker
from jsworker import EmbeddedServer
from jsworker.cli._partitions import group_view

ROOT = Path(__file__).resolve().parent.parent
TASKS, KEYS, PARTITIONS = 5000, 500, 8
HELD_BACK = 500
RATE = 250.0  # tasks per second


def read_log(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        if line.endswith("}"):
            out.append(json.loads(line))
    return out


async def members(nc: NATS, ttype: str) -> tuple[int, bool]:
    """(members in the group's map, every partition owned and consumed)."""
    try:
        view = await group_view(nc, ttype)
    except Exception:
        return 0, False
    served = all(p["member"] and p["consuming"] for p in view["partitions"])
    return len(view["members"]), served and len(view["partitions"]) == PARTITIONS


@pytest.mark.timeout(600)
async def test_kernel_joins_redefines_and_leaves_a_live_cluster(
    fresh_server: EmbeddedServer, tmp_path: Path, unique: Callable[[str], str]
) -> None:
    url = fresh_server.url
    ttype = unique("acc")
    nc = await nats.connect(url)
    await jsworker.setup_all(nc)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env.update(NATS_URL=url, JSW_ACC_TYPE=ttype)
    serve_logs = [tmp_path / "serve-0.log", tmp_path / "serve-1.log"]
    kernel_log = tmp_path / "kernel.log"
    procs = [await spawn_serve({**env, "JSW_ACC_LOG": str(p)}) for p in serve_logs]
    kernel = await Kernel(env).start()
    client = jsworker.Client(nc)
    removed = asyncio.Event()
    submitted = 0
    try:
        await wait_for(lambda: _members_are(nc, ttype, 2), 60, "2 serve members")
        await kernel.ok("%load_ext jsworker")
        await kernel.ok(f"%jsworker connect {url}")
        await kernel.ok(
            textwrap.dedent(f"""
            import asyncio, json, time
            LOG = open({str(kernel_log)!r}, "a", buffering=1)

            def make(version):
                async def run(ctx):
                    t0 = time.time()
                    await asyncio.sleep(0.002)
                    d = ctx.json()
                    line = {{"k": d["k"], "i": d["i"], "w": session.worker.worker_id,
                            "v": version, "t0": t0}}
                    LOG.write(json.dumps({{**line, "t1": time.time()}}) + "\\n")
                    return {{"v": version}}
                run.__qualname__ = f"run_{{version}}"
                return run
            """)
        )

        async def produce() -> None:
            nonlocal submitted
            batch = 50
            for start in range(0, TASKS, batch):
                if start == TASKS - HELD_BACK:
                    await removed.wait()
                t0 = time.monotonic()
                await client.submit_many(
                    [
                        jsworker.TaskRequest(
                            ttype,
                            {"k": f"k{i % KEYS}", "i": i},
                            key=f"k{i % KEYS}",
                            run_id=f"{ttype}-{i}",
                        )
                        for i in range(start, start + batch)
                    ]
                )
                submitted = start + batch
                await asyncio.sleep(max(0.0, batch / RATE - (time.monotonic() - t0)))

        producer = asyncio.create_task(produce())

        def kernel_runs(version: str) -> list[dict[str, Any]]:
            return [r for r in read_log(kernel_log) if r["v"] == version]

        async def ran(version: str, n: int = 20) -> bool:
            return len(kernel_runs(version)) >= n

        await wait_for(lambda: _at_least(lambda: submitted, 500), 60, "500 tasks submitted")

        # 1. register live: joins the group as a third member
        res = await kernel.ok(
            f"t_reg = time.time(); session.handle({ttype!r}, make('v1'), "
            f"partitions={PARTITIONS}); await session.sync(); t_reg"
        )
        t_reg = float(res.text)
        await wait_for(lambda: _members_are(nc, ttype, 3), 60, "3 members")
        t_three = time.time()
        await wait_for(lambda: ran("v1"), 60, "v1 executions in the kernel")
        status = await kernel.ok("%jsworker status")
        assert f"partition map {ttype}: 3 members" in status.html
        assert "(this session)" in status.html

        # 2. replace twice: outputs switch to v2, then v3
        returned: dict[str, float] = {}
        for version in ("v2", "v3"):
            before = await _assignment(nc, ttype)
            res = await kernel.ok(
                f"session.handle({ttype!r}, make({version!r}), partitions={PARTITIONS}); "
                "await session.sync(); time.time()"
            )
            returned[version] = float(res.text)
            # a code swap: no partition moved
            assert await _assignment(nc, ttype) == before
            await wait_for(lambda v=version: ran(v), 60, f"{version} executions")
        info = await kernel.ok("[h['version'] for h in session.handlers()]")
        assert info.text == "[3]"

        # 3. remove: in-flight work drains, the two serve processes take the partitions
        res = await kernel.ok(f"t_rm = time.time(); await session.remove({ttype!r}); t_rm")
        t_rm = float(res.text)
        t_rm_done = time.time()
        await wait_for(lambda: _members_are(nc, ttype, 2, served=True), 60, "2 members again")
        t_two = time.time()
        removed.set()
        await asyncio.wait_for(producer, 120)

        # every task ran, then every outcome is recorded
        async def all_ran() -> bool:
            done = {r["i"] for p in [*serve_logs, kernel_log] for r in read_log(p)}
            return len(done) == TASKS

        await wait_for(all_ran, 180, "all 5000 tasks executed")
        completed = await _completed_per_run(nc, ttype)
        await wait_for(
            lambda: _completed_count(nc, ttype, completed),
            60,
            "5000 step.completed events",
        )
        counts = await _completed_per_run(nc, ttype)
    finally:
        removed.set()
        await kernel.stop()
        for p in procs:
            if p.returncode is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            await asyncio.wait_for(p.wait(), 60)
        await nc.close()

    # exactly one step.completed per task, none lost
    assert len(counts) == TASKS
    assert set(counts.values()) == {1}, collections.Counter(counts.values())

    runs = [r for p in [*serve_logs, kernel_log] for r in read_log(p)]
    # each task executed exactly once (no redelivered duplicate either)
    per_i = collections.Counter(r["i"] for r in runs)
    assert len(per_i) == TASKS and set(per_i.values()) == {1}, per_i.most_common(3)

    # per key: executions never overlap and follow submission order
    by_key: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
    for r in runs:
        by_key[r["k"]].append(r)
    for key, rs in by_key.items():
        rs.sort(key=lambda r: r["t0"])
        for a, b in itertools.pairwise(rs):
            assert a["i"] < b["i"], f"{key}: task {b['i']} ran before {a['i']}"
            assert b["t0"] >= a["t1"], f"{key}: tasks {a['i']} and {b['i']} overlapped"

    # the kernel ran every version, and no old version started a task after the
    # replace that retired it returned (in-flight ones may finish later)
    kruns = [r for r in runs if r["v"].startswith("v")]
    versions = collections.Counter(r["v"] for r in kruns)
    assert versions["v1"] and versions["v2"] and versions["v3"], versions
    late = [
        r
        for r in kruns
        if (r["v"] == "v1" and r["t0"] > returned["v2"])
        or (r["v"] in ("v1", "v2") and r["t0"] > returned["v3"])
    ]
    assert not late, late[:3]
    # and none at all once the removal returned
    assert not [r for r in kruns if r["t0"] > t_rm_done], "kernel ran tasks after remove()"
    serve_after = [r for r in runs if r["v"] == "serve" and r["t0"] > t_rm_done]
    assert serve_after, "nobody served after the removal"
    kernel_keys = {r["k"] for r in kruns}
    took_over = [r["t0"] for r in serve_after if r["k"] in kernel_keys]
    first = min(r["t0"] for r in kruns)
    print(
        f"\nacceptance: {TASKS} tasks, {KEYS} keys, {PARTITIONS} partitions; kernel ran "
        f"{dict(versions)}\n"
        f"  live registration -> map shows 3 members: {t_three - t_reg:.2f} s, "
        f"-> first task in the kernel: {first - t_reg:.2f} s\n"
        f"  removal call -> returned: {t_rm_done - t_rm:.2f} s, "
        f"-> 2 members serving all partitions: {t_two - t_rm:.2f} s, "
        f"-> first task of a kernel key on a serve process: "
        f"{(min(took_over) - t_rm) if took_over else float('nan'):.2f} s"
    )


async def _assignment(nc: NATS, ttype: str) -> dict[int, str | None]:
    view = await group_view(nc, ttype)
    return {p["partition"]: p["member"] for p in view["partitions"]}


async def _members_are(nc: NATS, ttype: str, want: int, served: bool = False) -> bool:
    count, all_served = await members(nc, ttype)
    return count == want and (all_served or not served)


async def _at_least(get: Callable[[], int], n: int) -> bool:
    return get() >= n


async def _completed_per_run(nc: NATS, ttype: str) -> dict[str, int]:
    """run id -> number of step.completed events in WORKFLOW_HISTORY (the whole stream:
    the server is this test's own)."""
    js = nc.jetstream()
    info = await js.stream_info("WORKFLOW_HISTORY")
    total = info.state.messages
    sub = await js.subscribe(
        "history.>", stream="WORKFLOW_HISTORY", ordered_consumer=True, pending_msgs_limit=-1
    )
    counts: dict[str, int] = collections.Counter()
    try:
        for _ in range(total):
            m = await sub.next_msg(timeout=10)
            ev = json.loads(m.data)
            if ev["type"] == "step.completed" and ev["run_id"].startswith(ttype):
                counts[ev["run_id"]] += 1
    finally:
        await sub.unsubscribe()
    return dict(counts)


async def _completed_count(nc: NATS, ttype: str, first: dict[str, int]) -> bool:
    if len(first) >= TASKS:
        return True
    first.clear()
    first.update(await _completed_per_run(nc, ttype))
    return len(first) >= TASKS
