"""jsworker in DagNats mode against the real DagNats engine (v0.0.12).

A real nats-server, the real ``dagnats-engine`` and ``dagnats`` CLI (and, where two
languages share work, DagNats's own Go worker package in ``tests/dagnats_peer``). Every
check reads the engine's own view: its run record and CLI status, the run's history,
its dead letters. Skipped, with the reason, where the DagNats binaries are missing
(``.ci/run`` installs them when the Go module proxy serves them).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import nats
import pytest
from dagnats_env import (
    Engine,
    engine_for,
    history,
    peer_bin,
    step_output,
    wait_run,
    wait_step,
)
from nats.aio.client import Client as NATS
from nats.js.api import DeliverPolicy

import jsworker
from jsworker import EmbeddedServer

SECOND = 1_000_000_000


@pytest.fixture(scope="module")
def dserver() -> Iterator[EmbeddedServer]:
    srv = EmbeddedServer().start_sync()
    yield srv
    srv.stop_sync()


@pytest.fixture(scope="module")
def engine(dserver: EmbeddedServer) -> Iterator[Engine]:
    yield from engine_for(dserver.url)


@pytest.fixture
async def dnc(dserver: EmbeddedServer, engine: Engine) -> AsyncIterator[NATS]:
    client = await nats.connect(dserver.url)
    yield client
    await client.close()


def step(sid: str, task: str, *, deps: tuple[str, ...] = (), **extra: Any) -> dict[str, Any]:
    return {
        "id": sid,
        "task": task,
        "type": extra.pop("type", "normal"),
        "depends_on": list(deps),
        "timeout": extra.pop("timeout", 60 * SECOND),
        **extra,
    }


def workflow(name: str, *steps: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "version": "1", "steps": list(steps)}


class Peer:
    """The Go peer worker process: ``lines`` are the tasks it ran."""

    def __init__(self, url: str, *args: str) -> None:
        self.proc = subprocess.Popen(
            [peer_bin(), "-url", url, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        assert self.proc.stdout is not None
        first = self.proc.stdout.readline()
        assert first.strip() == "ready", first
        self._ran: list[tuple[str, str, int]] | None = None

    def stop(self) -> list[tuple[str, str, int]]:
        """Stop the process (once; later calls return the same list): (run, step, attempt)s."""
        if self._ran is None:
            self.proc.terminate()
            out, _ = self.proc.communicate(timeout=40)
            self._ran = []
            for line in out.splitlines():
                if line.startswith("ran "):
                    _, run, sid, attempt = line.split()
                    self._ran.append((run, sid, int(attempt)))
        return self._ran


# ---------------------------------------------------------------------- DAGs
async def test_mode_is_detected_and_a_three_step_dag_passes_outputs(
    dnc: NATS, engine: Engine, unique: Any
) -> None:
    t = unique("add")
    name = unique("wf3")
    engine.register(
        workflow(name, step("a", t), step("b", t, deps=("a",)), step("c", t, deps=("b",)))
    )
    seen: list[tuple[str, str, Any]] = []
    worker = jsworker.Worker(dnc)  # engine="auto": the server is DagNats's

    @worker.handle(t)
    async def add(ctx: jsworker.TaskContext) -> Any:
        seen.append((ctx.info.task_id, ctx.step_id, ctx.json()))
        return {"n": ctx.json()["n"] + 1}

    async with worker:
        assert worker.engine == "dagnats"
        run_id = engine.start_run(name, {"n": 1})
        run = await wait_run(dnc, run_id)
    assert run["status"] == "completed"
    # dotted task ids are served, not dead-lettered
    assert [s[0] for s in seen] == [f"{run_id}.a", f"{run_id}.b", f"{run_id}.c"]
    # step.completed's payload is the raw output: each step got the previous one's
    assert [s[2] for s in seen] == [{"n": 1}, {"n": 2}, {"n": 3}]
    assert step_output(run["steps"]["c"]) == {"n": 4}
    status = engine.status(run_id)  # the CLI's view
    assert status["status"] == "completed"
    assert {s: v["attempts"] for s, v in status["steps"].items()} == {"a": 1, "b": 1, "c": 1}
    events = await history(dnc, run_id)
    done = [e for e in events if e["type"] == "step.completed"]
    assert [e["payload"] for e in done] == [{"n": 2}, {"n": 3}, {"n": 4}]
    assert all(e["worker_id"] == worker.worker_id for e in done)
    assert all(e["attempt_number"] == 1 for e in done)


async def test_a_map_step_runs_each_instance(dnc: NATS, engine: Engine, unique: Any) -> None:
    src, each, gather = unique("urls"), unique("resize"), unique("gallery")
    name = unique("wfmap")
    engine.register(
        workflow(
            name,
            step("fetch", src),
            step("resize", each, deps=("fetch",), type="map", config={"max_items": 10}),
            step("gallery", gather, deps=("resize",)),
        )
    )
    instances: list[str] = []
    worker = jsworker.Worker(dnc, engine="dagnats")
    worker.handle(src, lambda ctx: ["a.png", "b.png", "c.png"])

    @worker.handle(each)
    async def resize(ctx: jsworker.TaskContext) -> str:
        instances.append(ctx.step_id)
        return str(ctx.json()).replace(".png", "_thumb.png")

    worker.handle(gather, lambda ctx: {"gallery": ctx.json()})
    async with worker:
        run_id = engine.start_run(name)
        run = await wait_run(dnc, run_id)
    assert run["status"] == "completed", run
    assert sorted(instances) == ["resize.map.0", "resize.map.1", "resize.map.2"]
    assert step_output(run["steps"]["gallery"]) == {
        "gallery": ["a_thumb.png", "b_thumb.png", "c_thumb.png"]
    }


async def test_groups_route(dnc: NATS, engine: Engine, unique: Any) -> None:
    t, name = unique("gpu-task"), unique("wfgrp")
    engine.register(workflow(name, step("s", t, worker_group="gpu")))
    cpu = jsworker.Worker(dnc, engine="dagnats", groups=["cpu"])
    gpu = jsworker.Worker(dnc, engine="dagnats", groups=["gpu"])
    cpu.handle(t, lambda ctx: "cpu")
    gpu.handle(t, lambda ctx: "gpu")
    async with cpu, gpu:
        run_id = engine.start_run(name)
        run = await wait_run(dnc, run_id)
        consumers = {c.name for c in await dnc.jetstream().consumers_info("TASK_QUEUES")}
    assert step_output(run["steps"]["s"]) == "gpu"
    assert {f"workers-{t}-gpu", f"workers-{t}-cpu"} <= consumers


# ------------------------------------------------------------------ outcomes
async def test_a_retriable_failure_is_retried_by_the_engine(
    dnc: NATS, engine: Engine, unique: Any
) -> None:
    t, name = unique("flaky"), unique("wfretry")
    retry = {"max_attempts": 3, "strategy": "fixed", "initial_delay": SECOND // 5}
    engine.register(workflow(name, step("s", t, retry=retry)))
    attempts: list[int] = []
    worker = jsworker.Worker(dnc, engine="dagnats")

    @worker.handle(t)
    async def flaky(ctx: jsworker.TaskContext) -> Any:
        attempts.append(ctx.attempt)
        if ctx.attempt < 2:
            raise ValueError("not yet")
        return "ok"

    async with worker:
        run_id = engine.start_run(name)
        run = await wait_run(dnc, run_id)
    assert run["status"] == "completed"
    assert attempts == [1, 2]  # one execution per attempt: the engine retried, not we
    assert run["steps"]["s"]["attempts"] == 2
    failed = [e for e in await history(dnc, run_id) if e["type"] == "step.failed"]
    assert len(failed) == 1
    assert failed[0]["payload"]["failure_type"] == "retriable"
    assert failed[0]["payload"]["error"] == "ValueError: not yet"
    assert failed[0]["attempt_number"] == 1


async def dead_letters(nc: NATS, task_type: str) -> list[Any]:
    js = nc.jetstream()
    info = await js.stream_info("DEAD_LETTERS", subjects_filter=f"dead.{task_type}.>")
    return list((info.state.subjects or {}).items())


async def test_fail_permanent_fails_the_run_with_one_engine_dead_letter(
    dnc: NATS, engine: Engine, unique: Any
) -> None:
    t, name = unique("perm"), unique("wfperm")
    retry = {"max_attempts": 5, "strategy": "fixed", "initial_delay": SECOND // 5}
    engine.register(workflow(name, step("s", t, retry=retry)))
    calls = 0
    worker = jsworker.Worker(dnc, engine="dagnats")

    @worker.handle(t)
    def perm(ctx: jsworker.TaskContext) -> None:
        nonlocal calls
        calls += 1
        ctx.fail_permanent("bad input")

    async with worker:
        run_id = engine.start_run(name)
        run = await wait_run(dnc, run_id)
    assert run["status"] == "failed"
    assert calls == 1
    failed = [e for e in await history(dnc, run_id) if e["type"] == "step.failed"]
    assert [e["payload"] for e in failed] == [
        {"error": "bad input", "failure_type": "non_retriable"}
    ]
    letters = await dead_letters(dnc, t)
    assert letters == [(f"dead.{t}.{run_id}.s", 1)]  # the engine's, and only it


async def test_fail_retry_after_delays_as_asked(dnc: NATS, engine: Engine, unique: Any) -> None:
    t, name = unique("later"), unique("wflater")
    retry = {"max_attempts": 3, "strategy": "fixed", "initial_delay": SECOND // 10}
    engine.register(workflow(name, step("s", t, retry=retry)))
    starts: list[float] = []
    worker = jsworker.Worker(dnc, engine="dagnats")

    @worker.handle(t)
    def later(ctx: jsworker.TaskContext) -> Any:
        starts.append(time.monotonic())
        if ctx.attempt == 1:
            ctx.fail_retry_after("busy", 1.5)
            return None
        return "done"

    async with worker:
        run_id = engine.start_run(name)
        run = await wait_run(dnc, run_id)
    assert run["status"] == "completed"
    assert len(starts) == 2
    assert starts[1] - starts[0] >= 1.4  # not the policy's 0.1 s
    failed = [e for e in await history(dnc, run_id) if e["type"] == "step.failed"]
    assert failed[0]["payload"] == {
        "error": "busy",
        "failure_type": "retry_after",
        "retry_after_ms": 1500,
    }


async def test_an_agent_loop_runs_each_iteration_once(
    dnc: NATS, engine: Engine, unique: Any
) -> None:
    t, name = unique("loop"), unique("wfloop")
    engine.register(
        workflow(name, step("count", t, type="agent_loop", config={"max_iterations": 10}))
    )
    iterations: list[tuple[int, Any]] = []
    worker = jsworker.Worker(dnc, engine="dagnats")

    @worker.handle(t)
    def count(ctx: jsworker.TaskContext) -> None:
        # DagNats gives every iteration the step's input; the iteration number says
        # where the loop is (its Go examples keep state in a checkpoint)
        iterations.append((ctx.info.iteration, ctx.json()))
        if ctx.info.iteration < 3:
            ctx.continue_({"at": ctx.info.iteration})
        else:
            ctx.complete({"done": ctx.info.iteration})

    async with worker:
        run_id = engine.start_run(name, {"goal": 3})
        run = await wait_run(dnc, run_id)
    assert run["status"] == "completed", run
    assert iterations == [(i, {"goal": 3}) for i in range(4)]  # each iteration once
    assert step_output(run["steps"]["count"]) == {"done": 3}
    continues = [e for e in await history(dnc, run_id) if e["type"] == "step.continue"]
    assert [e["payload"] for e in continues] == [{"at": 0}, {"at": 1}, {"at": 2}]


# ---------------------------------------------------------- two languages
async def test_a_go_worker_and_a_jsworker_worker_share_one_type(
    dserver: EmbeddedServer, dnc: NATS, engine: Engine, unique: Any
) -> None:
    t, name = unique("shared"), unique("wfshared")
    engine.register(workflow(name, step("s", t)))
    peer = Peer(dserver.url, "-type", t, "-sleep", "20ms")
    ran: list[tuple[str, str]] = []
    worker = jsworker.Worker(dnc, engine="dagnats", concurrency=1)

    @worker.handle(t)
    async def py(ctx: jsworker.TaskContext) -> Any:
        ran.append((ctx.run_id, ctx.step_id))
        await asyncio.sleep(0.02)
        return {"by": "python"}

    try:
        async with worker:
            runs = [engine.start_run(name, {"i": i}) for i in range(30)]
            results = [await wait_run(dnc, r) for r in runs]
    finally:
        go_ran = peer.stop()
    assert all(r["status"] == "completed" for r in results)
    by = [step_output(r["steps"]["s"])["by"] for r in results]
    assert "go" in by and "python" in by  # the work was shared
    executions = ran + [(r, s) for r, s, _ in go_ran]
    assert sorted(executions) == sorted((r, "s") for r in runs)  # each ran exactly once


async def test_a_partitioned_type_with_members_of_both_languages(
    dserver: EmbeddedServer, dnc: NATS, engine: Engine, unique: Any
) -> None:
    t, name = unique("parts"), unique("wfparts")
    engine.register(workflow(name, step("s", t)))
    peer = Peer(dserver.url, "-type", t, "-partitions", "4")
    ran: list[str] = []
    worker = jsworker.Worker(dnc, engine="dagnats", partitions=4)

    @worker.handle(t)
    def py(ctx: jsworker.TaskContext) -> Any:
        ran.append(ctx.run_id)
        return {"by": "python"}

    try:
        async with worker:
            kv = await dnc.jetstream().key_value("elastic-consumer-groups")
            cfg = json.loads((await kv.get(f"TASK_QUEUES.workers-{t}")).value or b"")
            assert cfg["max_members"] == 4 and len(cfg["members"]) == 2
            assert cfg["partitioning_filters"] == [
                {"filter": f"task.{t}.>", "partitioning_wildcards": None}
            ]
            shown = await asyncio.to_thread(
                subprocess.run,
                [
                    sys.executable,
                    "-m",
                    "jsworker.cli",
                    "--url",
                    dserver.url,
                    "partitions",
                    "show",
                    t,
                    "--json",
                ],
                capture_output=True,
                text=True,
                timeout=30,
            )
            assert shown.returncode == 0, shown.stderr
            assert worker.worker_id in shown.stdout and f"workers-{t}" in shown.stdout
            runs = [engine.start_run(name, {"i": i}) for i in range(40)]
            results = [await wait_run(dnc, r) for r in runs]
    finally:
        go_ran = peer.stop()
    assert all(r["status"] == "completed" for r in results)
    by = {step_output(r["steps"]["s"])["by"] for r in results}
    assert by == {"go", "python"}
    assert sorted(ran + [r for r, _, _ in go_ran]) == sorted(runs)


# -------------------------------------------------------------- cancellation
async def test_cancelling_a_run_from_the_cli_stops_the_handler(
    dnc: NATS, engine: Engine, unique: Any
) -> None:
    t, name = unique("long"), unique("wfcancel")
    engine.register(workflow(name, step("s", t)))
    running, ended = asyncio.Event(), asyncio.Event()
    saw: list[bool] = []
    worker = jsworker.Worker(dnc, engine="dagnats")

    @worker.handle(t)
    async def long(ctx: jsworker.TaskContext) -> Any:
        running.set()
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            saw.append(ctx.cancelled)
            raise
        finally:
            ended.set()
        return "too late"

    async with worker:
        run_id = engine.start_run(name)
        await asyncio.wait_for(running.wait(), 20)
        await asyncio.to_thread(engine.cli, "run", "cancel", run_id)
        run = await wait_run(dnc, run_id)
        await asyncio.wait_for(ended.wait(), 10)
    assert run["status"] == "cancelled"
    assert saw == [True]
    assert not [e for e in await history(dnc, run_id) if e["type"] == "step.completed"]


# ----------------------------------------------------------------- bad input
async def test_a_body_of_wrong_json_types_ends_as_step_failed(
    dnc: NATS, engine: Engine, unique: Any
) -> None:
    t, name = unique("typed"), unique("wftyped")
    engine.register(workflow(name, step("s", t, retry={"max_attempts": 1, "strategy": "fixed"})))
    worker = jsworker.Worker(dnc, engine="dagnats")
    worker.handle(t, lambda ctx: "never")
    async with worker:
        # the engine's own dispatch, then a foreign body for the same run and step
        run_id = engine.start_run(name)
        await wait_run(dnc, run_id)
        bad = {"run_id": run_id, "step_id": "s", "attempt": "two", "metadata": {"k": 3}}
        sub = await dnc.jetstream().subscribe(
            f"history.{run_id}", ordered_consumer=True, deliver_policy=DeliverPolicy.NEW
        )
        await dnc.jetstream().publish(f"task.{t}.{run_id}", json.dumps(bad).encode())
        failed = []
        async with asyncio.timeout(10):
            while not failed:
                e = json.loads((await sub.next_msg(timeout=10)).data)
                if e["type"] == "step.failed":
                    failed.append(e)
        await sub.unsubscribe()
    assert failed[0]["payload"]["failure_type"] == "non_retriable"
    assert "metadata must be an object of strings" in failed[0]["payload"]["error"]


async def test_a_step_whose_output_cannot_be_recorded_fails_for_the_engine(
    dnc: NATS, engine: Engine, unique: Any
) -> None:
    t, name = unique("huge"), unique("wfhuge")
    engine.register(workflow(name, step("s", t, retry={"max_attempts": 3, "strategy": "fixed"})))
    worker = jsworker.Worker(dnc, engine="dagnats")
    calls = 0

    @worker.handle(t)
    def huge(ctx: jsworker.TaskContext) -> str:
        nonlocal calls
        calls += 1
        return "x" * (dnc.max_payload + 10)

    async with worker:
        run_id = engine.start_run(name)
        run = await wait_run(dnc, run_id)
    assert run["status"] == "failed"
    assert calls == 1  # non_retriable: retrying would hit the same limit
    assert "the server's max_payload of" in run["steps"]["s"]["error"]


async def test_a_server_whose_task_stream_is_not_a_work_queue_is_refused(
    unique: Any,
) -> None:
    async with EmbeddedServer() as srv:
        nc = await nats.connect(srv.url)
        try:
            js = nc.jetstream()
            await js.add_stream(name="TASK_QUEUES", subjects=["task.>"])
            await js.add_stream(name="WORKFLOW_HISTORY", subjects=["history.>"])
            worker = jsworker.Worker(nc, engine="dagnats")
            worker.handle(unique("t"), lambda ctx: None)
            with pytest.raises(jsworker.ConfigError) as e:
                await worker.start()
            assert str(e.value).startswith("stream TASK_QUEUES has retention limits;")
            assert "\n" not in str(e.value)
        finally:
            await nc.close()


async def test_wait_step_helper_sees_running(dnc: NATS, engine: Engine, unique: Any) -> None:
    """The engine marks a step running from jsworker's (awaited) step.started."""
    t, name = unique("armed"), unique("wfarmed")
    engine.register(workflow(name, step("s", t)))
    release = asyncio.Event()
    worker = jsworker.Worker(dnc, engine="dagnats")

    @worker.handle(t)
    async def armed(ctx: jsworker.TaskContext) -> str:
        await release.wait()
        return "ok"

    async with worker:
        run_id = engine.start_run(name)
        run = await wait_step(dnc, run_id, "s", "running")
        assert run["steps"]["s"]["status"] == "running"
        release.set()
        assert (await wait_run(dnc, run_id))["status"] == "completed"


