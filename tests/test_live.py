"""The live worker core: handlers added, replaced and removed on a running worker,
supervised background loops, one credit pool, and the two regression bugs (a partition
group that stalled after one API error; in-place retries that recursed)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import nats.errors
import pytest
from nats.aio.client import Client as NATS
from nats.js.api import ConsumerConfig

import jsworker
from jsworker._pcg_config import ElasticConfig, member_partitions


async def wait_until(pred: Callable[[], Awaitable[bool]], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await pred():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


async def group_config(nc: NATS, ttype: str) -> ElasticConfig:
    kv = await nc.jetstream().key_value("elastic-consumer-groups")
    e = await kv.get(f"TASK_QUEUES.{ttype}")
    return ElasticConfig.from_json(e.value or b"")


def own_tasks() -> set[asyncio.Task[Any]]:
    """Tasks left on the loop that run jsworker code (named or not)."""
    out = set()
    for t in asyncio.all_tasks():
        if t is asyncio.current_task() or t.done():
            continue
        code = getattr(t.get_coro(), "cr_code", None)
        module = getattr(t.get_coro(), "cr_frame", None)
        filename = module.f_code.co_filename if module is not None else ""
        if t.get_name().startswith("jsworker") or "/jsworker/" in filename or code is None:
            out.add(t)
    return out


# ---------------------------------------------------------------- live handlers
async def test_replace_swaps_code_in_flight_finish_on_old(
    nc: NATS, unique: Callable[[str], str]
) -> None:
    ttype = unique("live")
    started = asyncio.Event()
    release = asyncio.Event()
    client = jsworker.Client(nc)
    w = jsworker.Worker(nc)

    async def v1(ctx: jsworker.TaskContext) -> str:
        if ctx.json() == "slow":
            started.set()
            await release.wait()
        return "v1"

    w.handle(ttype, v1)
    async with w:
        slow = await client.submit(ttype, "slow")
        await asyncio.wait_for(started.wait(), 10)
        info = await nc.jetstream().consumer_info("TASK_QUEUES", ttype)
        created = info.created

        @w.handle(ttype)
        async def v2(ctx: jsworker.TaskContext) -> str:
            return "v2"

        # the swap is done when handle() returns: the next task runs v2 ...
        assert await (await client.submit(ttype, "x")).result(timeout=10) == "v2"
        # ... while the one already running finishes on v1
        release.set()
        assert await slow.result(timeout=10) == "v1"
        await w.sync()
        assert w.handler_info()[0]["version"] == 2
        info = await nc.jetstream().consumer_info("TASK_QUEUES", ttype)
        assert info.created == created  # the consumer was not re-created


async def test_sync_waits_for_old_version_to_drain(nc: NATS, unique: Callable[[str], str]) -> None:
    ttype = unique("live")
    started = asyncio.Event()
    outputs: list[str] = []
    w = jsworker.Worker(nc)

    async def v1(ctx: jsworker.TaskContext) -> str:
        started.set()
        await asyncio.sleep(0.5)
        outputs.append("v1")
        return "v1"

    w.handle(ttype, v1)
    async with w:
        await jsworker.Client(nc).submit(ttype, None)
        await asyncio.wait_for(started.wait(), 10)
        w.handle(ttype, lambda ctx: "v2")
        await w.sync()
        assert outputs == ["v1"]  # sync returned only after v1's execution ended


async def test_remove_handler_stops_consuming_and_hands_back(
    nc: NATS, unique: Callable[[str], str]
) -> None:
    ttype = unique("live")
    client = jsworker.Client(nc)
    w = jsworker.Worker(nc)
    w.handle(ttype, lambda ctx: "a")
    async with w:
        assert await (await client.submit(ttype, None)).result(timeout=10) == "a"
        await w.remove_handler(ttype)
        assert w.task_types == [] and w.handler_info() == []
        h = await client.submit(ttype, None)
        # nobody pulls it now: it stays queued (checked on the server, not by waiting)
        info = await nc.jetstream().consumer_info("TASK_QUEUES", ttype)
        assert info.num_waiting == 0 and info.num_pending == 1
        with pytest.raises(jsworker.ConfigError, match="no handler"):
            await w.remove_handler(ttype)
        # registering again picks the queued task up
        w.handle(ttype, lambda ctx: "b")
        await w.sync()
        assert await h.result(timeout=10) == "b"


async def test_live_registration_error_reaches_the_caller(
    nc: NATS, unique: Callable[[str], str]
) -> None:
    ttype = unique("live")
    js = nc.jetstream()
    # someone else's consumer under the name jsworker would use, filtering elsewhere
    await js.add_consumer(
        "TASK_QUEUES", ConsumerConfig(durable_name=ttype, filter_subject=f"task.{ttype}.x.>")
    )
    w = jsworker.Worker(nc)
    async with w:
        w.handle(ttype, lambda ctx: None)
        with pytest.raises(jsworker.ConsumerConflictError, match="not created by jsworker"):
            await w.sync()
        assert w.task_types == []  # the failed handler is not left registered
        await w.sync()  # the error is reported once
        assert w.running
    await js.delete_consumer("TASK_QUEUES", ttype)


async def test_option_change_recreates_the_consumer(nc: NATS, unique: Callable[[str], str]) -> None:
    ttype = unique("live")
    w = jsworker.Worker(nc)
    w.handle(ttype, lambda ctx: 1, ack_wait=5)
    async with w:
        w.handle(ttype, lambda ctx: 2, ack_wait=7)
        await w.sync()
        info = await nc.jetstream().consumer_info("TASK_QUEUES", ttype)
        assert info.config.ack_wait == pytest.approx(7)
        assert await (await jsworker.Client(nc).submit(ttype, None)).result(timeout=10) == 2


async def test_register_after_stop_refused(nc: NATS, unique: Callable[[str], str]) -> None:
    w = jsworker.Worker(nc)
    await w.start()
    await w.stop()
    with pytest.raises(jsworker.LifecycleError, match="stopped"):
        w.handle(unique("t"), lambda ctx: None)


async def test_live_partitioned_handler_joins_and_leaves_the_group(
    nc: NATS, unique: Callable[[str], str]
) -> None:
    ttype = unique("livep")
    client = jsworker.Client(nc)
    seen: dict[str, set[str]] = {"a": set(), "b": set()}

    def handler(name: str) -> Callable[[jsworker.TaskContext], Awaitable[str]]:
        async def fn(ctx: jsworker.TaskContext) -> str:
            seen[name].add(ctx.run_id)
            return name

        return fn

    a = jsworker.Worker(nc, heartbeat_interval=1)
    a.handle(ttype, handler("a"), partitions=4)
    b = jsworker.Worker(nc, heartbeat_interval=1)
    async with a, b:
        cfg = await group_config(nc, ttype)
        assert list(cfg.members or ()) == [a.worker_id]
        b.handle(ttype, handler("b"), partitions=4)
        await b.sync()

        async def both_hold() -> bool:
            held = [p for w in (a, b) for ps in w._describe()["partitions"].values() for p in ps]
            return sorted(held) == [0, 1, 2, 3] and all(
                w._describe()["partitions"][ttype] for w in (a, b)
            )

        await wait_until(both_hold, 20, "the map to cover both members")
        cfg = await group_config(nc, ttype)
        members = sorted([a.worker_id, b.worker_id])
        assert sorted(cfg.members or ()) == members
        for w in (a, b):  # exactly orbit.go's assignment for the sorted member list
            assert w._describe()["partitions"][ttype] == member_partitions(cfg, w.worker_id)
        handles = [await client.submit(ttype, i, run_id=f"r{i}") for i in range(40)]
        for h in handles:
            await h.result(timeout=20)
        assert seen["a"] and seen["b"]  # both members served their share
        await b.remove_handler(ttype)
        cfg = await group_config(nc, ttype)
        assert list(cfg.members or ()) == [a.worker_id]

        async def a_holds_all() -> bool:
            return sorted(a._describe()["partitions"][ttype]) == [0, 1, 2, 3]

        await wait_until(a_holds_all, 20, "the remaining member to take every partition")
        before = set(seen["b"])
        handles = [await client.submit(ttype, i, run_id=f"s{i}") for i in range(20)]
        for h in handles:
            assert await h.result(timeout=20) == "a"
        assert seen["b"] == before


# ------------------------------------------------------------------- regressions
async def test_reconcile_survives_a_failed_api_call(
    nc: NATS, unique: Callable[[str], str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Bug 1: one JetStream API error while a second worker joined killed the reconcile
    task; the group then had no consumer until a restart."""
    from jsworker import _partitions

    ttype = unique("rec")
    a = jsworker.Worker(nc, heartbeat_interval=1)
    a.handle(ttype, lambda ctx: "ok", partitions=2)
    failed: list[str] = []
    real = _partitions.ElasticMember._api

    async def flaky_api(self: Any, what: str, body: Any) -> dict[str, Any]:
        if what.startswith("CONSUMER.DELETE") and self.me == a.worker_id and not failed:
            failed.append(what)
            raise nats.errors.NoRespondersError
        return await real(self, what, body)

    async with a:
        monkeypatch.setattr(_partitions.ElasticMember, "_api", flaky_api)
        b = jsworker.Worker(nc, heartbeat_interval=1)
        b.handle(ttype, lambda ctx: "ok", partitions=2)
        async with b:

            async def balanced() -> bool:
                return all(len(w._describe()["partitions"][ttype]) == 1 for w in (a, b))

            await wait_until(balanced, 20, "a 1/1 map after the failed call")
            assert failed, "the injected failure did not happen"
            assert a.health.loop_failures >= 1 and "NoResponders" in a.health.last_error
            assert a.health.ok  # restarted, not failed
            client = jsworker.Client(nc)
            handles = [await client.submit(ttype, i, run_id=f"k{i}") for i in range(10)]
            for h in handles:
                assert await h.result(timeout=20) == "ok"


