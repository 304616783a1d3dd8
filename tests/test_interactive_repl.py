"""``jsworker repl`` in a real pseudo-terminal (pexpect), against real servers: define,
redefine, submit and read the screen; Ctrl-C interrupts the statement, not the worker;
Ctrl-D leaves cleanly."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import nats
import pexpect
import pytest
from interactive_helpers import own_server

import jsworker
from jsworker import EmbeddedServer

ROOT = Path(__file__).resolve().parent.parent
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
PROMPT = ">>>"
MORE = r"\.\.\."

# this module's own server (see interactive_helpers.own_server); `nc` follows it
server = pytest.fixture(scope="module", name="server")(own_server)


class Screen:
    """A REPL in a pty; ``statement`` types lines and waits for the next prompt."""

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        self.p = pexpect.spawn(
            sys.executable,
            ["-m", "jsworker.cli", *args],
            env=env,
            encoding="utf-8",
            timeout=60,
            dimensions=(50, 250),
        )
        self.seen = ""

    def expect(self, pattern: str | type[pexpect.EOF]) -> str:
        """Wait for ``pattern``; the screen text before it, without escape codes."""
        self.p.expect(pattern)
        text = ANSI.sub("", self.p.before or "")
        self.seen += text
        return text

    def statement(self, *lines: str) -> str:
        """Type a statement (a block ends with an empty line); the screen up to the next
        prompt, after the typed lines. Each accepted line ends with a newline from
        prompt-toolkit; the prompt is redrawn while typing, so that newline is what
        separates the echo from the output."""
        block = [*lines, ""] if len(lines) > 1 else list(lines)
        for i, line in enumerate(block):
            self.p.sendline(keystrokes(block[:i], line))
            self.expect("\r\n")
            if i < len(block) - 1:
                self.expect(MORE)
        return self.expect(PROMPT)


def keystrokes(before: list[str], line: str) -> str:
    """What a person types for ``line`` (given with its indentation) after the REPL
    auto-indented the continuation line: more spaces, or backspaces to dedent. An empty
    line (the end of a block) is typed as nothing: the leftover indent ends it."""
    from jsworker.interactive._repl import indent_for

    if not line:
        return ""
    have = len(indent_for(before))
    want = len(line) - len(line.lstrip())
    fix = " " * (want - have) if want >= have else "\x7f" * (have - want)
    return fix + line.lstrip()


def repl_env(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env["PROMPT_TOOLKIT_NO_CPR"] = "1"  # no cursor-position requests to answer
    env["TERM"] = "xterm"
    env["JSWORKER_HISTORY"] = str(tmp_path / "history")
    env.pop("NATS_URL", None)
    return env


@pytest.fixture
def screen_factory(tmp_path: Path) -> Iterator[Callable[..., Screen]]:
    made: list[Screen] = []

    def make(*args: str) -> Screen:
        s = Screen(list(args), repl_env(tmp_path))
        made.append(s)
        return s

    yield make
    for s in made:
        if s.p.isalive():
            s.p.terminate(force=True)


def workers_on(url: str) -> set[str]:
    async def go() -> set[str]:
        nc = await nats.connect(url)
        try:
            return {w["worker_id"] for w in await jsworker.list_workers(nc)}
        finally:
            await nc.close()

    return asyncio.run(go())


def test_define_redefine_submit_interrupt_leave(
    server: EmbeddedServer, screen_factory: Callable[..., Screen], unique: Callable[[str], str]
) -> None:
    t = unique("repl")
    s = screen_factory("repl", "--url", server.url, "--no-banner")
    s.expect(PROMPT)
    wid = s.statement("worker.worker_id").strip().splitlines()[-1].strip("'")
    assert wid.startswith("worker-")
    assert wid in workers_on(server.url)

    s.statement(f"@handle({t!r})", "async def h(ctx):", "    return 'v1:' + ctx.json()")
    out = s.statement(f"await submit({t!r}, 'a', wait=True)")
    assert "'v1:a'" in out
    s.statement(f"@handle({t!r})", "def h(ctx):", "    return 'v2:' + ctx.json()")
    out = s.statement(f"await submit({t!r}, 'b', wait=True)")
    assert "'v2:b'" in out
    out = s.statement("[(h['task_type'], h['version']) for h in session.handlers()]")
    assert repr([(t, 2)]) in out

    # a task submitted now waits for the prompt to come back? No: the worker runs while
    # the prompt waits. Submit without waiting, then read the result later.
    s.statement(f"h1 = await submit({t!r}, 'c')")
    out = s.statement("await h1.result(timeout=30)")
    assert "'v2:c'" in out

    # Ctrl-C interrupts an awaiting statement, not the worker
    # (the statement says it runs before Ctrl-C is sent: a Ctrl-C typed while the
    # prompt is still closing is a key for the prompt, not a signal)
    s.p.sendline("print('sleep' + 'ing'); await asyncio.sleep(3600)")
    s.expect("sleeping")
    s.p.sendintr()
    s.expect("KeyboardInterrupt")
    s.expect(PROMPT)
    # ... and a blocking one
    s.p.sendline("import time; print('block' + 'ing'); time.sleep(3600)")
    s.expect("blocking")
    s.p.sendintr()
    s.expect("KeyboardInterrupt")
    s.expect(PROMPT)
    # ... and a half-typed line at the prompt
    s.p.send("this is not sent")
    s.p.sendintr()
    s.expect("KeyboardInterrupt")
    s.expect(PROMPT)
    out = s.statement(f"await submit({t!r}, 'd', wait=True)")
    assert "'v2:d'" in out

    # errors are shown and the REPL goes on
    out = s.statement("1/0")
    assert "ZeroDivisionError" in out
    out = s.statement("await remove('no-such-type')")
    assert "ConfigError" in out

    # completion (Tab) from the namespace
    s.p.send("sessio\t")
    s.p.sendline(".group is None")
    s.expect("\r\n")
    out = s.expect(PROMPT)
    assert "True" in out

    # status prints tables
    out = s.statement("await status()")
    assert "handlers" in out and t in out

    # Ctrl-D: the worker stops cleanly and leaves the directory
    s.p.sendeof()
    out = s.expect(pexpect.EOF)
    assert "bye" in out
    s.p.close()
    assert s.p.exitstatus == 0
    assert wid not in workers_on(server.url)
    history = Path(s.p.env["JSWORKER_HISTORY"]).read_text()
    assert history.count("await submit(") >= 4


def test_consumer_failure_reported_at_the_prompt(
    server: EmbeddedServer, screen_factory: Callable[..., Screen], unique: Callable[[str], str]
) -> None:
    t = unique("clash")

    async def ungrouped() -> tuple[jsworker.Worker, object]:
        nc = await nats.connect(server.url)
        w = jsworker.Worker(nc)
        w.handle(t, lambda ctx: None)
        await w.start()
        await w.stop()  # the durable consumer task.T.> stays
        await nc.close()
        return w, nc

    asyncio.run(ungrouped())
    s = screen_factory("repl", "--url", server.url, "--group", "dev-test", "--no-banner")
    s.expect(PROMPT)
    out = s.statement(f"handle({t!r}, lambda ctx: 1)")
    assert "ConsumerConflictError" in out and "overlaps" in out
    out = s.statement("worker.task_types")
    assert t not in out
    s.p.sendeof()
    s.expect(pexpect.EOF)


def test_embedded_server_without_url(
    screen_factory: Callable[..., Screen], unique: Callable[[str], str]
) -> None:
    s = screen_factory("repl")
    banner = s.expect(PROMPT)
    assert "REPL: worker worker-" in banner and "nats://127.0.0.1:" in banner
    out = s.statement("handle('hello', lambda ctx: 'world')")
    out = s.statement("await submit('hello', wait=True)")
    assert "'world'" in out
    s.p.sendeof()
    out = s.expect(pexpect.EOF)
    assert "bye" in out
    s.p.close()
    assert s.p.exitstatus == 0


def test_bad_url_is_one_line(screen_factory: Callable[..., Screen]) -> None:
    s = screen_factory("repl", "--url", "nats://127.0.0.1:1")
    out = s.expect(pexpect.EOF)
    assert "cannot reach a NATS server at nats://127.0.0.1:1" in out
    assert "Traceback" not in out
    s.p.close()
    assert s.p.exitstatus == 1


def test_repl_joins_a_partitioned_cluster(
    fresh_server: EmbeddedServer,
    screen_factory: Callable[..., Screen],
    unique: Callable[[str], str],
    tmp_path: Path,
) -> None:
    """Two `jsworker serve` processes serve T with 8 partitions; the REPL joins (3
    members), its outputs switch v1 -> v2 on redefinition, then it leaves (2 members)."""
    from interactive_helpers import SERVE, wait_for

    from jsworker.cli._partitions import group_view

    t = unique("rj")
    env = repl_env(tmp_path)
    env.update(NATS_URL=fresh_server.url, JSW_ACC_TYPE=t, JSW_ACC_LOG=str(tmp_path / "s.log"))

    async def setup() -> None:
        nc = await nats.connect(fresh_server.url)
        await jsworker.setup_all(nc)
        await nc.close()

    async def members_are(n: int) -> None:
        nc = await nats.connect(fresh_server.url)
        try:
            await wait_for(lambda: _members(nc, t, n), 60, f"{n} members")
        finally:
            await nc.close()

    async def _members(nc: object, ttype: str, n: int) -> bool:
        try:
            view = await group_view(nc, ttype)  # type: ignore[arg-type]
        except Exception:
            return False
        return len(view["members"]) == n and all(p["consuming"] for p in view["partitions"])

    asyncio.run(setup())
    procs = [
        subprocess.Popen(SERVE, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(2)
    ]
    try:
        asyncio.run(members_are(2))
        s = screen_factory("repl", "--url", fresh_server.url, "--no-banner")
        s.expect(PROMPT)
        s.statement(
            f"@handle({t!r}, partitions=8)",
            "async def h(ctx):",
            "    return {'v': 'repl-v1'}",
        )
        asyncio.run(members_are(3))
        out = s.statement(f"await partition_map({t!r})")
        assert f"map {t}: 3 members" in out
        batch = (
            f"outs = [await (await submit({t!r}, {{'k': f'k{{i}}', 'i': i}}, key=f'k{{i}}'))"
            ".result(timeout=30) for i in range(32)]"
        )
        s.statement(batch)
        out = s.statement("sorted({o['v'] for o in outs})")
        assert "'repl-v1'" in out and "'serve'" in out
        s.statement(
            f"@handle({t!r}, partitions=8)",
            "async def h(ctx):",
            "    return {'v': 'repl-v2'}",
        )
        s.statement(batch)
        out = s.statement("sorted({o['v'] for o in outs})")
        assert "'repl-v2'" in out and "'repl-v1'" not in out
        s.statement(f"await remove({t!r})")
        asyncio.run(members_are(2))
        s.statement(batch)
        out = s.statement("sorted({o['v'] for o in outs})")
        assert "['serve']" in out
        # joined again, then Ctrl-D: the REPL's worker leaves the group on its way out
        s.statement(f"handle({t!r}, lambda ctx: {{'v': 'repl-v3'}}, partitions=8)")
        asyncio.run(members_are(3))
        s.p.sendeof()
        s.expect(pexpect.EOF)
        s.p.close()
        assert s.p.exitstatus == 0
        asyncio.run(members_are(2))
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=30)


def test_handle_confirms_live_tail_is_a_summary_and_blocks_auto_indent(
    server: EmbeddedServer, screen_factory: Callable[..., Screen], unique: Callable[[str], str]
) -> None:
    t = unique("live")
    s = screen_factory("repl", "--url", server.url, "--no-banner")
    s.expect(PROMPT)
    # a handler: the statement ends with the line saying it is live
    out = s.statement(f"@handle({t!r})", "def h(ctx):", "    return ctx.json()")
    assert f"{t} v1 live" in out.splitlines()[-1], out
    out = s.statement(f"@handle({t!r})", "def h(ctx):", "    return 2")
    assert f"{t} v2 live (replaces v1)" in out, out
    # tail(): the events print as they come; the value is one summary line, not the list
    s.statement(f"h1 = await submit({t!r}, 5)")
    out = s.statement("await tail(h1)")
    assert "step.completed" in out
    assert "[{" not in out and "<" in out and "events of" in out, out
    out = s.statement("len(_)")
    assert re.search(r"^\d+$", out.strip().splitlines()[-1]), out
    # auto-indent: the continuation line starts indented; backspaces dedent; nested
    # blocks keep their levels
    s.p.sendline("def f(x):")
    s.expect(MORE)
    s.p.sendline("if x:")  # typed without indentation: the REPL put 4 spaces
    s.expect(MORE)
    s.p.sendline("return 'yes'")  # 8, from the REPL
    s.expect(MORE)
    s.p.sendline("\x7f" * 4 + "return 'no'")  # back to 4
    s.expect(MORE)
    s.p.sendline("")  # only the indent left: the block ends
    s.expect(PROMPT)
    out = s.statement("f(1), f(0)")
    assert "('yes', 'no')" in out, out
    # a bracketed paste into an auto-indented line brings its own indentation
    s.p.sendline("def g():")
    s.expect(MORE)
    s.p.send("\x1b[200~    return 'pasted'\x1b[201~\r")
    s.expect(MORE)
    s.p.sendline("")
    s.expect(PROMPT)
    assert "'pasted'" in s.statement("g()")
    out = s.statement(f"await remove({t!r})")
    assert f"{t} removed from this worker" in out, out
    s.p.sendeof()
    s.p.expect(pexpect.EOF)


def test_the_banner_says_the_server_is_embedded(
    screen_factory: Callable[..., Screen],
) -> None:
    s = screen_factory("repl")
    banner = s.expect(PROMPT)
    assert "the server is embedded: this REPL started it" in banner, banner
    assert "export NATS_URL=nats://127.0.0.1:" in banner
    s.p.sendeof()
    s.p.expect(pexpect.EOF)
