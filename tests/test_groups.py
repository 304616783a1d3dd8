"""Worker groups: routing by ``task.{type}.{group}.>`` and refused mixes."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from nats.aio.client import Client as NATS
from nats.js.api import AckPolicy, ConsumerConfig

import jsworker


def recorder(
    seen: list[tuple[str, str | None]], label: str
) -> Callable[[jsworker.TaskContext], object]:
    async def handler(ctx: jsworker.TaskContext) -> object:
        seen.append((label, ctx.info.group))
        return {"by": label, "group": ctx.info.group}

    return handler


async def test_grouped_workers_only_get_their_group(nc: NATS, unique: Callable[[str], str]) -> None:
    ttype = unique("render")
    seen: list[tuple[str, str | None]] = []
    cpu = jsworker.Worker(nc, groups=("cpu",))
    gpu = jsworker.Worker(nc, groups=("gpu",))
    cpu.handle(ttype, recorder(seen, "cpu-worker"))
    gpu.handle(ttype, recorder(seen, "gpu-worker"))
    client = jsworker.Client(nc)
    async with cpu, gpu:
        handles = []
        for i in range(6):
            group = "gpu" if i % 2 else "cpu"
            handles.append((group, await client.submit(ttype, i, group=group)))
        for group, h in handles:
            assert h.subject == f"task.{ttype}.{group}.{h.run_id}"
            out = await h.result(timeout=10)
            assert out == {"by": f"{group}-worker", "group": group}
    assert sorted(seen) == [("cpu-worker", "cpu")] * 3 + [("gpu-worker", "gpu")] * 3
    assert cpu.stats.completed == 3 and gpu.stats.completed == 3


async def test_gpu_task_waits_without_gpu_worker(nc: NATS, unique: Callable[[str], str]) -> None:
    """A cpu-only worker never takes a gpu task, even when it is idle."""
    ttype = unique("render")
    seen: list[tuple[str, str | None]] = []
    cpu = jsworker.Worker(nc, groups=("cpu",))
    cpu.handle(ttype, recorder(seen, "cpu-worker"))
    client = jsworker.Client(nc)
    async with cpu:
        g = await client.submit(ttype, "for the gpu", group="gpu")
        c = await client.submit(ttype, "for the cpu", group="cpu")
        assert await c.result(timeout=10) == {"by": "cpu-worker", "group": "cpu"}
        with pytest.raises(jsworker.TaskTimeout):
            await g.result(timeout=0.5)
    assert seen == [("cpu-worker", "cpu")]
    # the gpu task is still queued; a gpu worker picks it up
    gpu = jsworker.Worker(nc, groups=("gpu",))
    gpu.handle(ttype, recorder(seen, "gpu-worker"))
    async with gpu:
        assert await g.result(timeout=10) == {"by": "gpu-worker", "group": "gpu"}


async def test_worker_with_several_groups(nc: NATS, unique: Callable[[str], str]) -> None:
    ttype = unique("render")
    seen: list[tuple[str, str | None]] = []
    w = jsworker.Worker(nc, groups=("cpu", "gpu"))
    w.handle(ttype, recorder(seen, "both"))
    client = jsworker.Client(nc)
    async with w:
        a = await client.submit(ttype, group="cpu")
        b = await client.submit(ttype, group="gpu")
        c = await client.submit(ttype, group="tpu")
        assert (await a.result(timeout=10))["group"] == "cpu"
        assert (await b.result(timeout=10))["group"] == "gpu"
        with pytest.raises(jsworker.TaskTimeout):
            await c.result(timeout=0.3)
    await nc.jetstream().purge_stream("TASK_QUEUES", subject=f"task.{ttype}.>")


async def test_ungrouped_worker_gets_ungrouped_tasks(
    nc: NATS, unique: Callable[[str], str]
) -> None:
    ttype = unique("plain")
    seen: list[tuple[str, str | None]] = []
    w = jsworker.Worker(nc)
    w.handle(ttype, recorder(seen, "all"))
    async with w:
        h = await jsworker.Client(nc).submit(ttype)
        assert await h.result(timeout=10) == {"by": "all", "group": None}


@pytest.mark.parametrize("grouped_first", [True, False], ids=["grouped-first", "plain-first"])
async def test_grouped_and_ungrouped_worker_conflict(
    nc: NATS, unique: Callable[[str], str], grouped_first: bool
) -> None:
    ttype = unique("mixed")
    seen: list[tuple[str, str | None]] = []
    grouped = jsworker.Worker(nc, groups=("cpu",))
    plain = jsworker.Worker(nc)
    grouped.handle(ttype, recorder(seen, "grouped"))
    plain.handle(ttype, recorder(seen, "plain"))
    first, second = (grouped, plain) if grouped_first else (plain, grouped)
    async with first:
        with pytest.raises(jsworker.ConsumerConflictError) as ei:
            await second.start()
        msg = str(ei.value)
        assert ttype in msg
        assert "groups" in msg
        assert not second.running
        await second.stop()  # safe after a failed start
        # the worker that was there first keeps working
        h = await jsworker.Client(nc).submit(ttype, group="cpu")
        assert (await h.result(timeout=10))["by"] == ("grouped" if grouped_first else "plain")
    assert isinstance(ei.value, jsworker.ServerError)


async def test_foreign_consumer_with_other_filter_conflicts(
    nc: NATS, unique: Callable[[str], str]
) -> None:
    """A consumer named like ours but filtering something else is not silently used."""
    ttype = unique("foreign")
    js = nc.jetstream()
    await js.add_consumer(
        "TASK_QUEUES",
        ConsumerConfig(
            durable_name=ttype,
            filter_subject=f"task.{ttype}.special.>",
            ack_policy=AckPolicy.EXPLICIT,
        ),
    )
    w = jsworker.Worker(nc)
    w.handle(ttype, recorder([], "x"))
    with pytest.raises(jsworker.ConsumerConflictError, match="not created by jsworker"):
        await w.start()
    # never delete a consumer the worker did not create
    ci = await js.consumer_info("TASK_QUEUES", ttype)
    assert ci.config.filter_subject == f"task.{ttype}.special.>"
    await js.delete_consumer("TASK_QUEUES", ttype)
