"""The CLI against real servers: in-process with click's CliRunner where no event loop
is running (sync tests), and as real subprocesses (``python -m jsworker.cli``)."""

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

import click
import nats
import pytest
from click.testing import CliRunner
from nats.aio.client import Client as NATS

import jsworker
from jsworker import EmbeddedServer
from jsworker.cli import cli as root


def cli(
    *args: str,
    env: dict[str, str] | None = None,
    input: str | None = None,
    timeout: float = 60,
    columns: int = 200,
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "jsworker.cli", *args],
        capture_output=True,
        text=True,
        env={**(env or os.environ), "COLUMNS": str(columns), "NO_COLOR": "1"},
        input=input,
        timeout=timeout,
        check=False,
    )


async def acli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60, columns: int = 200
) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(cli, *args, env=env, timeout=timeout, columns=columns)


def no_traceback(p: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in p.stderr, p.stderr
    assert "Traceback" not in p.stdout, p.stdout


async def test_kv_setup_check_dry_run_and_drift(fresh_server: EmbeddedServer) -> None:
    env = {**os.environ, "NATS_URL": fresh_server.url}
    for args in (["workers"], ["task", "submit", "t", "{}"], ["signal", "list", "run-1"]):
        p = await acli(*args, env=env)  # nothing provisioned yet
        assert p.returncode == 1 and "jsworker kv setup" in p.stderr, (args, p.stderr)
        no_traceback(p)
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
    assert p.returncode == 0 and "TASK_QUEUES" in p.stdout and "exists" in p.stdout

    nc = await nats.connect(fresh_server.url)
    try:
        js = nc.jetstream()
        cfg = (await js.stream_info("TASK_QUEUES")).config
        cfg.duplicate_window = 30.0
        await js.update_stream(cfg)
    finally:
        await nc.close()
    p = await acli("kv", "setup", "--check", env=env)  # the table names the drift
    assert p.returncode == 1 and "drifted" in p.stdout and "duplicate_window" in p.stdout
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
        p = await acli("workers", env=server_env, columns=80)  # the table, 80 columns wide
        assert p.returncode == 0, p.stderr
        assert w.worker_id in p.stdout  # the id is never cut short
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
    # the user's own import error is not hidden behind "could not import module"
    assert "Traceback" in p.stderr and "broken_app.py" in p.stderr
    assert "ModuleNotFoundError: No module named 'definitely_missing_dependency_xyz'" in p.stderr
    assert "could not import module" not in p.stderr


async def test_dev_demo_exits_after_demo() -> None:
    p = await acli("dev", "--demo", "--exit-after-demo", "--demo-tasks", "20", timeout=50)
    assert p.returncode == 0, p.stderr
    assert "listening on nats://127.0.0.1:" in p.stdout
    assert "demo summary: 20/20 tasks reached an outcome" in p.stdout
    for t in ("resize-image", "send-email", "charge-card", "build-report"):
        assert t in p.stdout  # the final per-type table
    no_traceback(p)


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


# ---------------------------------------------------------------- in-process (CliRunner)


def invoke(*args: str, env: dict[str, str] | None = None, input: str | None = None) -> Any:
    """Run the CLI in-process; an unexpected exception fails the test with its traceback."""
    return CliRunner().invoke(root, list(args), env=env, input=input, catch_exceptions=False)


def all_commands(group: click.Group, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    out = [prefix]
    for name, cmd in group.commands.items():
        if isinstance(cmd, click.Group):
            out += all_commands(cmd, (*prefix, name))
        else:
            out.append((*prefix, name))
    return out


def test_every_command_has_examples_in_its_help() -> None:
    commands = all_commands(root)
    assert ("kv", "setup") in commands and ("signal", "send") in commands and ("dev",) in commands
    for path in commands:
        r = invoke(*path, "--help")
        assert r.exit_code == 0, (path, r.output)
        assert "Examples:" in r.output, path
        assert "  jsworker " in r.output.split("Examples:", 1)[1], path  # kept as a block


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["kv", "setup", "--check", "--dry-run"], "exclusive"),
        (["kv", "setup", "--replicas", "9"], "--replicas"),
        (["dev", "--demo", "--app", "x:y"], "give one of --demo or --app MODULE:ATTR, not both"),
        (["dev", "--app", "x:y", "--exit-after-demo"], "--exit-after-demo needs --demo"),
        (["task", "submit", "t", "{}", "-m", "novalue"], "is not key=value"),
        (["--creds", "/nonexistent.creds", "workers"], "does not exist"),
        (["task"], "Usage:"),
    ],
)
def test_usage_errors_exit_2(args: list[str], message: str) -> None:
    r = invoke(*args)
    assert r.exit_code == 2, r.output
    assert message in r.output


