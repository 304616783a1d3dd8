"""Long-running tasks: heartbeats, checkpoints, signals, streaming, continue, cancel."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.aio.client import Client as NATS

import jsworker
from jsworker import EmbeddedServer


async def events_of(nc: NATS, run_id: str, settle: float = 0.5) -> list[dict[str, Any]]:
    return [ev async for ev in jsworker.Client(nc).run_events(run_id, timeout=settle)]


async def test_task_ten_times_ack_wait_completes_once(
    nc: NATS, unique: Callable[[str], str]
) -> None:
    ttype = unique("long")
    runs = 0
    w = jsworker.Worker(nc, ack_wait=1.0)

    @w.handle(ttype)
    async def long(ctx: jsworker.TaskContext) -> object:
        nonlocal runs
        runs += 1
        await asyncio.sleep(10)  # 10x AckWait
        return {"attempt": ctx.attempt}

    async with w:
        h = await jsworker.Client(nc).submit(ttype, None)
        assert await h.result(timeout=30) == {"attempt": 1}
    assert runs == 1
    started = [e for e in await events_of(nc, h.run_id) if e["type"] == "step.started"]
    assert len(started) == 1


async def test_explicit_heartbeat_from_handler(nc: NATS, unique: Callable[[str], str]) -> None:
    ttype = unique("hb")
    w = jsworker.Worker(nc, ack_wait=30.0)

    @w.handle(ttype, ack_wait=1.0)
    async def beat(ctx: jsworker.TaskContext) -> object:
        for _ in range(6):
            await ctx.heartbeat()
            await asyncio.sleep(0.5)
        return ctx.attempt

    async with w:
        h = await jsworker.Client(nc).submit(ttype)
        assert await h.result(timeout=20) == 1


CRASHY = textwrap.dedent(
    """
    import asyncio, os, signal, sys, nats, jsworker

    async def main():
        nc = await nats.connect(os.environ["NATS_URL"])
        w = jsworker.Worker(nc, ack_wait=2.0)

        @w.handle(sys.argv[1])
        async def count(ctx):
            state = await ctx.load_checkpoint() or {"i": 0}
            print("RESUME", state["i"], flush=True)
            for i in range(state["i"], 10):
                await ctx.checkpoint({"i": i})
                print("STEP", i, flush=True)
                if i == 4 and ctx.attempt == 1:
                    # the first attempt holds here (heartbeating) until the test kills
                    # it: where the kill lands never depends on how fast the test reads
                    await asyncio.Event().wait()
                await asyncio.sleep(0.1)
            return {"resumed_from": state["i"], "pid": os.getpid()}

        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        await w.start()
        print("READY", flush=True)
        await stop.wait()
        await w.stop()  # finishes in-flight tasks, outcome and checkpoint cleanup included
        await nc.close()

    asyncio.run(main())
    """
)


async def _spawn(script: Path, ttype: str, env: dict[str, str]) -> asyncio.subprocess.Process:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(script), ttype, env=env, stdout=asyncio.subprocess.PIPE
    )
    assert proc.stdout is not None
    line = await asyncio.wait_for(proc.stdout.readline(), 20)
    assert line.strip() == b"READY", line
    return proc


async def _stop(proc: asyncio.subprocess.Process) -> int:
    """SIGTERM ``proc`` (a graceful stop in CRASHY) and return its exit code; SIGKILL it
    if it is not gone within 20 s."""
    if proc.returncode is None:
        proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), 20)
        except TimeoutError:
            proc.kill()
    return await proc.wait()


async def test_sigkill_redelivers_and_resumes_from_checkpoint(
    nc: NATS, unique: Callable[[str], str], server_env: dict[str, str], tmp_path: Path
) -> None:
    ttype = unique("resume")
    script = tmp_path / "crashy.py"
    script.write_text(CRASHY)
    first = await _spawn(script, ttype, server_env)
    try:
        h = await jsworker.Client(nc).submit(ttype)
        assert first.stdout is not None
        # the first attempt checkpoints steps 0-4 and holds at 4
        while True:
            line = (await asyncio.wait_for(first.stdout.readline(), 20)).decode()
            assert line, "the first worker exited before step 4"
            if line.startswith("STEP 4"):
                break
    finally:
        first.kill()  # SIGKILL: no chance to nak, ack or clean up
        await first.wait()
    second = await _spawn(script, ttype, server_env)
    try:
        t0 = time.monotonic()
        out = await h.result(timeout=30)
        assert out == {"resumed_from": 4, "pid": second.pid}  # never from the start
        # redelivered after about one AckWait (2 s) plus the remaining work (0.5 s),
        # with room for a loaded machine
        assert time.monotonic() - t0 < 25
    finally:
        # a graceful stop: the worker finishes what it holds, including the cleanup
        # after the outcome, before the process exits
        code = await _stop(second)
    assert code == 0
    # the finished task's checkpoint is cleaned up
    kv = await nc.jetstream().key_value("checkpoints")
    with pytest.raises(nats.js.errors.KeyNotFoundError):
        await kv.get(f"{h.run_id}.{h.step_id}")


async def test_signal_sent_before_and_after_wait(nc: NATS, unique: Callable[[str], str]) -> None:
    ttype = unique("sig")
    w = jsworker.Worker(nc)

    @w.handle(ttype)
    async def waiter(ctx: jsworker.TaskContext) -> object:
        return await ctx.wait_for_signal("approve", timeout=10)

    client = jsworker.Client(nc)
    async with w:
        run_before = unique("run")
        await client.send_signal(run_before, "approve", {"by": "alice"})
        h1 = await client.submit(ttype, run_id=run_before)
        assert await h1.result(timeout=10) == {"by": "alice"}

        h2 = await client.submit(ttype, run_id=unique("run"))
        await asyncio.sleep(0.5)  # the handler is waiting now
        await client.send_signal(h2.run_id, "approve", {"by": "bob"})
        assert await h2.result(timeout=10) == {"by": "bob"}
        listed = await client.services.list_signals(h2.run_id)
        assert listed == {"approve": {"by": "bob"}}


async def test_signal_wait_timeout_is_catchable(nc: NATS, unique: Callable[[str], str]) -> None:
    ttype = unique("sigto")
    w = jsworker.Worker(nc)

    @w.handle(ttype)
    async def waiter(ctx: jsworker.TaskContext) -> object:
        t0 = time.monotonic()
        try:
            await ctx.wait_for_signal("never", timeout=0.5)
        except jsworker.SignalTimeoutError as e:
            return {"timed_out": True, "waited": time.monotonic() - t0, "msg": str(e)}
        return {"timed_out": False}

    async with w:
        h = await jsworker.Client(nc).submit(ttype)
        out = await h.result(timeout=10)
    assert out["timed_out"] is True
    assert 0.4 < out["waited"] < 3
    assert "never" in out["msg"]


@pytest.mark.parametrize("bad", [0, -1, 3601, float("nan")])
async def test_signal_timeout_validated(nc: NATS, unique: Callable[[str], str], bad: float) -> None:
    ttype = unique("sigbad")
    w = jsworker.Worker(nc)

    @w.handle(ttype)
    async def waiter(ctx: jsworker.TaskContext) -> object:
        try:
            await ctx.wait_for_signal("x", timeout=bad)
        except jsworker.ConfigError as e:
            return str(e)
        return "accepted"

    async with w:
        h = await jsworker.Client(nc).submit(ttype)
        assert "timeout" in await h.result(timeout=10)


async def test_reserved_signal_names_refused(nc: NATS) -> None:
    with pytest.raises(jsworker.InvalidNameError):
        await jsworker.Client(nc).send_signal("run-1", "_cancel")
    with pytest.raises(jsworker.InvalidNameError):
        await jsworker.Client(nc).send_signal("run-1", "a.b")


async def test_stream_of_1000_chunks_in_order(nc: NATS, unique: Callable[[str], str]) -> None:
    ttype = unique("stream")
    w = jsworker.Worker(nc)

    @w.handle(ttype)
    async def producer(ctx: jsworker.TaskContext) -> object:
        for i in range(1000):
            await ctx.stream({"i": i})
        return "done"

    async with w:
        h = await jsworker.Client(nc).submit(ttype, stream=True)
        items = [item async for item in h.stream(timeout=30)]
    chunks = [it for it in items if not it.final]
    assert [c.data["i"] for c in chunks] == list(range(1000))
    assert [c.seq for c in chunks] == list(range(1, 1001))
    assert items[-1].final and items[-1].data == "done"


async def test_continue_loop_ends_at_bound(nc: NATS, unique: Callable[[str], str]) -> None:
    ttype = unique("loop")
    seen: list[int] = []
    w = jsworker.Worker(nc)

    @w.handle(ttype, max_iterations=50)
    async def loop(ctx: jsworker.TaskContext) -> None:
        seen.append(ctx.info.iteration)
        state = await ctx.load_checkpoint() or {"n": 0}
        await ctx.checkpoint({"n": state["n"] + 1})
        ctx.continue_({"n": state["n"] + 1})

    async with w:
        h = await jsworker.Client(nc).submit(ttype, {"n": 0})
        with pytest.raises(jsworker.TaskFailed) as ei:
            await h.result(timeout=60)
    assert ei.value.kind == "max_iterations"
    assert seen == list(range(50))
    evs = await events_of(nc, h.run_id)
    assert sum(e["type"] == "step.continue" for e in evs) == 49


async def test_continue_successor_is_deduplicated(nc: NATS, unique: Callable[[str], str]) -> None:
    """A redelivered iteration republishes its successor with the same Nats-Msg-Id
    (``{run}.{step}.{iteration+1}``); the stream keeps only the first one. Here the
    first publish is made by hand, exactly as a crashed earlier attempt would have."""
    ttype = unique("cont")
    calls: dict[int, list[Any]] = {}
    w = jsworker.Worker(nc)

    @w.handle(ttype, max_iterations=10)
    async def step(ctx: jsworker.TaskContext) -> object:
        it = ctx.info.iteration
        calls.setdefault(it, []).append(ctx.json())
        if it == 2:
            return {"final": ctx.json()}
        if it == 1:
            body = jsworker._wire.TaskPayload(
                task_id="x",
                run_id=ctx.run_id,
                step_id=ctx.step_id,
                iteration=2,
                input={"from": "earlier attempt"},
            ).encode()
            ack = await nc.jetstream().publish(
                ctx.info.subject,
                body,
                headers={"Nats-Msg-Id": f"{ctx.run_id}.{ctx.step_id}.2"},
            )
            assert not ack.duplicate
        ctx.continue_({"from": f"iteration {it}"})
        return None

    async with w:
        h = await jsworker.Client(nc).submit(ttype)
        assert await h.result(timeout=20) == {"final": {"from": "earlier attempt"}}
        await asyncio.sleep(0.5)
    assert len(calls[2]) == 1


async def test_cancel_queued_task_never_runs(nc: NATS, unique: Callable[[str], str]) -> None:
    ttype = unique("cq")
    ran = []
    client = jsworker.Client(nc)
    h = await client.submit(ttype)
    await h.cancel("no longer needed")
    w = jsworker.Worker(nc)

    @w.handle(ttype)
    async def never(ctx: jsworker.TaskContext) -> None:
        ran.append(ctx.run_id)

    async with w:
        with pytest.raises(jsworker.TaskFailed) as ei:
            await h.result(timeout=10)
    assert ei.value.kind == "cancelled"
    assert "no longer needed" in ei.value.error
    assert ran == []
    assert w.stats.cancelled == 1


async def test_cancel_running_task(nc: NATS, unique: Callable[[str], str]) -> None:
    ttype = unique("cr")
    started = asyncio.Event()
    interrupted = []
    w = jsworker.Worker(nc)

    @w.handle(ttype)
    async def slow(ctx: jsworker.TaskContext) -> None:
        started.set()
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            interrupted.append(ctx.cancelled)
            raise

    async with w:
        h = await jsworker.Client(nc).submit(ttype)
        await asyncio.wait_for(started.wait(), 10)
        t0 = time.monotonic()
        await h.cancel()
        with pytest.raises(jsworker.TaskFailed) as ei:
            await h.result(timeout=10)
        assert time.monotonic() - t0 < 5
    assert ei.value.kind == "cancelled"
    assert interrupted == [True]
    types = [e["type"] for e in await events_of(nc, h.run_id)]
    assert types == ["step.started", "step.cancelled"]


async def test_missing_optional_buckets_give_clear_errors(
    fresh_server: EmbeddedServer, unique: Callable[[str], str]
) -> None:
    nc = await nats.connect(fresh_server.url)
    try:
        await jsworker.setup_all(nc, optional=())
        ttype = unique("nobucket")
        w = jsworker.Worker(nc)
        errors: dict[str, str] = {}

        @w.handle(ttype)
        async def probe(ctx: jsworker.TaskContext) -> object:
            for name, coro in (
                ("checkpoint", lambda: ctx.checkpoint({"a": 1})),
                ("load_checkpoint", ctx.load_checkpoint),
                ("wait_for_signal", lambda: ctx.wait_for_signal("x", 1)),
                ("send_signal", lambda: ctx.send_signal("r", "x", 1)),
            ):
                try:
                    await coro()
                except jsworker.NotProvisionedError as e:
                    errors[name] = str(e)
            return sorted(errors)

        client = jsworker.Client(nc)
        async with w:
            h = await client.submit(ttype)
            assert await h.result(timeout=10) == [
                "checkpoint",
                "load_checkpoint",
                "send_signal",
                "wait_for_signal",
            ]
        assert all("jsworker kv setup" in m for m in errors.values())
        with pytest.raises(jsworker.NotProvisionedError, match="jsworker kv setup"):
            await client.cancel("run-x")
        with pytest.raises(jsworker.NotProvisionedError, match="signals"):
            await client.send_signal("run-x", "go")
    finally:
        await nc.close()


async def test_sync_handler_uses_context_io(nc: NATS, unique: Callable[[str], str]) -> None:
    ttype = unique("synio")
    w = jsworker.Worker(nc)

    @w.handle(ttype)
    def sync_handler(ctx: jsworker.TaskContext) -> object:
        ctx.run(ctx.checkpoint({"k": 1}))
        return ctx.run(ctx.load_checkpoint())

    async with w:
        h = await jsworker.Client(nc).submit(ttype)
        assert await h.result(timeout=10) == {"k": 1}


def test_script_is_valid_python() -> None:
    compile(CRASHY, "crashy.py", "exec")
    assert json.dumps({"env": "NATS_URL" in CRASHY}) == '{"env": true}'
    assert os.sep  # keep imports honest on every platform
