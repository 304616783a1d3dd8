"""Fault injection with a full queue: the server restarted (SIGTERM and SIGKILL, same
store) under a 2,000-task stream, and the JetStream leader node of a 3-node cluster
killed mid-drain. Each test checks, from the WORKFLOW_HISTORY stream itself, that
every task has exactly one ``step.completed`` (tasks lost: 0, outcomes recorded twice:
0), and prints one ``RELIABILITY {json}`` line with what it measured (run with ``-s`` to
see them; docs/reliability.md holds a table of them)."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import time
from collections.abc import Callable
from typing import Any

import nats
import nats.errors
import pytest
from nats.aio.client import Client as NATS

import jsworker
from jsworker import EmbeddedCluster, EmbeddedServer

TASKS = 2000


class Drain:
    """Completions as the handler sees them: when, and how often each run executed."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.times: list[float] = []
        self.executions: collections.Counter[str] = collections.Counter()
        self.finished: set[str] = set()
        self.reached: dict[int, asyncio.Event] = {}

    def at(self, count: int) -> asyncio.Event:
        return self.reached.setdefault(count, asyncio.Event())

    def handler(self) -> Callable[[jsworker.TaskContext], Any]:
        async def work(ctx: jsworker.TaskContext) -> Any:
            self.executions[ctx.run_id] += 1
            await asyncio.sleep(0.002)
            self.times.append(time.monotonic())
            self.finished.add(ctx.run_id)
            for count, ev in self.reached.items():
                if len(self.finished) >= count:
                    ev.set()
            return ctx.json()

        return work

    def first_after(self, t: float) -> float | None:
        return min((x for x in self.times if x > t), default=None)

    async def drained(self, stall_after: float = 20.0, limit: float = 180.0) -> bool:
        """Wait until every task finished (True), or until none finished for
        ``stall_after`` seconds (False: the worker stalled)."""
        everything = self.at(self.total)
        deadline = time.monotonic() + limit
        while not everything.is_set():
            last = self.times[-1] if self.times else time.monotonic()
            left = min(last + stall_after, deadline) - time.monotonic()
            if left <= 0:
                return False
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(everything.wait(), left)
        return True


async def completed_per_run(nc: NATS, ttype: str) -> collections.Counter[str]:
    """``step.completed`` events per run of ``ttype``, read back from the stream.

    Right after a node died, on a loaded machine, creating the reading consumer can take
    longer than one API timeout: retried (bounded), the reading itself is not."""
    js = nc.jetstream(timeout=15)
    deadline = time.monotonic() + 60
    while True:
        try:
            total = (await js.stream_info("WORKFLOW_HISTORY")).state.messages
            sub = await js.subscribe("history.>", ordered_consumer=True, stream="WORKFLOW_HISTORY")
            break
        except nats.errors.TimeoutError:
            assert time.monotonic() < deadline, "WORKFLOW_HISTORY did not answer in 60 s"
    counts: collections.Counter[str] = collections.Counter()
    try:
        for _ in range(total):
            msg = await sub.next_msg(timeout=10)
            ev = json.loads(msg.data)
            if ev.get("type") == "step.completed" and ev.get("task_type", ttype) == ttype:
                counts[msg.subject.split(".", 1)[1]] += 1
    finally:
        await sub.unsubscribe()
    return counts


async def queue_emptied(nc: NATS, deadline: float) -> int:
    """Wait (bounded) until TASK_QUEUES is empty; the messages left."""
    js = nc.jetstream()
    while True:
        left = (await js.stream_info("TASK_QUEUES")).state.messages
        if left == 0 or time.monotonic() > deadline:
            return left
        await asyncio.sleep(0.1)


def _s(t: float | None) -> float | None:
    return None if t is None else round(t, 2)


def verdict(
    runs: list[str], counts: collections.Counter[str], drain: Drain, **measured: Any
) -> dict[str, Any]:
    out = {
        "tasks": len(runs),
        "completed": len(drain.finished),
        # no step.completed in the history: lost if the drain finished, still queued
        # (stuck) if the worker stalled
        "without_outcome": sum(1 for r in runs if counts[r] == 0),
        "recorded_twice": sum(1 for r in runs if counts[r] > 1),
        "executed_twice": sum(1 for r in runs if drain.executions[r] > 1),
        **measured,
    }
    print("RELIABILITY", json.dumps(out))
    return out


async def _connect(servers: list[str]) -> NATS:
    return await nats.connect(
        servers=servers,
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.1,
        connect_timeout=2,
    )


