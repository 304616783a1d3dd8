"""Every row of the outcomes table (docs/task-outcomes.md, docs/wire.md), the task
context, lifecycle events and their deduplication, and payloads that are not tasks at
all."""

from __future__ import annotations

import asyncio
import base64
import json
import threading
import time
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any

import nats.js.errors
import pytest
from nats.aio.client import Client as NATS
from nats.js.api import DeliverPolicy

import jsworker

HISTORY = "WORKFLOW_HISTORY"
DEAD = "DEAD_LETTERS"
TASKS = "TASK_QUEUES"


# ----------------------------------------------------------------- helpers
async def history(nc: NATS, run_id: str) -> list[tuple[dict[str, Any], dict[str, str]]]:
    """Every event stored on ``history.{run_id}`` with its headers, in order."""
    js = nc.jetstream()
    subject = f"history.{run_id}"
    info = await js.stream_info(HISTORY, subjects_filter=subject)
    count = (info.state.subjects or {}).get(subject, 0)
    if not count:
        return []
    sub = await js.subscribe(
        subject, ordered_consumer=True, deliver_policy=DeliverPolicy.ALL, stream=HISTORY
    )
    try:
        out = []
        for _ in range(count):
            msg = await sub.next_msg(timeout=5)
            out.append((json.loads(msg.data), dict(msg.headers or {})))
        return out
    finally:
        await sub.unsubscribe()


async def events(nc: NATS, run_id: str) -> list[dict[str, Any]]:
    return [ev for ev, _ in await history(nc, run_id)]


async def wait_until(
    pred: Callable[[], bool | Awaitable[bool]], timeout: float = 10.0, what: str = ""
) -> None:
    deadline = time.monotonic() + timeout
    while True:
        r = pred()
        if not isinstance(r, bool):
            r = await r
        if r:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or pred}")
        await asyncio.sleep(0.02)


async def dead_letter(
    nc: NATS, subject: str, timeout: float = 10.0
) -> tuple[dict[str, Any], dict[str, str]]:
    js = nc.jetstream()
    deadline = time.monotonic() + timeout
    while True:
        try:
            msg = await js.get_last_msg(DEAD, subject)
            return json.loads(msg.data or b""), dict(msg.headers or {})
        except nats.js.errors.NotFoundError:
            if time.monotonic() > deadline:
                raise AssertionError(f"no dead letter on {subject} within {timeout}s") from None
            await asyncio.sleep(0.02)


async def dead_count(nc: NATS, subject: str) -> int:
    info = await nc.jetstream().stream_info(DEAD, subjects_filter=subject)
    return (info.state.subjects or {}).get(subject, 0)


def types_of(evs: list[dict[str, Any]]) -> list[str]:
    return [e["type"] for e in evs]


def fast_worker(nc: NATS, **kw: Any) -> jsworker.Worker:
    kw.setdefault("retry", jsworker.RetryPolicy(delay=0.2, max_attempts=5))
    return jsworker.Worker(nc, **kw)


# ----------------------------------------------------------------- complete
async def test_complete_with_value(nc: NATS, unique: Callable[[str], str]) -> None:
    ttype = unique("c")
    w = fast_worker(nc)

    @w.handle(ttype)
    async def h(ctx: jsworker.TaskContext) -> None:
        ctx.complete({"n": ctx.json()["n"] + 1, "s": "ü"})

    async with w:
        handle = await jsworker.Client(nc).submit(ttype, {"n": 41})
        assert await handle.result(timeout=10) == {"n": 42, "s": "ü"}
    evs = await events(nc, handle.run_id)
    assert types_of(evs) == ["step.started", "step.completed"]
    assert evs[1]["payload"]["output"] == {"n": 42, "s": "ü"}
    assert w.stats.completed == 1


async def test_complete_with_json_bytes(nc: NATS, unique: Callable[[str], str]) -> None:
    ttype = unique("c")
    w = fast_worker(nc)

    @w.handle(ttype)
    async def h(ctx: jsworker.TaskContext) -> None:
        ctx.complete(b'{"x": [1, 2, 3]}')

    async with w:
        handle = await jsworker.Client(nc).submit(ttype)
        assert await handle.result(timeout=10) == {"x": [1, 2, 3]}


