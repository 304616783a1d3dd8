"""The notebook side of interactive mode, in a real ipykernel driven through
jupyter_client, against the session's real nats-server."""

from __future__ import annotations

import json
import os
import textwrap
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from interactive_helpers import Kernel, own_server
from nats.aio.client import Client as NATS

import jsworker
from jsworker import EmbeddedServer
from jsworker.cli._partitions import group_view

ROOT = Path(__file__).resolve().parent.parent

# this module's own server (see interactive_helpers.own_server); `nc` follows it
server = pytest.fixture(scope="module", name="server")(own_server)


def kernel_env(server: EmbeddedServer) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env["NATS_URL"] = server.url
    env.pop("JSWORKER_KERNEL_URL", None)
    return env


@pytest.fixture
async def kernel(server: EmbeddedServer) -> AsyncIterator[Kernel]:
    k = await Kernel(kernel_env(server)).start()
    try:
        yield k
    finally:
        await k.stop()


async def test_define_submit_redefine_in_cells(
    kernel: Kernel, server: EmbeddedServer, unique: Callable[[str], str]
) -> None:
    t = unique("nb")
    await kernel.ok("%load_ext jsworker")
    res = await kernel.ok(f"%jsworker connect {server.url}")
    assert "jsworker session" in res.text and "running" in res.text
    await kernel.ok(
        textwrap.dedent(f"""
        @session.handle({t!r})
        async def shout(ctx):
            return ctx.json()["text"].upper()
        """)
    )
    res = await kernel.ok(f"await session.submit({t!r}, {{'text': 'hi'}}, wait=True)")
    assert res.text == "'HI'"
    res = await kernel.ok("1 + 1;  # a trailing ';' still hides the value")
    assert res.data == []
    # redefined in a later cell: the next task runs the new code
    await kernel.ok(
        textwrap.dedent(f"""
        @session.handle({t!r})
        async def shout(ctx):
            return ctx.json()["text"].upper() + "!"
        """)
    )
    res = await kernel.ok(f'%jsworker submit {t} \'{{"text": "hey"}}\' --wait')
    assert res.text == "'HEY!'"
    # the status: an HTML table with the handler at version 2 and the two outcomes
    res = await kernel.ok("%jsworker status")
    html = res.html
    assert t in html and "<table>" in html
    info = await kernel.ok("[(h['task_type'], h['version']) for h in session.handlers()]")
    assert info.text == repr([(t, 2)])
    outs = await kernel.ok("[(r.version, r.detail) for r in session.recent]")
    assert outs.text == repr([(1, '"HI"'), (2, '"HEY!"')])
    # withdrawn: no consumer of ours any more, the worker is still running
    await kernel.ok(f"%jsworker remove {t}")
    res = await kernel.ok("session.worker.task_types, session.worker.running")
    assert res.text == "([], True)"
    await kernel.ok("%jsworker close")


async def test_kernel_shutdown_leaves_the_directory(
    server: EmbeddedServer, nc: NATS, unique: Callable[[str], str]
) -> None:
    k = await Kernel(kernel_env(server)).start()
    try:
        await k.ok("%load_ext jsworker")
        await k.ok(f"%jsworker connect {server.url}")
        wid = (await k.ok("session.worker.worker_id")).text.strip("'")
        t = unique("sd")
        await k.ok(f"session.handle({t!r}, lambda ctx: 1, partitions=2)")
        assert wid in {w["worker_id"] for w in await jsworker.list_workers(nc)}
        assert (await group_view(nc, t))["members"] == [wid]
    finally:
        await k.stop()  # a shutdown request, as Jupyter sends it
    assert wid not in {w["worker_id"] for w in await jsworker.list_workers(nc)}
    assert (await group_view(nc, t))["members"] == []  # the group was left at once


async def test_consumer_failure_raises_in_the_defining_cell(
    kernel: Kernel, server: EmbeddedServer, nc: NATS, unique: Callable[[str], str]
) -> None:
    t = unique("clash")
    # a worker without groups owns task.T.> on the work-queue stream: a grouped
    # consumer of T overlaps it, and the server refuses to create it
    other = jsworker.Worker(nc)
    other.handle(t, lambda ctx: None)
    await other.start()
    try:
        await kernel.ok("%load_ext jsworker")
        await kernel.ok(f"%jsworker connect {server.url} --group dev-test")
        res = await kernel.run(
            textwrap.dedent(f"""
            @session.handle({t!r})
            def handler(ctx):
                return 1
            print("defined")
            """)
        )
        assert res.error is not None, res
        assert res.error["ename"] == "ConsumerConflictError"
        assert "overlaps" in res.error["evalue"]
        # a message for the person: one line, no traceback
        assert len(res.error["traceback"]) == 1
        assert "ConsumerConflictError" in res.error["traceback"][0]
        assert "defined" in res.stdout  # the cell ran; the failure is reported at its end
        # the next cell is not blamed for it
        res = await kernel.ok("1 + 1")
        assert res.text == "2"
        await kernel.ok("%jsworker close")
    finally:
        await other.stop()


