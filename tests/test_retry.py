"""Retry policies: delays between attempts, the attempt budget, dead letters."""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import nats.js.errors
import pytest
from nats.aio.client import Client as NATS
from nats.js.api import DeliverPolicy

import jsworker


async def events(nc: NATS, run_id: str) -> list[dict[str, Any]]:
    """Every event stored on ``history.{run_id}``, in order."""
    js = nc.jetstream()
    subject = f"history.{run_id}"
    info = await js.stream_info("WORKFLOW_HISTORY", subjects_filter=subject)
    count = (info.state.subjects or {}).get(subject, 0)
    if not count:
        return []
    sub = await js.subscribe(
        subject, ordered_consumer=True, deliver_policy=DeliverPolicy.ALL, stream="WORKFLOW_HISTORY"
    )
    try:
        return [json.loads((await sub.next_msg(timeout=5)).data) for _ in range(count)]
    finally:
        await sub.unsubscribe()


async def dead_letter(nc: NATS, subject: str, timeout: float = 10.0) -> dict[str, Any]:
    js = nc.jetstream()
    deadline = time.monotonic() + timeout
    while True:
        try:
            return json.loads((await js.get_last_msg("DEAD_LETTERS", subject)).data or b"")
        except nats.js.errors.NotFoundError:
            if time.monotonic() > deadline:
                raise AssertionError(f"no dead letter on {subject}") from None
            await asyncio.sleep(0.02)


# ----------------------------------------------------------------- policy maths
def test_default_policy_is_the_seed_default() -> None:
    p = jsworker.RetryPolicy()
    assert p.delay == 5.0
    assert p.backoff == "fixed"
    assert p.max_attempts == 10
    assert [p.delay_for(n) for n in (1, 2, 5)] == [5.0, 5.0, 5.0]


def test_exponential_delays_and_cap() -> None:
    p = jsworker.RetryPolicy.exponential(0.5, factor=3.0, max_delay=10.0, max_attempts=0)
    assert [p.delay_for(n) for n in (1, 2, 3, 4)] == [0.5, 1.5, 4.5, 10.0]
    assert not p.exhausted(1000)  # 0 = unlimited


def test_exhausted_counts_attempts() -> None:
    p = jsworker.RetryPolicy(delay=0.2, max_attempts=3)
    assert [p.exhausted(n) for n in (1, 2, 3, 4)] == [False, False, True, True]


def test_constructors_accept_timedelta() -> None:
    p = jsworker.RetryPolicy.fixed(timedelta(milliseconds=250), max_attempts=2)
    assert p.delay == 0.25 and p.max_attempts == 2
    e = jsworker.RetryPolicy.exponential(timedelta(seconds=1), max_delay=timedelta(seconds=4))
    assert e.max_delay == 4.0


@pytest.mark.parametrize(
    "make",
    [
        lambda: jsworker.RetryPolicy(backoff="linear").validated(),  # type: ignore[arg-type]
        lambda: jsworker.RetryPolicy(max_attempts=-1).validated(),
        lambda: jsworker.RetryPolicy(factor=0.5).validated(),
        lambda: jsworker.RetryPolicy(delay=-1).validated(),
        lambda: jsworker.RetryPolicy(delay=7200).validated(),
        lambda: jsworker.RetryPolicy.fixed(0),
        lambda: jsworker.RetryPolicy.exponential(1, factor=0.9),
    ],
)
def test_bad_policies_refused(make: Callable[[], object]) -> None:
    with pytest.raises(jsworker.ConfigError):
        make()


async def test_bad_policy_refused_at_registration(nc: NATS, unique: Callable[[str], str]) -> None:
    w = jsworker.Worker(nc)

    async def fn(ctx: jsworker.TaskContext) -> None:
        return None

    with pytest.raises(jsworker.ConfigError):
        w.handle(unique("t"), fn, retry=jsworker.RetryPolicy(max_attempts=-2))


# ----------------------------------------------------------------- on the wire
async def test_retry_then_success(nc: NATS, unique: Callable[[str], str]) -> None:
    ttype = unique("flaky")
    attempts: list[int] = []
    w = jsworker.Worker(nc, retry=jsworker.RetryPolicy(delay=0.2, max_attempts=5))

    @w.handle(ttype)
    async def h(ctx: jsworker.TaskContext) -> object:
        attempts.append(ctx.attempt)
        if ctx.attempt < 3:
            raise ConnectionError(f"flaky #{ctx.attempt}")
        return {"after": ctx.attempt}

    async with w:
        handle = await jsworker.Client(nc).submit(ttype)
        assert await handle.result(timeout=15) == {"after": 3}
    assert attempts == [1, 2, 3]
    evs = await events(nc, handle.run_id)
    assert [e["type"] for e in evs] == [
        "step.started",
        "step.failed",
        "step.started",
        "step.failed",
        "step.started",
        "step.completed",
    ]
    failed = [e for e in evs if e["type"] == "step.failed"]
    assert [f["attempt_number"] for f in failed] == [1, 2]
    assert [f["payload"]["kind"] for f in failed] == ["retriable", "retriable"]
    assert "flaky #2" in failed[1]["payload"]["error"]
    assert w.stats.failed == 2 and w.stats.completed == 1 and w.stats.dead == 0


