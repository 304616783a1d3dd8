"""The pipelined publish path (issue 11): PubAcks, the protocol-command fast path, the
coalesced writes, Client.submit_many, ``task submit --count`` and ``--loop``.

Everything that crosses the wire runs against a real server; timings are never asserted.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import textwrap
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import nats
import nats.errors
import nats.js.errors
import pytest
from hypothesis import given
from hypothesis import strategies as st
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js.api import StreamConfig

import jsworker
from jsworker import EmbeddedServer
from jsworker import _pubacks as pa
from jsworker import _wire as w
from jsworker._errors import ConfigError
from jsworker._loop import resolve_loop
from jsworker._outcomes import UnrecordableError, check_subject, is_permanent


def cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "jsworker.cli", *args],
        capture_output=True,
        text=True,
        env={**env, "COLUMNS": "200", "NO_COLOR": "1"},
        timeout=60,
        check=False,
    )


async def acli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(cli, *args, env=env)


async def collect(nc: NATS, subject: str, n: int, timeout: float = 10.0) -> list[Msg]:
    """Subscribe, and return a waiter for ``n`` messages on ``subject``."""
    got: list[Msg] = []
    done = asyncio.Event()

    async def cb(msg: Msg) -> None:
        got.append(msg)
        if len(got) >= n:
            done.set()

    sub = await nc.subscribe(subject, cb=cb)
    await nc.flush()

    async def wait() -> list[Msg]:
        try:
            await asyncio.wait_for(done.wait(), timeout)
        finally:
            await sub.unsubscribe()
        return got

    return wait  # type: ignore[return-value]


# ------------------------------------------------------------------------------ PubAcks
async def test_pubacks_resolve_in_order_with_duplicates_flagged(
    nc: NATS, unique: Callable[[str], str]
) -> None:
    ttype = unique("pa")
    pub = pa.PubAcks(nc)
    futs = [
        await pub.publish(f"task.{ttype}.r{i}", b"{}", {"Nats-Msg-Id": f"{ttype}-{i % 50}"})
        for i in range(100)
    ]
    acks = await asyncio.gather(*futs)
    assert all(a.stream == "TASK_QUEUES" for a in acks)
    fresh = [a for a in acks if not a.duplicate]
    assert len(fresh) == 50  # the second 50 repeat the first 50's ids
    seqs = [a.seq for a in fresh]
    assert seqs == sorted(seqs) and len(set(seqs)) == 50
    assert pub.in_flight == 0
    info = await nc.jetstream().stream_info("TASK_QUEUES", subjects_filter=f"task.{ttype}.>")
    assert sum((info.state.subjects or {}).values()) == 50
    await nc.jetstream().purge_stream("TASK_QUEUES", subject=f"task.{ttype}.>")
    await pub.close()


async def test_pubacks_errors_are_those_of_js_publish(
    nc: NATS, unique: Callable[[str], str]
) -> None:
    js = nc.jetstream()
    name = unique("small").replace("-", "_")
    await js.add_stream(StreamConfig(name=name, subjects=[f"{name}.>"], max_msg_size=64))
    pub = pa.PubAcks(nc, timeout=0.3)
    try:
        # no stream captures the subject
        with pytest.raises(nats.js.errors.NoStreamResponseError):
            await pub.request(f"nostream.{name}", b"x")
        # a stored error reply: over the stream's max_msg_size, which is permanent
        with pytest.raises(nats.js.errors.APIError) as e:
            await pub.request(f"{name}.a", b"x" * 200)
        assert is_permanent(e.value)
        # a subscriber that never replies: the one expiry timer fails it in time
        silent = await nc.subscribe(f"silent.{name}")
        with pytest.raises(nats.errors.TimeoutError):
            await pub.request(f"silent.{name}", b"x")
        await silent.unsubscribe()
        assert pub.in_flight == 0
        # and the mux still works afterwards
        ack = await pub.request(f"{name}.b", b"ok")
        assert ack.stream == name and ack.seq == 1
    finally:
        await pub.close()
        await js.delete_stream(name)


async def test_pubacks_close_fails_what_waits(nc: NATS) -> None:
    pub = pa.PubAcks(nc, timeout=30)
    silent = await nc.subscribe("silent.close")
    fut = await pub.publish("silent.close", b"x")
    await pub.close()
    with pytest.raises(nats.errors.TimeoutError):
        await fut
    await silent.unsubscribe()


# --------------------------------------------------------------------- fast publishing
@pytest.mark.parametrize(
    "headers",
    [
        None,
        {"Nats-Msg-Id": "run-1.step.step.started.1"},
        {"Nats-Msg-Id": "a", "X-Other": "b c"},
        {"Nats-Msg-Id": " padded "},  # needs nats-py's cleaning: takes nc.publish
        {},
    ],
)
async def test_fast_publish_sends_what_nc_publish_sends(
    nc: NATS, headers: dict[str, str] | None
) -> None:
    wait = await collect(nc, "fast.cmp.*", 2)
    await pa.publish(nc, "fast.cmp.a", b"body \r\n bytes", reply="r.1", headers=headers)
    await nc.publish("fast.cmp.b", b"body \r\n bytes", reply="r.1", headers=headers)
    a, b = sorted(await wait(), key=lambda m: m.subject)  # type: ignore[operator]
    assert (a.data, a.reply, a.headers) == (b.data, b.reply, b.headers)


async def test_fast_publish_falls_back_when_not_connected(nc: NATS) -> None:
    other = await nats.connect(nc.connected_url.geturl(), allow_reconnect=False)
    await other.close()
    with pytest.raises(nats.errors.ConnectionClosedError):
        await pa.publish(other, "fast.closed", b"x")


async def test_many_publishes_in_one_pass_share_a_few_socket_writes(nc: NATS) -> None:
    """Acks and events from many tasks in flight are coalesced: the connection's flusher
    writes everything queued in one event-loop pass at once."""
    writes: list[int] = []
    transport = nc._transport
    real = transport.writelines

    def counting(data: Any) -> Any:
        writes.append(1)
        return real(data)

    wait = await collect(nc, "fast.many.*", 500)
    transport.writelines = counting
    try:
        await asyncio.gather(
            *(pa.publish(nc, f"fast.many.{i}", b"+ACK", headers=None) for i in range(500))
        )
        got = await wait()
    finally:
        transport.writelines = real
    assert len(got) == 500
    assert 1 <= len(writes) <= 5, len(writes)


async def test_fast_ack_acks_once(nc: NATS, unique: Callable[[str], str]) -> None:
    ttype = unique("ack")
    js = nc.jetstream()
    await jsworker.Client(nc).submit(ttype)
    sub = await js.pull_subscribe(f"task.{ttype}.>", durable=ttype, stream="TASK_QUEUES")
    (msg,) = await sub.fetch(1, timeout=5)
    await pa.ack(msg)
    with pytest.raises(nats.errors.MsgAlreadyAckdError):
        await pa.ack(msg)
    for _ in range(100):  # the ack reaches the server: nothing pending, floor moved
        ci = await js.consumer_info("TASK_QUEUES", ttype)
        if ci.num_ack_pending == 0 and ci.ack_floor.stream_seq:
            break
        await asyncio.sleep(0.05)
    assert ci.num_ack_pending == 0 and ci.num_pending == 0
    await js.delete_consumer("TASK_QUEUES", ttype)


# -------------------------------------------------------------------------- unit checks
_TOKEN_RULE = re.compile(r"\s")


def _old_check(subject: str) -> bool:
    return all(
        t and "*" not in t and ">" not in t and not any(c.isspace() for c in t)
        for t in subject.split(".")
    )


@given(st.text(alphabet=st.sampled_from("ab.*> \t\u00a0\u2028-_1é"), max_size=20))
def test_check_subject_regex_equals_the_token_rule(subject: str) -> None:
    try:
        check_subject(subject)
        ok = True
    except UnrecordableError:
        ok = False
    assert ok == _old_check(subject)


def test_now_rfc3339_is_utc_with_microseconds() -> None:
    for _ in range(3):
        s = w.now_rfc3339()
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", s), s
        t = datetime.fromisoformat(s.replace("Z", "+00:00"))
        assert abs((datetime.now(UTC) - t).total_seconds()) < 5


def test_header_block_matches_headers_size() -> None:
    for h in ({"Nats-Msg-Id": "x.y.z"}, {"A": "1", "Nats-Msg-Id": "é"}):
        block = pa.header_block(h)
        assert block is not None and len(block) == w.headers_size(h)
    assert pa.header_block({"Bad Key": "v"}) is None
    assert pa.header_block({"K": "v\r\nInjected: 1"}) is None


def test_resolve_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_loop("asyncio") == ("asyncio", None)
    with pytest.raises(ConfigError, match="unknown event loop"):
        resolve_loop("trio")
    monkeypatch.setitem(sys.modules, "uvloop", None)  # import uvloop -> ImportError
    assert resolve_loop("auto") == ("asyncio", None)
    with pytest.raises(ConfigError, match=r"pip install 'jsworker\[fast\]'"):
        resolve_loop("uvloop")


# ---------------------------------------------------------------------------- clients
async def test_submit_many_small_window_keeps_order(
    nc: NATS, unique: Callable[[str], str]
) -> None:
    ttype = unique("sm")
    client = jsworker.Client(nc)
    reqs = [jsworker.TaskRequest(ttype, {"i": i}, run_id=f"{ttype}-{i}") for i in range(60)]
    handles = await client.submit_many(reqs, window=4)
    assert [h.run_id for h in handles] == [f"{ttype}-{i}" for i in range(60)]
    seqs = [h.sequence for h in handles]
    assert seqs == sorted(seqs) and not any(h.duplicate for h in handles)
    again = await client.submit_many(reqs[:3])
    assert all(h.duplicate for h in again)
    await nc.jetstream().purge_stream("TASK_QUEUES", subject=f"task.{ttype}.>")


async def test_submit_many_without_streams_is_not_provisioned(
    fresh_server: EmbeddedServer,
) -> None:
    nc = await nats.connect(fresh_server.url)
    try:
        with pytest.raises(jsworker.NotProvisionedError, match="kv setup"):
            await jsworker.Client(nc).submit_many([jsworker.TaskRequest("t") for _ in range(5)])
    finally:
        await nc.close()


async def test_cli_submit_count(
    nc: NATS, server_env: dict[str, str], unique: Callable[[str], str]
) -> None:
    ttype = unique("cnt")
    p = await acli("task", "submit", ttype, '{"x": 1}', "--count", "250", "--json", env=server_env)
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert out["count"] == 250 and out["duplicates"] == 0
    info = await nc.jetstream().stream_info("TASK_QUEUES", subjects_filter=f"task.{ttype}.>")
    assert sum((info.state.subjects or {}).values()) == 250
    p = await acli("task", "submit", ttype, "--count", "3", env=server_env)
    assert p.returncode == 0 and f"submitted 3 {ttype} tasks" in p.stdout
    for bad in (["--count", "2", "--wait"], ["--count", "2", "--run-id", "r1"], ["--count", "0"]):
        p = await acli("task", "submit", ttype, *bad, env=server_env)
        assert p.returncode == 2 and "Traceback" not in p.stderr
    await nc.jetstream().purge_stream("TASK_QUEUES", subject=f"task.{ttype}.>")


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


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
async def test_serve_loop(
    nc: NATS, server_env: dict[str, str], unique: Callable[[str], str], tmp_path: Path, loop: str
) -> None:
    pytest.importorskip("uvloop")
    ttype = unique("loop")
    (tmp_path / "loopapp.py").write_text(SERVE_APP.format(ttype=ttype))
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "jsworker.cli",
        "serve",
        "loopapp:make_worker",
        "--app-dir",
        str(tmp_path),
        "--loop",
        loop,
        env={**server_env, "COLUMNS": "200"},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        h = await jsworker.Client(nc).submit(ttype, {"name": "ada"})
        assert await h.result(timeout=20) == {"hello": "ada"}
    finally:
        proc.send_signal(2)
        out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err.decode()
    assert f"{loop} loop" in out.decode()


async def test_serve_loop_uvloop_missing(tmp_path: Path, server_env: dict[str, str]) -> None:
    # a sitecustomize that hides uvloop from the subprocess
    (tmp_path / "sitecustomize.py").write_text("import sys\nsys.modules['uvloop'] = None\n")
    env = {**server_env, "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path])}
    p = await acli("serve", "json:loads", "--loop", "uvloop", env=env)
    assert p.returncode == 1
    assert "uvloop is not installed (pip install 'jsworker[fast]')" in p.stderr
    assert "Traceback" not in p.stderr