async def test_complete_with_invalid_bytes_raises_in_handler(
    nc: NATS, unique: Callable[[str], str]
) -> None:
    ttype = unique("c")
    seen: list[BaseException] = []
    w = fast_worker(nc)

    @w.handle(ttype)
    async def h(ctx: jsworker.TaskContext) -> object:
        try:
            ctx.complete(b"not json")
        except jsworker.PayloadError as e:
            seen.append(e)
        return "fallback"

    async with w:
        handle = await jsworker.Client(nc).submit(ttype)
        assert await handle.result(timeout=10) == "fallback"
    assert len(seen) == 1 and "not valid JSON" in str(seen[0])


async def test_return_value_is_the_output(nc: NATS, unique: Callable[[str], str]) -> None:
    ttype = unique("ret")
    w = fast_worker(nc)

    @w.handle(ttype)
    async def h(ctx: jsworker.TaskContext) -> object:
        return {"sent": True, "to": ctx.json()}

    async with w:
        handle = await jsworker.Client(nc).submit(ttype, "bob@example.com")
        assert await handle.result(timeout=10) == {"sent": True, "to": "bob@example.com"}


async def test_no_outcome_and_no_error_is_complete_none(
    nc: NATS, unique: Callable[[str], str]
) -> None:
    """The documented choice (``_context`` docstring): returning without an outcome call is
    ``complete(return value)``, so a bare ``return`` completes with ``None``."""
    ttype = unique("none")
    w = fast_worker(nc)

    @w.handle(ttype)
    async def h(ctx: jsworker.TaskContext) -> None:
        return None

    async with w:
        handle = await jsworker.Client(nc).submit(ttype, 1)
        assert await handle.result(timeout=10) is None
    evs = await events(nc, handle.run_id)
    assert types_of(evs) == ["step.started", "step.completed"]
    assert evs[1]["payload"]["output"] is None


async def test_unserialisable_return_value_fails_permanently(
    nc: NATS, unique: Callable[[str], str]
) -> None:
    ttype = unique("badret")
    calls = 0
    w = fast_worker(nc)

    @w.handle(ttype)
    async def h(ctx: jsworker.TaskContext) -> object:
        nonlocal calls
        calls += 1
        return {"s": {1, 2}}

    async with w:
        handle = await jsworker.Client(nc).submit(ttype)
        with pytest.raises(jsworker.TaskFailed) as ei:
            await handle.result(timeout=10)
    assert ei.value.kind == "non_retriable"
    assert "JSON" in ei.value.error
    assert calls == 1


async def test_plain_def_handler(nc: NATS, unique: Callable[[str], str]) -> None:
    ttype = unique("sync")
    loop_thread = threading.get_ident()
    threads: list[int] = []
    w = fast_worker(nc)

    @w.handle(ttype)
    def h(ctx: jsworker.TaskContext) -> object:
        threads.append(threading.get_ident())
        time.sleep(0.05)  # blocking is fine: it runs in a thread
        return {"double": ctx.json() * 2}

    async with w:
        handle = await jsworker.Client(nc).submit(ttype, 21)
        assert await handle.result(timeout=10) == {"double": 42}
    assert threads and threads[0] != loop_thread


async def test_plain_def_handler_outcome_calls(nc: NATS, unique: Callable[[str], str]) -> None:
    ttype = unique("sync")
    w = fast_worker(nc)

    @w.handle(ttype)
    def h(ctx: jsworker.TaskContext) -> None:
        if ctx.attempt == 1:
            ctx.fail("first attempt fails")
        else:
            ctx.complete(b'"ok"')

    async with w:
        handle = await jsworker.Client(nc).submit(ttype)
        assert await handle.result(timeout=10) == "ok"
    evs = await events(nc, handle.run_id)
    assert types_of(evs) == ["step.started", "step.failed", "step.started", "step.completed"]


