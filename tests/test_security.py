"""Operator safety: secrets never printed, wire strings printed as text with control
characters escaped, clean errors for bad input files, worker ids validated at
construction, ``workers watch``. CLI tests run the real CLI as a subprocess against real
servers; the pure helpers get unit tests."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.aio.client import Client as NATS
from servers import provisioned_server

import jsworker
from jsworker import EmbeddedServer
from jsworker._names import MAX_WORKER_ID_LEN, validate_worker_id
from jsworker._redact import redact_url
from jsworker._server import find_nats_server, free_port
from jsworker._services import CHUNK_SEQ
from jsworker.cli._connect import ConnOptions
from jsworker.cli._output import _secrets, json_text, redact, safe

# every way a wire string can attack a terminal: markup, a stray closing tag, an ANSI
# colour, a carriage return that rewrites the line, NUL, a bidi override
NASTY = "[/]x[bold]y\x1b[31mred\rcr\x00nul\u202eevil"
RAW = ("\x1b", "\r", "\x00", "\u202e")  # must never reach the terminal
SHOWN = ("[/]x[bold]y", "\\x1b[31mred", "\\rcr", "\\x00nul", "\\u202eevil")  # shown as text


@pytest.fixture(scope="module")
def server() -> Iterator[EmbeddedServer]:
    """This module's own server (overrides the session one for ``nc`` and
    ``server_env`` here): the task types and hostile entries these tests write stay off
    the shared server, whose listings other tests read (``top``'s screen)."""
    yield from provisioned_server()


def cli(
    *args: str, env: dict[str, str] | None = None, input: str | None = None, columns: int = 250
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "jsworker.cli", *args],
        capture_output=True,
        text=True,
        env={**(env or os.environ), "COLUMNS": str(columns), "NO_COLOR": "1"},
        input=input,
        timeout=60,
        check=False,
    )


async def acli(
    *args: str, env: dict[str, str] | None = None, columns: int = 250
) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(cli, *args, env=env, columns=columns)


def terminal_safe(text: str) -> None:
    for ch in RAW:
        assert ch not in text, (ch, text)
    assert "Traceback" not in text, text


def shows_nasty(text: str, times: int = 1) -> None:
    terminal_safe(text)
    for part in SHOWN:
        assert text.count(part) >= times, (part, text)


# ------------------------------------------------------------------ pure helpers
def test_safe_escapes_control_characters_and_keeps_markup_as_text() -> None:
    assert safe(NASTY) == "[/]x[bold]y\\x1b[31mred\\rcr\\x00nul\\u202eevil"
    assert safe("a\nb\tc\x7fd\x9be") == "a\\nb\\tc\\x7fd\\x9be"
    assert safe("naïve 日本 ✓") == "naïve 日本 ✓"  # printable Unicode untouched
    assert safe(42) == "42"


def test_redact_url() -> None:
    assert redact_url("nats://alice:pw@h:4222") == "nats://alice:***@h:4222"
    assert redact_url("tls://tok3n@h:4222") == "tls://***@h:4222"
    assert redact_url("nats://h:4222") == "nats://h:4222"
    assert redact_url("alice:pw@h:4222") == "alice:***@h:4222"
    assert redact_url("nats://a:b@h:notaport") == "***@h:notaport"
    conn = ConnOptions(url="nats://u:p1@a:1, nats://t0k@b:2,nats://c:3")
    assert conn.display_url == "nats://u:***@a:1,nats://***@b:2,nats://c:3"


def test_redact_replaces_registered_secrets_in_text_and_json() -> None:
    ConnOptions(url="nats://bob:hunter2@h:1", token="tok-abc")
    try:
        assert redact("bad pw hunter2 and tok-abc") == "bad pw *** and ***"
        out = json.loads(json_text({"k": ["x hunter2", {"tok-abc": 1}], "n": 2}))
        assert out == {"k": ["x ***", {"***": 1}], "n": 2}
    finally:
        _secrets.difference_update({"hunter2", "tok-abc"})