async def test_ordered_retry_is_a_loop_not_a_recursion(
    nc: NATS, unique: Callable[[str], str]
) -> None:
    """Bug 2: a singleton retrying in place recursed once per attempt and died at
    Python's recursion limit (about 977 attempts), silently, leaving the task unacked."""
    ttype = unique("rec")
    calls = 0
    enough = asyncio.Event()
    w = jsworker.Worker(nc, grace_period=1)

    @w.handle_singleton(ttype, retry=jsworker.RetryPolicy.fixed(0.001, max_attempts=0))
    async def always_fails(ctx: jsworker.TaskContext) -> None:
        nonlocal calls
        calls += 1
        if calls >= 1500:
            enough.set()
        raise RuntimeError("nope")

    await w.start()
    await jsworker.Client(nc).submit(ttype, None)
    await asyncio.wait_for(enough.wait(), 60)
    assert w.health.ok
    assert own_tasks()  # (the check below can see the worker's tasks)
    await w.stop()
    assert not own_tasks(), own_tasks()  # nothing of the worker is left on the loop
    # the task was handed back on stop, not lost: it waits in the partition stream
    # (the member consumer was deleted with the worker's membership)
    info = await nc.jetstream().stream_info(f"TASK_QUEUES-{ttype}")
    assert info.state.messages == 1