# ----------------------------------------------------------------- fail
async def test_fail_is_retried_after_policy_delay(nc: NATS, unique: Callable[[str], str]) -> None:
    ttype = unique("fail")
    starts: list[float] = []
    w = jsworker.Worker(nc, retry=jsworker.RetryPolicy(delay=0.6))

    @w.handle(ttype)
    async def h(ctx: jsworker.TaskContext) -> object:
        starts.append(time.monotonic())
        if ctx.attempt == 1:
            ctx.fail("try again")
            return None
        return {"attempt": ctx.attempt}

    async with w:
        handle = await jsworker.Client(nc).submit(ttype)
        assert await handle.result(timeout=10) == {"attempt": 2}
    gap = starts[1] - starts[0]
    assert 0.55 <= gap < 3.0, gap
    evs = await events(nc, handle.run_id)
    assert types_of(evs) == ["step.started", "step.failed", "step.started", "step.completed"]
    failed = evs[1]
    assert failed["payload"]["kind"] == "retriable"
    assert failed["payload"]["error"] == "try again"
    assert failed["payload"]["retry_in_ms"] == 600
    assert failed["attempt_number"] == 1
    assert evs[3]["attempt_number"] == 2
    assert w.stats.failed == 1 and w.stats.completed == 1


async def test_handler_raising_is_retriable(nc: NATS, unique: Callable[[str], str]) -> None:
    ttype = unique("raise")
    w = fast_worker(nc)

    @w.handle(ttype)
    async def h(ctx: jsworker.TaskContext) -> object:
        if ctx.attempt == 1:
            raise ValueError("boom")
        return "second time lucky"

    async with w:
        handle = await jsworker.Client(nc).submit(ttype)
        assert await handle.result(timeout=10) == "second time lucky"
    evs = await events(nc, handle.run_id)
    failed = [e for e in evs if e["type"] == "step.failed"]
    assert len(failed) == 1
    assert failed[0]["payload"]["kind"] == "retriable"
    assert "ValueError" in failed[0]["payload"]["error"]
    assert "boom" in failed[0]["payload"]["error"]


# ----------------------------------------------------------------- fail_permanent
async def test_fail_permanent_dead_letters(nc: NATS, unique: Callable[[str], str]) -> None:
    ttype = unique("perm")
    calls = 0
    w = fast_worker(nc)

    @w.handle(ttype)
    async def h(ctx: jsworker.TaskContext) -> None:
        nonlocal calls
        calls += 1
        ctx.fail_permanent("bad input: no recipient")

    async with w:
        client = jsworker.Client(nc)
        handle = await client.submit(ttype, {"to": None}, step_id="send", metadata={"k": "v"})
        with pytest.raises(jsworker.TaskFailed) as ei:
            await handle.result(timeout=10)
        assert ei.value.kind == "non_retriable"
        assert ei.value.error == "bad input: no recipient"
        assert ei.value.event["type"] == "step.failed"
        subject = f"dead.{ttype}.{handle.run_id}.send"
        dead, _ = await dead_letter(nc, subject)
        # terminated, not redelivered: nothing pending on the consumer
        js = nc.jetstream()
        await wait_until(lambda: _no_ack_pending(js, ttype), what="the consumer to hold nothing")
        ci = await js.consumer_info(TASKS, ttype)
        assert ci.num_pending == 0 and ci.num_redelivered == 0
    assert calls == 1
    assert dead["kind"] == "non_retriable"
    assert dead["error"] == "bad input: no recipient"
    assert dead["task_type"] == ttype
    assert dead["task"]["run_id"] == handle.run_id
    assert dead["task"]["step_id"] == "send"
    assert dead["task"]["input"] == {"to": None}
    assert dead["task"]["metadata"] == {"k": "v"}
    assert await dead_count(nc, subject) == 1
    evs = await events(nc, handle.run_id)
    assert types_of(evs) == ["step.started", "step.failed"]
    assert evs[1]["payload"]["kind"] == "non_retriable"
    assert w.stats.dead == 1


async def _no_ack_pending(js: Any, consumer: str) -> bool:
    ci = await js.consumer_info(TASKS, consumer)
    return bool(ci.num_ack_pending == 0)


