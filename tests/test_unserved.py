"""A task nobody serves is still stored, but the submitter is told: a NoWorkerWarning
from Client.submit, a stderr warning from `jsworker task submit` (exit 0), and --wait
prints each retry as it happens."""

from __future__ import annotations

import asyncio
import warnings
from collections.abc import Callable

import pytest
from nats.aio.client import Client as NATS
from nats.js.api import AckPolicy, ConsumerConfig
from test_ops_cli import cli

import jsworker


async def test_client_warns_when_no_worker_serves_the_type(
    nc: NATS, unique: Callable[[str], str]
) -> None:
    ttype = unique("nobody")
    js = nc.jetstream()
    with pytest.warns(jsworker.NoWorkerWarning, match=f"no worker is listening for task.{ttype}"):
        h = await jsworker.Client(nc, warn_no_worker=True).submit(ttype, {})
    assert h.listening is False
    with warnings.catch_warnings():
        warnings.simplefilter("error", jsworker.NoWorkerWarning)  # warn_no_worker=False: none
        quiet = await jsworker.Client(nc, warn_no_worker=False).submit(ttype, {"quiet": 1})
    assert quiet.listening is False
    with pytest.warns(jsworker.NoWorkerWarning):  # the default warns
        await jsworker.Client(nc).submit(unique("nobody-default"), {})
    # a consumer alone (a durable left by a stopped worker) is not a worker
    await js.add_consumer(
        "TASK_QUEUES",
        ConsumerConfig(
            durable_name=ttype, filter_subject=f"task.{ttype}.*", ack_policy=AckPolicy.EXPLICIT
        ),
    )
    with pytest.warns(jsworker.NoWorkerWarning):
        h2 = await jsworker.Client(nc, warn_no_worker=True).submit(ttype, {})
    assert h2.listening is False
    await js.delete_consumer("TASK_QUEUES", ttype)
    await js.purge_stream("TASK_QUEUES", subject=f"task.{ttype}.>")

    served = unique("served")
    w = jsworker.Worker(nc)

    @w.handle(served)
    async def h3(ctx: jsworker.TaskContext) -> int:
        return 1

    async with w:
        client = jsworker.Client(nc, warn_no_worker=True)
        with warnings.catch_warnings():
            warnings.simplefilter("error", jsworker.NoWorkerWarning)
            got = await client.submit(served, {})
            assert got.listening is True and await got.result(timeout=10) == 1
            many = await client.submit_many([jsworker.TaskRequest(served, i) for i in range(5)])
            assert all(x.listening for x in many)


async def test_cli_warns_and_wait_prints_retries(
    nc: NATS, unique: Callable[[str], str], server_env: dict[str, str]
) -> None:
    ttype = unique("nobody-cli")
    p = await asyncio.to_thread(cli, "task", "submit", ttype, "{}", env=server_env)
    assert p.returncode == 0, p.stderr
    assert f"no worker is listening for task.{ttype}" in p.stderr, p.stderr
    assert "NoWorkerWarning" not in p.stderr  # the CLI's own line, not a Python warning
    await nc.jetstream().purge_stream("TASK_QUEUES", subject=f"task.{ttype}.>")

    flaky = unique("flaky")
    w = jsworker.Worker(nc)
    calls: list[int] = []

    @w.handle(flaky, retry=jsworker.RetryPolicy.fixed(0.2, max_attempts=3))
    async def h(ctx: jsworker.TaskContext) -> str:
        calls.append(ctx.info.attempt)
        if ctx.info.attempt < 3:
            raise RuntimeError(f"flake {ctx.info.attempt}")
        return "ok"

    async with w:
        p = await asyncio.to_thread(
            cli, "task", "submit", flaky, "{}", "--wait", "--timeout", "20", env=server_env
        )
    assert p.returncode == 0, p.stderr
    assert "no worker is listening" not in p.stderr, p.stderr
    assert "attempt 1 failed (retriable), retrying in 0.2 s" in p.stderr, p.stderr
    assert "attempt 2 failed (retriable), retrying in 0.2 s" in p.stderr, p.stderr
    assert "completed" in p.stdout
