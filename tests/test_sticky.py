"""Sticky assignment (issue 12): the steps of a run go to the worker that ran its first
sticky step; soft runs fall back when it is gone, hard runs fail with
``sticky_worker_gone``. Three worker processes (``tests/limits_worker.py``) on a real
server; one of them is SIGKILLed mid-run."""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Callable
from typing import Any

import nats.js.errors
import pytest
from nats.aio.client import Client as NATS
from test_ratelimit import workers

import jsworker


async def events_of(client: jsworker.Client, run_id: str) -> list[dict[str, Any]]:
    return [ev async for ev in client.run_events(run_id, timeout=0.5)]


async def wait_event(
    client: jsworker.Client, run_id: str, step_id: str, etype: str, timeout: float = 20
) -> dict[str, Any]:
    async with asyncio.timeout(timeout):
        async for ev in client.run_events(run_id):
            if ev.get("step_id") == step_id and ev.get("type") == etype:
                return ev
    raise AssertionError("unreachable")


async def binding(nc: NATS, run_id: str) -> str | None:
    kv = await nc.jetstream().key_value("sticky_bindings")
    try:
        entry = await kv.get(run_id)
    except nats.js.errors.KeyNotFoundError:
        return None
    return (entry.value or b"").decode()


async def wait_unbound(nc: NATS, run_id: str, timeout: float = 10) -> None:
    """The binding is removed right after the outcome is recorded: poll for it."""
    deadline = time.monotonic() + timeout
    while (bound := await binding(nc, run_id)) is not None:
        if time.monotonic() > deadline:
            raise AssertionError(f"run {run_id} is still bound to {bound}")
        await asyncio.sleep(0.05)


async def test_sticky_steps_land_on_one_worker_and_survive_sigkill(
    nc: NATS, unique: Callable[[str], str], server_env: dict[str, str]
) -> None:
    ttype = unique("st")
    args = (ttype, "--soft", "2", "--hard", "3", "--heartbeat", "0.5")
    async with workers(server_env, 3, *args) as procs:
        client = jsworker.Client(nc)

        # a 5-step soft run: every step on the worker that ran the first one
        run = unique("run")
        outs = []
        for i in range(5):
            h = await client.submit(
                ttype, {}, run_id=run, step_id=f"s{i}", sticky="soft", last_step=i == 4
            )
            if i > 0:
                assert h.subject.startswith(f"sticky.{ttype}.")
            outs.append(await h.result(timeout=20))
        assert len({o["worker_id"] for o in outs}) == 1, outs
        await wait_unbound(nc, run)  # the run ended with its last step

        # one soft and one hard run, two steps each, then their workers are killed
        soft, hard = unique("soft"), unique("hard")
        bound = {}
        for r, mode in ((soft, "soft"), (hard, "hard")):
            for i in range(2):
                h = await client.submit(ttype, {}, run_id=r, step_id=f"s{i}", sticky=mode)
                bound[r] = (await h.result(timeout=20))["worker_id"]
            assert await binding(nc, r) == bound[r]
        slow = await client.submit(ttype, {"sleep": 3}, run_id=soft, step_id="s2", sticky="soft")
        assert slow.subject == f"sticky.{ttype}.{bound[soft]}.{soft}"
        started = await wait_event(client, soft, "s2", "step.started")
        assert started["worker_id"] == bound[soft]
        victims = [p for p in procs if p.worker_id in bound.values()]
        for p in victims:
            p.kill()
        killed = time.monotonic()
        assert len(victims) < 3
        rest = await client.submit_many(
            [
                jsworker.TaskRequest(ttype, {}, run_id=soft, step_id="s3", sticky="soft"),
                jsworker.TaskRequest(
                    ttype, {}, run_id=soft, step_id="s4", sticky="soft", last_step=True
                ),
            ]
        )
        lost = await client.submit(ttype, {}, run_id=hard, step_id="s2", sticky="hard")
        assert lost.subject == f"sticky.{ttype}.{bound[hard]}.{hard}"

        # the soft run finishes elsewhere ...
        outs = [await h.result(timeout=30) for h in (slow, *rest)]
        assert {o["worker_id"] for o in outs}.isdisjoint({bound[soft]}), outs
        # ... the hard one fails with the documented kind, after the limit
        with pytest.raises(jsworker.TaskFailed) as e:
            await lost.result(timeout=30)
        assert e.value.kind == "sticky_worker_gone"
        assert time.monotonic() - killed >= 3.0
        dead = await jsworker.get_dead(nc, hard)
        assert dead.kind == "sticky_worker_gone"

        # every step of the soft run recorded once; both bindings gone
        evs = await events_of(client, soft)
        for step in ("s0", "s1", "s2", "s3", "s4"):
            completed = [
                ev for ev in evs if ev["step_id"] == step and ev["type"] == "step.completed"
            ]
            assert len(completed) == 1, (step, completed)
        await wait_unbound(nc, soft)
        await wait_unbound(nc, hard)

        # `jsworker task events` shows where each step ran
        cli = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "jsworker.cli",
            "task",
            "events",
            soft,
            env=server_env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        stdout, stderr = await asyncio.wait_for(cli.communicate(), 60)
        assert cli.returncode == 0, stderr.decode()
        text = stdout.decode()
        for o in outs:
            assert f"on {o['worker_id']}" in text
        assert f"on {bound[soft]}" in text

        # each worker has its own sticky consumer; a killed worker's is removed by the
        # server once no pull has come for its inactive threshold
        infos = {
            c.config.name: c.config for c in await nc.jetstream().consumers_info("STICKY_TASKS")
        }
        for p in procs:
            cfg = infos[f"sticky__{p.worker_id}"]
            assert cfg.filter_subject == f"sticky.*.{p.worker_id}.>"
            assert cfg.inactive_threshold == 120.0