async def test_permanent_error_raised_dead_letters(nc: NATS, unique: Callable[[str], str]) -> None:
    ttype = unique("perm")
    w = fast_worker(nc)

    @w.handle(ttype)
    async def h(ctx: jsworker.TaskContext) -> None:
        raise jsworker.PermanentError("never works")

    async with w:
        handle = await jsworker.Client(nc).submit(ttype)
        with pytest.raises(jsworker.TaskFailed) as ei:
            await handle.result(timeout=10)
    assert ei.value.kind == "non_retriable"
    assert "never works" in ei.value.error
    dead, _ = await dead_letter(nc, f"dead.{ttype}.{handle.run_id}.{handle.step_id}")
    assert dead["kind"] == "non_retriable"


# ----------------------------------------------------------------- fail_retry_after
async def test_fail_retry_after_delay_honoured(nc: NATS, unique: Callable[[str], str]) -> None:
    ttype = unique("after")
    starts: list[float] = []
    # the policy delay is long: only the explicit delay can explain a quick retry
    w = jsworker.Worker(nc, retry=jsworker.RetryPolicy(delay=30))

    @w.handle(ttype)
    async def h(ctx: jsworker.TaskContext) -> object:
        starts.append(time.monotonic())
        if ctx.attempt == 1:
            ctx.fail_retry_after("rate limited", 0.5)
            return None
        return "done"

    async with w:
        handle = await jsworker.Client(nc).submit(ttype)
        assert await handle.result(timeout=10) == "done"
    gap = starts[1] - starts[0]
    assert 0.45 <= gap < 3.0, gap
    evs = await events(nc, handle.run_id)
    failed = [e for e in evs if e["type"] == "step.failed"]
    assert len(failed) == 1
    assert failed[0]["payload"]["kind"] == "retry_after"
    assert failed[0]["payload"]["retry_in_ms"] == 500
    assert failed[0]["payload"]["error"] == "rate limited"


@pytest.mark.parametrize("delay", [0, 0.001, timedelta(milliseconds=5)])
async def test_fail_retry_after_clamped_to_100ms(
    nc: NATS, unique: Callable[[str], str], delay: Any
) -> None:
    ttype = unique("after")
    starts: list[float] = []
    w = jsworker.Worker(nc, retry=jsworker.RetryPolicy(delay=30))

    @w.handle(ttype)
    async def h(ctx: jsworker.TaskContext) -> object:
        starts.append(time.monotonic())
        if ctx.attempt == 1:
            ctx.fail_retry_after("soon", delay)
            return None
        return "done"

    async with w:
        handle = await jsworker.Client(nc).submit(ttype)
        assert await handle.result(timeout=10) == "done"
    assert starts[1] - starts[0] >= 0.09
    failed = [e for e in await events(nc, handle.run_id) if e["type"] == "step.failed"]
    assert failed[0]["payload"]["retry_in_ms"] == 100


async def test_fail_retry_after_clamped_to_one_hour(nc: NATS, unique: Callable[[str], str]) -> None:
    ttype = unique("after")
    calls = 0
    w = jsworker.Worker(nc)

    @w.handle(ttype)
    async def h(ctx: jsworker.TaskContext) -> None:
        nonlocal calls
        calls += 1
        ctx.fail_retry_after("come back tomorrow", timedelta(hours=24))

    js = nc.jetstream()
    try:
        async with w:
            handle = await jsworker.Client(nc).submit(ttype)

            async def failed_event() -> bool:
                return any(e["type"] == "step.failed" for e in await events(nc, handle.run_id))

            await wait_until(failed_event, what="step.failed")
        failed = [e for e in await events(nc, handle.run_id) if e["type"] == "step.failed"]
        assert failed[0]["payload"]["retry_in_ms"] == 3_600_000
        assert failed[0]["payload"]["kind"] == "retry_after"
        assert calls == 1
    finally:
        await js.purge_stream(TASKS, subject=f"task.{ttype}.>")


