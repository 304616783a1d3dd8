"""Fast unit tests of pure core logic: no server. Credit pools, the mapping from what a
handler did to an outcome, and the ``jsworker.testing`` environment users test with."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from nats.aio.msg import Msg

import jsworker
from jsworker._context import Outcome
from jsworker._executor import MAX_TRACEBACK, outcome_of
from jsworker._pull import PullLoop, Slots
from jsworker.testing import HandlerEnvironment

# ------------------------------------------------------------------ credit pools


async def test_slots_take_reserves_at_most_what_is_free() -> None:
    s = Slots(8)
    assert await s.take(5) == 5
    assert await s.take(10) == 3
    assert s.free == 0
    s.give(2)
    assert await s.take(10) == 2


async def test_slots_take_waits_for_least() -> None:
    s = Slots(4)
    await s.take(4)
    waiter = asyncio.create_task(s.take(4, least=2))
    s.give(1)
    await asyncio.sleep(0)
    assert not waiter.done()  # one free credit is not enough
    s.give(1)
    assert await asyncio.wait_for(waiter, 1) == 2


async def test_child_pool_draws_from_its_parent() -> None:
    pool = Slots(8)
    a = Slots(3, parent=pool)
    b = Slots(8, parent=pool)
    assert await a.take(10) == 3  # capped by the child
    assert pool.free == 5
    assert await b.take(10) == 5  # capped by what the parent has left
    assert pool.free == 0 and b.available() == 0
    a.give(3)
    assert pool.free == 3 and a.free == 3
    assert b.available() == 3


async def test_child_waiting_on_parent_wakes_when_a_sibling_gives() -> None:
    pool = Slots(2)
    a = Slots(2, parent=pool)
    b = Slots(2, parent=pool)
    await a.take(2)
    waiter = asyncio.create_task(b.take(1))
    await asyncio.sleep(0)
    assert not waiter.done()
    a.give(1)
    assert await asyncio.wait_for(waiter, 1) == 1


async def test_resize_changes_capacity_live() -> None:
    s = Slots(2)
    await s.take(2)
    s.resize(4)
    assert s.free == 2
    assert await s.take(5) == 2
    s.resize(1)  # shrinking below what is taken: nothing more until enough comes back
    assert s.free == -3 and s.available() == -3
    s.give(4)
    assert s.free == 1


# ------------------------------------------------------------- outcome mapping


def test_plain_exception_is_retriable_with_traceback() -> None:
    tb = "Traceback...\nValueError: bad\n"
    assert outcome_of(ValueError("bad"), None, "t", tb) == Outcome(
        "fail", error="ValueError: bad", traceback=tb
    )


def test_permanent_and_cancelled_errors_are_not_retried() -> None:
    assert outcome_of(jsworker.PermanentError("no"), None).kind == "permanent"
    assert outcome_of(jsworker.TaskCancelledError("stop"), None).kind == "permanent"


def test_retryable_error_with_delay_is_clamped() -> None:
    o = outcome_of(jsworker.RetryableError("later", delay=0.001), None)
    assert o.kind == "retry_after" and o.delay == pytest.approx(0.1)
    assert outcome_of(jsworker.RetryableError("later"), None).kind == "fail"


def test_outcome_set_before_raising_stands() -> None:
    done = Outcome("complete", output=1)
    assert outcome_of(RuntimeError("late"), done) is done


def test_error_text_and_traceback_limits() -> None:
    assert outcome_of(KeyError(), None).error == "KeyError"
    tb = "x" * (MAX_TRACEBACK + 100)
    kept = outcome_of(RuntimeError("r"), None, "t", tb).traceback
    assert kept is not None and len(kept) == MAX_TRACEBACK


# ------------------------------------------------------------ jsworker.testing


async def test_environment_complete_from_return_value() -> None:
    async def handler(ctx: jsworker.TaskContext) -> dict[str, int]:
        return {"double": ctx.json()["n"] * 2}

    r = await HandlerEnvironment().run(handler, {"n": 21})
    assert r.kind == "complete" and r.output == {"double": 42}


async def test_environment_sync_handler_and_outcome_calls() -> None:
    def handler(ctx: jsworker.TaskContext) -> None:
        ctx.fail_retry_after("busy", 2.5)

    r = await HandlerEnvironment(attempt=3).run(handler)
    assert (r.kind, r.error, r.delay) == ("retry_after", "busy", 2.5)


async def test_environment_records_io() -> None:
    async def handler(ctx: jsworker.TaskContext) -> str:
        start = await ctx.load_checkpoint() or 0
        for i in range(start, 3):
            await ctx.stream({"i": i})
            await ctx.checkpoint(i + 1)
        await ctx.heartbeat()
        approved = await ctx.wait_for_signal("approved", timeout=5)
        await ctx.send_signal("other-run", "done", {"ok": approved})
        return "ok"

    env = HandlerEnvironment(checkpoint=1, signals={"approved": True})
    r = await env.run(handler)
    assert r.kind == "complete" and r.output == "ok"
    assert r.chunks == [{"i": 1}, {"i": 2}]
    assert r.checkpoints == [2, 3]
    assert r.heartbeats == 1
    assert r.signals_sent == [("other-run", "done", {"ok": True})]


async def test_environment_missing_signal_and_buckets() -> None:
    async def handler(ctx: jsworker.TaskContext) -> None:
        await ctx.wait_for_signal("never", timeout=1)

    r = await HandlerEnvironment().run(handler)
    assert r.kind == "fail" and "SignalTimeoutError" in r.error
    assert r.traceback and "wait_for_signal" in r.traceback

    async def saves(ctx: jsworker.TaskContext) -> None:
        await ctx.checkpoint(1)

    r = await HandlerEnvironment(checkpoints_enabled=False).run(saves)
    assert r.kind == "fail" and "NotProvisionedError" in r.error


async def test_environment_refuses_bad_input() -> None:
    with pytest.raises(jsworker.PayloadError):
        await HandlerEnvironment().run(lambda ctx: None, {"x": object()})


# ------------------------------------------------------------- pull accounting
class _Sub:
    async def unsubscribe(self) -> None:
        return None


class _Wire:
    """Stands in for the connection in the pull loop's accounting tests: it records the
    pull requests the loop sends and nothing else (no NATS behaviour is imitated; the
    server's side of pulls is covered by the tests against real servers)."""

    def __init__(self) -> None:
        self.requests: list[tuple[dict[str, Any], str]] = []
        self.sent = asyncio.Event()

    def new_inbox(self) -> str:
        return "_INBOX.test"

    async def subscribe(self, subject: str, cb: Any) -> _Sub:
        return _Sub()

    async def publish(self, subject: str, data: bytes, reply: str = "") -> None:
        self.requests.append((json.loads(data), reply))
        self.sent.set()


def _data(pending: int) -> Msg:
    reply = f"$JS.ACK.S.C.1.9.9.1700000000000000000.{pending}"
    return Msg(_client=None, subject="task.t.r", reply=reply, data=b"{}", headers=None)  # type: ignore[arg-type]


def _status(reply: str, code: str, pending: int | None) -> Msg:
    hdr = {"Status": code, "Description": "x"}
    if pending is not None:
        hdr["Nats-Pending-Messages"] = str(pending)
    return Msg(_client=None, subject=reply, reply="", data=b"", headers=hdr)  # type: ignore[arg-type]


async def _next_request(wire: _Wire) -> tuple[dict[str, Any], str]:
    await asyncio.wait_for(wire.sent.wait(), 2)
    wire.sent.clear()
    return wire.requests[-1]


async def test_pull_loop_accounting_is_exact() -> None:
    wire = _Wire()
    credits = Slots(8)
    got: list[Msg] = []
    tasks: list[asyncio.Task[None]] = []

    def spawn(name: str, fn: Any) -> asyncio.Task[None]:
        tasks.append(asyncio.create_task(fn()))
        return tasks[-1]

    loop = PullLoop(wire, "S", "C", credits, got.append, spawn=spawn, batch=8, expires=5)  # type: ignore[arg-type]
    await loop.start()
    req, reply = await _next_request(wire)
    assert req["batch"] == 1  # knows nothing yet: asks for one
    await loop._on_msg(_data(pending=5))  # one delivered; the consumer has 5 more
    assert len(got) == 1 and credits.free == 7 and loop.outstanding == 0
    req, reply = await _next_request(wire)
    assert req["batch"] == 6  # as many as the consumer has, plus one
    for left in (4, 3, 2, 1, 0):
        await loop._on_msg(_data(pending=left))
    assert len(got) == 6 and loop.outstanding == 1
    # the request expires with one undelivered: its credit comes back, nothing more
    await loop._on_status_msg(
        _status(reply, "408", 1), {"Status": "408", "Nats-Pending-Messages": "1"}
    )
    assert loop.outstanding == 0
    assert credits.free == 2  # 6 held by delivered messages
    req, reply = await _next_request(wire)
    assert req["batch"] == 1  # the consumer said it was empty
    await loop._on_status_msg(
        _status(reply, "408", 1), {"Status": "408", "Nats-Pending-Messages": "1"}
    )
    credits.give(6)  # the 6 delivered tasks finish
    await loop.stop()
    assert credits.free == 8 and loop.outstanding == 0  # nothing leaks
    assert all(t.done() for t in tasks)


async def test_pull_loop_naks_what_arrives_after_stop() -> None:
    wire = _Wire()
    credits = Slots(4)
    got: list[Msg] = []

    def spawn(name: str, fn: Any) -> asyncio.Task[None]:
        return asyncio.create_task(fn())

    loop = PullLoop(wire, "S", "C", credits, got.append, spawn=spawn, batch=4, expires=5)  # type: ignore[arg-type]
    await loop.start()
    await _next_request(wire)
    await loop.stop()
    late = _data(pending=0)
    naked: list[bool] = []

    async def nak(**kw: Any) -> None:
        naked.append(True)

    late.nak = nak  # type: ignore[method-assign]
    await loop._on_msg(late)
    assert naked == [True] and got == [] and credits.free == 4


async def test_a_late_status_for_an_expired_request_releases_nothing() -> None:
    wire = _Wire()
    credits = Slots(4)

    def spawn(name: str, fn: Any) -> asyncio.Task[None]:
        return asyncio.create_task(fn())

    loop = PullLoop(wire, "S", "C", credits, lambda m: None, spawn=spawn, batch=4, expires=5)  # type: ignore[arg-type]
    await loop.start()
    _, reply = await _next_request(wire)
    rid = reply.rsplit(".", 1)[1]
    await loop._on_msg(_data(pending=9))  # one delivered and held
    req, reply2 = await _next_request(wire)
    assert req["batch"] == 3
    rid2 = reply2.rsplit(".", 1)[1]
    loop._requests[rid2].deadline = 0  # lost (e.g. to a reconnect): given up locally
    loop._expire_lost()
    # its 3 credits came back, and the loop asked again with them
    _, reply3 = await _next_request(wire)
    assert reply3 not in (reply, reply2) and rid != rid2
    before = (credits.free, loop.outstanding)
    assert before[1] > 0  # the new request holds credits
    await loop._on_status_msg(
        _status(reply2, "408", 3), {"Status": "408", "Nats-Pending-Messages": "3"}
    )
    # the late status of the given-up request does not free the new request's credits
    assert (credits.free, loop.outstanding) == before
    await loop.stop()
    assert credits.free == 3  # the held message's credit is still taken


async def test_raise_if_cancelling_honours_a_cancel_an_await_swallowed() -> None:
    from jsworker._aio import raise_if_cancelling

    async def quiet() -> str:
        raise_if_cancelling()  # nothing asked: returns
        return "ran"

    async def asked() -> str:
        task = asyncio.current_task()
        assert task is not None
        task.cancel()  # asked for, but (as Python 3.11's wait_for may) not delivered
        raise_if_cancelling()
        return "ran on"

    assert await asyncio.create_task(quiet()) == "ran"
    t = asyncio.create_task(asked())
    with pytest.raises(asyncio.CancelledError):
        await t
    assert t.cancelled()


@pytest.mark.parametrize(
    "foreign",
    [
        [1, 2],
        "step.completed",
        None,
        {"step_id": "main", "type": "step.failed", "payload": [1]},
        {"step_id": "main", "type": "step.failed", "payload": {"kind": ["exhausted"]}},
        {"step_id": "main", "type": "step.failed", "payload": {"kind": "retriable"}},
    ],
)
def test_a_foreign_history_body_is_not_an_outcome(foreign: object) -> None:
    """Other languages write to history.{run} too: what is not an event of this step
    (or not an object at all) neither ends the wait nor breaks it."""
    from jsworker._client import _outcome_of

    assert _outcome_of(foreign, "main") is None


def test_terminal_events_end_the_wait() -> None:
    from jsworker._client import _outcome_of

    done = {"step_id": "main", "type": "step.completed", "payload": {"output": 1}}
    assert _outcome_of(done, "main") is done
    assert _outcome_of(done, "other") is None
    failed = {"step_id": "main", "type": "step.failed", "payload": {"kind": "exhausted"}}
    with pytest.raises(jsworker.TaskFailed) as e:
        _outcome_of(failed, "main")
    assert e.value.kind == "exhausted"
