"""Worker construction, registration and lifecycle: programmer errors raise early."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from nats.aio.client import Client as NATS

import jsworker


async def _noop(ctx: jsworker.TaskContext) -> None:
    return None


async def test_nc_none_refused() -> None:
    with pytest.raises(jsworker.ConfigError, match="nc is None"):
        jsworker.Worker(None)


async def test_empty_groups_list_refused(nc: NATS) -> None:
    with pytest.raises(jsworker.ConfigError, match="at least one group"):
        jsworker.Worker(nc, groups=[])
    with pytest.raises(jsworker.ConfigError):
        jsworker.Worker(nc, groups=())


async def test_empty_group_name_refused(nc: NATS) -> None:
    with pytest.raises(jsworker.InvalidNameError, match="empty"):
        jsworker.Worker(nc, groups=("cpu", ""))


async def test_groups_as_plain_string_refused(nc: NATS) -> None:
    with pytest.raises(jsworker.ConfigError, match="not a single string"):
        jsworker.Worker(nc, groups="cpu")  # type: ignore[arg-type]


async def test_duplicate_groups_refused(nc: NATS) -> None:
    with pytest.raises(jsworker.ConfigError, match="duplicates"):
        jsworker.Worker(nc, groups=["cpu", "cpu"])


async def test_groups_list_accepted(nc: NATS) -> None:
    w = jsworker.Worker(nc, groups=["cpu", "gpu"])
    assert w.groups == ("cpu", "gpu")
    assert jsworker.Worker(nc).groups == ()


@pytest.mark.parametrize("bad", [-1, 257, 1000, "2", 1.5, None, True])
async def test_partitions_out_of_range_refused(nc: NATS, bad: Any) -> None:
    with pytest.raises(jsworker.ConfigError, match="partitions"):
        jsworker.Worker(nc, partitions=bad)


@pytest.mark.parametrize("ok", [0, 1, 256])
async def test_partitions_in_range_accepted(nc: NATS, ok: int) -> None:
    assert jsworker.Worker(nc, partitions=ok).partitions == ok


@pytest.mark.parametrize(
    "kwargs",
    [
        {"concurrency": 0},
        {"concurrency": -3},
        {"concurrency": 1.5},
        {"batch": 0},
        {"ack_wait": 0},
        {"ack_wait": 0.1},
        {"ack_wait": -1},
        {"ack_wait": float("nan")},
        {"ack_wait": "30"},
        {"grace_period": 0},
        {"grace_period": -1},
        {"heartbeat_interval": 120},
        {"pull_expires": 0},
        {"retry": jsworker.RetryPolicy(max_attempts=-1)},
        {"worker_id": "bad id"},
        {"retry": "x"},
        {"telemetry": object()},
        {"max_iterations": 0},
        {"max_iterations": -1},
        {"max_iterations": "x"},
        {"max_iterations": True},
    ],
    ids=lambda kw: ",".join(f"{k}={v!r}" for k, v in kw.items()),
)
async def test_bad_worker_options_refused(nc: NATS, kwargs: dict[str, Any]) -> None:
    with pytest.raises(jsworker.ConfigError):
        jsworker.Worker(nc, **kwargs)


async def test_durations_accept_timedelta(nc: NATS) -> None:
    w = jsworker.Worker(nc, ack_wait=timedelta(seconds=7), grace_period=timedelta(seconds=2))
    assert w.ack_wait == 7.0
    assert w.grace_period == 2.0


@pytest.mark.parametrize(
    "options",
    [
        {"ack_wait": 0.1},
        {"retry": "fast"},
        {"max_iterations": 0},
        {"max_iterations": True},
        {"concurrency": 0},
        {"color": "red"},
    ],
    ids=lambda kw: ",".join(f"{k}={v!r}" for k, v in kw.items()),
)
async def test_bad_handler_options_refused_at_registration(
    nc: NATS, options: dict[str, Any], unique: Callable[[str], str]
) -> None:
    w = jsworker.Worker(nc)
    with pytest.raises(jsworker.ConfigError):
        w.handle(unique("t"), _noop, **options)
    assert w.task_types == []


async def test_handler_not_callable_refused(nc: NATS, unique: Callable[[str], str]) -> None:
    w = jsworker.Worker(nc)
    with pytest.raises(jsworker.ConfigError, match="callable"):
        w.handle(unique("t"), "not a function")  # type: ignore[call-overload]


async def test_registering_a_type_again_replaces_it(
    nc: NATS, unique: Callable[[str], str]
) -> None:
    ttype = unique("t")
    w = jsworker.Worker(nc)
    w.handle(ttype, _noop)

    async def other(ctx: jsworker.TaskContext) -> None:
        return None

    w.handle(ttype, other)
    assert w.task_types == [ttype]
    [info] = w.handler_info()
    assert info["version"] == 2 and info["function"].endswith("other")
    assert info["live"] is False  # not started


async def test_decorator_registers_and_returns_function(
    nc: NATS, unique: Callable[[str], str]
) -> None:
    ttype = unique("t")
    w = jsworker.Worker(nc)

    @w.handle(ttype)
    async def fn(ctx: jsworker.TaskContext) -> None:
        return None

    assert fn.__name__ == "fn"  # the decorator hands the function back unchanged
    assert w.task_types == [ttype]


async def test_start_without_handlers_is_allowed_for_live_use(
    nc: NATS, unique: Callable[[str], str]
) -> None:
    w = jsworker.Worker(nc)
    await w.start()
    try:
        assert w.running and w.task_types == []
        ttype = unique("t")
        w.handle(ttype, lambda ctx: "late")
        await w.sync()
        h = await jsworker.Client(nc).submit(ttype, None)
        assert await h.result(timeout=10) == "late"
    finally:
        await w.stop()


async def test_bad_option_raises_at_the_call_on_a_running_worker(
    nc: NATS, unique: Callable[[str], str]
) -> None:
    w = jsworker.Worker(nc)
    await w.start()
    try:
        with pytest.raises(jsworker.ConfigError, match="partitions"):
            w.handle(unique("t"), _noop, partitions=999)
        with pytest.raises(jsworker.ConfigError, match="unknown handler option"):
            w.handle(unique("t"), _noop, colour="red")
        with pytest.raises(jsworker.InvalidNameError):
            w.handle("a.>", _noop)
        assert w.task_types == []
    finally:
        await w.stop()


async def test_start_twice_refused(nc: NATS, unique: Callable[[str], str]) -> None:
    w = jsworker.Worker(nc)
    w.handle(unique("t"), _noop)
    await w.start()
    try:
        with pytest.raises(jsworker.LifecycleError):
            await w.start()
        assert w.running  # the failed second start did not disturb the first
    finally:
        await w.stop()
    with pytest.raises(jsworker.LifecycleError):
        await w.start()  # a stopped worker does not start again


async def test_register_after_stop_refused(nc: NATS, unique: Callable[[str], str]) -> None:
    w = jsworker.Worker(nc)
    w.handle(unique("t"), _noop)
    await w.start()
    await w.stop()
    with pytest.raises(jsworker.LifecycleError):
        w.handle(unique("late"), _noop)


async def test_stop_before_start_is_fine_and_idempotent(nc: NATS) -> None:
    w = jsworker.Worker(nc)
    await w.stop()
    await w.stop()
    assert not w.running
    await w.wait_stopped()  # returns at once


async def test_stop_after_start_is_idempotent(nc: NATS, unique: Callable[[str], str]) -> None:
    w = jsworker.Worker(nc)
    w.handle(unique("t"), _noop)
    await w.start()
    assert w.running
    await w.stop()
    assert not w.running
    await w.stop()
    assert not w.running


async def test_async_with_starts_and_stops(nc: NATS, unique: Callable[[str], str]) -> None:
    ttype = unique("t")
    w = jsworker.Worker(nc)

    @w.handle(ttype)
    async def echo(ctx: jsworker.TaskContext) -> object:
        return ctx.json()

    async with w as running:
        assert running is w
        assert w.running
        h = await jsworker.Client(nc).submit(ttype, [1, 2])
        assert await h.result(timeout=10) == [1, 2]
    assert not w.running


async def test_async_with_stops_on_error(nc: NATS, unique: Callable[[str], str]) -> None:
    w = jsworker.Worker(nc)
    w.handle(unique("t"), _noop)
    with pytest.raises(RuntimeError, match="boom"):
        async with w:
            assert w.running
            raise RuntimeError("boom")
    assert not w.running
    # its consumer is no longer pulled: the directory entry is gone too
    workers = await jsworker.list_workers(nc)
    assert w.worker_id not in {x.get("worker_id") for x in workers}


async def test_worker_registers_in_directory(nc: NATS, unique: Callable[[str], str]) -> None:
    ttype = unique("t")
    w = jsworker.Worker(nc, groups=("cpu",))
    w.handle(ttype, _noop)
    async with w:
        kv = await nc.jetstream().key_value("workers")
        entry = await kv.get(w.worker_id)
        value = json.loads(entry.value or b"{}")
        assert value["worker_id"] == w.worker_id
        assert value["task_types"] == [ttype]
        assert value["groups"] == ["cpu"]
        assert value["language"] == "python"
        assert value["pid"] == os.getpid()
        assert value["version"] == jsworker.__version__
        assert value["hostname"] and value["last_seen"].endswith("Z")
        assert w.worker_id in {x.get("worker_id") for x in await jsworker.list_workers(nc)}
    # deleted on stop
    assert w.worker_id not in {x.get("worker_id") for x in await jsworker.list_workers(nc)}