@pytest.mark.parametrize("how", ["sigterm", "sigkill"])
async def test_server_restart_under_2000_tasks_loses_nothing(
    how: str, unique: Callable[[str], str]
) -> None:
    async with EmbeddedServer() as srv:
        admin = await _connect([srv.url])
        wnc = await _connect([srv.url])
        try:
            await jsworker.setup_all(admin)
            ttype = unique("restart")
            handles = await jsworker.Client(admin).submit_many(
                [jsworker.TaskRequest(ttype, i) for i in range(TASKS)]
            )
            runs = [h.run_id for h in handles]
            drain = Drain(TASKS)
            quarter = drain.at(TASKS // 4)
            w = jsworker.Worker(wnc, concurrency=32, ack_wait=5)
            w.handle(ttype, drain.handler())
            async with w:
                await asyncio.wait_for(quarter.wait(), 60)
                t_fault = time.monotonic()
                done_at_fault = len(drain.finished)
                if how == "sigkill":
                    srv.kill()  # no flush, no clean shutdown; restart() reuses port and store
                await srv.restart()
                t_back = time.monotonic()
                complete = await drain.drained()
                t_end = time.monotonic()
                # acks sent while the server went down are lost: those tasks come back
                # after AckWait, run again, and their outcome is deduplicated
                queued = await queue_emptied(admin, deadline=time.monotonic() + 30)
                t_empty = time.monotonic()
            counts = await completed_per_run(admin, ttype)
        finally:
            await wnc.close()
            await admin.close()
    first = drain.first_after(t_fault)
    out = verdict(
        runs,
        counts,
        drain,
        fault=f"server {how} + restart, same store",
        done_before_fault=done_at_fault,
        server_down_s=_s(t_back - t_fault),
        first_completion_after_fault_s=_s(first - t_fault if first else None),
        rest_drained_s=_s(t_end - t_back) if complete else None,
        stalled=not complete,
        left_in_queue=queued,
        queue_empty_after_s=_s(t_empty - t_fault) if queued == 0 else None,
    )
    assert complete, f"the worker stalled after the restart: {out}"
    assert out["without_outcome"] == 0 and out["recorded_twice"] == 0, out
    assert queued == 0  # work queue: every task acked and removed


async def test_cluster_leader_kill_loses_nothing(unique: Callable[[str], str]) -> None:
    async with EmbeddedCluster(3, name="jsw-leader-kill") as cluster:
        admin = await _connect(cluster.urls)
        wnc = await _connect(list(reversed(cluster.urls)))
        victim: EmbeddedServer | None = None
        try:
            # until the meta group has a leader, API requests go unanswered: retry briefly
            deadline = time.monotonic() + 30
            while True:
                try:
                    await jsworker.setup_all(admin, replicas=3)
                    break
                except (nats.errors.Error, jsworker.ServerError):
                    assert time.monotonic() < deadline, "cluster never answered"
                    await asyncio.sleep(0.2)
            ttype = unique("leader")
            handles = await jsworker.Client(admin).submit_many(
                [jsworker.TaskRequest(ttype, i) for i in range(TASKS)]
            )
            runs = [h.run_id for h in handles]
            drain = Drain(TASKS)
            fifth = drain.at(TASKS // 5)
            w = jsworker.Worker(wnc, concurrency=16, ack_wait=5)
            w.handle(ttype, drain.handler())
            async with w:
                await asyncio.wait_for(fifth.wait(), 60)
                leader = (await admin.jetstream().stream_info("TASK_QUEUES")).cluster
                assert leader is not None and leader.leader
                victim = next(s for s in cluster.servers if s.name == leader.leader)
                done_at_fault = len(drain.finished)
                t_fault = time.monotonic()
                victim.kill()
                complete = await drain.drained()
                t_end = time.monotonic()
            new_leader = (await admin.jetstream(timeout=15).stream_info("TASK_QUEUES")).cluster
            counts = await completed_per_run(admin, ttype)
        finally:
            await wnc.close()
            await admin.close()
            if victim is not None and not victim.running:
                await victim.start()  # whole again, so the cluster stops cleanly
    assert new_leader is not None and new_leader.leader != victim.name
    first = drain.first_after(t_fault)
    gaps = [b - a for a, b in zip(drain.times, drain.times[1:], strict=False) if b > t_fault]
    out = verdict(
        runs,
        counts,
        drain,
        fault="TASK_QUEUES leader node SIGKILLed (3-node cluster, R3)",
        done_before_fault=done_at_fault,
        first_completion_after_fault_s=_s(first - t_fault if first else None),
        longest_gap_s=_s(max(gaps, default=0.0)),
        rest_drained_s=_s(t_end - t_fault) if complete else None,
        stalled=not complete,
    )
    assert complete, f"the worker stalled after the leader died: {out}"
    assert out["without_outcome"] == 0 and out["recorded_twice"] == 0, out
