"""The client: submit, submit_many, results, payload limits, missing streams."""

from __future__ import annotations

import time
from collections.abc import Callable

import nats
import pytest
from nats.aio.client import Client as NATS

import jsworker
from jsworker import EmbeddedServer


async def stored(nc: NATS, subject_filter: str) -> int:
    """How many messages of TASK_QUEUES match ``subject_filter``."""
    info = await nc.jetstream().stream_info("TASK_QUEUES", subjects_filter=subject_filter)
    return sum((info.state.subjects or {}).values())


async def test_submit_many(nc: NATS, unique: Callable[[str], str]) -> None:
    ttype = unique("many")
    w = jsworker.Worker(nc)

    @w.handle(ttype)
    async def h(ctx: jsworker.TaskContext) -> object:
        return {"i": ctx.json(), "meta": ctx.info.metadata, "group": ctx.info.group}

    reqs = [
        jsworker.TaskRequest(ttype, i, metadata={"n": str(i)}, group="g" if i % 5 == 0 else None)
        for i in range(40)
    ]
    client = jsworker.Client(nc)
    handles = await client.submit_many(reqs, window=8)
    assert len(handles) == 40
    assert len({h.run_id for h in handles}) == 40
    assert not any(h.duplicate for h in handles)
    async with w:
        for i, h in enumerate(handles):
            out = await h.result(timeout=15)
            assert out == {"i": i, "meta": {"n": str(i)}, "group": "g" if i % 5 == 0 else None}
    assert w.stats.completed == 40


async def test_submit_many_duplicates_flagged(nc: NATS, unique: Callable[[str], str]) -> None:
    ttype = unique("many")
    run = unique("run")
    client = jsworker.Client(nc)
    handles = await client.submit_many(
        [jsworker.TaskRequest(ttype, 1, run_id=run, step_id="s")] * 3, window=1
    )
    assert [h.duplicate for h in handles] == [False, True, True]
    assert len({h.sequence for h in handles}) == 1
    assert await stored(nc, f"task.{ttype}.>") == 1
    await nc.jetstream().purge_stream("TASK_QUEUES", subject=f"task.{ttype}.>")


async def test_submit_many_validates_everything_first(
    nc: NATS, unique: Callable[[str], str]
) -> None:
    ttype = unique("many")
    reqs = [jsworker.TaskRequest(ttype, i) for i in range(5)]
    reqs.append(jsworker.TaskRequest(ttype, 99, group="bad group"))
    with pytest.raises(jsworker.InvalidNameError):
        await jsworker.Client(nc).submit_many(reqs)
    with pytest.raises(jsworker.PayloadError):
        await jsworker.Client(nc).submit_many([*reqs[:5], jsworker.TaskRequest(ttype, {1, 2})])
    assert await stored(nc, f"task.{ttype}.>") == 0


async def test_result_timeout(nc: NATS, unique: Callable[[str], str]) -> None:
    ttype = unique("nobody")
    handle = await jsworker.Client(nc).submit(ttype)
    t0 = time.monotonic()
    with pytest.raises(jsworker.TaskTimeout) as ei:
        await handle.result(timeout=0.3)
    assert 0.25 <= time.monotonic() - t0 < 3
    assert isinstance(ei.value, TimeoutError)
    assert handle.run_id in str(ei.value)
    await nc.jetstream().purge_stream("TASK_QUEUES", subject=f"task.{ttype}.>")


async def test_result_after_completion_and_events(nc: NATS, unique: Callable[[str], str]) -> None:
    """``result()`` called long after the task finished still finds the outcome."""
    ttype = unique("late")
    w = jsworker.Worker(nc)

    @w.handle(ttype)
    async def h(ctx: jsworker.TaskContext) -> object:
        return "done"

    client = jsworker.Client(nc)
    async with w:
        handle = await client.submit(ttype)
        assert await handle.result(timeout=10) == "done"
    assert await handle.result(timeout=5) == "done"
    types = [e["type"] async for e in handle.events(timeout=0.3)]
    assert types == ["step.started", "step.completed"]