def test_errors_before_connecting_are_one_red_line(server: EmbeddedServer) -> None:
    # no server is needed to refuse these: they fail before connecting
    for args, message in [
        (["task", "submit", "a*b", "{}"], "'*'"),
        (["task", "submit", "ok", "[1,"], "input is not valid JSON"),
        (["task", "events", "bad run"], "whitespace"),
        (["signal", "send", "run-1", "go", "nope"], "signal data is not valid JSON"),
    ]:
        r = invoke("--url", "nats://127.0.0.1:1", *args)
        assert r.exit_code == 1, (args, r.output)
        assert r.stderr.startswith("Error: ") and message in r.stderr, (args, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr  # one line, even when long
    r = invoke("kv", "setup", "--check", "--json", env={"NATS_URL": server.url})
    assert r.exit_code == 0, r.output
    assert {x["status"] for x in json.loads(r.stdout)} == {"exists"}


def test_task_submit_reads_stdin_and_env_vars(server: EmbeddedServer) -> None:
    run_id = f"run-stdin-{os.getpid()}"
    r = invoke(
        "task",
        "submit",
        "cli-stdin",
        "-",
        "--run-id",
        run_id,
        "--json",
        env={"JSWORKER_URL": server.url, "NATS_URL": ""},
        input='{"from": "stdin"}',
    )
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["run_id"] == run_id and out["subject"] == f"task.cli-stdin.{run_id}"


async def test_signal_list_table_and_markup_safety(
    server_env: dict[str, str], unique: Callable[[str], str]
) -> None:
    run_id = unique("run")
    p = await acli("signal", "send", run_id, "note", '"[bold]x[/]"', env=server_env)
    assert p.returncode == 0, p.stderr
    p = await acli("signal", "list", run_id, env=server_env)
    assert p.returncode == 0, p.stderr
    assert "note" in p.stdout and '"[bold]x[/]"' in p.stdout  # printed as-is, not as markup


INSTANCE_APP = textwrap.dedent(
    """
    import jsworker
    from nats.aio.client import Client

    worker = jsworker.Worker(Client(), grace_period=2)
    worker.handle("{ttype}", lambda ctx: {{"pong": ctx.json()}})
    """
)


async def test_serve_connects_a_module_level_worker_instance(
    nc: NATS, server_env: dict[str, str], unique: Callable[[str], str], tmp_path: Path
) -> None:
    ttype = unique("inst")
    (tmp_path / "myapp_instance.py").write_text(INSTANCE_APP.format(ttype=ttype))
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "jsworker.cli",
        "serve",
        "myapp_instance:worker",
        "--app-dir",
        str(tmp_path),
        env=server_env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        h = await jsworker.Client(nc).submit(ttype, 7)
        assert await h.result(timeout=20) == {"pong": 7}
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err.decode()
    assert "SIGTERM: stopping" in err.decode()
    assert "done 1" in out.decode()


SLOW_APP = textwrap.dedent(
    """
    import asyncio
    import jsworker

    async def make_worker(nc):  # an async factory
        w = jsworker.Worker(nc)

        @w.handle("{ttype}")
        async def slow(ctx):
            print("started", flush=True)
            await asyncio.sleep(60)

        return w
    """
)


async def test_serve_second_signal_forces_exit(
    nc: NATS, server_env: dict[str, str], unique: Callable[[str], str], tmp_path: Path
) -> None:
    ttype = unique("slow")
    (tmp_path / "myapp_slow.py").write_text(SLOW_APP.format(ttype=ttype))
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "jsworker.cli",
        "serve",
        "myapp_slow:make_worker",
        "--app-dir",
        str(tmp_path),
        "--grace",
        "60",
        env=server_env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        await jsworker.Client(nc).submit(ttype)
        assert proc.stdout is not None
        while b"started" not in await asyncio.wait_for(proc.stdout.readline(), 20):
            pass
        proc.send_signal(signal.SIGINT)  # graceful: would wait up to 60 s for the task
        await asyncio.sleep(0.5)
        assert proc.returncode is None
        proc.send_signal(signal.SIGINT)  # forced
        _, err = await asyncio.wait_for(proc.communicate(), 10)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 130
    assert "stopping" in err.decode() and "forced exit" in err.decode()


async def test_partitions_unpin(
    nc: NATS, server_env: dict[str, str], unique: Callable[[str], str]
) -> None:
    ttype = unique("unpin")
    w = jsworker.Worker(nc, partitions=2, heartbeat_interval=1.0, ack_wait=2.0)
    w.handle(ttype, lambda ctx: None)
    async with w:
        await (await jsworker.Client(nc).submit(ttype)).result(timeout=20)
        p = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "jsworker.cli", "partitions", "unpin", ttype, w.worker_id],
            capture_output=True,
            text=True,
            env=server_env,
            check=False,
        )
        assert p.returncode == 0, p.stderr
        assert f"unpinned {w.worker_id}" in p.stdout
        # the worker re-pins on its next pull and keeps working
        await (await jsworker.Client(nc).submit(ttype)).result(timeout=20)
        p = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "jsworker.cli", "partitions", "unpin", ttype, "worker-nope"],
            capture_output=True,
            text=True,
            env=server_env,
            check=False,
        )
        assert p.returncode == 1 and "unpin refused" in p.stderr