async def test_fail_retry_after_refuses_negative_delay(
    nc: NATS, unique: Callable[[str], str]
) -> None:
    ttype = unique("after")
    errors: list[BaseException] = []
    w = fast_worker(nc)

    @w.handle(ttype)
    async def h(ctx: jsworker.TaskContext) -> object:
        try:
            ctx.fail_retry_after("x", -5)
        except jsworker.ConfigError as e:
            errors.append(e)
        return "still completes"

    async with w:
        handle = await jsworker.Client(nc).submit(ttype)
        assert await handle.result(timeout=10) == "still completes"
    assert len(errors) == 1


async def test_retryable_error_with_delay(nc: NATS, unique: Callable[[str], str]) -> None:
    ttype = unique("after")
    starts: list[float] = []
    w = jsworker.Worker(nc, retry=jsworker.RetryPolicy(delay=30))

    @w.handle(ttype)
    async def h(ctx: jsworker.TaskContext) -> object:
        starts.append(time.monotonic())
        if ctx.attempt == 1:
            raise jsworker.RetryableError("throttled", delay=0.3)
        return "ok"

    async with w:
        handle = await jsworker.Client(nc).submit(ttype)
        assert await handle.result(timeout=10) == "ok"
    assert 0.25 <= starts[1] - starts[0] < 3.0
    failed = [e for e in await events(nc, handle.run_id) if e["type"] == "step.failed"]
    assert failed[0]["payload"]["kind"] == "retry_after"
    assert failed[0]["payload"]["retry_in_ms"] == 300


# ----------------------------------------------------------------- continue_
async def test_continue_runs_next_iteration(nc: NATS, unique: Callable[[str], str]) -> None:
    ttype = unique("cont")
    seen: list[tuple[int, int, Any]] = []
    w = fast_worker(nc)

    @w.handle(ttype, max_iterations=10)
    async def h(ctx: jsworker.TaskContext) -> object:
        seen.append((ctx.info.iteration, ctx.attempt, ctx.json()))
        total = ctx.json()["total"]
        if ctx.info.iteration < 3:
            ctx.continue_({"total": total + ctx.info.iteration + 1})
            return None
        return {"total": total}

    async with w:
        handle = await jsworker.Client(nc).submit(ttype, {"total": 0})
        assert await handle.result(timeout=10) == {"total": 6}
    assert seen == [
        (0, 1, {"total": 0}),
        (1, 1, {"total": 1}),
        (2, 1, {"total": 3}),
        (3, 1, {"total": 6}),
    ]
    evs = await events(nc, handle.run_id)
    conts = [e for e in evs if e["type"] == "step.continue"]
    assert [c["payload"]["next_iteration"] for c in conts] == [1, 2, 3]
    assert types_of(evs)[-1] == "step.completed"
    assert sum(t == "step.started" for t in types_of(evs)) == 4
    assert w.stats.continued == 3


async def test_continue_bounded_by_max_iterations(nc: NATS, unique: Callable[[str], str]) -> None:
    ttype = unique("cont")
    seen: list[int] = []
    w = fast_worker(nc)

    @w.handle(ttype, max_iterations=3)
    async def h(ctx: jsworker.TaskContext) -> None:
        seen.append(ctx.info.iteration)
        ctx.continue_({"forever": True})

    async with w:
        handle = await jsworker.Client(nc).submit(ttype)
        with pytest.raises(jsworker.TaskFailed) as ei:
            await handle.result(timeout=10)
    assert ei.value.kind == "max_iterations"
    assert seen == [0, 1, 2]
    dead, _ = await dead_letter(nc, f"dead.{ttype}.{handle.run_id}.{handle.step_id}")
    assert dead["kind"] == "max_iterations"


async def test_worker_wide_max_iterations(nc: NATS, unique: Callable[[str], str]) -> None:
    ttype = unique("cont")
    seen: list[int] = []
    w = jsworker.Worker(nc, max_iterations=2)

    @w.handle(ttype)
    async def h(ctx: jsworker.TaskContext) -> None:
        seen.append(ctx.info.iteration)
        ctx.continue_()

    async with w:
        handle = await jsworker.Client(nc).submit(ttype)
        with pytest.raises(jsworker.TaskFailed):
            await handle.result(timeout=10)
    assert seen == [0, 1]


