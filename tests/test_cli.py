"""The CLI, run as real subprocesses (``python -m jsworker.cli``) against real servers."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nats
from nats.aio.client import Client as NATS

import jsworker
from jsworker import EmbeddedServer


def cli(
    *args: str, env: dict[str, str] | None = None, input: str | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "jsworker.cli", *args],
        capture_output=True,
        text=True,
        env={**(env or os.environ), "COLUMNS": "200", "NO_COLOR": "1"},
        input=input,
        timeout=timeout,
        check=False,
    )


async def acli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(cli, *args, env=env, timeout=timeout)


def no_traceback(p: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in p.stderr, p.stderr
    assert "Traceback" not in p.stdout, p.stdout


async def test_kv_setup_check_dry_run_and_drift(fresh_server: EmbeddedServer) -> None:
    env = {**os.environ, "NATS_URL": fresh_server.url}
    p = await acli("kv", "setup", "--check", "--json", env=env)
    assert p.returncode == 1
    assert {r["status"] for r in json.loads(p.stdout)} == {"missing"}

    p = await acli("kv", "setup", "--dry-run", "--json", env=env)
    assert p.returncode == 0
    assert {r["status"] for r in json.loads(p.stdout)} == {"would-create"}
    assert (await acli("kv", "setup", "--check", env=env)).returncode == 1  # nothing created

    p = await acli("kv", "setup", "--json", env=env)
    assert p.returncode == 0, p.stderr
    assert {r["status"] for r in json.loads(p.stdout)} == {"created"}
    p = await acli("kv", "setup", "--json", env=env)
    assert {r["status"] for r in json.loads(p.stdout)} == {"exists"}
    p = await acli("kv", "setup", "--check", env=env)
    assert p.returncode == 0 and "TASK_QUEUES" in p.stdout

    nc = await nats.connect(fresh_server.url)
    try:
        js = nc.jetstream()
        cfg = (await js.stream_info("TASK_QUEUES")).config
        cfg.duplicate_window = 30.0
        await js.update_stream(cfg)
    finally:
        await nc.close()
    p = await acli("kv", "setup", "--check", "--json", env=env)
    assert p.returncode == 1
    drifted = [r for r in json.loads(p.stdout) if r["status"] == "drifted"]
    assert [r["name"] for r in drifted] == ["TASK_QUEUES"]
    assert "duplicate_window" in drifted[0]["details"][0]
    p = await acli("kv", "setup", "--json", env=env)  # safe drift is fixed in place
    assert [r["status"] for r in json.loads(p.stdout) if r["name"] == "TASK_QUEUES"] == ["updated"]
    assert (await acli("kv", "setup", "--check", env=env)).returncode == 0


async def test_clear_errors_without_tracebacks(
    server: EmbeddedServer, unique: Callable[[str], str]
) -> None:
    env = {**os.environ, "NATS_URL": server.url}
    cases: list[tuple[list[str], str]] = [
        (["--url", "nats://127.0.0.1:1", "kv", "setup"], "cannot reach a NATS server"),
        (["task", "submit", "a.>", "{}"], "'.' (subject separator)"),
        (["task", "submit", "has space", "{}"], "whitespace"),
        (["task", "submit", unique("t"), "{not json"], "not valid JSON"),
        (["task", "submit", unique("t"), "@/nonexistent.json"], "does not exist"),
        (["signal", "send", "run-1", "_cancel"], "reserved"),
        (["serve", "no_such_module_xyz:worker"], "could not import module"),
        (["serve", "json:nope"], "attribute 'nope' not found"),
        (["serve", "justamodule"], "format '<module>:<attribute>'"),
        (["partitions", "show", unique("nogroup")], "no elastic group"),
    ]
    for args, message in cases:
        p = await acli(*args, env=env)
        assert p.returncode == 1, (args, p.stdout, p.stderr)
        assert message in p.stderr, (args, p.stderr)
        no_traceback(p)


async def test_wrong_credentials_are_reported(unique: Callable[[str], str]) -> None:
    async with EmbeddedServer(token="s3cret") as srv:
        env = {**os.environ, "NATS_URL": srv.url}
        p = await acli("--token", "wrong", "kv", "setup", env=env)
        assert p.returncode == 1
        assert "refused the credentials" in p.stderr or "authorization" in p.stderr.lower()
        no_traceback(p)
        p = await acli("--token", "s3cret", "kv", "setup", "--json", env=env)
        assert p.returncode == 0, p.stderr


async def test_task_submit_wait_events_and_duplicates(
    nc: NATS, server_env: dict[str, str], unique: Callable[[str], str]
) -> None:
    ttype = unique("cli")
    w = jsworker.Worker(nc)

    @w.handle(ttype)
    async def double(ctx: jsworker.TaskContext) -> object:
        if ctx.json()["n"] < 0:
            ctx.fail_permanent("negative")
            return None
        return {"twice": ctx.json()["n"] * 2, "meta": ctx.info.metadata}

    async with w:
        run_id = unique("run")
        p = await acli(
            "task",
            "submit",
            ttype,
            '{"n": 21}',
            "--run-id",
            run_id,
            "-m",
            "who=me",
            "--wait",
            "--json",
            env=server_env,
        )
        assert p.returncode == 0, p.stderr
        out = json.loads(p.stdout)
        assert out["output"] == {"twice": 42, "meta": {"who": "me"}}
        assert out["duplicate"] is False
        p = await acli(
            "task", "submit", ttype, '{"n": 21}', "--run-id", run_id, "--json", env=server_env
        )
        assert json.loads(p.stdout)["duplicate"] is True

        p = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "jsworker.cli", "task", "submit", ttype, "-", "--wait"],
            input='{"n": -1}',
            capture_output=True,
            text=True,
            env=server_env,
            check=False,
        )
        assert p.returncode == 1 and "negative" in p.stderr

        p = await acli("task", "events", run_id, "--json", env=server_env)
        types = [json.loads(line)["type"] for line in p.stdout.splitlines()]
        assert types == ["step.started", "step.completed"]


async def test_task_watch_prints_chunks_then_outcome(
    nc: NATS, server_env: dict[str, str], unique: Callable[[str], str]
) -> None:
    ttype = unique("watch")
    w = jsworker.Worker(nc)
    go = asyncio.Event()

    @w.handle(ttype)
    async def chunky(ctx: jsworker.TaskContext) -> object:
        await go.wait()
        for i in range(3):
            await ctx.stream({"part": i})
            await asyncio.sleep(0.05)
        return "whole"

    async with w:
        h = await jsworker.Client(nc).submit(ttype)
        watcher = asyncio.create_task(
            acli("task", "watch", h.run_id, "--timeout", "20", env=server_env)
        )
        await asyncio.sleep(1.5)  # the watcher is subscribed
        go.set()
        p = await watcher
    assert p.returncode == 0, p.stderr
    for i in range(3):
        assert f'{{"part":{i}}}' in p.stdout
    assert "step.completed" in p.stdout and '"whole"' in p.stdout


async def test_task_cancel(
    nc: NATS, server_env: dict[str, str], unique: Callable[[str], str]
) -> None:
    ttype = unique("cancel")
    h = await jsworker.Client(nc).submit(ttype)
    p = await acli("task", "cancel", h.run_id, "--reason", "not needed", env=server_env)
    assert p.returncode == 0, p.stderr
    w = jsworker.Worker(nc)
    w.handle(ttype, lambda ctx: "ran")
    async with w:
        try:
            await h.result(timeout=10)
            raise AssertionError("cancelled task completed")
        except jsworker.TaskFailed as e:
            assert e.kind == "cancelled" and "not needed" in e.error


async def test_signal_send_and_list(
    server_env: dict[str, str], unique: Callable[[str], str]
) -> None:
    run_id = unique("run")
    p = await acli("signal", "send", run_id, "approve", '{"by": "alice"}', env=server_env)
    assert p.returncode == 0, p.stderr
    p = await acli("signal", "list", run_id, "--json", env=server_env)
    assert json.loads(p.stdout) == {"approve": {"by": "alice"}}


async def test_workers_lists_a_running_worker(
    nc: NATS, server_env: dict[str, str], unique: Callable[[str], str]
) -> None:
    ttype = unique("dir")
    w = jsworker.Worker(nc, groups=["cpu"])
    w.handle(ttype, lambda ctx: None)
    async with w:
        p = await acli("workers", "--json", env=server_env)
        entries = {e["worker_id"]: e for e in json.loads(p.stdout)}
        e = entries[w.worker_id]
        assert e["task_types"] == [ttype] and e["groups"] == ["cpu"]
        assert e["language"] == "python" and e["pid"] == os.getpid()
    p = await acli("workers", "--json", env=server_env)
    assert w.worker_id not in {e["worker_id"] for e in json.loads(p.stdout)}  # deregistered


SERVE_APP = textwrap.dedent(
    """
    import jsworker

    def make_worker(nc):
        w = jsworker.Worker(nc)

        @w.handle("{ttype}")
        async def hello(ctx):
            return {{"hello": ctx.json()["name"]}}

        return w
    """
)


async def test_serve_runs_a_factory_and_stops_on_sigint(
    nc: NATS, server_env: dict[str, str], unique: Callable[[str], str], tmp_path: Path
) -> None:
    ttype = unique("serve")
    (tmp_path / "myapp_serve.py").write_text(SERVE_APP.format(ttype=ttype))
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "jsworker.cli",
        "serve",
        "myapp_serve:make_worker",
        "--app-dir",
        str(tmp_path),
        env=server_env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        h = await jsworker.Client(nc).submit(ttype, {"name": "ada"})
        assert await h.result(timeout=20) == {"hello": "ada"}
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err.decode()
    assert "done 1" in out.decode()


async def test_serve_shows_the_real_nested_import_error(
    server_env: dict[str, str], tmp_path: Path
) -> None:
    (tmp_path / "broken_app.py").write_text("import definitely_missing_dependency_xyz\n")
    p = await acli("serve", "broken_app:worker", "--app-dir", str(tmp_path), env=server_env)
    assert p.returncode == 1
    assert "definitely_missing_dependency_xyz" in p.stderr
    assert "Traceback" in p.stderr  # the user's own import error is not hidden


async def test_dev_demo_exits_after_demo() -> None:
    p = await acli("dev", "--demo", "--exit-after-demo", "--demo-tasks", "30", timeout=90)
    assert p.returncode == 0, p.stderr
    assert "demo summary: 30 tasks" in p.stdout
    assert "30/30 tasks reached an outcome" in p.stdout


async def test_partitions_show_members_and_mappings(
    nc: NATS, server_env: dict[str, str], unique: Callable[[str], str]
) -> None:
    ttype = unique("pcli")
    w = jsworker.Worker(nc, partitions=4, heartbeat_interval=1.0, ack_wait=2.0)
    w.handle(ttype, lambda ctx: None)
    async with w:
        # a consumer is pinned to a client when it first delivers a message
        h = await jsworker.Client(nc).submit(ttype)
        await h.result(timeout=20)
        view: dict[str, Any] = {}
        for _ in range(50):
            p = await acli("partitions", "show", ttype, "--json", env=server_env)
            view = json.loads(p.stdout)
            if all(x["consuming"] for x in view["partitions"]):
                break
            await asyncio.sleep(0.2)
        assert [x["member"] for x in view["partitions"]] == [w.worker_id] * 4
        assert all(x["consuming"] and x["pinned"] for x in view["partitions"])

        p = await acli("partitions", "list", "--json", env=server_env)
        assert any(g["group"] == f"TASK_QUEUES.{ttype}" for g in json.loads(p.stdout))

        p = await acli("partitions", "members", "add", ttype, "orbit-1", "--json", env=server_env)
        assert p.returncode == 0, p.stderr
        owners = [x["member"] for x in json.loads(p.stdout)["partitions"]]
        assert owners == ["orbit-1", "orbit-1", w.worker_id, w.worker_id]

        p = await acli(
            "partitions", "mappings", "set", ttype, f"{w.worker_id}=0,1,2", env=server_env
        )
        assert p.returncode == 1 and "every partition" in p.stderr  # partition 3 uncovered
        p = await acli(
            "partitions",
            "mappings",
            "set",
            ttype,
            f"{w.worker_id}=0,1,2,3",
            "--json",
            env=server_env,
        )
        assert p.returncode == 0, p.stderr
        assert json.loads(p.stdout)["member_mappings"] == [
            {"member": w.worker_id, "partitions": [0, 1, 2, 3]}
        ]
        p = await acli("partitions", "mappings", "clear", ttype, env=server_env)
        assert p.returncode == 0
        p = await acli(
            "partitions", "members", "remove", ttype, "orbit-1", "--json", env=server_env
        )
        assert "orbit-1" not in json.loads(p.stdout)["members"]
    p = await acli("partitions", "delete", ttype, env=server_env)
    assert p.returncode == 0, p.stderr