def test_worker_id_is_validated_at_construction() -> None:
    nc = NATS()  # not connected: construction must not need the server
    for bad in ("w-[bold]x", "", "a.b", "a/b", "a b", "x" * (MAX_WORKER_ID_LEN + 1), "é", 7):
        with pytest.raises(jsworker.InvalidNameError):
            jsworker.Worker(nc, worker_id=bad)  # type: ignore[arg-type]
    ok = "w_1=x-" + "y" * (MAX_WORKER_ID_LEN - 6)
    assert jsworker.Worker(nc, worker_id=ok).worker_id == ok
    assert validate_worker_id(jsworker.Worker(nc).worker_id)  # the default is valid too


def test_client_and_embedded_server_options_are_validated_at_construction() -> None:
    for bad_nc in (None, "nats://127.0.0.1:4222"):
        with pytest.raises(jsworker.ConfigError, match="NATS client"):
            jsworker.Client(bad_nc)  # type: ignore[arg-type]
    with pytest.raises(jsworker.ConfigError, match="telemetry"):
        jsworker.Client(NATS(), telemetry="otel")  # type: ignore[arg-type]
    bad_servers: list[dict[str, Any]] = [
        {"port": -1},
        {"port": 70000},
        {"port": 0},
        {"port": "4222"},
        {"host": ""},
        {"max_payload": 0},
        {"max_payload": True},
        {"startup_timeout": 0},
        {"startup_timeout": "15"},
    ]
    for kw in bad_servers:
        with pytest.raises(jsworker.EmbeddedServerError):
            jsworker.EmbeddedServer(**kw)
    for size in (0, True, 2.5):
        with pytest.raises(jsworker.EmbeddedServerError, match="cluster size"):
            jsworker.EmbeddedCluster(size)  # type: ignore[arg-type]
    assert jsworker.EmbeddedServer(port=4222, max_payload=1024).port == 4222


async def test_a_valid_worker_id_is_a_valid_kv_key(nc: NATS, unique: Callable[[str], str]) -> None:
    """The rule is not stricter in name only: the longest odd-looking id starts fine."""
    wid = ("A-z_0=" + unique("w").replace("-", "_")).ljust(MAX_WORKER_ID_LEN, "=")
    w = jsworker.Worker(nc, worker_id=wid)
    w.handle(unique("kvkey"), lambda ctx: None)
    async with w:
        assert wid in {e["worker_id"] for e in await jsworker.list_workers(nc)}


# ------------------------------------------------------------------ secrets
SECRET = "S3cr3t-PW-7f2a"
TOKEN = "T0ken-9c1e-secret"

SERVE_APP = textwrap.dedent(
    """
    import jsworker

    def make_worker(nc):
        w = jsworker.Worker(nc, grace_period=1)
        w.handle("{ttype}", lambda ctx: ctx.json())
        return w
    """
)


def no_secret(p: subprocess.CompletedProcess[str], *secrets: str) -> None:
    for s in secrets:
        assert s not in p.stdout and s not in p.stderr, (p.args, p.stdout, p.stderr)