# ----------------------------------------------------------------- two outcomes
async def test_second_outcome_refused_first_stands(nc: NATS, unique: Callable[[str], str]) -> None:
    ttype = unique("twice")
    refused: list[BaseException] = []
    w = fast_worker(nc)

    @w.handle(ttype)
    async def h(ctx: jsworker.TaskContext) -> None:
        ctx.complete({"first": True})
        for call in (
            lambda: ctx.fail("second"),
            lambda: ctx.fail_permanent("third"),
            lambda: ctx.complete("fourth"),
            lambda: ctx.continue_("fifth"),
            lambda: ctx.fail_retry_after("sixth", 1),
        ):
            try:
                call()
            except jsworker.OutcomeAlreadySetError as e:
                refused.append(e)

    async with w:
        handle = await jsworker.Client(nc).submit(ttype)
        assert await handle.result(timeout=10) == {"first": True}
    assert len(refused) == 5
    assert "already has outcome 'complete'" in str(refused[0])
    assert isinstance(refused[0], jsworker.JSWorkerError)
    evs = await events(nc, handle.run_id)
    assert types_of(evs) == ["step.started", "step.completed"]


async def test_second_outcome_after_failure_refused(nc: NATS, unique: Callable[[str], str]) -> None:
    ttype = unique("twice")
    calls = 0
    w = fast_worker(nc)

    @w.handle(ttype)
    async def h(ctx: jsworker.TaskContext) -> None:
        nonlocal calls
        calls += 1
        ctx.fail_permanent("first")
        ctx.complete("never")  # raises OutcomeAlreadySetError out of the handler

    async with w:
        handle = await jsworker.Client(nc).submit(ttype)
        with pytest.raises(jsworker.TaskFailed) as ei:
            await handle.result(timeout=10)
    assert ei.value.kind == "non_retriable"
    assert ei.value.error == "first"
    assert calls == 1


async def test_raise_after_outcome_keeps_outcome(nc: NATS, unique: Callable[[str], str]) -> None:
    ttype = unique("twice")
    w = fast_worker(nc)

    @w.handle(ttype)
    async def h(ctx: jsworker.TaskContext) -> None:
        ctx.complete(7)
        raise RuntimeError("cleanup failed")

    async with w:
        handle = await jsworker.Client(nc).submit(ttype)
        assert await handle.result(timeout=10) == 7
    assert types_of(await events(nc, handle.run_id)) == ["step.started", "step.completed"]


# ----------------------------------------------------------------- invalid payloads
@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"\x00\xffnot json{", "not valid JSON"),
        (b"{truncated", "not valid JSON"),
        (b"[1, 2]", "JSON object"),
        (b'{"input": 1}', "run_id"),
    ],
    ids=["binary", "truncated", "array", "no-run-id"],
)
async def test_invalid_payload_dead_lettered_never_retried(
    nc: NATS, unique: Callable[[str], str], body: bytes, reason: str
) -> None:
    ttype = unique("raw")
    calls = 0
    w = fast_worker(nc)

    @w.handle(ttype)
    async def h(ctx: jsworker.TaskContext) -> None:
        nonlocal calls
        calls += 1

    js = nc.jetstream()
    async with w:
        ack = await js.publish(f"task.{ttype}.x", body)
        dead, _ = await dead_letter(nc, f"dead.{ttype}.invalid.{ack.seq}")
        await wait_until(lambda: _no_ack_pending(js, ttype), what="the term")
        ci = await js.consumer_info(TASKS, ttype)
    assert calls == 0
    assert dead["kind"] == "invalid_payload"
    assert reason in dead["error"]
    assert base64.b64decode(dead["payload_b64"]) == body
    assert dead["subject"] == f"task.{ttype}.x"
    assert dead["stream_sequence"] == ack.seq
    # delivered once, terminated: never redelivered, nothing left in the stream
    assert ci.delivered.consumer_seq == 1
    assert ci.num_redelivered == 0
    assert ci.num_pending == 0
    info = await js.stream_info(TASKS, subjects_filter=f"task.{ttype}.>")
    assert not info.state.subjects
    assert w.stats.dead == 1


