"""Operations from the terminal, as real subprocesses against a real server:
``jsworker dead ...`` and ``jsworker queues`` (``jsworker top``: tests/test_top.py)."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from typing import Any

from nats.aio.client import Client as NATS

import jsworker
from jsworker import EmbeddedServer
from jsworker.cli._dead import parse_duration
from jsworker.cli._queues import fmt_age, queue_report


def cli(
    *args: str, env: dict[str, str], input: str | None = None, columns: int = 200
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "jsworker.cli", *args],
        capture_output=True,
        text=True,
        env={**env, "COLUMNS": str(columns), "NO_COLOR": "1"},
        input=input,
        timeout=60,
        check=False,
    )


async def acli(
    *args: str, env: dict[str, str], input: str | None = None
) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(cli, *args, env=env, input=input)


def one_line_error(p: subprocess.CompletedProcess[str], text: str) -> None:
    assert p.returncode == 1, (p.stdout, p.stderr)
    assert "Traceback" not in p.stderr + p.stdout, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), p.stderr
    assert text in lines[0], p.stderr


def record(task_type: str, run_id: str, **over: Any) -> bytes:
    rec: dict[str, Any] = {
        "task_type": task_type,
        "kind": "non_retriable",
        "error": "card declined\nby the bank",
        "attempts": 1,
        "worker_id": "worker-0123456789abcdef",
        "subject": f"task.{task_type}.{run_id}",
        "timestamp": "2026-11-29T12:00:00.000000Z",
        "task": {
            "task_id": "t",
            "run_id": run_id,
            "step_id": "main",
            "iteration": 0,
            "input": {"amount": 990, "card": "[bold]x[/]"},
            "metadata": {},
        },
    }
    rec.update(over)
    return json.dumps(rec).encode()


async def put(nc: NATS, subject: str, data: bytes) -> int:
    return int((await nc.jetstream().publish(subject, data)).seq)


def test_parse_duration() -> None:
    assert parse_duration("90") == 90.0
    assert parse_duration("1h30m") == 5400.0
    assert parse_duration("7d") == 7 * 86400.0
    assert parse_duration("0") == 0.0
    for bad in ("", "h", "1x", "1h 2m", "-5", "nan", "1hh"):
        try:
            parse_duration(bad)
        except ValueError:
            continue
        raise AssertionError(f"{bad!r} was accepted")


async def test_dead_list_show_json(
    nc: NATS, server_env: dict[str, str], unique: Callable[[str], str]
) -> None:
    ttype = unique("charge")
    s1 = await put(
        nc, f"dead.{ttype}.run-a.main", record(ttype, "run-a", traceback="Traceback: line 3")
    )
    s2 = await put(
        nc,
        f"dead.{ttype}.invalid.77",
        json.dumps(
            {
                "task_type": ttype,
                "kind": "invalid_payload",
                "error": "task payload is not valid JSON",
                "attempts": 1,
                "subject": f"task.{ttype}.x",
                "timestamp": "2026-11-29T12:00:01Z",
                "stream_sequence": 77,
                "payload_b64": base64.b64encode(b"amount=5 (form-encoded)").decode(),
            }
        ).encode(),
    )
    p = await acli("dead", "list", "--type", ttype, env=server_env)
    assert p.returncode == 0, p.stderr
    assert f"2 dead letter(s) of {ttype}" in p.stdout
    row = next(  # (not the title line, which starts with the count: "2 dead letter(s)")
        ln for ln in p.stdout.splitlines() if "run-a" in ln and ln.strip("│ ").startswith(f"{s1} ")
    )
    assert "run-a" in row and "non_retriable" in row and "card declined" in row
    assert "by the bank" not in p.stdout  # the first line of the error only
    cells = re.split(r"\s{2,}", row.strip())  # seq type run kind att age error
    assert cells[4] == "1" and cells[6] == "card declined"

    p = await acli("dead", "list", "--type", ttype, "--json", env=server_env)
    got = json.loads(p.stdout)
    assert [d["seq"] for d in got] == [s1, s2]
    assert got[1]["payload_text"] == "amount=5 (form-encoded)"

    p = await acli("dead", "show", str(s1), env=server_env)
    assert p.returncode == 0, p.stderr
    assert "card declined\nby the bank" in p.stdout
    assert "2026-11-29 12:00:00" in p.stdout
    assert '"amount": 990' in p.stdout  # pretty-printed input
    assert "[bold]x[/]" in p.stdout  # shown as-is, never as markup
    assert "Traceback: line 3" in p.stdout
    p = await acli("dead", "show", "run-a", "--json", env=server_env)
    assert json.loads(p.stdout)["seq"] == s1
    p = await acli("dead", "show", str(s2), env=server_env)
    assert "payload (text):" in p.stdout and "amount=5 (form-encoded)" in p.stdout


async def test_dead_replay_without_worker_and_twice(
    nc: NATS, server_env: dict[str, str], unique: Callable[[str], str]
) -> None:
    ttype = unique("orphan")
    seq = await put(nc, f"dead.{ttype}.run-b.main", record(ttype, "run-b"))
    p = await acli("dead", "replay", str(seq), "--dry-run", env=server_env)
    one_line_error(p, "no worker is listening")
    assert "would replay dead letter" in p.stdout and "would wait" in p.stderr
    js = nc.jetstream()
    info = await js.stream_info("TASK_QUEUES", subjects_filter=f"task.{ttype}.>")
    assert not info.state.subjects  # a dry run publishes nothing

    p = await acli("dead", "replay", str(seq), env=server_env)
    one_line_error(p, f"no worker is listening for task.{ttype}")
    assert f"replayed dead letter {seq}" in p.stdout and "duplicate" not in p.stdout
    p = await acli("dead", "replay", "--type", ttype, "--json", env=server_env)
    assert p.returncode == 1
    assert json.loads(p.stdout)[0]["duplicate"] is True
    info = await js.stream_info("TASK_QUEUES", subjects_filter=f"task.{ttype}.>")
    assert info.state.subjects == {f"task.{ttype}.run-b": 1}  # queued once

    # with a worker, a --type --all replay runs every task and exits 0
    await put(nc, f"dead.{ttype}.run-c.main", record(ttype, "run-c"))
    p = await acli("dead", "replay", "--type", ttype, env=server_env)
    one_line_error(p, "pass --all")
    ran: list[str] = []
    w = jsworker.Worker(nc)

    @w.handle(ttype)
    async def h(ctx: jsworker.TaskContext) -> None:
        ran.append(ctx.run_id)

    async with w:
        await _until(lambda: sorted(ran) == ["run-b"])
        p = await acli("dead", "replay", "--type", ttype, "--all", env=server_env)
        assert p.returncode == 0, p.stderr
        await _until(lambda: sorted(ran) == ["run-b", "run-c"])
    assert "duplicate" in p.stdout  # run-b's dead letter was replayed before


async def _until(pred: Callable[[], bool], timeout: float = 15.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not pred():
        assert loop.time() < deadline, "timed out"
        await asyncio.sleep(0.02)


async def test_dead_purge_confirms_and_refuses_without_filter(
    nc: NATS, server_env: dict[str, str], unique: Callable[[str], str]
) -> None:
    ttype = unique("purge")
    for i in range(3):
        await put(nc, f"dead.{ttype}.r{i}.main", record(ttype, f"r{i}"))
    p = await acli("dead", "purge", env=server_env)
    one_line_error(p, "refusing to purge without a filter")
    p = await acli("dead", "purge", "--type", ttype, env=server_env)
    one_line_error(p, "--older-than")
    p = await acli("dead", "purge", "--type", ttype, "--older-than", "7x", env=server_env)
    one_line_error(p, "not a duration")

    p = await acli("dead", "purge", "--type", ttype, "--older-than", "7d", env=server_env)
    assert p.returncode == 0 and "purged 0" in p.stdout  # nothing that old: no question
    p = await acli(
        "dead", "purge", "--type", ttype, "--older-than", "0", env=server_env, input="n\n"
    )
    assert p.returncode == 1 and "Delete 3 dead letter(s)" in p.stderr
    assert len(await jsworker.list_dead(nc, task_type=ttype)) == 3  # declined: kept
    p = await acli(
        "dead", "purge", "--type", ttype, "--older-than", "0", env=server_env, input="y\n"
    )
    assert p.returncode == 0 and "purged 3" in p.stdout, p.stderr
    assert await jsworker.list_dead(nc, task_type=ttype) == []
    await put(nc, f"dead.{ttype}.r9.main", record(ttype, "r9"))
    p = await acli(
        "dead", "purge", "--type", ttype, "--older-than", "0", "--yes", "--json", env=server_env
    )
    assert json.loads(p.stdout) == {"task_type": ttype, "purged": 1}


async def test_dead_bad_input(server_env: dict[str, str], unique: Callable[[str], str]) -> None:
    cases = [
        (["dead", "show", "999999999"], "no dead letter with sequence 999999999"),
        (["dead", "show", unique("run")], "no dead letter for run"),
        (["dead", "replay", "999999999"], "no dead letter with sequence"),
        (["dead", "replay"], "either a dead letter"),
        (["dead", "replay", "5", "--type", "x"], "not both"),
        (["dead", "replay", "--all", "5"], "--all goes with --type"),
        (["dead", "list", "--type", "a.>"], "subject separator"),
        (["dead", "list", "--since", "yesterday"], "not a duration"),
        (["dead", "replay", "--type", unique("none")], "no replayable dead letter"),
    ]
    for args, text in cases:
        one_line_error(await acli(*args, env=server_env), text)


async def test_dead_without_streams(fresh_server: EmbeddedServer) -> None:
    env = {**os.environ, "NATS_URL": fresh_server.url}
    for args in (["dead", "list"], ["dead", "show", "1"], ["dead", "replay", "1"]):
        one_line_error(await acli(*args, env=env), "jsworker kv setup")


# ------------------------------------------------------------------------ queues
async def test_queues_counts_from_server_state(
    nc: NATS, server_env: dict[str, str], unique: Callable[[str], str]
) -> None:
    orphan, slow, part = unique("orphan"), unique("slow"), unique("part")
    c = jsworker.Client(nc)
    js = nc.jetstream()
    # tasks nobody consumes, published as any other language would: raw JSON bodies
    for i in range(3):
        await js.publish(f"task.{orphan}.r{i}", json.dumps({"run_id": f"r{i}"}).encode())
    for i in range(2):
        await c.submit(orphan, {"i": i}, group="gpu")
    gate = asyncio.Event()
    w = jsworker.Worker(nc, groups=["cpu"], concurrency=2)
    wp = jsworker.Worker(nc, partitions=3)

    @w.handle(slow)
    async def h_slow(ctx: jsworker.TaskContext) -> None:
        await gate.wait()

    @wp.handle(part)
    async def h_part(ctx: jsworker.TaskContext) -> None:
        await gate.wait()

    def by_key(rows: list[dict[str, Any]]) -> dict[tuple[str, str | None], dict[str, Any]]:
        return {(r["task_type"], r["group"]): r for r in rows}

    async with w, wp:
        for i in range(5):
            await c.submit(slow, {"i": i}, group="cpu")
        for i in range(4):
            await c.submit(part, {"i": i}, key=f"k{i}")
        deadline = asyncio.get_running_loop().time() + 20
        while True:  # wait on server state: every task that can start has been delivered
            rows = {r.key: r for r in await queue_report(nc)}
            if rows[(slow, "cpu")].in_flight == 2 and rows[(part, None)].in_flight == 4:
                break
            assert asyncio.get_running_loop().time() < deadline, rows
            await asyncio.sleep(0.05)
        p = await acli("queues", "--json", env=server_env)
        assert p.returncode == 0, p.stderr
        got = by_key(json.loads(p.stdout))
        table = await acli("queues", env=server_env)
        gate.set()
    o, og = got[(orphan, None)], got[(orphan, "gpu")]
    assert (o["queued"], o["in_flight"], o["consumers"]) == (3, 0, [])
    assert (og["queued"], og["in_flight"]) == (2, 0)
    assert o["oldest_age"] is not None and o["oldest_age"] >= 0
    s = got[(slow, "cpu")]
    assert (s["queued"], s["in_flight"], s["consumers"]) == (3, 2, [f"{slow}__g_cpu"])
    assert s["oldest_age"] is not None
    pt = got[(part, None)]
    assert (pt["partitions"], pt["members"]) == (3, [wp.worker_id])
    assert (pt["queued"], pt["in_flight"], pt["stream"]) == (0, 4, f"TASK_QUEUES-{part}")
    assert table.returncode == 0
    line = next(ln for ln in table.stdout.splitlines() if f" {slow} " in ln)
    assert "cpu" in line and " 3 " in line and " 2 " in line
    line = next(ln for ln in table.stdout.splitlines() if f" {orphan} " in ln and "gpu" in ln)
    assert "none" in line
    await js.purge_stream("TASK_QUEUES", subject=f"task.{orphan}.>")


def test_fmt_age() -> None:
    assert [fmt_age(x) for x in (None, 4.25, 42, 307, 11100, 183600)] == [
        "-",
        "4.2s",
        "42s",
        "5m07s",
        "3h05m",
        "2d03h",
    ]


async def test_queues_without_streams(fresh_server: EmbeddedServer) -> None:
    env = {**os.environ, "NATS_URL": fresh_server.url}
    one_line_error(await acli("queues", env=env), "jsworker kv setup")


async def test_dead_hostile_wire_strings_are_escaped(
    nc: NATS, server_env: dict[str, str], unique: Callable[[str], str]
) -> None:
    ttype = unique("evil")
    evil = "\x1b[2Jwiped\u202eeliv\nline two\x07"
    seq = await put(
        nc,
        f"dead.{ttype}.run-e.main",
        record(ttype, "run-e", error=evil, worker_id="w\x1b]0;title\x07", traceback=evil),
    )
    for args in (["dead", "list", "--type", ttype], ["dead", "show", str(seq)]):
        p = await acli(*args, env=server_env)
        assert p.returncode == 0, p.stderr
        assert "\x1b" not in p.stdout and "\u202e" not in p.stdout and "\x07" not in p.stdout
        assert "\\x1b[2Jwiped\\u202eeliv" in p.stdout
    assert "\\x1b]0;title\\x07" in p.stdout  # show: the worker id, escaped