# ------------------------------------------------------------------ credit pool
async def test_one_credit_pool_bounds_leases_across_handlers(
    nc: NATS, unique: Callable[[str], str]
) -> None:
    """4 handlers, concurrency 8, plenty queued for each: the server never sees more
    than 8 of the worker's messages leased. Handlers block on a gate, so leases are
    stable while the test reads every consumer's ack-pending count."""
    types = [unique("pool") for _ in range(4)]
    js = nc.jetstream()
    w = jsworker.Worker(nc, concurrency=8)
    state: dict[str, Any] = {"gate": asyncio.Event(), "running": 0}

    async def gated(ctx: jsworker.TaskContext) -> None:
        state["running"] += 1
        gate = state["gate"]
        await gate.wait()
        state["running"] -= 1

    for t in types:
        w.handle(t, gated)
    client = jsworker.Client(nc)
    for t in types:
        await client.submit_many([jsworker.TaskRequest(t, i) for i in range(12)])
    async with w:

        async def leased() -> int:
            infos = [await js.consumer_info("TASK_QUEUES", t) for t in types]
            return sum(i.num_ack_pending for i in infos)

        for wave in range(4):

            async def wave_running(wave: int = wave) -> bool:
                # the previous wave's outcomes are recorded and 8 new tasks are blocked
                return w.stats.completed == 8 * wave and state["running"] == 8

            # generous bounds: a loaded 2-CPU machine (load ~30) was seen to need > 10 s
            await wait_until(wave_running, 60, f"wave {wave}: 8 tasks running")

            async def settled() -> bool:  # acks are processed by the server a bit later
                return await leased() == 8

            await wait_until(settled, 30, "the server to count 8 leased")
            for _ in range(3):
                assert await leased() == 8  # not one more is pulled while 8 run
            old, state["gate"] = state["gate"], asyncio.Event()
            old.set()
        state["gate"].set()
        while w.stats.completed < 48:
            await asyncio.sleep(0.02)
            state["gate"].set()