# ------------------------------------------------------------- provisioning
def kv_setup(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "jsworker.cli", "--url", url, "kv", "setup", "--json", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


async def stream_configs(nc: NATS) -> dict[str, dict[str, Any]]:
    out = {}
    for info in await nc.jetstream().streams_info():
        cfg = info.config.as_dict()
        cfg.pop("metadata", None)
        out[info.config.name] = cfg
    return out


async def test_kv_setup_on_a_dagnats_server_changes_nothing_dagnats_owns(
    dserver: EmbeddedServer, dnc: NATS, engine: Engine
) -> None:
    before = await stream_configs(dnc)
    first = kv_setup(dserver.url)
    assert first.returncode == 0, first.stderr
    after = await stream_configs(dnc)
    assert {k: after[k] for k in before} == before  # every existing stream as it was
    statuses = {r["name"]: r["status"] for r in json.loads(first.stdout)}
    assert statuses["WORKFLOW_HISTORY"] == "compatible"  # DagNats's 5 s dedup, kept
    assert statuses["STICKY_TASKS"] in ("exists", "compatible")
    check = kv_setup(dserver.url, "--check")
    assert check.returncode == 0, check.stdout
    assert {r["status"] for r in json.loads(check.stdout)} <= {"exists", "compatible"}
    # and the engine still starts on it
    engine.stop()
    engine.start()


async def test_the_engine_starts_on_a_server_jsworker_provisioned() -> None:
    async with EmbeddedServer() as srv:
        res = kv_setup(srv.url)
        assert res.returncode == 0, res.stderr
        for eng in engine_for(srv.url):  # raises if dagnats-engine refuses to start
            assert eng.proc is not None and eng.proc.poll() is None


# --------------------------------------------------------------- the CLI
APP = """
import jsworker

def make_worker(nc):
    w = jsworker.Worker(nc, engine="standalone")  # the command line's --engine wins

    @w.handle("{t}")
    def double(ctx):
        return {{"n": ctx.json()["n"] * 2}}

    return w
"""


async def test_serve_with_engine_dagnats_serves_a_workflow_and_says_its_mode(
    dserver: EmbeddedServer, dnc: NATS, engine: Engine, unique: Any, tmp_path: Any
) -> None:
    t, name = unique("double"), unique("wfserve")
    engine.register(workflow(name, step("s", t)))
    (tmp_path / "steps.py").write_text(APP.format(t=t))
    proc = subprocess.Popen(  # noqa: ASYNC220 - the test waits for its banner
        [
            sys.executable,
            "-m",
            "jsworker.cli",
            "--url",
            dserver.url,
            "serve",
            "steps:make_worker",
            "--app-dir",
            str(tmp_path),
            "--engine",
            "dagnats",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert proc.stdout is not None
        banner = proc.stdout.readline()
        assert "dagnats mode" in banner, banner
        run_id = engine.start_run(name, {"n": 21})
        run = await wait_run(dnc, run_id)
        assert step_output(run["steps"]["s"]) == {"n": 42}
        listed = subprocess.run(  # noqa: ASYNC221 - a short CLI call
            [sys.executable, "-m", "jsworker.cli", "--url", dserver.url, "workers", "--json"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        mine = [e for e in json.loads(listed.stdout) if t in (e.get("task_types") or [])]
        assert [e["engine"] for e in mine] == ["dagnats"]
        go_view = engine.cli("workers")  # DagNats's CLI reads jsworker's entry too
        assert go_view.returncode == 0
    finally:
        proc.terminate()
        proc.communicate(timeout=30)
    assert proc.returncode == 0


# ------------------------------------------------------- the interactive mode
REDEFINE_V1 = """
async def until_released():
    sub = await session.nc.subscribe("release.{t}")
    await session.nc.publish("ready.{t}", b"")  # subscribed: the test may release
    try:
        await sub.next_msg(timeout=60)
    finally:
        await sub.unsubscribe()

@session.handle({t!r})
async def step(ctx):
    if ctx.step_id == "b":
        await until_released()  # step b is held, on version 1, until the test says so
    return "v1"
"""
# registering without waiting for version 1's running execution (step b) to end
REDEFINE_V2 = """
async def step(ctx):
    return "v2"

session.worker.handle({t!r}, step)
[(h["task_type"], h["version"]) for h in session.handlers()]
"""


async def test_a_notebook_kernel_serves_a_live_workflow_and_swaps_code_mid_run(
    dserver: EmbeddedServer, dnc: NATS, engine: Engine, unique: Any
) -> None:
    from interactive_helpers import Kernel
    from test_interactive_kernel import kernel_env

    t, name = unique("nbstep"), unique("wfnb")
    engine.register(
        workflow(name, step("a", t), step("b", t, deps=("a",)), step("c", t, deps=("b",)))
    )
    k = await Kernel(kernel_env(dserver)).start()
    try:
        await k.ok("import asyncio\n%load_ext jsworker")
        await k.ok(f"%jsworker connect {dserver.url}")
        mode = await k.ok("session.worker.engine")
        assert mode.text == "'dagnats'"  # detected: the server is DagNats's
        await k.ok(REDEFINE_V1.format(t=t))
        ready = await dnc.subscribe(f"ready.{t}")
        run_id = engine.start_run(name)
        await ready.next_msg(timeout=30)  # step b runs (v1) and waits for the release
        swapped = await k.ok(REDEFINE_V2.format(t=t))  # b still runs on v1; c on v2
        assert swapped.text == repr([(t, 2)])
        await dnc.publish(f"release.{t}", b"")
        run = await wait_run(dnc, run_id)
        await k.ok("%jsworker close")
    finally:
        await k.stop()
    assert run["status"] == "completed"
    assert [step_output(run["steps"][s]) for s in "abc"] == ["v1", "v1", "v2"]


def test_the_repl_serves_a_live_workflow_and_swaps_code_mid_run(
    dserver: EmbeddedServer, engine: Engine, unique: Any, tmp_path: Any
) -> None:
    from test_interactive_repl import PROMPT, Screen, repl_env

    t, name = unique("replstep"), unique("wfrepl")
    engine.register(
        workflow(name, step("a", t), step("b", t, deps=("a",)), step("c", t, deps=("b",)))
    )
    s = Screen(["repl", "--url", dserver.url, "--engine", "dagnats"], repl_env(tmp_path))
    try:
        banner = s.expect(PROMPT)
        assert "dagnats mode" in banner
        s.statement(
            f"@handle({t!r})",
            "async def h(ctx):",
            "    if ctx.step_id == 'b':",
            f"        sub = await session.nc.subscribe('release.{t}')",
            f"        await session.nc.publish('ready.{t}', b'')",
            "        await sub.next_msg(timeout=60)",
            "    return 'v1'",
        )

        async def start_and_wait_ready() -> str:
            nc = await nats.connect(dserver.url)
            try:
                ready = await nc.subscribe(f"ready.{t}")
                run_id = await asyncio.to_thread(engine.start_run, name)
                await ready.next_msg(timeout=30)  # step b runs (v1), waiting for release
                return run_id
            finally:
                await nc.close()

        run_id = asyncio.run(start_and_wait_ready())
        s.statement("async def h2(ctx):", "    return 'v2'")
        out = s.statement(f"worker.handle({t!r}, h2); worker.handler_info()[0]['version']")
        assert "2" in out.split()

        async def release() -> None:
            nc = await nats.connect(dserver.url)
            try:
                await nc.publish(f"release.{t}", b"")
                await nc.flush()
            finally:
                await nc.close()

        asyncio.run(release())

        async def finished() -> dict[str, Any]:
            nc = await nats.connect(dserver.url)
            try:
                return await wait_run(nc, run_id)
            finally:
                await nc.close()

        run = asyncio.run(finished())
        s.p.sendeof()
        s.expect("bye")
    finally:
        if s.p.isalive():
            s.p.terminate(force=True)
    assert run["status"] == "completed"
    assert [step_output(run["steps"][x]) for x in "abc"] == ["v1", "v1", "v2"]


async def test_a_sticky_workflow_routes_its_later_steps_to_the_jsworker_worker(
    dnc: NATS, engine: Engine, unique: Any
) -> None:
    t, name = unique("sticky"), unique("wfsticky")
    wf = workflow(name, step("a", t), step("b", t, deps=("a",)))
    wf["sticky"] = "soft"
    engine.register(wf)
    subjects: list[str] = []
    worker = jsworker.Worker(dnc, engine="dagnats")

    @worker.handle(t)
    def record(ctx: jsworker.TaskContext) -> str:
        subjects.append(ctx.info.subject)
        return ctx.step_id

    async with worker:
        run_id = engine.start_run(name)
        run = await wait_run(dnc, run_id)
    assert run["status"] == "completed"
    assert subjects == [f"task.{t}.{run_id}", f"sticky.{t}.{worker.worker_id}.{run_id}"]


async def test_a_singleton_shared_with_a_go_member_runs_one_task_at_a_time(
    dserver: EmbeddedServer, dnc: NATS, engine: Engine, unique: Any
) -> None:
    t, name = unique("single"), unique("wfsingle")
    engine.register(workflow(name, step("s", t)))
    peer = Peer(dserver.url, "-type", t, "-singleton", "-sleep", "5ms")
    running = 0
    most = 0
    ran: list[str] = []
    worker = jsworker.Worker(dnc, engine="dagnats")

    @worker.handle_singleton(t)
    async def single(ctx: jsworker.TaskContext) -> Any:
        nonlocal running, most
        running += 1
        most = max(most, running)
        ran.append(ctx.run_id)
        await asyncio.sleep(0.005)
        running -= 1
        return {"by": "python"}

    try:
        async with worker:
            kv = await dnc.jetstream().key_value("elastic-consumer-groups")
            cfg = json.loads((await kv.get(f"TASK_QUEUES.workers-{t}")).value or b"")
            assert cfg["max_members"] == 1 and len(cfg["members"]) == 2
            runs = [engine.start_run(name, {"i": i}) for i in range(20)]
            results = [await wait_run(dnc, r) for r in runs]
            go_ran = peer.stop()
            assert all(r["status"] == "completed" for r in results)
            # one member holds the only partition: one process ran them all, each once
            assert sorted(ran + [r for r, _, _ in go_ran]) == sorted(runs)
            assert not (ran and go_ran)
            # with the Go member gone the partition is jsworker's: it runs the rest, one at a time
            before = len(ran)
            later = [engine.start_run(name, {"i": i}) for i in range(20, 30)]
            done = [await wait_run(dnc, r) for r in later]
            assert all(r["status"] == "completed" for r in done)
    finally:
        peer.stop()
    assert sorted(ran[before:]) == sorted(later)
    assert most == 1