async def test_secrets_in_the_url_are_never_printed(tmp_path: Path) -> None:
    async with EmbeddedServer(user="alice", password=SECRET) as srv:
        url = f"nats://alice:{SECRET}@127.0.0.1:{srv.port}"
        env = {**os.environ, "NATS_URL": url}
        ttype = "secret-echo"
        p = await acli("kv", "setup", env=env)
        assert p.returncode == 0 and "alice:***@" in p.stdout, p.stdout
        no_secret(p, SECRET)
        # serve: its banner names the URL
        (tmp_path / "sapp.py").write_text(SERVE_APP.format(ttype=ttype))
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "jsworker.cli", "serve", "sapp:make_worker",
            "--app-dir", str(tmp_path), env=env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        assert proc.stdout is not None
        try:
            banner = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
            assert "serving secret-echo on nats://alice:***@127.0.0.1" in banner, banner
            p = await acli("task", "submit", ttype, '{"a": 1}', "--wait", "--json", env=env)
            assert p.returncode == 0, p.stderr
            run_id = json.loads(p.stdout)["run_id"]
            runs: list[list[str]] = [
                ["kv", "setup", "--json"],
                ["kv", "setup", "--check"],
                ["workers"],
                ["workers", "--json"],
                ["workers", "watch", "--timeout", "1"],
                ["workers", "watch", "--timeout", "1", "--json"],
                ["task", "submit", ttype, "{}"],
                ["task", "submit", ttype, "{}", "--wait"],
                ["task", "events", run_id],
                ["task", "events", run_id, "--json"],
                ["task", "watch", run_id, "--timeout", "1"],
                ["signal", "send", run_id, "note", "1", "--json"],
                ["signal", "list", run_id],
                ["task", "cancel", run_id],
                ["partitions", "list", "--json"],
                ["partitions", "show", ttype],
                ["queues"],
                ["queues", "--json"],
                ["top", "--once"],
                ["top", "--once", "--json"],
                ["dead", "list"],
                ["dead", "list", "--json"],
            ]
            for args in runs:
                p = await acli(*args, env=env)
                assert "Traceback" not in p.stderr, (args, p.stderr)
                no_secret(p, SECRET)
            p = await acli("workers", env=env)
            assert "on nats://alice:***@127.0.0.1" in p.stdout
        finally:
            proc.send_signal(signal.SIGINT)
            out, err = await asyncio.wait_for(proc.communicate(), 30)
        assert SECRET not in out.decode() + err.decode()

        # errors: refused credentials, an unreachable server
        wrong = f"nats://alice:{SECRET}-wrong@127.0.0.1:{srv.port}"
        for args in (["--url", wrong, "workers"], ["--url", wrong, "task", "events", "r"]):
            p = await acli(*args)
            assert p.returncode == 1 and "alice:***@" in p.stderr, p.stderr
            no_secret(p, SECRET)
        p = await acli("--url", f"nats://alice:{SECRET}@127.0.0.1:1", "kv", "setup")
        assert p.returncode == 1 and "cannot reach" in p.stderr
        no_secret(p, SECRET)


async def test_tokens_are_never_printed() -> None:
    async with EmbeddedServer(token=TOKEN) as srv:
        for auth in (
            ["--url", f"nats://{TOKEN}@127.0.0.1:{srv.port}"],
            ["--url", srv.url, "--token", TOKEN],
        ):
            p = await acli(*auth, "kv", "setup")
            assert p.returncode == 0, p.stderr
            no_secret(p, TOKEN)
            p = await acli(*auth, "workers")
            assert p.returncode == 0, p.stderr
            no_secret(p, TOKEN)
        p = await acli("--url", f"nats://{TOKEN}x@127.0.0.1:{srv.port}", "workers")
        assert p.returncode == 1 and "nats://***@127.0.0.1" in p.stderr, p.stderr
        no_secret(p, TOKEN)


async def test_interactive_session_never_shows_the_password() -> None:
    from jsworker import interactive

    async with EmbeddedServer(user="alice", password=SECRET) as srv:
        url = f"nats://alice:{SECRET}@127.0.0.1:{srv.port}"
        session = await interactive.connect(url, provision=True)
        try:
            shown = repr(session) + session._repr_html_()
            assert SECRET not in shown and "alice:***@127.0.0.1" in shown, shown
        finally:
            await session.close()
        with pytest.raises(jsworker.ServerError) as e:
            await interactive.connect(f"nats://alice:{SECRET}@127.0.0.1:1")
        assert SECRET not in str(e.value) and "alice:***@" in str(e.value)


def test_kernel_spec_shows_the_url_without_its_password() -> None:
    from jsworker.interactive._kernel import kernel_spec
    from jsworker.interactive._magics import URL_ENV

    url = f"nats://alice:{SECRET}@nats:4222"
    spec = kernel_spec(url, "dev-alice")
    assert spec["env"][URL_ENV] == url  # the kernel connects with it
    shown = json.dumps({k: v for k, v in spec.items() if k != "env"})
    assert SECRET not in shown and "nats://alice:***@nats:4222" in spec["display_name"]