async def test_handler_cap_is_a_child_of_the_worker_pool(
    nc: NATS, unique: Callable[[str], str]
) -> None:
    ttype = unique("cap")
    w = jsworker.Worker(nc, concurrency=8)
    running = 0
    most = 0

    async def slow(ctx: jsworker.TaskContext) -> None:
        nonlocal running, most
        running += 1
        most = max(most, running)
        await asyncio.sleep(0.02)
        running -= 1

    w.handle(ttype, slow, concurrency=2)
    async with w:
        hs = await jsworker.Client(nc).submit_many(
            [jsworker.TaskRequest(ttype, i) for i in range(30)]
        )
        for h in hs:
            await h.result(timeout=20)
    assert most <= 2


# ------------------------------------------------------------------ supervision
async def test_run_raises_when_the_connection_is_closed_for_good(
    server: jsworker.EmbeddedServer, unique: Callable[[str], str]
) -> None:
    own = await nats.connect(server.url, allow_reconnect=False)
    w = jsworker.Worker(own)
    w.handle(unique("sup"), lambda ctx: None)
    runner = asyncio.create_task(w.run())
    await wait_until(lambda: _true(w.running), 10, "the worker to run")
    await own.close()
    with pytest.raises(jsworker.WorkerFailedError, match="closed"):
        await asyncio.wait_for(runner, 10)
    assert not w.running and w.health.fatal
    assert not own_tasks(), own_tasks()