async def test_oversized_payload_refused(nc: NATS, unique: Callable[[str], str]) -> None:
    ttype = unique("big")
    limit = nc.max_payload
    assert limit == 1024 * 1024  # server default
    client = jsworker.Client(nc)
    with pytest.raises(jsworker.PayloadError, match="max_payload") as ei:
        await client.submit(ttype, "x" * limit)
    assert str(limit) in str(ei.value)
    with pytest.raises(jsworker.PayloadError):
        await client.submit_many([jsworker.TaskRequest(ttype, "y" * limit)])
    assert await stored(nc, f"task.{ttype}.>") == 0
    # just under the limit is fine
    handle = await client.submit(ttype, "z" * (limit - 1024))
    assert not handle.duplicate
    await nc.jetstream().purge_stream("TASK_QUEUES", subject=f"task.{ttype}.>")


@pytest.mark.parametrize(
    "bad",
    [b"not json", b"{'single': 'quotes'}", b"\xff\xfe", bytearray(b"[1,"), {1, 2}, object()],
    ids=["text", "single-quotes", "binary", "bytearray", "set", "object"],
)
async def test_non_json_input_refused(nc: NATS, unique: Callable[[str], str], bad: object) -> None:
    ttype = unique("nonjson")
    with pytest.raises(jsworker.PayloadError):
        await jsworker.Client(nc).submit(ttype, bad)
    assert await stored(nc, f"task.{ttype}.>") == 0


async def test_payload_error_is_value_error() -> None:
    assert issubclass(jsworker.PayloadError, ValueError)
    assert issubclass(jsworker.PayloadError, jsworker.JSWorkerError)


async def test_submit_without_streams(fresh_server: EmbeddedServer) -> None:
    nc = await nats.connect(fresh_server.url, allow_reconnect=False)
    try:
        with pytest.raises(jsworker.NotProvisionedError, match="jsworker kv setup"):
            await jsworker.Client(nc).submit("email", {"to": "x"})
    finally:
        await nc.close()


async def test_submit_many_without_streams(fresh_server: EmbeddedServer) -> None:
    nc = await nats.connect(fresh_server.url, allow_reconnect=False)
    try:
        with pytest.raises(jsworker.NotProvisionedError, match="jsworker kv setup"):
            await jsworker.Client(nc).submit_many([jsworker.TaskRequest("email", 1)])
    finally:
        await nc.close()


async def test_result_without_history_stream(fresh_server: EmbeddedServer) -> None:
    nc = await nats.connect(fresh_server.url, allow_reconnect=False)
    try:
        with pytest.raises(jsworker.NotProvisionedError, match="jsworker kv setup"):
            await jsworker.Client(nc).wait_outcome("run-1", "s", timeout=5)
    finally:
        await nc.close()


async def test_worker_start_without_streams(fresh_server: EmbeddedServer) -> None:
    nc = await nats.connect(fresh_server.url, allow_reconnect=False)
    try:
        w = jsworker.Worker(nc)

        @w.handle("email")
        async def h(ctx: jsworker.TaskContext) -> None:
            return None

        with pytest.raises(jsworker.NotProvisionedError, match="jsworker kv setup") as ei:
            await w.start()
        assert "TASK_QUEUES" in str(ei.value)
        assert not w.running
        await w.stop()  # fine after a failed start
        # nothing was created behind the user's back
        assert await nc.jetstream().streams_info() == []
    finally:
        await nc.close()


async def test_worker_start_with_partial_provisioning(fresh_server: EmbeddedServer) -> None:
    """Streams present but a required stream missing: still NotProvisionedError."""
    nc = await nats.connect(fresh_server.url, allow_reconnect=False)
    try:
        await jsworker.setup_all(nc)
        await nc.jetstream().delete_stream("DEAD_LETTERS")
        w = jsworker.Worker(nc)
        w.handle("email", lambda ctx: None)
        with pytest.raises(jsworker.NotProvisionedError, match="DEAD_LETTERS"):
            await w.start()
        assert not w.running
    finally:
        await nc.close()


async def history_consumers(nc: NATS, run: str) -> list[str]:
    """Names of the WORKFLOW_HISTORY consumers reading ``history.{run}``."""
    infos = await nc.jetstream().consumers_info("WORKFLOW_HISTORY")
    return [c.name for c in infos if c.config.filter_subject == f"history.{run}"]


