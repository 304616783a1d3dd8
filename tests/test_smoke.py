"""End-to-end smoke test: one task through a real server."""

from __future__ import annotations

from collections.abc import Callable

from nats.aio.client import Client as NATS

import jsworker


async def test_submit_and_complete(nc: NATS, unique: Callable[[str], str]) -> None:
    ttype = unique("echo")
    w = jsworker.Worker(nc)

    @w.handle(ttype)
    async def echo(ctx: jsworker.TaskContext) -> object:
        return {"got": ctx.json(), "attempt": ctx.attempt}

    async with w:
        h = await jsworker.Client(nc).submit(ttype, {"a": 1})
        assert await h.result(timeout=10) == {"got": {"a": 1}, "attempt": 1}
    assert w.stats.completed == 1