async def test_a_failing_loop_is_restarted_and_counted(
    nc: NATS, unique: Callable[[str], str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from jsworker import _directory

    ttype = unique("sup")
    w = jsworker.Worker(nc, heartbeat_interval=0.1)
    w.handle(ttype, lambda ctx: "ok")
    fails = 3
    real = _directory.Directory.refresh

    async def broken_refresh(self: Any) -> None:
        nonlocal fails
        if fails:
            fails -= 1
            raise RuntimeError("directory write refused")
        await real(self)

    async with w:
        monkeypatch.setattr(_directory.Directory, "_loop", _raising_loop(broken_refresh))
        # restart the directory loop under the patched body
        assert w._directory is not None and w._directory._task is not None
        w._directory._task.cancel()
        w._directory._task = w._supervisor.spawn("directory", w._directory._loop)  # type: ignore[union-attr]

        async def counted() -> bool:
            return w.health.loop_failures >= 3

        await wait_until(counted, 10, "three failures to be counted")
        assert "directory write refused" in w.health.last_error
        assert w.health.ok
        assert await (await jsworker.Client(nc).submit(ttype, None)).result(timeout=10) == "ok"


def _raising_loop(refresh: Callable[[Any], Awaitable[None]]) -> Callable[[Any], Awaitable[None]]:
    async def loop(self: Any) -> None:
        while True:
            await asyncio.sleep(self.refresh_every)
            await refresh(self)

    return loop


async def _true(v: bool) -> bool:
    return v


async def test_handler_traceback_is_in_the_failed_event(
    nc: NATS, unique: Callable[[str], str]
) -> None:
    ttype = unique("tb")
    w = jsworker.Worker(nc)

    @w.handle(ttype, retry=jsworker.RetryPolicy.fixed(0.1, max_attempts=1))
    async def broken(ctx: jsworker.TaskContext) -> None:
        raise KeyError("missing")

    async with w:
        h = await jsworker.Client(nc).submit(ttype, None)
        with pytest.raises(jsworker.TaskFailed) as e:
            await h.result(timeout=10)
        event = e.value.event or {}
        tb = event["payload"]["traceback"]
        assert "Traceback (most recent call last)" in tb and "KeyError: 'missing'" in tb
        assert "in broken" in tb


KILLER_APP = """
import jsworker

def make_worker(nc):
    w = jsworker.Worker(nc)

    @w.handle("{ttype}")
    async def kill_my_connection(ctx):
        # a control line far over the server's limit: the server drops the client
        await nc.publish("x" * 8000, b"")
        await nc.flush()

    return w
"""


async def test_serve_exits_non_zero_when_the_worker_cannot_go_on(
    nc: NATS, server_env: dict[str, str], unique: Callable[[str], str], tmp_path: Any
) -> None:
    """`jsworker serve` used to keep printing its status line after nats-py closed the
    connection for good, serving nothing; a process supervisor never restarted it."""
    import sys

    ttype = unique("killer")
    (tmp_path / "killer_app.py").write_text(KILLER_APP.format(ttype=ttype))
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "jsworker.cli",
        "serve",
        "killer_app:make_worker",
        "--app-dir",
        str(tmp_path),
        env=server_env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        await jsworker.Client(nc).submit(ttype, None)
        out, err = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        if proc.returncode is None:
            proc.kill()
    assert proc.returncode == 1, (out.decode(), err.decode())
    assert "failed" in err.decode() and "Traceback" not in err.decode()
    assert "FAILED" in out.decode()


async def test_removing_a_partitioned_handler_waits_before_handing_over(
    nc: NATS, unique: Callable[[str], str]
) -> None:
    """The member that leaves keeps its consumer until its running task ends, so the
    member taking the partition over never runs the same key at the same time."""
    ttype = unique("handover")
    spans: list[tuple[str, str, float, float]] = []
    b_running = asyncio.Event()

    def handler(name: str, work: float) -> Callable[[jsworker.TaskContext], Awaitable[str]]:
        async def fn(ctx: jsworker.TaskContext) -> str:
            t0 = time.monotonic()
            if name == "b":
                b_running.set()
            await asyncio.sleep(work)
            spans.append((name, ctx.json(), t0, time.monotonic()))
            return name

        return fn

    # sorted member ids decide orbit.go's assignment: b sorts first and owns partition 0
    b = jsworker.Worker(nc, heartbeat_interval=1, worker_id="worker-0000000000000001")
    a = jsworker.Worker(nc, heartbeat_interval=1, worker_id="worker-0000000000000002")
    b.handle(ttype, handler("b", 1.0), partitions=1)
    a.handle(ttype, handler("a", 0.01), partitions=1)
    async with b, a:

        async def owns(w: jsworker.Worker) -> bool:
            return w._describe()["partitions"].get(ttype) == [0]

        await wait_until(lambda: owns(b), 20, "b to own the partition")
        client = jsworker.Client(nc)
        first = await client.submit(ttype, "slow", key="k")
        await asyncio.wait_for(b_running.wait(), 10)
        remove = asyncio.create_task(b.remove_handler(ttype))
        second = await client.submit(ttype, "next", key="k")
        assert await first.result(timeout=20) == "b"  # finished on b, not cut off
        assert await second.result(timeout=20) == "a"
        await remove
        assert await owns(a)
    (_, _, _, b_end), (_, _, a_start, _) = sorted(spans, key=lambda s: s[2])
    assert a_start >= b_end  # no overlap for key k


async def test_task_starts_are_held_back_while_outcomes_cannot_be_recorded(
    fresh_server: jsworker.EmbeddedServer,
    unique: Callable[[str], str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """While outcomes cannot be stored (here: the history stream is gone; in production,
    its leader being elected), every task started runs again after AckWait. The worker
    holds new starts back instead of running the whole queue for nothing; once recording
    works again, everything completes, once."""
    from jsworker._provision import setup_streams

    nc = await nats.connect(fresh_server.url)
    try:
        await jsworker.setup_all(nc)
        ttype = unique("held")
        calls: list[int] = []
        w = jsworker.Worker(nc, concurrency=4, ack_wait=2)

        async def h(ctx: jsworker.TaskContext) -> int:
            calls.append(ctx.json())
            return int(ctx.json())

        await jsworker.Client(nc).submit_many([jsworker.TaskRequest(ttype, i) for i in range(200)])
        async with w:
            await nc.jetstream().delete_stream("WORKFLOW_HISTORY")
            w.handle(ttype, h)  # live: starts consuming with the history stream gone
            await w.sync()

            def unrecorded() -> int:
                return sum("left for redelivery" in r.getMessage() for r in caplog.records)

            async def failing() -> bool:  # three waves of 4 could not be recorded
                return unrecorded() >= 12

            await wait_until(failing, 30, "three waves of recording failures")
            # the backoff is in force: far fewer starts than the 200 queued tasks
            assert len(calls) < 100, len(calls)
            await setup_streams(nc)  # recording works again
            js = nc.jetstream()

            async def drained() -> bool:
                info = await js.consumer_info("TASK_QUEUES", ttype)
                return info.num_pending == 0 and info.num_ack_pending == 0

            await wait_until(drained, 120, "every task to complete")
        assert sorted(set(calls)) == list(range(200))
        assert w.stats.completed == 200
    finally:
        await nc.close()