async def until(cond: Callable[[], bool], what: object = "") -> None:
    """Wait (polling) until ``cond()`` holds; fail after 15 s."""
    import asyncio

    deadline = time.monotonic() + 15
    while not cond():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.02)


async def test_wait_outcome_keeps_one_consumer_and_survives_losing_it(
    nc: NATS, unique: Callable[[str], str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A long wait used to subscribe afresh (a new consumer, the history replayed) after
    every 5 s without an event. It now keeps its subscription and only looks its
    consumer up; when the server has lost it, it subscribes again and still gets the
    outcome."""
    import asyncio

    from jsworker import _client

    monkeypatch.setattr(_client, "OUTCOME_CHECK", 0.2)  # five checks a second
    ttype, run = unique("long"), unique("run")
    creates: list[str] = []
    infos: list[str] = []

    async def on_create(msg: nats.aio.msg.Msg) -> None:
        creates.append(msg.subject)

    async def on_info(msg: nats.aio.msg.Msg) -> None:
        infos.append(msg.subject)

    # the JetStream API requests this wait makes (consumers of other tests' runs filter
    # other subjects; a create request names the filter as its last tokens or its body)
    async def mine_create(msg: nats.aio.msg.Msg) -> None:
        if f"history.{run}".encode() in msg.data or msg.subject.endswith(f"history.{run}"):
            await on_create(msg)

    watch = await nc.subscribe("$JS.API.CONSUMER.CREATE.WORKFLOW_HISTORY.>", cb=mine_create)
    watch2 = await nc.subscribe("$JS.API.CONSUMER.CREATE.WORKFLOW_HISTORY", cb=mine_create)
    watch3 = await nc.subscribe("$JS.API.CONSUMER.INFO.WORKFLOW_HISTORY.>", cb=on_info)
    release = asyncio.Event()
    w = jsworker.Worker(nc)

    @w.handle(ttype)
    async def slow(ctx: jsworker.TaskContext) -> object:
        await release.wait()
        return "done"

    js = nc.jetstream()
    client = jsworker.Client(nc)
    async with w:
        h = await client.submit(ttype, None, run_id=run)
        waiting = asyncio.create_task(h.result(timeout=30))
        await until(lambda: len(creates) == 1)
        names = await history_consumers(nc, run)
        assert len(names) == 1
        # about a second of quiet waiting: five lookups of that consumer, no new one
        await until(lambda: sum(i.endswith(names[0]) for i in infos) >= 5)
        assert len(creates) == 1, creates  # the old code: one per quiet spell
        # the server loses the consumer (as with a cluster node): the wait notices
        await js.delete_consumer("WORKFLOW_HISTORY", names[0])
        await until(lambda: len(creates) == 2)
        release.set()
        assert await waiting == "done"
    await watch.unsubscribe()
    await watch2.unsubscribe()
    await watch3.unsubscribe()


async def test_following_events_survives_a_lost_consumer(
    nc: NATS, unique: Callable[[str], str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`run_events` following a run (`task events --follow`, `task watch`): when the
    server loses its consumer, it subscribes again from the event after the last one it
    gave, so nothing is missed and nothing repeats."""
    import asyncio
    import json

    from jsworker import _client

    monkeypatch.setattr(_client, "OUTCOME_CHECK", 0.2)
    run = unique("run")
    js = nc.jetstream()
    got: list[int] = []

    async def publish(i: int) -> None:
        ev = {"type": "step.progress", "run_id": run, "step_id": "main", "i": i}
        await js.publish(f"history.{run}", json.dumps(ev).encode())

    async def follow() -> None:
        async for ev in jsworker.Client(nc).run_events(run):
            got.append(ev["i"])
            if len(got) == 6:
                return

    for i in range(3):
        await publish(i)
    follower = asyncio.create_task(follow())
    await until(lambda: len(got) == 3, got)
    mine = await history_consumers(nc, run)
    assert len(mine) == 1
    await js.delete_consumer("WORKFLOW_HISTORY", mine[0])
    deadline = time.monotonic() + 15
    while not await history_consumers(nc, run):  # the follower subscribed again
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    for i in range(3, 6):
        await publish(i)
    await asyncio.wait_for(follower, 15)
    assert got == [0, 1, 2, 3, 4, 5]