# ------------------------------------------------------------------ terminal safety
async def test_workers_prints_hostile_directory_entries_as_text(
    nc: NATS, server_env: dict[str, str], unique: Callable[[str], str]
) -> None:
    kv = await nc.jetstream().key_value("workers")
    evil, odd = unique("evil"), unique("odd")
    entry = {
        "worker_id": NASTY,
        "task_types": [NASTY],
        "groups": [NASTY],
        "partitions": {NASTY: NASTY},
        "hostname": NASTY,
        "pid": NASTY,
        "language": NASTY,
        "last_seen": NASTY,
    }
    await kv.put(evil, json.dumps(entry).encode())
    await kv.put(odd, b'["not", "an object", "[/]"]')  # any process can write anything
    try:
        p = await acli("workers", env=server_env, columns=1000)  # wide: no cell wraps
        assert p.returncode == 0, p.stderr
        shows_nasty(p.stdout, times=8)
        assert '["not", "an object", "[/]"]' in p.stdout
        p = await acli("workers", "--json", env=server_env)
        assert p.returncode == 0 and NASTY in [e["worker_id"] for e in json.loads(p.stdout)
                                             if isinstance(e, dict)]  # fmt: skip
        terminal_safe(p.stdout)  # JSON escapes control characters
        p = await acli("workers", "watch", "--timeout", "1", env=server_env)
        assert p.returncode == 0, p.stderr
        assert "present" in p.stdout
        terminal_safe(p.stdout)
    finally:
        await kv.delete(evil)
        await kv.delete(odd)


async def test_task_events_and_watch_print_hostile_events_as_text(
    nc: NATS, server_env: dict[str, str], unique: Callable[[str], str]
) -> None:
    run_id = unique("run")
    js = nc.jetstream()
    step = "s[/]\x1b[31m"  # a subject token may hold both

    async def publish(**ev: Any) -> None:
        await js.publish(f"history.{run_id}", json.dumps(ev).encode())

    base = {"timestamp": NASTY, "step_id": NASTY, "attempt_number": NASTY}
    await publish(type=NASTY, **base, payload={"output": NASTY})
    await publish(type="step.failed", **base, payload={"kind": NASTY, "error": NASTY})
    await publish(type="step.cancelled", **base, payload={"reason": NASTY})
    await js.publish(f"history.{run_id}", b'"just a string [/]"')
    await js.publish(f"history.{run_id}", b'{"type": "step.failed", "payload": ["x"]}')

    p = await acli("task", "events", run_id, env=server_env)
    assert p.returncode == 0, p.stderr
    shows_nasty(p.stdout, times=3)
    assert '"just a string [/]"' in p.stdout
    p = await acli("task", "events", run_id, "--json", env=server_env)
    assert p.returncode == 0 and len(p.stdout.splitlines()) == 5
    terminal_safe(p.stdout)

    # watch (another run: the one above is cancelled, watch would stop at once): an
    # event, a chunk (subject token, sequence header, data), events, then the outcome
    run_id = unique("run")
    await publish(type=NASTY, **base, payload={"output": NASTY})
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "jsworker.cli", "task", "watch", run_id, "--timeout", "30",
        env={**server_env, "COLUMNS": "250"},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None
    # past events are replayed first: once one is printed, the chunk subscription (made
    # before the history one) is in place
    first = await asyncio.wait_for(proc.stdout.readline(), 30)
    assert b"\\x1b[31m" in first
    await nc.publish(f"stream.{run_id}.{step}", NASTY.encode(), headers={CHUNK_SEQ: "1[/]\x1b"})
    await nc.flush()
    await publish(type="step.failed", **base, payload={"kind": NASTY, "error": NASTY})
    await publish(type="step.completed", **base, payload={"output": {"k": NASTY}})
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    text = first.decode() + out.decode()
    assert proc.returncode == 0, (text, err.decode())
    shows_nasty(text, times=3)
    assert "s[/]\\x1b[31m #" in text  # the step from the subject
    terminal_safe(err.decode())