# ----------------------------------------------------------------- context
async def test_task_context_fields(nc: NATS, unique: Callable[[str], str]) -> None:
    ttype = unique("ctx")
    got: dict[str, Any] = {}
    w = fast_worker(nc)

    @w.handle(ttype)
    async def h(ctx: jsworker.TaskContext) -> None:
        got["info"] = ctx.info
        got["input"] = ctx.input
        got["json"] = ctx.json()
        got["props"] = (ctx.run_id, ctx.step_id, ctx.attempt)

    async with w:
        handle = await jsworker.Client(nc).submit(
            ttype,
            {"b": [1, 2], "a": "ü"},
            run_id="order-17",
            step_id="charge",
            metadata={"tenant": "acme", "n": 3},  # type: ignore[dict-item]
        )
        await handle.result(timeout=10)
    info: jsworker.TaskInfo = got["info"]
    assert info.task_type == ttype
    assert info.task_id == handle.task_id
    assert info.run_id == "order-17" == handle.run_id
    assert info.step_id == "charge" == handle.step_id
    assert info.attempt == 1
    assert info.iteration == 0
    assert info.metadata == {"tenant": "acme", "n": "3"}
    assert info.group is None
    assert info.subject == f"task.{ttype}.order-17" == handle.subject
    assert info.stream_sequence == handle.sequence
    assert isinstance(got["input"], bytes)
    assert json.loads(got["input"]) == {"b": [1, 2], "a": "ü"}
    assert got["json"] == {"b": [1, 2], "a": "ü"}
    assert got["props"] == ("order-17", "charge", 1)
    with pytest.raises(AttributeError):
        info.attempt = 2  # type: ignore[misc]  # frozen


async def test_task_context_no_input(nc: NATS, unique: Callable[[str], str]) -> None:
    ttype = unique("ctx")
    got: list[Any] = []
    w = fast_worker(nc)

    @w.handle(ttype)
    async def h(ctx: jsworker.TaskContext) -> None:
        got.extend([ctx.input, ctx.json(), ctx.step_id])

    async with w:
        handle = await jsworker.Client(nc).submit(ttype)
        await handle.result(timeout=10)
    assert got == [b"null", None, ttype]  # the step id defaults to the task type


async def test_task_context_input_from_json_bytes(nc: NATS, unique: Callable[[str], str]) -> None:
    ttype = unique("ctx")
    got: list[Any] = []
    w = fast_worker(nc)

    @w.handle(ttype)
    async def h(ctx: jsworker.TaskContext) -> None:
        got.append(ctx.json())

    async with w:
        handle = await jsworker.Client(nc).submit(ttype, b'{"raw": true}')
        await handle.result(timeout=10)
    assert got == [{"raw": True}]


# ----------------------------------------------------------------- lifecycle events
async def test_lifecycle_event_shape_and_ids(nc: NATS, unique: Callable[[str], str]) -> None:
    ttype = unique("ev")
    w = fast_worker(nc)

    @w.handle(ttype)
    async def h(ctx: jsworker.TaskContext) -> object:
        return "ok"

    async with w:
        handle = await jsworker.Client(nc).submit(ttype, step_id="s1")
        await handle.result(timeout=10)
        streamed = [ev async for ev in handle.events(timeout=0.3)]
    stored = await history(nc, handle.run_id)
    assert [ev for ev, _ in stored] == streamed
    (started, h1), (completed, h2) = stored
    for ev in (started, completed):
        assert set(ev) >= {
            "type",
            "run_id",
            "step_id",
            "timestamp",
            "payload",
            "worker_id",
            "attempt_number",
            "trace_parent",
            "trace_state",
        }
        assert ev["run_id"] == handle.run_id
        assert ev["step_id"] == "s1"
        assert ev["worker_id"] == w.worker_id
        assert ev["attempt_number"] == 1
        assert ev["timestamp"].endswith("Z")
    assert started["type"] == "step.started"
    assert completed["type"] == "step.completed"
    assert completed["payload"]["output"] == "ok"
    assert completed["payload"]["task_id"] == handle.task_id
    assert h1["Nats-Msg-Id"] == f"{handle.run_id}.s1.step.started.1"
    assert h2["Nats-Msg-Id"] == f"{handle.run_id}.s1.step.completed"


