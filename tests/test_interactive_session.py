"""The session API against the session's real server: option changes on a live
handler, singletons, private groups, closing."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from interactive_helpers import own_server

import jsworker
from jsworker import EmbeddedServer
from jsworker.interactive import Session, connect

# this module's own server (see interactive_helpers.own_server); `nc` follows it
server = pytest.fixture(scope="module", name="server")(own_server)


@pytest.fixture
async def session(server: EmbeddedServer) -> AsyncIterator[Session]:
    s = await connect(server.url, grace_period=2.0)
    try:
        yield s
    finally:
        await s.close()


async def test_partition_count_change_is_refused_with_the_fix(
    session: Session, unique: Callable[[str], str]
) -> None:
    t = unique("pc")
    session.handle(t, lambda ctx: 1, partitions=4)
    await session.sync()
    m = await session.partition_map(t)
    assert m.members == {session.worker.worker_id: [0, 1, 2, 3]}
    session.handle(t, lambda ctx: 2, partitions=2)
    assert session.pending
    with pytest.raises(jsworker.ConfigError, match="exists with 4 partitions") as e:
        await session.sync()
    assert "jsworker partitions delete" in str(e.value)
    assert not session.pending
    assert session.worker.task_types == []


async def test_ack_wait_change_recreates_and_keeps_serving(
    session: Session, unique: Callable[[str], str]
) -> None:
    t = unique("aw")
    session.handle(t, lambda ctx: "a")
    await session.sync()
    session.handle(t, lambda ctx: "b", ack_wait=3)
    await session.sync()
    assert await session.submit(t, wait=True) == "b"
    info = await session.nc.jetstream().consumer_info("TASK_QUEUES", t)
    assert info.config.ack_wait == 3
    assert [h["version"] for h in session.handlers()] == [2]


async def test_singleton_and_recent_outcomes(
    session: Session, unique: Callable[[str], str]
) -> None:
    t = unique("one")

    @session.handle_singleton(t)
    async def only(ctx: jsworker.TaskContext) -> str:
        if ctx.json() == "bad":
            raise ValueError("bad input")
        return "ok"

    await session.sync()
    assert (await session.partition_map(t)).max_partitions == 1
    assert await session.submit(t, "fine", wait=True) == "ok"
    h = await session.submit(t, "bad")
    events = await session.tail(h, seconds=20, count=2, echo=None)
    assert [e["type"] for e in events] == ["step.started", "step.failed"]
    kinds = [(r.kind, r.detail) for r in session.recent if r.task_type == t]
    assert kinds[:2] == [("complete", '"ok"'), ("ValueError", "bad input")]
    snap = await session.status()
    assert f"map {t}: 1 members" in repr(snap)
    await session.remove(t)
    with pytest.raises(jsworker.ConfigError, match="no handler"):
        await session.remove(t)


async def test_private_group_and_close(
    server: EmbeddedServer, unique: Callable[[str], str]
) -> None:
    t = unique("grp")
    s = await connect(server.url, group="dev-test")
    s.handle(t, lambda ctx: ctx.info.group)
    await s.sync()
    h = await s.submit(t)
    assert h.subject.startswith(f"task.{t}.dev-test.")
    assert await h.result(timeout=20) == "dev-test"
    await s.close()
    await s.close()  # idempotent
    assert s.closed and not s.worker.running
    with pytest.raises(jsworker.LifecycleError, match="closed"):
        s.handle(t, lambda ctx: 1)
    assert "closed" in repr(s)


async def test_tail_trusts_nothing_from_the_wire(
    session: Session, unique: Callable[[str], str], capsys: pytest.CaptureFixture[str]
) -> None:
    from jsworker.interactive._session import print_event

    run = unique("run")
    js = session.nc.jetstream()
    await js.publish(f"history.{run}", b"[1, 2]")
    await js.publish(f"history.{run}", b"not json")
    await js.publish(f"history.{run}", b'{"type": "step.completed", "payload": "odd"}')
    events = await session.tail(run, seconds=5)
    assert events == [{"type": "step.completed", "payload": "odd"}]
    out = capsys.readouterr().out
    assert "step.completed" in out
    print_event({"payload": ["x"], "type": 3})  # odd shapes print, never raise
    assert "3" in capsys.readouterr().out


class _Handle:
    """Stands in for IPython's DisplayHandle: records what the view sends."""

    def __init__(self) -> None:
        self.sent: list[Any] = []

    def update(self, obj: object) -> None:
        self.sent.append(obj)


async def test_live_view_waits_until_it_shows_a_join_and_a_leave(
    session: Session, unique: Callable[[str], str]
) -> None:
    from jsworker.interactive import LiveView
    from jsworker.interactive._display import take_snapshot

    t = unique("lv")
    me = session.worker.worker_id
    # a long period: wait_until reads again at once instead of waiting for the next tick
    view = LiveView(session, every=5.0, types=[t])
    handle = _Handle()
    view.start(handle, await take_snapshot(session, [t]))
    try:
        assert view.shown is not None and view.shown.members(t) == []
        session.handle(t, lambda ctx: 1, partitions=2)
        await session.sync()
        shown = await view.wait_until(lambda s: s.members(t) == [me], timeout=30)
        assert view.shown is shown and view.updates >= 1
        await session.remove(t)
        await view.wait_until(lambda s: s.members(t) == [], timeout=30)
        assert view.updates >= 2  # both changes were shown, none collapsed
        assert [me] in [s.members(t) for s in handle.sent]
        assert handle.sent[-1] is view.shown
        with pytest.raises(TimeoutError, match=r"did not show what was awaited within 0.2 s"):
            await view.wait_until(lambda s: False, timeout=0.2)
    finally:
        view.stop()
    with pytest.raises(jsworker.LifecycleError, match="stopped before showing"):
        await view.wait_until(lambda s: False)
    assert "stopped" in repr(view)


async def test_live_outside_a_kernel_is_a_clear_error(session: Session) -> None:
    from jsworker.interactive import live

    with pytest.raises(jsworker.LifecycleError, match="live needs a notebook kernel"):
        await live(session)


async def test_submit_warns_of_no_worker_and_wait_prints_each_retry(
    session: Session, unique: Callable[[str], str], capsys: pytest.CaptureFixture[str]
) -> None:
    nobody = unique("nobody")
    h = await session.submit(nobody, {})
    assert h.listening is False
    assert f"Warning: no worker is listening for task.{nobody}" in capsys.readouterr().out
    await session.nc.jetstream().purge_stream("TASK_QUEUES", subject=f"task.{nobody}.>")

    t = unique("flaky")

    def flaky(ctx: jsworker.TaskContext) -> str:
        if ctx.info.attempt < 3:
            raise RuntimeError(f"flake {ctx.info.attempt}")
        return "ok"

    session.handle(t, flaky, retry=jsworker.RetryPolicy.fixed(0.2, max_attempts=3))
    await session.sync()
    assert await session.submit(t, {}, wait=20) == "ok"
    out = capsys.readouterr().out
    assert "no worker is listening" not in out
    assert "attempt 1 failed (retriable), retrying in 0.2 s: RuntimeError: flake 1" in out, out
    assert "attempt 2 failed (retriable), retrying in 0.2 s" in out, out