async def test_task_submit_wait_prints_a_hostile_error_as_text(
    nc: NATS, server_env: dict[str, str], unique: Callable[[str], str]
) -> None:
    ttype = unique("hostile")
    w = jsworker.Worker(nc)

    @w.handle(ttype)
    async def fail(ctx: jsworker.TaskContext) -> Any:
        if ctx.json() == "fail":
            ctx.fail_permanent(NASTY)
        return {"out": NASTY}

    async with w:
        p = await acli("task", "submit", ttype, '"fail"', "--wait", env=server_env)
        assert p.returncode == 1
        assert len(p.stderr.strip().splitlines()) == 1, p.stderr
        shows_nasty(p.stderr)
        p = await acli("task", "submit", ttype, '"ok"', "--wait", env=server_env)
        assert p.returncode == 0, p.stderr
        terminal_safe(p.stdout)
        assert "[/]x[bold]y\\u001b[31mred" in p.stdout  # JSON-escaped, then shown as text
    # commands whose tables show the dead letter's error text (the console's safety net
    # escapes what a command did not)
    for args in (["dead", "list", "--type", ttype], ["top", "--once"], ["queues"]):
        p = await acli(*args, env=server_env)
        assert p.returncode == 0, (args, p.stderr)
        terminal_safe(p.stdout)
    p = await acli("dead", "list", "--type", ttype, env=server_env, columns=400)
    assert "[/]x[bold]y\\x1b[31mred" in p.stdout, p.stdout


async def test_partitions_show_prints_hostile_members_as_text(
    nc: NATS, server_env: dict[str, str], unique: Callable[[str], str]
) -> None:
    ttype = unique("pevil")
    kv = await nc.jetstream().key_value("elastic-consumer-groups")
    key = f"TASK_QUEUES.{ttype}"
    cfg = {
        "max_members": 2,
        "partitioning_filters": [{"filter": f"task.{ttype}.>", "partitioning_wildcards": [1]}],
        "members": [NASTY, "ok-member"],
    }
    await kv.put(key, json.dumps(cfg).encode())
    try:
        p = await acli("partitions", "show", ttype, env=server_env)
        assert p.returncode == 0, p.stderr
        shows_nasty(p.stdout)
        p = await acli("partitions", "list", env=server_env)
        assert p.returncode == 0 and ttype in p.stdout, p.stderr
        terminal_safe(p.stdout)
    finally:
        await kv.delete(key)


# ------------------------------------------------------------------ input and errors
def test_at_file_errors_are_one_line(server: EmbeddedServer, tmp_path: Path) -> None:
    env = {**os.environ, "NATS_URL": server.url}
    (tmp_path / "latin1.json").write_bytes(b'{"name": "caf\xe9"}')
    p = cli("task", "submit", "t", f"@{tmp_path / 'latin1.json'}", env=env)
    assert p.returncode == 1 and "is not UTF-8 text" in p.stderr, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and "Traceback" not in p.stderr
    p = cli("signal", "send", "run-1", "x", f"@{tmp_path}", env=env)
    assert p.returncode == 1 and "is a directory" in p.stderr, p.stderr
    p = cli("task", "submit", "t", "-", env=env, input="\ufeff{}")
    assert p.returncode == 1 and "Traceback" not in p.stderr