async def test_magic_errors_and_help(kernel: Kernel) -> None:
    await kernel.ok("%load_ext jsworker")
    res = await kernel.run("%jsworker status")
    assert res.error is not None and res.error["ename"] == "ConfigError"
    assert "%jsworker connect" in res.error["evalue"]
    res = await kernel.run("%jsworker connect nats://127.0.0.1:1")
    assert res.error is not None and res.error["ename"] == "ServerError"
    assert "cannot reach a NATS server at nats://127.0.0.1:1" in res.error["evalue"]
    res = await kernel.ok("%jsworker help")
    assert "%jsworker submit TYPE" in res.text


async def test_installed_kernel_starts_connected(
    server: EmbeddedServer, tmp_path: Path, unique: Callable[[str], str]
) -> None:
    from jupyter_client.kernelspec import KernelSpecManager

    from jsworker.interactive._kernel import install_kernel

    name = unique("k")
    install_kernel(server.url, name=name, prefix=str(tmp_path))
    ksm = KernelSpecManager(kernel_dirs=[str(tmp_path / "share" / "jupyter" / "kernels")])
    env = kernel_env(server)
    k = await Kernel(env, kernel_name=name, kernel_spec_manager=ksm).start()
    try:
        res = await k.ok("session.url, session.worker.running")
        assert "jsworker: connected to" in res.stdout
        assert res.text == repr((server.url, True))
        t = unique("auto")
        await k.ok(f"session.handle({t!r}, lambda ctx: 'ok')")
        res = await k.ok(f"await session.submit({t!r}, wait=True)")
        assert res.text == "'ok'"
        await k.ok("await session.close()")
    finally:
        await k.stop()


async def test_live_display_updates_as_handlers_change(
    kernel: Kernel, server: EmbeddedServer, unique: Callable[[str], str]
) -> None:
    t = unique("live")
    await kernel.ok("%load_ext jsworker")
    await kernel.ok(f"%jsworker connect {server.url}")
    res = await kernel.ok(
        "view = await jsworker.interactive.live(session, every=0.2)".replace(
            "jsworker.interactive", "__import__('jsworker.interactive').interactive"
        )
    )
    assert res.data and "text/html" in res.data[0]
    await kernel.ok(f"session.handle({t!r}, lambda ctx: 1, partitions=4)")
    # the display is updated in place (update_display_data) once the handler shows:
    # wait until the view shows this session in the type's map (no sleeps)
    res = await kernel.ok(
        textwrap.dedent(f"""
        shown = await view.wait_until(
            lambda s: session.worker.worker_id in s.members({t!r}), timeout=60
        )
        assert view.updates, view
        """)
    )
    updates = [m["content"]["data"] for m in kernel.stray if m["msg_type"] == "update_display_data"]
    updates += res.updates
    assert updates, (
        f"no display update reached the notebook: {[m['msg_type'] for m in kernel.stray]}"
    )
    html = updates[-1]["text/html"]
    assert f"partition map {t}" in html and "(this session)" in html
    await kernel.ok("view.stop(); await session.close()")
    assert json.dumps(updates[-1])  # a plain JSON-able bundle


async def test_sigkilled_kernel_is_swept_by_liveness(
    server: EmbeddedServer, nc: NATS, unique: Callable[[str], str]
) -> None:
    import signal
    import time

    from interactive_helpers import wait_for

    t = unique("kill")
    other = jsworker.Worker(nc, partitions=4, heartbeat_interval=1.0)
    other.handle(t, lambda ctx: "other")
    await other.start()
    k = await Kernel(kernel_env(server)).start()
    try:

        async def members() -> list[str]:
            return list((await group_view(nc, t))["members"])

        await k.ok(
            "import jsworker.interactive as jsi\n"
            f"session = await jsi.connect({server.url!r}, heartbeat_interval=1.0)"
        )
        kid = (await k.ok("session.worker.worker_id")).text.strip("'")
        await k.ok(f"session.handle({t!r}, lambda ctx: 'kernel', partitions=4)")
        await wait_for(lambda: _has(members, 2), 30, "the kernel in the group")
        await k.km.signal_kernel(signal.SIGKILL)
        killed = time.monotonic()
        await wait_for(lambda: _only(members, other.worker_id), 60, "the kernel swept")
        print(f"\nSIGKILLed kernel swept from the group after {time.monotonic() - killed:.1f} s")
        assert kid not in await members()
        outs = {
            await (await jsworker.Client(nc).submit(t, key=f"k{i}")).result(timeout=30)
            for i in range(8)
        }
        assert outs == {"other"}
    finally:
        k.kc.stop_channels()
        await k.km.shutdown_kernel(now=True)
        await other.stop()


async def _has(members: Callable[[], Any], n: int) -> bool:
    return len(await members()) == n


async def _only(members: Callable[[], Any], wid: str) -> bool:
    return list(await members()) == [wid]