async def test_max_attempts_then_dead_letter(nc: NATS, unique: Callable[[str], str]) -> None:
    ttype = unique("doomed")
    attempts: list[int] = []
    w = jsworker.Worker(nc)

    @w.handle(ttype, retry=jsworker.RetryPolicy(delay=0.2, max_attempts=3))
    async def h(ctx: jsworker.TaskContext) -> None:
        attempts.append(ctx.attempt)
        raise RuntimeError("still broken")

    async with w:
        handle = await jsworker.Client(nc).submit(ttype, {"id": 9}, step_id="s")
        with pytest.raises(jsworker.TaskFailed) as ei:
            await handle.result(timeout=15)
        dead = await dead_letter(nc, f"dead.{ttype}.{handle.run_id}.s")
        ci = await nc.jetstream().consumer_info("TASK_QUEUES", ttype)
    assert attempts == [1, 2, 3]
    assert ei.value.kind == "exhausted"
    assert "still broken" in ei.value.error
    assert dead["kind"] == "exhausted"
    assert dead["attempts"] == 3
    assert dead["task"]["input"] == {"id": 9}
    assert ci.num_pending == 0
    evs = await events(nc, handle.run_id)
    failed = [e["payload"]["kind"] for e in evs if e["type"] == "step.failed"]
    assert failed == ["retriable", "retriable", "exhausted"]
    assert w.stats.dead == 1


async def test_fail_outcome_counts_against_budget(nc: NATS, unique: Callable[[str], str]) -> None:
    """``ctx.fail`` and ``fail_retry_after`` spend the same attempt budget as raising."""
    ttype = unique("doomed")
    attempts: list[int] = []
    w = jsworker.Worker(nc, retry=jsworker.RetryPolicy(delay=0.1, max_attempts=2))

    @w.handle(ttype)
    async def h(ctx: jsworker.TaskContext) -> None:
        attempts.append(ctx.attempt)
        ctx.fail_retry_after("later", 0.1)

    async with w:
        handle = await jsworker.Client(nc).submit(ttype)
        with pytest.raises(jsworker.TaskFailed) as ei:
            await handle.result(timeout=15)
    assert ei.value.kind == "exhausted"
    assert attempts == [1, 2]


async def test_exponential_policy_delays(nc: NATS, unique: Callable[[str], str]) -> None:
    ttype = unique("expo")
    starts: list[float] = []
    w = jsworker.Worker(nc)
    policy = jsworker.RetryPolicy.exponential(0.2, factor=2.0, max_delay=0.6, max_attempts=0)

    @w.handle(ttype, retry=policy)
    async def h(ctx: jsworker.TaskContext) -> object:
        starts.append(time.monotonic())
        if ctx.attempt < 5:
            raise RuntimeError("again")
        return ctx.attempt

    async with w:
        handle = await jsworker.Client(nc).submit(ttype)
        assert await handle.result(timeout=20) == 5
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    want = [0.2, 0.4, 0.6, 0.6]  # 0.8 capped at max_delay
    for gap, d in zip(gaps, want, strict=True):
        assert d * 0.9 <= gap < d + 1.5, (gaps, want)
    assert gaps[1] > gaps[0] + 0.1  # it really grows
    evs = await events(nc, handle.run_id)
    retry_ms = [e["payload"]["retry_in_ms"] for e in evs if e["type"] == "step.failed"]
    assert retry_ms == [200, 400, 600, 600]


async def test_unlimited_attempts(nc: NATS, unique: Callable[[str], str]) -> None:
    ttype = unique("forever")
    w = jsworker.Worker(nc)

    @w.handle(ttype, retry=jsworker.RetryPolicy(delay=0.1, max_attempts=0))
    async def h(ctx: jsworker.TaskContext) -> object:
        if ctx.attempt <= 12:  # more than the default budget of 10
            raise RuntimeError("x")
        return ctx.attempt

    async with w:
        handle = await jsworker.Client(nc).submit(ttype)
        assert await handle.result(timeout=20) == 13


async def test_handler_policy_overrides_worker_policy(
    nc: NATS, unique: Callable[[str], str]
) -> None:
    slow, fast = unique("slow"), unique("fast")
    starts: dict[str, list[float]] = {slow: [], fast: []}
    w = jsworker.Worker(nc, retry=jsworker.RetryPolicy(delay=30))

    async def h(ctx: jsworker.TaskContext) -> object:
        starts[ctx.info.task_type].append(time.monotonic())
        if ctx.attempt == 1:
            raise RuntimeError("x")
        return "ok"

    w.handle(fast, h, retry=jsworker.RetryPolicy(delay=0.2))
    w.handle(slow, h)
    async with w:
        client = jsworker.Client(nc)
        hf = await client.submit(fast)
        hs = await client.submit(slow)
        assert await hf.result(timeout=10) == "ok"
        with pytest.raises(jsworker.TaskTimeout):
            await hs.result(timeout=1.0)  # 30 s policy: not retried yet
    assert len(starts[slow]) == 1
    await nc.jetstream().purge_stream("TASK_QUEUES", subject=f"task.{slow}.>")
