"""The pull loop's slot accounting against statuses from a real server."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from jsworker import _names as n
from jsworker._pull import NO_RESPONDERS_PAUSE, PullLoop, Slots


async def test_no_responders_gives_slots_back_and_pulls_again(
    nc: NATS, unique: Callable[[str], str]
) -> None:
    """A consumer with no leader (a cluster failover; here: no consumer at all) answers
    pull requests with status 503. Each ends its request: its slots come back and the
    loop pulls again, after a pause rather than in a tight loop. (A 503 used to drop the
    request but keep its slots: with all of them held, the loop never pulled again.)"""
    got: list[Msg] = []
    slots = Slots(4)
    loop = PullLoop(nc, n.TASK_STREAM, unique("nobody"), slots, got.append, batch=4)
    t0 = time.monotonic()
    await loop.start()
    try:
        deadline = t0 + 20
        while loop.stats.statuses.get("503", 0) < 4:
            assert time.monotonic() < deadline, (loop.stats, loop.outstanding, slots.free)
            await asyncio.sleep(0.05)
        took = time.monotonic() - t0
    finally:
        await loop.stop()
    assert loop.error is None
    assert got == []
    assert loop.stats.statuses.keys() == {"503"}
    # four requests, at least one pause between them
    assert took >= NO_RESPONDERS_PAUSE
    assert loop.outstanding == 0 and slots.free == slots.size