async def test_sticky_consumer_deleted_on_stop_and_mode_checked(
    nc: NATS, unique: Callable[[str], str]
) -> None:
    ttype = unique("stc")
    w = jsworker.Worker(nc)

    @w.handle(ttype)
    async def h(ctx: jsworker.TaskContext) -> str:
        return "ok"

    client = jsworker.Client(nc)
    with pytest.raises(jsworker.ConfigError, match="sticky"):
        await client.submit(ttype, {}, sticky="sometimes")
    js = nc.jetstream()
    name = f"sticky__{w.worker_id}"
    async with w:
        # created in the background, under the worker's supervisor
        deadline = time.monotonic() + 10
        while True:
            try:
                info = await js.consumer_info("STICKY_TASKS", name)
                break
            except nats.js.errors.NotFoundError:
                assert time.monotonic() < deadline, "no sticky consumer after 10 s"
                await asyncio.sleep(0.05)
        assert info.config.filter_subject == f"sticky.*.{w.worker_id}.>"
        run = unique("run")
        first = await client.submit(ttype, {}, run_id=run, step_id="a", sticky="hard")
        assert first.subject.startswith("task.")
        assert await first.result(timeout=10) == "ok"
        second = await client.submit(ttype, {}, run_id=run, step_id="b", sticky="hard")
        assert second.subject == f"sticky.{ttype}.{w.worker_id}.{run}"
        assert await second.result(timeout=10) == "ok"
        assert await binding(nc, run) == w.worker_id
    with pytest.raises(nats.js.errors.NotFoundError):
        await js.consumer_info("STICKY_TASKS", name)
    # no worker left: a soft step of the run goes to its home subject
    third = await client.submit(ttype, {}, run_id=run, step_id="c", sticky="soft")
    assert third.subject == f"task.{ttype}.{run}"


async def test_soft_step_not_pulled_in_time_moves_hard_step_waits(
    nc: NATS, unique: Callable[[str], str]
) -> None:
    """The bound worker is alive but busy (its credits taken by a long task and its idle
    handler's pull request), so it does not pull its sticky subject: a soft step is
    moved to its ordinary subject after the soft timeout and runs while the long task
    still runs, and the binding follows it; a hard step waits for its worker."""
    ttype = unique("stbusy")
    release = asyncio.Event()
    busy, rest = (
        jsworker.Worker(nc, concurrency=2, sticky_soft_timeout=1.0),
        jsworker.Worker(nc, sticky_soft_timeout=1.0),
    )
    ran: dict[str, str] = {}

    for w in (busy, rest):

        async def h(ctx: jsworker.TaskContext, w: jsworker.Worker = w) -> str:
            if ctx.json() == "block":
                await release.wait()
            ran[ctx.run_id] = w.worker_id
            return w.worker_id

        w.handle(ttype, h)
    client = jsworker.Client(nc)
    kv = await nc.jetstream().key_value("sticky_bindings")
    blocker, soft, hard = unique("blocker"), unique("soft"), unique("hard")
    for run in (blocker, soft, hard):
        await kv.put(run, busy.worker_id.encode())  # as if busy had run their first step
    async with busy, rest:
        b = await client.submit(ttype, "block", run_id=blocker, sticky="hard")
        assert b.subject == f"sticky.{ttype}.{busy.worker_id}.{blocker}"
        deadline = time.monotonic() + 10
        while busy.in_flight == 0:
            assert time.monotonic() < deadline, "the blocking task never started"
            await asyncio.sleep(0.05)
        t0 = time.monotonic()
        s = await client.submit(ttype, "x", run_id=soft, sticky="soft")
        h = await client.submit(ttype, "x", run_id=hard, sticky="hard")
        assert s.subject.startswith(f"sticky.{ttype}.{busy.worker_id}.")
        ran_on = await s.result(timeout=15)
        # not before the soft timeout (measured from the stream timestamp: allow 0.1 s)
        assert time.monotonic() - t0 >= 0.9
        assert not release.is_set() and b.run_id not in ran  # the long task still runs
        assert await binding(nc, soft) == ran_on  # the binding follows the step
        assert hard not in ran  # the hard step waits for its busy worker
        release.set()
        assert await h.result(timeout=15) == busy.worker_id
        assert await b.result(timeout=15) == busy.worker_id


def test_sticky_wire_helpers() -> None:
    from jsworker._sticky import home_subject, validate_mode

    assert validate_mode(None) is None and validate_mode("hard") == "hard"
    with pytest.raises(jsworker.ConfigError):
        validate_mode("always")
    assert home_subject("task.t.r", None) == "task.t.r"
    hdr = {"Jsworker-Task-Subject": "task.t.g.k"}
    assert home_subject("sticky.t.worker-1.r", hdr) == "task.t.g.k"
    # a header another program got wrong: the ungrouped subject of the run
    for bad in ({"Jsworker-Task-Subject": "task.>"}, {"Jsworker-Task-Subject": "x"}, {}):
        assert home_subject("sticky.t.worker-1.r", bad) == "task.t.r"