def test_workers_without_jetstream_is_one_clear_line() -> None:
    # no config file, no -js: a server with JetStream off
    port = free_port()
    proc = subprocess.Popen(
        [find_nats_server(), "-a", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 15
        while True:  # wait until it accepts connections (real state, bounded)
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "nats-server did not start"
                time.sleep(0.05)
        p = cli("--url", f"nats://127.0.0.1:{port}", "workers")
        assert p.returncode == 1, p.stderr
        assert p.stderr.startswith("Error: JetStream is not available"), p.stderr
        assert "code=None" not in p.stderr and len(p.stderr.strip().splitlines()) == 1
    finally:
        proc.terminate()
        proc.wait(10)


# ------------------------------------------------------------------ workers watch
async def test_workers_watch_shows_joins_and_leaves(
    nc: NATS, server_env: dict[str, str], unique: Callable[[str], str]
) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "jsworker.cli", "workers", "watch", "--json",
        env=server_env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None
    w = jsworker.Worker(nc, worker_id=unique("watched"))
    w.handle(unique("wtype"), lambda ctx: None)

    async def next_event_for(worker_id: str) -> dict[str, Any]:
        assert proc.stdout is not None
        while True:
            line = await asyncio.wait_for(proc.stdout.readline(), 30)
            assert line, "workers watch exited"
            ev: dict[str, Any] = json.loads(line)
            if ev["worker_id"] == worker_id:
                return ev

    try:
        # a marker entry tells when the watch is live, so the worker's join is not
        # folded into the initial listing
        kv = await nc.jetstream().key_value("workers")
        marker = unique("marker")
        await kv.put(marker, b"{}")
        assert (await next_event_for(marker))["event"] in ("present", "joined")
        async with w:
            ev = await next_event_for(w.worker_id)
            assert ev["event"] == "joined" and ev["entry"]["pid"] == os.getpid()
        assert (await next_event_for(w.worker_id))["event"] == "left"
        await kv.delete(marker)
    finally:
        proc.send_signal(signal.SIGINT)
        await asyncio.wait_for(proc.communicate(), 30)


async def test_watch_directory_reports_an_expired_entry(fresh_server: EmbeddedServer) -> None:
    """A worker that dies stops refreshing; its entry expires without a delete marker."""
    from jsworker.cli._workers import watch_directory

    nc = await nats.connect(fresh_server.url)
    try:
        js = nc.jetstream()
        kv = await js.create_key_value(bucket="workers", ttl=1.0)
        events: list[dict[str, Any]] = []
        expired = asyncio.Event()

        def emit(ev: dict[str, Any]) -> None:
            events.append(ev)
            if ev["event"] == "expired":
                expired.set()

        task = asyncio.create_task(watch_directory(nc, emit, check_every=0.1))
        await kv.put("gone-1", b'{"worker_id": "gone-1"}')
        await asyncio.wait_for(expired.wait(), 20)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # "present" if the put landed before the watch was in place
        assert [e["worker_id"] for e in events] == ["gone-1", "gone-1"]
        assert events[0]["event"] in ("joined", "present") and events[1]["event"] == "expired"
    finally:
        await nc.close()


# ------------------------------------------------------------------ dev --cluster
CLUSTER_APP = textwrap.dedent(
    """
    import jsworker

    async def make_worker(nc):
        si = await nc.jetstream().stream_info("TASK_QUEUES")
        print("REPLICAS", si.config.num_replicas, 1 + len(si.cluster.replicas or []),
              flush=True)
        w = jsworker.Worker(nc, grace_period=1)
        w.handle("cluster-echo", lambda ctx: ctx.json())
        return w
    """
)


async def test_dev_cluster_runs_three_nodes_with_replicas_3(tmp_path: Path) -> None:
    (tmp_path / "cluster_app.py").write_text(CLUSTER_APP)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "jsworker.cli", "dev", "--cluster", "3",
        "--app", "cluster_app:make_worker", "--app-dir", str(tmp_path),
        env={**os.environ, "COLUMNS": "250"},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None
    lines: list[str] = []
    try:
        while not (lines and lines[-1].startswith("REPLICAS")):
            line = (await asyncio.wait_for(proc.stdout.readline(), 90)).decode()
            assert line, f"dev --cluster exited: {lines}"
            lines.append(line.strip())
        urls = [ln.split("listening on ")[1] for ln in lines if "listening on" in ln]
        assert len(urls) == 3 and len(set(urls)) == 3, lines
        assert f"export NATS_URL={','.join(urls)}" in "\n".join(lines)
        assert any("(replicas 3)" in ln for ln in lines), lines
        assert lines[-1] == "REPLICAS 3 3"  # configured R3, and 3 peers really hold it
        # the worker serves through any node
        nc = await nats.connect(urls[2])
        try:
            h = await jsworker.Client(nc).submit("cluster-echo", {"n": 3})
            assert await h.result(timeout=30) == {"n": 3}
        finally:
            await nc.close()
    finally:
        proc.send_signal(signal.SIGINT)
        _out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    assert "Traceback" not in err.decode()


def test_dev_cluster_refuses_port_and_store_dir() -> None:
    p = cli("dev", "--demo", "--cluster", "3", "--port", "4333")
    assert p.returncode == 2 and "drop --port/--store-dir" in p.stderr
    p = cli("dev", "--demo", "--cluster", "2")
    assert p.returncode == 2 and "3<=x<=9" in p.stderr.replace(" ", "")


async def ctrl_c_while_busy(
    url: str, args: list[str], churn: Callable[[asyncio.Event], Awaitable[None]]
) -> None:
    """Run `jsworker ARGS` 4 times while ``churn`` keeps what it reads busy; each time,
    once it has printed 50 lines, Ctrl-C must end it (exit 130) within 15 s."""
    stop = asyncio.Event()
    busy = asyncio.create_task(churn(stop))
    env = {**os.environ, "NATS_URL": url}
    try:
        for _ in range(4):
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "jsworker.cli", *args,
                env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            )  # fmt: skip
            assert proc.stdout is not None
            for _ in range(50):  # it is live and busy
                assert await asyncio.wait_for(proc.stdout.readline(), 30)
            proc.send_signal(signal.SIGINT)
            try:
                await asyncio.wait_for(proc.communicate(), 15)
            finally:
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()
            assert proc.returncode == 130
    finally:
        stop.set()
        await busy


async def test_workers_watch_stops_on_ctrl_c_while_the_directory_is_busy(
    fresh_server: EmbeddedServer,
) -> None:
    """Python 3.11's wait_for can swallow a cancel that lands as an update arrives; with
    a busy directory Ctrl-C was lost and `workers watch` ran on (4 hangs in 6 tries)."""
    nc = await nats.connect(fresh_server.url)
    await jsworker.setup_all(nc)
    kv = await nc.jetstream().key_value("workers")

    async def churn(stop: asyncio.Event) -> None:
        i = 0
        while not stop.is_set():
            i += 1
            await kv.put(f"w{i % 50}", b'{"worker_id": "x"}')
            if i % 3 == 0:
                await kv.delete(f"w{(i + 7) % 50}")

    try:
        await ctrl_c_while_busy(fresh_server.url, ["workers", "watch", "--json"], churn)
    finally:
        await nc.close()


@pytest.mark.parametrize("command", [["events", "--follow"], ["watch"]])
async def test_task_follow_stops_on_ctrl_c_while_the_history_is_busy(
    fresh_server: EmbeddedServer, command: list[str]
) -> None:
    """`task events --follow` and `task watch` read the history through nats-py's
    next_msg, whose Python 3.11 wait_for can swallow a cancel that lands as an event
    arrives: like `workers watch`, Ctrl-C must end them while events keep coming."""
    nc = await nats.connect(fresh_server.url)
    await jsworker.setup_all(nc)
    js = nc.jetstream()
    run_id = "busy-" + os.urandom(4).hex()

    async def churn(stop: asyncio.Event) -> None:
        i = 0
        while not stop.is_set():
            i += 1
            ev = {"type": "step.progress", "run_id": run_id, "step_id": "main", "n": i}
            await js.publish(f"history.{run_id}", json.dumps(ev).encode())

    try:
        args = ["task", command[0], run_id, *command[1:]]
        await ctrl_c_while_busy(fresh_server.url, args, churn)
    finally:
        await nc.close()
