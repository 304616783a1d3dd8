"""Graceful stop: in-flight tasks finish within the grace period, the rest are handed
back at once (nak) so another worker runs them long before AckWait."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from nats.aio.client import Client as NATS

import jsworker


class Started:
    """Counts handler starts; ``wait(n)`` returns once ``n`` have started."""

    def __init__(self) -> None:
        self.count = 0
        self._changed = asyncio.Event()

    def hit(self) -> None:
        self.count += 1
        self._changed.set()

    async def wait(self, n: int, timeout: float = 10.0) -> None:
        async def _wait() -> None:
            while self.count < n:
                self._changed.clear()
                await self._changed.wait()

        await asyncio.wait_for(_wait(), timeout)


async def test_in_flight_tasks_finish_within_grace(nc: NATS, unique: Callable[[str], str]) -> None:
    ttype = unique("drain")
    started = Started()
    w = jsworker.Worker(nc, grace_period=10)

    @w.handle(ttype)
    async def h(ctx: jsworker.TaskContext) -> object:
        started.hit()
        await asyncio.sleep(0.5)
        return {"i": ctx.json()}

    await w.start()
    client = jsworker.Client(nc)
    handles = [await client.submit(ttype, i) for i in range(3)]
    await started.wait(3)
    t0 = time.monotonic()
    await w.stop()
    elapsed = time.monotonic() - t0
    assert elapsed < 5, elapsed  # waited for the tasks, not for the whole grace period
    assert w.stats.completed == 3
    assert w.stats.nacked_on_stop == 0
    for i, h_ in enumerate(handles):
        assert await h_.result(timeout=5) == {"i": i}


async def test_short_grace_naks_and_another_worker_takes_over(
    nc: NATS, unique: Callable[[str], str]
) -> None:
    ttype = unique("handoff")
    started = Started()
    cancelled: list[str] = []
    # AckWait 30 s: only a nak explains a redelivery within a few seconds
    a = jsworker.Worker(nc, ack_wait=30, grace_period=0.3)
    b = jsworker.Worker(nc, ack_wait=30)

    @a.handle(ttype)
    async def slow(ctx: jsworker.TaskContext) -> object:
        started.hit()
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.append(ctx.run_id)
            raise
        return "a"

    @b.handle(ttype)
    async def quick(ctx: jsworker.TaskContext) -> object:
        return {"by": "b", "attempt": ctx.attempt}

    await a.start()
    client = jsworker.Client(nc)
    handles = [await client.submit(ttype, i) for i in range(2)]
    await started.wait(2)
    async with b:
        t0 = time.monotonic()
        await a.stop()  # the worker's own grace period: 0.3 s
        assert time.monotonic() - t0 < 3
        for h_ in handles:
            assert await h_.result(timeout=10) == {"by": "b", "attempt": 2}
        taken_over = time.monotonic() - t0
        assert taken_over < 5, taken_over  # far below AckWait (30 s)
        # the stopped worker fetches nothing any more
        late = await client.submit(ttype, "late")
        assert (await late.result(timeout=10))["by"] == "b"
    assert sorted(cancelled) == sorted(h_.run_id for h_ in handles)
    assert a.stats.nacked_on_stop == 2
    assert a.stats.completed == 0
    assert started.count == 2


async def test_grace_lets_quick_finish_and_naks_slow(
    nc: NATS, unique: Callable[[str], str]
) -> None:
    ttype = unique("mixed")
    started = Started()
    a = jsworker.Worker(nc, ack_wait=30)
    b = jsworker.Worker(nc, ack_wait=30)

    @a.handle(ttype)
    async def on_a(ctx: jsworker.TaskContext) -> object:
        started.hit()
        await asyncio.sleep(ctx.json())
        return "a"

    @b.handle(ttype)
    async def on_b(ctx: jsworker.TaskContext) -> object:
        return "b"

    await a.start()
    client = jsworker.Client(nc)
    quick = await client.submit(ttype, 0.3)
    slow = await client.submit(ttype, 60)
    await started.wait(2)
    async with b:
        t0 = time.monotonic()
        await a.stop(grace_period=1.5)
        assert 1.4 <= time.monotonic() - t0 < 4
        assert await quick.result(timeout=5) == "a"
        assert await slow.result(timeout=5) == "b"
    assert a.stats.completed == 1 and a.stats.nacked_on_stop == 1


async def test_tasks_heartbeated_during_grace(nc: NATS, unique: Callable[[str], str]) -> None:
    """A task running past AckWait while the worker drains is not redelivered."""
    ttype = unique("hb")
    started = Started()
    b_calls = 0
    a = jsworker.Worker(nc, ack_wait=1.0)
    b = jsworker.Worker(nc, ack_wait=1.0)

    @a.handle(ttype)
    async def long(ctx: jsworker.TaskContext) -> object:
        started.hit()
        await asyncio.sleep(2.5)
        return "a"

    @b.handle(ttype)
    async def other(ctx: jsworker.TaskContext) -> object:
        nonlocal b_calls
        b_calls += 1
        return "b"

    await a.start()
    h = await jsworker.Client(nc).submit(ttype)
    await started.wait(1)
    async with b:
        await a.stop(grace_period=10)
        assert await h.result(timeout=5) == "a"
    assert b_calls == 0


async def test_sync_handler_past_grace_is_handed_back(
    nc: NATS, unique: Callable[[str], str]
) -> None:
    ttype = unique("sync")
    a = jsworker.Worker(nc, ack_wait=30)
    b = jsworker.Worker(nc, ack_wait=30)
    in_thread = asyncio.Event()
    loop = asyncio.get_running_loop()

    @a.handle(ttype)
    def blocking(ctx: jsworker.TaskContext) -> object:
        loop.call_soon_threadsafe(in_thread.set)
        time.sleep(1.0)  # a thread cannot be cancelled; its result is discarded
        return "a"

    @b.handle(ttype)
    async def on_b(ctx: jsworker.TaskContext) -> object:
        return "b"

    await a.start()
    h = await jsworker.Client(nc).submit(ttype)
    await asyncio.wait_for(in_thread.wait(), 10)
    async with b:
        t0 = time.monotonic()
        await a.stop(grace_period=0.2)
        assert time.monotonic() - t0 < 1.0
        assert await h.result(timeout=10) == "b"
    assert a.stats.nacked_on_stop == 1


async def test_concurrent_stops_all_return(nc: NATS, unique: Callable[[str], str]) -> None:
    ttype = unique("stops")
    started = Started()
    w = jsworker.Worker(nc)

    @w.handle(ttype)
    async def h(ctx: jsworker.TaskContext) -> object:
        started.hit()
        await asyncio.sleep(0.3)
        return "done"

    await w.start()
    handle = await jsworker.Client(nc).submit(ttype)
    await started.wait(1)
    await asyncio.wait_for(asyncio.gather(w.stop(), w.stop(), w.stop()), 10)
    assert not w.running
    assert await handle.result(timeout=5) == "done"
    await asyncio.wait_for(w.wait_stopped(), 1)


async def test_stop_with_nothing_in_flight_is_quick(nc: NATS, unique: Callable[[str], str]) -> None:
    w = jsworker.Worker(nc, grace_period=30)

    @w.handle(unique("idle"))
    async def h(ctx: jsworker.TaskContext) -> None:
        return None

    await w.start()
    t0 = time.monotonic()
    await w.stop()
    assert time.monotonic() - t0 < 2


async def test_stop_with_zero_grace_hands_back_at_once(
    nc: NATS, unique: Callable[[str], str]
) -> None:
    """``stop(grace_period=0)`` (allowed by ``stop``) means no grace: nak now, not "wait
    forever" for the running tasks."""
    ttype = unique("zero")
    started = Started()
    a = jsworker.Worker(nc, ack_wait=30)

    @a.handle(ttype)
    async def slow(ctx: jsworker.TaskContext) -> object:
        started.hit()
        await asyncio.sleep(30)
        return "a"

    await a.start()
    await jsworker.Client(nc).submit(ttype)
    await started.wait(1)
    t0 = time.monotonic()
    try:
        await asyncio.wait_for(a.stop(grace_period=0), 5)
    finally:
        await nc.jetstream().purge_stream("TASK_QUEUES", subject=f"task.{ttype}.>")
    assert time.monotonic() - t0 < 2
    assert a.stats.nacked_on_stop == 1
