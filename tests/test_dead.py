"""jsworker._dead against a real server: listing, showing, replaying and purging dead
letters written by a real worker, by hand (other languages) and as garbage."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any

import pytest
from nats.aio.client import Client as NATS

import jsworker
from jsworker._dead import (
    DeadLetterNotFound,
    ReplayError,
    get_dead,
    list_dead,
    parse_record,
    purge_dead,
    replay_dead,
)

DEAD = "DEAD_LETTERS"
TASKS = "TASK_QUEUES"


async def wait_for(pred: Callable[[], Any], timeout: float = 15.0, what: str = "") -> Any:
    """Poll ``pred`` (sync or async) until it returns something truthy."""
    deadline = time.monotonic() + timeout
    while True:
        r = pred()
        if asyncio.iscoroutine(r):
            r = await r
        if r:
            return r
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


async def clock_past(t: float) -> None:
    """Wait until the wall clock is past ``t`` (record timestamps are wall-clock)."""
    await asyncio.sleep(max(0.0, t - time.time()) + 0.001)
    assert time.time() > t


def record(task_type: str, run_id: str, step_id: str, **over: Any) -> bytes:
    """A dead letter in the shape jsworker._outcomes writes (as another language would)."""
    rec = {
        "task_type": task_type,
        "kind": "exhausted",
        "error": "boom\nsecond line",
        "attempts": 3,
        "worker_id": "worker-go-1",
        "subject": f"task.{task_type}.{run_id}",
        "timestamp": "2026-01-01T00:00:00.000000Z",
        "task": {
            "task_id": "t1",
            "run_id": run_id,
            "step_id": step_id,
            "iteration": 0,
            "input": {"n": 1},
            "metadata": {"k": "v"},
        },
    }
    rec.update(over)
    return json.dumps(rec).encode()


async def put(nc: NATS, subject: str, data: bytes) -> int:
    ack = await nc.jetstream().publish(subject, data)
    return int(ack.seq)


async def history_types(nc: NATS, run_id: str) -> list[str]:
    got = []
    async for ev in jsworker.Client(nc).run_events(run_id, timeout=0.5):
        got.append(ev["type"])
    return got


# ---------------------------------------------------------------- a real worker
async def test_dead_letter_listed_shown_replayed_once(
    nc: NATS, unique: Callable[[str], str]
) -> None:
    ttype = unique("dl")
    seen: list[jsworker.TaskInfo] = []
    w = jsworker.Worker(nc, groups=["g1"])

    @w.handle(ttype)
    async def h(ctx: jsworker.TaskContext) -> Any:
        seen.append(ctx.info)
        if len(seen) == 1:
            ctx.fail_permanent("no recipient")
            return None
        return {"ok": ctx.json()["to"]}

    async with w:
        handle = await jsworker.Client(nc).submit(
            ttype, {"to": "a@b.c"}, group="g1", key="key-7", step_id="send", metadata={"k": "v"}
        )
        dls = await wait_for(lambda: list_dead(nc, task_type=ttype), what="the dead letter")
        assert len(dls) == 1
        dl = dls[0]
        assert (dl.task_type, dl.group, dl.run_id, dl.step_id) == (
            ttype,
            "g1",
            handle.run_id,
            "send",
        )
        assert dl.kind == "non_retriable" and dl.error == "no recipient" and dl.attempts == 1
        assert dl.input == {"to": "a@b.c"} and dl.metadata == {"k": "v"}
        assert dl.subject == f"dead.{ttype}.{handle.run_id}.send"
        assert dl.task_subject == handle.subject == f"task.{ttype}.g1.key-7"
        assert dl.worker_id == w.worker_id and dl.timestamp.endswith("Z")
        # by sequence (int or digits) and by run id: the same record
        assert await get_dead(nc, dl.seq) == dl
        assert await get_dead(nc, str(dl.seq)) == dl
        assert await get_dead(nc, handle.run_id) == dl

        dry = await replay_dead(nc, dl, dry_run=True)
        assert dry.dry_run and dry.listening and dry.subject == handle.subject
        assert len(seen) == 1  # nothing published

        res = await replay_dead(nc, dl)
        assert not res.duplicate and res.listening and res.run_id == handle.run_id
        await wait_for(lambda: len(seen) == 2, what="the replayed task to run")
        await wait_for(
            lambda: _has(history_types(nc, handle.run_id), "step.completed"),
            what="the replay's completion",
        )
        again = await replay_dead(nc, dl)
        assert again.duplicate  # deduplicated by the server: stored once
        info = await nc.jetstream().stream_info(TASKS, subjects_filter=f"task.{ttype}.>")
        assert not info.state.subjects  # and nothing waits in the queue
    replayed = seen[1]
    assert replayed.attempt == 1 and replayed.group == "g1"
    assert replayed.subject == handle.subject
    assert (replayed.run_id, replayed.step_id) == (handle.run_id, "send")
    assert replayed.metadata["k"] == "v"
    link = json.loads(replayed.metadata["replayed_from"])
    assert link == {"stream": DEAD, "seq": dl.seq, "subject": dl.subject}
    assert len(seen) == 2


async def _has(events: Any, etype: str) -> bool:
    return etype in await events


async def test_invalid_payload_shown_decoded_and_not_replayable(
    nc: NATS, unique: Callable[[str], str]
) -> None:
    ttype = unique("inv")
    w = jsworker.Worker(nc)

    @w.handle(ttype)
    async def h(ctx: jsworker.TaskContext) -> None:
        raise AssertionError("never called")

    js = nc.jetstream()
    async with w:
        await js.publish(f"task.{ttype}.x", b"hello, {not json")
        await js.publish(f"task.{ttype}.y", b"\xff\xfe\x00binary")
        dls = await wait_for(
            lambda: _at_least(list_dead(nc, task_type=ttype), 2), what="two dead letters"
        )
    by_subject = {d.task_subject: d for d in dls}
    text, binary = by_subject[f"task.{ttype}.x"], by_subject[f"task.{ttype}.y"]
    assert text.kind == binary.kind == "invalid_payload"
    assert text.payload_text == "hello, {not json"
    assert binary.payload_text is None  # not UTF-8: left as base64 in raw
    assert text.run_id is None and not text.replayable
    assert "payload_b64" in binary.raw
    with pytest.raises(ReplayError, match="never parsed as a task"):
        await replay_dead(nc, text)


async def _at_least(coro: Any, count: int) -> Any:
    got = await coro
    return got if len(got) >= count else None


# -------------------------------------------------------- records from elsewhere
async def test_replay_without_worker_still_queues_and_says_so(
    nc: NATS, unique: Callable[[str], str]
) -> None:
    ttype = unique("nobody")
    seq = await put(nc, f"dead.{ttype}.run-x1.main", record(ttype, "run-x1", "main"))
    dl = await get_dead(nc, seq)
    assert dl.error == "boom\nsecond line" and dl.attempts == 3 and dl.group is None
    res = await replay_dead(nc, dl)
    assert not res.listening and not res.duplicate
    assert res.subject == f"task.{ttype}.run-x1"
    js = nc.jetstream()
    info = await js.stream_info(TASKS, subjects_filter=f"task.{ttype}.>")
    assert info.state.subjects == {f"task.{ttype}.run-x1": 1}
    msg = await js.get_last_msg(TASKS, f"task.{ttype}.run-x1")
    body = json.loads(msg.data)
    assert body["attempt"] == 1 and body["input"] == {"n": 1}
    assert msg.headers and msg.headers["Nats-Msg-Id"] == f"replay.{seq}"
    await js.purge_stream(TASKS, subject=f"task.{ttype}.>")


async def test_unreadable_and_odd_records_are_listed_not_hidden(
    nc: NATS, unique: Callable[[str], str]
) -> None:
    ttype = unique("odd")
    await put(nc, f"dead.{ttype}.r1.s1", b"not json at all")
    await put(nc, f"dead.{ttype}.r2.s2", b"[1,2]")
    await put(nc, f"dead.{ttype}.r3.s3", json.dumps({"attempts": "x", "task": 5}).encode())
    dls = await list_dead(nc, task_type=ttype)
    assert [d.kind for d in dls] == ["unreadable", "unreadable", "unknown"]
    assert "not json at all" in dls[0].error
    assert dls[2].attempts == 0 and dls[2].run_id == "r3" and dls[2].step_id == "s3"
    assert dls[2].task_type == ttype and dls[2].input is None
    with pytest.raises(ReplayError):
        await replay_dead(nc, dls[0])


def test_parse_record_never_trusts_the_wire() -> None:
    dl = parse_record(
        9,
        "dead.t.invalid.4",
        json.dumps({"kind": "invalid_payload", "payload_b64": "%%%", "metadata": 1}).encode(),
    )
    assert dl.payload_text is None and dl.run_id is None and dl.metadata == {}
    dl = parse_record(1, "dead.t.r.s", b'{"task": {"metadata": [1], "iteration": true}}')
    assert dl.metadata == {} and dl.iteration == 0 and dl.timestamp == ""


async def test_unknown_references(nc: NATS, unique: Callable[[str], str]) -> None:
    si = await nc.jetstream().stream_info(DEAD)
    with pytest.raises(DeadLetterNotFound, match="no dead letter with sequence"):
        await get_dead(nc, si.state.last_seq + 1000)
    with pytest.raises(DeadLetterNotFound, match="no dead letter for run"):
        await get_dead(nc, unique("run"))
    with pytest.raises(DeadLetterNotFound, match="neither"):
        await get_dead(nc, "a.b")
    with pytest.raises(DeadLetterNotFound):
        await get_dead(nc, 0)


async def test_since_limit_and_purge_older_than(nc: NATS, unique: Callable[[str], str]) -> None:
    ttype, other = unique("old"), unique("keep")
    old = [await put(nc, f"dead.{ttype}.r{i}.s", record(ttype, f"r{i}", "s")) for i in range(3)]
    await put(nc, f"dead.{other}.r.s", record(other, "r", "s"))
    mid = time.time()
    await clock_past(mid + 0.05)
    new = [await put(nc, f"dead.{ttype}.n{i}.s", record(ttype, f"n{i}", "s")) for i in range(2)]

    everything = await list_dead(nc, task_type=ttype)
    assert [d.seq for d in everything] == old + new
    assert [d.seq for d in await list_dead(nc, task_type=ttype, limit=2)] == new
    recent = await list_dead(nc, task_type=ttype, since=time.time() - mid)
    assert [d.seq for d in recent] == new
    assert len(await list_dead(nc)) >= 6  # every type

    assert await purge_dead(nc, task_type=ttype, older_than=3600) == 0
    assert await purge_dead(nc, task_type=ttype, older_than=time.time() - mid) == 3
    assert [d.seq for d in await list_dead(nc, task_type=ttype)] == new
    assert len(await list_dead(nc, task_type=other)) == 1  # another type is untouched
    assert await purge_dead(nc, task_type=ttype, older_than=0) == 2
    assert await list_dead(nc, task_type=ttype) == []
    assert await purge_dead(nc, task_type=other, older_than=0) == 1


async def test_bad_arguments(nc: NATS) -> None:
    with pytest.raises(jsworker.InvalidNameError):
        await purge_dead(nc, task_type="a.>", older_than=0)
    with pytest.raises(jsworker.ConfigError):
        await purge_dead(nc, task_type="t", older_than=-1)
    with pytest.raises(jsworker.ConfigError):
        await list_dead(nc, limit=0)


async def test_not_provisioned(fresh_server: jsworker.EmbeddedServer) -> None:
    import nats

    nc = await nats.connect(fresh_server.url)
    try:
        for call in (
            list_dead(nc),
            get_dead(nc, 1),
            get_dead(nc, "run-1"),
            purge_dead(nc, task_type="t", older_than=0),
        ):
            with pytest.raises(jsworker.NotProvisionedError, match="jsworker kv setup"):
                await call
    finally:
        await nc.close()