async def _publish_copy(nc: NATS, handle: jsworker.TaskHandle, body: bytes, tag: str) -> None:
    ack = await nc.jetstream().publish(handle.subject, body, headers={"Nats-Msg-Id": tag})
    assert not ack.duplicate


async def test_outcome_recorded_once_when_task_runs_twice(
    nc: NATS, unique: Callable[[str], str]
) -> None:
    """Two deliveries of the same run/step (a duplicate publish, as a redelivery after a
    lost ack would be) both complete; the history stores one ``step.completed``."""
    ttype = unique("dup")
    runs: list[str] = []
    w = fast_worker(nc)

    @w.handle(ttype)
    async def h(ctx: jsworker.TaskContext) -> object:
        runs.append(ctx.run_id)
        return {"n": len(runs)}

    client = jsworker.Client(nc)
    handle = await client.submit(ttype, {"x": 1}, run_id=unique("run"), step_id="s")
    msg = await nc.jetstream().get_msg(TASKS, handle.sequence)
    await _publish_copy(nc, handle, msg.data or b"", "copy-" + handle.run_id)
    async with w:
        await wait_until(lambda: w.stats.completed == 2, what="both copies to complete")
    evs = await events(nc, handle.run_id)
    assert len(runs) == 2
    assert sum(e["type"] == "step.completed" for e in evs) == 1
    assert sum(e["type"] == "step.started" for e in evs) == 1
    assert await handle.result(timeout=5) in ({"n": 1}, {"n": 2})


async def test_dead_letter_recorded_once_when_task_runs_twice(
    nc: NATS, unique: Callable[[str], str]
) -> None:
    ttype = unique("dup")
    w = fast_worker(nc)

    @w.handle(ttype)
    async def h(ctx: jsworker.TaskContext) -> None:
        ctx.fail_permanent("nope")

    handle = await jsworker.Client(nc).submit(ttype, run_id=unique("run"), step_id="s")
    msg = await nc.jetstream().get_msg(TASKS, handle.sequence)
    await _publish_copy(nc, handle, msg.data or b"", "copy-" + handle.run_id)
    async with w:
        await wait_until(lambda: w.stats.dead == 2, what="both copies to fail")
    evs = await events(nc, handle.run_id)
    failed = [e for e in evs if e["type"] == "step.failed"]
    assert len(failed) == 1 and failed[0]["payload"]["kind"] == "non_retriable"
    assert await dead_count(nc, f"dead.{ttype}.{handle.run_id}.s") == 1


async def test_duplicate_submit_recorded_once(nc: NATS, unique: Callable[[str], str]) -> None:
    ttype = unique("dup")
    calls = 0
    w = fast_worker(nc)

    @w.handle(ttype)
    async def h(ctx: jsworker.TaskContext) -> object:
        nonlocal calls
        calls += 1
        return ctx.json()

    client = jsworker.Client(nc)
    run_id = unique("run")
    first = await client.submit(ttype, {"v": 1}, run_id=run_id, step_id="s")
    second = await client.submit(ttype, {"v": 2}, run_id=run_id, step_id="s")
    assert not first.duplicate
    assert second.duplicate
    assert second.sequence == first.sequence
    async with w:
        assert await second.result(timeout=10) == {"v": 1}  # the first submit stands
        js = nc.jetstream()
        await wait_until(lambda: _no_ack_pending(js, ttype), what="the ack")
        ci = await js.consumer_info(TASKS, ttype)
    assert calls == 1
    assert ci.delivered.consumer_seq == 1
    evs = await events(nc, run_id)
    assert types_of(evs) == ["step.started", "step.completed"]
