"""The pull loop's credit accounting against statuses from a real server."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from jsworker import _names as n
from jsworker._pull import NO_RESPONDERS_PAUSE, PullLoop, Slots


async def test_no_responders_gives_credits_back_and_pulls_again(
    nc: NATS, unique: Callable[[str], str]
) -> None:
    """A consumer with no leader (a cluster failover; here: no consumer at all) answers
    pull requests with status 503. Each ends its request: its credits come back and the
    loop pulls again, after a pause rather than in a tight loop. (A 503 used to drop the
    request but keep its credits: with all of them held, the loop never pulled again.)"""
    got: list[Msg] = []
    statuses: list[tuple[str, float]] = []

    async def on_status(code: str, desc: str, msg: Msg) -> None:
        statuses.append((code, time.monotonic()))

    def spawn(name: str, fn: Callable[[], Awaitable[None]]) -> asyncio.Task[None]:
        async def run() -> None:
            await fn()

        return asyncio.create_task(run(), name=name)

    credits = Slots(4)
    loop = PullLoop(
        nc,
        n.TASK_STREAM,
        unique("nobody"),
        credits,
        got.append,
        spawn=spawn,
        batch=4,
        on_status=on_status,
    )
    await loop.start()
    try:
        deadline = time.monotonic() + 20
        while len(statuses) < 4:
            assert time.monotonic() < deadline, (statuses, loop.outstanding, credits.free)
            await asyncio.sleep(0.05)
    finally:
        await loop.stop()
    assert got == []
    assert {code for code, _ in statuses} == {"503"}
    # pulled again after each, with at least one pause in between
    assert statuses[3][1] - statuses[0][1] >= NO_RESPONDERS_PAUSE
    assert loop.outstanding == 0 and credits.free == credits.size
