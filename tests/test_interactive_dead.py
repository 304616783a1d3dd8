"""The dead-letter fix loop of interactive mode against a real server: try a fixed
function on the last dead letters' inputs locally (nothing written), then replay the
ones that pass, once."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from interactive_helpers import own_server, wait_for

import jsworker
from jsworker import EmbeddedServer
from jsworker.interactive import Session, connect, try_dead
from jsworker.interactive._dead_loop import LocalRunError
from jsworker.interactive._magics import run_magic, state

# this module's own server (see interactive_helpers.own_server); `nc` follows it
server = pytest.fixture(scope="module", name="server")(own_server)


@pytest.fixture
async def session(server: EmbeddedServer) -> AsyncIterator[Session]:
    s = await connect(server.url, grace_period=2.0)
    try:
        yield s
    finally:
        await s.close()


async def _stream_count(s: Session, stream: str) -> int:
    info = await s.nc.jetstream().stream_info(stream)
    return int(info.state.messages)


async def test_try_then_replay(session: Session, unique: Callable[[str], str]) -> None:
    t = unique("fixme")

    @session.handle(t)
    async def broken(ctx: jsworker.TaskContext) -> Any:
        data = ctx.json()
        if "name" not in data:
            raise jsworker.PermanentError(f"no name in {data}")
        return f"hello {data['name']}"

    await session.sync()
    inputs = [{"nom": "ada"}, {"name": "bob"}, {"nom": "cy"}, {"who": 3}]
    handles = [await session.submit(t, i) for i in inputs]

    async def dead_letters() -> int:
        return len(await jsworker.list_dead(session.nc, task_type=t))

    await wait_for(lambda: _at_least(dead_letters, 3), 30, "3 dead letters")

    def fixed(ctx: jsworker.TaskContext) -> Any:
        data = ctx.json()
        name = data.get("name") or data.get("nom")
        if name is None:
            ctx.fail_permanent("still no name")
            return None
        return f"hello {name}"

    before = (
        await _stream_count(session, "WORKFLOW_HISTORY"),
        await _stream_count(session, "DEAD_LETTERS"),
        await _stream_count(session, "TASK_QUEUES"),
    )
    trial = await try_dead(session, t, fixed, last=10)
    after = (
        await _stream_count(session, "WORKFLOW_HISTORY"),
        await _stream_count(session, "DEAD_LETTERS"),
        await _stream_count(session, "TASK_QUEUES"),
    )
    assert before == after  # a local trial writes nothing
    assert [r.dead.input for r in trial.rows] == [inputs[0], inputs[2], inputs[3]]
    assert [r.passed for r in trial.rows] == [True, True, False]
    assert [r.result for r in trial.rows[:2]] == ["hello ada", "hello cy"]
    assert trial.rows[2].error == "permanent: still no name"
    assert all("no name in" in r.dead.error for r in trial.rows)
    html = trial._repr_html_()
    assert "2 pass, 1 fail" in html and "hello ada" in html
    last_one = await try_dead(session, t, fixed, last=1)
    assert [r.dead.input for r in last_one.rows] == [inputs[3]]

    # the fix goes live, then the passing dead letters are replayed, once
    session.handle(t, fixed)
    await session.sync()
    results = await trial.replay()
    assert [r.duplicate for r in results] == [False, False]
    for r in results:
        # the run's history: the original terminal failure, then the replay's success
        done = None
        async for ev in session.client.run_events(r.run_id, timeout=20):
            if ev["type"] == "step.completed":
                done = ev
                break
        assert done is not None and done["payload"]["output"] in ("hello ada", "hello cy")
    again = await trial.replay()
    assert [r.duplicate for r in again] == [True, True]
    assert handles  # the originals stay dead-lettered; only the replays ran


async def test_local_trial_refuses_writes(session: Session, unique: Callable[[str], str]) -> None:
    t = unique("io")

    @session.handle(t)
    def fails(ctx: jsworker.TaskContext) -> None:
        raise jsworker.PermanentError("boom")

    await session.sync()
    await session.submit(t, {"x": 1})
    await wait_for(lambda: _at_least(lambda: _count(session, t), 1), 30, "a dead letter")

    async def checkpoints(ctx: jsworker.TaskContext) -> Any:
        await ctx.heartbeat()  # a no-op locally
        assert await ctx.load_checkpoint() is None
        await ctx.checkpoint({"step": 1})
        return "unreachable"

    trial = await try_dead(session, t, checkpoints, last=1)
    assert not trial.rows[0].passed
    assert "checkpoint is not available in a local trial" in (trial.rows[0].error or "")
    assert LocalRunError.__name__ in (trial.rows[0].error or "")


async def test_dead_and_replay_magics(session: Session, unique: Callable[[str], str]) -> None:
    t = unique("magic")
    session.handle(t, lambda ctx: (_ for _ in ()).throw(jsworker.PermanentError("nope")))
    await session.sync()
    await session.submit(t, 41)
    await wait_for(lambda: _at_least(lambda: _count(session, t), 1), 30, "a dead letter")
    state.session = session

    class Shell:
        def __init__(self) -> None:
            self.user_ns = {"plus_one": lambda ctx: ctx.json() + 1}

    shell = Shell()
    state.shell = shell
    try:
        trial = await run_magic(f"dead {t} plus_one --last 3")
        assert [(r.passed, r.result) for r in trial.rows] == [(True, 42)]
        session.handle(t, shell.user_ns["plus_one"])
        await session.sync()
        res = await run_magic("replay")
        assert len(res) == 1 and not res[0].duplicate
        with pytest.raises(jsworker.ConfigError, match="not defined in the notebook"):
            await run_magic(f"dead {t} no_such_fn")
    finally:
        state.shell = None
        state.session = None
        state.last_trial = None


async def _count(s: Session, t: str) -> int:
    return len(await jsworker.list_dead(s.nc, task_type=t))


async def _at_least(get: Callable[[], Any], n: int) -> bool:
    return bool((await get()) >= n)
